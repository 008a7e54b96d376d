"""The symgrad command as users run it."""
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import sympy as sp

from codegen.cli import init_options, main
from codegen.render import ROOT
from codegen.verify import load_class
from derive.catalog import CATALOG
from derive.derivation_check import check_derivation
from derive.derivation_steps import elementwise_derivation
from derive.derivations import DERIVATIONS

SYMGRAD = Path(sys.executable).parent / "symgrad"
GENERATED = ROOT / "generated"
USER_OPS = """from derive.declare import activation, elementwise_loss
OPS = [activation("Swish", "x*sigmoid(beta*x)", params={"beta": 1.0}), elementwise_loss("LogCosh", "log(cosh(x - t))")]
"""


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
    (["derive", "--expr", "log(1 +", "--wrt", "x"], "--expr: cannot parse 'log(1 +'"),
    (["derive", "--expr", "z**2"], "does not depend on x"),
    (["derive", "--expr", "foo(x)*x"], "unknown function foo"),
    (["derive", "--expr", "x*y"], "y names the output"),
    (["derive", "softmax", "--expr", "x**2"], "give --expr alone"),
])
def test_derive_names_what_is_wrong(capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("expr, derivative", [
    ("sigmoid(x)", r"y \left(1 - y\right)"),
    ("Abs(x)", r"\operatorname{sign}{\left(x \right)}"),
    ("sign(x)*x**2", r"2 x \left(x \delta\left(x\right) + \operatorname{sign}{\left(x \right)}\right)"),
    ("Piecewise((x, x > 0), (0, True))", r"\begin{cases} 1 & \text{for}\: x > 0 \\0 & \text{otherwise}"),
    ("x*sigmoid(beta*x)", r"\beta x \left(\sigma\left(\beta x\right) - 1\right)"),   # beta, gamma: constants,
    ("gamma*x", r"\frac{\partial y}{\partial x} &= \gamma &&"),                       # not SymPy's functions
])
def test_derive_an_expression_with_what_a_declaration_accepts(capsys, expr, derivative):
    assert main(["derive", "--expr", expr]) == 0
    captured = capsys.readouterr()
    assert derivative in captured.out and not captured.err


def test_a_derivative_sympy_leaves_unevaluated_is_checked_not_recursed_into_forever():
    # the cause of derive --expr's RecursionError: meaning() evaluated Derivative(f(x), x) again and again
    f, z = sp.Function("f"), sp.Symbol("z")
    for expr in (f(z), sp.Abs(z) * f(z)):  # z complex: d|z|/dz keeps Derivative(re(z), z)
        checks = check_derivation(elementwise_derivation(expr, z))
        assert [check.number for check in checks] == list(range(1, len(checks) + 1)) and all(c.ok for c in checks)


def test_derive_ops_prints_a_declared_operations_derivation(tmp_path, capsys):
    (tmp_path / "ops.py").write_text(USER_OPS)
    assert main(["derive", "--ops", str(tmp_path / "ops.py"), "Swish", "--format", "text", "--check"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("Swish: x*sigmoid(beta*x), element-wise")
    assert "y = x⋅sigmoid(β⋅x)" in captured.out
    assert captured.err.count(": OK, ") == 3
    assert main(["derive", "--ops", str(tmp_path / "ops.py"), "LogCosh", "--format", "text"]) == 0
    assert "L = log(cosh(t - x))" in capsys.readouterr().out  # a loss: L of the scalars x and t
    assert main(["derive", "--ops", str(tmp_path / "ops.py"), "Mish"]) == 2
    assert capsys.readouterr().err == f"symgrad derive: no operation named 'Mish' in {tmp_path / 'ops.py'}; " \
                                      "it declares Swish, LogCosh\n"


def test_docs_ops_adds_the_declared_derivations_to_the_built_in_ones(tmp_path, capsys):
    katex = tmp_path / "katex"
    (katex / "fonts").mkdir(parents=True)
    for name in ("katex.min.js", "katex.min.css"):
        (katex / name).write_text("/* stand-in */\n")
    (tmp_path / "ops.py").write_text(USER_OPS)
    out = tmp_path / "docs"
    assert main(["docs", "--ops", str(tmp_path / "ops.py"), "--out", str(out), "--katex", str(katex)]) == 0
    markdown = (out / "derivations.md").read_text()
    assert "## Swish\n\nSwish: x*sigmoid(beta*x), element-wise" in markdown and "## LogCosh" in markdown
    assert all(f"## {name}\n" in markdown for name in DERIVATIONS) and "Swish" in (out / "derivations.html").read_text()


def test_codegen_passes_the_backend(tmp_path):
    (tmp_path / "ops.py").write_text(USER_OPS)
    out = tmp_path / "pkg"
    assert main(["codegen", "--backend", "numpy", "--ops", str(tmp_path / "ops.py"), "--out", str(out)]) == 0
    assert (out / "swish.py").exists() and not (out / "fast").exists()


@pytest.mark.parametrize("target, init, lines", [
    ("linear.py:Linear", "in_features=5,out_features=3,l2=0.1", ["dx", "dW", "db"]),
    ("fast/relu.py:ReLU", "", ["dx"]),                 # from .._base import: imported with its package
    ("softmax.py:Softmax", "", ["dx"]),
])
def test_check_a_generated_class_with_its_constructor_arguments_and_parameters(capsys, target, init, lines):
    assert main(["check", f"{GENERATED / target}", "--init", init]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in out] == [f"{name}:" for name in lines] and all(" OK: " in line for line in out)


def test_check_fails_a_wrong_parameter_gradient(tmp_path, capsys):
    (tmp_path / "scale.py").write_text(textwrap.dedent('''
        class Scale:
            params = ("w",)

            def __init__(self, w):
                self.w = w

            def forward(self, x):
                self.x = x
                return self.w * x

            def backward(self, g):
                self.dw = (g * self.x).sum() * 2  # wrong: twice the gradient
                return g * self.w
    '''))
    assert main(["check", f"{tmp_path / 'scale.py'}:Scale", "--init", "w=1.5"]) == 1
    dx, dw = capsys.readouterr().out.splitlines()
    assert " dx: OK: " in dx and " dw: FAILED: " in dw


def test_load_class_imports_a_module_with_its_whole_package(tmp_path):
    package = tmp_path / "top" / "sub"
    package.mkdir(parents=True)
    (tmp_path / "top" / "__init__.py").write_text("HELPER = 3\n")
    (package / "__init__.py").write_text("")
    (package / "mod.py").write_text("from .. import HELPER\n\nclass Thing:\n    value = HELPER\n")
    assert load_class(f"{package / 'mod.py'}:Thing").value == 3
    assert load_class(f"{GENERATED / 'fast' / 'relu.py'}:ReLU").__module__ == "generated.fast.relu"


@pytest.mark.parametrize("text, options", [
    ("in_features=4,out_features=3", {"in_features": 4, "out_features": 3}),
    ("shape=(2, 3), scale=0.5,reduction='sum'", {"shape": (2, 3), "scale": 0.5, "reduction": "sum"}),
    ("", {}),
])
def test_init_options_are_python_literals(text, options):
    assert init_options(text) == options


@pytest.mark.parametrize("text, item", [("in_features=four", "in_features=four"), ("4", "4"),
                                        ("a=1,b=", "b="), ("a=1,=2", "a=1,=2"), ("a=(1,", "a=(1,")])
def test_a_bad_init_option_is_named(text, item):
    with pytest.raises(ValueError, match=re.escape(f"--init '{item}': expected name=value")):
        init_options(text)


def test_docs_says_where_katex_is_missing(capsys, tmp_path):
    assert main(["docs", "--out", str(tmp_path / "docs"), "--katex", str(tmp_path)]) == 1
    assert f"no KaTeX in {tmp_path}" in capsys.readouterr().err


def test_the_console_script_generates_and_lists_every_operation(tmp_path):
    result = run("codegen", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["operation", "kernels", "max", "rel", "error", "ulps", "f32", "fwd/bwd", "ulps", "f64",
                                "fwd/bwd", "status"]
    assert [line.split()[0] for line in lines[1:len(CATALOG) + 1]] == list(CATALOG)
    assert all(line.split()[-1] == "OK" for line in lines[1:len(CATALOG) + 1])
    assert (tmp_path / "out" / "__init__.py").exists()
