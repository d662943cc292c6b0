"""Adapters (peft) on a model built on the meta device, loaded in the same pass as the base weights.

`hf.from_pretrained(..., adapter=PATHS)` reads each adapter folder (`adapter_config.json` and
`adapter_model.safetensors`, or peft's older `adapter_model.bin`; headers only), wraps the meta model with
peft as peft itself would (no weight exists yet), and turns the adapter tensors into one more checkpoint
source for the loader: each adapter tensor is loaded under the name it has in the wrapped model (mapped as
peft's own loading maps saved names), into the block that owns it. The planner then
counts adapter bytes on that block, the loader streams base and adapter tensors in one pass, and the runtime
brings them in with the block. Prompt and prefix tuning keep their few tensors outside the base model (peft's
prompt encoder); they are loaded after the base, onto the device the model's inputs start on.

Adapters added with peft's own calls to a model that is already dispatched are the runtime's concern
(`hooks.adopt`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from bigload.formats.refs import CheckpointIndex, TensorRef
from bigload.formats.discover import open_checkpoint
from bigload.devices import DISK, Device
from bigload.errors import AdapterError, BigloadError, CheckpointError
from bigload.messages import Text, setting
from bigload.sizes import format_size
from bigload.load.sources import DerivedTensor, Source, TensorSources
from bigload.runtime.runtime import runtime_of
from bigload.tensors import owner_of, tensor_groups

__all__ = ["ADAPTER_FP32_MODULES", "Adapter", "adapter_fp32_modules", "adapter_summary", "load_model_level_weights",
           "read_adapters", "with_adapter_sources", "wrap"]

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# peft's older file name, still read by peft (`torch.save` zip; bigload unpickles nothing but tensors from it).
ADAPTER_WEIGHTS_PICKLED = "adapter_model.bin"
# Segments peft puts into the names of the modules it wraps (a tuner layer's `base_layer`, the original of a
# `modules_to_save` entry): the base checkpoint names the same tensor without them.
_WRAPPER_SEGMENTS = (".base_layer.", ".original_module.")
# peft keeps adapter weights in float32 over a float16/bfloat16 base (`autocast_adapter_dtype=True`).
ADAPTER_FP32_MODULES: tuple[str, ...] = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B",
                                         "lora_magnitude_vector")
_PEFT_PREFIX = "base_model.model."  # how peft's saved keys and a PeftModel's names start


@dataclass(frozen=True)
class Adapter:
    """One adapter folder, read from its config and safetensors header (no tensor bytes).

    Attributes:
        name: the adapter's name in the wrapped model ("default" for the first, as in peft; else the folder name).
        folder: the adapter folder.
        config: its peft config (`LoraConfig`, `PromptTuningConfig`, ...).
        index: its weights, headers only.
    """

    name: str
    folder: Path
    config: Any
    index: CheckpointIndex

    @property
    def weights(self) -> Path:
        """The weights file, under the folder as the user named it (for messages)."""
        return self.folder / self.index.files[0].name


def adapter_fp32_modules(dtype: torch.dtype) -> tuple[str, ...]:
    """Adapter modules the loader keeps in float32 at `dtype`: all of them over a float16/bfloat16 base,
    as peft does (`autocast_adapter_dtype=True`); none otherwise."""
    return ADAPTER_FP32_MODULES if dtype in (torch.float16, torch.bfloat16) else ()


def _require_peft() -> Any:
    try:
        import peft
    except ImportError:
        raise AdapterError("adapters need peft; install it with `pip install bigload[peft]`.") from None
    return peft


def read_adapters(paths: str | Path | Sequence[str | Path]) -> list[Adapter]:
    """Read adapter folders: the first is named "default" (peft's name), the others after their folders.

    Raises:
        AdapterError: peft is missing, a path is a file or no folder, a folder lacks its config or weights, the
            config is not a JSON object, names a method peft does not know or gives a setting a value of another
            type than peft declares, the weights file is unreadable, or two adapters get the same name.
    """
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    adapters = [_read_adapter(Path(path), "default" if i == 0 else Path(path).name) for i, path in enumerate(items)]
    names = [adapter.name for adapter in adapters]
    if len(set(names)) != len(names):
        raise AdapterError(f"adapters {[str(a.folder) for a in adapters]} would share a name ({names}); "
                           "give each adapter its own folder name.")
    return adapters


def _read_adapter(folder: Path, name: str) -> Adapter:
    peft = _require_peft()
    folder = folder.expanduser()  # as the user wrote it, for messages
    _check_folder(folder)
    config_path = folder / ADAPTER_CONFIG
    weights_path = _weights_file(folder)
    config = _read_config(peft, config_path, _read_config_json(config_path).get("peft_type"))
    try:
        index = open_checkpoint(weights_path)
    except CheckpointError as error:
        # The checkpoint error already names the file and what is wrong in it.
        raise AdapterError(f"{error} This adapter's weights are unreadable: save the adapter again with peft's "
                           "save_pretrained.") from None
    return Adapter(name, folder, config, index)


def _check_folder(folder: Path) -> None:
    if folder.is_dir():
        return
    if folder.exists():
        hint = folder.parent if folder.name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_PICKLED) else None
        instead = Text(" (here: ", setting("adapter", repr(str(hint)), str(hint)), ")") if hint else ""
        raise AdapterError(Text(
            f"{folder} is a file, not an adapter folder; pass the folder peft's save_pretrained wrote, the one "
            f"holding {ADAPTER_CONFIG}", instead, "."))
    raise AdapterError(f"{folder}: no such adapter folder.")


def _weights_file(folder: Path) -> Path:
    """The adapter's weights: safetensors if present (peft's choice too), else peft's older `.bin`."""
    for candidate in (folder / ADAPTER_WEIGHTS, folder / ADAPTER_WEIGHTS_PICKLED):
        if candidate.is_file():
            return candidate
    raise AdapterError(f"{folder} has no {ADAPTER_WEIGHTS} (or {ADAPTER_WEIGHTS_PICKLED}); an adapter folder holds "
                       f"{ADAPTER_CONFIG} and the weights as peft's save_pretrained writes them. Pass that folder.")


def _read_config_json(path: Path) -> dict[str, Any]:
    """The config file as a JSON object, or an AdapterError naming it (truncated, not JSON, not an object)."""
    if not path.is_file():
        raise AdapterError(f"{path} is missing; an adapter folder holds {ADAPTER_CONFIG} and the weights as peft's "
                           "save_pretrained writes them. Pass that folder.")
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise AdapterError(f"{path} is not valid JSON ({type(error).__name__}: {error}); it is truncated or "
                           "damaged. Save the adapter again with peft's save_pretrained.") from None
    if not isinstance(content, dict):
        raise AdapterError(f"{path} holds a JSON {type(content).__name__}, not an object of peft settings; save "
                           "the adapter again with peft's save_pretrained.")
    return content


def _read_config(peft: Any, path: Path, method: object) -> Any:
    """peft's config from `path` (a JSON object), its scalar settings checked against their declared types."""
    try:
        config = peft.PeftConfig.from_pretrained(str(path.parent))
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        known = ", ".join(sorted(str(t.value) for t in peft.PeftType))
        raise AdapterError(
            f"{path}: peft cannot read this config ({type(error).__name__}: {error}); its peft_type is "
            f"{method!r}, and peft {peft.__version__} knows {known}. Save the adapter again with peft, or upgrade "
            "peft if it is a newer method."
        ) from None
    wrong = _mistyped_settings(config)
    if wrong:
        raise AdapterError(f"{path}: {'; '.join(wrong[:5])}. peft would fail on it while wrapping the model; fix "
                           "the value, or save the adapter again with peft's save_pretrained.")
    return config


# Declared types whose values a JSON config holds as-is: the check covers these and Optional ones of them.
_SCALARS: dict[Any, tuple[type, ...]] = {int: (int,), float: (int, float), bool: (bool,), str: (str,)}


def _mistyped_settings(config: Any) -> list[str]:
    """"r is 'eight', not an int"-style lines for the config's scalar settings whose value has another type.

    peft's configs are dataclasses that declare each setting's type but do not check it; a wrong one fails
    deep inside peft (a `TypeError` comparing a str with an int) while wrapping."""
    try:
        hints = typing.get_type_hints(type(config))
    except (NameError, TypeError, AttributeError):  # annotations that cannot be resolved: nothing to check
        return []
    wrong = []
    for item in dataclasses.fields(config):
        allowed = _allowed_types(hints.get(item.name))
        value = getattr(config, item.name)
        if allowed is None or value is None and type(None) in allowed:
            continue
        if isinstance(value, bool) and bool not in allowed or not isinstance(value, allowed):
            names = " or ".join(t.__name__ for t in allowed if t is not type(None))
            wrong.append(f"{item.name} is {value!r}, not {'an' if names[0] in 'aeiou' else 'a'} {names}")
    return wrong


def _allowed_types(hint: Any) -> tuple[type, ...] | None:
    """The Python types a value of `hint` may have, for scalar hints (and Optional ones); None for others."""
    if hint in _SCALARS:
        return _SCALARS[hint]
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Union and len(args) == 2 and type(None) in args:
        inner = next(arg for arg in args if arg is not type(None))
        return (*_SCALARS[inner], type(None)) if inner in _SCALARS else None
    return None


def wrap(model: nn.Module, adapters: Sequence[Adapter]) -> nn.Module:
    """Wrap a meta `model` with `adapters` as peft does (adapter weights on the meta device, none loaded).

    Returns:
        The `PeftModel` (of the class peft picks for the first adapter's task type); `model` is inside it.

    Raises:
        AdapterError: an adapter's target modules are not in `model` (an adapter for another base).
    """
    peft = _require_peft()
    first = adapters[0]
    from peft.auto import MODEL_TYPE_TO_PEFT_MODEL_MAPPING

    cls = MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(first.config.task_type, peft.PeftModel)
    with warnings.catch_warnings():
        # peft reads a transformers attribute deprecated in transformers 5; nothing for our users to act on.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        wrapped = _wrap_all(cls, model, adapters)
    wrapped.eval()
    return wrapped


def _wrap_all(cls: Any, model: nn.Module, adapters: Sequence[Adapter]) -> nn.Module:
    first = failing = adapters[0]
    try:
        # Adapter weights inside the base model are created on meta and streamed in by the loader; a prompt
        # encoder (prompt, prefix tuning) is a few real tensors outside it, filled by load_model_level_weights.
        wrapped = cls(model, _inference(first.config), first.name,
                      low_cpu_mem_usage=not first.config.is_prompt_learning)
        for failing in adapters[1:]:
            wrapped.add_adapter(failing.name, _inference(failing.config),
                                low_cpu_mem_usage=not failing.config.is_prompt_learning)
    except BigloadError:
        raise  # bigload's own (a ValueError too), e.g. an offloaded weight read: not a mismatched adapter
    except ValueError as error:
        _unwrap(model)
        raise AdapterError(
            f"{failing.folder / ADAPTER_CONFIG} does not fit {type(model).__name__}: {error} It was trained for "
            f"another base model ({failing.config.base_model_name_or_path or 'unnamed'}); pass the base it was "
            "made for, or an adapter made for this one."
        ) from None
    except TypeError as error:  # a value of a setting `_mistyped_settings` cannot check (not a plain scalar)
        _unwrap(model)
        raise AdapterError(
            f"{failing.folder / ADAPTER_CONFIG}: peft cannot apply this config ({error}); a setting has a value "
            "of another type than peft expects. Fix it, or save the adapter again with peft's save_pretrained."
        ) from None
    return wrapped


def _inference(config: Any) -> Any:
    return dataclasses.replace(config, inference_mode=True)


def _unwrap(model: nn.Module) -> None:
    """Take peft's layers out of `model` again after a failed wrap, so nothing is left half-attached."""
    for name, module in list(model.named_modules()):
        base = getattr(module, "base_layer", None)
        if isinstance(base, nn.Module) and name:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, module.get_base_layer())
    model.__dict__.pop("peft_config", None)


def with_adapter_sources(wrapped: nn.Module, adapters: Sequence[Adapter], index: CheckpointIndex,
                         sources: TensorSources) -> tuple[CheckpointIndex, TensorSources]:
    """The checkpoint and source plan that load the base and every adapter into `wrapped`'s base model at once.

    peft moved each wrapped module's weights under `base_layer` (a tuner layer) or `original_module` (a
    `modules_to_save` entry): they are found where the base checkpoint holds them (`sources`, else by name).
    Each adapter tensor is found in its adapter's file under the name peft saved it as, mapped the way peft's
    own loading maps it. An adapter tensor can replace a base one (peft saves the embedding of a LoRA on
    `embed_tokens` with the adapter, and its load overwrites the base's): the base's is then not loaded, as in
    peft. The index gets the adapter files, so the offload store's fingerprint covers them.

    Raises:
        AdapterError: an adapter holds tensors this model has no place for, or of another shape.
    """
    base_model = wrapped.get_base_model()
    model_tensors = {name: tensor for name, tensor in _named_tensors(base_model)}
    entries: dict[str, Source] = dict(sources.tensors)
    for name in model_tensors:
        plain = _unwrapped_name(name)
        if plain != name:
            entries[name] = sources.tensors.get(plain) or _ref(index, plain)
            entries.pop(plain, None)
    displaced: set[str] = set()  # base checkpoint tensors an adapter tensor replaced
    extra: dict[str, TensorRef] = {}
    for adapter in adapters:
        for model_name, ref in _adapter_tensors(wrapped, adapter, model_tensors).items():
            key = f"{adapter.name}:{ref.name}"  # adapters save under the same names; the index needs distinct ones
            part = dataclasses.replace(ref, name=key)
            extra[key] = part
            displaced.update(_part_names(entries.get(model_name)))
            entries[model_name] = DerivedTensor(model_name, ref.shape, ref.dtype, (part,), _first,
                                                how=f"adapter {adapter.name!r} tensor {ref.name}")
    still_used = {name for source in entries.values() for name in _part_names(source)}
    combined = dataclasses.replace(
        index,
        files=index.files + tuple(a.index.files[0] for a in adapters),
        tensors={**index.tensors, **extra},
        total_bytes=index.total_bytes + sum(ref.nbytes for ref in extra.values()),
        file_stats={**index.file_stats, **{f: s for a in adapters for f, s in a.index.file_stats.items()}},
    )
    return combined, TensorSources(entries, sources.ignored | (displaced & set(index.tensors)) - still_used)


def _unwrapped_name(name: str) -> str:
    """The name a tensor of a peft-wrapped module has in the base model (and its checkpoint)."""
    for segment in _WRAPPER_SEGMENTS:
        name = name.replace(segment, ".")
    return name


def _part_names(source: Source | None) -> list[str]:
    """The checkpoint tensors `source` reads."""
    if source is None:
        return []
    return [part.name for part in source.parts] if isinstance(source, DerivedTensor) else [source.name]


def _first(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    return parts[0]


def _ref(index: CheckpointIndex, name: str) -> TensorRef:
    ref = index.tensors.get(name)
    if ref is None:
        raise AdapterError(f"{index.root}: the base checkpoint has no tensor {name!r}, which an adapter wraps.")
    return ref


def _named_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every tensor of `module` under its first name (`tensors.tensor_groups`, the one walk)."""
    return [(group.names[0], group.tensor) for group in tensor_groups(module)]


def _adapter_tensors(wrapped: nn.Module, adapter: Adapter, model_tensors: dict[str, torch.Tensor]
                     ) -> dict[str, TensorRef]:
    """Base-model tensor name -> the adapter file's tensor, for the adapter tensors inside the base model."""
    if adapter.config.is_prompt_learning:
        return {}  # model-level tensors, see load_model_level_weights
    mapped = _saved_to_model_keys(wrapped, adapter)
    found: dict[str, TensorRef] = {}
    stray: list[str] = []
    mismatched: list[str] = []
    for model_key, saved_key in mapped.items():
        name = model_key.removeprefix(_PEFT_PREFIX)
        ref = adapter.index.tensors[saved_key]
        if name not in model_tensors:
            stray.append(saved_key)
        elif tuple(model_tensors[name].shape) != ref.shape:
            mismatched.append(f"{saved_key} {list(ref.shape)} vs model {list(model_tensors[name].shape)}")
        else:
            found[name] = ref
    if stray or mismatched:
        what = f"tensors with no place in the model: {stray[:3]}" if stray else f"other shapes: {mismatched[:3]}"
        raise AdapterError(
            f"{adapter.weights} holds {what}. It was made for another base model "
            f"({adapter.config.base_model_name_or_path or 'unnamed'}); pass the base it was made for."
        )
    return found


def _saved_to_model_keys(wrapped: nn.Module, adapter: Adapter) -> dict[str, str]:
    """Model key -> the adapter file's key, mapped as peft's `set_peft_model_state_dict` maps them, on the keys
    alone: first each `modules_to_save` (or other auxiliary) wrapper's own names (peft saves
    `lm_head.weight`, the model holds `lm_head.modules_to_save.NAME.weight`), then the method's remapping.

    Raises:
        AdapterError: the file lacks a tensor of a module the config says it saves.
    """
    peft = _require_peft()
    from peft.utils.other import AuxiliaryTrainingWrapper

    keys = {name: name for name in adapter.index.tensors}  # each value is its key: the mapping runs on names
    for module_name, module in wrapped.named_modules():
        if not isinstance(module, AuxiliaryTrainingWrapper):
            continue
        for saved, loaded in module.adapter_state_dict_load_map(adapter.name).items():
            lookup = f"{module_name}.{saved}"
            if lookup not in keys:
                raise AdapterError(
                    f"{adapter.weights} has no tensor {lookup!r}, which its config's modules_to_save (or "
                    "trainable tokens) says it saves; save the adapter again with peft's save_pretrained.")
            keys[f"{module_name}.{loaded}"] = keys.pop(lookup)
    tuner = peft.mapping.PEFT_TYPE_TO_TUNER_MAPPING[adapter.config.peft_type]
    return tuner._remap_adapter_state_dict_for_load(model=wrapped, config=adapter.config, adapter_name=adapter.name,
                                                    state_dict=keys)


def load_model_level_weights(wrapped: nn.Module, adapters: Sequence[Adapter], device: torch.device) -> None:
    """Load the tensors prompt and prefix tuning keep outside the base model (peft's prompt encoder), on
    `device`, the device the model's inputs start on."""
    peft = _require_peft()
    from peft.utils import set_peft_model_state_dict

    for adapter in adapters:
        if not adapter.config.is_prompt_learning:
            continue
        _place_prefixes(wrapped, adapter)
        weights = peft.utils.load_peft_weights(str(adapter.folder), device="cpu")
        # peft put the encoder on the base model's device, meta: give it storage for the load to fill.
        wrapped.prompt_encoder[adapter.name].to_empty(device=device)  # in place
        try:
            set_peft_model_state_dict(wrapped, weights, adapter_name=adapter.name)
        except RuntimeError as error:  # load_state_dict's size mismatch
            raise AdapterError(f"{adapter.weights} does not fit this model: {error} Pass the base "
                               "model the adapter was made for.") from None


def adapter_summary(model: nn.Module, adapters: Sequence[Adapter], device_map: Mapping[str, Any],
                    dtype: torch.dtype) -> list[str]:
    """One line per adapter: its method and the bytes it adds to each block of `device_map` (as planned).

    Args:
        model: the base model, wrapped with `adapters` (meta is fine).
        adapters: as `read_adapters` returned them.
        device_map: block name -> device, in execution order.
        dtype: the base's load dtype (adapter tensors are counted at the dtype the loader gives them).
    """
    keys = set(device_map)
    width = 4 if adapter_fp32_modules(dtype) else dtype.itemsize
    lines = []
    for adapter in adapters:
        marker = f".{adapter.name}."
        per_block: dict[str, int] = {}
        for name, tensor in _named_tensors(model):
            if marker not in f".{name}.":
                continue
            block = owner_of(name, keys) or ""
            per_block[block] = per_block.get(block, 0) + tensor.numel() * width
        method = getattr(adapter.config.peft_type, "value", adapter.config.peft_type)
        if adapter.config.is_prompt_learning:
            lines.append(f"adapter {adapter.name!r} ({method}, {adapter.folder}): a model-level prompt encoder, "
                         "loaded onto the device the inputs start on")
            continue
        lines.append(f"adapter {adapter.name!r} ({method}, {adapter.folder}): "
                     f"{format_size(sum(per_block.values()))} in {len(per_block)} block(s)")
        width_name = max(map(len, per_block), default=0)
        lines += [f"  {block:<{width_name}}  {device_map[block]!s:<5} {format_size(size):>10}"
                  for block, size in per_block.items()]
    return lines


def _place_prefixes(wrapped: nn.Module, adapter: Adapter) -> None:
    """Make the map peft reads put each layer's prefix where the layer runs.

    peft 0.21's prefix tuning moves each layer's KV prefix, on every forward, to the device `hf_device_map`
    gives that layer: the value itself, or for "cpu"/"disk" the map's first other value, accelerate's main GPU
    (`peft.utils.integrations.get_layer_device_map`; StopIteration when every value is "cpu" or "disk"). When
    every block runs on the CPU, the blocks that stay in RAM are resident on the device they run on, as a block
    on a GPU index is: their entries become `torch.device("cpu")`, a value transformers' own maps hold
    (`device_map="cpu"` becomes `{"": torch.device("cpu")}`). peft's first non-offloaded value is then the CPU,
    and every prefix lands there; "disk" entries stay "disk".

    Raises:
        AdapterError: every block is on disk (no value can name the CPU), or a GPU runs some blocks while a
            cpu/disk-placed block runs on the CPU (peft would put that block's prefix on the GPU).
    """
    base = wrapped.get_base_model()
    device_map = getattr(base, "hf_device_map", None)
    method = getattr(adapter.config.peft_type, "value", adapter.config.peft_type)
    if method != "PREFIX_TUNING" or not device_map:
        return
    runs_on = _execution_types(device_map, runtime_of(base))
    offloaded = [key for key, value in device_map.items() if _is_offload_value(value)]
    if set(runs_on.values()) == {"cpu"}:
        resident = [key for key, value in device_map.items() if isinstance(value, str) and value == "cpu"]
        if not resident and all(_is_offload_value(value) for value in device_map.values()):
            raise AdapterError(
                f"{adapter.folder / ADAPTER_CONFIG}: peft places prefix-tuning prefixes by the device map, and "
                "every block of this map is on disk, so no entry names the CPU they run on. Give the CPU room for "
                "at least one block (max_memory={'cpu': ...})."
            )
        for key in resident:
            device_map[key] = torch.device("cpu")
        return
    on_cpu = [key for key in offloaded if runs_on[key] == "cpu"]
    if on_cpu:
        raise AdapterError(
            f"{adapter.folder / ADAPTER_CONFIG}: peft puts the prefix of every layer the device map places on cpu "
            f"or disk on the map's first GPU, but {on_cpu[:3]} run on the CPU. Give the GPU room for those layers, "
            "or load the model without a GPU in the budget (max_memory={'cpu': ..., 'disk': ...})."
        )


def _is_offload_value(value: Any) -> bool:
    """An entry peft reads as offloaded: the strings "cpu" and "disk" (not `torch.device("cpu")`)."""
    return isinstance(value, str) and value in ("cpu", "disk")


def _execution_types(device_map: Mapping[str, Any], runtime: Any) -> dict[str, str]:
    """Device map key -> the type of the device its block runs on ("cpu", "cuda")."""
    blocks = runtime.blocks if runtime is not None else {}
    return {key: blocks[key].execution_device.type if key in blocks else _resident_type(value)
            for key, value in device_map.items()}


def _resident_type(value: Any) -> str:
    device = Device.parse(value)
    return "cpu" if device == DISK else device.torch_device().type  # disk without a runtime: nothing runs it yet
