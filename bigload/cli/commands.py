"""The `bigload` command line: plan, inspect, generate, demo.

Argument parsing, printing and exit codes only; every decision is made by the library. Errors print as
"bigload: error: ..." with no traceback (one line, or a few when the message carries a breakdown, such as
the does-not-fit shortfall per device) and exit non-zero (2 for bigload's own errors: bad input, a model
that does not fit; 1 for anything unexpected); `--debug` shows the traceback. Messages name settings as
flags (`--offload-folder`), not as the library's Python keywords.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

from bigload.errors import BigloadError
from bigload.messages import Audience

__all__ = ["main"]

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
POLICIES = ("stream", "local")  # bigload.devices.ExecutionPolicy's names (not imported: `--help` stays fast)

# A bare number in a CLI budget is bytes (accelerate's meaning of an int), but nobody runs a model in less
# than a megabyte: "0=24" is a forgotten unit, refused with the likely meaning instead of planned as 24 B.
_SMALLEST_BARE_BUDGET = 2**20


def parse_max_memory_arg(text: str) -> dict[str, str]:
    """'0=24GiB,1=24GiB,cpu=64GiB,disk=500GiB' -> {'0': '24GiB', ...}; sizes are validated by the library."""
    result: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise argparse.ArgumentTypeError(
                f"cannot read {item!r}; write DEVICE=SIZE pairs separated by commas, e.g. 0=24GiB,cpu=64GiB,disk=500GiB"
            )
        result[key.strip()] = _budget_value(key.strip(), value.strip())
    if not result:
        raise argparse.ArgumentTypeError("--max-memory is empty; e.g. 0=24GiB,cpu=64GiB,disk=500GiB")
    return result


def parse_host_max_memory_arg(text: str) -> tuple[int, dict[str, str]]:
    """'1:0=24GiB,cpu=64GiB' -> (1, {'0': '24GiB', 'cpu': '64GiB'}): one host's budget."""
    host, sep, rest = text.partition(":")
    if not sep or not host.strip().isdigit():
        raise argparse.ArgumentTypeError(
            f"cannot read {text!r}; write HOST:DEVICE=SIZE,..., e.g. 1:0=24GiB,cpu=64GiB (HOST is the rank)")
    return int(host), parse_max_memory_arg(rest)


def _add_host_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-memory-host", type=parse_host_max_memory_arg, action="append", default=None,
                        metavar="HOST:DEV=SIZE,...",
                        help="the budget of one host (rank) that differs from --max-memory, e.g. "
                             "1:0=80GiB,cpu=512GiB; repeat for several hosts")


def _budget_value(key: str, value: str) -> str:
    if value.isdigit() and int(value) < _SMALLEST_BARE_BUDGET:
        raise argparse.ArgumentTypeError(
            f"{key}={value} has no unit, so it would mean {value} bytes; did you mean {key}={value}GiB? "
            "Write sizes with a unit: GiB/MiB (binary) or GB/MB (decimal)."
        )
    return value


def _add_planning_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-memory", type=parse_max_memory_arg, metavar="DEV=SIZE,...",
                        help="budgets per device, e.g. 0=24GiB,1=24GiB,cpu=64GiB,disk=500GiB "
                             "(GiB binary, GB decimal). Default: what this machine has.")
    parser.add_argument("--strategy", choices=STRATEGIES, default="auto",
                        help="auto: balanced over several GPUs, else sequential (default: auto)")
    parser.add_argument("--dtype", help="dtype of the weights once loaded, e.g. bfloat16 (default: the model's)")
    parser.add_argument("--context-length", type=int, metavar="N",
                        help="reserve KV-cache memory for N tokens on the device running each layer")
    parser.add_argument("--batch-size", type=int, default=1, metavar="B", help="batch size for the KV reserve")
    parser.add_argument("--no-split", nargs="+", metavar="CLASS", default=None,
                        help="module classes never split across devices (default: the model's own list)")
    parser.add_argument("--prefetch", type=int, default=1, metavar="N",
                        help="offloaded blocks loaded ahead of the one running (default: 1)")
    parser.add_argument("--quantize", metavar="SCHEME",
                        help="int8 (per output channel) or int4 (groups of 128; int4:GROUP for 32/64/256): the "
                             "Linear layers of the model's blocks are planned, stored and run quantized")
    parser.add_argument("--quantize-skip", nargs="+", metavar="MODULE", default=None,
                        help="modules whose Linear layers stay unquantized (with --quantize)")
    parser.add_argument("--policy", choices=POLICIES, default=None,
                        help="where CPU-resident blocks run when a GPU exists: stream their weights to it, or "
                             "run locally on the CPU (default: chosen by a bandwidth model of decoding)")
    parser.add_argument("--disk-reads", choices=("mapped", "read"), default=None,
                        help="how disk blocks are brought in: used in place from the page cache (mapped), or read "
                             "explicitly ahead of use (read); default: read when they exceed the CPU memory left")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bigload",
        description="Run models too big for one device: plan where every layer goes, stream the "
                    "checkpoint there, run with offload and prefetch.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    plan = sub.add_parser("plan", help="dry run: which module goes where, without reading any weight",
                          description="Plan a model's placement without reading any weight. MODEL is a "
                                      "catalog name (e.g. llama-3.1-405b), a model folder, a config.json "
                                      "or a checkpoint (headers only).")
    plan.add_argument("model", metavar="MODEL")
    _add_planning_flags(plan)
    plan.add_argument("--hosts", type=int, default=1, metavar="N",
                      help="split the model over N hosts (torchrun ranks): one table per host; --max-memory is "
                           "each host's budget")
    _add_host_flags(plan)
    plan.add_argument("--json", metavar="OUT", type=Path, help="write the plan as JSON to OUT ('-' for stdout)")
    _add_adapter_flag(plan)
    plan.set_defaults(run=_cmd_plan)

    inspect = sub.add_parser("inspect", help="what a checkpoint holds, from headers only",
                             description="Format, shards, tensor count, dtypes, parameters, the largest "
                                         "tensors and the planned blocks of a checkpoint. Reads headers only.")
    inspect.add_argument("checkpoint", metavar="CHECKPOINT")
    inspect.add_argument("--top", type=int, default=10, metavar="N",
                         help="how many of the largest tensors to list (default: 10)")
    inspect.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    inspect.set_defaults(run=_cmd_inspect)

    generate = sub.add_parser("generate", help="load a model folder with offload and generate text",
                              description="Plan, stream and dispatch a Hugging Face model folder, then "
                                          "generate from a prompt, streaming tokens as they come.")
    generate.add_argument("path", metavar="PATH", help="a Hugging Face model folder")
    generate.add_argument("--prompt", required=True, help="the prompt text")
    generate.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                          help="tokens to generate (default: 64)")
    _add_planning_flags(generate)
    generate.add_argument("--offload-folder", type=Path, help="where disk-offloaded weights go")
    _add_adapter_flag(generate)
    sampling = generate.add_mutually_exclusive_group()
    sampling.add_argument("--greedy", action="store_true", help="greedy decoding (the default)")
    sampling.add_argument("--temperature", type=float, help="sample with this temperature")
    generate.add_argument("--top-p", type=float, help="nucleus sampling threshold (with --temperature)")
    generate.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    generate.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    _add_host_flags(generate)
    generate.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS",
                          help="under torchrun: how long any wait between ranks may take (default: 300)")
    generate.set_defaults(run=_cmd_generate)

    demo = sub.add_parser("demo", help="the first thing to run: offloaded generation on a small model",
                          description="Write (once) a small random-weight Llama model folder, plan it with a "
                                      "budget that forces part of it to disk, load, generate, and compare "
                                      "speed and tokens with the same model fully in memory.")
    demo.add_argument("--size", choices=("small", "medium"), default="small",
                      help="small: 11 MiB of weights, medium: 345 MiB (default: small)")
    demo.add_argument("--dir", type=Path, default=None, help="where the demo model is cached "
                      "(default: ~/.cache/bigload/demo-SIZE)")
    demo.add_argument("--max-new-tokens", type=int, default=32, metavar="N",
                      help="tokens generated per run (default: 32)")
    demo.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    demo.set_defaults(run=_cmd_demo)
    return parser


def _add_adapter_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", action="append", type=Path, metavar="PATH",
                        help="a peft adapter folder (repeat for several; the first is active); needs "
                             "`pip install bigload[peft]`")


def _planning_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "adapter": args.adapter,
        "max_memory": args.max_memory,
        "strategy": args.strategy,
        "dtype": args.dtype,
        "context_length": args.context_length,
        "batch_size": args.batch_size,
        "no_split_module_classes": args.no_split,
        "prefetch": args.prefetch,
        "quantize": args.quantize,
        "quantize_skip": args.quantize_skip,
        "policy": args.policy,
        "disk_reads": args.disk_reads,
    }


def _host_budgets(args: argparse.Namespace) -> dict[int, dict[str, str]] | None:
    return dict(args.max_memory_host) if args.max_memory_host else None


def _cmd_plan(args: argparse.Namespace) -> int:
    from bigload.integrations.hf import plan_model

    if args.hosts > 1 or args.max_memory_host:
        from bigload.distributed.startup import plan_model_hosts

        planning = _planning_kwargs(args)
        if planning.pop("adapter", None):
            raise BigloadError("--adapter cannot be combined with --hosts yet; merge the adapter into the base "
                               "model first (peft's merge_and_unload, then save_pretrained).")
        planning.pop("quantize_skip", None)
        if planning.pop("quantize", None):
            raise BigloadError("--quantize cannot be combined with --hosts yet; plan without --quantize, "
                               "or for one machine (no --hosts).")
        if planning.pop("disk_reads", None):
            raise BigloadError("--disk-reads cannot be combined with --hosts yet; plan without --disk-reads, "
                               "or for one machine (no --hosts).")
        result = plan_model_hosts(args.model, args.hosts, max_memory_hosts=_host_budgets(args), **planning)
    else:
        result = plan_model(args.model, **_planning_kwargs(args))
    if args.json is not None and str(args.json) == "-":
        print(result.to_json())
        return 0
    print(result.explain(Audience.CLI))
    if args.adapter:
        from bigload.integrations.hf import describe_adapters

        print()
        print("\n".join(describe_adapters(args.model, args.adapter, result, args.dtype)))
    if args.json is not None:
        args.json.write_text(result.to_json())
        print(f"\nplan written to {args.json}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from bigload.formats.discover import open_checkpoint
    from bigload.cli.summary import summarize

    summary = summarize(open_checkpoint(args.checkpoint), top=args.top)
    print(json.dumps(summary.to_dict(), indent=2) if args.json else summary.render())
    return 0


def _under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _cmd_generate(args: argparse.Namespace) -> int:
    from bigload.cli.session import GenerateOptions, run_generate

    options = GenerateOptions(
        prompt=args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
    )
    if _under_torchrun():
        return _generate_pipeline(args, options)
    report = run_generate(
        args.path, options, offload_folder=args.offload_folder, stream_text=not args.json,
        echo=None if args.json else print, audience=Audience.CLI, **_planning_kwargs(args),
    )
    return _print_report(report, args.json)


def _print_report(report: Any, as_json: bool) -> int:
    """A generate report as one JSON object, or as the summary after the streamed text."""
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print()
        print(report.render_summary())
    return 0


def _generate_pipeline(args: argparse.Namespace, options: Any) -> int:
    """`bigload generate` on one torchrun rank: rank 0 prints, the others serve their blocks silently."""
    from bigload.cli.session import run_generate_pipeline

    report = run_generate_pipeline(
        args.path, options, offload_folder=args.offload_folder, stream_text=not args.json,
        echo=None if args.json else print, max_memory_hosts=_host_budgets(args), timeout=args.timeout,
        progress=False, **_planning_kwargs(args),
    )
    return 0 if report is None else _print_report(report, args.json)


def _cmd_demo(args: argparse.Namespace) -> int:
    from bigload.cli.session import run_demo

    report = run_demo(size=args.size, folder=args.dir, max_new_tokens=args.max_new_tokens,
                      echo=None if args.json else print)
    if args.json:
        print(json.dumps(report, indent=2))
    return 0 if report["tokens_identical"] else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `bigload` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="bigload: %(levelname)s: %(message)s")
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except KeyboardInterrupt:
        print("bigload: interrupted", file=sys.stderr)
        return 130
    except BigloadError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"bigload: error: {exc.render(Audience.CLI)}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError, ValueError) as exc:
        # Unexpected failures still get one line; --debug has the whole story.
        if args.debug:
            traceback.print_exc()
        print(f"bigload: error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
