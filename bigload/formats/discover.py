"""Opening a checkpoint: a file, a shard index or a folder, found and indexed from headers alone, keyed by
suffix (`open_checkpoint`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import MappingProxyType
from typing import Callable, Mapping

from bigload.errors import CheckpointError, CheckpointNotFoundError
from bigload.formats.refs import SAFETENSORS, TORCH, CheckpointIndex, TensorRef, stat_key
from bigload.formats.safetensors import read_safetensors_header
from bigload.formats.torch_archive import read_torch_archive

__all__ = ["checkpoint_tensor_names", "open_checkpoint"]



def open_checkpoint(path: str | os.PathLike[str], *, select: Callable[[str], bool] | None = None) -> CheckpointIndex:
    """Index a checkpoint from its headers alone.

    Args:
        path: a `.safetensors` file, a `.bin`/`.pt`/`.pth` file, a `.json` shard index (`{"weight_map":
            {name: shard}}` or the bare `{name: shard}`), or a folder holding `model.safetensors`,
            `*.safetensors.index.json`, `pytorch_model.bin`, `pytorch_model.bin.index.json` or one other
            `*.index.json` (safetensors preferred when several exist).
        select: keep only the tensors whose checkpoint names it accepts (one pipeline stage's); shards of a
            sharded checkpoint holding none of them are never opened.

    Returns:
        A CheckpointIndex listing every tensor's dtype, shape, file and byte range.

    Raises:
        CheckpointError: the path does not exist, holds no checkpoint, is malformed or unsafe, or an index
            names a missing shard or a tensor its shard lacks.

    >>> index = open_checkpoint("llama-7b/")  # doctest: +SKIP
    >>> index.tensors["lm_head.weight"].shape  # doctest: +SKIP
    (32000, 4096)
    """
    target = _checkpoint_file(path)
    for suffix, opener in _OPENERS:
        if target.name.endswith(suffix):
            return opener(target, select or _everything)
    raise CheckpointError(
        f"{target}: unknown checkpoint format; expected .safetensors, .bin, .pt, .pth, or a *.index.json."
    )


def checkpoint_tensor_names(path: str | os.PathLike[str]) -> tuple[str, ...]:
    """The tensor names of a checkpoint: a shard index's `weight_map` (no shard opened), else the headers.

    Raises:
        CheckpointError: as `open_checkpoint`.
    """
    target = _checkpoint_file(path)
    if target.name.endswith(".json"):
        return tuple(_read_index_json(target)[0])
    return tuple(open_checkpoint(target).tensors)


def _checkpoint_file(path: str | os.PathLike[str]) -> Path:
    target = Path(path).expanduser().resolve()
    if target.is_dir():
        target = _discover(target)
    if not target.exists():
        raise CheckpointNotFoundError(f"{target}: no such checkpoint file or folder.")
    return target


def _everything(_: str) -> bool:
    return True


def _discover(folder: Path) -> Path:
    for pattern in _DISCOVERY:
        found = [p for p in sorted(folder.glob(pattern)) if not p.name.endswith(_NOT_OTHER_INDEX)
                 or pattern != _OTHER_INDEX]
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise CheckpointError(
                f"{folder}: several files match {pattern!r} ({', '.join(p.name for p in found[:5])}); "
                "pass the one to load, or its *.index.json."
            )
    raise CheckpointError(
        f"{folder}: no checkpoint found; expected model.safetensors, *.safetensors.index.json, "
        "pytorch_model.bin or pytorch_model.bin.index.json."
    )


_OTHER_INDEX = "*.index.json"
_NOT_OTHER_INDEX = (".safetensors.index.json", ".bin.index.json")

# Safetensors first: they need no unpickling and map straight to bytes.
_DISCOVERY = (
    "model.safetensors.index.json",
    "model.safetensors",
    "*.safetensors.index.json",
    "*.index.json",  # accelerate takes any one index, e.g. weight_map.index.json (PyTorch ones come later)
    "*.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
    "*.bin.index.json",
    "*.bin",
    "*.pt",
    "*.pth",
)


def _open_single_safetensors(path: Path, select: Callable[[str], bool]) -> CheckpointIndex:
    refs, metadata = read_safetensors_header(path)
    return _build_index(path.parent, SAFETENSORS, [(path, [ref for ref in refs if select(ref.name)])], metadata)


def _open_single_torch(path: Path, select: Callable[[str], bool]) -> CheckpointIndex:
    refs = [ref for ref in read_torch_archive(path) if select(ref.name)]
    return _build_index(path.parent, TORCH, [(path, refs)], {})


def _open_sharded(path: Path, select: Callable[[str], bool]) -> CheckpointIndex:
    weight_map, metadata = _read_index_json(path)
    weight_map = {name: shard for name, shard in weight_map.items() if select(name)}
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        # Checked on the name as written, so shards that are symlinks (the Hugging Face cache) still load.
        if Path(shard).is_absolute() or ".." in Path(shard).parts:
            raise CheckpointError(
                f"{path}: shard {shard!r} is outside {path.parent}; an index may only name files in its own "
                "folder. Move the shard into the folder and name it relative to the index."
            )
    is_safetensors = all(shard.endswith(".safetensors") for shard in shards)
    if not is_safetensors and any(shard.endswith(".safetensors") for shard in shards):
        # torch.load would hand a .safetensors shard to safetensors and read every byte of it.
        mixed = (next(s for s in shards if s.endswith(".safetensors")),
                 next(s for s in shards if not s.endswith(".safetensors")))
        raise CheckpointError(
            f"{path}: the index names both safetensors and PyTorch shards (e.g. {mixed[0]!r} and {mixed[1]!r}); "
            "a checkpoint is in one format. Fix the index or download the checkpoint again."
        )
    per_file: list[tuple[Path, list[TensorRef]]] = []
    owner: dict[str, Path] = {}
    for shard in shards:
        shard_path = (path.parent / shard).resolve()
        if not shard_path.is_file():
            wanted = sum(1 for name in weight_map.values() if name == shard)
            raise CheckpointNotFoundError(
                f"{path}: shard {shard!r} ({wanted} tensors) is missing from {path.parent}; "
                "download or copy the missing shard."
            )
        refs = read_safetensors_header(shard_path)[0] if is_safetensors else read_torch_archive(shard_path)
        kept = [ref for ref in refs if select(ref.name)
                and (path.parent / weight_map.get(ref.name, shard)).resolve() == shard_path]
        per_file.append((shard_path, kept))
        owner.update({ref.name: shard_path for ref in kept})
    absent = [name for name in weight_map if name not in owner]
    if absent:
        raise CheckpointError(
            f"{path}: {len(absent)} tensors are listed in the index but absent from their shard, e.g. "
            f"{absent[0]!r} in {weight_map[absent[0]]!r}: {_first(absent)}. The shard is stale or the "
            "index is wrong; download both again."
        )
    return _build_index(path.parent, SAFETENSORS if is_safetensors else TORCH, per_file, metadata)


def _read_index_json(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    # ValueError covers UnicodeDecodeError, JSONDecodeError and over-long integers; RecursionError deep nesting.
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: the shard index is not valid JSON ({exc}).") from None
    # Hugging Face's {"weight_map": {...}, "metadata": {...}}, or (as accelerate accepts) the bare map.
    weight_map = content.get("weight_map", content) if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(
            f"{path}: a shard index needs a 'weight_map' object (or is itself an object) mapping tensor names to "
            "shard file names."
        )
    raw_meta = content.get("metadata") or {}
    metadata = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in dict(raw_meta).items()} \
        if isinstance(raw_meta, dict) else {}
    return weight_map, metadata


def _build_index(root: Path, fmt: str, per_file: list[tuple[Path, list[TensorRef]]],
                 metadata: Mapping[str, str]) -> CheckpointIndex:
    tensors: dict[str, TensorRef] = {}
    for path, refs in per_file:
        for ref in refs:
            if ref.name in tensors:
                raise CheckpointError(
                    f"tensor {ref.name!r} is stored in both {tensors[ref.name].file} and {path}; "
                    "remove the duplicate or add a shard index saying which to use."
                )
            tensors[ref.name] = ref
    return CheckpointIndex(
        root=root.resolve(),
        format=fmt,
        files=tuple(path for path, _ in per_file),
        tensors=MappingProxyType(tensors),
        metadata=MappingProxyType(dict(metadata)),
        total_bytes=sum(ref.nbytes for ref in tensors.values()),
        file_stats=MappingProxyType({path: stat_key(path) for path, _ in per_file}),
    )


def _first(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


# Longest suffixes first so "x.safetensors.index.json" is not taken for a plain file.
_OPENERS: tuple[tuple[str, Callable[[Path, Callable[[str], bool]], CheckpointIndex]], ...] = (
    (".index.json", _open_sharded),
    (".safetensors", _open_single_safetensors),
    (".bin", _open_single_torch),
    (".pt", _open_single_torch),
    (".pth", _open_single_torch),
    (".json", _open_sharded),  # accelerate reads any .json file it is given as a shard index
)
