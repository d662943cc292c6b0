"""Reliability under faults: a full disk, an interrupt, a killed process, a failing prefetch thread, and a
checkpoint that changes under a loader. After each, the offload folder is complete or recognisably
incomplete (no index.json), no temp file is left, the next load gives the reference model, nothing hangs.

Store-level versions of some of these are in `test_store.py` (ENOSPC in `put`, interrupted `with`) and
`test_hooks.py` (a failing source in the prefetch thread); these run the whole loader.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

import bigload.load.store_format as store_format
from bad_inputs.models import (
    DISK_MAP,
    INPUT,
    expected_output,
    folder_is_clean,
    meta_tiny,
    run_with_store,
    save_reference,
)
from bigload.formats.mapped import CheckpointReader
from bigload.formats.discover import open_checkpoint
from bigload.errors import CheckpointError, OffloadError
from bigload.load.store import DiskStore
from bigload.load.store_writer import StoreWriter
from bigload.integrations.loading import load_checkpoint_in_model
from timeouts import with_timeout

TESTS = Path(__file__).resolve().parent
F16 = torch.float16


@pytest.fixture()
def ckpt(tmp_path: Path) -> Path:
    return save_reference(tmp_path / "ckpt")


def load(ckpt: Path, folder: Path, **kwargs: Any):
    model = meta_tiny()
    result = load_checkpoint_in_model(model, ckpt, DISK_MAP, offload_folder=folder, dtype=F16, **kwargs)
    return model, result


def assert_rebuilds_correctly(ckpt: Path, folder: Path) -> None:
    """The next load after a fault gives the reference model and leaves a clean, committed folder."""
    model, result = load(ckpt, folder)
    assert (folder / "index.json").is_file()
    torch.testing.assert_close(run_with_store(model, result.store), expected_output(dtype=F16), rtol=0, atol=0)
    assert folder_is_clean(folder) == [], "files left over that the index does not account for"


def fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


# --- disk full ------------------------------------------------------------------------------------------


def _enospc_when(monkeypatch: pytest.MonkeyPatch, wanted: Callable[[str], bool], after: int = 0) -> list[str]:
    """Make store.py's low-level write fail with ENOSPC for the files `wanted` accepts, after `after` of them."""
    real_write = os.write
    seen: list[str] = []

    def write(fd: int, data: Any) -> int:
        path = fd_path(fd)
        if wanted(path):
            if path not in seen:
                seen.append(path)
            if len(seen) > after:
                real_write(fd, bytes(data[: len(data) // 2]))  # a partial write first, as a full disk does
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(store_format.os, "write", write)
    return seen


def test_disk_full_while_writing_tensors(tmp_path: Path, ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "offload"
    _enospc_when(monkeypatch, lambda path: path.endswith(".dat.bigload-tmp"), after=2)
    with pytest.raises(OffloadError, match=r"no space left in .*offload while writing '.*' \(.*free\)\. Free disk "
                                           r"space or choose an offload_folder on a larger disk"):
        load(ckpt, folder)
    assert not (folder / "index.json").exists(), "an index claims tensors that are not there"
    assert sorted(p.name for p in folder.iterdir()) == [], "temp or partial files were left behind"
    monkeypatch.undo()
    assert_rebuilds_correctly(ckpt, folder)


def test_disk_full_while_committing_the_index(tmp_path: Path, ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "offload"
    _enospc_when(monkeypatch, lambda path: path.endswith("index.json.bigload-tmp"))
    with pytest.raises(OffloadError, match=r"no space left in .*offload while writing 'index.json'"):
        load(ckpt, folder)
    assert not (folder / "index.json").exists()
    assert sorted(p.name for p in folder.iterdir()) == [], "a failed commit must leave an empty folder"
    monkeypatch.undo()
    assert_rebuilds_correctly(ckpt, folder)


# --- interrupts -----------------------------------------------------------------------------------------


def test_keyboard_interrupt_while_writing_the_store(tmp_path: Path, ckpt: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "offload"
    real_put = StoreWriter.put
    calls: list[str] = []

    def put(self: StoreWriter, name: str, tensor: torch.Tensor, **kwargs: Any) -> None:
        calls.append(name)
        if len(calls) == 3:
            raise KeyboardInterrupt("the test's interrupt")
        real_put(self, name, tensor, **kwargs)

    monkeypatch.setattr(StoreWriter, "put", put)
    with pytest.raises(KeyboardInterrupt, match="the test's interrupt"):  # propagated as raised
        with_timeout(lambda: load(ckpt, folder))
    assert len(calls) == 3
    assert sorted(p.name for p in folder.iterdir()) == []
    monkeypatch.undo()
    assert_rebuilds_correctly(ckpt, folder)


def test_keyboard_interrupt_in_the_reader_thread(tmp_path: Path, ckpt: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "offload"
    real_read = CheckpointReader.read
    calls: list[str] = []

    def read(self: CheckpointReader, ref: Any) -> torch.Tensor:
        calls.append(ref.name)
        if len(calls) == 4:
            raise KeyboardInterrupt("the test's interrupt")
        return real_read(self, ref)

    monkeypatch.setattr(CheckpointReader, "read", read)
    with pytest.raises(KeyboardInterrupt, match="the test's interrupt"):  # propagated as raised
        with_timeout(lambda: load(ckpt, folder, window_bytes=64))
    assert not (folder / "index.json").exists()
    assert folder_is_clean(folder) == []
    monkeypatch.undo()
    assert_rebuilds_correctly(ckpt, folder)


KILLED_LOADER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    import torch
    import bigload.load.store_writer as store
    from bad_inputs.models import DISK_MAP, meta_tiny
    from bigload.integrations.loading import load_checkpoint_in_model

    ckpt, folder, ready = map(Path, sys.argv[1:4])
    real = store.write_file
    count = [0]

    def write_file(path, payload):
        if path.name.endswith(".dat.bigload-tmp"):
            count[0] += 1
            if count[0] == 3:  # half of the third tensor is on disk when the kill comes
                data = b"".join(bytes(piece) for piece in payload)
                with open(path, "wb") as handle:
                    handle.write(data[: len(data) // 2])
                    handle.flush()
                    os.fsync(handle.fileno())
                ready.write_text("writing")
                time.sleep(120)
        return real(path, payload)

    store.write_file = write_file
    load_checkpoint_in_model(meta_tiny(), ckpt, DISK_MAP, offload_folder=folder, dtype=torch.float16)
    """
)


def test_loader_killed_mid_write_leaves_a_recognisably_incomplete_folder(tmp_path: Path, ckpt: Path) -> None:
    folder, ready = tmp_path / "offload", tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-c", KILLED_LOADER, str(ckpt), str(folder), str(ready)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert child.poll() is None, child.stdout.read().decode()  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the loader never reached the write"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert not (folder / "index.json").exists(), "a killed load left an index"
    assert any(p.name.endswith(".bigload-tmp") for p in folder.iterdir()), "the kill came mid-write"
    with pytest.raises(OffloadError, match=r"no offload store here \(index.json is missing\)"):
        DiskStore.open(folder)
    # The next load rebuilds the folder, leaving none of the dead process's partial files.
    assert_rebuilds_correctly(ckpt, folder)


# --- the prefetch thread --------------------------------------------------------------------------------


def test_prefetch_error_from_a_real_store_surfaces_in_forward(tmp_path: Path, ckpt: Path) -> None:
    from bigload.integrations.loading import load_checkpoint_and_dispatch

    folder = tmp_path / "offload"
    model = load_checkpoint_and_dispatch(meta_tiny(), ckpt, device_map=DISK_MAP, offload_folder=folder,
                                         dtype=F16)
    (folder / "layers.1.weight.dat").unlink()  # the disk goes away under a running model
    x = INPUT.to(F16)
    for _ in range(2):  # the failure repeats on the next call instead of hanging or passing silently
        with pytest.raises(OffloadError, match=r"block 'layers\.1'.*layers\.1\.weight\.dat.*missing") as caught:
            with_timeout(lambda: model(x))
        assert isinstance(caught.value.__cause__, OffloadError)


# --- a checkpoint that changes after it was indexed or planned ------------------------------------------


def _grow(path: Path) -> None:
    with open(path, "ab") as handle:
        handle.write(b"\0" * 64)


def _shrink(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-64])


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _delete(path: Path) -> None:
    path.unlink()


CHANGES = {"appended": _grow, "truncated": _shrink, "emptied": _empty, "deleted": _delete}


@pytest.mark.parametrize("change", list(CHANGES.values()), ids=list(CHANGES))
def test_checkpoint_changed_after_indexing_is_detected_on_read(ckpt: Path, change: Callable[[Path], None]) -> None:
    index = open_checkpoint(ckpt)
    last = list(index.tensors.values())[-1]
    change(ckpt)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*(changed|truncated|no such|missing).*"
                                              r"(again|Open)") as caught:
        CheckpointReader(index).read(last)
    assert "model.safetensors" in str(caught.value)


@pytest.mark.parametrize("change", list(CHANGES.values()), ids=list(CHANGES))
@pytest.mark.parametrize("device_map", [{"": "cpu"}, {"": "disk"}], ids=["cpu", "disk-references"])
def test_checkpoint_changed_after_indexing_is_detected_on_load(tmp_path: Path, ckpt: Path,
                                                               change: Callable[[Path], None],
                                                               device_map: dict[str, str]) -> None:
    """A plan and index made earlier, then the file changes: the load must not build a model (or a store
    of references) from bytes that are no longer what the header said."""
    index = open_checkpoint(ckpt)
    change(ckpt)
    folder = tmp_path / "offload"
    with pytest.raises(CheckpointError, match="model.safetensors"):
        with_timeout(lambda: load_checkpoint_in_model(meta_tiny(), index, device_map, offload_folder=folder))
    assert not (folder / "index.json").exists()
