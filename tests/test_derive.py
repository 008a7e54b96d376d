"""Every general-K derivation against the same quantity written out with explicit symbols, K = 2..6."""
import numpy as np
import pytest
import sympy as sp

from derive.catalog import CATALOG
from derive.gradients import layer_backward, loss_gradient
from derive.reduction import REDUCTIONS, row_weight
from derive.softmax import (cross_entropy, cross_entropy_gradient, softmax, softmax_jacobian,
                            softmax_jacobian_cases, sparse_target, target_sum_is_one)
from derive.stability import REWRITES, stable
from derive.symbols import G, N, c, dy, i, j, p, r, t, x, y
from tests.explicit import at_explicit_size, explicit_symbols, is_zero, max_of, softmax_row

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
        general = at_explicit_size(reduced.subs(j, b), size, {"p": ps, "t": ts}, on_simplex)
        assert is_zero(general - sp.diff(loss, xs[b]).subs(on_simplex), xs), b


@pytest.mark.parametrize("size", SIZES)
def test_integer_label_gradient_is_p_minus_one_hot(size):
    op = CATALOG["SoftmaxCrossEntropy"]
    assert sp.expand(loss_gradient(op, "labels") - (p[j] - sp.KroneckerDelta(j, c))) == 0
    xs = explicit_symbols("x", size)
    ps = softmax_row(xs)
    for label in range(size):
        for b in range(size):
            general = at_explicit_size(loss_gradient(op, "labels").subs({j: b, c: label}), size, {"p": ps})
            assert is_zero(general - sp.diff(-sp.log(ps[label]), xs[b]), xs), (label, b)


@pytest.mark.parametrize("size", SIZES)
def test_softmax_backward_is_the_vector_jacobian_product(size):
    xs, gs = explicit_symbols("x", size), explicit_symbols("g", size)
    ys = softmax_row(xs)
    backward = layer_backward(CATALOG["Softmax"])
    assert sp.expand(backward - y[j] * (dy[j] - sp.Sum(dy[i] * y[i], (i, 0, sp.Symbol("K", integer=True,
                                                                                    positive=True) - 1)))) == 0
    for b in range(size):
        general = at_explicit_size(backward.subs(j, b), size, {"y": ys, "g": gs})
        explicit = sum(ga * sp.diff(ya, xs[b]) for ga, ya in zip(gs, ys))
        assert is_zero(general - explicit, xs), b


def test_row_weights_of_the_reductions():
    assert row_weight(REDUCTIONS["mean"]) == 1 / N
    assert row_weight(REDUCTIONS["sum"]) == 1
    assert row_weight(REDUCTIONS["none"]) == G[r]


@pytest.mark.parametrize("name, rewrite", REWRITES, ids=[name for name, _ in REWRITES])
@pytest.mark.parametrize("expr", [softmax(i), cross_entropy(), cross_entropy(sparse_target())],
                         ids=["softmax", "cross_entropy", "cross_entropy_labels"])
def test_each_stability_rewrite_keeps_the_value(name, rewrite, expr):
    size, rng = 4, np.random.default_rng(1)
    xs, ts = explicit_symbols("x", size), explicit_symbols("t", size)
    values = {s: sp.Float(float(v), 50) for s, v in [*zip(xs, rng.normal(0, 30, size)), *zip(ts, rng.uniform(0, 1, size))]}
    for at in range(size):
        before = at_explicit_size(expr.subs({i: at, c: at}), size, {"x": xs, "t": ts})
        after = max_of(xs)(at_explicit_size(rewrite(expr).subs({i: at, c: at}), size, {"x": xs, "t": ts}))
        before, after = sp.N(before.subs(values), 50), sp.N(after.subs(values), 50)
        assert abs(before - after) <= 1e-40 * max(1, abs(before)), (at, before, after)


def test_stable_forms_stay_finite_where_the_plain_ones_overflow():
    size = 3
    xs = explicit_symbols("x", size)
    huge = dict(zip(xs, [1000.0, -1000.0, 999.0]))
    plain = at_explicit_size(softmax(i).subs(i, 0), size, {"x": xs})
    shifted = max_of(xs)(at_explicit_size(stable(softmax(i)).subs(i, 0), size, {"x": xs}))
    as_float = sp.lambdify(xs, plain, "numpy"), sp.lambdify(xs, shifted, "numpy")
    with np.errstate(over="ignore", invalid="ignore"):
        assert not np.isfinite(as_float[0](*huge.values()))
    assert np.isclose(as_float[1](*huge.values()), 1 / (1 + np.exp(-1.0)))


def test_the_explicit_comparison_catches_a_wrong_jacobian():
    xs = explicit_symbols("x", 3)
    ps = softmax_row(xs)
    wrong = at_explicit_size((p[i] * (sp.KroneckerDelta(i, j) + p[j])).subs({i: 0, j: 1}), 3, {"p": ps})
    assert not is_zero(wrong - sp.diff(ps[0], xs[1]), xs)
