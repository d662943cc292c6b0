"""accelerate's `get_balanced_memory`, as a pure function over an `Inventory`: per-GPU budgets that spread a
model evenly (see `accelerate_map` for why accelerate's own rules are reproduced)."""

from __future__ import annotations

from typing import Mapping

from bigload.plan.accelerate_map import Key, Note, Size
from bigload.plan.inventory import Inventory

__all__ = ["balanced_memory"]



def balanced_memory(inv: Inventory, sizes: Mapping[str, Size], max_memory: dict[Key, Size], *,
                    low_zero: bool, probed: bool) -> tuple[dict[Key, Size], list[Note]]:
    """accelerate's `get_balanced_memory` over an inventory.

    Args:
        inv: the model's inventory (its `no_split` flags are the no-split classes).
        sizes: `module_sizes(inv, dtype, special_dtypes)`.
        max_memory: accelerate's normalized budget (changed in place, as accelerate does, and returned).
        low_zero: keep GPU 0 as empty as possible.
        probed: the budget was measured (no `max_memory` given): one GPU then keeps 10% free.

    Returns:
        The balanced budget and the messages accelerate logs.
    """
    notes: list[Note] = []
    # accelerate counts integer keys (and, on a Mac, "mps"; bigload runs on CUDA or the CPU).
    gpus = [d for d in max_memory if isinstance(d, int) and max_memory[d] > 0]
    count = len(gpus)
    if count == 0:
        return max_memory, notes
    if count == 1:
        low_zero = False
        key = next((k for k in max_memory if isinstance(k, int)), None)
        if probed and key is not None:
            max_memory[key] *= 0.9
            notes.append(Note("info", f"We will use 90% of the memory on device {key} for storing the model, and 10% "
                                      "for the buffer to avoid OOM. You can set `max_memory` in to a higher value to "
                                      "use more memory (at your own risk)."))
    per_gpu = sizes.get("", 0) // (count - 1 if low_zero else count)
    buffer = max(_first_no_split_sizes(inv, sizes).values(), default=0)
    buffer = int(1.25 * max(buffer, _mean_final_module(sizes)))
    per_gpu += buffer
    ordered = sorted(gpus)
    for index in ordered[:-1]:
        max_memory[index] = min(max_memory[0] if low_zero and index == 0 else per_gpu, max_memory[index])
    if low_zero:
        rest = sum(max_memory[i] for i in range(1, count))
        max_memory[0] = min(max(0, sizes.get("", 0) - rest), max_memory[0])
    return max_memory, notes


def _first_no_split_sizes(inv: Inventory, sizes: Mapping[str, Size]) -> dict[str, Size]:
    """Size of the first module of each no-split class, in the order accelerate's size dict lists modules."""
    classes = {inv.classes[i] for i in range(len(inv)) if inv.no_split[i]}
    found: dict[str, Size] = {}
    index = {name: i for i, name in enumerate(inv.names)}
    for name, size in sizes.items():
        i = index.get(name)
        if name == "" or i is None or not inv.no_split[i]:
            continue
        found.setdefault(inv.classes[i], size)
        if set(found) == classes:
            break
    return found


def _mean_final_module(sizes: Mapping[str, Size]) -> int:
    """accelerate's mean size of the last modules: leaves of the size tree once tensor names are removed."""
    def leaves(table: Mapping[str, Size]) -> list[str]:
        has_children: dict[str, int] = {}
        for name in table:
            if name and "." in name:
                parent = name.rsplit(".", 1)[0]
                has_children[parent] = has_children.get(parent, 0) + 1
        return [name for name in table if not has_children.get(name) and name != ""]

    first = set(leaves(sizes))
    modules = {n: v for n, v in sizes.items() if n not in first}
    final = leaves(modules)
    return int(sum(modules[n] for n in final) / max(len(final), 1))
