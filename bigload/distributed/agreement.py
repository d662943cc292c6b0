"""The ranks agree on their inputs before planning: every rank computes the same split only from the same
config, checkpoint and options, so a rank given other inputs must stop every rank, naming it.

Each rank sends a fingerprint of its inputs, its memory budget and its host name to every other rank; the
budgets and host names are what the ranks legitimately differ in (`max_memory_hosts`, machines).
"""

from __future__ import annotations

import hashlib
import json
import socket
from pathlib import Path
from typing import Any, Mapping

import torch.distributed as dist

from bigload.devices import Budget
from bigload.errors import DistributedError
from bigload.formats.discover import open_checkpoint

__all__ = ["agree", "fingerprint"]

_FILE = "checkpoint file "  # a fingerprint key per checkpoint file


def fingerprint(folder: Path, checkpoint: Path, options: Mapping[str, Any]) -> dict[str, str]:
    """Short digests of what every rank must share: config.json, the planning options, and what each
    checkpoint file holds (`CheckpointIndex.content_digests`: every tensor's entry and both ends of its bytes;
    no mtimes or paths, which differ between copies). Reads every shard's header and two pages per tensor.

    Raises:
        CheckpointError: the checkpoint cannot be indexed or read.
    """
    config = (folder / "config.json").read_text() if (folder / "config.json").is_file() else ""
    files = open_checkpoint(checkpoint).content_digests()
    return {"config.json": _digest(config), "options": _digest(dict(options)),
            **{_FILE + name: digest[:16] for name, digest in files.items()}}


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def agree(rank: int, world: int, mine: Mapping[str, str], budget: Budget) -> tuple[list[Budget], list[str]]:
    """Exchange fingerprints, budgets and host names; raise on every rank when a rank's inputs differ from
    rank 0's.

    Returns:
        Every rank's budget and host name, by rank.

    Raises:
        DistributedError: a rank's fingerprint differs from rank 0's (naming it), or a rank did not take part.
    """
    entry = {"fingerprint": dict(mine), "budget": [(d.key, n) for d, n in budget], "host": socket.gethostname()}
    gathered: list[Any] = [None] * world
    try:
        dist.all_gather_object(gathered, entry)
    except RuntimeError as error:
        raise DistributedError(f"rank {rank}: the ranks could not exchange their plan inputs at start "
                               f"({str(error).splitlines()[0][:200]}); a rank did not start or died.") from None
    for other, entry in enumerate(gathered):
        differing = _differences(entry["fingerprint"], gathered[0]["fingerprint"])
        if differing:
            raise DistributedError(
                f"rank {other}'s {differing} differ from rank 0's; every rank must get the same model folder (copies "
                "of the same files) and the same options (only a host's budget may differ, through "
                "--max-memory-host / max_memory_hosts).", rank=other)
    return [Budget.of(dict(entry["budget"])) for entry in gathered], [entry["host"] for entry in gathered]


def _differences(theirs: Mapping[str, str], first: Mapping[str, str]) -> str:
    """What differs between two fingerprints, in words ("" when nothing does): e.g. "options and checkpoint
    data (model-00002-of-00003.safetensors)"; a file present on one side only differs too."""
    keys = sorted(set(theirs) | set(first))
    differing = [key for key in keys if theirs.get(key) != first.get(key)]
    files = [key.removeprefix(_FILE) for key in differing if key.startswith(_FILE)]
    parts = [key for key in differing if not key.startswith(_FILE)]
    if files:
        shown = ", ".join(files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
        parts.append(f"checkpoint data ({shown})")
    return " and ".join(parts)
