"""Text shown to people, naming settings the way the reader types them.

The same sentence reaches a Python caller and a person at a shell: "pass offload_folder=" in Python is
"pass --offload-folder" on the command line. A message is built once, where the failure (or decision) is
known, from plain strings and `Setting`s; whoever shows it picks the audience. The library never chooses:
`str(text)` is the Python spelling (what `str(exc)` and logs show), and the CLI calls
`render(text, Audience.CLI)`.

This module is a leaf: it imports nothing from bigload, so the pure planner can build its reasons with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

__all__ = ["Audience", "Setting", "Text", "render", "setting"]


class Audience(Enum):
    """Who reads a message: a Python caller (keywords) or a person at a shell (flags)."""

    PYTHON = "python"
    CLI = "cli"


@dataclass(frozen=True)
class Setting:
    """One setting named in a message, in each audience's spelling.

    >>> Setting("prefetch=0", "--prefetch 0").render(Audience.CLI)
    '--prefetch 0'
    """

    python: str
    cli: str

    def render(self, audience: Audience) -> str:
        return self.cli if audience is Audience.CLI else self.python


def setting(keyword: str, python_value: str | None = None, cli_value: str | None = None) -> Setting:
    """A `Setting` for a keyword argument whose CLI flag is the keyword with dashes.

    Args:
        keyword: the Python keyword, e.g. "offload_folder" (flag `--offload-folder`).
        python_value: what follows `keyword=` in Python (e.g. "'local'"); None names the keyword alone.
        cli_value: what follows the flag on the command line; default: `python_value` without quotes.

    >>> setting("policy", "'local'")
    Setting(python="policy='local'", cli='--policy local')
    >>> setting("max_memory")
    Setting(python='max_memory', cli='--max-memory')
    """
    flag = "--" + keyword.replace("_", "-")
    if python_value is None:
        return Setting(keyword, flag)
    shell = cli_value if cli_value is not None else python_value.strip("'\"")
    return Setting(f"{keyword}={python_value}", f"{flag} {shell}")


class Text(str):
    """A message made of plain strings and `Setting`s.

    It is a `str` (the Python spelling), so it goes wherever text goes (exceptions, logs, a plan's reasons,
    JSON); `render(audience)` spells its settings for another audience. Text concatenated with `+` or put
    in an f-string becomes a plain `str` (the Python spelling): build composite messages with `Text(...)`,
    which flattens nested `Text` parts.

    >>> msg = Text("no offload folder; pass ", setting("offload_folder"), ".")
    >>> str(msg), msg.render(Audience.CLI)
    ('no offload folder; pass offload_folder.', 'no offload folder; pass --offload-folder.')
    """

    parts: tuple[str | Setting, ...]

    def __new__(cls, *parts: str | Setting) -> Text:
        flat: list[str | Setting] = []
        for part in parts:
            flat.extend(part.parts if isinstance(part, Text) else (part,))
        text = super().__new__(cls, "".join(p.python if isinstance(p, Setting) else p for p in flat))
        text.parts = tuple(flat)
        return text

    def render(self, audience: Audience) -> str:
        return "".join(p.render(audience) if isinstance(p, Setting) else p for p in self.parts)


def render(text: object, audience: Audience) -> str:
    """`text` spelled for `audience`; anything that is not a `Text` is shown as `str(text)`."""
    return text.render(audience) if isinstance(text, Text) else str(text)
