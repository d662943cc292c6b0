"""Hugging Face model folders, planned and loaded: `plan_model` (a dry run), `from_pretrained` (one machine),
and what both share (`prepare_model`: the meta model, wrapped with adapters, and where its tensors are)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from bigload.devices import ExecutionPolicy
from bigload.errors import BigloadError, QuantizationError
from bigload.formats.refs import CheckpointIndex
from bigload.formats.discover import open_checkpoint
from bigload.integrations.adapters import (
    adapter_fp32_modules,
    adapter_summary,
    load_model_level_weights,
    read_adapters,
    with_adapter_sources,
    wrap,
)
from bigload.integrations.hf.conversion import checkpoint_sources
from bigload.integrations.hf.models import (
    ModelSource,
    load_config,
    meta_model_from_config,
    require_model_folder,
    resolve_model_source,
    transformers_available,
    weights_dtype,
)
from bigload.integrations.loading import load_checkpoint_and_dispatch
from bigload.integrations.prepare import prepare_load, prepare_quantization, rule_for
from bigload.load.sources import TensorSources
from bigload.messages import Text, setting
from bigload.plan.budget import detect_budget
from bigload.plan.dtypes import default_keep_in_fp32_modules
from bigload.plan.headers import inventory_from_checkpoint
from bigload.plan.inventory import inventory_from_module
from bigload.plan.options import PlanOptions
from bigload.plan.planner import plan
from bigload.runtime.moves import OutputAlignment
from bigload.runtime.runtime import runtime_of
from bigload.tensors import owner_of

__all__ = ["PreparedModel", "describe_adapters", "from_pretrained", "inventory_for", "load_generation_config",
           "meta_model_for_folder", "plan_model", "prepare_model"]

logger = logging.getLogger(__name__)


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
    if source.config is not None and transformers_available():
        built = prepare_model(source, dtype, adapter)
        options = PlanOptions(dtype=built.dtype, keep_in_fp32_modules=built.keep_in_fp32_modules,
                              no_split_module_classes=no_split_module_classes)
        if built.index is not None:
            return prepare_load(built.model, built.index, options, quantize=quantize, quantize_skip=quantize_skip,
                                sources=built.sources).inventory
        rule = rule_for(built.model, options)
        prepare_quantization(built.model, quantize, quantize_skip, rule=rule)
        return inventory_from_module(built.model, rule=rule, no_split_module_classes=options.no_split_module_classes)
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
        open_checkpoint(source.checkpoint), dtype=weights_dtype(source, None, dtype), config=source.config,
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
    sources: TensorSources | None
    adapters: tuple[Any, ...] = ()


def prepare_model(source: ModelSource, dtype: torch.dtype | str | None,
                  adapter: str | Path | Sequence[str | Path] | None = None, *,
                  model_class: Any = None) -> PreparedModel:
    """The meta model of `source` (wrapped with `adapter`s) and where its tensors are; no weight is read.

    Raises:
        AdapterError: an adapter is unreadable or made for another base.
    """
    config = load_config(source.config)  # type: ignore[arg-type]
    target = weights_dtype(source, config, dtype) or torch.float32
    model = meta_model_from_config(config, model_class=model_class, dtype=target)
    index = open_checkpoint(source.checkpoint) if source.checkpoint is not None else None
    sources = checkpoint_sources(model, index) if index is not None else None
    keep = list(default_keep_in_fp32_modules(model, target))
    if adapter is None:
        return PreparedModel(model, None, target, keep, index, sources)
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
    return plan(inventory, budget, options.with_settings(dtype=inventory.dtype))


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
    load_generation_config(model, path)
    if built.wrapped is None:
        return model.eval()
    load_model_level_weights(built.wrapped, built.adapters, _input_device(model))
    return built.wrapped.eval()


def _input_device(model: nn.Module) -> torch.device:
    """Where the model's inputs start: the execution device of its first block (the CPU without hooks)."""
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
    target = weights_dtype(source, config, dtype) or torch.float32
    return meta_model_from_config(config, model_class=model_class, dtype=target), target, source.checkpoint


def load_generation_config(model: nn.Module, folder: str | Path) -> None:
    """Use the folder's generation_config.json, as transformers' from_pretrained does."""
    folder = Path(folder)
    if not (folder / "generation_config.json").is_file() or not hasattr(model, "generation_config"):
        return
    from transformers import GenerationConfig

    try:
        model.generation_config = GenerationConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        logger.warning("ignoring %s/generation_config.json: %s", folder, exc)


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
