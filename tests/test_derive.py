"""Every general-K derivation against the same quantity written out with explicit symbols, K = 2..6."""
import numpy as np
import pytest
import sympy as sp

from derive.catalog import CATALOG
from derive.gradients import layer_backward, loss_forward, loss_gradient, variants
from derive.ops import Op
from derive.reduction import REDUCTIONS, row_weight
from derive.softmax import (cross_entropy, cross_entropy_gradient, softmax, softmax_jacobian,
                            softmax_jacobian_cases, sparse_target, target_sum_is_one)
from derive.stability import REWRITES, stable
from derive.symbols import G, K, c, dy, g, i, j, mask, p, r, t, total, x, y
from tests.explicit import argmax_of, at_explicit_size, at_point, explicit_symbols, is_zero, max_of, softmax_row

SIZES = [2, 3, 4, 5, 6]


def test_softmax_jacobian_is_p_i_times_delta_minus_p_j():
    assert sp.expand(softmax_jacobian() - p[i] * (sp.KroneckerDelta(i, j) - p[j])) == 0


def test_the_two_cases_are_those_of_the_seeds():
    cases = softmax_jacobian_cases()
    assert sp.expand(cases["i = j"] - p[i] * (1 - p[i])) == 0
    assert sp.expand(cases["i != j"] + p[i] * p[j]) == 0


@pytest.mark.parametrize("size", SIZES)
def test_softmax_jacobian_matches_explicit_differentiation(size):
    xs = explicit_symbols("x", size)
    ps = softmax_row(xs)
    for a in range(size):
        for b in range(size):
            general = at_explicit_size(softmax_jacobian().subs({i: a, j: b}), size, {"p": ps})
            assert is_zero(general - sp.diff(ps[a], xs[b]), xs), (a, b)


@pytest.mark.parametrize("size", SIZES)
def test_cross_entropy_gradient_matches_explicit_differentiation(size):
    xs, ts = explicit_symbols("x", size), explicit_symbols("t", size)
    ps = softmax_row(xs)
    loss = -sum(tk * sp.log(pk) for tk, pk in zip(ts, ps))
    for b in range(size):
        general = at_explicit_size(cross_entropy_gradient().subs(j, b), size, {"p": ps, "t": ts})
        assert is_zero(general - sp.diff(loss, xs[b]), xs), b


@pytest.mark.parametrize("size", SIZES)
def test_reduced_gradient_holds_when_the_targets_sum_to_one(size):
    xs, ts = explicit_symbols("x", size), explicit_symbols("t", size)
    ps = softmax_row(xs)
    on_simplex = {ts[-1]: 1 - sum(ts[:-1])}
    loss = -sum(tk * sp.log(pk) for tk, pk in zip(ts, ps))
    reduced = target_sum_is_one(cross_entropy_gradient())
    assert sp.expand(reduced - (p[j] - t[j])) == 0
    for b in range(size):
        general = at_explicit_size(reduced.subs(j, b), size, {"p": ps, "t": ts}).subs(on_simplex)
        assert is_zero(general - sp.diff(loss, xs[b]).subs(on_simplex), xs), b


def test_integer_label_gradient_is_p_minus_one_hot():
    op = CATALOG["SoftmaxCrossEntropy"]
    plain = variants(op, "labels")["plain"]
    assert sp.expand(loss_gradient(op, "labels", plain) - g * (p[j] - sp.KroneckerDelta(j, c))) == 0


def test_softmax_backward_is_y_times_g_minus_its_weighted_sum():
    expected = y[j] * (dy[j] - sp.Sum(dy[i] * y[i], (i, 0, K - 1)))
    assert sp.expand(layer_backward(CATALOG["Softmax"]) - expected) == 0


def test_row_weights_of_the_reductions():
    assert row_weight(REDUCTIONS["mean"]) == 1 / total
    assert row_weight(REDUCTIONS["sum"]) == 1
    assert row_weight(REDUCTIONS["none"]) == G[r]


def point(size, rng, label):
    """Random arrays and option values for one explicit check."""
    arrays = {"x": [sp.Float(v, 50) for v in rng.uniform(-3, 3, size)],
              "t": [sp.Float(v, 50) for v in rng.uniform(0, 1, size)],
              "w": [sp.Float(v, 50) for v in rng.uniform(0.5, 2, size)],
              "pw": [sp.Float(v, 50) for v in rng.uniform(0.5, 2, size)],
              "g": [sp.Float(v, 50) for v in rng.normal(size=size)]}
    return arrays, {c: label, mask: 1}


def explicit_gradient(expr, size, arrays, scalars, at):
    """d expr/dx_at, differentiated after writing expr out with explicit symbols x_0..x_{K-1}."""
    xs = explicit_symbols("x", size)
    written_out = at_explicit_size(expr, size, dict(arrays, x=list(xs)), scalars)
    return at_point(sp.diff(written_out, xs[at]), size, {}, dict(zip(xs, arrays["x"])))


# the element-wise and row ops (derive.gradients); those in index notation: tests/test_tensor_derive.py
ROW_OPS = [op for op in CATALOG.values() if isinstance(op, Op)]
CASES = [(op, target, variant) for op in ROW_OPS if op.kind == "loss" for target in op.targets
         for variant in variants(op, target)] + [(op, None, None) for op in ROW_OPS if op.kind == "layer"]


@pytest.mark.parametrize("size", [2, 3, 5])
@pytest.mark.parametrize("op, target, variant", CASES,
                         ids=[f"{op.name}-{target}-{variant}" if target else op.name for op, target, variant in CASES])
def test_every_derived_gradient_matches_explicit_differentiation(op, target, variant, size):
    """The general-K result of each catalog entry against differentiating it written out at K = size."""
    rng = np.random.default_rng(size)
    arrays, scalars = point(size, rng, label=size - 1)
    scalars.update({p.symbol: sp.Float(p.example, 50) for p in op.params if p.kind == "scalar"})
    if op.kind == "loss" and op.granularity == "row":  # g is then one row's weight, not an array
        scalars[g] = sp.Float(1.3, 50)
    saved = {base.name: [at_point(d.subs(i, a), size, arrays, scalars) for a in range(size)]
             for base, d in op.saved}
    if op.kind == "layer":
        objective = sp.Sum(dy[i] * op.forward, (i, 0, K - 1))
        general = layer_backward(op)
    else:
        values = variants(op, target)[variant]
        loss = loss_forward(op, target, values)
        objective = g * loss if op.granularity == "row" else sp.Sum(dy[i] * loss, (i, 0, K - 1))
        general = loss_gradient(op, target, values)
    for at in range(size):
        derived = at_point(general.subs(j, at), size, dict(arrays, **saved), scalars)
        expected = explicit_gradient(objective, size, arrays, scalars, at)
        assert abs(derived - expected) <= 1e-20 * max(1, abs(expected)), (at, derived, expected)


def forward_expressions():
    """(label, expr) of everything a kernel evaluates in a stable form: forwards and saved quantities."""
    for op in ROW_OPS:
        if op.kind == "layer":
            yield op.name, op.forward
        for target in op.targets:
            for variant, values in variants(op, target).items():
                yield f"{op.name}-{target}-{variant}", loss_forward(op, target, values)
        for base, definition in op.saved:
            yield f"{op.name}-{base}", definition


@pytest.mark.parametrize("name, rewrite, exact", REWRITES, ids=[name for name, _, _ in REWRITES])
@pytest.mark.parametrize("label, expr", list(forward_expressions()), ids=lambda v: v if isinstance(v, str) else "")
def test_each_stability_rewrite_keeps_the_value(label, expr, name, rewrite, exact):
    size, rng = 4, np.random.default_rng(1)
    arrays, scalars = point(size, rng, label=1)
    scalars.update({p.symbol: sp.Float(p.example, 50) for op in ROW_OPS for p in op.params
                    if p.kind == "scalar"})
    arrays["x"] = [sp.Float(v, 50) for v in rng.normal(0, 30, size)]
    rewritten = rewrite(expr)
    if rewritten == expr:  # the same expression: nothing to evaluate
        return
    for at in range(size):
        before = at_point(expr.subs(i, at), size, arrays, scalars)
        after = at_point(rewritten.subs(i, at), size, arrays, scalars)
        assert abs(before - after) <= (1e-20 if exact else 1e-15) * max(1, abs(before)), (at, before, after)


def test_stable_forms_stay_finite_where_the_plain_ones_overflow():
    size = 3
    xs = explicit_symbols("x", size)
    huge = dict(zip(xs, [1000.0, -1000.0, 999.0]))
    plain = at_explicit_size(softmax(i).subs(i, 0), size, {"x": xs})
    shifted = max_of(xs)(at_explicit_size(argmax_of(huge.values())(stable(softmax(i)).subs(i, 0)), size, {"x": xs}))
    as_float = sp.lambdify(xs, plain, "numpy"), sp.lambdify(xs, shifted, "numpy")
    with np.errstate(over="ignore", invalid="ignore"):
        assert not np.isfinite(as_float[0](*huge.values()))
    assert np.isclose(as_float[1](*huge.values()), 1 / (1 + np.exp(-1.0)))


def test_the_explicit_comparison_catches_a_wrong_jacobian():
    xs = explicit_symbols("x", 3)
    ps = softmax_row(xs)
    wrong = at_explicit_size((p[i] * (sp.KroneckerDelta(i, j) + p[j])).subs({i: 0, j: 1}), 3, {"p": ps})
    assert not is_zero(wrong - sp.diff(ps[0], xs[1]), xs)
