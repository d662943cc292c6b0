"""The offload reserve: how many slots the runtime keeps for offloaded blocks, and how large each is.

Decided once, by the planner (`Plan.slots`), from the rule here; the runtime (`hooks.attach`) takes the
count and size from the plan, and uses the same rule only for a hand-written device map that has no plan.

A slot holds one offloaded block's weights while it runs or waits, prefetched. A slot on a GPU also has a
pinned host staging buffer of its size (host-to-GPU copies go through it, and explicit disk reads land in it):
pinned memory is host RAM that cannot be swapped, so the planner charges it to the CPU budget
(`SlotSpec.staging_bytes`, at the size torch's pinned allocator really takes: `pinned_bytes`). Blocks can nest (a split
module's own entry runs around its children's entries), so `nesting_depth` of them run at once, and
`prefetch` more wait ready: `min(depth + prefetch, number of offloaded blocks)` slots, each the size of
the largest offloaded block's weights.

How disk-placed blocks come into the slots is decided here too (`choose_disk_reads`), from the budget: while
the disk blocks fit in the CPU memory left over, they are used in place through the page cache (`MAPPED`);
beyond that the page cache would evict the block about to run, so they are read with large explicit reads
into the slots (`READ`), each slot then a little larger (`read_slot_bytes`) so a block's file ranges can be read
rounded out to `READ_ALIGN` (what `O_DIRECT` asks).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Iterable, Sequence

from bigload.errors import PlanError
from bigload.messages import Text, setting
from bigload.sizes import format_size
from bigload.tensors import owner_of

__all__ = ["READ_ALIGN", "READ_SLACK_BYTES", "SLOT_ALIGNMENT", "DiskReads", "SlotSpec", "aligned", "choose_disk_reads",
           "nesting_depth", "pinned_bytes", "read_slot_bytes", "slot_alignment", "slot_bytes", "slot_count"]

READ_ALIGN = 4096  # O_DIRECT reads: file offset, length and memory address in multiples of this
# Per slot, with explicit reads: room to round a block's contiguous file ranges out to READ_ALIGN at both ends
# (two ranges: a layer spanning two shards; `.dat` files of sizes that are multiples of 4 KiB need none). A
# block whose ranges do not fit is read packed, without O_DIRECT (see `bigload.load.reads.layout`).
READ_SLACK_BYTES = 4 * READ_ALIGN
READ_SLACK_FROM = 1 << 20  # smaller blocks get no slack (see `read_slot_bytes`)


DISK_READS_OVERRIDE = setting("disk_reads", "", "mapped|read")


class DiskReads(str, Enum):
    """How disk-placed blocks are brought in on the CPU.

    MAPPED: used in place, as views of the memory-mapped files (zero-copy; the page cache holds them; a
        prefetch is `madvise(WILLNEED)`), right while they fit in memory.
    READ: read with large explicit reads (`O_DIRECT` where the filesystem allows) into the slots, ahead of
        use, by a pool of reader threads; for blocks that do not fit in memory.
    """

    MAPPED = "mapped"
    READ = "read"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, value: "DiskReads | str") -> "DiskReads":
        """`value` as a DiskReads ("mapped" or "read").

        Raises:
            PlanError: any other name.
        """
        try:
            return cls(value)
        except ValueError:
            raise PlanError(Text(setting("disk_reads", repr(value)), " is not a way to bring disk blocks in; use "
                                 "'mapped' or 'read' (or none, to decide from the memory left).")) from None


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
            see `slot_bytes`; resident buffers excluded; plus `READ_SLACK_BYTES` when disk blocks are read:
            `read_slot_bytes`).
        reads: how disk-placed blocks come into the slots (`choose_disk_reads`).
        staged: each slot has a pinned host staging buffer of `nbytes` (slots on a GPU: copies from pageable
            host memory and explicit reads go through it); the runtime allocates exactly these.
    """

    count: int
    nbytes: int
    reads: DiskReads = DiskReads.MAPPED
    staged: bool = False

    @property
    def total(self) -> int:
        """Bytes of all slots."""
        return self.count * self.nbytes

    @property
    def staging_bytes(self) -> int:
        """Pinned host bytes of the slots' staging buffers, as torch pins them (`pinned_bytes` each); 0 when
        the slots are not staged. The planner charges this to the CPU budget."""
        return self.count * pinned_bytes(self.nbytes) if self.staged else 0


def pinned_bytes(nbytes: int) -> int:
    """Host memory torch really pins for a buffer of `nbytes`: its caching host allocator (behind
    `pin_memory=True`) rounds every allocation up to a power of two, so a 300 MiB staging buffer takes 512 MiB
    of page-locked RAM.

    >>> pinned_bytes(0), pinned_bytes(4096), pinned_bytes(4097), pinned_bytes(300 << 20) >> 20
    (0, 4096, 8192, 512)
    """
    return 0 if nbytes <= 0 else 1 << (nbytes - 1).bit_length()


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
    return inner != outer and owner_of(inner, {outer}) == outer


def slot_count(names: Sequence[str], prefetch: int) -> int:
    """Slots for these offloaded blocks: the nested ones running at once plus `prefetch` waiting, never
    more than there are blocks (0 for none).

    >>> slot_count(["body", "body.a", "body.b"], prefetch=1)
    3
    """
    if not names:
        return 0
    return min(nesting_depth(names) + prefetch, len(names))


def choose_disk_reads(disk_bytes: int, memory_left: int) -> tuple[DiskReads, Text]:
    """How disk-placed blocks are brought in: in place through the page cache while they fit in the CPU
    memory left over (`memory_left`: the CPU budget minus what the plan puts there), else explicit reads.

    Returns:
        (the choice, a one-line reason for `explain()`).

    >>> choose_disk_reads(7 * 2**30, 3 * 2**30)[0]
    <DiskReads.READ: 'read'>
    """
    if disk_bytes <= memory_left:
        return DiskReads.MAPPED, Text(
            f"disk blocks ({format_size(disk_bytes)}) fit in the CPU memory left ({format_size(memory_left)}): "
            "they are used in place from the page cache (mapped, zero-copy), prefetched with madvise; pass ",
            DISK_READS_OVERRIDE, " to override.")
    return DiskReads.READ, Text(
        f"disk blocks ({format_size(disk_bytes)}) exceed the CPU memory left ({format_size(max(0, memory_left))}), "
        "so the page cache cannot keep them: each is read with large explicit reads (O_DIRECT where the "
        "filesystem allows) into the slots, ahead of use; pass ", DISK_READS_OVERRIDE, " to override.")


def read_slot_bytes(largest: int, reads: DiskReads) -> int:
    """Bytes of one slot for blocks of at most `largest` bytes: with explicit reads of blocks of
    `READ_SLACK_FROM` or more, `READ_SLACK_BYTES` more. Smaller blocks get none: they are read packed,
    through the page cache, which costs nothing that matters at their size."""
    if largest < READ_SLACK_FROM or reads is not DiskReads.READ:
        return largest
    return largest + READ_SLACK_BYTES
