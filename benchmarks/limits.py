"""This machine's bounds, so every benchmark figure sits next to the best it could be.

- sequential read of a file, cold (page cache evicted) and warm (cached), with 8 MiB `readinto` calls;
- mmap page-fault bandwidth on a warm file (one byte per page through a fresh mapping): what a zero-copy
  loader pays to make cached weights readable;
- memcpy bandwidth (`torch.Tensor.copy_` of 256 MiB; bytes copied per second).
Each is the median of a few repetitions. It also records how the page cache could be dropped here.

    python -m benchmarks.limits --size 2GiB
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from benchmarks import pagecache

__all__ = ["measure_limits", "read_through"]


def _write_file(path: Path, size: int) -> None:
    if path.exists() and path.stat().st_size == size:
        return
    block = os.urandom(8 * 2**20)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            f.write(block[: min(left, len(block))])
            left -= len(block)
        f.flush()
        os.fsync(f.fileno())


def read_through(path: Path) -> float:
    """Seconds to read the file once with 8 MiB `readinto` calls (one stream, through the page cache)."""
    buf = memoryview(bytearray(8 * 2**20))
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    return time.perf_counter() - t


def _mmap_touch(path: Path, size: int) -> float:
    import torch

    t = time.perf_counter()
    mapped = torch.from_file(str(path), shared=True, size=size, dtype=torch.uint8)
    mapped[::4096].sum(dtype=torch.int64)
    elapsed = time.perf_counter() - t
    del mapped
    return elapsed


def _memcpy(nbytes: int = 256 * 2**20) -> float:
    import torch

    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in first
    t = time.perf_counter()
    dst.copy_(src)
    return nbytes / (time.perf_counter() - t)


def _probe_drop_caches(path: Path) -> str:
    pagecache.warm([path])
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as exc:
        return f"not permitted ({exc.strerror})"
    left = pagecache.resident_fraction([path])
    return "works" if left < 0.05 else f"write accepted but no effect ({left:.0%} still resident)"


def measure_limits(work: Path, *, size: int, repeats: int = 3, log=print) -> dict:
    """Measure the bounds using a `size`-byte scratch file in `work`. Returns figures in bytes/s and the
    rows of the limits table."""
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"limits-{size}.bin"
    _write_file(path, size)
    log(f"limits: {size / 2**30:.2f} GiB scratch file")
    drop = _probe_drop_caches(path)
    cold, warm, touch, evictions = [], [], [], []
    for _ in range(repeats):
        evictions.append(pagecache.evict([path], allow_global=False))
        cold.append(size / read_through(path))
        warm.append(size / read_through(path))
        touch.append(size / _mmap_touch(path, size))
    copy = statistics.median(_memcpy() for _ in range(max(3, repeats)))
    fadvise_left = max(e["resident_after"] for e in evictions)
    out = {
        "file_bytes": size,
        "read_cold_bytes_s": statistics.median(cold),
        "read_warm_bytes_s": statistics.median(warm),
        "mmap_touch_bytes_s": statistics.median(touch),
        "memcpy_bytes_s": copy,
        "drop_caches": drop,
        "fadvise_resident_after": fadvise_left,
        "eviction": "posix_fadvise(DONTNEED) per file"
        + ("" if fadvise_left < 0.05 else f" (left {fadvise_left:.0%} resident)")
        + f"; /proc/sys/vm/drop_caches: {drop}",
    }
    gbs = lambda v: f"{v / 1e9:.2f} GB/s"  # noqa: E731
    out["rows"] = [
        ["sequential read, cold", gbs(out["read_cold_bytes_s"]), f"{size / 2**30:.2f} GiB file, 8 MiB readinto, after eviction"],
        ["sequential read, warm", gbs(out["read_warm_bytes_s"]), "same file, cached"],
        ["mmap page faults, warm", gbs(out["mmap_touch_bytes_s"]), "fresh shared mapping, one byte per 4 KiB page"],
        ["memcpy", gbs(out["memcpy_bytes_s"]), "torch copy_ of 256 MiB (bytes copied per second)"],
        ["page-cache eviction", out["eviction"], "checked with mincore"],
    ]
    return out


def main(argv: list[str] | None = None) -> None:
    from bigload.sizes import parse_size

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="1GiB")
    parser.add_argument("--work", type=Path, default=Path(__file__).parent / "_work")
    args = parser.parse_args(argv)
    result = measure_limits(args.work, size=parse_size(args.size))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))


if __name__ == "__main__":
    main()
