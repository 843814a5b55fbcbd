"""Every fenced block of README.md and docs/**/*.md runs, parses, or is marked as not run with a reason.

How a block is treated (docs/testing-docs.md explains it for writers):

- ``bash``/``sh``/``console``: ``vitmha ... --help``, ``vitmha ... --print_config`` and blocks marked
  ``exit N`` are **executed** through the installed entry point (``vitmha.cli.cli_main``) in a temporary
  folder with tiny stand-ins (``my_data/``, ``last.ckpt``, ...); every other ``vitmha X`` command is
  **parsed** by X's own parser without running (``--print_config`` for fit/validate/test, the argparse
  parser otherwise); ``python -c CODE`` is executed; other commands must name files that exist.
- ``python``: executed in one namespace per page (tiny models, the real ViT-Ti from ../shared/weights
  through an offline Hugging Face cache), or, marked, compiled and its imports resolved.
- ``yaml``: loaded, and its ``model:``/``data:`` keys must be arguments of the classes it names (a search
  file goes through :func:`vitmha.search.space.parse_space`).
- ``<!-- docs-test: parse-only (REASON) -->`` before a block: not run (GPU, hours, installs packages,
  a cluster), still parsed as above; counted as skipped, with its reason.
- a ``text`` block marked ``output`` must appear (line by line, ``…`` for any text) in what the block before
  it printed; one marked ``help CMD`` in ``vitmha CMD --help``.

A block none of this covers fails with its page and line. ``test_counts`` prints the counts.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import glob
import importlib
import inspect
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SHELL = {"bash", "sh", "shell", "console"}
CHECKED = SHELL | {"python", "py", "yaml", "yml"}
LIGHTNING = {"fit", "validate", "test"}
MARK = re.compile(r"<!--\s*docs-test:\s*(.*?)\s*-->")
DIRECTIVE_SEP = re.compile(r";\s*(?=(?:parse-only|exit|sub|output|help)\b)")
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
LINKED = ("configs", "tools", "benchmarks", "data")  # what the blocks' commands read from the repository
FILE_ARG = re.compile(r"^(configs|tools|benchmarks)/[\w./*-]+$")


@dataclasses.dataclass
class Block:
    page: Path
    line: int
    lang: str
    code: str
    directives: List[str]
    index: int  # position among the page's blocks

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    def directive(self, name: str) -> Optional[str]:
        for d in self.directives:
            if d == name or d.startswith(name + " "):
                return d[len(name):].strip()
        return None

    @property
    def reason(self) -> Optional[str]:
        text = self.directive("parse-only")
        if text is None:
            return None
        m = re.fullmatch(r"\((.+)\)", text)
        assert m, f"{self.where}: parse-only needs a reason in parentheses"
        return m.group(1)


def read_blocks(page: Path) -> List[Block]:
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.groups()
        j = i + 1
        while j < len(lines) and not re.match(rf"^\s*{re.escape(fence)}\s*$", lines[j]):
            j += 1
        k = i - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        directives: List[str] = []
        if k >= 0 and (mm := MARK.fullmatch(lines[k].strip())):
            directives = [d.strip() for d in DIRECTIVE_SEP.split(mm.group(1)) if d.strip()]
        code = "\n".join(ln[len(indent):] if ln.startswith(indent) else ln for ln in lines[i + 1:j])
        blocks.append(Block(page, i + 1, lang.lower(), code, directives, len(blocks)))
        i = j + 1
    return blocks


BLOCKS = [b for p in PAGES for b in read_blocks(p)]
RESULTS: Dict[str, str] = {}  # where -> executed | parsed | skipped (REASON) | output | help


# ----------------------------------------------------------------------------------------- the sandbox
@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, real_weights):
    """A folder with links to the repository's configs/, tools/, benchmarks/, data/, the real ViT-Ti
    weights, tiny ``my_data/``, ``my_images/``, ``last.ckpt`` and ``seg.ckpt``, and an offline HF cache."""
    from huggingface_hub import constants

    from tests.helpers import build_checkpoints, make_folder
    from vitmha.models.hub import seed_hf_cache

    base = tmp_path_factory.mktemp("docs")
    for name in LINKED:
        (base / name).symlink_to(ROOT / name)
    (base / real_weights.name).symlink_to(real_weights)
    make_folder(base / "my_data")
    (base / "my_images").mkdir()
    for i, name in enumerate(("a.png", "b.png")):
        (base / "my_images" / name).symlink_to(base / "my_data" / "test" / "blue" / f"blue{i}.png")
    ckpts = build_checkpoints(tmp_path_factory.mktemp("docs_ckpts"))
    (base / "last.ckpt").symlink_to(ckpts["clf"])
    (base / "seg.ckpt").symlink_to(ckpts["seg"])
    cache = base / "hf_cache"
    seed_hf_cache("vit_tiny_patch16_224.augreg_in21k_ft_in1k", real_weights, cache_dir=cache)
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("HF_HUB_CACHE", str(cache))
    mp.setattr(constants, "HF_HUB_OFFLINE", True)
    mp.setattr(constants, "HF_HUB_CACHE", str(cache))
    mp.setenv("COLUMNS", "100")
    mp.chdir(base)
    yield base
    mp.undo()


class _Parsed(Exception):
    """Raised in place of running a subcommand once its parser accepted the arguments."""


def _run_vitmha(argv: List[str]) -> tuple[int, str]:
    """``vitmha *argv`` in this process: (exit code, stdout + stderr)."""
    from vitmha.cli import cli_main

    out = io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            cli_main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return code, out.getvalue()


def _parse_vitmha(argv: List[str]) -> str:
    """Check ``vitmha *argv`` against its subcommand's parser, running nothing; returns the parser's output."""
    if argv[0] in LIGHTNING:
        code, out = _run_vitmha([*argv, "--print_config"])
        assert code == 0, f"vitmha {shlex.join(argv)} --print_config exited {code}:\n{out[-2000:]}"
        return out
    real = argparse.ArgumentParser.parse_known_args

    def parse_then_stop(self, args=None, namespace=None):
        result = real(self, args, namespace)
        if self.prog.startswith("vitmha"):
            raise _Parsed(self.prog)
        return result

    argparse.ArgumentParser.parse_known_args = parse_then_stop  # parse_args calls it too
    try:
        code, out = _run_vitmha(argv)
    except _Parsed:
        return ""
    finally:
        argparse.ArgumentParser.parse_known_args = real
    raise AssertionError(f"vitmha {shlex.join(argv)}: the parser did not accept it (exit {code}):\n{out[-2000:]}")


# ------------------------------------------------------------------------------------------- shell
def _commands(code: str) -> List[List[str]]:
    """The block's commands as argument lists: continuations joined, comments dropped, split at && ; |."""
    text = re.sub(r"\\\n", " ", code)
    commands: List[List[str]] = []
    for line in text.splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lex.whitespace_split = True
        lex.commenters = "#"
        current: List[str] = []
        for tok in lex:
            if tok and set(tok) <= set(";&|"):
                if current:
                    commands.append(current)
                current = []
            else:
                current.append(tok)
        if current:
            commands.append(current)
    return commands


def _strip_env(cmd: List[str]) -> List[str]:
    while cmd and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", cmd[0]):
        cmd = cmd[1:]
    return cmd


def _vitmha_argv(cmd: List[str]) -> Optional[List[str]]:
    if cmd and Path(cmd[0]).name == "vitmha":
        return [a for arg in cmd[1:] for a in (sorted(glob.glob(arg)) or [arg] if "*" in arg else [arg])]
    return None


def _check_files(cmd: List[str], where: str) -> None:
    for arg in cmd:
        for part in arg.split("="):
            if FILE_ARG.match(part) and "*" not in part:
                assert (ROOT / part).exists(), f"{where}: {part} does not exist"


def _is_fast(argv: List[str]) -> bool:
    return not argv or argv[-1] in ("--help", "-h", "--print_config") or argv[0] in ("--help", "-h")


def check_shell(block: Block, outputs: Dict[int, str]) -> str:
    assert subprocess.run(["bash", "-n"], input=block.code, text=True, capture_output=True).returncode == 0, \
        f"{block.where}: not valid shell"
    commands = [_strip_env(c) for c in _commands(block.code)]
    expect_exit = block.directive("exit")
    reason = block.reason
    executed, printed = True, []
    made: Dict[str, str] = {}  # --output folder of an earlier command -> the --config it ran with
    for n, cmd in enumerate(commands):
        if not cmd:
            continue
        _check_files(cmd, block.where)
        argv = _vitmha_argv(cmd)
        if argv is not None:
            if argv and argv[0] not in ("--help", "-h", "--version", "-V"):
                from vitmha.cli import COMMANDS

                assert argv[0] in COMMANDS, f"{block.where}: vitmha {argv[0]}: no such command"
            last = n == len(commands) - 1
            given = dict(zip(argv, argv[1:]))
            if "--output" in given and "--config" in given:
                made[given["--output"].rstrip("/")] = given["--config"]
            if "--config" in given and not Path(given["--config"]).exists():
                # a config an earlier command of the block writes (a search's best.yaml): parse with the one it
                # was made from
                source = next((c for out, c in made.items() if given["--config"].startswith(out + "/")), None)
                assert source, f"{block.where}: {given['--config']} does not exist"
                argv = [source if a == given["--config"] else a for a in argv]
            if reason is None and (expect_exit is not None or _is_fast(argv)):
                code, out = _run_vitmha(argv)
                want = int(expect_exit) if expect_exit is not None and last else 0
                assert code == want, f"{block.where}: vitmha {shlex.join(argv)} exited {code}, not {want}:\n{out[-3000:]}"
                printed.append(out)
            else:
                printed.append(_parse_vitmha(argv))
                executed = False
        elif cmd[0] in ("python", "python3") and len(cmd) == 3 and cmd[1] == "-c":
            _check_imports(ast.parse(cmd[2]), block.where)
            if reason is not None:
                executed = False
                continue
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                exec(compile(cmd[2], block.where, "exec"), {"__name__": "__docs__"})
            printed.append(out.getvalue())
        else:
            for arg in cmd[1:]:  # a script run by an interpreter must exist
                if arg.endswith(".py") and not arg.startswith("-"):
                    assert (ROOT / arg).is_file(), f"{block.where}: {arg} does not exist"
            assert reason is not None, (f"{block.where}: `{shlex.join(cmd)}` is not a vitmha command; mark the "
                                        "block <!-- docs-test: parse-only (REASON) -->")
            executed = False
    outputs[block.index] = "\n".join(printed)
    if reason is not None:
        return f"skipped ({reason})"
    return "executed" if executed else "parsed"


# ------------------------------------------------------------------------------------------ python
def _check_imports(tree: ast.AST, where: str) -> None:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                importlib.import_module(alias.name)
        elif isinstance(node, ast.ImportFrom) and node.module:
            module = importlib.import_module(node.module)
            for alias in node.names:
                assert hasattr(module, alias.name) or importlib.util.find_spec(f"{node.module}.{alias.name}"), \
                    f"{where}: {node.module} has no {alias.name}"
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "vitmha":
            import vitmha

            assert hasattr(vitmha, node.attr), f"{where}: vitmha has no {node.attr}"


def check_python(block: Block, namespaces: Dict[Path, dict], outputs: Dict[int, str]) -> str:
    code = block.code
    for d in block.directives:
        if d.startswith("sub "):
            old, new = (s.strip() for s in d[4:].split("=>"))
            assert old in code, f"{block.where}: sub {old!r} not in the block"
            code = code.replace(old, new)
    tree = ast.parse(code, block.where)
    _check_imports(tree, block.where)
    if block.reason is not None:
        return f"skipped ({block.reason})"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(tree, block.where, "exec"), namespaces.setdefault(block.page, {"__name__": "__docs__"}))
    outputs[block.index] = out.getvalue()
    return "executed"


# -------------------------------------------------------------------------------------------- yaml
def _class_keys(class_path: str) -> Optional[set]:
    module, _, name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None  # takes any keyword
    return set(params) - {"self"}


def check_yaml(block: Block) -> str:
    doc = yaml.safe_load(block.code)
    assert isinstance(doc, dict), f"{block.where}: not a mapping"
    if "space" in doc:
        from vitmha.search.space import parse_space

        parse_space(doc, block.where)
        return "parsed"
    sections = [k for k in ("model", "data") if k in doc]
    assert sections, f"{block.where}: a config block needs model: or data:"
    for section in sections:
        node = doc[section]
        assert "class_path" in node, f"{block.where}: {section}: needs class_path"
        keys = _class_keys(node["class_path"])
        given = set(node.get("init_args") or {})
        if keys is not None:
            assert given <= keys, f"{block.where}: {section}: {sorted(given - keys)} not arguments of {node['class_path']}"
    return "parsed" if block.reason is None else f"skipped ({block.reason})"


# ---------------------------------------------------------------------------------------- text checks
def _lines_in(expected: str, text: str, where: str) -> None:
    flat = " ".join(text.split())
    for line in expected.splitlines():
        if not line.strip():
            continue
        pattern = ".*?".join(re.escape(" ".join(p.split())) for p in line.split("…"))
        assert re.search(pattern, flat), f"{where}: {line!r} is not in what the program printed:\n{text[-3000:]}"


# ------------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def state():
    return {"namespaces": {}, "outputs": {}, "kinds": {}}


@pytest.mark.parametrize("block", BLOCKS, ids=[b.where for b in BLOCKS])
def test_block(block: Block, sandbox, state) -> None:
    outputs = state["outputs"].setdefault(block.page, {})
    if block.lang in SHELL:
        kind = check_shell(block, outputs)
    elif block.lang in ("python", "py"):
        kind = check_python(block, state["namespaces"], outputs)
    elif block.lang in ("yaml", "yml"):
        kind = check_yaml(block)
    elif block.directive("output") is not None:
        before = state["kinds"].get((block.page, block.index - 1), "")
        assert before, f"{block.where}: an output block must follow a shell or python block"
        if before == "executed":
            _lines_in(block.code, state["outputs"][block.page][block.index - 1], block.where)
            kind = "output"
        else:  # the command before was parsed, not run: its quoted output cannot be compared
            kind = "output not compared"
    elif (cmd := block.directive("help")) is not None:
        code, out = _run_vitmha([*([] if cmd == "-" else shlex.split(cmd)), "--help"])
        _lines_in(block.code, out, block.where)
        kind = "help"
    else:
        assert block.lang not in CHECKED and not block.directives, f"{block.where}: a {block.lang} block with {block.directives}"
        kind = "unchecked"
    RESULTS[block.where] = kind
    state["kinds"][(block.page, block.index)] = kind


def test_counts(capsys) -> None:
    """Every checked block was executed, parsed or skipped with a reason (run after test_block)."""
    checked = [b for b in BLOCKS if b.lang in CHECKED]
    missing = [b.where for b in checked if b.where not in RESULTS]
    assert not missing, f"blocks neither executed, parsed nor skipped: {missing}"
    counts = {k: sum(1 for b in checked if RESULTS[b.where].startswith(k)) for k in ("executed", "parsed", "skipped")}
    quoted = {k: sum(1 for v in RESULTS.values() if v == k) for k in ("output", "help", "output not compared")}
    assert sum(counts.values()) == len(checked)
    with capsys.disabled():
        print(f"\ndocs blocks: {len(checked)} shell/python/yaml: {counts['executed']} executed, {counts['parsed']} "
              f"parsed, {counts['skipped']} skipped with a reason; {quoted['output']} quoted outputs and "
              f"{quoted['help']} quoted --help texts compared; {quoted['output not compared']} quoted outputs of "
              "parsed-only commands not compared")
        for b in checked:
            if RESULTS[b.where].startswith("skipped"):
                print(f"  {b.where}: {RESULTS[b.where]}")
        for where, kind in RESULTS.items():
            if kind == "output not compared":
                print(f"  {where}: output not compared (the command before it is parsed only)")


# ----------------------------------------------------------------------------------- page-level rules
def test_readme_is_a_front_page() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines (at most 200)"
    first = "\n".join(lines[:80])
    assert re.search(r"vitmha fit .*--model\.init_args\.pretrained true|pretrained: true", first), \
        "README.md: the fine-tune-your-folder command with pretrained true is not in the first 80 lines"
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "bash .ci/run" in "\n".join(lines), "README.md must give the test command (bash .ci/run)"
    assert re.search(r"^\.venv/bin/python -m pytest", ci, re.M), ".ci/run must run pytest"


HISTORY = re.compile(r"\b(now|since|used to|no longer|before it became)\b", re.I)


@pytest.mark.parametrize("page", [p for p in PAGES if p.name not in ("changelog.md",)],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_no_history(page: Path) -> None:
    """No history sentences outside the changelog (code blocks and 'since' in its 'because' sense aside)."""
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.M | re.S)
    text = re.sub(r"`[^`]*`", "", text)
    hits = [m.group(0) for m in HISTORY.finditer(text)]
    if page.parent.name == "guides" or page.name == "README.md":
        assert not hits, f"{page.relative_to(ROOT)}: history words {hits}"


def test_internal_links() -> None:
    """Every relative link of README.md and docs/ points to a file that exists (the site build checks anchors)."""
    bad = []
    for page in PAGES:
        text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.M | re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            if not path.exists():
                bad.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not bad, bad


def test_config_reference_lists_every_task_and_data_module() -> None:
    """docs/reference/config.md generates the keys of every task and data module the package exports."""
    import lightning.pytorch as L

    import vitmha.data
    import vitmha.tasks

    page = (ROOT / "docs" / "reference" / "config.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"<!-- generate: config-keys ([\w.]+) -->", page))
    base = {vitmha.tasks.BackboneTask, vitmha.tasks.SupervisedTask}
    wanted = {f"{module.__name__}.{name}" for module in (vitmha.tasks, vitmha.data) for name in module.__all__
              if isinstance(cls := getattr(module, name), type) and cls not in base
              and issubclass(cls, (L.LightningModule, L.LightningDataModule))}
    assert wanted <= listed, f"docs/reference/config.md lacks {sorted(wanted - listed)}"
    api = (ROOT / "docs" / "reference" / "api.md").read_text(encoding="utf-8")
    documented = {path.rsplit(".", 1)[-1] for path in re.findall(r"^::: ([\w.]+)", api, re.M)}
    missing = {path.rsplit(".", 1)[-1] for path in wanted} - documented
    assert not missing, f"docs/reference/api.md lacks {sorted(missing)}"


def test_cli_reference_is_generated() -> None:
    """docs/reference/cli.md is generated from every subcommand's --help (docs/hooks.py)."""
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import hooks
    finally:
        sys.path.remove(str(ROOT / "docs"))
    from vitmha.cli import COMMANDS

    assert "<!-- generate: cli-help -->" in (ROOT / "docs" / "reference" / "cli.md").read_text(encoding="utf-8")
    text = hooks.cli_help()
    for name in COMMANDS:
        assert f"## `vitmha {name}`" in text and f"usage: vitmha" in text, name


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_config_headers_are_short(config: Path) -> None:
    header = []
    for line in config.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    assert len(header) <= 10, f"{config.name}: a {len(header)}-line header (at most 10)"
