"""Where an offload folder may be: apart from the checkpoint it is built from.

A store writes `index.json`, `bigload.json` and one `.dat` file per offloaded tensor. In the checkpoint's
folder they would land among its files, and a later error about the store ("... delete this folder") would
point at the model itself; an offload folder holding the checkpoint's folder has the same problem. Inside a
model folder (one with `config.json` or a shard index: a Hub snapshot, a saved model, which people copy,
upload and share through the cache) the store's files would become part of the model. A single checkpoint
file's folder is any working folder, where a subfolder is the usual place for an offload folder: that
one case is allowed. `check_offload_folder` refuses the others before anything is written; the loader
calls it with the checkpoint's folder, `dispatch_model` with the folder a transformers model was loaded
from (`config._name_or_path`, when it is a local folder).
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from bigload.errors import OffloadError
from bigload.messages import Text, setting

__all__ = ["check_offload_folder", "model_folder"]


def check_offload_folder(folder: str | os.PathLike[str], checkpoint_folder: str | os.PathLike[str], *,
                         keyword: str = "offload_folder") -> None:
    """Refuse an offload folder that is the checkpoint's folder, holds it, or is inside a model folder.

    Args:
        folder: the offload folder the user gave (it need not exist).
        checkpoint_folder: the folder the checkpoint lives in (a model folder, or a single file's folder).
        keyword: the setting's name where the user gave it ("offload_folder", or "offload_dir" for
            `dispatch_model` / `disk_offload`); the CLI spells it `--offload-folder`.

    Raises:
        OffloadError: naming both folders and one outside the checkpoint's to use instead.

    >>> check_offload_folder("llama/offload", "llama")  # doctest: +SKIP
    OffloadError: the offload folder .../llama/offload is inside the checkpoint's folder .../llama: ...
    """
    offload = Path(folder).expanduser().resolve()
    source = Path(checkpoint_folder).expanduser().resolve()
    store_files = "the offload store's files (index.json, bigload.json and a .dat file per offloaded tensor)"
    if offload == source or offload in source.parents:
        relation = "is" if offload == source else "holds"
        why = f"{store_files} would be written among the checkpoint's, and deleting the offload folder would delete it"
    elif source in offload.parents and _is_model_folder(source):
        relation, why = "is inside", f"{store_files} would be written into the model's own folder"
    else:
        return
    instead = source.parent / f"{source.name}-offload"
    raise OffloadError(Text(
        f"the offload folder {offload} {relation} the checkpoint's folder {source}: {why}. Pass a folder apart "
        "from it, e.g. ", setting(keyword, repr(str(instead)), str(instead)), "."))


def _is_model_folder(folder: Path) -> bool:
    """A saved model (config.json) or a sharded checkpoint (a `*.index.json`), not just a file's folder."""
    return (folder / "config.json").is_file() or any(folder.glob("*.index.json"))


def model_folder(model: nn.Module) -> Path | None:
    """The local folder a transformers model was loaded from (`config._name_or_path`), if it is one."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None)
    if not isinstance(name, (str, os.PathLike)) or not str(name):
        return None
    path = Path(name).expanduser()
    return path if path.is_dir() else None
