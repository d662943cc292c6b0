"""Budgets: parsing and validating max_memory, probing this machine, refusing GPUs that do not exist."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bigload.plan import budget as budget_module
from bigload.plan.budget import check_devices_exist, detect_budget, disk_free_space, parse_max_memory
from bigload.devices import CPU, DISK, Budget, Device
from bigload.errors import BudgetError, DeviceError

GiB = 2**30


def test_binary_and_decimal_units_and_ints():
    parsed = parse_max_memory({0: "24GiB", "cuda:1": "24GB", "cpu": 1000, "disk": "1.5TiB"})
    assert parsed.get(0) == 24 * GiB
    assert parsed.get(1) == 24 * 10**9
    assert parsed.get("cpu") == 1000
    assert parsed.get("disk") == int(1.5 * 2**40)
    assert parsed.devices == (Device.parse(0), Device.parse(1), CPU, DISK)  # placement order


def test_string_gpu_index_is_a_gpu():
    assert parse_max_memory({"0": "1GiB"}).gpus == (Device.parse(0),)


@pytest.mark.parametrize("max_memory, error, match", [
    ({0: "24 GiBs"}, BudgetError, r"max_memory\[0\]: cannot read '24 GiBs'"),
    ({"cpu": "-4GiB"}, BudgetError, r"max_memory\['cpu'\]: .* is negative"),
    ({"cpu": -1}, BudgetError, "negative"),
    ({"cpu": True}, BudgetError, "not a size"),
    ({"mps": "8GiB"}, DeviceError, "max_memory key 'mps' names no device"),
    ({"gpu0": "8GiB"}, DeviceError, "'gpu0' names no device"),
    ({-1: "8GiB"}, DeviceError, "-1 names no device"),
    ({0: "1GiB", "cuda:0": "2GiB"}, BudgetError, r"names cuda:0 twice \(0 and 'cuda:0'\)"),
    ({}, BudgetError, "max_memory is empty"),
    ([("cpu", 1)], BudgetError, "must be a dict"),
])
def test_bad_max_memory(max_memory, error, match):
    with pytest.raises(error, match=match):
        parse_max_memory(max_memory)


def test_dry_run_accepts_gpus_this_machine_does_not_have():
    planned = detect_budget({7: "80GiB", "cpu": "1TiB"})
    assert planned.get(7) == 80 * GiB


def test_loading_onto_a_missing_gpu_is_a_device_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_devices_exist([0, 1, "cpu", "disk"])
    with pytest.raises(DeviceError, match=r"cuda:3 does not exist on this machine \(2 CUDA device"):
        check_devices_exist(Budget.of({0: 1, 3: 1}))
    with pytest.raises(DeviceError, match="unknown device 'tpu'"):
        check_devices_exist(["tpu"])


def test_cpu_and_disk_only_need_no_gpu():
    check_devices_exist(["cpu", "disk", Device.parse("cpu")])


def test_probing_without_max_memory(monkeypatch):
    monkeypatch.setattr(budget_module, "gpu_free_memory", lambda: {0: 10 * GiB, 1: 20 * GiB})
    monkeypatch.setattr(budget_module, "cpu_available_memory", lambda: 64 * GiB)
    probed = detect_budget()
    assert probed.as_max_memory() == {0: 10 * GiB, 1: 20 * GiB, "cpu": 64 * GiB}


def test_gpu_probe_reads_free_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda index: ((index + 1) * GiB, 80 * GiB))
    assert budget_module.gpu_free_memory() == {0: GiB, 1: 2 * GiB}


def test_real_cpu_probe_is_positive():
    assert budget_module.cpu_available_memory() > 0
    assert detect_budget().get("cpu") > 0


def test_offload_folder_adds_its_free_space_as_disk(tmp_path):
    folder = tmp_path / "not" / "yet" / "there"
    with_disk = detect_budget({"cpu": "1GiB"}, offload_folder=folder)
    assert with_disk.get("disk") == disk_free_space(tmp_path) > 0
    explicit = detect_budget({"cpu": "1GiB", "disk": "5GiB"}, offload_folder=folder)
    assert explicit.get("disk") == 5 * GiB  # the user's figure wins


# --------------------------------------------------------------------------------------------------
# cgroup limits: fake v1 and v2 trees, then a real v1 cgroup where the machine allows one

def _fake_proc(tmp_path, cgroup_lines, mounts):
    """A fake /proc/self: `cgroup` lines and a `mountinfo` with (root, mount point, fstype, options)."""
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "cgroup").write_text("\n".join(cgroup_lines) + "\n")
    info = [f"{30 + i} 23 0:{40 + i} {root} {point} rw,relatime - {fstype} cgroup rw,{options}"
            for i, (root, point, fstype, options) in enumerate(mounts)]
    (proc / "mountinfo").write_text("\n".join(info) + "\n")
    return proc


def _write(folder, **files):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name.replace("_", ".", 1)).write_text(text)


def test_cgroup_v2_limit_minus_usage_and_reclaimable_cache(tmp_path):
    mount = tmp_path / "unified"
    _write(mount / "job" / "step", memory_max="max\n", memory_current="100\n")
    _write(mount / "job", memory_max=f"{3 * GiB}\n", memory_current=f"{GiB}\n",
           memory_stat=f"anon 1\ninactive_file {GiB // 4}\nactive_file 7\n")
    proc = _fake_proc(tmp_path, ["0::/job/step"], [("/", mount, "cgroup2", "")])
    limit = budget_module.cgroup_memory_limit(proc)
    assert limit.version == 2 and limit.path == mount / "job"  # the ancestor binds; "max" is no limit
    assert limit.available == 3 * GiB - (GiB - GiB // 4)


def test_cgroup_v2_unlimited_everywhere_is_none(tmp_path):
    mount = tmp_path / "unified"
    _write(mount / "a", memory_max="max\n", memory_current="5\n")
    proc = _fake_proc(tmp_path, ["0::/a"], [("/", mount, "cgroup2", "")])
    assert budget_module.cgroup_memory_limit(proc) is None


def test_cgroup_v1_memory_controller_with_namespaced_mount_root(tmp_path):
    # A container sees its own cgroup (/docker/abc) mounted as the root of /sys/fs/cgroup/memory.
    mount = tmp_path / "memory"
    _write(mount, memory_limit_in_bytes=f"{2 * GiB}\n", memory_usage_in_bytes=f"{GiB // 2}\n",
           memory_stat="cache 9\ntotal_inactive_file 0\n")
    _write(mount / "inner", memory_limit_in_bytes="9223372036854771712\n", memory_usage_in_bytes="1\n")
    proc = _fake_proc(tmp_path, ["9:pids:/docker/abc", "4:memory:/docker/abc/inner", "0::/"],
                      [("/", tmp_path / "pids", "cgroup", "pids"),
                       ("/docker/abc", mount, "cgroup", "memory"),
                       ("/", tmp_path / "unified", "cgroup2", "")])
    limit = budget_module.cgroup_memory_limit(proc)
    assert (limit.version, limit.path, limit.limit, limit.usage) == (1, mount, 2 * GiB, GiB // 2)
    assert limit.available == 2 * GiB - GiB // 2


def test_no_cgroup_files_is_none(tmp_path):
    assert budget_module.cgroup_memory_limit(tmp_path / "nothing") is None
    proc = _fake_proc(tmp_path, ["4:memory:/gone"], [("/", tmp_path / "memory", "cgroup", "memory")])
    assert budget_module.cgroup_memory_limit(proc) is None  # folders that do not exist: no limit


def test_cpu_budget_is_the_smaller_of_cgroup_room_and_host(tmp_path, monkeypatch):
    mount = tmp_path / "unified"
    _write(mount / "job", memory_max=f"{3 * GiB}\n", memory_current=f"{GiB}\n")
    proc = _fake_proc(tmp_path, ["0::/job"], [("/", mount, "cgroup2", "")])
    monkeypatch.setattr(budget_module, "cpu_available_memory", lambda: 24 * GiB)
    nbytes, source = budget_module.cpu_memory_budget(proc)
    assert nbytes == 2 * GiB
    assert source.startswith(f"cgroup v2 limit 3.00 GiB at {mount / 'job'}, 1.00 GiB in use")
    monkeypatch.setattr(budget_module, "cpu_available_memory", lambda: GiB)
    assert budget_module.cpu_memory_budget(proc) == (GiB, f"psutil available memory (below the cgroup v2 limit "
                                                           f"3.00 GiB at {mount / 'job'})")


def test_explain_states_where_the_cpu_budget_came_from(monkeypatch):
    from bigload.plan.inventory import inventory_from_module
    from bigload.plan.planner import plan
    from tests.fixtures_models import ThreeBlocks

    monkeypatch.setattr(budget_module, "gpu_free_memory", lambda: {})
    monkeypatch.setattr(budget_module, "cpu_memory_budget", lambda: (GiB, "cgroup v1 limit 1.00 GiB at /x"))
    result = plan(inventory_from_module(ThreeBlocks()), detect_budget())
    assert "why: budgets: cpu 1.00 GiB from cgroup v1 limit 1.00 GiB at /x." in result.explain()
    given = plan(inventory_from_module(ThreeBlocks()), detect_budget({"cpu": "2GiB"}))
    assert "budgets: cpu 2.00 GiB from max_memory." in given.reasons
    both = plan(inventory_from_module(ThreeBlocks()), detect_budget({"cpu": "2GiB", "disk": "9GiB"}))
    assert "budgets: cpu, disk from max_memory." in both.reasons


_PROBE = ("import json; from bigload.plan.budget import detect_budget; b = detect_budget(); "
          "print(json.dumps([b.get('cpu'), b.source_of('cpu')]))")


def _own_memory_cgroup() -> Path:
    """This process's v1 memory cgroup folder, or a skip saying why there is none to make a child in."""
    if os.geteuid() != 0:
        pytest.skip("creating a memory cgroup needs root")
    root = Path("/sys/fs/cgroup/memory")
    group = budget_module._process_cgroups(Path("/proc/self/cgroup")).get(1)
    if group is None or not (root / "memory.limit_in_bytes").exists():
        pytest.skip("no cgroup v1 memory controller at /sys/fs/cgroup/memory")
    own = root / group.lstrip("/")
    if not own.is_dir():
        pytest.skip(f"this process's memory cgroup {group} is not visible under {root}")
    return own


def test_probe_inside_a_real_memory_cgroup_sees_its_limit():
    own = _own_memory_cgroup()
    child = own / f"bigload-test-{os.getpid()}"
    try:
        child.mkdir()
        (child / "memory.limit_in_bytes").write_text(str(GiB))
    except OSError as error:
        if child.exists():
            child.rmdir()
        pytest.skip(f"cannot create a memory cgroup under {own}: {error}")
    try:
        tasks = str(child / "cgroup.procs")
        out = subprocess.run(
            [sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120, check=True,
            # The child joins the cgroup before exec, so everything the probe allocates is charged there.
            preexec_fn=lambda: Path(tasks).write_text(str(os.getpid())),
        )
        cpu, source = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        child.rmdir()
    assert 0 < cpu < GiB  # the limit minus what the interpreter uses, not the host's memory
    assert source.startswith(f"cgroup v1 limit 1.00 GiB at {child},"), source
    assert not child.exists()


# --------------------------------------------------------------------------------------------------
# A CPU budget the user gives, above what the memory cgroup leaves: refused when loading

def _cgroup_of(tmp_path, limit, usage, inactive=0):
    mount = tmp_path / "unified"
    _write(mount / "job", memory_max=f"{limit}\n", memory_current=f"{usage}\n",
           memory_stat=f"inactive_file {inactive}\n")
    return _fake_proc(tmp_path, ["0::/job"], [("/", mount, "cgroup2", "")]), mount / "job"


def test_a_cpu_budget_above_the_cgroup_room_is_refused_naming_both(tmp_path):
    from bigload.messages import Audience

    MiB = 2**20
    proc, group = _cgroup_of(tmp_path, 450 * MiB, 200 * MiB, inactive=10 * MiB)  # room: 260 MiB
    with pytest.raises(BudgetError) as caught:
        budget_module.check_cgroup_room(parse_max_memory({"cpu": "1GiB", "disk": "9GiB"}), proc)
    assert str(caught.value) == (
        f"max_memory['cpu'] (1.00 GiB) is more than this process may use: its memory cgroup (v2, {group}) is "
        "limited to 450.00 MiB, 190.00 MiB of it in use, which leaves 260.00 MiB. A plan for more ends in an OOM "
        "kill, or in minutes of re-reading weights the kernel evicts. Give at most that, e.g. "
        "max_memory={..., 'cpu': '260MiB'} with the rest on disk, or leave cpu out of max_memory to plan with "
        "what the container leaves.")
    cli = caught.value.render(Audience.CLI)
    assert cli.startswith("--max-memory cpu=1.00GiB is more than") and "e.g. --max-memory cpu=260MiB,..." in cli
    for fits in ({"cpu": 260 * MiB}, {"cpu": "200MiB", 0: "80GiB", "disk": "1TiB"}, {0: "80GiB"}, {"disk": "1TiB"}):
        budget_module.check_cgroup_room(parse_max_memory(fits), proc)
    budget_module.check_cgroup_room(parse_max_memory({"cpu": "1TiB"}), tmp_path / "no-cgroup")  # no limit: no check


def test_loading_checks_the_cgroup_and_a_dry_run_does_not(tmp_path, monkeypatch):
    import bigload
    from tests.fixtures_hf import ARCHS, write_model

    folder = write_model(ARCHS["llama"], tmp_path / "llama")
    proc, _ = _cgroup_of(tmp_path, 450 * 2**20, 200 * 2**20)
    real = budget_module.cgroup_memory_limit
    monkeypatch.setattr(budget_module, "cgroup_memory_limit", lambda proc_=None: real(proc))
    budget = {"cpu": "1GiB", "disk": "1GiB"}
    assert bigload.plan_model(folder, max_memory=budget).device_map == {"": "cpu"}  # planning for any machine
    with pytest.raises(BudgetError, match=r"max_memory\['cpu'\] \(1.00 GiB\) is more than this process may use"):
        bigload.from_pretrained(folder, max_memory=budget, offload_folder=tmp_path / "offload", progress=False)
    assert not (tmp_path / "offload").exists()
    model = bigload.from_pretrained(folder, max_memory={"cpu": "200MiB"}, progress=False)  # within the room
    assert model.bigload_plan.device_map == {"": "cpu"}


def test_inside_a_real_450_mib_memory_cgroup_a_1_gib_budget_is_refused(tmp_path):
    """The issue's case, as a person meets it: `bigload generate` in a container (the Python entry points take
    the same check, tested above with a fake cgroup; each process here is slow, the page cache being small)."""
    from benchmarks.cgroup import MemoryCgroup, unavailable
    from bigload.cli.demo import write_demo_model

    why = unavailable()
    if why is not None:
        pytest.skip(why)
    folder = write_demo_model(tmp_path / "small", "small")  # with a tokenizer, for the CLI
    try:
        group = MemoryCgroup.create(f"bigload-test-{os.getpid()}", 450 * 2**20)
    except OSError as error:
        pytest.skip(f"cannot create a memory cgroup here: {error}")
    procs = group.path / "cgroup.procs"
    try:  # the child joins the cgroup before exec: everything it allocates is charged there
        cli = subprocess.run([sys.executable, "-m", "bigload", "generate", str(folder), "--prompt", "Hi",
                              "--max-new-tokens", "2", "--max-memory", "cpu=1GiB,disk=1GiB",
                              "--offload-folder", str(tmp_path / "offload")],
                             capture_output=True, text=True, timeout=300, check=False,
                             preexec_fn=lambda: procs.write_text(str(os.getpid())))
    finally:
        group.remove()
    assert cli.returncode == 2, cli.stderr[-2000:]
    assert cli.stderr.startswith("bigload: error: --max-memory cpu=1.00GiB is more than this process may use: its "
                                 f"memory cgroup (v{group.version[1]}, {group.path}) is limited to 450.00 MiB, ")
    assert "e.g. --max-memory cpu=" in cli.stderr and "leave cpu out of --max-memory" in cli.stderr
    assert not (tmp_path / "offload").exists()


def _fake_cuda(monkeypatch, *, nvml, reserved=0, allocated=0, initialized=True):
    """Two visible GPUs, without a GPU: NVML's answer, and what this process's caching allocator holds."""
    asked: list[int] = []

    def mem_get_info(index):
        asked.append(index)
        return (5 * GiB, 80 * GiB)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: initialized)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda index: reserved)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda index: allocated)
    monkeypatch.setattr(budget_module, "_nvml_free_memory", lambda count: nvml)
    return asked


def test_free_gpu_memory_comes_from_nvml_without_a_cuda_context(monkeypatch):
    asked = _fake_cuda(monkeypatch, nvml={0: 10 * GiB, 1: 20 * GiB})
    assert budget_module.gpu_free_memory() == {0: 10 * GiB, 1: 20 * GiB}
    assert asked == []  # mem_get_info would create a context on every GPU it asks


def test_cached_but_unused_allocator_memory_counts_as_free(monkeypatch):
    _fake_cuda(monkeypatch, nvml={0: 10 * GiB, 1: 20 * GiB}, reserved=6 * GiB, allocated=2 * GiB)
    assert budget_module.gpu_free_memory() == {0: 14 * GiB, 1: 24 * GiB}
    _fake_cuda(monkeypatch, nvml={0: 10 * GiB, 1: 20 * GiB}, reserved=6 * GiB, initialized=False)
    assert budget_module.gpu_free_memory() == {0: 10 * GiB, 1: 20 * GiB}


def test_without_nvml_cuda_is_asked(monkeypatch):
    asked = _fake_cuda(monkeypatch, nvml=None)
    assert budget_module.gpu_free_memory() == {0: 5 * GiB, 1: 5 * GiB} and asked == [0, 1]


def test_nvml_absent_is_no_error():
    # No NVIDIA driver on this machine (or any other reason NVML cannot answer): the caller asks CUDA.
    if torch.cuda.is_available():
        pytest.skip("a GPU machine has NVML")
    assert budget_module._nvml_free_memory(1) is None
