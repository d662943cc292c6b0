"""An inventory from checkpoint headers alone (no model class, no config needed): modules are the dotted
prefixes of tensor names, in the order the checkpoint suggests. For `bigload plan model.safetensors`."""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import torch

from bigload.errors import BigloadError
from bigload.plan.dtypes import DtypeRule
from bigload.plan.inventory import Inventory, TensorEntry, subtree_ends
from bigload.plan.kv import decoder_block_names, kv_cache_spec
from bigload.sizes import dtype_width

__all__ = ["block_of", "inventory_from_checkpoint"]

# Without a model class the order of siblings is a guess: shard order first (save_pretrained writes the
# state dict in order), then these conventions for siblings in one file (safetensors sorts names within a
# file, so "lm_head" would otherwise come before "model").
_SIBLING_RANK: dict[str, int] = {
    **dict.fromkeys(("embed_tokens", "wte", "wpe", "embeddings", "embed", "tok_embeddings", "word_embeddings",
                     "embed_in", "shared"), 0),
    **dict.fromkeys(("norm", "final_layernorm", "ln_f", "final_layer_norm", "final_norm", "norm_f"), 2),
    **dict.fromkeys(("lm_head", "embed_out", "output", "head", "classifier", "score", "qa_outputs"), 3),
}
_DEFAULT_RANK = 1


def block_of(name: str) -> str:
    """The block a checkpoint tensor belongs to when planning from headers: the first numbered module on
    its path (`model.layers.17.mlp.up_proj.weight` -> `model.layers.17`), else the module owning it.

    >>> block_of("model.layers.17.self_attn.q_proj.weight")
    'model.layers.17'
    >>> block_of("lm_head.weight")
    'lm_head'
    """
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit() and i > 0:
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1])


def inventory_from_checkpoint(
    index: Any,
    dtype: torch.dtype | str | None = None,
    *,
    no_split_prefixes: Iterable[str] | None = None,
    special_dtypes: Mapping[str, torch.dtype | str] | None = None,
    keep_in_fp32_modules: Sequence[str] = (),
    config: Any = None,
) -> Inventory:
    """Inventory a checkpoint from its headers alone: modules are the dotted prefixes of tensor names.

    Args:
        index: a `checkpoint.CheckpointIndex` (anything with `.tensors` mapping name -> ref with `.dtype`,
            `.shape`).
        dtype: the dtype floating tensors will be loaded in (None: as stored).
        no_split_prefixes: containers whose direct children are blocks never split (e.g. "model.layers");
            default: every numbered child of a container (`model.layers.17`) is such a block.
        special_dtypes: tensor name -> dtype overriding `dtype`.
        keep_in_fp32_modules: module names whose floating tensors stay float32.
        config: a transformers-style config (object or dict) for the KV-cache spec.

    Returns:
        An `Inventory` whose module classes are all "".

    Raises:
        BigloadError: the checkpoint holds no tensor, or a name is both a tensor and a module.

    >>> inventory_from_checkpoint(open_checkpoint("model/"), dtype="bfloat16")  # doctest: +SKIP
    """
    refs = list(index.tensors.values())
    if not refs:
        raise BigloadError("the checkpoint holds no tensor; nothing to plan.")
    rule = DtypeRule.of(dtype, special_dtypes, keep_in_fp32_modules)
    target = rule.dtype
    tree = _HeaderTree.build(refs, getattr(index, "files", ()))
    names, parents = tree.preorder()
    position = {name: i for i, name in enumerate(names)}
    no_split = _header_no_split(names, no_split_prefixes)
    widths: dict[torch.dtype, int] = {}
    own = [0] * len(names)
    own_buffers = [0] * len(names)
    counts = [0] * len(names)
    entries: list[TensorEntry] = []
    for ref in sorted(refs, key=lambda r: (position[_owner(r.name)], r.name)):
        module = position[_owner(ref.name)]
        loaded = rule.dtype_of(ref.name, ref.dtype)
        width = widths.get(loaded) or widths.setdefault(loaded, dtype_width(loaded))
        nbytes = _numel(ref.shape) * width
        entries.append(TensorEntry(ref.name, module, nbytes, loaded, False, stored=ref.dtype))
        own[module] += nbytes
        counts[module] += 1
    flags = tuple(no_split)
    stored = next((ref.dtype for ref in refs if ref.dtype.is_floating_point), None)
    return Inventory(
        names=tuple(names),
        classes=("",) * len(names),
        parents=tuple(parents),
        ends=subtree_ends(parents),
        own_bytes=tuple(own),
        own_buffer_bytes=tuple(own_buffers),
        own_tensors=tuple(counts),
        no_split=flags,
        tensors=tuple(entries),
        tied_groups=(),
        kv=kv_cache_spec(config, decoder_block_names(names, flags), dtype=target or stored),
        dtype=target,
        rule=rule,
    )


def _owner(tensor_name: str) -> str:
    return tensor_name.rpartition(".")[0]


def _numel(shape: Sequence[int]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


class _HeaderTree:
    """Module names implied by tensor names, with each module's first position in the checkpoint."""

    def __init__(self) -> None:
        self.children: dict[str, list[str]] = {"": []}  # filled parent-first as names arrive
        self.first: dict[str, tuple[int, int]] = {"": (0, 0)}  # (file rank, position in file order)

    @staticmethod
    def build(refs: Sequence[Any], files: Sequence[Any]) -> "_HeaderTree":
        tree = _HeaderTree()
        file_rank = {path: i for i, path in enumerate(files)}
        tensor_names = {ref.name for ref in refs}
        for position, ref in enumerate(refs):
            key = (file_rank.get(getattr(ref, "file", None), 0), position)
            module = _owner(ref.name)
            if module in tensor_names:
                raise BigloadError(
                    f"checkpoint name {module!r} is a tensor and also the module of {ref.name!r}; "
                    "a checkpoint with such names cannot be planned from headers alone."
                )
            tree._add(module, key)
        return tree

    def _add(self, module: str, key: tuple[int, int]) -> None:
        node = module
        while True:
            known = node in self.first
            if not known:
                self.first[node] = key
                self.children.setdefault(node, [])
            elif key < self.first[node]:
                self.first[node] = key
            if node == "":
                return
            parent = node.rpartition(".")[0]
            if not known:
                self.children.setdefault(parent, []).append(node)
            node = parent

    def _sort_key(self, name: str) -> tuple[int, int, int, int]:
        leaf = name.rpartition(".")[2]
        if leaf.isdigit():
            return (0, 0, int(leaf), 0)  # numbered siblings run in number order
        file_rank, position = self.first[name]
        return (file_rank, _SIBLING_RANK.get(leaf, _DEFAULT_RANK), 0, position)

    def preorder(self) -> tuple[list[str], list[int]]:
        names: list[str] = []
        parents: list[int] = []
        stack: list[tuple[str, int]] = [("", -1)]
        while stack:
            name, parent = stack.pop()
            index = len(names)
            names.append(name)
            parents.append(parent)
            kids = sorted(self.children[name], key=self._sort_key)
            stack.extend((kid, index) for kid in reversed(kids))
        return names, parents


def _header_no_split(names: Sequence[str], prefixes: Iterable[str] | None) -> list[bool]:
    if prefixes is None:
        return [bool(name) and name.rpartition(".")[2].isdigit() and "." in name for name in names]
    containers = frozenset(prefixes)
    return [bool(name) and ("." in name and name.rpartition(".")[0] in containers) for name in names]

