"""Hugging Face glue: model folders, configs and the catalog, turned into meta models and loaded models.

transformers is an optional dependency (`pip install bigload[hf]`); it is imported only when a function
here needs it, and its absence is a clear error, not an ImportError from deep inside.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from bigload.catalog import catalog_config, catalog_names
from bigload.empty import init_empty_weights
from bigload.errors import BigloadError, CheckpointError
from bigload.sizes import parse_dtype

if TYPE_CHECKING:
    from transformers import PretrainedConfig

__all__ = [
    "ModelSource",
    "config_dtype",
    "from_pretrained",
    "load_config",
    "load_tokenizer",
    "meta_model_from_config",
    "resolve_model_source",
]

logger = logging.getLogger("bigload")

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
    raise BigloadError(
        f"{spec!r} is not a file, a folder or a catalog name. Give a model folder, a config.json, a "
        f"checkpoint, or one of: {', '.join(catalog_names())}."
    )


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
        if hasattr(cls, "from_config"):
            model = cls.from_config(config, dtype=target)
        else:
            model = cls(config).to(target)
    model.eval()
    return model


def load_tokenizer(path: str | Path) -> Any:
    """The tokenizer saved in a model folder (`AutoTokenizer.from_pretrained`, local files only)."""
    transformers = _require_transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise BigloadError(
            f"no tokenizer could be loaded from {path}: {exc}. A model folder needs tokenizer files "
            "(tokenizer.json or tokenizer_config.json) for text prompts."
        ) from exc


def _checkpoint_dtype(source: ModelSource) -> torch.dtype | None:
    """The dtype of the first floating tensor in the source's checkpoint (headers only), if any."""
    if source.checkpoint is None:
        return None
    from bigload.checkpoint import open_checkpoint

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
) -> Any:
    """The inventory of what MODEL names: from a meta model when there is a config (and transformers),
    else from checkpoint headers alone. No weight is read either way."""
    from bigload.inventory import inventory_from_checkpoint, inventory_from_module

    source = resolve_model_source(spec)
    if source.config is not None and _transformers_available():
        config = load_config(source.config)
        target = _weights_dtype(source, config, dtype) or torch.float32
        model = meta_model_from_config(config, dtype=target)
        return inventory_from_module(model, dtype=target, no_split_module_classes=no_split_module_classes)
    if source.checkpoint is None:
        raise BigloadError(
            f"{spec} is a config only and transformers is not installed; install it with "
            "`pip install bigload[hf]`, or plan from a checkpoint's headers instead."
        )
    from bigload.checkpoint import open_checkpoint

    # Headers carry no class names, so `no_split_module_classes` cannot apply here: every numbered
    # block (`model.layers.17`) is kept whole instead.
    return inventory_from_checkpoint(
        open_checkpoint(source.checkpoint), dtype=_weights_dtype(source, None, dtype), config=source.config,
    )


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
) -> Any:
    """A dry run: plan MODEL (catalog name, model folder, config.json or checkpoint) without reading a weight.

    Args:
        spec: what to plan.
        max_memory: budgets per device (`{0: "24GiB", "cpu": "64GiB", "disk": "500GiB"}`); None: this machine.
        strategy: "auto", "balanced", "balanced_low_0" or "sequential".
        dtype: dtype of the weights once loaded; default: the config's, else the checkpoint's.
        context_length, batch_size: reserve KV-cache memory for this many tokens and sequences.
        no_split_module_classes: classes never split (default: the model's `_no_split_modules`).
        prefetch: offloaded blocks loaded ahead (the reserve is sized for it).
        offload_folder: with no "disk" budget, its free space becomes the disk budget.

    Returns:
        A `Plan`.

    Raises:
        PlanError: the model does not fit; the message says how many bytes are missing where.

    >>> print(plan_model("llama-3.1-405b", max_memory={0: "80GiB", "cpu": "1TiB"}).explain())  # doctest: +SKIP
    """
    from bigload.budget import detect_budget
    from bigload.plan import plan

    inventory = inventory_for(spec, dtype=dtype, no_split_module_classes=no_split_module_classes)
    budget = detect_budget(max_memory, offload_folder=offload_folder)
    return plan(inventory, budget, strategy=strategy, dtype=inventory.dtype, context_length=context_length,
                batch_size=batch_size, prefetch=prefetch)


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
) -> nn.Module:
    """Load a Hugging Face model folder onto this machine's devices, ready for `generate`.

    Builds the model from config.json on the meta device, plans with the model's `_no_split_modules` and
    KV-cache headroom for `context_length`, streams the checkpoint straight to the planned places, and
    attaches offload hooks. The result has `hf_device_map` and `bigload_plan`.

    Args:
        path: folder with config.json and safetensors (or .bin) weights.
        model_class: e.g. `transformers.AutoModel` for encoders; default: the config's `architectures`.
        device_map: a strategy ("auto", "balanced", "balanced_low_0", "sequential"), a dict map or a Plan.
        max_memory: budgets per device; None: what this machine has free.
        dtype: dtype to load in; default: the config's, else the checkpoint's.
        offload_folder: where disk-offloaded weights go; needed when the plan uses disk.
        context_length, batch_size: KV-cache room the plan keeps on each executing device.
        strict: missing or unexpected tensors are an error.
        progress: a progress bar for long loads.
        prefetch: offloaded blocks loaded ahead of the one running.
        no_split_module_classes: classes never split (default: the model's `_no_split_modules`).

    Raises:
        BigloadError subclasses: no config or weights, a plan that does not fit, a malformed checkpoint.

    >>> model = from_pretrained("Llama-3-8B/", max_memory={"cpu": "8GiB", "disk": "64GiB"},
    ...                         offload_folder="offload/")  # doctest: +SKIP
    """
    from bigload.dispatch import load_checkpoint_and_dispatch

    source = resolve_model_source(path)
    if source.config is None or source.checkpoint is None:
        raise BigloadError(
            f"{path} must be a model folder with config.json and weights (.safetensors or .bin); "
            f"found {'no config.json' if source.config is None else 'no weights'}."
        )
    config = load_config(source.config)
    target = _weights_dtype(source, config, dtype) or torch.float32
    model = meta_model_from_config(config, model_class=model_class, dtype=target)
    load_checkpoint_and_dispatch(
        model, source.checkpoint, device_map=device_map, max_memory=max_memory,
        no_split_module_classes=no_split_module_classes, offload_folder=offload_folder, dtype=target,
        strict=strict, prefetch=prefetch, context_length=context_length, batch_size=batch_size,
        progress=progress,
    )
    _load_generation_config(model, Path(path))
    return model.eval()


def _load_generation_config(model: nn.Module, folder: Path) -> None:
    """Use the folder's generation_config.json, as transformers' from_pretrained does."""
    if not (folder / "generation_config.json").is_file() or not hasattr(model, "generation_config"):
        return
    from transformers import GenerationConfig

    try:
        model.generation_config = GenerationConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        logger.warning("ignoring %s/generation_config.json: %s", folder, exc)
