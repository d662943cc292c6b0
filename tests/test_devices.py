import pytest
import torch

from bigload.devices import CPU, DISK, Budget, Device, DeviceKind
from bigload.errors import DeviceError


@pytest.mark.parametrize(
    "value, expected",
    [
        (0, Device(DeviceKind.GPU, 0)),
        (3, Device(DeviceKind.GPU, 3)),
        ("1", Device(DeviceKind.GPU, 1)),
        ("cuda", Device(DeviceKind.GPU, 0)),
        ("cuda:2", Device(DeviceKind.GPU, 2)),
        (torch.device("cuda", 1), Device(DeviceKind.GPU, 1)),
        ("cpu", CPU),
        (torch.device("cpu"), CPU),
        ("disk", DISK),
        ("DISK", DISK),
    ],
)
def test_parse_reads_every_spelling(value, expected):
    assert Device.parse(value) == expected


@pytest.mark.parametrize("bad", ["meta", "gpu0", -1, "cuda:x", True, 1.5, None])
def test_parse_rejects_unknown_devices_with_the_fix(bad):
    with pytest.raises(DeviceError, match="cuda:N"):
        Device.parse(bad)


def test_devices_sort_gpus_then_cpu_then_disk_and_round_trip_to_map_keys():
    devices = sorted([DISK, CPU, Device.parse(1), Device.parse(0)])
    assert [d.key for d in devices] == [0, 1, "cpu", "disk"]
    assert [str(d) for d in devices] == ["cuda:0", "cuda:1", "cpu", "disk"]


def test_disk_has_no_torch_device():
    assert CPU.torch_device() == torch.device("cpu")
    assert Device.parse(1).torch_device() == torch.device("cuda", 1)
    with pytest.raises(DeviceError, match="disk"):
        DISK.torch_device()


def test_budget_orders_devices_and_rejects_duplicates():
    budget = Budget.of({"cpu": 10, 1: 5, "disk": 100, "cuda:0": 7})
    assert budget.devices == (Device.parse(0), Device.parse(1), CPU, DISK)
    assert budget.gpus == (Device.parse(0), Device.parse(1))
    assert budget.get("cuda:1") == 5
    assert budget.get(7) == 0
    assert budget.as_max_memory() == {0: 7, 1: 5, "cpu": 10, "disk": 100}
    with pytest.raises(DeviceError, match="twice"):
        Budget.of({0: 1, "cuda:0": 2})
