"""messages.py: one message, spelled for Python callers and for people at a shell."""

import json

import pytest

from bigload.errors import BigloadError, OffloadError
from bigload.messages import Audience, Setting, Text, render, setting


def test_setting_spells_keyword_and_flag():
    assert setting("offload_folder", "", "DIR") == Setting("offload_folder=", "--offload-folder DIR")
    assert setting("policy", "'local'") == Setting("policy='local'", "--policy local")
    assert setting("max_memory") == Setting("max_memory", "--max-memory")


def test_text_is_the_python_spelling_and_renders_the_cli_one():
    inner = Text("pass ", setting("offload_folder", "", "DIR"))
    text = Text("no folder; ", inner, ".")
    assert text == "no folder; pass offload_folder=."
    assert json.loads(json.dumps([text])) == ["no folder; pass offload_folder=."]
    assert text.render(Audience.CLI) == "no folder; pass --offload-folder DIR."
    assert render("plain", Audience.CLI) == "plain"


def test_error_renders_for_its_reader():
    error = OffloadError(Text("no offload folder; pass ", setting("offload_folder", "", "DIR"), "."))
    with pytest.raises(BigloadError, match="pass offload_folder=") as info:
        raise error
    assert info.value.render(Audience.CLI) == "no offload folder; pass --offload-folder DIR."
    assert OffloadError("plain message").render(Audience.CLI) == "plain message"
