"""Fuzz bigload's safetensors header parser (and the offload-store index reader).

The property: for any bytes, `open_checkpoint` either returns an index whose every tensor lies inside the
file and reads back, or raises `CheckpointError`; never another exception, never a hang, never an
allocation sized by a lying length field. `DiskStore.open` likewise returns a store or raises `OffloadError`.

Run as a script for a longer campaign (uses atheris when it is installed, else a plain mutation loop):

    python tests/fuzz/header_fuzz.py --seconds 60            # plain loop, fixed seed
    python tests/fuzz/header_fuzz.py --atheris -- -max_total_time=60

`tests/test_reliability_fuzz.py` runs a short, deterministic loop of the plain fuzzer as a test.
"""

from __future__ import annotations

import argparse
import json
import random
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors.torch import save_file

from bigload.formats.mapped import CheckpointReader
from bigload.formats.discover import open_checkpoint
from bigload.errors import CheckpointError, OffloadError
from bigload.sizes import dtype_width
from bigload.load.store import DiskStore

# JSON fragments that have broken parsers: deep nesting, huge numbers, non-finite numbers, lone surrogates.
FRAGMENTS: tuple[bytes, ...] = (
    b"[" * 3000, b"{\"a\":" * 2000, b"9" * 5000, b"-1", b"1e999", b"NaN", b"Infinity", b"\"\\ud800\"", b"null",
    b"true", b"[]", b"{}", b",", b"}", b"]", b"\"", b"\\", b"\x00", b"\xff", b"\"dtype\":\"F32\"",
    b"\"shape\":[2,2]", b"\"data_offsets\":[0,16]", b"\"__metadata__\":{}", b"18446744073709551616",
    b"0.5", b"[0,18446744073709551615]",
)


def seed_files() -> list[bytes]:
    """Valid safetensors files to mutate: several dtypes, empty and 0-d tensors, metadata."""
    states = [
        {"a": torch.arange(8, dtype=torch.float32), "b": torch.arange(3, dtype=torch.int64)},
        {"w": torch.ones(2, 3, dtype=torch.bfloat16), "m": torch.tensor([True, False]), "s": torch.tensor(1.5)},
        {"e": torch.empty(0, 4), "h": torch.zeros(5, dtype=torch.float16)},
    ]
    out = []
    with tempfile.TemporaryDirectory() as folder:
        for i, state in enumerate(states):
            path = Path(folder) / f"{i}.safetensors"
            save_file(state, path, metadata={"format": "pt"} if i == 0 else None)
            out.append(path.read_bytes())
    return out


def header_span(data: bytes) -> int:
    """End of the header region of a (possibly mutated) file, clipped to the file."""
    if len(data) < 8:
        return len(data)
    (length,) = struct.unpack("<Q", data[:8])
    return min(len(data), 8 + length)


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One to four random mutations, aimed mostly at the length field and the header JSON."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        end = max(8, header_span(bytes(buf)))
        kind = rng.randrange(7)
        if kind == 0 and buf:  # flip bits in the header
            pos = rng.randrange(min(len(buf), end))
            buf[pos] ^= 1 << rng.randrange(8)
        elif kind == 1 and len(buf) >= 8:  # the length field lies
            (length,) = struct.unpack("<Q", buf[:8])
            choice = rng.choice([length + rng.randint(-16, 16), rng.getrandbits(64), 2**60, len(buf), 0])
            buf[:8] = struct.pack("<Q", max(0, min(choice, 2**64 - 1)))
        elif kind == 2:  # splice a fragment into the header, keeping the length field honest
            pos = rng.randrange(8, end + 1) if end >= 8 and len(buf) >= 8 else len(buf)
            fragment = rng.choice(FRAGMENTS)
            buf[pos:pos] = fragment
            if len(buf) >= 8 and rng.random() < 0.8:
                (length,) = struct.unpack("<Q", buf[:8])
                buf[:8] = struct.pack("<Q", length + len(fragment))
        elif kind == 3:  # truncate
            del buf[rng.randrange(len(buf) + 1):]
        elif kind == 4:  # append junk
            buf += bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64)))
        elif kind == 5 and end > 8:  # replace a number in the header with another
            header = bytes(buf[8:end])
            digits = [i for i, c in enumerate(header) if 48 <= c <= 57]
            if digits:
                pos = 8 + rng.choice(digits)
                buf[pos:pos + 1] = str(rng.choice([0, 1, 7, 2**31, 2**63, 10**30])).encode()
        elif kind == 6 and end > 8:  # delete a slice of the header
            start = rng.randrange(8, end)
            del buf[start:start + rng.randint(1, 16)]
    return bytes(buf)


def check_file(path: Path) -> str:
    """The property, for one file: "ok" (valid, every tensor reads back) or "refused" (CheckpointError).

    Raises AssertionError for a broken invariant; any other exception escapes (a finding).
    """
    try:
        index = open_checkpoint(path)
    except CheckpointError:
        return "refused"
    size = path.stat().st_size
    previous_end = 0
    with CheckpointReader(index) as reader:
        for ref in index.tensors.values():
            assert 8 <= ref.offset and ref.offset + ref.nbytes <= size, ref
            assert ref.nbytes == ref.numel * dtype_width(ref.dtype), ref
            if ref.nbytes:
                assert ref.offset >= previous_end, f"{ref.name} overlaps the previous tensor"
                previous_end = ref.offset + ref.nbytes
            tensor = reader.read(ref)
            assert tuple(tensor.shape) == ref.shape and tensor.dtype == ref.dtype
    return "ok"


def check_store_index(folder: Path, content: bytes) -> str:
    """The store-side property: `DiskStore.open` (and `get` of each name) works or raises OffloadError."""
    (folder / "index.json").write_bytes(content)
    try:
        store = DiskStore.open(folder)
        for name in store.names:
            store.get(name)
    except OffloadError:
        return "refused"
    return "ok"


def plain_loop(seconds: float, *, seed: int = 0, iterations: int | None = None,
               on_finding: Callable[[bytes, BaseException], None] | None = None) -> dict[str, int]:
    """Mutate the seeds for `seconds` (or `iterations`); returns outcome counts. A finding raises unless
    `on_finding` is given."""
    rng = random.Random(seed)
    seeds = seed_files()
    counts = {"ok": 0, "refused": 0}
    deadline = time.monotonic() + seconds
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzz.safetensors"
        for step in _steps(iterations):
            if iterations is None and time.monotonic() > deadline:
                break
            data = mutate(rng.choice(seeds), rng)
            path.write_bytes(data)
            try:
                counts[check_file(path)] += 1
            except Exception as exc:  # noqa: BLE001 - every escape is a finding
                if on_finding is None:
                    raise AssertionError(f"step {step}: {type(exc).__name__}: {exc} for input {data[:200]!r}") \
                        from exc
                on_finding(data, exc)
    return counts


def _steps(iterations: int | None) -> Iterator[int]:
    step = 0
    while iterations is None or step < iterations:
        yield step
        step += 1


def atheris_main(argv: list[str]) -> None:  # pragma: no cover - needs atheris
    import atheris

    import inspect

    import bigload.formats.safetensors

    # Coverage feedback from the parser only (instrumenting all of torch takes minutes).
    for function in vars(bigload.formats.safetensors).values():
        if inspect.isfunction(function) and function.__module__ == "bigload.formats.safetensors":
            atheris.instrument_func(function)
    folder = Path(tempfile.mkdtemp())
    path = folder / "fuzz.safetensors"
    corpus = folder / "corpus"
    corpus.mkdir()
    for i, data in enumerate(seed_files()):
        (corpus / f"seed{i}").write_bytes(data)

    def one_input(data: bytes) -> None:
        path.write_bytes(data)
        check_file(path)

    artifacts = f"-artifact_prefix={folder}/"  # crash inputs land here, not in the working tree
    print(f"atheris: corpus and crash inputs in {folder}", file=sys.stderr)
    atheris.Setup([sys.argv[0], artifacts, *argv, str(corpus)], one_input)
    atheris.Fuzz()


def main() -> int:  # pragma: no cover - a script entry point
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--atheris", action="store_true", help="use atheris (libFuzzer) instead of the plain loop")
    args, rest = parser.parse_known_args()
    if args.atheris:
        atheris_main(rest[1:] if rest[:1] == ["--"] else rest)
        return 0
    findings: list[tuple[bytes, BaseException]] = []
    counts = plain_loop(args.seconds, seed=args.seed, on_finding=lambda d, e: findings.append((d, e)))
    print(json.dumps({**counts, "findings": len(findings)}))
    for data, exc in findings[:10]:
        print(f"{type(exc).__name__}: {str(exc)[:160]}  input[:80]={data[:80]!r}")
    return 1 if findings else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
