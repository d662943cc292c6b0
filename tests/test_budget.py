"""Budgets: parsing and validating max_memory, probing this machine, refusing GPUs that do not exist."""

from __future__ import annotations

import pytest
import torch

from bigload import budget as budget_module
from bigload.budget import check_devices_exist, detect_budget, disk_free_space, parse_max_memory
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
