"""Memory peaks of the current process, private (anonymous) and file-backed counted separately.

A loader that maps the checkpoint shows its weights as file-backed pages (RssFile): the kernel can drop them
under pressure and they are shared with the page cache. A loader that copies holds private pages (RssAnon):
real memory. The two are sampled from /proc/self/status in a background thread (every `interval` seconds;
torch and file reads release the GIL, so sampling continues during them). The total peak comes exactly from
VmHWM, which is reset at the start (`echo 5 > /proc/self/clear_refs`) so it covers the measured section only.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

__all__ = ["MemorySampler", "read_status"]

_FIELDS = ("RssAnon", "RssFile", "RssShmem", "VmHWM", "VmRSS")


def read_status() -> dict[str, int]:
    """RssAnon, RssFile, RssShmem, VmHWM, VmRSS of this process in bytes."""
    out: dict[str, int] = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in _FIELDS:
                out[key] = int(value.split()[0]) * 1024
    return out


class MemorySampler:
    """Context manager recording peaks above the baseline taken when it starts.

    >>> with MemorySampler() as mem:
    ...     x = bytearray(100 * 2**20)
    >>> mem.result()["anon_peak"] >= 100 * 2**20
    True
    """

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.hwm_reset = False

    def __enter__(self) -> "MemorySampler":
        try:
            Path("/proc/self/clear_refs").write_text("5\n")
            self.hwm_reset = True
        except OSError:
            pass
        self.base = read_status()
        self.peak = dict(self.base)
        self._thread.start()
        return self

    def _sample(self) -> None:
        now = read_status()
        for key in ("RssAnon", "RssFile", "RssShmem", "VmRSS"):
            if now[key] > self.peak[key]:
                self.peak[key] = now[key]

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self.end = read_status()

    def result(self) -> dict[str, object]:
        """Peaks above the baseline, in bytes: anon (private), file-backed, total (exact VmHWM when it
        could be reset, else the sampled RSS peak)."""
        total = self.end["VmHWM"] if self.hwm_reset else self.peak["VmRSS"]
        return {
            "anon_peak": self.peak["RssAnon"] - self.base["RssAnon"],
            "file_peak": self.peak["RssFile"] + self.peak["RssShmem"] - self.base["RssFile"] - self.base["RssShmem"],
            "total_peak": total - self.base["VmRSS"],
            "anon_end": self.end["RssAnon"] - self.base["RssAnon"],
            "file_end": self.end["RssFile"] - self.base["RssFile"],
            "baseline_rss": self.base["VmRSS"],
            "hwm_exact": self.hwm_reset,
        }
