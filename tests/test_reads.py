"""Explicit reads of disk blocks (`disk_reads="read"`): the same tokens and logits as in memory, O_DIRECT
where the filesystem allows and a fallback where it does not, the plan's reserve respected, the decision
taken from the budget, and a file truncated under a running model raising OffloadError instead of SIGBUS."""

from __future__ import annotations

import errno
import json
import mmap
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from bigload.integrations.loading import load_checkpoint_and_dispatch, plan_for_model
from bigload.errors import OffloadError, PlanError
from bigload.runtime import runtime_of
from bigload.plan.planner import Plan
from bigload.load import reads
from bigload.load.reads import BlockReader, Extent, layout
from bigload.plan.reserve import READ_ALIGN, DiskReads, choose_disk_reads, pinned_bytes, read_slot_bytes
from bigload.empty import init_empty_weights
from timeouts import with_timeout

LAYERS = 4
PROMPT = torch.tensor([[1, 17, 42, 99, 7, 3]])
NEW_TOKENS = 4
ALL_ON_DISK = {"model.embed_tokens": "cpu", **{f"model.layers.{i}": "disk" for i in range(LAYERS)},
               "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}


def _config():
    from transformers import LlamaConfig

    # Layers of 1.2 MB in bfloat16 (2.4 MB in float32): large enough for the aligned, O_DIRECT layout.
    return LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=LAYERS,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       bos_token_id=1, eos_token_id=None, pad_token_id=0)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[torch.dtype, Path]:
    """The same random Llama saved sharded in float32 and in bfloat16."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(_config())
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.1)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        folder = tmp_path_factory.mktemp(str(dtype).removeprefix("torch."))
        model.to(dtype).save_pretrained(folder, max_shard_size="3MB")
        out[dtype] = folder
    return out


def _empty():
    from transformers import LlamaForCausalLM

    with init_empty_weights():
        return LlamaForCausalLM(_config()).eval()


def _generate(model) -> tuple[torch.Tensor, torch.Tensor]:
    def run():
        with torch.no_grad():
            out = model.generate(PROMPT, attention_mask=torch.ones_like(PROMPT), max_new_tokens=NEW_TOKENS,
                                 do_sample=False, output_logits=True, return_dict_in_generate=True,
                                 pad_token_id=0)
        return out.sequences, torch.stack(out.logits)

    return with_timeout(run, 60)


def _reference(folder: Path, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import LlamaForCausalLM

    return _generate(LlamaForCausalLM.from_pretrained(folder, dtype=dtype).eval())


def _dispatch(folder: Path, offload: Path, dtype: torch.dtype, **kwargs):
    model = _empty()
    load_checkpoint_and_dispatch(model, folder, device_map=dict(ALL_ON_DISK), offload_folder=offload,
                                 dtype=dtype, progress=False, **kwargs)
    return model


# (checkpoint dtype, load dtype): the same dtype keeps references into the safetensors shards; a cast
# writes `.dat` files into the offload folder.
SOURCES = {
    "safetensors-float32": (torch.float32, torch.float32),
    "safetensors-bfloat16": (torch.bfloat16, torch.bfloat16),
    "dat-bfloat16": (torch.float32, torch.bfloat16),
}


@pytest.mark.parametrize("prefetch", [0, 1, 2])
@pytest.mark.parametrize("source", list(SOURCES))
def test_explicit_reads_generate_exactly_what_memory_does(checkpoints, tmp_path, source, prefetch):
    stored, dtype = SOURCES[source]
    offload = tmp_path / "offload"
    model = _dispatch(checkpoints[stored], offload, dtype, prefetch=prefetch, disk_reads="read")
    tokens, logits = _generate(model)
    ref_tokens, ref_logits = _reference(checkpoints[stored], dtype)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    stats = runtime_of(model).stats()
    assert stats.disk_reads == "read"
    assert stats.paths == {f"model.layers.{i}": "read (O_DIRECT)" for i in range(LAYERS)}  # the layout chosen
    read = set(offload.glob("*.dat")) if source.startswith("dat") else _shards_of_layers(checkpoints[stored],
                                                                                           range(LAYERS))
    # Every file goes through the page cache where the test folder's filesystem refuses O_DIRECT, none elsewhere.
    refused = not _takes_o_direct(next(iter(read)).parent)
    assert set(stats.buffered_files) == ({str(path) for path in read} if refused else set())
    assert any(offload.glob("*.dat")) is source.startswith("dat")
    assert stats.peak_bytes_held <= stats.reserve_bytes and stats.buffer_bytes <= stats.reserve_bytes
    assert stats.sync_loads == (LAYERS * NEW_TOKENS if prefetch == 0 else 1)  # prefetched in time or not at all
    assert model.model.layers[1].mlp.up_proj.weight.device.type == "meta"  # released between forwards


def test_filesystem_refusing_o_direct_is_read_through_the_page_cache(checkpoints, tmp_path, monkeypatch):
    """tmpfs before Linux 6.6, some network filesystems: open(O_DIRECT) fails with EINVAL."""
    real_open = os.open

    def refusing_open(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(reads.os, "open", refusing_open)
    folder = checkpoints[torch.bfloat16]
    model = _dispatch(folder, tmp_path / "offload", torch.bfloat16, disk_reads="read")
    tokens, logits = _generate(model)
    ref_tokens, ref_logits = _reference(folder, torch.bfloat16)
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    stats = runtime_of(model).stats()
    assert set(stats.buffered_files) == {str(path) for path in _shards_of_layers(folder, range(LAYERS))}


def _takes_o_direct(folder: Path) -> bool:
    """Whether files in `folder` can be read with O_DIRECT: tmpfs before Linux 6.6 and some network filesystems
    refuse it (EINVAL), on open or on the first read, and the reader then falls back to buffered reads."""
    probe = folder / "o_direct.probe"
    probe.write_bytes(bytes(READ_ALIGN))
    try:
        fd = os.open(probe, os.O_RDONLY | os.O_DIRECT)
        try:
            os.preadv(fd, [mmap.mmap(-1, READ_ALIGN)], 0)  # an anonymous map is page-aligned
        finally:
            os.close(fd)
    except OSError as error:
        if error.errno != errno.EINVAL:
            raise
        return False
    finally:
        probe.unlink()
    return True


def _anonymous(nbytes: int) -> torch.Tensor:
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=torch.uint8)


def test_layout_reads_tensors_at_any_offset(tmp_path):
    """Tensors at page-unaligned offsets are read aligned (O_DIRECT); one not aligned to its own element
    width makes the block packed (buffered reads); both give the bytes of the file."""
    data = bytes(range(256)) * 200  # 51,200 bytes
    path = tmp_path / "blob"
    path.write_bytes(data)
    cases = {
        "aligned runs": [Extent(path, 8, 4096), Extent(path, 4104, 6000), Extent(path, 40_000, 10)],
        "unaligned for float32": [Extent(path, 8, 4096), Extent(path, 4106, 6000), Extent(path, 40_001, 12)],
    }
    widths = [4, 4, 1]
    reader = BlockReader(readers=3, chunk_bytes=READ_ALIGN)  # several pieces per run, read at once
    try:
        for name, extents in cases.items():
            packed = [0, 4096, 10_096]
            plan = layout(extents, widths, packed, 64 * 1024)
            assert plan.direct is (name == "aligned runs")
            if plan.direct:
                assert len(plan.runs) == 2  # the first two tensors touch: one run
                assert all(run.start % READ_ALIGN == 0 and run.into % READ_ALIGN == 0 for run in plan.runs)
            buffer = _anonymous(64 * 1024)
            reader.read(plan, buffer)
            for extent, at in zip(extents, plan.offsets):
                assert bytes(buffer[at: at + extent.nbytes].numpy()) == data[extent.offset: extent.offset + extent.nbytes]
        # Aligned runs that do not fit the slot rounded out fall back to the packed layout.
        assert not layout(cases["aligned runs"], widths, [0, 4096, 10_096], 10_106).direct
    finally:
        reader.close()


def test_a_short_file_is_an_offload_error(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(b"x" * 5000)
    reader = BlockReader()
    try:
        plan = layout([Extent(path, 4096, 8192)], [1], [0], 16_384)
        with pytest.raises(OffloadError, match="truncated"):
            reader.read(plan, _anonymous(16_384))
        with pytest.raises(OffloadError, match="cannot open"):
            reader.read(layout([Extent(tmp_path / "gone", 0, 10)], [1], [0], 16_384), _anonymous(16_384))
    finally:
        reader.close()


def test_reads_of_several_blocks_in_flight_land_exactly_and_report_errors_after_every_piece(tmp_path):
    """`BlockReader.start` returns at once; two blocks queued together (as the prefetcher queues the next one
    while the last pieces of the previous land) each get their own bytes, and a failing block's error is
    reported only once none of its pieces still writes into the buffer."""
    data = os.urandom(6 * READ_ALIGN)
    path = tmp_path / "blob"
    path.write_bytes(data)
    reader = BlockReader(readers=2, chunk_bytes=READ_ALIGN)  # several pieces per block, from two threads
    try:
        first = layout([Extent(path, 0, 3 * READ_ALIGN)], [1], [0], 4 * READ_ALIGN)
        second = layout([Extent(path, 3 * READ_ALIGN, 3 * READ_ALIGN)], [1], [0], 4 * READ_ALIGN)
        buffers = [_anonymous(4 * READ_ALIGN), _anonymous(4 * READ_ALIGN)]
        pending = [reader.start(first, buffers[0]), reader.start(second, buffers[1])]
        for read in pending:
            read.wait(timeout=60)
        assert bytes(buffers[0][: 3 * READ_ALIGN].numpy()) == data[: 3 * READ_ALIGN]
        assert bytes(buffers[1][: 3 * READ_ALIGN].numpy()) == data[3 * READ_ALIGN:]
        # A block needing bytes past the end: its first pieces succeed, the last fails; the error waits for all.
        short = layout([Extent(path, 3 * READ_ALIGN, 4 * READ_ALIGN)], [1], [0], 4 * READ_ALIGN)
        failing = reader.start(short, _anonymous(4 * READ_ALIGN), what="block 'late'")
        with pytest.raises(OffloadError, match="truncated"):
            failing.wait(timeout=60)
        assert all(piece.done() for piece in failing._pieces)
    finally:
        reader.close()


def _shards_of_layers(folder: Path, layers: range) -> set[Path]:
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    return {folder / file for name, file in weight_map.items()
            if any(name.startswith(f"model.layers.{i}.") for i in layers)}


@pytest.mark.parametrize("what", ["store .dat file", "checkpoint shard"])
def test_file_truncated_between_generate_calls_raises_offload_error(checkpoints, tmp_path, what):
    stored = torch.float32 if what == "store .dat file" else torch.bfloat16
    folder = shutil.copytree(checkpoints[stored], tmp_path / "ckpt")
    offload = tmp_path / "offload"
    # materialize: CPU-placed tensors in private memory, so only disk blocks read the files afterwards.
    model = _dispatch(folder, offload, torch.bfloat16, disk_reads="read", materialize=True)
    first = _generate(model)[0]
    victims = (sorted(offload.glob("model.layers.2.*.dat")) if what == "store .dat file"
               else sorted(_shards_of_layers(folder, range(2, LAYERS)) - _shards_of_layers(folder, range(0, 2))))
    assert victims
    for victim in victims:
        os.truncate(victim, victim.stat().st_size // 2)
    with pytest.raises(OffloadError, match="truncated"):
        _generate(model)
    assert first.shape[1] == PROMPT.shape[1] + NEW_TOKENS


# A file truncated under a model reading it through mappings (`disk_reads="mapped"`, the default while the disk
# blocks fit in memory; CPU weights as views of the checkpoint). Without the check before each block, the next
# access to a page past the new end is SIGBUS, which kills the process: so the model runs in a child process.
TRUNCATED = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path
    import torch
    from bigload.errors import BigloadError
    from bigload.integrations.loading import load_checkpoint_and_dispatch
    from test_reads import _empty, _generate, _shards_of_layers, LAYERS

    folder, offload, what = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    cpu_layers = range(2, LAYERS) if what == "checkpoint shard under a cpu layer" else range(0)
    device_map = {"model.embed_tokens": "cpu", **{f"model.layers.{i}": "cpu" if i in cpu_layers else "disk"
                                                   for i in range(LAYERS)},
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    model = _empty()
    dtype = torch.bfloat16
    load_checkpoint_and_dispatch(model, folder, device_map=device_map, offload_folder=offload, dtype=dtype,
                                 progress=False, disk_reads="mapped", materialize=not cpu_layers)
    first = _generate(model)[0]
    victims = (sorted(offload.glob("model.layers.2.*.dat")) if what == "store .dat file"
               else sorted(_shards_of_layers(folder, range(2, LAYERS)) - _shards_of_layers(folder, range(0, 2))))
    assert victims and first.shape[1] > 0
    for victim in victims:
        os.truncate(victim, victim.stat().st_size // 2)
    try:
        _generate(model)
        print(json.dumps({"error": None}))
    except BigloadError as error:
        print(json.dumps({"error": type(error).__name__, "message": str(error),
                          "victims": [str(victim) for victim in victims]}))
    """
)


@pytest.mark.parametrize("what, error", [("store .dat file", "OffloadError"),
                                         ("checkpoint shard under a disk layer", "OffloadError"),
                                         ("checkpoint shard under a cpu layer", "CheckpointError")])
def test_file_truncated_under_a_mapped_model_raises_instead_of_sigbus(checkpoints, tmp_path, what, error):
    stored = torch.float32 if what == "store .dat file" else torch.bfloat16  # float32 -> bfloat16 writes .dat files
    folder = shutil.copytree(checkpoints[stored], tmp_path / "ckpt")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", TRUNCATED, str(folder), str(tmp_path / "offload"), what], env=env,
                          capture_output=True, timeout=300)
    assert done.returncode == 0, f"exit {done.returncode} (-7 is SIGBUS): {done.stderr.decode()[-2000:]}"
    outcome = json.loads(done.stdout.decode().strip().splitlines()[-1])
    assert outcome["error"] == error, outcome
    assert any(victim in outcome["message"] for victim in outcome["victims"]), outcome["message"]
    assert "truncated" in outcome["message"] and "load the model again" in outcome["message"].lower()


def test_plan_decides_the_path_from_the_cpu_memory_left(checkpoints):
    """A plan sends blocks to disk only once the CPU budget is full, so the page cache has no room for them:
    they are read. Asked otherwise, the plan maps them; explain() says which and why."""
    budget = {"cpu": "3MiB", "disk": "1GiB"}
    for requested, expected in ((None, "read"), ("mapped", "mapped"), ("read", "read")):
        plan = plan_for_model(_empty(), "sequential", max_memory=budget, dtype=torch.bfloat16,
                              no_split_module_classes=["LlamaDecoderLayer"], disk_reads=requested)
        assert "disk" in plan.device_map.values() and plan.slots.reads is DiskReads(expected)
        layer = next(p.weights for p in plan.placements if p.name == "model.layers.0")
        assert plan.slots.nbytes == read_slot_bytes(layer, plan.slots.reads)
        assert plan.slots.nbytes > layer if expected == "read" else plan.slots.nbytes == layer
        assert plan.usage_of("cpu").reserve >= plan.slots.total and plan.usage_of("cpu").free >= 0  # + buffers
        words = "as requested" if requested else "exceed the CPU memory"
        assert any(words in reason and "model.layers.0-3" in reason for reason in plan.reasons)
        assert words in plan.explain()
        assert Plan.from_json(plan.to_json()).slots == plan.slots
    with pytest.raises(PlanError, match="disk_reads='sometimes'"):
        plan_for_model(_empty(), "sequential", max_memory=budget, disk_reads="sometimes")


def test_the_rule_compares_disk_bytes_with_the_memory_left():
    assert choose_disk_reads(6 * 2**30, 8 * 2**30)[0] is DiskReads.MAPPED
    assert choose_disk_reads(6 * 2**30, 3 * 2**30)[0] is DiskReads.READ
    assert choose_disk_reads(1, -5)[0] is DiskReads.READ  # a CPU budget already overdrawn


@pytest.mark.parametrize("cpu, expected", [("2MiB", "read"), ("64GiB", "mapped")])
def test_dict_map_decides_the_path_from_max_memory(checkpoints, tmp_path, cpu, expected):
    model = _dispatch(checkpoints[torch.bfloat16], tmp_path / "offload", torch.bfloat16, max_memory={"cpu": cpu})
    stats = runtime_of(model).stats()
    ref_tokens, _ = _reference(checkpoints[torch.bfloat16], torch.bfloat16)
    assert torch.equal(_generate(model)[0], ref_tokens)
    assert stats.disk_reads == expected
    paths = set(runtime_of(model).stats().paths.values())
    assert paths == ({"read (O_DIRECT)"} if expected == "read" else {"mapped (in place)"})


def test_planned_load_holds_no_more_than_the_plan_reserves(checkpoints, tmp_path):
    model = _empty()
    load_checkpoint_and_dispatch(model, checkpoints[torch.bfloat16], device_map="sequential",
                                 max_memory={"cpu": "4MiB", "disk": "1GiB"}, offload_folder=tmp_path / "off",
                                 dtype=torch.bfloat16, no_split_module_classes=["LlamaDecoderLayer"],
                                 progress=False)
    plan = model.bigload_plan
    assert plan.slots.reads is DiskReads.READ
    ref_tokens, _ = _reference(checkpoints[torch.bfloat16], torch.bfloat16)
    assert torch.equal(_generate(model)[0], ref_tokens)
    stats = runtime_of(model).stats()
    assert stats.reserve_bytes == plan.slots.total
    assert stats.reserve_bytes + stats.resident_buffer_bytes == plan.usage_of(plan.main_device).reserve
    assert stats.buffer_bytes <= stats.reserve_bytes and stats.peak_bytes_held <= stats.reserve_bytes
    assert set(stats.paths.values()) == {"read (O_DIRECT)"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_explicit_reads_into_pinned_staging_for_the_gpu(checkpoints, tmp_path, prefetch):
    """Disk layers read into the slots' pinned staging buffers, then copied to the GPU: the same tokens as
    the model on the GPU in memory."""
    from transformers import LlamaForCausalLM

    folder = checkpoints[torch.bfloat16]
    device_map = {key: (0 if value == "cpu" else value) for key, value in ALL_ON_DISK.items()}
    model = _empty()
    load_checkpoint_and_dispatch(model, folder, device_map=device_map, offload_folder=tmp_path / "off",
                                 dtype=torch.bfloat16, prefetch=prefetch, disk_reads="read", progress=False)
    reference = LlamaForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval().to("cuda:0")
    ids = PROMPT.to("cuda:0")
    with torch.no_grad():
        kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        out = with_timeout(lambda: model.generate(ids, **kwargs), 120)
        assert torch.equal(out, reference.generate(ids, **kwargs))
    stats = runtime_of(model).stats()
    assert set(stats.paths.values()) <= {"read (O_DIRECT)", "read (buffered)"} and len(stats.paths) == LAYERS
    slot = stats.reserve_bytes // stats.buffers  # one pinned staging buffer per slot, as torch pins it
    assert stats.staging_bytes == stats.buffers * pinned_bytes(slot) and stats.peak_bytes_held <= stats.reserve_bytes
