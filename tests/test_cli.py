"""The symgrad command as users run it."""
import subprocess
import sys
from pathlib import Path

import pytest

from codegen.cli import main
from derive.catalog import CATALOG
from derive.derivations import DERIVATIONS

SYMGRAD = Path(sys.executable).parent / "symgrad"


def run(*args):
    return subprocess.run([str(SYMGRAD), *args], capture_output=True, text=True, timeout=300)


def test_derive_lists_every_derivation(capsys):
    assert main(["derive", "--list"]) == 0
    assert capsys.readouterr().out.split() == list(DERIVATIONS)


def test_derive_softmax_prints_the_jacobian_with_both_cases_in_latex(capsys):
    assert main(["derive", "softmax"]) == 0
    out = capsys.readouterr().out
    title, block = out.split("\n", 1)
    assert title.startswith("% Softmax")
    assert block.startswith("\\begin{align*}") and block.rstrip().endswith("\\end{align*}")
    assert r"\left(\delta_{i j} - {y}_{j}\right) {y}_{i}" in out
    assert r"\left(1 - {y}_{i}\right) {y}_{i}" in out and r"- {y}_{i} {y}_{j} \quad (i \neq j)" in out
    assert r"\text{(1) definition}" in out and r"\text{(2) differentiation: quotient rule" in out


def test_derive_cross_entropy_goes_through_seed_000s_steps_to_p_minus_t_over_n(capsys):
    assert main(["derive", "softmax_cross_entropy", "--format", "markdown"]) == 0
    out = capsys.readouterr().out
    chain = r"\sum_{k=0}^{K - 1} \frac{\partial L}{\partial {p}_{k}} \frac{\partial {p}_{k}}{\partial {x}_{j}}"
    for expected in [r"\frac{\partial L}{\partial {p}_{k}} = - \frac{{t}_{k}}{{p}_{k}}", r"(k \neq j)", chain,
                     r"= {p}_{j} - {t}_{j}", r"\frac{{p}_{r,j} - {t}_{r,j}}{N}",
                     "(12) substitution: the target row sums to 1"]:
        assert expected in out, expected
    assert out.count("$$") == 2 * len(DERIVATIONS["softmax_cross_entropy"]().steps)


def test_derive_prints_text_for_a_terminal(capsys):
    assert main(["derive", "tanh_derivative", "--format", "text"]) == 0
    out = capsys.readouterr().out
    assert "(3) substitution of the output y" in out and "1 - y" in out and "\\" not in out


def test_derive_an_expression_the_same_way(capsys):
    assert main(["derive", "--expr", "log(1 + exp(x))", "--wrt", "x"]) == 0
    captured = capsys.readouterr()
    assert r"\frac{\partial y}{\partial x} &= \frac{e^{x}}{e^{x} + 1}" in captured.out and not captured.err


def test_derive_check_reports_every_step_on_stderr(capsys):
    assert main(["derive", "softmax_jacobian", "--check"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert len(err) == len(DERIVATIONS["softmax_jacobian"]().steps) and all(": OK, " in line for line in err)


@pytest.mark.parametrize("argv, message", [
    (["derive", "softmaxx"], "no derivation named 'softmaxx'"),
    (["derive", "--expr", "log(1 +", "--wrt", "x"], "cannot derive --expr 'log(1 +' by x"),
    (["derive", "--expr", "z**2"], "does not depend on x"),
    (["derive", "softmax", "--expr", "x**2"], "a derivation's name or --expr, not both"),
])
def test_derive_names_what_is_wrong(capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_docs_says_where_katex_is_missing(capsys, tmp_path):
    assert main(["docs", "--out", str(tmp_path / "docs"), "--katex", str(tmp_path)]) == 1
    assert f"no KaTeX in {tmp_path}" in capsys.readouterr().err


def test_the_console_script_generates_and_lists_every_operation(tmp_path):
    result = run("codegen", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["operation", "kernels", "max", "rel", "error", "status"]
    assert [line.split()[0] for line in lines[1:len(CATALOG) + 1]] == list(CATALOG)
    assert all(line.split()[-1] == "OK" for line in lines[1:len(CATALOG) + 1])
    assert (tmp_path / "out" / "__init__.py").exists()
