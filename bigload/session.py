"""What `bigload generate` and `bigload demo` do: load, generate, time, and report.

Timings come from a streamer that stamps each token as `generate` produces it, so time to first token and
decode speed are measured inside one generate call, not estimated.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from bigload.sizes import format_size

__all__ = ["GenerateOptions", "GenerateReport", "run_demo", "run_generate", "timed_generate"]

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
    from bigload.hooks import runtime_of

    runtime = runtime_of(model)
    return 0 if runtime is None else runtime.stats().bytes_loaded


def run_generate(path: str | Path, options: GenerateOptions, *, offload_folder: str | Path | None = None,
                 stream_text: bool = True, echo: Echo = print, progress: bool = True,
                 **planning: Any) -> GenerateReport:
    """Load a model folder with bigload, print its plan, generate, and measure.

    Args:
        path: a Hugging Face model folder with tokenizer files.
        options: prompt and decoding options.
        offload_folder: where disk-offloaded weights go (needed when the plan puts anything on disk).
        stream_text: print tokens as they are generated.
        echo: where plan tables and notes go (None: silent).
        planning: max_memory, strategy, dtype, context_length, batch_size, no_split_module_classes, prefetch,
            policy, disk_reads.
    """
    from bigload.hf import from_pretrained, load_tokenizer, plan_model

    tokenizer = load_tokenizer(path)
    # Plan first, so the table is on screen before the (possibly long) load starts.
    plan = plan_model(path, offload_folder=offload_folder, **planning)
    if echo is not None:
        echo(plan.explain())
        echo("")
    start = time.perf_counter()
    model = from_pretrained(path, device_map=plan, offload_folder=offload_folder, progress=progress,
                            dtype=planning.get("dtype"))
    load_seconds = time.perf_counter() - start
    input_ids = tokenizer(options.prompt, return_tensors="pt")["input_ids"]
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
        load_seconds=load_seconds,
        first_token_seconds=first,
        decode_tokens_per_second=decode,
        device_bytes={str(k): v for k, v in plan.weight_bytes_by_device().items()},
        disk_bytes_per_token=read / max(1, len(new_ids)),
        token_ids=new_ids,
    )


def run_demo(*, size: str = "small", folder: str | Path | None = None, max_new_tokens: int = 32,
             echo: Echo = print) -> dict[str, Any]:
    """The newcomer's first run; see `bigload demo --help`. Returns the figures it printed."""
    from transformers import AutoModelForCausalLM

    from bigload.checkpoint import open_checkpoint
    from bigload.demo import write_demo_model

    say = echo or (lambda _text: None)
    folder = Path(folder) if folder is not None else Path.home() / ".cache" / "bigload" / f"demo-{size}"
    say(f"demo model ({size}): {folder}")
    write_demo_model(folder, size)
    total = open_checkpoint(folder).total_bytes
    # A CPU budget of about half the weights, so the plan must put the rest on disk.
    max_memory = {"cpu": total // 2, "disk": 64 * 2**30}
    say(f"weights {format_size(total)}; budget cpu={format_size(max_memory['cpu'])}, disk=64 GiB\n")
    options = GenerateOptions(prompt="The quick brown fox jumps over the lazy dog. " * 2,
                              max_new_tokens=max_new_tokens)
    report = run_generate(folder, options, offload_folder=folder / "offload", stream_text=False, echo=echo,
                          max_memory=max_memory, progress=echo is not None)

    # The reference: the same folder loaded fully in memory by transformers itself.
    from bigload.hf import load_tokenizer

    tokenizer = load_tokenizer(folder)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    input_ids = tokenizer(options.prompt, return_tensors="pt")["input_ids"]
    ref_out, _, ref_decode = timed_generate(reference, input_ids, options, tokenizer=tokenizer)
    ref_ids = ref_out[0, input_ids.shape[1]:].tolist()
    identical = ref_ids == report.token_ids
    figures = {
        "folder": str(folder),
        "size": size,
        "load_seconds": report.load_seconds,
        "first_token_seconds": report.first_token_seconds,
        "decode_tokens_per_second": report.decode_tokens_per_second,
        "in_memory_decode_tokens_per_second": ref_decode,
        "ratio_to_in_memory": report.decode_tokens_per_second / ref_decode,
        "device_bytes": report.device_bytes,
        "disk_bytes_per_token": report.disk_bytes_per_token,
        "new_tokens": report.new_tokens,
        "tokens_identical": identical,
    }
    say(report.render_summary())
    say(f"in memory (transformers): decode {ref_decode:.1f} tokens/s; offloaded runs at "
        f"{figures['ratio_to_in_memory']:.2f}x of it")
    say(f"tokens identical to the in-memory model: {'yes' if identical else 'NO'}")
    return figures
