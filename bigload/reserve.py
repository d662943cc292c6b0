"""The offload reserve: how many slots the runtime keeps for offloaded blocks, and how large each is.

Decided once, by the planner (`Plan.slots`), from the rule here; the runtime (`hooks.attach`) takes the
count and size from the plan, and uses the same rule only for a hand-written device map that has no plan.

A slot holds one offloaded block's weights while it runs or waits, prefetched. Blocks can nest (a split
module's own entry runs around its children's entries), so `nesting_depth` of them run at once, and
`prefetch` more wait ready: `min(depth + prefetch, number of offloaded blocks)` slots, each the size of
the largest offloaded block's weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

__all__ = ["SLOT_ALIGNMENT", "SlotSpec", "aligned", "nesting_depth", "slot_alignment", "slot_bytes", "slot_count"]

# Tensors start at multiples of this in a GPU slot, as the CUDA caching allocator aligns its blocks:
# vectorized kernels and cuBLAS take their fast paths only on aligned pointers (and some refuse unaligned
# ones). CPU slots need no padding: CPU kernels need element alignment, which width-sorted offsets give.
SLOT_ALIGNMENT = 256


def slot_alignment(on_gpu: bool) -> int:
    """Bytes a slot's tensor offsets are multiples of: `SLOT_ALIGNMENT` on a GPU, 1 on the CPU."""
    return SLOT_ALIGNMENT if on_gpu else 1


@dataclass(frozen=True)
class SlotSpec:
    """The slots the runtime holds on the device that runs offloaded blocks.

    Attributes:
        count: number of slots.
        nbytes: bytes of one slot (the largest offloaded block's weights, each tensor at an aligned offset,
            see `slot_bytes`; resident buffers excluded).
    """

    count: int
    nbytes: int

    @property
    def total(self) -> int:
        """Bytes of all slots."""
        return self.count * self.nbytes


def aligned(nbytes: int, alignment: int = SLOT_ALIGNMENT) -> int:
    """`nbytes` rounded up to a multiple of `alignment`.

    >>> aligned(1), aligned(256), aligned(257), aligned(3, 1)
    (256, 256, 512, 3)
    """
    return -(-nbytes // alignment) * alignment


def slot_bytes(tensor_nbytes: Iterable[int], alignment: int = SLOT_ALIGNMENT) -> int:
    """Bytes of a slot holding tensors of these sizes, each at an `alignment`-aligned offset: the one formula
    the planner (sizing slots) and the runtime (laying tensors out in them) both use.

    >>> slot_bytes([1024, 64]), slot_bytes([1024, 64], 1)
    (1280, 1088)
    """
    return sum(aligned(nbytes, alignment) for nbytes in tensor_nbytes)


def nesting_depth(names: Iterable[str]) -> int:
    """How many of these blocks can run at once: the longest chain of names nested in one another
    (`""` encloses every name, `"a"` encloses `"a.b"`, not `"ab"`); 1 for no or unrelated names.

    Linear after a sort: sorted by dotted components, every subtree is contiguous, so a stack of the
    enclosing names suffices.

    >>> nesting_depth(["body", "body.a", "body.b", "head"])
    2
    """
    depth = 1
    stack: list[str] = []
    for name in sorted(set(names), key=lambda n: n.split(".") if n else []):
        while stack and not _encloses(stack[-1], name):
            stack.pop()
        stack.append(name)
        depth = max(depth, len(stack))
    return depth


def _encloses(outer: str, inner: str) -> bool:
    return outer == "" or inner.startswith(outer + ".")


def slot_count(names: Sequence[str], prefetch: int) -> int:
    """Slots for these offloaded blocks: the nested ones running at once plus `prefetch` waiting, never
    more than there are blocks (0 for none).

    >>> slot_count(["body", "body.a", "body.b"], prefetch=1)
    3
    """
    if not names:
        return 0
    return min(nesting_depth(names) + prefetch, len(names))
