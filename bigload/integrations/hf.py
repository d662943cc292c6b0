"""Hugging Face glue: model folders, configs and the catalog, turned into meta models and loaded models.

transformers is an optional dependency (`pip install bigload[hf]`); it is imported only when a function
here needs it, and its absence is a clear error, not an ImportError from deep inside.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from bigload.plan.budget import detect_budget
from bigload.plan.catalog import catalog_config, catalog_names
from bigload.formats.checkpoint import CheckpointIndex, TensorRef, open_checkpoint
from bigload.devices import ExecutionPolicy
from bigload.integrations.dispatch import load_checkpoint_and_dispatch
from bigload.empty import init_empty_weights
from bigload.errors import BigloadError, CheckpointError, QuantizationError
from bigload.runtime.hooks import OutputAlignment, runtime_of
from bigload.plan.inventory import (
    DtypeRule,
    default_keep_in_fp32_modules,
    inventory_from_checkpoint,
    inventory_from_module,
)
from bigload.messages import Text, setting
from bigload.plan.planner import PlanOptions, plan
from bigload.sizes import parse_dtype
from bigload.load.stream import DerivedTensor, SourcePlan, gpu_cast_bytes, prepare_quantization, source_dtypes
from bigload.tensors import owner_of

if TYPE_CHECKING:
    from transformers import PretrainedConfig

__all__ = [
    "ModelSource",
    "checkpoint_sources",
    "config_dtype",
    "from_pretrained",
    "load_config",
    "load_tokenizer",
    "load_generation_config",
    "meta_model_for_folder",
    "meta_model_from_config",
    "model_tensor_names",
    "require_model_folder",
    "resolve_model_source",
    "without_transformers_progress",
]

logger = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass(frozen=True)
class ModelSource:
    """What a MODEL argument names.

    kind: "catalog" (a well-known name), "folder" (a Hugging Face model folder), "config" (a config.json),
    or "checkpoint" (weights without a config: plans come from tensor headers alone).
    config: the config dict when there is one; checkpoint: the weights' path when there are weights.
    """

    spec: str
    kind: str
    config: dict[str, Any] | None
    checkpoint: Path | None


def _require_transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise BigloadError(
            "this needs transformers: install it with `pip install bigload[hf]` "
            "(planning from checkpoint headers alone does not)."
        ) from exc
    return transformers


@contextlib.contextmanager
def without_transformers_progress() -> Iterator[None]:
    """Silence transformers' own progress bars ("Loading weights", "Writing model shards") for a block.

    bigload shows one bar, its own; the two would otherwise interleave on one line. The previous
    setting is restored on exit.
    """
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _has_weights(folder: Path) -> bool:
    return any(p.suffix in _WEIGHT_SUFFIXES or p.name.endswith(".index.json") for p in folder.iterdir())


def resolve_model_source(spec: str | Path) -> ModelSource:
    """Decide what `spec` is: a catalog name, a model folder, a config.json or a checkpoint.

    Raises:
        BigloadError: nothing by that name exists, listing the catalog names.
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        config_file = path / "config.json"
        config = _read_json(config_file) if config_file.is_file() else None
        checkpoint = path if _has_weights(path) else None
        if config is None and checkpoint is None:
            raise BigloadError(f"{path} holds neither a config.json nor checkpoint files (.safetensors, .bin).")
        return ModelSource(str(spec), "folder" if config is not None else "checkpoint", config, checkpoint)
    if path.is_file():
        if path.name.endswith(".json") and not path.name.endswith(".index.json"):
            return ModelSource(str(spec), "config", _read_json(path), None)
        config_file = path.parent / "config.json"
        config = _read_json(config_file) if config_file.is_file() else None
        return ModelSource(str(spec), "checkpoint", config, path)
    config = catalog_config(str(spec))
    if config is not None:
        return ModelSource(str(spec), "catalog", config, None)
    if _looks_like_path(str(spec)):
        raise BigloadError(f"{path.absolute()}: no such file or folder.")
    raise BigloadError(
        f"{spec!r} is not a file, a folder or a catalog name. Give a model folder, a config.json, a "
        f"checkpoint, or one of: {', '.join(catalog_names())}."
    )


def _looks_like_path(spec: str) -> bool:
    """A spec the user meant as a path (a separator, ~, a leading dot), never a catalog name."""
    return "/" in spec or "\\" in spec or spec.startswith(("~", "."))


def require_model_folder(path: str | Path) -> Path:
    """`path` as a folder, checked before anything else reads it, so a typo is reported as a typo.

    Raises:
        BigloadError: `path` does not exist or is not a folder.
    """
    folder = Path(path).expanduser()
    if not folder.exists():
        raise BigloadError(f"{folder.absolute()}: no such folder; give the path of a model folder "
                           "(config.json, weights and tokenizer files).")
    if not folder.is_dir():
        raise BigloadError(f"{folder}: is a file, not a model folder; give the folder that holds it.")
    return folder


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path} as JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not {type(data).__name__}.")
    return data


def load_config(source: str | Path | dict[str, Any]) -> "PretrainedConfig":
    """A transformers config from a catalog name, a folder, a config.json path or a config dict."""
    transformers = _require_transformers()
    if isinstance(source, dict):
        config_dict = dict(source)
    else:
        resolved = resolve_model_source(source)
        if resolved.config is None:
            raise BigloadError(f"{source} has no config.json; a model cannot be built from weights alone.")
        config_dict = dict(resolved.config)
    model_type = config_dict.pop("model_type", None)
    if model_type is None:
        raise CheckpointError(f"the config of {source} has no 'model_type'; transformers cannot build it.")
    try:
        return transformers.AutoConfig.for_model(model_type, **config_dict)
    except (KeyError, ValueError) as exc:
        raise BigloadError(
            f"transformers {transformers.__version__} does not know model_type {model_type!r}; "
            "upgrade transformers or pass a model_class."
        ) from exc


def config_dtype(config: "PretrainedConfig", default: torch.dtype = torch.float32) -> torch.dtype:
    """The dtype a config says its weights are in (`dtype`, or the older `torch_dtype`), else `default`."""
    for field in ("dtype", "torch_dtype"):
        value = getattr(config, field, None)
        if value is not None and value != "auto":
            return parse_dtype(value if isinstance(value, torch.dtype) else str(value))
    return default


def _model_class_for(config: "PretrainedConfig") -> Any:
    """The class named in the config's `architectures`, else the causal-LM (or seq2seq) auto class."""
    transformers = _require_transformers()
    for name in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    if getattr(config, "is_encoder_decoder", False):
        return transformers.AutoModelForSeq2SeqLM
    return transformers.AutoModelForCausalLM


def meta_model_from_config(
    config: "PretrainedConfig",
    *,
    model_class: Any = None,
    dtype: torch.dtype | str | None = None,
) -> nn.Module:
    """Build a transformers model on the meta device: no weight memory, weights tied as the model ties them.

    Args:
        config: a transformers config (see `load_config`).
        model_class: an `Auto*` class or a model class; default: the config's `architectures`, else
            `AutoModelForCausalLM` (`AutoModelForSeq2SeqLM` for encoder-decoders).
        dtype: parameter dtype; default: the config's dtype, else float32.

    >>> model = meta_model_from_config(load_config("llama-3.1-405b"))  # about a second, 0 bytes
    """
    cls = model_class or _model_class_for(config)
    target = parse_dtype(dtype) if dtype is not None else config_dtype(config)
    with init_empty_weights():
        # Auto classes have `from_config`, model classes `_from_config`: both build under `dtype` as the
        # default dtype, so buffers a model computes in float32 on purpose (rotary inv_freq) stay float32, as
        # in transformers' from_pretrained. `.to(dtype)` would cast them too.
        if hasattr(cls, "from_config"):
            model = cls.from_config(config, dtype=target)
        elif hasattr(cls, "_from_config"):
            model = cls._from_config(config, dtype=target)
        else:
            model = cls(config).to(target)
    model.eval()
    return model


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer saved in a model folder (`AutoTokenizer.from_pretrained`, local files only)."""
    folder = require_model_folder(path)
    transformers = _require_transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise BigloadError(
            f"no tokenizer could be loaded from {path}: {exc}. A model folder needs tokenizer files "
            "(tokenizer.json or tokenizer_config.json) for text prompts."
        ) from exc


def _checkpoint_dtype(source: ModelSource) -> torch.dtype | None:
    """The dtype of the first floating tensor in the source's checkpoint (headers only), if any."""
    if source.checkpoint is None:
        return None
    for ref in open_checkpoint(source.checkpoint).tensors.values():
        if ref.dtype.is_floating_point:
            return ref.dtype
    return None


def _weights_dtype(source: ModelSource, config: "PretrainedConfig | None", dtype: torch.dtype | str | None) -> torch.dtype | None:
    """The dtype to load in: the caller's, else the config's, else the checkpoint's."""
    if dtype is not None:
        return parse_dtype(dtype)
    if config is not None:
        from_config = config_dtype(config, default=None)  # type: ignore[arg-type]
        if from_config is not None:
            return from_config
    return _checkpoint_dtype(source)


def _transformers_available() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def inventory_for(
    spec: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    no_split_module_classes: list[str] | None = None,
    adapter: str | Path | Sequence[str | Path] | None = None,
    quantize: str | None = None,
    quantize_skip: list[str] | None = None,
) -> Any:
    """The inventory of what MODEL names: from a meta model when there is a config (and transformers),
    else from checkpoint headers alone. No weight is read either way. With `adapter`, the meta model is
    wrapped with the adapters first, so each block counts its adapter tensors. With `quantize`, the meta
    model's Linears are swapped first, so the inventory sizes quantized bytes.

    Raises:
        QuantizationError: `quantize` with checkpoint headers alone (no config.json to build modules from),
            or with adapters.
    """
    source = resolve_model_source(spec)
    _refuse_quantized_adapters(quantize, adapter)
    if source.config is not None and _transformers_available():
        built = prepare_model(source, dtype, adapter)
        prepare_quantization(built.model, quantize, quantize_skip, rule=DtypeRule.for_model(built.model, built.dtype))
        return inventory_from_module(built.model, dtype=built.dtype, no_split_module_classes=no_split_module_classes,
                                     keep_in_fp32_modules=built.keep_in_fp32_modules if built.adapters else None,
                                     stored_dtypes=built.stored_dtypes())
    if adapter is not None:
        raise BigloadError(f"{spec} has no config.json, and adapters need the model built from one; plan the "
                           "model folder (config.json beside the weights) with --adapter.")
    if quantize is not None:
        raise QuantizationError(Text(
            f"{spec}: planning with ", setting("quantize", repr(quantize)), " needs the model's config.json (and "
            "transformers) to know which tensors are Linear weights; plan the model folder or its config.json "
            "instead."))
    if source.checkpoint is None:
        raise BigloadError(
            f"{spec} is a config only and transformers is not installed; install it with "
            "`pip install bigload[hf]`, or plan from a checkpoint's headers instead."
        )
    # Headers carry no class names, so `no_split_module_classes` cannot apply here: every numbered
    # block (`model.layers.17`) is kept whole instead.
    return inventory_from_checkpoint(
        open_checkpoint(source.checkpoint), dtype=_weights_dtype(source, None, dtype), config=source.config,
    )


@dataclass(frozen=True)
class PreparedModel:
    """A meta model ready to plan and load: built from the config, wrapped with adapters if any.

    model: the transformers model (inside `wrapped` when there are adapters); wrapped: peft's `PeftModel`, or
    None; dtype: the load dtype; keep_in_fp32_modules: transformers' rule plus the adapter modules peft keeps
    in float32; index, sources: where every tensor is (base checkpoint and adapter files, headers only; None
    without a checkpoint); adapters: as read.
    """

    model: nn.Module
    wrapped: nn.Module | None
    dtype: torch.dtype
    keep_in_fp32_modules: list[str]
    index: CheckpointIndex | None
    sources: SourcePlan | None
    adapters: tuple[Any, ...] = ()

    def stored_dtypes(self) -> dict[str, torch.dtype] | None:
        """Tensor name -> its dtype in the files it loads from (None without a checkpoint)."""
        return source_dtypes(self.index, self.sources) if self.index is not None else None


def prepare_model(source: ModelSource, dtype: torch.dtype | str | None,
                  adapter: str | Path | Sequence[str | Path] | None = None, *,
                  model_class: Any = None) -> PreparedModel:
    """The meta model of `source` (wrapped with `adapter`s) and where its tensors are; no weight is read.

    Raises:
        AdapterError: an adapter is unreadable or made for another base.
    """
    config = load_config(source.config)  # type: ignore[arg-type]
    target = _weights_dtype(source, config, dtype) or torch.float32
    model = meta_model_from_config(config, model_class=model_class, dtype=target)
    index = open_checkpoint(source.checkpoint) if source.checkpoint is not None else None
    sources = checkpoint_sources(model, index) if index is not None else None
    keep = list(default_keep_in_fp32_modules(model, target))
    if adapter is None:
        return PreparedModel(model, None, target, keep, index, sources)
    from bigload.integrations.adapters import adapter_fp32_modules, read_adapters, with_adapter_sources, wrap

    adapters = read_adapters(adapter)
    wrapped = wrap(model, adapters)
    if index is not None and sources is not None:
        index, sources = with_adapter_sources(wrapped, adapters, index, sources)
    return PreparedModel(model, wrapped, target, [*keep, *adapter_fp32_modules(target)], index, sources,
                         tuple(adapters))


def _refuse_quantized_adapters(quantize: Any, adapter: Any) -> None:
    if quantize is not None and adapter is not None:
        raise QuantizationError(Text(
            setting("quantize", repr(quantize)), " with ", setting("adapter"), " is not supported: peft wraps the "
            "Linear layers that would be quantized. Load the adapter on the unquantized model, or drop ",
            setting("adapter"), "."))


def describe_adapters(spec: str | Path, adapter: str | Path | Sequence[str | Path], plan: Any,
                      dtype: torch.dtype | str | None = None) -> list[str]:
    """Lines saying what each adapter adds to which planned block (for `bigload plan --adapter`)."""
    from bigload.integrations.adapters import adapter_summary

    source = resolve_model_source(spec)
    if source.config is None:
        raise BigloadError(f"{spec} has no config.json; adapters need the model built from one.")
    built = prepare_model(source, dtype, adapter)
    return adapter_summary(built.model, built.adapters, plan.device_map, built.dtype)


def plan_model(
    spec: str | Path,
    *,
    max_memory: dict[Any, Any] | None = None,
    strategy: str = "auto",
    dtype: torch.dtype | str | None = None,
    context_length: int | None = None,
    batch_size: int = 1,
    no_split_module_classes: list[str] | None = None,
    prefetch: int = 1,
    offload_folder: str | Path | None = None,
    policy: ExecutionPolicy | str | None = None,
    adapter: str | Path | Sequence[str | Path] | None = None,
    quantize: str | None = None,
    quantize_skip: list[str] | None = None,
    disk_reads: str | None = None,
) -> Any:
    """A dry run: plan MODEL (catalog name, model folder, config.json or checkpoint) without reading a weight.

    For an `nn.Module` already built, use `plan_for_model`; for an `Inventory`, `bigload.plan.planner.plan`.

    Args:
        spec: what to plan.
        max_memory: budgets per device (`{0: "24GiB", "cpu": "64GiB", "disk": "500GiB"}`); None: this machine.
        strategy: "auto", "balanced", "balanced_low_0" or "sequential".
        dtype: dtype of the weights once loaded; default: the config's, else the checkpoint's.
        context_length, batch_size: reserve KV-cache memory for this many tokens and sequences.
        no_split_module_classes: classes never split (default: the model's `_no_split_modules`).
        prefetch: offloaded blocks loaded ahead (the reserve is sized for it).
        offload_folder: with no "disk" budget, its free space becomes the disk budget.
        policy: where CPU-resident blocks run when a GPU exists (`ExecutionPolicy` or "stream"/"local");
            default: chosen by `plan.choose_policy`.
        adapter: peft adapter folder(s) whose tensors the blocks carry (see `from_pretrained`).
        quantize, quantize_skip: plan the quantized model ("int8", "int4", "int4:GROUP"; see
            `from_pretrained`); needs a config.
        disk_reads: how disk blocks are brought in ("mapped" or "read"); default: decided from the CPU
            memory the plan leaves (`reserve.choose_disk_reads`).

    Returns:
        A `Plan`.

    Raises:
        PlanError: the model does not fit; the message says how many bytes are missing where.
        QuantizationError: a bad scheme, or `quantize` for checkpoint headers alone.

    >>> print(plan_model("llama-3.1-405b", max_memory={0: "80GiB", "cpu": "1TiB"}).explain())  # doctest: +SKIP
    """
    options = PlanOptions(strategy=strategy, dtype=dtype, max_memory=max_memory, offload_folder=offload_folder,
                          context_length=context_length, batch_size=batch_size, prefetch=prefetch, policy=policy,
                          no_split_module_classes=no_split_module_classes, disk_reads=disk_reads)
    inventory = inventory_for(spec, dtype=options.dtype, no_split_module_classes=options.no_split_module_classes,
                              adapter=adapter, quantize=quantize, quantize_skip=quantize_skip)
    budget = detect_budget(options.max_memory, offload_folder=options.offload_folder)
    source = resolve_model_source(spec)
    # A load of this checkpoint casts on the GPU: the plan keeps its largest temporary free there.
    cast = gpu_cast_bytes(open_checkpoint(source.checkpoint), inventory.dtype) if source.checkpoint else 0
    return plan(inventory, budget, options.with_settings(dtype=inventory.dtype, cast_bytes=cast))


def from_pretrained(
    path: str | Path,
    *,
    model_class: Any = None,
    device_map: Any = "auto",
    max_memory: dict[Any, Any] | None = None,
    dtype: torch.dtype | str | None = None,
    offload_folder: str | Path | None = None,
    context_length: int | None = None,
    batch_size: int = 1,
    strict: bool = True,
    progress: bool = True,
    prefetch: int = 1,
    no_split_module_classes: list[str] | None = None,
    materialize: bool = False,
    policy: ExecutionPolicy | str | None = None,
    adapter: str | Path | Sequence[str | Path] | None = None,
    distributed: bool = False,
    pipeline: Mapping[str, Any] | None = None,
    quantize: str | None = None,
    quantize_skip: list[str] | None = None,
    disk_reads: str | None = None,
) -> nn.Module | None:
    """Load a Hugging Face model folder onto this machine's devices, ready for `generate`.

    Builds the model from config.json on the meta device, plans with the model's `_no_split_modules` and
    KV-cache headroom for `context_length`, streams the checkpoint straight to the planned places, and
    attaches offload hooks. The result has `hf_device_map` and `bigload_plan`.

    Checkpoint tensors are found as transformers finds them (`checkpoint_sources`): its conversion mapping
    (renamed keys; MoE experts saved one by one and fused in the model, built while streaming), the
    base-model prefix added or stripped, a task head skipped when loading the base model. The default dtype
    is transformers 5's: the config's `dtype`, else the checkpoint's; at float16/bfloat16 the model's
    `_keep_in_fp32_modules(_strict)` stay float32 as in transformers. The encoder of an encoder-decoder gets
    the `_hf_hook` transformers' `generate` looks for, so generation needs no accelerate.

    Args:
        path: folder with config.json and safetensors (or .bin) weights.
        model_class: e.g. `transformers.AutoModel` for encoders; default: the config's `architectures`.
        device_map: a strategy ("auto", "balanced", "balanced_low_0", "sequential"), a dict map or a Plan.
            A dict planned from checkpoint headers alone may omit modules holding only computed buffers
            (rotary embeddings); they join it on the map's first GPU, else the CPU.
        max_memory: budgets per device; None: what this machine has free.
        dtype: dtype to load in; default: the config's, else the checkpoint's.
        offload_folder: where disk-offloaded weights go; needed when the plan uses disk.
        context_length, batch_size: KV-cache room the plan keeps on each executing device.
        strict: missing or unexpected tensors are an error (tensors the model declares it does not use, and a
            head's tensors when loading a base model, are not unexpected). False: load what matches.
        progress: a progress bar for long loads.
        prefetch: offloaded blocks loaded ahead of the one running.
        no_split_module_classes: classes never split (default: the model's `_no_split_modules`).
        materialize: CPU weights in private memory instead of views of the checkpoint files (see
            `load_checkpoint_and_dispatch`).
        policy: where CPU-resident blocks run when a GPU exists (`ExecutionPolicy` or "stream"/"local");
            default: the planner's choice (with a dict map: stream).
        adapter: a peft adapter folder, or several (the first is named "default", the others after their
            folders; the first is active). The model is wrapped on meta before planning, so the plan counts
            each adapter's bytes on the block that owns them and one pass streams base and adapter tensors.
            The result is then peft's `PeftModel` (`set_adapter`, `disable_adapter`, `merge_and_unload` work).
        distributed: under `torchrun`, split the model over the ranks (`bigload.distributed.pipeline`): every rank
            loads only its own blocks; rank 0 gets the model (its `generate` runs the whole pipeline) and
            the other ranks serve their blocks inside this call until rank 0 stops the pipeline
            (`bigload.stop_pipeline(model)`, or at exit), then get None. `max_memory` is each rank's budget;
            `device_map` the strategy inside each rank.
        pipeline: more options of the distributed path (`max_memory_hosts`, `timeout`, `idle_timeout`; see
            `bigload.distributed.pipeline.from_pretrained_distributed`).
        quantize: "int8" (per output channel), "int4" (groups of 128) or "int4:GROUP": the Linear layers of
            the model's blocks are planned, streamed, offloaded and run quantized (`bigload.quant`); the
            embeddings, norms and output head stay in `dtype`. Not with `adapter` (refused).
        quantize_skip: module names whose Linears stay unquantized.
        disk_reads: how disk blocks are brought in: "mapped" (in place from the page cache) or "read"
            (explicit reads into the slots); default: decided from the CPU budget (see
            `load_checkpoint_and_dispatch`).

    Raises:
        BigloadError subclasses: no config or weights, a plan that does not fit, a malformed checkpoint;
            `AdapterError` for an adapter that is unreadable or made for another base (nothing is loaded).

    >>> model = from_pretrained("Llama-3-8B/", max_memory={"cpu": "8GiB", "disk": "64GiB"},
    ...                         offload_folder="offload/")  # doctest: +SKIP
    """
    if distributed:
        if adapter is not None:
            raise BigloadError("adapters are not supported with distributed=True yet; merge the adapter into the "
                               "base model (peft's merge_and_unload, then save_pretrained) and load that.")
        if quantize is not None:
            raise BigloadError("quantize= is not supported with distributed=True yet; load without quantize=, "
                               "or on one machine with distributed=False.")
        if disk_reads is not None:
            raise BigloadError("disk_reads= is not supported with distributed=True yet; leave it unset (each rank "
                               "decides how its disk blocks come in), or load on one machine with distributed=False.")
        from bigload.distributed.pipeline import from_pretrained_distributed

        return from_pretrained_distributed(
            path, model_class=model_class, max_memory=max_memory, dtype=dtype, offload_folder=offload_folder,
            context_length=context_length, batch_size=batch_size, strict=strict, progress=progress,
            prefetch=prefetch, no_split_module_classes=no_split_module_classes, strategy=device_map,
            policy=policy, **(pipeline or {}),
        )
    _refuse_quantized_adapters(quantize, adapter)  # arguments first, before any path is looked at
    require_model_folder(path)
    source = resolve_model_source(path)
    if source.config is None or source.checkpoint is None:
        raise BigloadError(
            f"{path} must be a model folder with config.json and weights (.safetensors or .bin); "
            f"found {'no config.json' if source.config is None else 'no weights'}."
        )
    built = prepare_model(source, dtype, adapter, model_class=model_class)
    model = built.model
    if isinstance(device_map, Mapping):
        device_map = _with_computed_buffers(model, device_map)
    load_checkpoint_and_dispatch(
        model, built.index, device_map=device_map, max_memory=max_memory,
        no_split_module_classes=no_split_module_classes, offload_folder=offload_folder, dtype=built.dtype,
        strict=strict, prefetch=prefetch, context_length=context_length, batch_size=batch_size,
        progress=progress, keep_in_fp32_modules=built.keep_in_fp32_modules, sources=built.sources,
        materialize=materialize, policy=policy, quantize=quantize, quantize_skip=quantize_skip,
        disk_reads=disk_reads,
    )
    _align_encoder_outputs(model)
    _load_generation_config(model, Path(path))
    if built.wrapped is None:
        return model.eval()
    from bigload.integrations.adapters import load_model_level_weights

    load_model_level_weights(built.wrapped, built.adapters, _input_device(model))
    return built.wrapped.eval()


def _input_device(model: nn.Module) -> torch.device:
    """Where the model's inputs start: the execution device of its first block (the CPU without hooks)."""
    from bigload.runtime.hooks import runtime_of

    runtime = runtime_of(model)
    if runtime is None or not runtime.blocks:
        return next((t.device for t in model.parameters() if t.device.type != "meta"), torch.device("cpu"))
    return next(iter(runtime.blocks.values())).execution_device


def meta_model_for_folder(path: str | Path, *, model_class: Any = None, dtype: torch.dtype | str | None = None
                          ) -> tuple[nn.Module, torch.dtype, Path]:
    """The meta model of a model folder, the dtype it loads in (see `from_pretrained`), and its checkpoint.

    Raises:
        BigloadError: the folder lacks config.json or weights.
    """
    source = resolve_model_source(path)
    if source.config is None or source.checkpoint is None:
        raise BigloadError(
            f"{path} must be a model folder with config.json and weights (.safetensors or .bin); "
            f"found {'no config.json' if source.config is None else 'no weights'}."
        )
    config = load_config(source.config)
    target = _weights_dtype(source, config, dtype) or torch.float32
    return meta_model_from_config(config, model_class=model_class, dtype=target), target, source.checkpoint


def load_generation_config(model: nn.Module, folder: str | Path) -> None:
    """Use the folder's generation_config.json, as transformers' from_pretrained does."""
    _load_generation_config(model, Path(folder))


def _with_computed_buffers(model: nn.Module, device_map: Mapping[str, Any]) -> dict[str, Any]:
    """`device_map` plus the modules that hold only computed buffers (rotary embeddings) and no entry.

    A map planned from checkpoint headers alone (`bigload plan model.safetensors`) cannot name them: no
    checkpoint holds their tensors. They go to the map's first GPU, else the CPU, where the model runs.
    """
    main = next((value for value in device_map.values() if isinstance(value, int)), "cpu")
    placed = list(device_map)
    for name, module in model.named_modules():
        if name and owner_of(name, set(placed)) is None:
            if _only_computed_buffers(module):
                placed.append(name)
    return {**device_map, **{name: main for name in placed[len(device_map):]}}


def _only_computed_buffers(module: nn.Module) -> bool:
    """No parameters, and buffers that are all non-persistent (computed in `__init__`, never saved)."""
    owners = list(module.modules())
    return (any(owner._buffers for owner in owners) and not any(True for _ in module.parameters())
            and all(set(owner._buffers) <= owner._non_persistent_buffers_set for owner in owners))


def _align_encoder_outputs(model: nn.Module) -> None:
    """Give an encoder-decoder's encoder the hook object transformers looks for.

    Before `generate` runs the encoder on its own, transformers sets `encoder._hf_hook.io_same_device = True`
    on a model with `hf_device_map`, and when the encoder has no `_hf_hook` it wraps the encoder's forward in
    accelerate's `AlignDevicesHook` (a NameError when accelerate is not installed; a foreign hook bigload's
    `detach` cannot remove when it is). An `OutputAlignment` there answers to the same attribute and brings
    the encoder's outputs back to its inputs' device, as accelerate's would.
    """
    config = getattr(model, "config", None)
    get_encoder = getattr(model, "get_encoder", None)
    if not getattr(config, "is_encoder_decoder", False) or get_encoder is None:
        return
    encoder = get_encoder()
    if encoder is None or encoder is model or "_hf_hook" in encoder.__dict__:
        return
    alignment = OutputAlignment(encoder)
    encoder._hf_hook = alignment

    def undo() -> None:
        alignment.remove()
        encoder.__dict__.pop("_hf_hook", None)

    runtime = runtime_of(model)
    if runtime is not None:
        runtime.on_detach.append(undo)


# ---------------------------------------------------------------------------------------------------------
# checkpoint names -> model names


def checkpoint_sources(model: nn.Module, index: "CheckpointIndex") -> "SourcePlan":
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
    merged: dict[str, tuple[Any, list[tuple[str, "TensorRef"]]]] = {}
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
    return SourcePlan(tensors=tensors, ignored=frozenset(ignored))


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


def _ignored(model: nn.Module, unmatched: Sequence[str], prefix: str, index: "CheckpointIndex") -> list[str]:
    patterns = [re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()]
    # Loading the base model from a checkpoint of a model with a head: the checkpoint's base-model tensors
    # carry the prefix, the head's do not (transformers reports those and moves on).
    is_base = bool(prefix) and getattr(model, "base_model", None) is model
    has_prefix = is_base and any(name.startswith(prefix + ".") for name in index.tensors)
    return [name for name in unmatched
            if any(p.search(name) for p in patterns) or (has_prefix and not name.startswith(prefix + "."))]


def _derived_tensors(model: nn.Module, target: str, converter: Any,
                     parts: list[tuple[str, "TensorRef"]]) -> dict[str, Any]:
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


def _load_generation_config(model: nn.Module, folder: Path) -> None:
    """Use the folder's generation_config.json, as transformers' from_pretrained does."""
    if not (folder / "generation_config.json").is_file() or not hasattr(model, "generation_config"):
        return
    from transformers import GenerationConfig

    try:
        model.generation_config = GenerationConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        logger.warning("ignoring %s/generation_config.json: %s", folder, exc)
