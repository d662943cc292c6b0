"""One writer or checker at a time per offload folder: an exclusive `flock` on the folder itself.

Loads that share a folder (two processes, two threads, a load beside a merge) would otherwise interleave: both
find no index, both write `<name>.dat` under the same names, and one model runs on the other's bytes. Each step
that decides what the folder holds and changes it holds the lock: a load from the index check to its commit
(`load.loader`), a `StoreWriter` from creation to commit or abort, `DiskStore` while it checks a folder, and
`DiskStore.rewrite` (a merge). A model running from a folder holds no lock; it checks the files it maps instead
(`DiskStore`), so a later writer never waits for it.

The lock is on the folder's own file descriptor, so nothing is added to the folder (accelerate's layout stays
as it is) and the lock goes with the process that held it, however it ended. Nested use by the thread already
holding a folder's lock is allowed (a writer's commit opens the `DiskStore` it returns). The holder's process
id comes from `/proc/locks` where Linux has it. Where `flock` is missing or refused (Windows, some network
filesystems), folders are not locked.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from bigload.errors import OffloadError
from bigload.messages import Text, setting

try:
    import fcntl
except ImportError:  # Windows: folders are not locked
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_TIMEOUT_S", "FolderLock"]

logger = logging.getLogger(__name__)

# How long a load waits for another one writing or checking the same folder. A store is written at disk speed,
# so a large one takes minutes: the wait is long, and logged when it starts.
LOCK_TIMEOUT_S = 600.0
_POLL_S = (0.01, 0.5)  # first and longest sleep between tries


@dataclass
class _Held:
    fd: int | None  # None: held without a flock (none available for this folder)
    thread: int
    depth: int


_held: dict[Path, _Held] = {}
_held_guard = threading.Lock()


class FolderLock:
    """The exclusive lock on one offload folder, for one step that reads its index and may change it.

    >>> with FolderLock(Path("offload"), doing="writing"):  # doctest: +SKIP
    ...     ...

    Re-entrant for the thread holding it. Acquiring waits up to `LOCK_TIMEOUT_S` for another holder (another
    process, or another thread of this one).
    """

    def __init__(self, folder: Path, *, doing: str) -> None:
        self.folder = folder
        self.doing = doing  # what the holder does, for the log line of a waiter
        self._acquired = False

    def acquire(self) -> "FolderLock":
        """Take the lock (the folder must exist).

        Raises:
            OffloadError: another holder kept it for `LOCK_TIMEOUT_S` (naming the folder and, where known,
                the process holding it).
        """
        me = threading.get_ident()
        with _held_guard:
            held = _held.get(self.folder)
            if held is not None and held.thread == me:
                held.depth += 1
                self._acquired = True
                return self
        fd = _wait_for_flock(self.folder, self.doing)
        with _held_guard:
            _held[self.folder] = _Held(fd, me, 1)
        self._acquired = True
        return self

    def release(self) -> None:
        """Give the lock back (once per `acquire`); a no-op when not held."""
        if not self._acquired:
            return
        self._acquired = False
        with _held_guard:
            held = _held.get(self.folder)
            if held is None:
                return
            held.depth -= 1
            if held.depth > 0:
                return
            del _held[self.folder]
        if held.fd is not None:
            os.close(held.fd)  # closing the descriptor releases the flock

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def __del__(self) -> None:
        try:
            self.release()  # an abandoned writer gives the folder back when it is collected
        except Exception:  # at interpreter exit the module's globals may be gone; the process ends anyway
            pass


def _wait_for_flock(folder: Path, doing: str) -> int | None:
    """A descriptor of `folder` holding its exclusive flock, or None where folders cannot be locked."""
    if fcntl is None:
        return None
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return None  # the caller's own open or write reports what is wrong with the folder
    deadline, pause, logged = time.monotonic() + LOCK_TIMEOUT_S, _POLL_S[0], False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            pass
        except OSError:  # ENOLCK, EINVAL: this filesystem does not lock
            os.close(fd)
            return None
        if not logged:
            logger.warning("bigload: waiting for %s: %s holds it (up to %.0f s) before %s", folder,
                           _holder_words(folder), LOCK_TIMEOUT_S, doing)
            logged = True
        if time.monotonic() >= deadline:
            os.close(fd)
            raise _timed_out(folder, doing)
        time.sleep(pause)
        pause = min(pause * 2, _POLL_S[1])


def _timed_out(folder: Path, doing: str) -> OffloadError:
    return OffloadError(Text(
        f"the offload folder {folder} is in use: {_holder_words(folder)} is writing or checking it, and did not "
        f"finish within {LOCK_TIMEOUT_S:.0f} s, so this process stopped before {doing} it. Wait for that process "
        "to finish (a second load of the same checkpoint then reuses the folder), or give this load another ",
        setting("offload_folder"), "."))


def _holder_words(folder: Path) -> str:
    pids = holder_pids(folder)
    if not pids:
        return "another process"
    if pids == [os.getpid()]:
        return f"this process ({pids[0]}: another thread or load)"
    return ", ".join(f"process {pid}" for pid in pids)


def holder_pids(folder: Path) -> list[int]:
    """The processes holding a flock on `folder`, from `/proc/locks` (Linux); [] where unknown."""
    try:
        stat = folder.stat()
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return []
    device = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}"
    pids = []
    for line in lines:
        fields = line.split()
        if "->" in fields or len(fields) < 6 or fields[1] != "FLOCK":
            continue  # a waiter, or another kind of lock
        if fields[5] == device and fields[4].isdigit():
            pids.append(int(fields[4]))
    return sorted(set(pids))
