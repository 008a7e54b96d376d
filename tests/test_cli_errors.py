"""A user's error ends every symgrad command with one line naming the problem, a non-zero status, no
traceback and nothing written: each bad invocation runs as users run it, the console script."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from codegen.render import ROOT

SYMGRAD = Path(sys.executable).parent / "symgrad"
LINEAR = ROOT / "generated" / "linear.py"
DECLARE = "from derive.declare import activation\n"
FILES = {
    "ops.py": DECLARE + 'OPS = [activation("Swish", "x*sigmoid(x)")]\n',
    "syntax.py": DECLARE + "OPS = [activation(\n",
    "raises.py": "OPS = [1 / 0]\n",
    "numbers.py": "OPS = [1, 2]\n",
    "unknown.py": DECLARE + 'OPS = [activation("Oops", "x*beta")]\n',
    **{f"{name.lower()}.py": DECLARE + f'OPS = [activation("{name}", "x**2")]\n'
       for name in ("Sequential", "SGD", "Layer", "Loss")},
    "afile": "a file, not a folder\n",
    "katex/katex.min.js": "/* stand-in */\n",
    "katex/katex.min.css": "/* stand-in */\n",
    "katex/fonts/.keep": "",
}
BAD = [  # (arguments, {tmp}: the test's folder, {out}: an --out that must not appear; what the line names)
    ("derive --expr foo(x)", "unknown function foo"),
    ("derive --expr log(1+", "--expr: cannot parse 'log(1+'"),
    ("derive --expr x**2 --wrt 2x", "--wrt '2x'"),
    ("derive softmaxx", "no derivation named 'softmaxx'"),
    ("derive --ops {tmp}/missing.py Swish", "missing.py"),
    ("derive --ops {tmp}/ops.py Mish", "no operation named 'Mish'"),
    ("derive --ops {tmp}/syntax.py Swish", "syntax.py: SyntaxError"),
    ("codegen --ops {tmp}/missing.py --out {out}", "missing.py"),
    ("codegen --ops {tmp}/syntax.py --out {out}", "syntax.py: SyntaxError"),
    ("codegen --ops {tmp}/raises.py --out {out}", "raises.py: ZeroDivisionError"),
    ("codegen --ops {tmp}/numbers.py --out {out}", "defines no OPS list"),
    ("codegen --ops {tmp}/unknown.py --out {out}", "Oops: unknown symbol beta"),
    ("codegen --ops {tmp}/sequential.py --out {out}", "'Sequential'"),
    ("codegen --ops {tmp}/sgd.py --out {out}", "'SGD'"),
    ("codegen --ops {tmp}/layer.py --out {out}", "'Layer'"),
    ("codegen --ops {tmp}/loss.py --out {out}", "'Loss'"),
    ("codegen --ops {tmp}/ops.py --out {tmp}/afile/out", "afile"),
    ("docs --ops {tmp}/syntax.py --katex {tmp}/katex --out {out}", "syntax.py: SyntaxError"),
    ("docs --ops {tmp}/ops.py --katex {tmp} --out {out}", "no KaTeX"),
    ("new Oops x*beta", "unknown symbol beta"),
    ("new Cube x**3 --write {tmp}/afile/ops.py", "afile"),
    ("check {tmp}/missing.py:X", "no file"),
    ("check {tmp}/syntax.py:X", "SyntaxError"),
    ("check {tmp}/ops.py:Swish", "defines no class Swish"),
    (f"check {LINEAR}:Linear", "missing 2 required positional arguments"),
    (f"check {LINEAR}:Linear --init in_features=four", "--init 'in_features=four'"),
    (f"check {LINEAR}:Linear --init in_features=5,out_features=3 --shape 4,x", "--shape '4,x'"),
    (f"check {LINEAR}:Linear --init in_features=4,out_features=3", "Linear: W has shape (4, 3) and x has (4, 5)"),
]


def snapshot(folder):
    """{relative path: bytes} of every file under folder, and every folder as None."""
    return {path.relative_to(folder): path.read_bytes() if path.is_file() else None for path in folder.rglob("*")}


def assert_one_line_error(result, named):
    """result failed and said why in one line of stderr that names the problem, with no traceback."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("symgrad ") and named in lines[0], result.stderr


@pytest.fixture
def tmp(tmp_path):
    for name, text in FILES.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


def run(arguments, tmp, **env):
    argv = [part.format(tmp=tmp, out=tmp / "out") for part in arguments.split()]
    # no __pycache__ beside the files a command imports: Python's cache is not what symgrad writes
    return subprocess.run([str(SYMGRAD), *argv], capture_output=True, text=True, timeout=300, cwd=tmp,
                          env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1", **env})


@pytest.mark.parametrize("arguments, named", BAD, ids=[arguments.replace(str(ROOT), "") for arguments, _ in BAD])
def test_a_user_error_is_one_line_naming_it_and_nothing_is_written(tmp, arguments, named):
    before = snapshot(tmp)
    assert_one_line_error(run(arguments, tmp, SYMGRAD_DEBUG=""), named)
    assert snapshot(tmp) == before and not (tmp / "out").exists()


def test_the_battery_catches_a_traceback():
    traceback = 'Traceback (most recent call last):\n  File "x.py", line 1\nRecursionError: maximum recursion depth\n'
    for stderr in (traceback, "symgrad derive: one line\nsymgrad derive: and another\n", "symgrad derive: other\n"):
        with pytest.raises(AssertionError):
            assert_one_line_error(subprocess.CompletedProcess([], 1, "", stderr), "named")
    with pytest.raises(AssertionError):  # and a success
        assert_one_line_error(subprocess.CompletedProcess([], 0, "", "symgrad derive: named\n"), "named")


def test_symgrad_debug_shows_the_traceback(tmp):
    result = run("derive --ops {tmp}/syntax.py Swish", tmp, SYMGRAD_DEBUG="1")
    assert result.returncode != 0 and "Traceback" in result.stderr and "SyntaxError" in result.stderr
