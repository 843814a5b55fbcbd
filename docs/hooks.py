"""mkdocs hooks: the generated parts of the reference pages.

A page asks for generated text with an HTML comment on a line of its own:

- ``<!-- generate: cli-help -->``: every ``vitmha`` subcommand, a heading each, with the text that
  ``vitmha <command> --help`` prints (run through the installed entry point, ``vitmha.cli.cli_main``);
- ``<!-- generate: config-keys CLASS_PATH -->``: a table of every config key of a task or data module
  (``model.init_args.*`` / ``data.init_args.*``), read from its signature and docstrings by jsonargparse, the
  parser ``vitmha fit`` builds from the same class.

Nothing here is copied by hand, so the pages follow the program. ``python docs/hooks.py cli-help`` prints
the generated Markdown.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import sys
import typing
from functools import lru_cache

MARK = re.compile(r"^<!-- generate: ([\w-]+)(?: ([^>]*?))? -->$", re.M)
HELP_COLUMNS = "100"
LONG_HELP = ("fit", "validate", "test")  # LightningCLI's help lists every Trainer option: folded


def command_help(name: str) -> str:
    """What ``vitmha <name> --help`` prints (``name`` empty: ``vitmha --help``)."""
    from vitmha.cli import cli_main

    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_COLUMNS  # argparse wraps to the terminal: fix the width of the page
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                cli_main([name, "--help"] if name else ["--help"])
            except SystemExit:
                pass
    finally:
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old
    return out.getvalue().rstrip() + "\n"


def _fence(text: str, indent: str = "") -> str:
    body = "".join(f"{indent}{line}\n" if line else "\n" for line in text.splitlines())
    return f"{indent}```text\n{body}{indent}```\n"


@lru_cache(maxsize=None)
def cli_help() -> str:
    from vitmha.cli import COMMANDS

    parts = ["## `vitmha`\n", _fence(command_help(""))]
    for name, (_, summary) in COMMANDS.items():
        summary = summary[0].upper() + summary[1:]
        parts.append(f"\n## `vitmha {name}`\n\n{_escape(summary)}.\n\n")
        text = command_help(name)
        if name in LONG_HELP:
            parts.append(f'??? note "`vitmha {name} --help` (every Trainer option)"\n\n{_fence(text, "    ")}')
        else:
            parts.append(_fence(text))
    return "".join(parts)


def _type_name(hint: typing.Any) -> str:
    if hint is None:
        return ""
    text = getattr(hint, "__name__", None) if isinstance(hint, type) else None
    text = text or str(hint).replace("typing.", "")
    return text.replace("NoneType", "None")


def _escape(text: str) -> str:
    """Markdown that shows ``text`` as written: brackets and asterisks escaped outside code spans, RST's
    double backticks made single."""
    parts = str(text).replace("``", "`").split("`")
    for i in range(0, len(parts), 2):  # even parts are outside code spans
        parts[i] = re.sub(r"([\\[\]*_<])", r"\\\1", parts[i])
    return "`".join(parts)


def _cell(text: str) -> str:
    return _escape(" ".join(str(text).split())).replace("|", "\\|")


def _code_cell(text: str) -> str:
    text = " ".join(str(text).split()).replace("`", "'").replace("|", "\\|")
    return f"`{text}`" if text else ""


@lru_cache(maxsize=None)
def config_keys(class_path: str) -> str:
    """A Markdown table of the class's init arguments: key, type, default, description."""
    import importlib

    from jsonargparse import ArgumentParser

    module, _, name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    parser = ArgumentParser()
    parser.add_class_arguments(cls, "k")
    rows = ["| key | type | default | what |", "|---|---|---|---|"]
    for action in parser._actions:  # jsonargparse keeps the class's arguments as argparse actions
        if not action.dest.startswith("k.") or action.dest == "k.help":
            continue
        default = action.default
        shown = "required" if default is None and getattr(action, "required", False) else repr(default)
        rows.append(f"| `{action.dest[2:]}` | {_code_cell(_type_name(getattr(action, '_typehint', None)))} | "
                    f"{_code_cell(shown)} | {_cell(action.help or '')} |")
    head = (cls.__doc__ or "").strip().split("\n\n")[0]
    return f"{_cell(head)}\n\n" + "\n".join(rows) + "\n"


GENERATORS = {"cli-help": lambda arg: cli_help(), "config-keys": lambda arg: config_keys(arg.strip())}


def expand(markdown: str) -> str:
    """``markdown`` with every generate marker replaced by its text."""

    def one(m: re.Match) -> str:
        kind, arg = m.group(1), m.group(2) or ""
        if kind not in GENERATORS:
            raise ValueError(f"unknown generate marker {kind!r}; expected one of {', '.join(GENERATORS)}")
        return GENERATORS[kind](arg)

    return MARK.sub(one, markdown)


def on_page_markdown(markdown: str, page: typing.Any, config: typing.Any, files: typing.Any) -> str:
    return expand(markdown)


if __name__ == "__main__":
    print(expand("\n".join(f"<!-- generate: {' '.join(sys.argv[1:])} -->" for _ in [0])))
