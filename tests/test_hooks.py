"""Runtime hooks: inputs move, offloaded weights come in just in time and leave, prefetch follows execution."""

from __future__ import annotations

import mmap
import os
import threading
import time
from typing import Iterable

import pytest
import torch
from torch import nn

from bigload.runtime.prefetch import Prefetcher
import bigload.runtime.slots as slots_module
from bigload.runtime.slots import Slot, advise_willneed
import bigload.formats.pages as pages
from bigload.devices import CPU, Device
from bigload.errors import OffloadError, PlanError
from bigload.devices import ExecutionPolicy
from bigload.runtime import HostWeights, detach, runtime_of, send_to_device
from planned import attach_map, planned
from bigload.plan.reserve import SLOT_ALIGNMENT, SlotSpec, pinned_bytes
from claimed_device import ClaimedDevice
from fixtures_models import OutOfOrder, ThreeBlocks, TiedEnds
from timeouts import with_timeout

THREE_MAP = {"first": "disk", "second": "disk", "third": "disk", "": "cpu"}


def _offload(model: nn.Module, names: list[str], dtype: torch.dtype | None = None) -> HostWeights:
    """Move the named tensors out of `model` into a source (optionally stored in another dtype)."""
    state = model.state_dict()
    source = HostWeights({name: state[name].to(dtype or state[name].dtype) for name in names})
    return source


def _names(model: nn.Module, prefixes: tuple[str, ...]) -> list[str]:
    return [name for name, _ in model.named_parameters() if name.startswith(prefixes)]


def _three(seed: int = 0) -> tuple[ThreeBlocks, ThreeBlocks]:
    torch.manual_seed(seed)
    reference = ThreeBlocks()
    model = ThreeBlocks()
    model.load_state_dict(reference.state_dict())
    return reference, model


# -- execution policy -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("placed", "main", "policy", "expected"),
    [
        (0, 0, ExecutionPolicy.STREAM, Device.parse(0)),
        (1, 0, ExecutionPolicy.LOCAL, Device.parse(1)),
        ("cpu", 0, ExecutionPolicy.STREAM, Device.parse(0)),
        ("cpu", 0, ExecutionPolicy.LOCAL, CPU),
        ("disk", 0, ExecutionPolicy.STREAM, Device.parse(0)),
        ("disk", 0, ExecutionPolicy.LOCAL, Device.parse(0)),
        ("cpu", "cpu", ExecutionPolicy.STREAM, CPU),
        ("disk", "cpu", ExecutionPolicy.LOCAL, CPU),
    ],
)
def test_the_plan_of_a_given_map_decides_where_each_block_runs(placed, main, policy, expected):
    _, model = _three()
    result = planned(model, {"first": placed, "": "cpu"}, execution_device=main, policy=policy)
    assert result.execution_devices["first"] == expected
    assert result.placement_of("first.weight").offloaded == (expected != Device.parse(placed))


def test_disk_is_no_main_device():
    _, model = _three()
    with pytest.raises(PlanError, match="main execution device cannot be 'disk'"):
        planned(model, {"": "cpu"}, execution_device="disk")


@pytest.mark.parametrize("policy", list(ExecutionPolicy))
def test_with_the_cpu_as_main_device_the_policy_changes_nothing(policy):
    """The policy is about CPU-placed blocks when a GPU runs the model: with the CPU as main device, CPU
    blocks stay resident and disk blocks are brought in, under either policy."""
    reference, model = _three()
    store = _offload(model, _names(model, ("second",)))
    runtime = attach_map(model, {"first": "cpu", "second": "disk", "third": "cpu", "": "cpu"},
                     execution_device="cpu", store=store, policy=policy)
    assert [name for name, block in runtime.blocks.items() if block.offloaded] == ["second"]
    assert {block.execution_device for block in runtime.blocks.values()} == {torch.device("cpu")}
    x = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    assert runtime.stats().bytes_loaded == runtime.blocks["second"].nbytes


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("policy", list(ExecutionPolicy))
def test_local_policy_keeps_cpu_block_resident_and_stream_offloads_it(policy):
    """With a GPU as main device, LOCAL runs CPU-placed blocks on the CPU (nothing moves but activations)
    and STREAM brings their weights to the GPU for every forward."""
    reference, model = _three()
    streamed = policy is ExecutionPolicy.STREAM
    runtime = attach_map(model, {"first": "cpu", "second": "cpu", "third": "cpu", "": "cpu"},
                     execution_device="cuda:0", policy=policy)
    runs_on = "cuda" if streamed else "cpu"
    assert {name: block.execution_device.type for name, block in runtime.blocks.items()} == \
        {"first": runs_on, "second": runs_on, "third": runs_on, "": runs_on}
    offloaded = [name for name, block in runtime.blocks.items() if block.offloaded]
    assert offloaded == (["first", "second", "third"] if streamed else [])
    x = torch.randn(3, 8)
    with torch.no_grad():
        out = model(x)
    assert out.device.type == "cpu"
    torch.testing.assert_close(out, reference(x))
    stats = runtime.stats()
    if streamed:
        assert stats.bytes_loaded >= sum(runtime.blocks[name].nbytes for name in offloaded) > 0
        assert stats.reserve_bytes > 0
    else:
        assert stats.bytes_loaded == 0 and stats.reserve_bytes == 0
        assert all(p.device.type == "cpu" for p in model.parameters())


# -- moving inputs ----------------------------------------------------------------------------------


def test_send_to_device_moves_nested_tensors_but_never_a_cache():
    from transformers import DynamicCache

    cache = DynamicCache()
    value = {"x": torch.ones(2), "nested": (torch.zeros(1), [torch.ones(1)]), "past_key_values": cache,
             "position_embeddings": (torch.ones(3), torch.ones(3)), "flag": True}
    moved = send_to_device(value, torch.device("meta"), skip_keys=["past_key_values"])
    assert moved["x"].device.type == "meta"
    assert moved["nested"][0].device.type == "meta" and moved["nested"][1][0].device.type == "meta"
    assert all(t.device.type == "meta" for t in moved["position_embeddings"])
    assert moved["past_key_values"] is cache
    assert moved["flag"] is True
    # A cache is never moved, whatever key it sits under.
    assert send_to_device([cache], torch.device("meta"))[0] is cache


def test_skip_keys_leave_tensors_where_they_are():
    tensor = torch.ones(2)
    moved = send_to_device({"layer_past": tensor, "cache_position": tensor}, torch.device("meta"),
                           skip_keys=["layer_past"])
    assert moved["layer_past"] is tensor
    assert moved["cache_position"].device.type == "meta"  # cache_position is an input: it moves


# -- offloaded blocks -------------------------------------------------------------------------------


def test_offloaded_blocks_match_plain_model_and_are_released_after_forward():
    reference, model = _three()
    names = _names(model, ("first", "second", "third"))
    store = _offload(model, names)
    attach_map(model, THREE_MAP, execution_device="cpu", store=store, prefetch=1)
    x = torch.randn(5, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    assert all(model.get_parameter(name).device.type == "meta" for name in names)
    assert model.scale.device.type == "cpu"


def test_cpu_execution_uses_stored_tensors_in_place():
    reference, model = _three()
    names = _names(model, ("second",))
    store = _offload(model, names)
    seen: dict[str, int] = {}

    def record(module: nn.Module, args: tuple) -> None:
        seen["weight"] = module.weight.data_ptr()

    model.second[0].register_forward_pre_hook(record)
    attach_map(model, THREE_MAP | {"first": "cpu", "third": "cpu"}, execution_device="cpu", store=store)
    with torch.no_grad():
        model(torch.randn(2, 8))
    assert seen["weight"] == store.get("second.0.weight").data_ptr()
    stats = runtime_of(model).stats()
    assert stats.buffers == 0 and stats.buffer_bytes == 0


def test_stored_dtype_differs_then_weights_are_cast_into_reused_buffers():
    reference, model = _three()
    names = _names(model, ("first", "second", "third"))
    store = _offload(model, names, dtype=torch.float64)
    runtime = attach_map(model, THREE_MAP, execution_device="cpu", store=store, prefetch=1)
    x = torch.randn(3, 8)
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    stats = runtime.stats()
    largest = max(block.nbytes for block in runtime.blocks.values())
    assert largest == sum(p.numel() * 4 for p in reference.second.parameters())
    assert max(block.slot_bytes for block in runtime.blocks.values()) == largest  # CPU slots: no padding
    assert stats.reserve_bytes == largest * (1 + 1)
    assert stats.buffers == 2  # one per slot, allocated once, reused for every block and step
    assert stats.buffer_bytes == stats.reserve_bytes
    assert stats.peak_bytes_held <= stats.reserve_bytes


@pytest.mark.parametrize("prefetch", [0, 1, 2])
def test_bytes_held_never_exceed_the_planned_reserve(prefetch):
    reference, model = _three()
    names = _names(model, ("first", "second", "third"))
    store = _offload(model, names)
    runtime = attach_map(model, THREE_MAP, execution_device="cpu", store=store, prefetch=prefetch)
    sizes = {name: block.nbytes for name, block in runtime.blocks.items() if block.offloaded}
    spans = {name: block.slot_bytes for name, block in runtime.blocks.items() if block.offloaded}
    peak_seen = []

    def watch(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        peak_seen.append(runtime.stats().bytes_held)

    for name in sizes:
        model.get_submodule(name).register_forward_hook(watch)
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(2, 8))
    reserve = max(spans.values()) * min(1 + prefetch, len(sizes))
    stats = runtime.stats()
    assert stats.reserve_bytes == reserve
    assert max(peak_seen) <= reserve and stats.peak_bytes_held <= reserve
    # Every forward loads every block once; anything more was prefetched for the next forward and is held.
    assert 0 <= stats.bytes_loaded - 3 * sum(sizes.values()) == stats.bytes_held


def _runs(items: Iterable[str]) -> list[str]:
    """`items` with consecutive repeats collapsed: one entry per block load."""
    out: list[str] = []
    for item in items:
        if not out or out[-1] != item:
            out.append(item)
    return out


def test_prefetch_runs_in_background_in_execution_order():
    reference, model = _three()
    # Stored as float64 for a float32 model: every load is a cast into a slot, done by the prefetch thread.
    store = _offload(model, _names(model, ("first", "second", "third")), dtype=torch.float64)
    threads: list[tuple[str, str]] = []

    class Recording(HostWeights):
        def get(self, name: str) -> torch.Tensor:
            threads.append((name.split(".")[0], threading.current_thread().name))
            return super().get(name)

    source = Recording({name: store.get(name) for name in store.names})
    runtime = attach_map(model, THREE_MAP, execution_device="cpu", store=source, prefetch=1)
    x = torch.randn(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    stats = runtime.stats()
    # The first block is loaded on demand once; from then on the blocks are always loaded ahead, wrapping
    # around to the next forward: each acquire starts the next block, each release gives its slot to the block
    # after the next ('third' as 'first' ends, ..., 'second' as the last 'third' ends).
    assert stats.sync_loads == 1
    expected = ["second", "third", "first", "second", "third", "first", "second"]
    assert stats.prefetched == tuple(expected)
    # The last prefetches (for a forward that never comes) may still be running: wait for them (bounded).
    deadline = time.monotonic() + 10
    while (len(_runs(b for b, t in list(threads) if t.startswith("bigload-prefetch"))) < len(expected)
           and time.monotonic() < deadline):
        time.sleep(0.01)
    loads = [(block, thread) for block, thread in threads if thread.startswith("bigload-prefetch")]
    assert _runs(block for block, _ in loads) == expected


def test_in_place_blocks_are_resolved_once_and_prefetched_by_kernel_advice(monkeypatch):
    reference, model = _three()
    store = _offload(model, _names(model, ("first", "second", "third")))
    gets: list[str] = []
    advised: list[tuple[str, int]] = []

    class Recording(HostWeights):
        def get(self, name: str) -> torch.Tensor:
            gets.append(name)
            return super().get(name)

    source = Recording({name: store.get(name) for name in store.names})
    owner = {HostWeights.get(source, name).data_ptr(): name.split(".")[0] for name in store.names}
    real_advise = advise_willneed

    def advise(tensors):
        tensors = list(tensors)
        advised.extend((owner[t.data_ptr()], threading.current_thread().name) for t in tensors)
        real_advise(tensors)

    monkeypatch.setattr(slots_module, "advise_willneed", advise)
    runtime = attach_map(model, THREE_MAP, execution_device="cpu", store=source, prefetch=1)
    x = torch.randn(2, 8)
    seen: list[int] = []
    model.second[0].register_forward_pre_hook(lambda module, args: seen.append(module.weight.data_ptr()))
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    # Each tensor is fetched twice on its block's first load (to see that the source is stable), never again.
    assert sorted(gets) == sorted(2 * list(store.names))
    # The weights in use are the source's own memory, the same object on every forward, and nothing was copied.
    assert set(seen) == {HostWeights.get(source, "second.0.weight").data_ptr()}
    assert model.second[0].weight.device.type == "meta"  # released after each forward
    stats = runtime.stats()
    assert stats.buffers == 0 and stats.sync_loads == 1
    assert stats.prefetched[:3] == ("second", "third", "first")
    # Prefetching is kernel advice, in execution order: on the caller's thread for the block loaded on demand,
    # on the prefetch thread for the blocks after it (a cold block's advice blocks while reads are queued).
    assert _runs(block for block, _ in advised)[:4] == ["first", "second", "third", "first"]
    assert _runs(thread for _, thread in advised) == [threading.current_thread().name, "bigload-prefetch_0"]


def test_first_forward_confirms_the_execution_order():
    torch.manual_seed(0)
    reference = OutOfOrder()
    model = OutOfOrder()
    model.load_state_dict(reference.state_dict())
    store = _offload(model, _names(model, ("last", "middle", "first")))
    # Registration (and device-map) order is last, middle, first; forward runs first, middle, last.
    runtime = attach_map(model, {"last": "disk", "middle": "disk", "first": "disk"}, execution_device="cpu",
                     store=store, prefetch=1)
    x = torch.randn(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
        misses_after_first = runtime.stats().sync_loads
        for _ in range(2):
            torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    stats = runtime.stats()
    assert stats.order == ("first", "middle", "last")
    assert stats.sync_loads == misses_after_first  # no miss once the order is known
    # Prefetches follow the execution order, wrapping around (each release starts the block after the next).
    assert stats.prefetched[-4:] == ("middle", "last", "first", "middle")


def test_error_in_prefetch_thread_surfaces_in_forward_with_its_cause():
    reference, model = _three()
    store = _offload(model, _names(model, ("first", "second", "third")))

    class Broken(HostWeights):
        def get(self, name: str) -> torch.Tensor:
            if name.startswith("third"):
                raise OSError(5, "Input/output error", "third.weight.dat")
            return super().get(name)

    source = Broken({name: store.get(name) for name in store.names})
    attach_map(model, THREE_MAP, execution_device="cpu", store=source, prefetch=2)
    with pytest.raises(OffloadError, match="block 'third'") as info:
        with_timeout(lambda: model(torch.randn(2, 8)))
    assert isinstance(info.value.__cause__, OSError)
    # The runtime is still usable: the failed block is retried (and fails again) rather than hanging.
    with pytest.raises(OffloadError, match="block 'third' onto cpu failed"):
        with_timeout(lambda: model(torch.randn(2, 8)))


def test_error_on_demand_load_also_surfaces():
    reference, model = _three()
    store = _offload(model, _names(model, ("first",)))

    class Broken(HostWeights):
        def get(self, name: str) -> torch.Tensor:
            raise RuntimeError("disk gone")

    attach_map(model, THREE_MAP | {"second": "cpu", "third": "cpu"}, execution_device="cpu",
           store=Broken({name: store.get(name) for name in store.names}), prefetch=0)
    with pytest.raises(OffloadError, match="block 'first'.*disk gone"):
        with_timeout(lambda: model(torch.randn(2, 8)))


def test_missing_tensor_in_store_is_an_error_at_attach():
    reference, model = _three()
    store = _offload(model, _names(model, ("first", "second")))
    with pytest.raises(OffloadError, match="'third.weight' of block 'third' is placed on disk"):
        attach_map(model, THREE_MAP, execution_device="cpu", store=store)


# -- tied weights, buffers, detach ------------------------------------------------------------------


def test_tied_weight_is_one_tensor_per_device_and_stays_tied():
    torch.manual_seed(0)
    reference = TiedEnds()
    model = TiedEnds()
    model.load_state_dict(reference.state_dict())
    source = HostWeights({"embed.weight": reference.embed.weight.detach().clone(),
                          "body.weight": reference.body.weight.detach().clone(),
                          "body.bias": reference.body.bias.detach().clone()})
    runtime = attach_map(model, {"embed": "disk", "body": "disk", "head": "disk"}, execution_device="cpu",
                     store=source, prefetch=1)
    assert model.head.weight is model.embed.weight  # the placeholder is shared too
    head = runtime.blocks["head"]
    assert [entry.key for entry in head.entries] == ["embed.weight"]  # found under its alias
    seen = []
    model.head.register_forward_pre_hook(lambda m, a: seen.append(m.weight.data_ptr() == model.embed.weight.data_ptr()))
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids), rtol=0, atol=0)
    assert seen == [True]
    detach(model)
    assert model.head.weight is model.embed.weight


def test_tied_weight_shared_by_resident_and_offloaded_block_is_refused():
    model = TiedEnds()
    with pytest.raises(PlanError, match="tied weights would be split across devices"):
        attach_map(model, {"embed": "cpu", "body": "cpu", "head": "disk"}, execution_device="cpu",
               store=HostWeights({"embed.weight": model.embed.weight.detach()}))


@pytest.mark.parametrize("offload_buffers", [False, True])
def test_offload_buffers(offload_buffers):
    reference, model = _three()
    names = _names(model, ("first", "second", "third"))
    source = _offload(model, names + (["scale"] if offload_buffers else []))
    attach_map(model, {"": "disk"}, execution_device="cpu", store=source, offload_buffers=offload_buffers)
    assert (model.scale.device.type == "meta") is offload_buffers
    x = torch.randn(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    assert (model.scale.device.type == "meta") is offload_buffers


def test_detach_removes_every_hook_and_leaves_a_plain_module():
    reference, model = _three()
    store = _offload(model, _names(model, ("first", "second", "third")))
    attach_map(model, THREE_MAP, execution_device="cpu", store=store, prefetch=1)
    with torch.no_grad():
        model(torch.randn(2, 8))
    assert runtime_of(model) is not None
    plain = detach(model)
    assert plain is model and runtime_of(model) is None
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    assert all(p.device.type == "cpu" for p in model.parameters())
    x = torch.randn(4, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    assert detach(model) is model  # detaching twice is harmless


def test_root_output_returns_to_the_input_device():
    """An input on another device than the blocks run on (a GPU, claimed without one: `claimed_device`):
    each block gets it on the CPU, and the output goes back to the input's device."""
    reference, model = _three()
    attach_map(model, {"": "cpu"}, execution_device="cpu")
    seen = []
    model.first.register_forward_pre_hook(lambda module, args: seen.append(args[0].device))
    x = torch.randn(2, 8)
    with torch.no_grad(), ClaimedDevice("cuda:0") as gpu:
        out = model(gpu.tensor(x))
    assert seen == [torch.device("cpu")]
    assert out.device == torch.device("cuda", 0)
    torch.testing.assert_close(out.as_subclass(torch.Tensor), reference(x), rtol=0, atol=0)
    runtime = runtime_of(model)
    assert runtime.forwards == 1


def test_negative_prefetch_is_refused():
    reference, model = _three()
    with pytest.raises(PlanError, match="prefetch=-1"):
        attach_map(model, {"": "cpu"}, execution_device="cpu", prefetch=-1)


def test_unknown_block_is_refused():
    reference, model = _three()
    with pytest.raises(PlanError, match="'fourth' names no module of ThreeBlocks"):
        attach_map(model, {"fourth": "cpu", "": "cpu"}, execution_device="cpu")


# -- CUDA ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_streams_offloaded_weights_through_reused_buffers():
    reference, model = _three()
    names = _names(model, ("first", "second", "third"))
    store = _offload(model, names)
    runtime = attach_map(model, THREE_MAP, execution_device="cuda:0", store=store, prefetch=1)
    x = torch.randn(5, 8)
    with torch.no_grad():
        for _ in range(3):
            out = model(x)
            assert out.device.type == "cpu"
            torch.testing.assert_close(out, reference(x))
    stats = runtime.stats()
    largest = max(block.slot_bytes for block in runtime.blocks.values())
    assert stats.reserve_bytes == 2 * largest
    # Two device slots, allocated once and reused for every block and step: exactly the reserve.
    assert stats.buffers == 2 and stats.buffer_bytes == stats.reserve_bytes
    assert stats.staging_bytes == 2 * pinned_bytes(largest)  # one pinned buffer per slot, as torch pins it
    assert stats.peak_bytes_held <= stats.reserve_bytes


def test_failed_attach_leaves_the_model_untouched():
    reference, model = _three()
    store = _offload(model, _names(model, ("first", "second")))  # "third" is missing from the store
    with pytest.raises(OffloadError, match="'third.weight' of block 'third' is placed on disk but is not in the offload"):
        attach_map(model, THREE_MAP, execution_device="cpu", store=store)
    assert runtime_of(model) is None and all(p.device.type == "cpu" for p in model.parameters())
    x = torch.randn(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


@pytest.mark.skipif(pages._madvise is None or not hasattr(os, "posix_fadvise"), reason="needs madvise/fadvise")
def test_kernel_advice_is_asked_only_for_pages_not_in_memory(tmp_path, monkeypatch):
    path = tmp_path / "weights.bin"
    path.write_bytes(os.urandom(64 * 4096))
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
        os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)  # evict: a cold page cache
        mapping = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
    tensor = torch.frombuffer(mapping, dtype=torch.uint8)
    calls: list[tuple[int, int, int]] = []
    real = pages._madvise

    def recording(start: int, length: int, advice: int) -> int:
        calls.append((start, length, advice))
        return real(start, length, advice)

    monkeypatch.setattr(pages, "_madvise", recording)
    advise_willneed([tensor[4096:]])
    assert calls == [(tensor.data_ptr() + 4096, 63 * 4096, mmap.MADV_WILLNEED)]
    tensor.sum()  # every page in memory and mapped: advice would only cost time
    calls.clear()
    advise_willneed([tensor])
    assert calls == []
    del tensor
    mapping.close()


# -- the GPU path, checked without a GPU ---------------------------------------------------------------


class _RecordsCopies(torch.Tensor):
    """A tensor that records the device and `non_blocking` of every `.to` asked of it and copies nothing
    (there is no GPU here): what `_send` asks of a real tensor, without a device. A meta tensor stands for
    one on a GPU."""

    calls: list[tuple[str, bool]] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to:
            device = torch.device(args[1] if len(args) > 1 else kwargs["device"])
            cls.calls.append((device.type, bool(kwargs.get("non_blocking", False))))
            return args[0]
        return super().__torch_function__(func, types, args, kwargs)


def test_copies_toward_the_cpu_wait_and_only_copies_toward_a_gpu_are_queued(monkeypatch):
    # A queued GPU-to-CPU copy returns before it lands: the CPU would read uninitialised memory.
    monkeypatch.setattr(_RecordsCopies, "calls", [])
    tensor = torch.ones(2).as_subclass(_RecordsCopies)
    send_to_device({"x": tensor, "y": [tensor]}, torch.device("cuda", 0))
    meta = torch.empty(2, device="meta").as_subclass(_RecordsCopies)
    send_to_device((meta,), torch.device("cpu"))
    assert _RecordsCopies.calls == [("cuda", True), ("cuda", True), ("cpu", False)]


@pytest.mark.parametrize("prefetch", [1, 2])
def test_inference_mode_then_no_grad_then_grad_through_cast_slots(prefetch):
    # Stored as float64 for a float32 model: every block is cast into a slot, by the prefetch thread too.
    reference, model = _three()
    store = _offload(model, _names(model, ("first", "second", "third")), dtype=torch.float64)
    runtime = attach_map(model, THREE_MAP, execution_device="cpu", store=store, prefetch=prefetch)
    x = torch.randn(2, 8)
    for mode in (torch.inference_mode, torch.inference_mode, torch.no_grad, torch.enable_grad):
        with mode():
            torch.testing.assert_close(with_timeout(lambda: model(x)), reference(x), rtol=0, atol=0)
    slots = [slot.buffer for slot in runtime.prefetcher.all_slots]
    assert len(slots) == min(1 + prefetch, 3) and not any(buffer.is_inference() for buffer in slots)


def test_inference_mode_first_leaves_in_place_weights_usable_with_grad(tmp_path):
    # Blocks used in place are resolved once: under inference_mode they must not become inference tensors,
    # or a later forward with grad fails ("Inference tensors cannot be saved for backward").
    from bigload.integrations.dispatch import disk_offload

    reference, model = _three()
    disk_offload(model, tmp_path / "off", execution_device="cpu", prefetch=1)
    x = torch.randn(2, 8)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    out = model(x)
    torch.testing.assert_close(out, reference(x), rtol=0, atol=0)
    out.sum().backward()  # gradients flow into the in-place weights' Parameters


def _attach_to_a_fake_gpu(monkeypatch, model: nn.Module, staging: bool = False, **kwargs):
    """attach() toward cuda:0 on a machine without one: streams, events and device buffers are not made;
    with `staging`, staged slots get their staging buffers as at attach (unpinned: no GPU here)."""
    monkeypatch.setattr(Prefetcher, "_allocate_cuda_slots", _fake_staging if staging else lambda self: None)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device: object())
    monkeypatch.setattr(torch.cuda, "Event", lambda **kwargs: object())
    return attach_map(model, {"first": "cpu", "second": "cpu", "third": "cpu", "": "cpu"}, execution_device="cuda:0",
                  prefetch=1, offload_buffers=True, **kwargs)


def test_gpu_slot_offsets_are_aligned_for_vectorized_kernels_and_planned_so(monkeypatch):
    from bigload.plan.inventory import inventory_from_module

    _, model = _three()
    inventory = inventory_from_module(model)
    runtime = _attach_to_a_fake_gpu(monkeypatch, model)
    entries = [entry for block in runtime.blocks.values() for entry in block.entries]
    assert len(entries) == 9 and all(entry.offset % SLOT_ALIGNMENT == 0 for entry in entries)
    second = runtime.blocks["second"]
    assert second.nbytes == 2048 + 128 + 2048 + 64 and second.slot_bytes == 2048 + 256 + 2048 + 256
    # The planner sizes the slot by the same formula, from the inventory alone.
    assert inventory.slot_bytes(inventory.index("second")) == second.slot_bytes
    assert inventory.slot_bytes(inventory.index("second"), alignment=1) == second.nbytes


def _fake_staging(prefetcher) -> None:
    for slot in prefetcher.all_slots:
        if slot.staged:
            slot.staging = torch.empty(slot.nbytes, dtype=torch.uint8)


@pytest.mark.parametrize("planned", [SlotSpec(2, 5000, staged=True), SlotSpec(3, 4608, staged=True)],
                         ids=["rounded-up", "power-of-two"])
def test_gpu_slots_take_count_size_and_staging_from_the_plan(monkeypatch, planned):
    # finding 5: the pinned staging is what the plan charged to the cpu (`SlotSpec.staging_bytes`), no more.
    _, model = _three()
    runtime = _attach_to_a_fake_gpu(monkeypatch, model, staging=True, slots=planned)
    slots = runtime.prefetcher.all_slots
    assert len(slots) == planned.count and {(slot.nbytes, slot.staged) for slot in slots} == {(planned.nbytes, True)}
    stats = runtime.stats()
    assert stats.staging_bytes == planned.staging_bytes == planned.count * pinned_bytes(planned.nbytes)
    assert stats.reserve_bytes == planned.total


def test_slots_without_a_plan_are_staged_only_on_cuda(monkeypatch):
    _, model = _three()
    runtime = _attach_to_a_fake_gpu(monkeypatch, model, staging=True)
    largest = max(block.slot_bytes for block in runtime.blocks.values())
    count = len(runtime.prefetcher.all_slots)  # the root encloses the others: 2 at once + 1 prefetched
    assert count == 3 and runtime.stats().staging_bytes == count * pinned_bytes(largest) > 0
    _, on_cpu = _three()
    store = _offload(on_cpu, _names(on_cpu, ("first", "second", "third")))
    cpu_runtime = attach_map(on_cpu, THREE_MAP, execution_device="cpu", store=store, prefetch=1)
    assert not any(slot.staged for slot in cpu_runtime.prefetcher.all_slots)
    with torch.no_grad():
        on_cpu(torch.randn(2, 8))
    assert cpu_runtime.stats().staging_bytes == 0


def test_cuda_slots_are_made_at_attach_ordered_after_the_callers_stream_and_synced_at_close(monkeypatch):
    # Findings 4 and 7 of issue 15, without a GPU: the calls attach/detach make on a recording stand-in.
    log: list[str] = []
    events: list[dict] = []

    class Stream:
        def __init__(self, device):
            pass

        def wait_stream(self, other):
            log.append(f"wait_stream({other})")

        def synchronize(self):
            log.append("synchronize")

    def buffer(name):
        def make(slot):
            log.append(name)
            return torch.empty(slot.nbytes, dtype=torch.uint8)
        return make

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "Event", lambda **kwargs: events.append(kwargs))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: "caller")
    monkeypatch.setattr(Slot, "device_buffer", buffer("device"))
    monkeypatch.setattr(Slot, "staging_buffer", buffer("staging"))
    _, model = _three()
    runtime = attach_map(model, {"first": "cpu", "second": "cpu", "third": "cpu", "": "cpu"}, execution_device="cuda:0",
                     prefetch=1, offload_buffers=True)
    count = len(runtime.prefetcher.all_slots)
    # Every slot's buffers exist at attach, then the side stream waits on the caller's stream (once).
    assert log == ["device", "staging"] * count + ["wait_stream(caller)"]
    assert events and all(kwargs == {"blocking": True} for kwargs in events)  # waits sleep, never spin
    slots = runtime.prefetcher.all_slots
    detach(model)
    assert log[-1] == "synchronize" and all(slot.buffer is None and slot.staging is None for slot in slots)


def test_host_weights_are_not_pinned_for_a_gpu(monkeypatch):
    # The CPU share stays where it is (checkpoint views, no private copy): pinning it all was a full copy
    # in unswappable memory. Checked without a GPU: any pinning attempt fails here.
    reference, model = _three()
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: pytest.fail("pinned a host weight"))
    pointers = {name: tensor.data_ptr() for name, tensor in model.state_dict().items()}
    runtime = _attach_to_a_fake_gpu(monkeypatch, model)
    sources = {entry.key: entry.source.get(entry.key) for block in runtime.blocks.values()
               for entry in block.entries}
    assert set(sources) == set(pointers)
    assert all(tensor.data_ptr() == pointers[name] for name, tensor in sources.items())
