"""Every command's and subcommand's `--help` renders, says what it was given to say, and names the extras.

typer renders help text as rich markup, where `[word]` is a style tag: text such as
`pip install 'kvblend[vllm]'` or `blend[key=value]` is silently dropped unless escaped (`\\[`).
"""
import inspect
import re

import pytest
import typer.main
from typer.testing import CliRunner

from kvblend.cli import app

runner = CliRunner()
ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
BOX = re.compile(r"[│╭╮╰╯─┌┐└┘├┤┬┴┼]")


def _commands(command, path=()):
    yield path, command
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        yield from _commands(sub, path + (name,))


COMMANDS = list(_commands(typer.main.get_command(app)))


def _flat(text: str) -> str:
    return " ".join(BOX.sub(" ", ANSI.sub("", text)).split())


def _plain(help_text: str) -> str:
    """What a help string should read as on screen: escaped brackets as brackets, whitespace collapsed."""
    return " ".join(help_text.replace("\\[", "[").split())


def render(path) -> str:
    res = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "1000", "TERMINAL_WIDTH": "1000"})
    assert res.exit_code == 0, (path, res.output)
    return _flat(res.output)


def _texts(command) -> list[str]:
    """The help strings kvblend wrote for a command: its docstring's paragraphs and each parameter's help."""
    texts = [p for p in re.split(r"\n\s*\n", inspect.cleandoc(command.help or "")) if p.strip()]
    texts += [p.help for p in command.params if getattr(p, "help", None)]
    return texts


@pytest.mark.parametrize("path", [p for p, _ in COMMANDS], ids=lambda p: " ".join(p) or "kvblend")
def test_help_renders_every_help_string_whole(path):
    command = dict(COMMANDS)[path]
    out = render(path)
    for text in _texts(command):
        if "\b" in text:  # click's no-rewrap marker: paragraphs kept as typed
            text = text.replace("\b", "")
        for bracketed in re.findall(r"\[[^\[\]]*\]", _plain(text)):
            assert bracketed in out, f"kvblend {' '.join(path)} --help lost {bracketed!r} (rich markup: escape it as \\[)"
        assert _plain(text) in out, f"kvblend {' '.join(path)} --help does not show: {_plain(text)!r}"


def test_every_command_with_an_engine_option_names_the_vllm_extra():
    with_engine = [path for path, command in COMMANDS if any(p.name == "engine" for p in command.params)]
    assert {("eval",), ("generate",), ("ask",)} <= set(with_engine)
    for path in with_engine:
        assert "pip install 'kvblend[vllm]'" in render(path), path


@pytest.mark.parametrize("path, extras", [
    (("serve",), ["kvblend[vllm]"]),
    (("precompute",), ["kvblend[corpus]", "kvblend[index]", "kvblend[embed]"]),
    (("ask",), ["kvblend[vllm]", "kvblend[embed]"]),
    (("store", "stats"), ["kvblend[redis]"]),
])
def test_help_names_the_extra_each_feature_needs(path, extras):
    out = render(path)
    for extra in extras:
        assert extra in out, f"kvblend {' '.join(path)} --help does not mention {extra}"


def test_the_help_of_the_whole_tool_lists_every_command():
    out = render(())
    for name in dict(COMMANDS[0][1].commands):
        assert name in out
