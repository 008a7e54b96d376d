"""An index-notation operation's derivation as numbered steps (derive.derivation_tensor): each chain ends at
derive.tensor's adjoint or VJP, every step is checked (a planted wrong one is refused), and symgrad derive and
docs print it, KaTeX rendering every formula."""
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import sympy as sp

from codegen.cli import main
from codegen.latex import format_derivation
from codegen.tensor_lower import check_sizes
from derive.catalog import CATALOG
from derive.declare import load_ops
from derive.derivation_steps import Step, continues
from derive.derivation_tensor import RULES, check_tensor_derivation, tensor_derivation
from derive.tensor import TensorOp, derivation
from tests.test_docs import MATH, katex_errors

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "tensor_ops.py"
EXAMPLE_OPS = {op.name: op for op in load_ops(EXAMPLES)}
# and the catalog's index-notation layers (of no row or element form) but Linear, whose penalty's steps
# tests/test_backprop.py checks
OPS = {**EXAMPLE_OPS, **{name: op for name, op in CATALOG.items() if isinstance(op, TensorOp) and op.penalty is None}}
# smaller sizes than codegen's checks, where those make a check take seconds
SMALL = {"Attention": {"N": 2, "T": 2, "S": 3, "D": 2, "E": 2}, "CausalAttention": {"N": 2, "T": 3, "S": 3, "D": 2, "E": 2}, "ValidConv1d": {"N": 2, "C": 2, "L": 5, "O": 2, "J": 3},
         "Conv1d": {"N": 2, "C": 2, "L": 5, "O": 2, "U": 3}, "Conv2d": {"N": 2, "C": 2, "H": 4, "W": 3, "O": 2, "U": 2, "V": 2},
         "ScaledDotProductAttention": {"N": 2, "T": 2, "S": 3, "D": 2, "E": 2},
         "BatchNorm1d": {"N": 3, "C": 2, "L": 2}, "BatchNorm2d": {"N": 2, "C": 2, "H": 2, "W": 3}}


@pytest.fixture(scope="module")
def derived():
    return {name: tensor_derivation(op) for name, op in OPS.items()}


def sizes_of(op):
    return {str(size): value for size, value in check_sizes(op).items()}


@pytest.mark.parametrize("name", OPS)
def test_each_chain_ends_at_derive_tensors_adjoint_or_vjp(derived, name):
    op, steps = OPS[name], derived[name].steps
    found = derivation(op)
    ends = [s for number, s in enumerate(steps) if number + 1 == len(steps) or not continues(steps, number + 1)]
    starts = [s for number, s in enumerate(steps) if not continues(steps, number)]
    expected = [*op.steps, *found.adjoints, *(program[-1] for program in found.gradients.values())]
    assert [(s.lhs.base.name, s.lhs.indices, s.rhs) for s in ends] == [(a.name, a.indices, a.expr) for a in expected]
    assert [s.rule for s in starts] == ["definition"] * len(op.steps) + [RULES[0]] * (len(expected) - len(op.steps))
    assert all(s.rhs.has(sp.Derivative) for s in starts[len(op.steps):])


def test_layer_norm_goes_from_the_chain_rule_to_the_contracted_adjoint(derived):
    steps = [s for s in derived["LayerNorm"].steps if s.lhs.base.name == "g_mu"]
    assert [s.rule for s in steps] == list(RULES)
    assert steps[0].rhs.has(sp.Derivative) and steps[1].rhs.has(sp.KroneckerDelta)
    assert not steps[2].rhs.has(sp.KroneckerDelta)
    # Sum_k (x - mu) of the contraction is K mu - K mu by mu's own definition: the last step drops it
    assert str(steps[3].rhs) == "-Sum(g[n, k]*gamma[k], (k, 0, K - 1))/sqrt(eps + var[n])"


def test_conv1ds_contraction_keeps_the_range_of_its_delta(derived):
    dx = [s for s in derived["ValidConv1d"].steps if s.lhs.base.name == "dx"]
    assert dx[1].rhs.has(sp.KroneckerDelta) and not dx[-1].rhs.has(sp.KroneckerDelta)
    assert dx[-1].rhs.has(sp.Max) and dx[-1].rhs.has(sp.Min)


@pytest.mark.parametrize("name", EXAMPLE_OPS)
def test_every_step_of_every_example_holds(derived, name):
    """At small sizes (SMALL): the command line's check at codegen's sizes takes seconds per example."""
    checks = check_tensor_derivation(OPS[name], derived[name], SMALL.get(name) or sizes_of(OPS[name]))
    assert all(check.ok for check in checks), "\n".join(check.report() for check in checks if not check.ok)


# the command line on an example and a catalog layer (named by its module)
@pytest.mark.parametrize("name", ["TemperedSoftmax", "LayerNorm"])
def test_derive_ops_checks_and_prints_every_example(capsys, name):
    declared = name in EXAMPLE_OPS  # the catalog's are named as their modules: symgrad derive layer_norm
    assert main(["derive", *["--ops", str(EXAMPLES)] * declared, name if declared else OPS[name].module, "--check"]) == 0
    captured = capsys.readouterr()
    reports = captured.err.splitlines()
    assert len(reports) == captured.out.count(r"\text{(") > len(OPS[name].steps)
    assert all(": OK, " in line for line in reports), captured.err
    assert any("central differences" in line for line in reports) and captured.out.startswith(f"% {name}: ")


def planted(found, number, change):
    """found with step number (from 1) changed."""
    steps = list(found.steps)
    steps[number - 1] = change(steps[number - 1])
    return dataclasses.replace(found, steps=tuple(steps))


def step_of(found, name, rule):
    return next(number for number, s in enumerate(found.steps, 1) if s.lhs.base.name == name and s.rule == rule)


PLANTED = {  # what is wrong: (op, (lhs, rule) of the step changed, the change, what the failed check says)
    "a sign in a contraction": ("LayerNorm", ("dgamma", RULES[2]), lambda s: dataclasses.replace(s, rhs=-s.rhs),
                                "differs from the step before"),
    "a reader left out of a chain rule": ("LayerNorm", ("g_mu", RULES[0]),
                                          lambda s: dataclasses.replace(s, rhs=s.rhs.args[0]), "central differences"),
    "a factor of 2 in an adjoint's last form": ("Attention", ("g_A", RULES[2]),
                                                lambda s: dataclasses.replace(s, rhs=2 * s.rhs), "differs"),
    "a shifted index in a contracted VJP": ("ValidConv1d", ("dw", RULES[2]), lambda s: dataclasses.replace(
        s, rhs=s.rhs.xreplace({sp.Symbol("j", integer=True): sp.Symbol("c", integer=True)})), "differs"),
    "a wrong definition": ("NLL", ("L", "definition"), lambda s: dataclasses.replace(s, rhs=2 * s.rhs),
                           "the declaration says"),
    "a claim about no array": ("GLU", ("dx", RULES[0]), lambda s: Step(sp.IndexedBase("dz")[s.lhs.indices], s.rhs,
                                                                       s.rule), "dz is no step"),
}


@pytest.mark.parametrize("what", PLANTED)
def test_a_wrong_step_is_refused_where_it_is(derived, what):
    name, (lhs, rule), change, said = PLANTED[what]
    op, good = OPS[name], derived[name]
    number = step_of(good, lhs, rule)
    checks = check_tensor_derivation(op, planted(good, number, change), SMALL.get(name) or sizes_of(op))
    failed = [c for c in checks if not c.ok]
    assert failed and failed[0].number == number and said in failed[0].detail + failed[0].method, failed
    assert all(c.ok for c in checks[:number - 1])


def test_kl_divs_steps_hold_where_a_target_is_zero_too(derived):
    target = np.array([[0.5, 0.0, 0.5, 0.0], [0.2, 0.3, 0.5, 0.0], [0.0, 0.0, 1.0, 0.0]])
    checks = check_tensor_derivation(OPS["KLDiv"], derived["KLDiv"], {"N": 3, "K": 4}, values={"t": target})
    assert all(c.ok for c in checks), [c.report() for c in checks]
    # a planted 1 where t = 0 is caught only where some target is 0
    wrong = planted(derived["KLDiv"], len(derived["KLDiv"].steps), lambda s: dataclasses.replace(
        s, rhs=s.rhs.replace(lambda e: isinstance(e, sp.Piecewise), lambda e: sp.Piecewise(e.args[0], (1, True)))))
    assert not check_tensor_derivation(OPS["KLDiv"], wrong, {"N": 3, "K": 4}, values={"t": target})[-1].ok


def test_symgrad_derive_prints_nothing_when_a_step_does_not_hold(monkeypatch, capsys):
    good = tensor_derivation(OPS["NLL"])
    bad = planted(good, len(good.steps), lambda s: dataclasses.replace(s, rhs=s.rhs + 1))
    monkeypatch.setattr("derive.derivation_tensor.tensor_derivation", lambda op: bad)
    assert main(["derive", "--ops", str(EXAMPLES), "NLL"]) == 1
    captured = capsys.readouterr()
    assert not captured.out and captured.err.endswith("symgrad derive: a step does not hold; nothing printed\n")
    assert f"({len(good.steps)}) {RULES[2]}: FAILED" in captured.err


def test_every_examples_latex_renders_in_katex(derived):
    strings = {}
    for name, found in derived.items():
        strings[f"{name}, latex"] = format_derivation(found, "latex")
        strings.update((f"{name}, markdown formula {n}", tex)
                       for n, tex in enumerate(MATH.findall(format_derivation(found, "markdown")), 1))
    assert len(strings) == len(OPS) + sum(len(found.steps) for found in derived.values())
    failed = [f"{what}: {error}\n{strings[what]}" for what, error in zip(strings, katex_errors(list(strings.values())))
              if error]
    assert not failed, "\n\n".join(failed)
    assert r"\frac{\partial {y}_{n',k}}{\partial {var}_{n}}" in strings["LayerNorm, latex"]


def test_docs_ops_writes_the_examples_derivations(derived, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("derive.derivations.DERIVATIONS", {})   # the built-in ones: tests/test_docs.py
    katex = tmp_path / "katex"
    (katex / "fonts").mkdir(parents=True)
    for name in ("katex.min.js", "katex.min.css"):
        (katex / name).write_text("/* stand-in */\n")
    assert main(["docs", "--ops", str(EXAMPLES), "--out", str(tmp_path / "docs"), "--katex", str(katex)]) == 0
    markdown = (tmp_path / "docs" / "derivations.md").read_text()
    for name, op in EXAMPLE_OPS.items():
        assert f"## {name}\n\n{name}: {op.summary}" in markdown
    assert markdown.count("$$") == 2 * sum(len(derived[name].steps) for name in EXAMPLE_OPS)
