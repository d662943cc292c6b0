"""A model split across torch.distributed ranks: the pure host split, stage-only checkpoint opening, and real
multi-process runs on 127.0.0.1 (gloo) compared token for token with single-process bigload."""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import bigload
from bigload.plan.budget import parse_max_memory
from bigload.formats.discover import open_checkpoint
from bigload.errors import CheckpointError, PlanError
from bigload.integrations.hf import meta_model_for_folder
from bigload.plan.hosts import HostPlan, plan_hosts, split_hosts
from bigload.plan.inventory import inventory_from_module, sub_inventory

from fixtures_hf import ARCHS, SHARD, build_model, write_model
from pipeline_worker import _generate

HERE = Path(__file__).parent
WORKER = HERE / "pipeline_worker.py"
ROOT = HERE.parent
TORCHRUN = Path(sys.executable).with_name("torchrun")


# ---------------------------------------------------------------------------------------------------------
# the pure split


@functools.lru_cache(maxsize=1)
def _catalog_inventory(name: str = "llama-3.1-8b") -> Any:
    from bigload.integrations.hf import inventory_for

    return inventory_for(name, dtype="bfloat16")


def test_split_is_contiguous_balanced_and_rank0_holds_the_ends() -> None:
    inventory = _catalog_inventory()
    split = split_hosts(inventory, [1, 1, 1])
    assert [s.first_layer for s in split.stages] == [0, split.stages[1].first_layer, split.stages[2].first_layer]
    assert [(a.end_layer, b.first_layer) for a, b in zip(split.stages, split.stages[1:])] == [
        (b.first_layer, b.first_layer) for b in split.stages[1:]]
    assert split.stages[-1].end_layer == 32
    assert set(split.ends) == {"model.embed_tokens", "model.norm", "lm_head"}
    assert set(split.ends) <= set(split.stages[0].blocks)
    assert all(not set(split.ends) & set(s.blocks) for s in split.stages[1:])
    assert all(s.shared == ("model.rotary_emb",) for s in split.stages)
    loads = [s.weight_bytes for s in split.stages]
    assert sum(loads) + inventory.size("model.rotary_emb") == inventory.total_bytes  # rotary: on every rank
    assert max(loads) == _best_max(inventory)  # the optimum, checked by brute force


def _best_max(inventory: Any) -> int:
    """The smallest possible largest share, by trying every pair of boundaries (3 hosts)."""
    sizes = [inventory.size(f"model.layers.{i}") for i in range(32)]
    ends = sum(inventory.size(n) for n in ("model.embed_tokens", "model.norm", "lm_head"))
    return min(max(ends + sum(sizes[:a]), sum(sizes[a:b]), sum(sizes[b:]))
               for a in range(1, 31) for b in range(a + 1, 32))


def test_split_follows_host_memory_and_explains_each_boundary() -> None:
    inventory = _catalog_inventory()
    big, small = parse_max_memory({"cpu": "40GiB"}), parse_max_memory({"cpu": "10GiB"})
    host_plan = plan_hosts(inventory, [big, small], dtype=inventory.dtype)
    first, second = host_plan.split.stages
    assert first.weight_bytes > 2 * second.weight_bytes  # four times the memory: the larger part
    text = host_plan.explain()
    assert f"rank 1 starts at model.layers.{second.first_layer}" in text
    assert "one block earlier" in text and "one block later" in text
    assert text.count("host ") >= 2
    assert HostPlan.from_json(host_plan.to_json()) == host_plan
    newer = {**json.loads(host_plan.to_json()), "version": 99}
    with pytest.raises(PlanError, match="^host plan JSON version 99 is not"):  # not re-wrapped as "not a host plan"
        HostPlan.from_json(json.dumps(newer))
    for stage, plan in zip(host_plan.split.stages, host_plan.plans):
        assert sum(u.weights for u in plan.usage) == stage.weight_bytes + inventory.size("model.rotary_emb")


def test_a_host_part_that_does_not_fit_names_the_host() -> None:
    inventory = _catalog_inventory()
    with pytest.raises(PlanError, match="host 1"):
        plan_hosts(inventory, [parse_max_memory({"cpu": "40GiB"}), parse_max_memory({"cpu": "100MiB"})],
                   dtype=inventory.dtype)


def test_more_hosts_than_blocks_is_refused() -> None:
    inventory = _catalog_inventory()
    with pytest.raises(PlanError, match="at most 32 hosts"):
        split_hosts(inventory, [1] * 33)


class SharedLayers(nn.Module):
    """Four blocks where blocks 1 and 2 share one weight (a tie inside the stack)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(4, 8)
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
        self.layers[2].weight = self.layers[1].weight
        self.head = nn.Linear(8, 4)


def test_a_tied_group_is_never_cut() -> None:
    inventory = inventory_from_module(SharedLayers())
    for hosts in (2, 3):
        split = split_hosts(inventory, [1] * hosts)
        assert all(s.first_layer != 2 for s in split.stages)
    with pytest.raises(PlanError, match="tied weights"):
        split_hosts(inventory, [1] * 4)


def test_sub_inventory_keeps_names_bytes_and_kv_layers() -> None:
    inventory = _catalog_inventory()
    part = sub_inventory(inventory, ["model.layers.3", "model.layers.4"])
    assert part.total_bytes == inventory.size("model.layers.3") + inventory.size("model.layers.4")
    assert part.names[:3] == ("", "model", "model.layers")
    assert part.kv is not None and part.kv.layers == ("model.layers.3", "model.layers.4")


def test_cli_plan_prints_one_table_per_host_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    done = subprocess.run(
        [sys.executable, "-m", "bigload", "plan", "llama-3.1-8b", "--hosts", "2", "--max-memory", "cpu=20GiB",
         "--max-memory-host", "1:cpu=10GiB", "--dtype", "bfloat16", "--json", str(out)],
        capture_output=True, text=True, timeout=240, env=_env(), cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "host 0:" in done.stdout and "host 1:" in done.stdout
    written = HostPlan.from_json(out.read_text())
    assert [p.usage_of("cpu").budget for p in written.plans] == [20 * 2**30, 10 * 2**30]


def test_cli_plan_over_hosts_refuses_quantize_with_the_fix() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bigload", "plan", "llama-3.1-8b", "--hosts", "2", "--max-memory", "cpu=20GiB",
         "--quantize", "int8"],
        capture_output=True, text=True, timeout=240, env=_env(), cwd=ROOT)
    assert done.returncode == 2, done.stderr
    assert "--quantize cannot be combined with --hosts" in done.stderr and "Traceback" not in done.stderr


# ---------------------------------------------------------------------------------------------------------
# a stage opens only its shards


def test_open_checkpoint_select_never_opens_other_shards(tmp_path: Path) -> None:
    folder = write_model(ARCHS["llama"], tmp_path / "llama")
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    mine = {name for name in weight_map if name.startswith("model.layers.2.")}
    needed = {weight_map[name] for name in mine}
    other = sorted(set(weight_map.values()) - needed)[0]
    (folder / other).write_bytes(b"\xff" * (folder / other).stat().st_size)  # unreadable if opened
    with pytest.raises(CheckpointError, match=rf"{re.escape(other)}: the header claims \d+ bytes"):  # the garbled shard
        open_checkpoint(folder)
    index = open_checkpoint(folder, select=mine.__contains__)
    assert set(index.tensors) == mine
    assert {p.name for p in index.files} == needed


# ---------------------------------------------------------------------------------------------------------
# real ranks


def _env() -> dict[str, str]:
    paths = [str(ROOT), str(HERE), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "OMP_NUM_THREADS": "1"}


def _run_ranks(folder: Path, world: int, scenario: str, out: Path, *, timeout: float = 240
               ) -> dict[int, dict[str, Any]]:
    """Run `world` ranks (forked by the worker after its imports, environment as torchrun sets it); return
    each rank's record, or the tail of the output for a rank that wrote none."""
    out.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, str(WORKER), str(folder), str(out), scenario, str(world)],
                          env=_env(), capture_output=True, text=True, timeout=timeout)
    records = {}
    for rank in range(world):
        path = out / f"rank-{rank}.json"
        records[rank] = json.loads(path.read_text()) if path.is_file() else {"log": done.stdout[-3000:] + done.stderr[-3000:]}
    return records


def _single_process(folder: Path) -> dict[str, Any]:
    model = bigload.from_pretrained(folder, progress=False)
    return _generate(model)


def _stage_bytes(folder: Path, world: int) -> tuple[list[int], list[set[str]]]:
    """Bytes and shard files of each rank's tensors, from the split every rank computes (equal budgets)."""
    model, target, _ = meta_model_for_folder(folder)
    split = split_hosts(inventory_from_module(model, dtype=target), [1] * world)
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    index = open_checkpoint(folder)
    sizes, files = [], []
    for stage in split.stages:
        names = [n for n in index.tensors if n.startswith(tuple(m + "." for m in stage.modules))]
        sizes.append(sum(index.tensors[n].nbytes for n in names))
        files.append({weight_map[n] for n in names})
    return sizes, files


@pytest.mark.parametrize("arch, world", [("llama", 2), ("gpt2", 3)])
def test_ranks_generate_the_single_process_tokens_and_read_only_their_stage(tmp_path: Path, arch: str,
                                                                            world: int) -> None:
    folder = write_model(ARCHS[arch], tmp_path / arch)
    records = _run_ranks(folder, world, "generate", tmp_path / "out")
    assert all("error" not in r and "log" not in r for r in records.values()), records
    expected = _single_process(folder)
    assert records[0]["batch1"] == expected["batch1"]
    assert records[0]["batch2"] == expected["batch2"]  # left padding: row 2 starts with 3 pads
    sizes, files = _stage_bytes(folder, world)
    loads = records[0]["loads"]
    assert [load["bytes_read"] for load in loads] == sizes
    assert sum(sizes) == open_checkpoint(folder).total_bytes  # every tensor loaded once, by one rank
    assert [set(load["files"]) for load in loads] == files
    all_shards = set(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert all(f < all_shards for f in files)  # no rank opened every shard
    assert records[0]["comm_per_token"] > 0
    assert "stopped" in records[0]["after_stop"]  # a stopped pipeline refuses to run, it does not hang


def test_a_killed_rank_stops_the_others_with_errors_naming_it(tmp_path: Path) -> None:
    folder = write_model(ARCHS["qwen2"], tmp_path / "qwen2")
    records = _run_ranks(folder, 3, "kill", tmp_path / "out", timeout=120)
    assert records[0]["batch1"] == _single_process(folder)["batch1"]  # before the kill: a third family
    assert "batch2" not in records[0]
    for rank in (0, 2):
        assert "rank 1" in records[rank]["error"], records[rank]
        assert records[rank]["error"].startswith("DistributedError")
    assert "log" in records[1]  # it died without writing anything


def test_a_hung_rank_times_out_on_rank_0(tmp_path: Path) -> None:
    folder = write_model(ARCHS["llama"], tmp_path / "llama")
    records = _run_ranks(folder, 2, "hang", tmp_path / "out", timeout=120)
    assert "rank 1" in records[0]["error"] and "no answer within 5 s" in records[0]["error"], records[0]


@pytest.mark.parametrize("scenario, world, why", [("rank0-dies", 3, "its connection closed"),
                                                  ("rank0-stops", 2, "no answer within 5 s")])
def test_rank_0_dying_or_stopped_stops_the_others_with_errors_naming_it(tmp_path: Path, scenario: str, world: int,
                                                                       why: str) -> None:
    """gloo's isend/irecv fail at once on a closed connection: inside the ERROR forwarding too."""
    folder = write_model(ARCHS["llama"], tmp_path / "llama")
    records = _run_ranks(folder, world, scenario, tmp_path / "out", timeout=120)
    assert "log" in records[0]  # it died or was killed while stopped, writing nothing
    for rank in range(1, world):
        error = records[rank].get("error", records[rank])
        assert str(error).startswith("DistributedError: ") and "rank 0" in error, records[rank]
    assert why in records[1]["error"]  # rank 1 saw it first; rank 2 hears it from rank 1


def test_a_rank_that_never_starts_is_named_within_the_timeout(tmp_path: Path) -> None:
    folder = write_model(ARCHS["llama"], tmp_path / "llama")
    records = _run_ranks(folder, 3, "missing-rank", tmp_path / "out", timeout=120)
    assert "log" in records[2]  # never started
    for rank in (0, 1):
        error = records[rank].get("error", records[rank])
        assert str(error).startswith("DistributedError: ") and "within 5 s" in error, records[rank]
        assert "WORLD_SIZE=3" in error and "start every rank" in error, error


def test_when_torch_counts_the_ranks_that_arrived_the_error_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where rank 0 hosts the rendezvous store (a launch by hand with MASTER_ADDR/PORT), torch's timeout says
    how many clients joined; the tests' launcher hosts the store itself, as torchrun's agent does, so this
    part is checked on torch's message here."""
    from bigload.distributed.startup import _start_failure

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    error = RuntimeError("Timed out after 5 seconds waiting for clients. 2/3 clients joined.")
    message = str(_start_failure(error, 5.0))
    assert "only 2 of 3 ranks arrived; start every rank" in message and "WORLD_SIZE=3" in message


def test_ranks_given_different_inputs_refuse_to_start(tmp_path: Path) -> None:
    folder = write_model(ARCHS["llama"], tmp_path / "llama")
    records = _run_ranks(folder, 2, "mismatch", tmp_path / "out", timeout=120)
    for rank in (0, 1):
        assert "rank 1's options differ from rank 0's" in records[rank]["error"], records[rank]


def test_ranks_given_other_weights_under_the_same_names_and_sizes_refuse_to_start(tmp_path: Path) -> None:
    folder = write_model(ARCHS["llama"], tmp_path / "llama")
    other = tmp_path / "llama-other"
    build_model(ARCHS["llama"], seed=1).save_pretrained(other, max_shard_size=SHARD)  # as write_model, seed 1
    assert (other / "config.json").read_text() == (folder / "config.json").read_text()
    listing = lambda root: sorted((p.name, p.stat().st_size) for p in root.iterdir())  # noqa: E731
    assert listing(other) == listing(folder)  # what the ranks compared before: names and sizes
    records = _run_ranks(folder, 2, "other-weights", tmp_path / "out", timeout=120)
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    for rank in (0, 1):
        error = records[rank].get("error", records[rank])
        assert str(error).startswith(f"DistributedError: rank 1's checkpoint data ({', '.join(shards[:3])} and "
                                     f"{len(shards) - 3} more) differ from rank 0's; "), records[rank]
        assert "same model folder" in error


def test_local_ranks_sharing_one_offload_folder_load_and_reload(tmp_path: Path) -> None:
    """Each rank's store lives in its own part of the folder; the second run reuses both unchanged."""
    folder = write_model(ARCHS["llama"], tmp_path / "llama")
    expected = _single_process(folder)
    offload = tmp_path / "offload"  # the worker's OUT/../offload
    first = _run_ranks(folder, 2, "shared-offload", tmp_path / "first")
    stamps = {p: p.stat().st_mtime_ns for p in offload.rglob("*")}
    second = _run_ranks(folder, 2, "shared-offload", tmp_path / "second")
    for records in (first, second):
        assert all("error" not in r and "log" not in r for r in records.values()), records
        assert (records[0]["batch1"], records[0]["batch2"]) == (expected["batch1"], expected["batch2"])
    assert sorted(p.name for p in offload.iterdir()) == ["rank-0", "rank-1"]
    stores = [bigload.DiskStore(offload / f"rank-{rank}") for rank in (0, 1)]
    assert stores[0].names and stores[1].names and not set(stores[0].names) & set(stores[1].names)
    assert {p: p.stat().st_mtime_ns for p in offload.rglob("*")} == stamps  # reused, not rewritten


def test_torchrun_bigload_generate_matches_one_process(tmp_path: Path) -> None:
    from bigload.cli.demo import write_demo_model
    from bigload.cli.session import GenerateOptions, run_generate

    folder = write_demo_model(tmp_path / "demo", "small")
    # --standalone: torchrun's rendezvous store binds a free port itself and the ranks join it (no port picked
    # free beforehand, which another process could take before torchrun binds it).
    done = subprocess.run(
        [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "--no-python", "bigload", "generate", str(folder),
         "--prompt", "The quick brown fox", "--max-new-tokens", "8", "--timeout", "60", "--json"],
        capture_output=True, text=True, timeout=300, env=_env(), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout[done.stdout.index("{"):])
    single = run_generate(folder, GenerateOptions("The quick brown fox", max_new_tokens=8), echo=None,
                          stream_text=False, progress=False)
    assert report["token_ids"] == single.token_ids
    assert [r["rank"] for r in report["ranks"]] == [0, 1]
    assert sum(r["bytes_read"] for r in report["ranks"]) == open_checkpoint(folder).total_bytes
    assert report["comm_seconds_per_token"] > 0


def test_hidden_states_cross_over_nccl_only_between_distinct_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed as dist

    from bigload.distributed.stage import entry_device
    from bigload.distributed.startup import choose_backend

    inventory = _catalog_inventory()
    gpu = parse_max_memory({0: "80GiB", "cpu": "64GiB"})
    host_plan = plan_hosts(inventory, [gpu, gpu], dtype=inventory.dtype)
    assert [entry_device(host_plan, rank).key for rank in (0, 1)] == [0, 0]
    monkeypatch.setattr(dist, "is_nccl_available", lambda: True)
    assert choose_backend(host_plan, ["a", "b"]) == "nccl"
    assert choose_backend(host_plan, ["a", "a"]) == "gloo"  # one GPU, two ranks: NCCL refuses it
    cpu = parse_max_memory({"cpu": "64GiB"})
    assert choose_backend(plan_hosts(inventory, [gpu, cpu], dtype=inventory.dtype), ["a", "b"]) == "gloo"
