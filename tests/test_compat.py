"""accelerate's planning names, run side by side with accelerate 1.15 on the same models and budgets.

Every test calls both libraries and asserts the same maps, sizes and budgets, the same Python warnings and
the same log messages (accelerate logs on `accelerate.utils.modeling`, bigload on `bigload.integrations.device_maps`). Budgets
name GPUs this machine may not have: accelerate plans for them anyway (a dry run, with a logged warning),
and so does bigload, so the comparison means the same on a machine with or without CUDA.
"""

from __future__ import annotations

import logging
import re
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

accelerate = pytest.importorskip("accelerate")
import accelerate.utils as acc  # noqa: E402

import bigload  # noqa: E402
from bigload.errors import BigloadError  # noqa: E402
from planner_models import tiny_llama, toy  # noqa: E402

NO_SPLIT = ["LlamaDecoderLayer"]
FUNCTIONS = ("infer_auto_device_map", "get_balanced_memory", "compute_module_sizes", "find_tied_parameters")


@contextmanager
def _messages(logger_name: str) -> Iterator[list[tuple[str, str]]]:
    """Collect `warnings.warn` texts and log records (level, message) of one logger, INFO and up."""
    seen: list[tuple[str, str]] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append((record.levelname, record.getMessage()))

    logger = logging.getLogger(logger_name)
    handler, level = Collect(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield seen
        seen.extend(("UserWarning", str(w.message)) for w in caught if issubclass(w.category, UserWarning))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _call(fn: Callable[..., Any], logger_name: str, *args: Any,
          **kwargs: Any) -> tuple[Any, list, BaseException | None]:
    with _messages(logger_name) as seen:
        try:
            return fn(*args, **kwargs), seen, None
        except Exception as error:  # compared below: bigload must fail where accelerate does
            return None, seen, error


# accelerate's failures that are accidents, not checks: an empty list indexed while it places a tie that no module
# left can take. bigload raises its PlanError with the fix there (see bigload.errors and the test below).
ACCIDENTS = (IndexError,)


def builtin_of(error: BaseException) -> type[BaseException]:
    """The built-in class an `except` around accelerate's call names for `error` (torch's AcceleratorError is a
    RuntimeError; safetensors' own error is only an Exception)."""
    return next(kind for kind in type(error).__mro__ if kind.__module__ == "builtins")


def assert_fails_alike(their_error: BaseException, our_error: BaseException | None) -> None:
    """bigload raised one of its own errors, which is also the built-in accelerate raised."""
    assert isinstance(our_error, BigloadError), (their_error, our_error)
    if not isinstance(their_error, ACCIDENTS):
        assert isinstance(our_error, builtin_of(their_error)), (their_error, our_error)


def both(name: str, *args: Any, **kwargs: Any) -> tuple[tuple[Any, list, BaseException | None], ...]:
    """accelerate's and bigload's `name` on copies of the same arguments: (answer, messages, error) of each."""
    copy = lambda v: dict(v) if isinstance(v, dict) else v  # noqa: E731  (accelerate edits max_memory in place)
    theirs = _call(getattr(acc, name), "accelerate.utils.modeling", *args, **{k: copy(v) for k, v in kwargs.items()})
    ours = _call(getattr(bigload, name), "bigload.integrations.device_maps", *args,
                 **{k: copy(v) for k, v in kwargs.items()})
    return theirs, ours


def same(name: str, *args: Any, **kwargs: Any) -> Any:
    """Run accelerate's and bigload's `name` on copies of the same arguments; assert identical answers and
    messages; return the answer. Where accelerate fails, bigload must raise one of its own errors that is
    also the built-in accelerate raised (what `except ValueError:` around accelerate's call catches)."""
    (theirs, their_msgs, their_error), (ours, our_msgs, our_error) = both(name, *args, **kwargs)
    if their_error is not None:
        assert_fails_alike(their_error, our_error)
        return None
    assert our_error is None, our_error
    assert type(ours) is type(theirs)
    assert dict(ours) == dict(theirs) if isinstance(theirs, dict) else ours == theirs
    assert our_msgs == their_msgs
    return ours


def fails_alike(name: str, *args: Any, **kwargs: Any) -> tuple[BaseException, BaseException]:
    """Both libraries refuse these arguments; bigload with its own error that is also accelerate's built-in.
    Returns (accelerate's error, bigload's)."""
    (_, _, their_error), (_, _, our_error) = both(name, *args, **kwargs)
    assert their_error is not None, f"accelerate's {name} accepted the arguments"
    assert_fails_alike(their_error, our_error)
    return their_error, our_error  # type: ignore[return-value]


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


# --------------------------------------------------------------------------------------------------
# Hand-picked cases


def test_signatures_take_every_accelerate_keyword():
    import inspect

    for name in (*FUNCTIONS, "load_checkpoint_in_model", "load_checkpoint_and_dispatch", "dispatch_model",
                 "cpu_offload", "disk_offload", "init_empty_weights", "init_on_device"):
        theirs = inspect.signature(getattr(accelerate, name, None) or getattr(acc, name)).parameters
        ours = inspect.signature(getattr(bigload, name)).parameters
        for position, (key, parameter) in enumerate(theirs.items()):
            assert key in ours, f"{name} lacks {key}"
            if parameter.kind is parameter.VAR_KEYWORD:
                continue
            assert list(ours)[position] == key, f"{name}: {key} is not at position {position}"
            assert ours[key].default == parameter.default, f"{name}({key}=) default differs"


def batchnorm_between_linears() -> nn.Module:
    with torch.device("meta"):
        return nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.Linear(16, 16))


@pytest.mark.parametrize("budget", [
    {0: 1200, "cpu": 2400}, {0: 1500, 1: 1200, "cpu": 1000}, {"cpu": 1300}, {0: 600, "cpu": 600, "disk": 10},
    {0: 2000, "cpu": 0}, {0: 100_000},
])
@pytest.mark.parametrize("offload_buffers", [False, True])
def test_buffers_between_linears(budget, offload_buffers):
    same("infer_auto_device_map", batchnorm_between_linears(), max_memory=budget, offload_buffers=offload_buffers)


def test_buffers_of_offloaded_layers_that_fit_no_gpu_warn_like_accelerate():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(4096), nn.Linear(64, 64))
    with _messages("bigload.integrations.device_maps") as seen:
        bigload.infer_auto_device_map(model, max_memory={0: 18_000, "cpu": 10**6})
    assert any(kind == "UserWarning" and "offload_buffers=True" in text for kind, text in seen)
    same("infer_auto_device_map", model, max_memory={0: 18_000, "cpu": 10**6})
    same("infer_auto_device_map", model, max_memory={0: 18_000, "cpu": 10**6}, offload_buffers=True)


@pytest.mark.parametrize("budget", [
    {0: 3000, "cpu": 10**5}, {0: 5000, "cpu": 10**5}, {0: 7000, 1: 3000, "cpu": 4000}, {0: 2100, "cpu": 2100},
    {0: 4200, "cpu": 4200}, {"cpu": 3000},
])
def test_tied_parameters(budget):
    model = toy(tie=True)
    assert same("find_tied_parameters", model) == [["embed.weight", "head.weight"]]
    for no_split in (None, ["Block"]):
        same("infer_auto_device_map", model, max_memory=budget, no_split_module_classes=no_split)


@pytest.mark.parametrize("budget", [
    {0: 300_000, 1: 300_000, 2: 300_000, "cpu": 10**6},
    {0: 400_000, 1: 200_000, "cpu": 10**6},
    {0: 150_000, 1: 600_000, "cpu": 200_000},
    {0: 300_000, 1: 300_000, "cpu": 300_000, "disk": 1},
    {0: "700KB", 1: "0.5MiB", "cpu": "1MB"},
])
def test_several_gpus_plus_cpu(llama, budget):
    same("infer_auto_device_map", llama, max_memory=budget, no_split_module_classes=NO_SPLIT)
    same("infer_auto_device_map", llama, max_memory=budget, no_split_module_classes=NO_SPLIT, dtype="float16")
    same("infer_auto_device_map", llama, max_memory=budget)


def test_a_module_that_may_be_split_is_split_to_fill_a_device(llama):
    # No no-split classes: decoder layers are split into attention and MLP to fill GPU 0.
    device_map = same("infer_auto_device_map", llama, max_memory={0: 250_000, "cpu": 10**6})
    assert any(key.count(".") >= 3 for key in device_map), device_map
    same("infer_auto_device_map", llama, max_memory={0: 250_000, "cpu": 10**6}, clean_result=False)


def test_fallback_allocation_fills_a_device_the_next_module_does_not_fit():
    class Big(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 64)

    with torch.device("meta"):
        model = nn.Sequential(Big(), nn.Linear(8, 8), Big())
    budget = {0: 17_000, "cpu": 60_000}
    plain = same("infer_auto_device_map", model, max_memory=budget, no_split_module_classes=["Big"])
    fallback = same("infer_auto_device_map", model, max_memory=budget, no_split_module_classes=["Big"],
                    fallback_allocation=True)
    assert 0 not in plain.values() and fallback["1"] == 0


def test_devices_that_get_nothing_are_logged_like_accelerate(llama):
    with _messages("bigload.integrations.device_maps") as seen:
        bigload.infer_auto_device_map(llama, max_memory={0: 1000, "cpu": 10**6}, no_split_module_classes=NO_SPLIT)
    assert any("no modules could be assigned" in text and "- 0:" in text for _, text in seen)
    same("infer_auto_device_map", llama, max_memory={0: 1000, "cpu": 10**6}, no_split_module_classes=NO_SPLIT)


def test_untied_weights_of_a_tying_config_are_warned_about():
    model = tiny_llama(tie=True)
    with torch.device("meta"):
        model.lm_head.weight = nn.Parameter(torch.empty_like(model.lm_head.weight))
    same("infer_auto_device_map", model, max_memory={"cpu": 10**7})


def test_sizes_dtypes_and_special_dtypes(llama):
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    model.register_buffer("mask", torch.ones(10, dtype=torch.bool, device="meta"))
    for target in (None, torch.float16, "float32", "torch.bfloat16"):
        for special in (None, {"0.weight": torch.float64}):
            same("compute_module_sizes", model, dtype=target, special_dtypes=special)
            same("compute_module_sizes", llama, dtype=target, special_dtypes=special)
    same("compute_module_sizes", model, buffers_only=True)
    for special in ({"lm_head.weight": torch.float16}, {"model.embed_tokens.weight": "float64"}):
        same("infer_auto_device_map", llama, max_memory={0: 300_000, 1: 200_000, "cpu": 10**6},
             no_split_module_classes=NO_SPLIT, dtype=torch.bfloat16, special_dtypes=special)
    half = toy()
    half.half()
    same("compute_module_sizes", half, dtype=torch.float32)  # accelerate counts the smaller width


@pytest.mark.parametrize("budget", [
    {0: 10**6, 1: 10**6, "cpu": 10**7}, {0: 10**6, 1: 10**6, 2: 10**6}, {0: 300_000, 1: 10**6, "cpu": 10**6},
    {0: "1GiB", "cpu": "2GiB"}, {"cpu": 10**6}, {0: 0, 1: 10**6, "cpu": 10**6},
])
@pytest.mark.parametrize("low_zero", [False, True])
def test_get_balanced_memory(llama, budget, low_zero):
    same("get_balanced_memory", llama, max_memory=budget, no_split_module_classes=NO_SPLIT, low_zero=low_zero)
    same("get_balanced_memory", llama, max_memory=budget, low_zero=low_zero)
    balanced = same("get_balanced_memory", llama, max_memory=budget, no_split_module_classes=NO_SPLIT)
    same("infer_auto_device_map", llama, max_memory=balanced, no_split_module_classes=NO_SPLIT)


def test_balanced_memory_keeps_a_disk_entry_where_accelerate_fails(llama):
    budget = {0: 10**6, 1: 10**6, "disk": 10**9}
    with pytest.raises(RuntimeError, match="device type at start of device string: disk"):
        acc.get_balanced_memory(llama, max_memory=dict(budget))
    balanced = bigload.get_balanced_memory(llama, max_memory=budget)
    assert balanced["disk"] == 10**9 and balanced[0] < 10**6


@pytest.mark.parametrize("name, budget, ours, match", [
    ("infer_auto_device_map", {"tpu": 10**6, "cpu": 10**6}, "DeviceError", "max_memory key 'tpu' names no device"),
    ("infer_auto_device_map", {0: "12XB", "cpu": 10**6}, "BudgetError", r"max_memory\[0\]: cannot read '12XB'"),
    ("infer_auto_device_map", {"cpu": "-1GB"}, "BudgetError", "'-1GB' is negative"),
    ("get_balanced_memory", {"tpu": 10**6, 0: 10**6}, "DeviceError", "max_memory key 'tpu' names no device"),
    ("get_balanced_memory", {0: "1 parsec", 1: 10**6}, "BudgetError", "cannot read '1 parsec' as a size"),
])
def test_malformed_budgets_raise_accelerates_value_error(llama, name, budget, ours, match):
    theirs, mine = fails_alike(name, llama, max_memory=budget)
    assert type(theirs) is ValueError and isinstance(mine, ValueError)
    assert type(mine).__name__ == ours and re.search(match, str(mine))


def test_a_tie_no_module_left_can_take_is_a_plan_error_where_accelerate_crashes():
    """accelerate indexes an empty list (IndexError) when the module holding a tied weight is placed before
    its partner and nothing is left to take it; bigload says what to do instead (not an IndexError: an
    accident is no contract to keep)."""
    with torch.device("meta"):
        model = nn.Module()
        model.body = nn.ReLU()
        model.tail = build(("block", 1, [("gated", 1, [("linear", 1, 1, False)])]))
        model.head = nn.Linear(1, 1, bias=False)
        model.head.weight = model.tail.get_submodule("0.0").weight
    theirs, ours = fails_alike("infer_auto_device_map", model, max_memory={"cpu": 4}, fallback_allocation=True)
    assert type(theirs) is IndexError and not isinstance(ours, IndexError)
    assert isinstance(ours, bigload.PlanError) and "belongs to no module still to place" in str(ours)


def test_no_max_memory_probes_this_machine(llama):
    assert dict(bigload.infer_auto_device_map(llama)) in ({"": "cpu"}, {"": 0})


def test_verbose_logs_the_map(llama, caplog):
    with caplog.at_level(logging.INFO, logger="bigload.integrations.device_maps"):
        bigload.infer_auto_device_map(llama, max_memory={"cpu": 10**7}, verbose=True)
    assert "device map: {'': 'cpu'}" in caplog.text


# --------------------------------------------------------------------------------------------------
# Generated module trees and budgets


class Block(nn.Module):
    """A container never split when named in no_split_module_classes."""


class Gated(nn.Module):
    """A container with a parameter of its own (accelerate places it on its own when the module is split)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.empty(width))


class Counted(nn.Module):
    """A container with a buffer of its own (accelerate's map drops it when the module is split)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.register_buffer("count", torch.zeros(width, dtype=torch.int64))


leaf = st.one_of(
    st.tuples(st.just("linear"), st.integers(1, 8), st.integers(1, 8), st.booleans()),
    st.tuples(st.just("norm"), st.integers(1, 8)),
    st.tuples(st.just("act")),
)
tree = st.recursive(leaf, lambda kids: st.tuples(st.sampled_from(["block", "gated", "counted", "list"]),
                                                  st.integers(1, 6), st.lists(kids, min_size=1, max_size=4)),
                    max_leaves=14)


def build(spec) -> nn.Module:
    kind = spec[0]
    if kind == "linear":
        return nn.Linear(spec[1], spec[2], bias=spec[3])
    if kind == "norm":
        return nn.BatchNorm1d(spec[1])
    if kind == "act":
        return nn.ReLU()
    _, width, children = spec
    module = {"block": lambda: Block(), "gated": lambda: Gated(width), "counted": lambda: Counted(width),
              "list": lambda: nn.ModuleList()}[kind]()
    for i, child in enumerate(children):
        module.add_module(str(i), build(child))
    return module


@st.composite
def planning_cases(draw):
    with torch.device("meta"):
        root = nn.Module()
        root.add_module("body", build(draw(tree)))
        if draw(st.booleans()):
            root.add_module("tail", build(draw(tree)))
        linears = [m for m in root.modules() if isinstance(m, nn.Linear)]
        if linears and draw(st.booleans()):
            source = linears[draw(st.integers(0, len(linears) - 1))]
            head = nn.Linear(source.in_features, source.out_features, bias=False)
            head.weight = source.weight  # one tie across the tree, like lm_head and the embedding
            root.add_module("head", head)
        if draw(st.booleans()):
            root.register_buffer("steps", torch.zeros(draw(st.integers(1, 4)), dtype=torch.int64))
    total = max(1, int(acc.compute_module_sizes(root)[""]))
    gpus = draw(st.integers(0, 3))
    # accelerate keeps the largest layer free on the first GPU and the CPU, so budgets up to twice the model
    # are needed for maps that span devices.
    share = st.integers(total // 2, 2 * total) | st.integers(0, total)
    budget: dict[Any, int] = {i: draw(share) for i in range(gpus)}
    if draw(st.booleans()) or not gpus:
        budget["cpu"] = draw(share)
    if draw(st.booleans()):
        budget["disk"] = draw(st.integers(0, total))
    options = dict(
        no_split_module_classes=sorted(draw(st.sets(st.sampled_from(["Block", "Gated", "Counted"])))) or None,
        dtype=draw(st.sampled_from([None, torch.float16])),
        clean_result=draw(st.booleans()),
        offload_buffers=draw(st.booleans()),
        fallback_allocation=draw(st.booleans()),
    )
    return root, budget, options


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(planning_cases())
def test_generated_trees_and_budgets_get_accelerates_map(case):
    model, budget, options = case
    same("infer_auto_device_map", model, max_memory=budget, **options)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(planning_cases(), st.booleans())
def test_generated_trees_get_accelerates_sizes_and_balanced_budgets(case, low_zero):
    model, budget, options = case
    same("compute_module_sizes", model, dtype=options["dtype"])
    same("find_tied_parameters", model)
    budget.pop("disk", None)  # accelerate fails on a disk entry here (tested above)
    gpus = [key for key in budget if isinstance(key, int)]
    if low_zero and 0 not in gpus:
        return  # accelerate reads max_memory[0] then
    same("get_balanced_memory", model, max_memory=budget, no_split_module_classes=options["no_split_module_classes"],
         dtype=options["dtype"], low_zero=low_zero)


def test_a_module_filling_the_device_exactly_is_split_when_its_tied_partner_does_not_fit():
    """accelerate splits a module whose size reaches the room left (`>=`) when its tied partner, a leaf,
    cannot come along; one byte more room and it is not split but sent to the next device."""
    with torch.device("meta"):
        model = nn.Module()
        model.body = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 8))
        model.head = nn.Linear(8, 8)
        model.head.weight = model.body[0].weight
    sizes = acc.compute_module_sizes(model)
    room = sizes["head"] + sizes["body"]  # the largest layer left once body is taken is the head
    assert same("infer_auto_device_map", model, max_memory={0: room, "cpu": 10**6}) == {"": 0}
    assert same("infer_auto_device_map", model, max_memory={0: room + 1, "cpu": 10**6}) == {"": "cpu"}
