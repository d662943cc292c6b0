"""The `bigload` command: argument parsing and printing (`commands`), load-generate-measure sessions
(`session`), the demo's model (`demo`) and checkpoint summaries for `bigload inspect` (`summary`)."""

from bigload.cli.commands import main

__all__ = ["main"]
