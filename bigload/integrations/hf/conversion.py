"""Checkpoint names -> model names, as transformers' `from_pretrained` finds them: its conversion mapping
(renamed keys, fused tensors built from several checkpoint tensors), the base-model prefix, and the tensors a
model ignores by design. Reads headers only; the result is a `load.sources.TensorSources`."""

from __future__ import annotations

import copy
import logging
import re
from typing import Any, Callable, Sequence

import torch
from torch import nn

from bigload.errors import CheckpointError
from bigload.formats.refs import CheckpointIndex, TensorRef
from bigload.load.sources import DerivedTensor, TensorSources

__all__ = ["checkpoint_sources", "model_tensor_names"]

logger = logging.getLogger(__name__)



def checkpoint_sources(model: nn.Module, index: CheckpointIndex) -> TensorSources:
    """Where each tensor of a transformers `model` is in `index`, as transformers' from_pretrained finds it.

    - transformers' conversion mapping for the model (transformers 5): renamed keys (Mixtral's
      `block_sparse_moe` is `mlp`, old `LayerNorm.gamma` is `.weight`), and fused tensors built from several
      checkpoint tensors (Mixtral's per-expert `experts.N.w1/w3` stacked and concatenated into
      `experts.gate_up_proj`). Converted tensors are built one at a time while streaming, by transformers'
      own conversion operations, from memory-mapped parts;
    - the base-model prefix added or stripped (a `GPT2LMHeadModel` from a checkpoint saved by `GPT2Model`,
      `AutoModel` from a `BertForMaskedLM` checkpoint);
    - checkpoint tensors the model does not use by design are ignored rather than unexpected: those matching
      its `_keys_to_ignore_on_load_unexpected`, and a task head's tensors when loading the base model.

    Reads headers only: shapes of converted tensors come from running the conversion on meta tensors.

    Raises:
        CheckpointError: a conversion that cannot be planned from headers, naming it and the tensor.
    """
    renamings, converters = _conversion_mapping(model)
    by_pattern = {pattern: converter for converter in converters for pattern in converter.source_patterns}
    expected = set(model.state_dict())
    prefix = getattr(model, "base_model_prefix", "") or ""
    tensors: dict[str, Any] = {}
    merged: dict[str, tuple[Any, list[tuple[str, TensorRef]]]] = {}
    unmatched: list[str] = []
    for key in sorted(index.tensors, key=_natural_key):
        ref = index.tensors[key]
        renamed, pattern = _model_name(key, renamings, converters, prefix, expected)
        if renamed not in expected:
            unmatched.append(key)
        elif pattern is not None:
            merged.setdefault(renamed, (by_pattern[pattern], []))[1].append((pattern, ref))
        elif renamed != key:
            tensors[renamed] = ref
    for target, (converter, parts) in merged.items():
        tensors.update(_derived_tensors(model, target, converter, parts))
    ignored = _ignored(model, unmatched, prefix, index)
    if ignored:
        logger.info("not loading %d checkpoint tensors %s does not use (e.g. %s)", len(ignored),
                    type(model).__name__, sorted(ignored)[:3])
    return TensorSources(tensors=tensors, ignored=frozenset(ignored))


def model_tensor_names(model: nn.Module, checkpoint_names: Sequence[str]) -> dict[str, str]:
    """Checkpoint tensor name -> the model tensor it loads into, by transformers' rules (see
    `checkpoint_sources`); names the model has no tensor for are left out. Reads nothing: a pipeline rank
    uses it to know which shards hold its stage before opening any."""
    renamings, converters = _conversion_mapping(model)
    expected = set(model.state_dict())
    prefix = getattr(model, "base_model_prefix", "") or ""
    names = {key: _model_name(key, renamings, converters, prefix, expected)[0] for key in checkpoint_names}
    return {key: name for key, name in names.items() if name in expected}


def _model_name(key: str, renamings: Sequence[Any], converters: Sequence[Any], prefix: str,
                expected: set[str]) -> tuple[str, str | None]:
    """The model name of checkpoint tensor `key`, and the converter pattern that matched it, if any."""
    renamed, pattern = _rename(key, renamings, converters)
    renamed = _with_prefix(renamed, prefix, expected)
    if renamed not in expected and key in expected:
        return key, None  # the key needed no renaming (transformers' rule)
    return renamed, pattern


def _conversion_mapping(model: nn.Module) -> tuple[list[Any], list[Any]]:
    """transformers' renamings and converters for `model` (none before transformers 5 or for non-PreTrained
    models, whose checkpoints hold the model's own names)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:
        return [], []
    if not hasattr(model, "config"):
        return [], []
    mapping = get_model_conversion_mapping(model)
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    return renamings, converters


def _rename(key: str, renamings: Sequence[Any], converters: Sequence[Any]) -> tuple[str, str | None]:
    """transformers' rule: every renaming in turn, then at most one converter (whose pattern is returned)."""
    if not renamings and not converters:
        return key, None
    from transformers.core_model_loading import rename_source_key

    return rename_source_key(key, list(renamings), list(converters))


def _with_prefix(name: str, prefix: str, expected: set[str]) -> str:
    """Strip or add the base-model prefix when that names a model tensor (transformers' rule)."""
    if not prefix or name in expected:
        return name
    if name.startswith(prefix + ".") and name[len(prefix) + 1:] in expected:
        return name[len(prefix) + 1:]
    if f"{prefix}.{name}" in expected:
        return f"{prefix}.{name}"
    return name


def _natural_key(name: str) -> list[tuple[Any, ...]]:
    """`experts.2` before `experts.10` (and `shard_2` before `shard_11`): the order transformers collects a
    converter's parts in, so experts are stacked in the same order."""
    key: list[tuple[Any, ...]] = []
    for part in name.split("."):
        text = part.rstrip("0123456789")
        if not text:
            key.append((0, int(part)))
        else:
            key.append((1, text, int(part[len(text):])) if text != part else (1, text))
    return key


def _ignored(model: nn.Module, unmatched: Sequence[str], prefix: str, index: CheckpointIndex) -> list[str]:
    patterns = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()]
    # Loading the base model from a checkpoint of a model with a head: the checkpoint's base-model tensors
    # carry the prefix, the head's do not (transformers reports those and moves on).
    is_base = bool(prefix) and getattr(model, "base_model", None) is model
    has_prefix = is_base and any(name.startswith(prefix + ".") for name in index.tensors)
    return [name for name in unmatched
            if any(p.search(name) for p in patterns) or (has_prefix and not name.startswith(prefix + "."))]


def _derived_tensors(model: nn.Module, target: str, converter: Any,
                     parts: list[tuple[str, TensorRef]]) -> dict[str, Any]:
    """The model tensors one transformers `WeightConverter` makes from `parts`, as `DerivedTensor`s whose
    shapes come from running the conversion on meta tensors."""
    def run(tensors: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        fresh = copy.deepcopy(converter)  # converters collect tensors in their own state
        for (pattern, ref), tensor in zip(parts, tensors):
            fresh.add_tensor(target, ref.name, pattern, tensor)
        produced = fresh.convert(target, model=model, config=getattr(model, "config", None))
        return {name: value[0] if isinstance(value, list) else value for name, value in produced.items()}

    how = " then ".join(repr(op) for op in converter.operations)
    try:
        with torch.no_grad():
            shapes = run([torch.empty(ref.shape, dtype=ref.dtype, device="meta") for _, ref in parts])
    except Exception as exc:  # any failure of transformers' conversion code means: cannot plan it
        raise CheckpointError(
            f"transformers converts checkpoint tensors {[ref.name for _, ref in parts][:4]} into {target!r} with "
            f"{how}, and bigload cannot plan that conversion from headers ({type(exc).__name__}: {exc}). Load "
            "this model with transformers' from_pretrained(device_map=...), or convert the checkpoint once to the "
            "model's own names with `model.state_dict()` and safetensors.torch.save_file."
        ) from exc
    refs = tuple(ref for _, ref in parts)
    return {
        name: DerivedTensor(name, tuple(meta.shape), meta.dtype, refs, _picker(run, name), how)
        for name, meta in shapes.items()
    }


def _picker(run: Callable[[Sequence[torch.Tensor]], dict[str, torch.Tensor]], name: str
            ) -> Callable[[Sequence[torch.Tensor]], torch.Tensor]:
    def build(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            return run(tensors)[name]

    return build
