"""The symgrad command as users run it."""
import subprocess
import sys
from pathlib import Path

from codegen.cli import main
from derive.catalog import CATALOG

SYMGRAD = Path(sys.executable).parent / "symgrad"


def run(*args):
    return subprocess.run([str(SYMGRAD), *args], capture_output=True, text=True, timeout=300)


def test_derive_softmax_prints_the_jacobian_with_both_cases_in_latex(capsys):
    assert main(["derive", "softmax"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("\\begin{align*}") and out.rstrip().endswith("\\end{align*}")
    assert r"\left(\delta_{i j} - {p}_{j}\right) {p}_{i}" in out
    assert r"\left(1 - {p}_{i}\right) {p}_{i}" in out and r"- {p}_{i} {p}_{j}" in out


def test_derive_cross_entropy_ends_at_p_minus_t_over_n(capsys):
    assert main(["derive", "softmax_cross_entropy"]) == 0
    out = capsys.readouterr().out
    assert r"{p}_{j} - {t}_{j}" in out and r"\frac{{p}_{j} - {t}_{j}}{N}" in out


def test_an_unknown_derivation_is_named_in_the_error(capsys):
    assert main(["derive", "softmaxx"]) == 2
    assert "no derivation named 'softmaxx'" in capsys.readouterr().err


def test_the_console_script_generates_and_lists_every_operation(tmp_path):
    result = run("codegen", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["operation", "kernels", "max", "rel", "error", "status"]
    assert [line.split()[0] for line in lines[1:len(CATALOG) + 1]] == list(CATALOG)
    assert all(line.split()[-1] == "OK" for line in lines[1:len(CATALOG) + 1])
    assert (tmp_path / "out" / "__init__.py").exists()
