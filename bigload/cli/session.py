"""What `bigload generate` and `bigload demo` do: load, generate, time, and report.

Timings come from a streamer that stamps each token as `generate` produces it, so time to first token and
decode speed are measured inside one generate call, not estimated. The demo compares two speeds the way the
benchmarks do: several runs of each, interleaved, the median and the spread, and a plain warning when the
spread is too wide for the ratio to mean anything.
"""

from __future__ import annotations

import shlex
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from bigload.api import from_pretrained
from bigload.cli.demo import write_demo_model
from bigload.distributed import stop_pipeline
from bigload.errors import BigloadError
from bigload.formats.discover import open_checkpoint
from bigload.integrations.hf import load_tokenizer, plan_model, without_transformers_progress
from bigload.messages import Audience, Text, setting
from bigload.plan.budget import check_cgroup_room, parse_max_memory
from bigload.runtime import runtime_of
from bigload.sizes import format_size

__all__ = ["GenerateOptions", "GenerateReport", "Loaded", "PipelineReport", "load_for_generate", "run_demo",
           "run_generate", "run_generate_pipeline", "timed_generate"]

Echo = Callable[[str], None] | None


@dataclass(frozen=True)
class GenerateOptions:
    """Decoding options: greedy unless a temperature is given."""

    prompt: str
    max_new_tokens: int = 64
    temperature: float | None = None
    top_p: float | None = None
    seed: int = 0

    def generate_kwargs(self) -> dict[str, Any]:
        if self.temperature is None:
            return {"do_sample": False}
        kwargs: dict[str, Any] = {"do_sample": True, "temperature": self.temperature}
        if self.top_p is not None:
            kwargs["top_p"] = self.top_p
        return kwargs


@dataclass(frozen=True)
class GenerateReport:
    """Figures of one load-and-generate run."""

    text: str
    new_tokens: int
    load_seconds: float
    first_token_seconds: float
    decode_tokens_per_second: float
    device_bytes: dict[str, int]
    disk_bytes_per_token: float
    token_ids: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def render_summary(self) -> str:
        placed = ", ".join(f"{device}: {format_size(n)}" for device, n in self.device_bytes.items())
        return (
            f"load {self.load_seconds:.2f} s | first token {self.first_token_seconds:.3f} s | "
            f"decode {self.decode_tokens_per_second:.1f} tokens/s ({self.new_tokens} new tokens)\n"
            f"weights: {placed} | read from disk per token: {format_size(self.disk_bytes_per_token)}"
        )


class _Stamps:
    """A transformers streamer that records when each new token arrives (and optionally prints text)."""

    def __init__(self, tokenizer: Any = None, echo_text: bool = False) -> None:
        self.times: list[float] = []
        self._text = None
        if echo_text and tokenizer is not None:
            from transformers import TextStreamer

            self._text = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self._seen_prompt = False

    def put(self, value: torch.Tensor) -> None:
        if not self._seen_prompt:
            self._seen_prompt = True  # generate() sends the prompt first
        else:
            self.times.append(time.perf_counter())
        if self._text is not None:
            self._text.put(value)

    def end(self) -> None:
        if self._text is not None:
            self._text.end()


def timed_generate(model: Any, input_ids: torch.Tensor, options: GenerateOptions, *,
                   tokenizer: Any = None, echo_text: bool = False) -> tuple[torch.Tensor, float, float]:
    """Run `model.generate` and return (output ids, time to first token, decode tokens/s)."""
    stamps = _Stamps(tokenizer, echo_text)
    torch.manual_seed(options.seed)
    start = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=options.max_new_tokens,
            min_new_tokens=options.max_new_tokens if tokenizer is None else None, streamer=stamps,
            pad_token_id=getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else 0,
            **options.generate_kwargs(),
        )
    first = stamps.times[0] - start if stamps.times else float("nan")
    decode = (len(stamps.times) - 1) / (stamps.times[-1] - stamps.times[0]) if len(stamps.times) > 1 else float("nan")
    return output, first, decode


def _runtime_bytes_read(model: Any) -> int:

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model holds the base
    runtime = runtime_of(base)
    return 0 if runtime is None else runtime.stats().bytes_loaded


@dataclass(frozen=True)
class Loaded:
    """A model loaded by bigload for generation, with its tokenizer, plan and load time."""

    model: Any
    tokenizer: Any
    plan: Any
    load_seconds: float


def load_for_generate(path: str | Path, *, offload_folder: str | Path | None = None, echo: Echo = print,
                      progress: bool = True, audience: Audience = Audience.PYTHON, prompt: str | None = None,
                      **planning: Any) -> Loaded:
    """Plan a model folder (printing the plan through `echo`), then load it with bigload.

    The folder is checked first, then the tokenizer is loaded (and `prompt`, if given, tokenized), so a wrong
    path, a folder without tokenizer files or a prompt that gives no token fails before anything is planned or
    read. transformers' own progress bars stay off: the load shows bigload's one bar (`progress`).

    Raises:
        BigloadError: as `run_generate`.
    """

    tokenizer = load_tokenizer(path)
    if planning.get("max_memory") is not None:  # a load, unlike `bigload plan`: the CPU budget must be here
        check_cgroup_room(parse_max_memory(planning["max_memory"]))
    if prompt is not None:
        _prompt_ids(tokenizer, prompt)
    # Plan first, so the table is on screen before the (possibly long) load starts.
    plan = plan_model(path, offload_folder=offload_folder, **planning)
    if echo is not None:
        echo(plan.explain(audience))
        echo("")
    start = time.perf_counter()
    with without_transformers_progress():
        model = from_pretrained(path, device_map=plan, offload_folder=offload_folder, progress=progress,
                                dtype=planning.get("dtype"), adapter=planning.get("adapter"),
                                quantize=planning.get("quantize"), quantize_skip=planning.get("quantize_skip"))
    return Loaded(model, tokenizer, plan, time.perf_counter() - start)


def _prompt_ids(tokenizer: Any, prompt: str) -> torch.Tensor:
    """The prompt's token ids (1 x N); a prompt that gives none (empty, or what this tokenizer drops) is refused:
    a model continues from at least one token."""
    input_ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if input_ids.shape[-1] == 0:
        raise BigloadError(Text(setting("prompt", repr(prompt), shlex.quote(prompt)), " gives no token with this "
                                "model's tokenizer; give text for the model to continue."))
    return input_ids


def _generate_report(loaded: Loaded, options: GenerateOptions, *, echo: Echo, stream_text: bool) -> GenerateReport:
    """Generate once with a loaded model and measure it."""
    tokenizer, model = loaded.tokenizer, loaded.model
    input_ids = _prompt_ids(tokenizer, options.prompt)
    read_before = _runtime_bytes_read(model)
    if echo is not None and stream_text:
        echo(options.prompt)
    output, first, decode = timed_generate(model, input_ids, options, tokenizer=tokenizer,
                                           echo_text=stream_text and echo is not None)
    new_ids = output[0, input_ids.shape[1]:].tolist()
    read = _runtime_bytes_read(model) - read_before
    return GenerateReport(
        text=tokenizer.decode(new_ids, skip_special_tokens=True),
        new_tokens=len(new_ids),
        load_seconds=loaded.load_seconds,
        first_token_seconds=first,
        decode_tokens_per_second=decode,
        device_bytes={str(k): v for k, v in loaded.plan.weight_bytes_by_device().items()},
        disk_bytes_per_token=read / max(1, len(new_ids)),
        token_ids=new_ids,
    )


@dataclass(frozen=True)
class PipelineReport:
    """Figures of one load-and-generate run across ranks (rank 0's view)."""

    generate: GenerateReport
    ranks: list[dict[str, Any]]
    comm_seconds_per_token: float
    plan: str

    def to_dict(self) -> dict[str, Any]:
        return {**self.generate.to_dict(), "ranks": self.ranks, "comm_seconds_per_token": self.comm_seconds_per_token}

    def render_summary(self) -> str:
        g = self.generate
        lines = [
            f"load {g.load_seconds:.2f} s (until every rank is ready) | first token {g.first_token_seconds:.3f} s | "
            f"decode {g.decode_tokens_per_second:.1f} tokens/s ({g.new_tokens} new tokens)",
            f"communication per token: {self.comm_seconds_per_token * 1e3:.2f} ms (wire time around the ring, "
            "all hops, both ways)",
        ]
        for rank in self.ranks:
            lines.append(f"rank {rank['rank']}: {rank['blocks']}, loaded in {rank['seconds']:.2f} s, read "
                         f"{format_size(rank['bytes_read'])} from {len(rank['files'])} file(s)")
        return "\n".join(lines)


def run_generate_pipeline(path: str | Path, options: GenerateOptions, *, offload_folder: str | Path | None = None,
                          stream_text: bool = True, echo: Echo = print, progress: bool = True,
                          max_memory_hosts: dict[int, Any] | None = None, timeout: float = 300.0,
                          **planning: Any) -> PipelineReport | None:
    """`run_generate` across the ranks of torchrun: every rank loads its blocks; rank 0 generates, prints and
    returns the report; the other ranks serve until it is done and return None.

    Args:
        max_memory_hosts: rank -> budget for ranks that differ from `max_memory`.
        timeout: seconds any wait between ranks may take.
        The others: as `run_generate` (`strategy` plans inside each rank).
    """

    model = from_pretrained(
        path, device_map=planning.pop("strategy", "auto"), offload_folder=offload_folder, progress=progress,
        distributed=True, pipeline={"max_memory_hosts": max_memory_hosts, "timeout": timeout}, **planning)
    if model is None:
        return None
    pipeline = model.bigload_pipeline
    load_seconds = pipeline.ready_seconds  # not the wait for the other ranks to start and build their models
    try:
        if echo is not None:
            echo(pipeline.plan.explain())
            echo("")
        tokenizer = load_tokenizer(path)
        input_ids = _prompt_ids(tokenizer, options.prompt)
        if echo is not None and stream_text:
            echo(options.prompt)
        output, first, decode = timed_generate(model, input_ids, options, tokenizer=tokenizer,
                                               echo_text=stream_text and echo is not None)
    finally:
        stop_pipeline(model)
    new_ids = output[0, input_ids.shape[1]:].tolist()
    report = GenerateReport(
        text=tokenizer.decode(new_ids, skip_special_tokens=True), new_tokens=len(new_ids),
        load_seconds=load_seconds, first_token_seconds=first, decode_tokens_per_second=decode,
        device_bytes={}, disk_bytes_per_token=0.0, token_ids=new_ids)
    ranks = [{**asdict(load), "files": list(load.files)} for load in pipeline.loads]
    return PipelineReport(report, ranks, pipeline.stats.comm_seconds_per_token, pipeline.plan.explain())


def run_generate(path: str | Path, options: GenerateOptions, *, offload_folder: str | Path | None = None,
                 stream_text: bool = True, echo: Echo = print, progress: bool = True,
                 audience: Audience = Audience.PYTHON, **planning: Any) -> GenerateReport:
    """Load a model folder with bigload, print its plan, generate, and measure.

    Args:
        path: a Hugging Face model folder with tokenizer files.
        options: prompt and decoding options.
        offload_folder: where disk-offloaded weights go (needed when the plan puts anything on disk).
        stream_text: print tokens as they are generated.
        echo: where plan tables and notes go (None: silent).
        progress: bigload's progress bar while loading (one final line when stderr is not a terminal).
        audience: how the plan's reasons name settings (Python keywords or CLI flags).
        planning: max_memory, strategy, dtype, context_length, batch_size, no_split_module_classes, prefetch,
            policy, adapter (peft adapter folders, see `from_pretrained`), quantize, quantize_skip,
            disk_reads.

    Raises:
        BigloadError: the folder does not exist or has no tokenizer, the prompt gives no token, the model does
            not fit, ...
    """
    loaded = load_for_generate(path, offload_folder=offload_folder, echo=echo, progress=progress,
                               audience=audience, prompt=options.prompt, **planning)
    return _generate_report(loaded, options, echo=echo, stream_text=stream_text)


# The demo's speed comparison: runs per model after one warm-up each, and the relative spread of the
# per-pair ratios (max - min over median) above which the median ratio is reported as inconclusive.
DEMO_RUNS = 5
DEMO_MAX_SPREAD = 0.25


@dataclass(frozen=True)
class SpeedComparison:
    """Decode speeds of interleaved runs of two models, and what can be concluded from them."""

    offloaded: tuple[float, ...]
    in_memory: tuple[float, ...]

    @property
    def ratios(self) -> tuple[float, ...]:
        return tuple(a / b for a, b in zip(self.offloaded, self.in_memory))

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)

    @property
    def spread(self) -> float:
        """(largest - smallest ratio) / median ratio: 0.1 means the runs agree within about 10 %."""
        return (max(self.ratios) - min(self.ratios)) / self.ratio

    @property
    def conclusive(self) -> bool:
        return self.spread <= DEMO_MAX_SPREAD

    def render(self) -> str:
        lines = [
            f"decode, median of {len(self.ratios)} interleaved runs: offloaded "
            f"{statistics.median(self.offloaded):.1f} tokens/s, in memory (transformers) "
            f"{statistics.median(self.in_memory):.1f} tokens/s",
            f"offloaded runs at {self.ratio:.2f}x of in-memory (runs ranged {min(self.ratios):.2f}x to "
            f"{max(self.ratios):.2f}x)",
        ]
        if not self.conclusive:
            lines.append(
                f"warning: the runs differ by {self.spread:.0%}, too much to conclude anything about the speed "
                "(a busy machine, or tokens so fast that noise dominates); try again, or --size medium."
            )
        return "\n".join(lines)


def _compare_speeds(offloaded: Any, reference: Any, input_ids: torch.Tensor,
                    options: GenerateOptions) -> SpeedComparison:
    """Interleave runs of both models (warm-up first), so drift on a busy machine hits both alike."""
    fast: list[float] = []
    ref: list[float] = []
    for run in range(DEMO_RUNS + 1):
        a = timed_generate(offloaded, input_ids, options)[2]
        b = timed_generate(reference, input_ids, options)[2]
        if run:  # run 0 warms up caches and lazy initialisation
            fast.append(a)
            ref.append(b)
    return SpeedComparison(tuple(fast), tuple(ref))


def _budget_note(plan: Any, total: int, cpu_budget: int) -> str:
    """What the demo's budget really does: weights on the CPU, the reserve kept there, the rest on disk."""
    placed = {str(k): v for k, v in plan.weight_bytes_by_device().items()}
    reserve = sum(entry.reserve for entry in plan.usage if str(entry.device) == "cpu")
    on_disk = placed.get("disk", 0)
    return (
        f"the CPU budget ({format_size(cpu_budget)}, half the weights) holds {format_size(placed.get('cpu', 0))} "
        f"of weights plus a {format_size(reserve)} reserve for bringing offloaded blocks in, so "
        f"{format_size(on_disk)} ({on_disk / total:.0%} of the weights) go to disk"
    )


def run_demo(*, size: str = "small", folder: str | Path | None = None, max_new_tokens: int = 32,
             echo: Echo = print, audience: Audience = Audience.PYTHON) -> dict[str, Any]:
    """The newcomer's first run; see `bigload demo --help`. Returns the figures it printed."""
    from transformers import AutoModelForCausalLM


    say = echo or (lambda _text: None)
    folder = Path(folder) if folder is not None else Path.home() / ".cache" / "bigload" / f"demo-{size}"
    say(f"demo model ({size}): {folder}")
    say("(random weights: the generated text is gibberish; what counts is that the offloaded model's tokens "
        "equal the in-memory model's)")
    with without_transformers_progress():
        write_demo_model(folder, size)
    total = open_checkpoint(folder).total_bytes
    # A CPU budget of about half the weights, so the plan must put the rest on disk.
    max_memory = {"cpu": total // 2, "disk": 64 * 2**30}
    say(f"weights {format_size(total)}; budget cpu={format_size(max_memory['cpu'])}, disk=64 GiB\n")
    options = GenerateOptions(prompt="The quick brown fox jumps over the lazy dog. " * 2,
                              max_new_tokens=max_new_tokens)
    # The offload folder sits beside the model's, never inside it (`bigload.load.folder`).
    loaded = load_for_generate(folder, offload_folder=folder.parent / f"{folder.name}-offload", echo=echo,
                               progress=echo is not None, audience=audience, max_memory=max_memory)
    report = _generate_report(loaded, options, echo=echo, stream_text=False)
    say(_budget_note(loaded.plan, total, max_memory["cpu"]))

    # The reference: the same folder loaded fully in memory by transformers itself.
    with without_transformers_progress():
        reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    input_ids = loaded.tokenizer(options.prompt, return_tensors="pt")["input_ids"]
    ref_out = timed_generate(reference, input_ids, options, tokenizer=loaded.tokenizer)[0]
    identical = ref_out[0, input_ids.shape[1]:].tolist() == report.token_ids
    speeds = _compare_speeds(loaded.model, reference, input_ids, options)
    figures = {
        "folder": str(folder),
        "size": size,
        "load_seconds": report.load_seconds,
        "first_token_seconds": report.first_token_seconds,
        "decode_tokens_per_second": statistics.median(speeds.offloaded),
        "in_memory_decode_tokens_per_second": statistics.median(speeds.in_memory),
        "ratio_to_in_memory": speeds.ratio,
        "ratios": list(speeds.ratios),
        "ratio_spread": speeds.spread,
        "ratio_conclusive": speeds.conclusive,
        "device_bytes": report.device_bytes,
        "disk_fraction": report.device_bytes.get("disk", 0) / total,
        "disk_bytes_per_token": report.disk_bytes_per_token,
        "new_tokens": report.new_tokens,
        "tokens_identical": identical,
    }
    say(report.render_summary())
    say(speeds.render())
    say(f"tokens identical to the in-memory model: {'yes' if identical else 'NO'}")
    return figures
