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

__all__ = ["agree", "fingerprint"]


def fingerprint(folder: Path, checkpoint: Path, options: Mapping[str, Any]) -> dict[str, str]:
    """Short digests of what every rank must share: config.json, the checkpoint's listing (file names and
    sizes; no mtimes, which differ between copies) and the planning options."""
    shards = checkpoint if checkpoint.is_dir() else checkpoint.parent
    listing = sorted((p.name, p.stat().st_size) for p in shards.iterdir()
                     if p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json"))
    config = (folder / "config.json").read_text() if (folder / "config.json").is_file() else ""
    return {"config.json": _digest(config), "checkpoint files": _digest(listing), "options": _digest(dict(options))}


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
        differing = [key for key, value in entry["fingerprint"].items() if gathered[0]["fingerprint"].get(key) != value]
        if differing:
            raise DistributedError(
                f"rank {other}'s {' and '.join(differing)} differ from rank 0's; every rank must get the same model "
                "folder and the same options (only a host's budget may differ, through --max-memory-host / "
                "max_memory_hosts).", rank=other)
    return [Budget.of(dict(entry["budget"])) for entry in gathered], [entry["host"] for entry in gathered]
