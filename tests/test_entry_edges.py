"""What careless or hostile callers of the entry points do, each against a reference bigload did not write
(the model in memory, accelerate side by side): maps accelerate itself produces, calls repeated on a model
already dispatched, values a user would type for accelerate or transformers.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from bigload import (
    detach,
    disk_offload,
    dispatch_model,
    from_pretrained,
    infer_auto_device_map,
    load_checkpoint_and_dispatch,
    load_checkpoint_in_model,
    plan_for_model,
)
from bigload.plan import Plan
from bigload.devices import CPU, DeviceKind
from bigload.empty import init_empty_weights
from bigload.errors import BigloadError, BudgetError, OffloadError, PlanError, QuantizationError
from bigload.runtime import runtime_of

accelerate = pytest.importorskip("accelerate")


class _Inner(nn.Module):
    """A module holding a tensor of its own beside its children (ViT's `cls_token`, a learned scale)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 64)
        self.cls = nn.Parameter(torch.randn(64, 64))
        self.b = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x) + self.cls[0])


class OwnTensorBesideChildren(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.e = nn.Linear(64, 64)
        self.inner = _Inner()
        self.h = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.h(self.inner(self.e(x)))


def _split_map() -> dict[str, str]:
    """accelerate's own map for the model at a budget that splits `inner`: it names `inner.cls`, a tensor."""
    torch.manual_seed(0)
    device_map = dict(accelerate.infer_auto_device_map(OwnTensorBesideChildren(),
                                                       max_memory={"cpu": 60000, "disk": 10**9}))
    assert "inner.cls" in device_map and device_map["inner.a"] == "disk", device_map
    return device_map


def test_a_map_whose_keys_name_tensors_as_accelerate_writes_them_loads_and_runs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference = OwnTensorBesideChildren().eval()
    device_map = _split_map()
    assert dict(infer_auto_device_map(reference, max_memory={"cpu": 60000, "disk": 10**9})) == device_map
    x = torch.randn(3, 64)

    dispatched = copy.deepcopy(reference)
    dispatch_model(dispatched, device_map, offload_dir=tmp_path / "dispatch")
    theirs = copy.deepcopy(reference)
    accelerate.dispatch_model(theirs, device_map, offload_dir=tmp_path / "accelerate")
    save_file(reference.state_dict(), tmp_path / "model.safetensors")
    with init_empty_weights():
        loaded = OwnTensorBesideChildren().eval()
    load_checkpoint_and_dispatch(loaded, tmp_path / "model.safetensors", device_map=device_map,
                                 offload_folder=tmp_path / "load")
    with torch.no_grad():
        expected = reference(x)
        torch.testing.assert_close(theirs(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(dispatched(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
    assert loaded.hf_device_map == device_map  # the caller's map, as given
    assert loaded.bigload_plan.placement_of("inner.cls").device == CPU
    assert loaded.bigload_plan.placement_of("inner.a.weight").device.kind is DeviceKind.DISK


def test_a_tensor_key_that_would_move_its_modules_other_tensors_is_refused_naming_it() -> None:
    model = OwnTensorBesideChildren()
    # `inner` is one module: its own tensor cannot go to disk while the module's entry stays on the CPU.
    with pytest.raises(PlanError, match=r"device-map keys \['inner.cls'\] name tensors, and bigload places whole "
                                        r"modules.*Map each such tensor to the device of the other tensors of its"):
        dispatch_model(model, {"": "cpu", "inner.cls": "disk"}, offload_dir="unused")
    with pytest.raises(PlanError, match=r"device-map key 'inner.nothing' names no module"):
        dispatch_model(model, {"": "cpu", "inner.nothing": "cpu"})


@pytest.mark.parametrize("again", ["disk_offload other folder", "disk_offload same folder", "dispatch_model",
                                   "load_checkpoint_and_dispatch", "load_checkpoint_in_model"])
def test_an_entry_point_on_a_model_dispatched_already_names_detach_before_touching_anything(
        tmp_path: Path, again: str) -> None:
    torch.manual_seed(0)
    reference = OwnTensorBesideChildren().eval()
    save_file(reference.state_dict(), tmp_path / "model.safetensors")
    model = copy.deepcopy(reference)
    disk_offload(model, tmp_path / "first")
    calls = {
        "disk_offload other folder": lambda: disk_offload(model, tmp_path / "second"),
        "disk_offload same folder": lambda: disk_offload(model, tmp_path / "first"),
        "dispatch_model": lambda: dispatch_model(model, {"": "disk"}, offload_dir=tmp_path / "second"),
        "load_checkpoint_and_dispatch": lambda: load_checkpoint_and_dispatch(
            model, tmp_path / "model.safetensors", device_map={"": "disk"}, offload_folder=tmp_path / "second"),
        "load_checkpoint_in_model": lambda: load_checkpoint_in_model(
            model, tmp_path / "model.safetensors", {"": "disk"}, offload_folder=tmp_path / "second"),
    }
    first = sorted(p.name for p in (tmp_path / "first").iterdir())
    # Was: "tensor 'e.weight' is on the meta device ... load the checkpoint first, or pass offload_index" (the
    # runtime's placeholders), or a load into the hooked model refused only after it had replaced its tensors.
    with pytest.raises(BigloadError, match=r"already has a bigload runtime .* call bigload.detach\(model\) first"):
        calls[again]()
    assert not (tmp_path / "second").exists()
    assert sorted(p.name for p in (tmp_path / "first").iterdir()) == first
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)  # the first dispatch still runs
        detach(model)
        disk_offload(model, tmp_path / "second")
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.int8, "int8", torch.float8_e4m3fn, torch.int32, torch.bool])
def test_a_load_dtype_that_would_destroy_the_weights_is_refused_before_anything_is_read(
        tmp_path: Path, dtype: object) -> None:
    torch.manual_seed(0)
    save_file(OwnTensorBesideChildren().state_dict(), tmp_path / "model.safetensors")
    for load in (load_checkpoint_and_dispatch, load_checkpoint_in_model):
        with init_empty_weights():
            model = OwnTensorBesideChildren()
        # Was: floating weights cast to int8 (0.2 -> 0) and a RuntimeError from torch at the first forward.
        with pytest.raises(BudgetError, match=r"dtype=torch\.\w+ is not a dtype to load a model in .*use "
                                              r"dtype=torch.bfloat16, float16, float32 or float64"):
            load(model, tmp_path / "model.safetensors", device_map={"": "disk"}, offload_folder=tmp_path / "off",
                 dtype=dtype)
        assert not (tmp_path / "off").exists()
        assert all(t.device.type == "meta" for t in model.parameters())


def test_an_integer_load_dtype_names_quantize_in_python_and_the_flags_in_the_cli(tmp_path: Path) -> None:
    from bigload.cli.demo import write_demo_model
    from bigload.messages import Audience

    folder = write_demo_model(tmp_path / "demo")
    with pytest.raises(BudgetError) as caught:
        from_pretrained(folder, dtype=torch.int8)  # was transformers' ValueError, naming no fix
    assert "use quantize='int8' or quantize='int4'" in str(caught.value)
    assert "use --quantize int8 or --quantize int4" in caught.value.render(Audience.CLI)


def test_casting_a_model_with_offloaded_weights_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    torch.manual_seed(0)
    reference = OwnTensorBesideChildren().eval()
    model = copy.deepcopy(reference)
    dispatch_model(model, {"e": "cpu", "inner": "disk", "h": "cpu"}, offload_dir=tmp_path / "off")
    x = torch.randn(3, 64)
    # Was: the resident tensors cast to float64, the offloaded ones brought in as float32, and torch's
    # "expected m1 and m2 to have the same dtype" at the next forward.
    for cast in (lambda: model.to(torch.float64), lambda: model.half(), lambda: model.to("cpu", torch.bfloat16)):
        with pytest.raises(OffloadError, match=r"would cast the model to torch\.\w+, but 5 of its tensors are "
                                               r"offloaded by bigload \(e\.g\. 'inner\.cls', torch\.float32\).*"
                                               r"Load it in torch\.\w+ instead.*Nothing was changed"):
            cast()
    model.to(torch.float32)  # no cast: nothing offloaded changes
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
        detach(model).double()
        torch.testing.assert_close(model(x.double()), copy.deepcopy(reference).double()(x.double()), rtol=0, atol=0)


def test_casting_a_dispatched_model_whose_weights_are_all_resident_casts_all_of_them() -> None:
    torch.manual_seed(0)
    reference = OwnTensorBesideChildren().eval()
    model = copy.deepcopy(reference)
    dispatch_model(model, {"e": "cpu", "inner": "cpu", "h": "cpu"}, force_hooks=True)
    model.double()
    x = torch.randn(3, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference.double()(x), rtol=0, atol=0)


@pytest.mark.parametrize("state_dict", [False, True])
@pytest.mark.parametrize("force_hooks", [False, True])
def test_dispatching_a_model_still_on_meta_names_the_tensor_and_the_loading_call(
        state_dict: bool, force_hooks: bool) -> None:
    torch.manual_seed(0)
    weights = OwnTensorBesideChildren().state_dict()
    device_map = {"e": "cpu", "inner": "cpu", "h": "cpu"}
    with init_empty_weights():
        model = OwnTensorBesideChildren()
    given = {"state_dict": weights} if state_dict else {}
    with pytest.raises(ValueError, match="is on the meta device"):  # accelerate checks it too
        accelerate.dispatch_model(copy.deepcopy(model), device_map, force_hooks=True, **given)
    # Was: dispatched, then torch's NotImplementedError "Cannot copy out of meta tensor" in the first forward
    # (or from model.to when the map names one device).
    with pytest.raises(OffloadError, match=r"tensor 'e.weight' is on the meta device \(no data\), and the map keeps "
                                           r"block 'e' on cpu, where it runs.*load them first"):
        dispatch_model(model, device_map, force_hooks=force_hooks, **given)
    assert runtime_of(model) is None and not hasattr(model, "hf_device_map")


def _saved(tmp_path: Path) -> tuple[nn.Module, Path, Plan]:
    torch.manual_seed(0)
    reference = OwnTensorBesideChildren().eval()
    save_file(reference.state_dict(), tmp_path / "model.safetensors")
    planned = plan_for_model(OwnTensorBesideChildren(), max_memory={"cpu": 70000, "disk": 10**9})
    assert planned.offloaded and planned.slots.count == 2
    return reference, tmp_path / "model.safetensors", planned


def _edited(planned: Plan, edit: Callable[[dict], object]) -> str:
    data = json.loads(planned.to_json())
    edit(data)
    return json.dumps(data)


@pytest.mark.parametrize("edit", [
    lambda d: d["slots"].update(count=0),  # was "no free slot ... Put nested blocks on one device-map entry"
    lambda d: d["slots"].update(nbytes=10**18),  # was OSError ENOMEM from the first forward
    lambda d: d["slots"].update(nbytes=10),
    lambda d: d.update(prefetch=3),
], ids=["no-slots", "huge-slots", "tiny-slots", "prefetch-without-its-slots"])
def test_a_plan_whose_slots_were_edited_is_refused_before_anything_is_read(tmp_path: Path, edit) -> None:
    reference, checkpoint, planned = _saved(tmp_path)
    edited = Plan.from_json(_edited(planned, edit))
    with init_empty_weights():
        model = OwnTensorBesideChildren().eval()
    with pytest.raises(PlanError, match=r"the plan's slots \(\d+ of \d+ bytes\) are not what its offloaded blocks "
                                        r"need \([23] of \d+ bytes, at prefetch=\d\): the plan was edited"):
        load_checkpoint_and_dispatch(model, checkpoint, device_map=edited, offload_folder=tmp_path / "off")
    assert not (tmp_path / "off").exists()
    load_checkpoint_and_dispatch(model, checkpoint, device_map=Plan.from_json(planned.to_json()),
                                 offload_folder=tmp_path / "off")
    x = torch.randn(3, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d.update(prefetch=-3), r"plan JSON has prefetch -3 and batch_size 1; a plan has prefetch >= 0"),
    (lambda d: [p.update(execution_device="disk") for p in d["placements"]],
     r"plan JSON has execution_device of 'e' 'disk'; blocks run on a GPU or the CPU"),
], ids=["negative-prefetch", "runs-on-disk"])
def test_plan_json_with_values_no_planner_writes_names_the_field(tmp_path: Path, edit, message: str) -> None:
    planned = _saved(tmp_path)[2]
    with pytest.raises(PlanError, match=message):
        Plan.from_json(_edited(planned, edit))


def test_plan_json_nested_deeper_than_the_stack_is_a_plan_error() -> None:
    with pytest.raises(PlanError, match=r"not a bigload plan JSON \(RecursionError"):  # was the RecursionError
        Plan.from_json("[" * 100_000 + "]" * 100_000)


def _llama_and_map_on_containers(tmp_path: Path):
    from fixtures_models import reference_llama, save_sharded

    reference = reference_llama()
    folder = save_sharded(reference, tmp_path / "llama")
    # Hand-written, as accelerate users write them: the decoder stack's ModuleList as one entry.
    device_map = {"model.embed_tokens": "cpu", "model.layers": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu",
                  "lm_head": "cpu"}
    return reference, folder, device_map


def test_a_map_entry_on_a_module_list_brings_each_layer_in_as_accelerate_does(tmp_path: Path) -> None:
    from fixtures_models import empty_llama

    reference, folder, device_map = _llama_and_map_on_containers(tmp_path)
    ids = torch.tensor([[1, 5, 9, 33, 7, 100]])
    ours = load_checkpoint_and_dispatch(empty_llama(), folder, device_map=device_map, offload_folder=tmp_path / "a")
    theirs = accelerate.load_checkpoint_and_dispatch(empty_llama(), str(folder), device_map=device_map,
                                                     offload_folder=tmp_path / "b")
    dispatched = dispatch_model(copy.deepcopy(reference), device_map, offload_dir=tmp_path / "c")
    with torch.no_grad():
        expected = reference(ids).logits
        torch.testing.assert_close(theirs(ids).logits, expected, rtol=0, atol=0)
        # Was: OffloadError "... only while block 'model.layers' runs ... Run the model (or that block)": a
        # ModuleList is indexed, never called, so the entry's hooks never brought its weights in.
        torch.testing.assert_close(ours(ids).logits, expected, rtol=0, atol=0)
        torch.testing.assert_close(dispatched(ids).logits, expected, rtol=0, atol=0)
    assert ours.hf_device_map == device_map
    assert "model.layers.3" in ours.bigload_plan.offloaded


def test_a_map_entry_on_peft_s_module_dict_gives_peft_s_outputs_not_uninitialized_memory(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    from fixtures_models import reference_llama

    folder = _llama_and_map_on_containers(tmp_path)[1]
    torch.manual_seed(1)
    lora = peft.get_peft_model(reference_llama(), peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=4,
                                                                   lora_alpha=8, init_lora_weights=False))
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.3)
    lora.save_pretrained(tmp_path / "lora")
    expected_model = peft.PeftModel.from_pretrained(reference_llama(), tmp_path / "lora").eval()
    ours = from_pretrained(folder, adapter=tmp_path / "lora", offload_folder=tmp_path / "off", progress=False,
                           device_map={"": "cpu", "model.layers.1.self_attn.q_proj.lora_A": "disk"})
    ids = torch.tensor([[1, 5, 9, 33, 7, 100]])
    with torch.no_grad():
        # Was: the ModuleDict's hooks never ran, and torch's CPU linear read its meta placeholder as
        # uninitialized memory: logits off by 0.27, other greedy tokens, no error.
        torch.testing.assert_close(ours(ids).logits, expected_model(ids).logits, rtol=0, atol=1e-5)


class _ReadsChildWeight(nn.Module):
    """Uses its child's weight without calling the child (the case accelerate's `preload_module_classes` is for)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8, bias=False)
        self.out = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x @ self.proj.weight.t())


def test_a_placeholder_read_by_a_computation_on_real_tensors_raises_instead_of_giving_garbage(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _ReadsChildWeight().eval()
    x = torch.randn(3, 8)
    expected = model(x)
    disk_offload(model, tmp_path / "off")
    # Was: torch's CPU matmul takes the meta placeholder beside a CPU input and returns uninitialized memory.
    with pytest.raises(OffloadError, match=r"'proj.weight' is offloaded by bigload \(on disk in .*\): its values are "
                                           r"on the execution device only while block 'proj' runs"):
        model(x)
    detach(model)
    disk_offload(model, tmp_path / "off2", preload_module_classes=["_ReadsChildWeight"])
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_from_pretrained_reads_transformers_torch_dtype_and_names_quantize_for_its_bitsandbytes_keywords(
        tmp_path: Path) -> None:
    from bigload.cli.demo import write_demo_model

    folder = write_demo_model(tmp_path / "demo")
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    # Was: TypeError "from_pretrained() got an unexpected keyword argument 'torch_dtype'".
    ours = from_pretrained(folder, torch_dtype=torch.bfloat16, progress=False)
    transformers = pytest.importorskip("transformers")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    assert {t.dtype for t in ours.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=0, atol=0)
    with pytest.raises(QuantizationError, match=r"load_in_8bit= is transformers' \(bitsandbytes\) quantization; "
                                                r"bigload takes quantize='int8'"):
        from_pretrained(folder, load_in_8bit=True)
    with pytest.raises(BigloadError, match=r"torch_dtype= and dtype= are both given"):
        from_pretrained(folder, torch_dtype=torch.bfloat16, dtype=torch.float16)
