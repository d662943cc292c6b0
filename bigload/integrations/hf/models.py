"""Hugging Face model folders: what a MODEL argument names (catalog name, folder, config.json, checkpoint),
configs, tokenizers, and meta models built from configs.

transformers is an optional dependency (`pip install bigload[hf]`); it is imported only when a function
here needs it, and its absence is a clear error, not an ImportError from deep inside.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import nn

from bigload.empty import init_empty_weights
from bigload.errors import BigloadError, CheckpointError
from bigload.formats.discover import open_checkpoint
from bigload.plan.catalog import catalog_config, catalog_names
from bigload.plan.dtypes import load_dtype
from bigload.sizes import parse_dtype

if TYPE_CHECKING:
    from transformers import PretrainedConfig

__all__ = [
    "ModelSource",
    "config_dtype",
    "load_config",
    "load_tokenizer",
    "meta_model_from_config",
    "require_model_folder",
    "require_transformers",
    "resolve_model_source",
    "transformers_available",
    "weights_dtype",
    "without_transformers_progress",
]

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


def require_transformers() -> Any:
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
    transformers = require_transformers()
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
    transformers = require_transformers()
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
    transformers = require_transformers()
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


def weights_dtype(source: ModelSource, config: "PretrainedConfig | None", dtype: torch.dtype | str | None) -> torch.dtype | None:
    """The dtype to load in: the caller's, else the config's, else the checkpoint's."""
    if dtype is not None:
        return load_dtype(dtype)
    if config is not None:
        from_config = config_dtype(config, default=None)  # type: ignore[arg-type]
        if from_config is not None:
            return from_config
    return _checkpoint_dtype(source)


def transformers_available() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True
