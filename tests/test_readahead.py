"""Reading a load's checkpoint bytes ahead of use (`bigload.load.readahead`): every byte range a load places is
populated before it is read and the weights equal the reference's, the reading never runs more than the
window ahead of the consumer (asked-for ranges, and pages really in memory by `mincore`), and a file
shorter than its header claims, or one that shrinks after it was mapped, is a CheckpointError."""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from bigload.formats import pages
from bigload.load import readahead
from bigload.formats.mapped import CheckpointReader, MappedFiles
from bigload.formats.discover import open_checkpoint
from bigload.errors import CheckpointError
from bigload.formats.refs import Extent
from bigload.load.readahead import ReadAhead
from bigload.integrations.loading import load_checkpoint_in_model
from fixtures_ckpt import assert_bitwise_equal, tiny_llama, tiny_llama_config
from timeouts import with_timeout

needs_populate = pytest.mark.skipif(pages._madvise is None or not hasattr(os, "posix_fadvise"),
                                    reason="needs madvise, mincore and posix_fadvise")


def _meta_llama():
    from transformers import LlamaForCausalLM

    from bigload.empty import init_empty_weights

    with init_empty_weights():
        return LlamaForCausalLM(tiny_llama_config())


@pytest.fixture(scope="module")
def reference():
    return tiny_llama()


@pytest.fixture(scope="module")
def sharded(reference, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sharded")
    reference.save_pretrained(folder, max_shard_size="20KB")
    return folder


def _covered(ranges: list[tuple[Path, int, int]], path: Path, offset: int, nbytes: int) -> bool:
    """Whether the union of `ranges` covers `nbytes` bytes of `path` from `offset`."""
    position, end = offset, offset + nbytes
    for start, stop in sorted((o, o + n) for p, o, n in ranges if p == path):
        if start <= position < stop:
            position = stop
    return position >= end or nbytes == 0


@pytest.mark.parametrize("dtype", [None, torch.float16], ids=["views", "cast"])
def test_every_placed_range_is_populated_before_it_is_read_and_weights_are_equal(
        sharded: Path, reference, dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[tuple[str, object]] = []
    lock = threading.Lock()
    real_populate, real_read = CheckpointReader.populate, CheckpointReader.read

    def populate(self, path, offset, nbytes):
        real_populate(self, path, offset, nbytes)
        with lock:
            events.append(("populated", (path, offset, nbytes)))

    def read(self, ref):
        with lock:
            events.append(("read", ref))
        return real_read(self, ref)

    monkeypatch.setattr(CheckpointReader, "populate", populate)
    monkeypatch.setattr(CheckpointReader, "read", read)
    monkeypatch.setattr(readahead, "cached", lambda path, offset, nbytes: False)  # as if the cache were cold
    model = _meta_llama()
    # A small window makes small pieces (a page): joined across tensors stored side by side, cut inside them.
    load_checkpoint_in_model(model, sharded, dtype=dtype, window_bytes=16_384)

    index = open_checkpoint(sharded)
    populated: list[tuple[Path, int, int]] = []
    for kind, what in events:
        if kind == "populated":
            populated.append(what)  # type: ignore[arg-type]
        else:
            assert _covered(populated, what.file, what.offset, what.nbytes), f"{what.name} read before populated"
    assert {ref.name for kind, ref in events if kind == "read"} == set(index.tensors)
    assert sum(n for _, _, n in populated) == sum(ref.nbytes for ref in index.tensors.values())  # each byte once
    expected = reference.state_dict()
    for name, tensor in model.state_dict().items():
        want = expected[name] if dtype is None else expected[name].to(dtype)
        assert_bitwise_equal(tensor, want, name=name)


@pytest.mark.skipif(not pages._cachestat_works, reason="needs cachestat (Linux 6.5 or later)")
def test_a_warm_load_reads_nothing_and_a_cold_piece_is_known(sharded: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    index = open_checkpoint(sharded)
    for file in index.files:
        file.read_bytes()  # every page in the page cache
    called: list[tuple[Path, int, int]] = []
    monkeypatch.setattr(CheckpointReader, "populate", lambda self, *where: called.append(where))
    load_checkpoint_in_model(_meta_llama(), index)
    assert called == []

    path = tmp_path / "cold.bin"
    path.write_bytes(os.urandom(16 * mmap.PAGESIZE))
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
        os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    if pages.cached(path, 0, 16 * mmap.PAGESIZE):
        pytest.skip("the page cache would not drop the file")
    path.read_bytes()
    assert pages.cached(path, mmap.PAGESIZE + 1, 3 * mmap.PAGESIZE)


def test_pieces_join_neighbours_and_cut_at_the_chunk() -> None:
    a, b = Path("a"), Path("b")
    uses = [[Extent(a, 0, 10)], [Extent(a, 10, 25)], [], [Extent(b, 0, 5), Extent(a, 100, 4)]]
    pieces, last = readahead._pieces(uses, chunk=16)
    assert pieces == [Extent(a, 0, 16), Extent(a, 16, 16), Extent(a, 32, 3), Extent(b, 0, 5), Extent(a, 100, 4)]
    assert last == [1, 3, 3, 5]


def test_asked_for_ranges_stay_within_the_window_and_errors_reach_the_consumer(tmp_path: Path) -> None:
    asked: list[tuple[int, int]] = []
    consumer = [0]
    lock = threading.Lock()
    size, count = mmap.PAGESIZE, 40
    window = 10 * size

    def read(path: Path, offset: int, nbytes: int) -> None:
        with lock:
            asked.append((consumer[0], offset + nbytes))
        if offset >= 30 * size:
            raise CheckpointError(f"{path}: gone")

    uses = [[Extent(tmp_path, i * size, size)] for i in range(count)]
    with ReadAhead(read, uses, window, threads=4, chunk_bytes=size) as ahead:
        with pytest.raises(CheckpointError, match="gone"):
            for i in range(count):
                with lock:
                    consumer[0] = i * size
                with_timeout(lambda: ahead.wait(i), 30)
        assert i == 30  # the first use whose piece failed
    assert max(end - start for start, end in asked) <= window
    assert max(end for _, end in asked) <= 30 * size + window


def _ra_bytes(path: Path) -> int | None:
    """The kernel's readahead window for the device holding `path` (page faults read this much around)."""
    device = os.stat(path).st_dev
    base = Path(f"/sys/dev/block/{os.major(device)}:{os.minor(device)}")
    for queue in (base / "queue", base / ".." / "queue"):
        if (queue / "read_ahead_kb").exists():
            return int((queue / "read_ahead_kb").read_text()) * 1024
    return None


def _resident_pages(path: Path) -> bytes:
    """One byte per page of `path`, nonzero where the page is in the page cache (`mincore`)."""
    with open(path, "rb") as handle:
        mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
    anchor = ctypes.c_char.from_buffer(mapping)
    vector = ctypes.create_string_buffer((len(mapping) + mmap.PAGESIZE - 1) // mmap.PAGESIZE)
    assert pages._mincore(ctypes.addressof(anchor), len(mapping), vector) == 0
    del anchor
    mapping.close()
    return vector.raw


@needs_populate
def test_pages_in_memory_never_run_more_than_the_window_ahead(tmp_path: Path) -> None:
    ra = _ra_bytes(tmp_path)
    if ra is None:
        pytest.skip("the readahead window of this filesystem's device is unknown")
    window, numel = 4 << 20, 1 << 19
    path = tmp_path / "model.safetensors"  # 48 tensors of 2 MiB: far more than the window and read-around
    save_file({f"t{i:02d}": torch.full((numel,), float(i)) for i in range(48)}, path)
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
        os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    if any(_resident_pages(path)):
        pytest.skip("the page cache would not drop the file")
    index = open_checkpoint(path)
    refs = sorted(index.tensors.values(), key=lambda ref: ref.offset)
    end = refs[-1].offset + refs[-1].nbytes
    # The kernel's fault read-around and its asynchronous follow-ups (one readahead state shared by the
    # threads, so they may race) add a few readahead windows beyond what was asked for.
    slack = 4 * ra + mmap.PAGESIZE
    if window + slack >= (end - refs[0].offset) // 2:
        pytest.skip(f"a readahead window of {ra} bytes leaves nothing to check in a {end}-byte file")
    with CheckpointReader(index) as reader, ReadAhead(
            reader.populate, [[Extent(ref.file, ref.offset, ref.nbytes)] for ref in refs], window,
            threads=4, chunk_bytes=512 << 10) as ahead:
        for i, ref in enumerate(refs):
            with_timeout(lambda: ahead.wait(i), 60)
            flags = _resident_pages(path)
            assert all(flags[ref.offset // mmap.PAGESIZE:(ref.offset + ref.nbytes) // mmap.PAGESIZE]), ref.name
            farthest = max(page for page, flag in enumerate(flags) if flag) * mmap.PAGESIZE
            assert farthest - ref.offset <= window + slack, (ref.name, farthest, ref.offset)
            assert torch.equal(reader.read(ref), torch.full((numel,), float(i)))


def test_a_file_shorter_than_its_header_claims_is_a_checkpoint_error(sharded: Path, tmp_path: Path) -> None:
    folder = tmp_path / "cut"
    folder.mkdir()
    for file in sharded.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    index = open_checkpoint(folder)
    victim = max(index.files, key=lambda f: f.stat().st_size)
    os.truncate(victim, victim.stat().st_size // 2)  # after its header was read: shorter than it claims
    with pytest.raises(CheckpointError, match=f"{victim.name} changed after it was indexed"):
        with_timeout(lambda: load_checkpoint_in_model(_meta_llama(), index), 60)
    # Below the load's check, the reading itself refuses bytes past the end, naming the file.
    with pytest.raises(CheckpointError, match=f"{victim.name}: a tensor needs bytes up to .* truncated"):
        MappedFiles().populate(victim, 0, victim.stat().st_size + 1)


@needs_populate
def test_a_file_that_shrinks_after_it_was_mapped_is_a_checkpoint_error(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(os.urandom(64 * mmap.PAGESIZE))
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
        os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # nothing cached past the new end
    files = MappedFiles()
    files.view(path, 0, torch.uint8, (1,))  # mapped now, at its full length (no page read)
    os.truncate(path, 8 * mmap.PAGESIZE)
    # With page faults this would be a SIGBUS, killing the process.
    start, end = 16 * mmap.PAGESIZE, 32 * mmap.PAGESIZE
    with pytest.raises(CheckpointError, match=f"{path.name}: reading bytes {start}..{end} failed .*truncated"):
        files.populate(path, 16 * mmap.PAGESIZE, 16 * mmap.PAGESIZE)
