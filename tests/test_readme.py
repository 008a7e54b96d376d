"""The README and docs/*.md stay true: every fenced python block runs (one namespace per file, in order),
every `symgrad derive` line of their sh blocks runs, and every other sh line is a make target the Makefile
has or a command line symgrad's parser accepts, so no example goes stale."""
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from codegen.cli import main, parser
from derive.catalog import CATALOG
from derive.stability import INDEX_REWRITES, REWRITES

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
# a fence, its info string (language, then for python-no-run the reason), its body
FENCE = re.compile(r"^```(?P<info>[^\n`]*)\n(?P<body>.*?)^```[ \t]*$", re.S | re.M)
# the derive lines not run here, with why: each step's check and an --ops file's derivation take seconds, and
# tests/test_derivations.py and tests/test_tensor_steps.py run those checks on every derivation already
SLOW_DERIVE = ("--check", "--ops")
TRAINING = {"Sequential", "Flatten", "SGD", "Adam", "AdamW"}


def fenced_blocks(text):
    """[(info, line number of the body's first line, body)] of every fenced block of Markdown text."""
    return [(m["info"].strip(), text.count("\n", 0, m.start("body")) + 1, m["body"]) for m in FENCE.finditer(text)]


def run_python_blocks(path):
    """Run path's python blocks in order in one namespace, each compiled at its own line of path so that a
    traceback names the page and the line; a python-no-run block must say why. Returns how many ran."""
    namespace, ran = {"__name__": f"docs:{path.name}"}, 0
    for info, line, body in fenced_blocks(path.read_text()):
        if info.startswith("python-no-run"):
            assert info.removeprefix("python-no-run").strip(" :"), f"{path}:{line}: python-no-run without a reason"
        elif info == "python":
            exec(compile("\n" * (line - 1) + body, str(path), "exec"), namespace)
            ran += 1
    return ran


def derive_lines(path):
    """[(line number, argv)] of each `symgrad derive` command of path's sh blocks, its comment and any
    redirection of its output cut off, but those SLOW_DERIVE leaves to other tests."""
    found = []
    for info, first, body in fenced_blocks(path.read_text()):
        if info != "sh":   # a printed log or table is no shell (an apostrophe in it is no quotation)
            continue
        for number, line in enumerate(body.splitlines(), first):
            words = shlex.split(line, comments=True)
            if words[:1] in (["symgrad"], [".venv/bin/symgrad"]) and words[1:2] == ["derive"]:
                found.append((number, words[1:words.index(">")] if ">" in words else words[1:]))
    return [(number, argv) for number, argv in found if not any(flag in argv for flag in SLOW_DERIVE)]


def run_derive_lines(path):
    """Run path's symgrad derive lines in this process (no interpreter to start); how many ran."""
    ran = 0
    for number, argv in derive_lines(path):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(io.StringIO()):
            try:
                status = main(argv)
            except SystemExit as exit:   # argparse's refusal of an option
                status = exit.code
        assert status == 0 and printed.getvalue().strip(), f"{path}:{number}: symgrad {shlex.join(argv)} failed"
        ran += 1
    return ran


@pytest.mark.parametrize("path", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_python_block_runs(path, monkeypatch):
    monkeypatch.chdir(ROOT)   # the pages' paths (examples/, generated/) are the checkout's
    ran = run_python_blocks(path)
    assert ran or not any(info.startswith("python") for info, _, _ in fenced_blocks(path.read_text()))


@pytest.mark.parametrize("path", [p for p in PAGES if derive_lines(p)], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_symgrad_derive_line_runs(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert run_derive_lines(path)


def unrun_lines(path):
    """[(line number, words)] of each command of path's sh blocks that derive_lines does not give to be run:
    make targets, symgrad's other commands (they write files or take minutes), slow derive lines."""
    run = {number for number, _ in derive_lines(path)}
    return [(number, words) for info, first, body in fenced_blocks(path.read_text()) if info == "sh"
            for number, line in enumerate(body.splitlines(), first)
            if (words := shlex.split(line, comments=True)) and number not in run]


def stale_commands(path):
    """The commands of path's sh blocks that could not run as written: a make target the Makefile lacks, a
    symgrad command line its parser refuses, anything else."""
    targets = set(re.findall(r"^([\w.-]+):", (ROOT / "Makefile").read_text(), flags=re.M))
    stale = []
    for number, words in unrun_lines(path):
        if words[0] == "make":
            stale += [f"{path}:{number}: make {w}" for w in words[1:] if w not in targets]
        elif words[0] in ("symgrad", ".venv/bin/symgrad"):
            with contextlib.redirect_stderr(io.StringIO()):
                try:
                    parser().parse_args(words[1:words.index(">")] if ">" in words else words[1:])
                except SystemExit:
                    stale.append(f"{path}:{number}: {shlex.join(words)}")
        elif words[0] not in ("git", "cd", "pip", "python", "python3", "bash"):
            stale.append(f"{path}:{number}: {shlex.join(words)} (no check knows this command)")
    return stale


@pytest.mark.parametrize("path", PAGES, ids=lambda p: p.name)
def test_every_other_shell_line_is_a_make_target_or_a_command_line_symgrad_accepts(path):
    assert stale_commands(path) == []


def test_the_shell_check_catches_a_missing_target_and_a_refused_option(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```sh\nmake test\nmake no-such-target\nsymgrad codegen --backend numpy\n"
                    "symgrad codegen --backend gpu\nfrobnicate now\n```\n")
    assert [line.split(": ", 1)[1] for line in stale_commands(page)] == [
        "make no-such-target", "symgrad codegen --backend gpu", "frobnicate now (no check knows this command)"]


def test_the_runner_fails_on_a_broken_block_naming_its_page_and_line(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("text\n\n```python\nvalue = 1\n```\n\n```sh\nnot python\n```\n\n"
                    "```python\nassert value == 2\n```\n")
    with pytest.raises(AssertionError) as raised:
        run_python_blocks(page)
    assert raised.traceback[-1].path == page and raised.traceback[-1].lineno + 1 == 12
    page.write_text("```python-no-run\nimport nothing\n```\n")
    with pytest.raises(AssertionError, match="python-no-run without a reason"):
        run_python_blocks(page)
    page.write_text("```python-no-run: needs a GPU\nimport nothing\n```\n")
    assert run_python_blocks(page) == 0


def test_the_runner_fails_on_a_derive_line_that_fails(tmp_path, capsys):
    page = tmp_path / "page.md"
    page.write_text("```sh\nmake test\nsymgrad derive sigmoid > out.tex   # a comment\n"
                    "symgrad derive backprop --check\nsymgrad derive no_such_derivation\n```\n")
    assert derive_lines(page) == [(3, ["derive", "sigmoid"]), (5, ["derive", "no_such_derivation"])]
    with pytest.raises(AssertionError, match="page.md:5: symgrad derive no_such_derivation failed"):
        run_derive_lines(page)


def test_fenced_blocks_finds_each_block_with_its_line():
    assert fenced_blocks("x\n```python\na = 1\n```\n```\nno\n```\n```sh\nb\n```") == [
        ("python", 3, "a = 1\n"), ("", 6, "no\n"), ("sh", 9, "b\n")]


def test_the_readme_is_short_and_its_catalog_table_names_every_operation():
    text = README.read_text()
    assert len(text.splitlines()) < 200
    table = text.split("## The catalog", 1)[1].split("\n\n")[2]
    named = {re.match(r"\w+", code)[0] for row in table.splitlines()[2:] for code in re.findall(r"`([^`]+)`", row)}
    assert named == {*CATALOG, *TRAINING}, "the README's catalog table and derive/catalog.py differ"


def test_the_stability_page_has_a_section_per_rewrite():
    headings = set(re.findall(r"^### (.+)$", (ROOT / "docs" / "stability.md").read_text(), flags=re.M))
    assert {name for name, _, _ in REWRITES + INDEX_REWRITES} <= headings


def test_no_page_speaks_of_seeds():
    for path in PAGES:
        assert not re.search(r"\bseeds? 0\d\d", path.read_text()), f"{path}: a seed's number, not the thing's name"
