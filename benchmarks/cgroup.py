"""A memory cgroup for one measured run: RAM really smaller than the model, page cache included.

The cgroup is a child of this process's own memory cgroup (v1: `/sys/fs/cgroup/memory/<path from
/proc/self/cgroup>`; v2: `/sys/fs/cgroup/<path>`), with `memory.limit_in_bytes` (v1) or `memory.max` (v2)
set. The parent creates it (`MemoryCgroup.create`), the worker process moves itself in (`join`) before it
imports anything heavy, and the parent removes it after the run (`remove`, which first moves any process
left back to the parent cgroup). Creating one needs root; `unavailable()` says why it cannot be done here.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["MemoryCgroup", "join", "peak_bytes", "unavailable"]

ROOT = Path("/sys/fs/cgroup")


def _own() -> tuple[str, Path] | None:
    """("v1" or "v2", this process's memory cgroup folder), or None when there is none."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(",") and (ROOT / "memory").is_dir():
            return "v1", ROOT / "memory" / path.lstrip("/")
    for line in lines:
        if line.startswith("0::") and (ROOT / "cgroup.controllers").is_file():
            return "v2", ROOT / line[3:].lstrip("/")
    return None


def unavailable() -> str | None:
    """Why no memory cgroup can be made here (None: it can)."""
    own = _own()
    if own is None:
        return "no memory cgroup controller (neither cgroup v1 'memory' nor v2) is visible to this process"
    if os.geteuid() != 0 and not os.access(own[1], os.W_OK):
        return f"creating a child of {own[1]} needs root (or write access to it)"
    if own[0] == "v2" and "memory" not in (own[1] / "cgroup.subtree_control").read_text().split():
        return f"the v2 cgroup {own[1]} does not delegate the memory controller to its children"
    return None


@dataclass(frozen=True)
class MemoryCgroup:
    """A child memory cgroup: its folder and cgroup version."""

    path: Path
    version: str

    @staticmethod
    def create(name: str, limit_bytes: int) -> "MemoryCgroup":
        """Make (or remake, empty) the child `name` of this process's memory cgroup with a limit.

        Raises:
            OSError: no cgroup could be made (see `unavailable()`).
        """
        own = _own()
        if own is None:
            raise OSError("no memory cgroup controller")
        group = MemoryCgroup(own[1] / name, own[0])
        group.remove()
        group.path.mkdir()
        limit_file = "memory.limit_in_bytes" if group.version == "v1" else "memory.max"
        (group.path / limit_file).write_text(f"{limit_bytes}\n")
        if group.version == "v1":
            (group.path / "memory.max_usage_in_bytes").write_text("0\n")  # reset the peak
        return group

    def remove(self) -> None:
        """Move any process still inside back to the parent and delete the cgroup (no-op if it is gone)."""
        if not self.path.is_dir():
            return
        parent_procs = self.path.parent / "cgroup.procs"
        for _ in range(100):
            for pid in (self.path / "cgroup.procs").read_text().split():
                try:
                    parent_procs.write_text(pid + "\n")
                except OSError:
                    pass  # it exited meanwhile
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.05)
        raise OSError(f"could not remove cgroup {self.path}; remove it by hand (rmdir) once it is empty")


def join(path: str | os.PathLike[str]) -> None:
    """Move the calling process into the cgroup at `path` (memory allocated from now on is charged there)."""
    (Path(path) / "cgroup.procs").write_text(f"{os.getpid()}\n")


def peak_bytes(path: str | os.PathLike[str]) -> int | None:
    """The cgroup's peak memory use (page cache included), where the kernel reports it."""
    for name in ("memory.max_usage_in_bytes", "memory.peak"):
        try:
            return int((Path(path) / name).read_text())
        except (OSError, ValueError):
            continue
    return None

