"""The `bigload` command line: plan, inspect, generate, demo.

Argument parsing, printing and exit codes only; every decision is made by the library. Errors print as
"bigload: error: ..." with no traceback (one line, or a few when the message carries a breakdown, such as
the does-not-fit shortfall per device) and exit non-zero (2 for bigload's own errors: bad input, a model
that does not fit; 1 for anything unexpected); `--debug` shows the traceback. Messages name settings as
flags (`--offload-folder`), not as the library's Python keywords. Flag values are checked while arguments are
read (`bigload.cli.flags`) and flags that only mean something together at the start of each command, so a
bad value never waits for a load (exit 2 either way). A reader that closes the pipe (`bigload plan ... | head`)
ends the command quietly with the status a shell gives a tool SIGPIPE ended (141).
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

from bigload.cli.flags import (
    load_dtype,
    parse_host_max_memory_arg,
    parse_max_memory_arg,
    positive_number,
    probability,
    prompt_text,
    seed,
    whole_number,
)
from bigload.cli.session import GenerateOptions, run_demo, run_generate, run_generate_pipeline
from bigload.cli.summary import summarize
from bigload.devices import ExecutionPolicy
from bigload.distributed.startup import plan_model_hosts
from bigload.errors import BigloadError
from bigload.formats.discover import open_checkpoint
from bigload.integrations.hf import describe_adapters, plan_model
from bigload.messages import Audience

__all__ = ["main"]

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
POLICIES = tuple(policy.value for policy in ExecutionPolicy)
# The exit status a shell reports for a tool that SIGPIPE ended (128 + 13): what `bigload ... | head` returns
# when head stops reading, as `yes | head` or `git log | head` do.
CLOSED_PIPE_EXIT = 141


def _add_host_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-memory-host", type=parse_host_max_memory_arg, action="append", default=None,
                        metavar="HOST:DEV=SIZE,...",
                        help="the budget of one host (rank) that differs from --max-memory, e.g. "
                             "1:0=80GiB,cpu=512GiB; repeat for several hosts")


def _add_planning_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-memory", type=parse_max_memory_arg, metavar="DEV=SIZE,...",
                        help="budgets per device, e.g. 0=24GiB,1=24GiB,cpu=64GiB,disk=500GiB "
                             "(GiB binary, GB decimal). Default: what this machine has.")
    parser.add_argument("--strategy", choices=STRATEGIES, default="auto",
                        help="auto: balanced over several GPUs, else sequential (default: auto)")
    parser.add_argument("--dtype", type=load_dtype,
                        help="dtype of the weights once loaded: bfloat16, float16, float32 or float64 "
                             "(default: the model's)")
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

    for add in (_add_plan, _add_inspect, _add_generate, _add_demo):
        add(sub)
    return parser


def _add_plan(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`bigload plan`: a dry run, no weight read."""
    plan = sub.add_parser("plan", help="dry run: which module goes where, without reading any weight",
                          description="Plan a model's placement without reading any weight. MODEL is a "
                                      "catalog name (e.g. llama-3.1-405b), a model folder, a config.json "
                                      "or a checkpoint (headers only).")
    plan.add_argument("model", metavar="MODEL")
    _add_planning_flags(plan)
    plan.add_argument("--hosts", type=whole_number(1, "hosts to split the model over"), default=1, metavar="N",
                      help="split the model over N hosts (torchrun ranks): one table per host; --max-memory is "
                           "each host's budget")
    _add_host_flags(plan)
    plan.add_argument("--json", metavar="OUT", type=Path, help="write the plan as JSON to OUT ('-' for stdout)")
    _add_adapter_flag(plan)
    plan.set_defaults(run=_cmd_plan)


def _add_inspect(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`bigload inspect`: what a checkpoint holds, from headers."""
    inspect = sub.add_parser("inspect", help="what a checkpoint holds, from headers only",
                             description="Format, shards, tensor count, dtypes, parameters, the largest "
                                         "tensors and the planned blocks of a checkpoint. Reads headers only.")
    inspect.add_argument("checkpoint", metavar="CHECKPOINT")
    inspect.add_argument("--top", type=whole_number(0, "largest tensors to list"), default=10, metavar="N",
                         help="how many of the largest tensors to list (default: 10)")
    inspect.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    inspect.set_defaults(run=_cmd_inspect)


def _add_generate(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`bigload generate`: load a model folder and generate."""
    generate = sub.add_parser("generate", help="load a model folder with offload and generate text",
                              description="Plan, stream and dispatch a Hugging Face model folder, then "
                                          "generate from a prompt, streaming tokens as they come.")
    generate.add_argument("path", metavar="PATH", help="a Hugging Face model folder")
    generate.add_argument("--prompt", type=prompt_text, required=True, help="the prompt text")
    generate.add_argument("--max-new-tokens", type=whole_number(1, "tokens to generate"), default=64, metavar="N",
                          help="tokens to generate (default: 64)")
    _add_planning_flags(generate)
    generate.add_argument("--offload-folder", type=Path, help="where disk-offloaded weights go")
    _add_adapter_flag(generate)
    sampling = generate.add_mutually_exclusive_group()
    sampling.add_argument("--greedy", action="store_true", help="greedy decoding (the default)")
    sampling.add_argument("--temperature", type=positive_number("a sampling temperature such as 0.7; for greedy "
                                                                 "decoding leave --temperature out"),
                          help="sample with this temperature (above 0)")
    generate.add_argument("--top-p", type=probability,
                          help="nucleus sampling threshold from 0 to 1 (with --temperature)")
    generate.add_argument("--seed", type=seed, default=0, help="random seed for sampling")
    generate.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    _add_host_flags(generate)
    generate.add_argument("--timeout", type=positive_number("seconds"), default=300.0, metavar="SECONDS",
                          help="under torchrun: how long any wait between ranks may take (default: 300)")
    generate.set_defaults(run=_cmd_generate)


def _add_demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`bigload demo`: offloaded generation on a small random-weight model."""
    demo = sub.add_parser("demo", help="the first thing to run: offloaded generation on a small model",
                          description="Write (once) a small random-weight Llama model folder, plan it with a "
                                      "budget that forces part of it to disk, load, generate, and compare "
                                      "speed and tokens with the same model fully in memory.")
    demo.add_argument("--size", choices=("small", "medium"), default="small",
                      help="small: 11 MiB of weights, medium: 345 MiB (default: small)")
    demo.add_argument("--dir", type=Path, default=None, help="where the demo model is cached "
                      "(default: ~/.cache/bigload/demo-SIZE)")
    demo.add_argument("--max-new-tokens", type=whole_number(1, "tokens to generate"), default=32, metavar="N",
                      help="tokens generated per run (default: 32)")
    demo.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    demo.set_defaults(run=_cmd_demo)


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


def _check_host_budgets(args: argparse.Namespace, hosts: int | None, hosts_flag: str) -> None:
    """Each `--max-memory-host` names a host once, and a host the run has (`hosts`; None: not a run across
    hosts, where the flag would be ignored)."""
    named = [host for host, _ in args.max_memory_host or ()]
    if not named:
        return
    if hosts is None:
        raise BigloadError("--max-memory-host gives one rank's budget in a run under torchrun; this run has one "
                           "process, so use --max-memory for its budget.")
    twice = sorted({host for host in named if named.count(host) > 1})
    if twice:
        raise BigloadError(f"--max-memory-host gives host {twice[0]} more than once; give each host once.")
    outside = sorted(host for host in named if host >= hosts)
    if outside:
        known = "host 0 only" if hosts == 1 else f"hosts 0 to {hosts - 1}"
        raise BigloadError(f"--max-memory-host names host {outside[0]}, but {hosts_flag} means {known}; name those "
                           "hosts, or run with more.")


def _check_plan_args(args: argparse.Namespace) -> None:
    """What plan's flags mean together, checked before anything is planned."""
    _check_host_budgets(args, args.hosts, f"--hosts {args.hosts}")
    if args.json is not None and str(args.json) != "-" and not args.json.parent.is_dir():
        raise BigloadError(f"--json {args.json}: the folder {args.json.parent} does not exist; write the plan into "
                           "an existing folder, or '-' for stdout.")


def _check_generate_args(args: argparse.Namespace) -> None:
    """What generate's flags mean together, checked before anything is loaded."""
    if args.top_p is not None and args.temperature is None:
        raise BigloadError(f"--top-p {args.top_p} applies to sampling, and this run decodes greedily; add "
                           "--temperature T (e.g. 0.7) to sample, or drop --top-p.")
    world = _world_size()
    _check_host_budgets(args, world if world > 1 else None, f"WORLD_SIZE={world}")


def _cmd_plan(args: argparse.Namespace) -> int:
    _check_plan_args(args)

    if args.hosts > 1 or args.max_memory_host:

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

        print()
        print("\n".join(describe_adapters(args.model, args.adapter, result, args.dtype)))
    if args.json is not None:
        args.json.write_text(result.to_json())
        print(f"\nplan written to {args.json}")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:

    summary = summarize(open_checkpoint(args.checkpoint), top=args.top)
    print(json.dumps(summary.to_dict(), indent=2) if args.json else summary.render())
    return 0


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _under_torchrun() -> bool:
    return _world_size() > 1


def _cmd_generate(args: argparse.Namespace) -> int:
    _check_generate_args(args)

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

    report = run_generate_pipeline(
        args.path, options, offload_folder=args.offload_folder, stream_text=not args.json,
        echo=None if args.json else print, max_memory_hosts=_host_budgets(args), timeout=args.timeout,
        progress=False, **_planning_kwargs(args),
    )
    return 0 if report is None else _print_report(report, args.json)


def _cmd_demo(args: argparse.Namespace) -> int:

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
        code = run(args)
        sys.stdout.flush()  # into a pipe, output waits in a buffer: a closed pipe shows here, not at exit
        return code
    except BrokenPipeError:
        return _reader_went_away()
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


def _reader_went_away() -> int:
    """stdout's reader closed the pipe (`bigload plan ... | head`): a normal way to stop reading, so no message.
    stdout is pointed at /dev/null first, so Python's own flush at exit does not fail on the pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is no file (captured in a test): nothing is flushed to it at exit
        pass
    return CLOSED_PIPE_EXIT


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
