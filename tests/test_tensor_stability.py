"""The element-wise stability rewrites on index-notation assignments (codegen.tensor_lower.ASSIGNMENT_REWRITES):
each keeps every value of every catalog op, GLU's gate derivative no longer cancels, and the rules left out are
left out for the reason their comment gives."""
import dataclasses
import itertools
import math

import mpmath
import numpy as np
import pytest
import sympy as sp

from codegen.pipeline import imported
from codegen.render import ROOT
from codegen.tensor_lower import (ASSIGNMENT_REWRITES, ELEMENT_WISE_ONLY, max_shifted, mean_corrected, names_of,
                                  program_of)
from codegen.tensor_verify import sample
from derive.catalog import CATALOG
from derive.special import ExpToInf
from derive.stability import INDEX_REWRITES, REWRITES, rewritten_by
import derive.tensor
from derive.tensor import (TensorOp, check_sizes, isolated_entry, isolated_entry_difference, scale_degrees, size_of,
                           unit_rows, with_flags)
from tests.references import evaluated_shifted

ELEMENT_WISE = tuple(r for r in ASSIGNMENT_REWRITES if r not in INDEX_REWRITES)
TENSOR_OPS = [op for op in CATALOG.values() if isinstance(op, TensorOp)]


def shifted(op):
    """op's program as the lowering has it before ASSIGNMENT_REWRITES."""
    taken = set(names_of(op))
    return mean_corrected(max_shifted(program_of(op), taken), taken)


def test_the_element_wise_rewrites_keep_every_value_of_every_index_notation_op():
    """All of ELEMENT_WISE on every forward step and adjoint of every catalog op, evaluated at the check sizes by
    derive.tensor's loops; 1 - sigmoid changes GLU's backward, and nothing else changes."""
    rng, changed = np.random.default_rng(23), []
    for op in TENSOR_OPS:
        op = with_flags(op, {}) if op.flags else op
        _, arrays, params = sample(op, rng)
        scope = {**check_sizes(op), **{sp.Symbol(o, real=True): v for o, v in op.options.items()}}
        def shape(indices):
            return tuple(scope[size_of(i)] for i in indices)
        noise = {m: rng.integers(0, 2, shape(indices)) / 0.5 for m, (indices, *_) in op.noise.items()}  # dropout's
        arrays = {**arrays, **params, **noise, "g": rng.standard_normal(shape(op.steps[-1].indices))}
        plain = shifted(op)

        def ruled_form(a):  # ExpToInf is exp, printed to overflow quietly: the loops evaluate it as exp
            return a._replace(expr=rewritten_by(a.expr, ELEMENT_WISE)[0].replace(
                lambda e: isinstance(e, ExpToInf), lambda e: sp.exp(e.args[0])))
        ruled = plain._replace(forward=tuple(map(ruled_form, plain.forward)),
                               backward=tuple(map(ruled_form, plain.backward)))
        changed += [op.name] if ruled != plain else []
        before = evaluated_shifted(plain.backward, evaluated_shifted(plain.forward, arrays, scope), scope)
        after = evaluated_shifted(ruled.backward, evaluated_shifted(ruled.forward, arrays, scope), scope)
        for name, value in before.items():
            np.testing.assert_allclose(after[name], value, rtol=1e-12, atol=1e-12, err_msg=f"{op.name} {name}")
    assert changed == ["GLU"]


def test_the_gates_derivative_is_two_sigmoids_at_45_digits():
    """(1 - sigmoid(b)) sigmoid(b) = sigmoid(-b) sigmoid(b): SymPy's identity, and the right side at 45 digits
    against the left at 400 across the range (1 - sigmoid(700) cancels 304 digits: what rounds to 0 in floats)."""
    b = sp.Symbol("b", real=True)

    def s(u):   # sigmoid's definition
        return 1 / (1 + sp.exp(-u))
    left, right = (sp.lambdify(b, e, "mpmath") for e in ((1 - s(b)) * s(b), s(-b) * s(b)))
    assert sp.simplify((1 - s(b)) * s(b) - s(-b) * s(b)) == 0
    for v in (-700, -30, -1, 0, 0.5, 10, 40, 470, 700):
        with mpmath.workdps(400):
            exact = left(mpmath.mpf(v))
        with mpmath.workdps(45):
            assert abs(right(mpmath.mpf(v)) - exact) <= mpmath.mpf(10) ** -40 * abs(exact), v


@pytest.fixture(scope="module")
def package():
    return imported(ROOT / "generated", fused=False)


@pytest.mark.parametrize("dtype, gate", [(np.float32, 10.0), (np.float32, 30.0), (np.float64, 40.0),
                                         (np.float64, 470.0)])
def test_glus_gate_gradient_is_accurate_where_one_minus_sigmoid_rounds_away(package, dtype, gate):
    """dx of the gate b for y = a sigmoid(b) is g a sigmoid(b) sigmoid(-b): within 4 ulps of mpmath where the
    plain (1 - sigmoid(b)) sigmoid(b), in the same dtype, is off by more than 100 (or 0: it was before the rule)."""
    x, g = np.array([[1.5, gate]], dtype), np.array([[0.75]], dtype)
    layer = package.GLU()
    layer.forward(x)
    got = layer.backward(g)[0, 1]
    with mpmath.workdps(400):   # 1 - sigmoid(470) cancels 204 digits
        sig = 1 / (1 + mpmath.exp(-mpmath.mpf(gate)))
        truth = mpmath.mpf(0.75) * mpmath.mpf(1.5) * sig * (1 - sig)
    ulp = np.spacing(dtype(truth))
    plain_sigmoid = 1 / (1 + np.exp(-x[0, 1]))
    plain = g[0, 0] * x[0, 0] * (1 - plain_sigmoid) * plain_sigmoid
    assert abs(float(got) - float(truth)) <= 4 * float(ulp), (got, truth)
    assert abs(float(plain) - float(truth)) > 100 * float(ulp), (plain, truth)    # the check can fail


def test_the_steps_as_branches_would_move_a_mask_out_of_its_sum():
    """Why steps as branches is ELEMENT_WISE_ONLY: on causal attention's g_Z, a Sum over s of a term masked by
    s <= t, it takes the step out of the Sum, where s is not bound (a free s), which masks of indices does not."""
    program = shifted(with_flags(CATALOG["ScaledDotProductAttention"], {"is_causal": True}))
    g_z = next(a for a in program.backward if a.name == "g_Z")
    steps = next(rule for name, rule, _ in REWRITES if name == "steps as branches")
    s = next(v for v, *_ in g_z.expr.atoms(sp.Sum).pop().limits)
    assert s not in g_z.expr.free_symbols and s in steps(g_z.expr).free_symbols
    assert "steps as branches" in ELEMENT_WISE_ONLY


SCALED = [op for op in TENSOR_OPS if op.scaling]
# each scaled op in each backend that has it (BatchNorm1d has no fused module: codegen.tensor_fused says why)
SCALED_BACKENDS = [(op, fused) for op in SCALED for fused in (False, True)
                   if not fused or (ROOT / "generated" / "fast" / f"{op.module}.py").exists()]


def test_the_normalisations_declare_their_scale_equivariance():
    assert {op.name for op in SCALED} == {"LayerNorm", "RMSNorm", "BatchNorm1d", "BatchNorm2d"}


@pytest.mark.parametrize("op", SCALED, ids=lambda op: op.name)
def test_scale_degrees_proves_the_output_unchanged_and_each_gradient_a_power_of_c(op):
    """y(c x; c^2 eps) = y(x; eps) by SymPy, and the generated kernels agree bit for bit at c a power of two (which
    scales exactly): the same y, dx(x) = c dx(c x; c^2 eps), the params' gradients unchanged."""
    degrees = scale_degrees(op)
    assert degrees[op.steps[-1].name] == 0 and degrees["dx"] == -1 and degrees["x"] == 1
    assert all(degrees[f"d{p}"] == 0 for p in op.params)
    cls = getattr(imported(ROOT / "generated", fused=False), op.name)
    rng, c = np.random.default_rng(5), 2.0 ** -40
    shape = (4, 3, 5, 2)[:len(op.inputs["x"])]
    x, g = rng.uniform(-3, 3, shape), rng.uniform(-1, 1, shape)
    eps = op.options["eps"]
    plain, scaled = cls(3, eps=eps), cls(3, eps=eps * c ** op.scaling["eps"])
    y, dx = plain.forward(x), plain.backward(g)
    assert np.array_equal(scaled.forward(c * x), y)
    assert np.array_equal(c * scaled.backward(g), dx)
    assert all(np.array_equal(getattr(plain, f"d{p}"), getattr(scaled, f"d{p}")) for p in op.params)


def test_scale_degrees_refuses_a_false_scaling():
    op = CATALOG["LayerNorm"]
    with pytest.raises(ValueError, match="LayerNorm: y is not c\\^k times itself"):
        scale_degrees(dataclasses.replace(op, scaling={"x": 1}))     # eps left unscaled: var + eps is not
    with pytest.raises(ValueError, match="output y is c\\^1 times itself"):
        scale_degrees(dataclasses.replace(op, steps=op.steps[:-1] + (op.steps[-1]._replace(
            expr=op.steps[-1].expr * sp.IndexedBase("x", real=True)[op.steps[-1].indices]),)))


@pytest.mark.parametrize(("op", "fused"), SCALED_BACKENDS,
                         ids=[f"{op.name}-{'fused' if fused else 'numpy'}" for op, fused in SCALED_BACKENDS])
def test_a_row_whose_variance_overflows_is_computed_in_units_of_c(op, fused):
    """Row 1 (a BatchNorm's channel 1) at 2^100 times its values in float32, beyond the root of the largest number:
    the module's forward kernel alone gives a non-finite statistic there (what the guard reads), the class y(x) =
    y(c x; c^2 eps) and dx(x) = c dx(c x; c^2 eps) for c = 2^-100 there, the other rows as the plain kernels give
    them, dgamma from both, and a BatchNorm's running mean the unscaled one."""
    package = imported(ROOT / "generated", fused=fused)
    module = getattr(package.fast if fused else package, op.module)
    cls, axis = getattr(module, op.name), op.inputs["x"].index(unit_rows(op)[0])
    rng, c, eps = np.random.default_rng(7), np.float32(2.0 ** -100), np.float32(op.options["eps"])
    shape = (4, 3, 5, 2)[:len(op.inputs["x"])]
    x, g = rng.uniform(-3, 3, shape).astype(np.float32), rng.uniform(-1, 1, shape).astype(np.float32)
    row, others = (slice(None),) * axis + (1,), (slice(None),) * axis + ([0, 2],)
    large = x.copy()
    large[row] /= c
    layer, plain, scaled = (cls(3, eps=e, dtype=np.float32) for e in (eps, eps, eps * c * c))
    with np.errstate(all="ignore"):
        kernel = module.forward(large, layer.gamma, *([layer.beta] if "beta" in op.params else []), eps)
        y, dx = layer.forward(large), layer.backward(g)
    assert any(not np.isfinite(s[1]) for s in kernel[1:] if s.ndim == 1)
    y_plain, dx_plain = plain.forward(x), plain.backward(g)
    y_scaled, dx_scaled = scaled.forward(large * c), scaled.backward(g)
    assert np.isfinite(y).all() and np.isfinite(dx).all()
    for got, want in ((y[row], y_scaled[row]), (dx[row], c * dx_scaled[row]), (y[others], y_plain[others]),
                      (dx[others], dx_plain[others])):   # the kernels' sums may run in another order
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    expected = np.where(np.arange(shape[axis]).reshape((-1,) + (1,) * (x.ndim - axis - 1)) == 1, y_scaled, y_plain)
    summed = tuple(i for i, index in enumerate(op.inputs["x"]) if index not in op.params["gamma"][0])
    np.testing.assert_allclose(layer.dgamma, (g * expected).sum(axis=summed), rtol=1e-5, atol=1e-6)
    if op.running:   # momentum 0.1 from 0
        assert np.isclose(layer.running_mean[1], 0.1 * large[row].astype(np.float64).mean(), rtol=1e-5)


# ---- dx at an entry alone far from its row's others (derive.tensor.isolated_entry) ----

def isolated_sizes(op):
    """Concrete sizes for isolated_entry_difference: 3 entries in a row (the first summed axis 3, any other 1)."""
    summed = [i for i in op.steps[-1].indices if i not in unit_rows(op)]
    return {size_of(i): 3 if i == summed[0] else 1 for i in op.steps[-1].indices}, (1,) + (0,) * (len(summed) - 1)


@pytest.mark.parametrize("op", SCALED, ids=lambda op: op.name)
def test_the_isolated_entrys_form_is_proven_equal_to_the_derived_dx(op):
    sizes, entry = isolated_sizes(op)
    for at in ((1,), (0,), (2,)):      # the isolated entry, and the row's others
        assert isolated_entry_difference(op, sizes, entry, at + entry[1:]) == 0, at


def test_the_isolated_entry_proof_catches_a_form_without_eps(monkeypatch):
    """The check can fail: the same form with eps left out (eps[n] -> 0) is not the derived dx."""
    op = CATALOG["LayerNorm"]
    exact = isolated_entry(op)
    eps = sp.IndexedBase("eps", real=True)[unit_rows(op)]
    wrong = dataclasses.replace(exact, steps=(*exact.steps[:-1], exact.steps[-1]._replace(
        expr=exact.steps[-1].expr.subs(eps, 0))))
    monkeypatch.setattr(derive.tensor, "isolated_entry", lambda op: wrong)
    assert isolated_entry_difference(op, *isolated_sizes(op)) != 0


def normalised_gradient(x, g, eps, centred):
    """dx of (x - mean x)/sqrt(var x + eps) (centred) or x/sqrt(mean x^2 + eps) of one row, g its upstream
    gradient, at 50 digits."""
    with mpmath.workdps(50):
        x, g = [mpmath.mpf(float(v)) for v in x], [mpmath.mpf(float(v)) for v in g]
        K = len(x)
        mean = mpmath.fsum(x) / K if centred else 0
        sigma = mpmath.sqrt(mpmath.fsum((v - mean) ** 2 for v in x) / K + eps)
        hat = [(v - mean) / sigma for v in x]
        along = mpmath.fsum(a * b for a, b in zip(g, hat)) / K
        return [float((a - (mpmath.fsum(g) / K if centred else 0) - b * along) / sigma) for a, b in zip(g, hat)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("op", SCALED, ids=lambda op: op.name)
def test_dx_at_an_isolated_entry_is_within_four_ulps_where_the_derived_form_cancels(package, op, dtype):
    """The row (1e4, 1, 1.5, -3) (a BatchNorm's channel of 4 entries), g = (0.3, -0.7, 0.2, 0.9): the class's dx
    within 4 ulps of mpmath at every entry; the derived kernel alone (backward) more than 50 ulps off at 1e4."""
    row, along = np.array([1e4, 1, 1.5, -3], dtype), np.array([0.3, -0.7, 0.2, 0.9], dtype)
    shape = (1, 4) if op.name in ("LayerNorm", "RMSNorm") else (4,) + (1,) * (len(op.inputs["x"]) - 1)
    layer = getattr(package, op.name)(shape[1] if len(shape) == 2 and op.name != "BatchNorm1d" else 1, dtype=dtype)
    x, g = row.reshape(shape), along.reshape(shape)
    layer.forward(x)
    eps = layer.eps if layer.eps is not None else np.finfo(dtype).eps
    truth = np.array(normalised_gradient(row, along, eps, centred=op.name != "RMSNorm"))
    ulps = np.abs(layer.backward(g).reshape(-1) - truth) / np.spacing(np.abs(truth).astype(dtype))
    assert ulps.max() <= 4, ulps
    derived = getattr(package, op.module).backward(*layer._saved, g, eps)[0].reshape(-1)
    assert abs(derived[0] - truth[0]) / np.spacing(np.abs(truth[0]).astype(dtype)) > 50


# ---- attention's backward: dK scaled after its product, g_P in units of c (codegen.tensor_lower.rescaled_adjoints) ----

def attention_gradients(Q, K, V, g):
    """(dQ, dK, dV) of softmax(Q K^T / sqrt(D)) V for one sample (T x D, S x D, S x E, T x E) at 50 digits."""
    with mpmath.workdps(50):
        Q, K, V, g = (mpmath.matrix(np.asarray(a, np.float64).tolist()) for a in (Q, K, V, g))
        root = mpmath.sqrt(Q.cols)
        A = Q * K.T / root
        P = mpmath.matrix(A.rows, A.cols)
        for t in range(A.rows):
            top = max(A[t, s] for s in range(A.cols))
            row = [mpmath.exp(A[t, s] - top) for s in range(A.cols)]
            for s in range(A.cols):
                P[t, s] = row[s] / mpmath.fsum(row)
        g_P = g * V.T
        g_A = mpmath.matrix(A.rows, A.cols)
        for t in range(A.rows):
            mean = mpmath.fsum(P[t, s] * g_P[t, s] for s in range(A.cols))
            for s in range(A.cols):
                g_A[t, s] = P[t, s] * (g_P[t, s] - mean)
        return [np.array(m.tolist(), dtype=float) for m in (g_A * K / root, g_A.T * Q / root, P.T * g)]


def test_linear_in_proves_the_softmax_adjoint_linear_in_its_adjoints_together_and_refuses_a_square():
    from derive.tensor import linear_in
    P, Z, g_Z, g_P = (sp.IndexedBase(n, real=True) for n in ("P", "Z", "g_Z", "g_P"))
    n, t, s = sp.symbols("n t s", integer=True)
    g_A = (Z[n, t] * g_Z[n, t] + g_P[n, t, s]) * P[n, t, s]
    assert linear_in(g_A, "g_Z", "g_P") and not linear_in(g_A, "g_P")     # g_Z alone left unscaled: not c g_A
    assert not linear_in(g_P[n, t, s] ** 2 * P[n, t, s], "g_P") and not linear_in(P[n, t, s], "g_P")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dk_at_a_subnormal_query_is_scaled_after_its_product(dtype):
    # Q's entry the smallest subnormal, g_A = +-2^60 (2e171 in float64) through V: 1/sqrt(2) times Q first rounds
    # it to itself (sqrt(2) times the truth in dK, a normal number); after the product each entry rounds once
    package = imported(ROOT / "generated", fused=False)
    tiny, big = np.finfo(dtype).smallest_subnormal, dtype(2.0 ** (60 if dtype == np.float32 else 570))
    Q, K = np.array([[[-tiny, 0]]], dtype), np.zeros((1, 2, 2), dtype)
    V, g = np.array([[[4 * big, 0], [-4 * big, 0]]], dtype), np.array([[[1, 0]]], dtype)
    layer = package.ScaledDotProductAttention()
    layer.forward(Q, K, V)
    dQ, dK, dV = layer.backward(g)
    truth = attention_gradients(Q[0], K[0], V[0], g[0])[1]
    assert np.abs(truth[:, 0]).min() >= np.finfo(dtype).tiny       # a normal number, from a subnormal Q
    np.testing.assert_allclose(dK[0], truth.astype(dtype), rtol=4 * np.finfo(dtype).eps)
    g_A = np.array([[2 * big, -2 * big]], dtype)                  # the product's other operand, as the kernel has it
    first = g_A.T @ np.multiply(Q[0], dtype(1 / np.sqrt(2)))     # the scale moved onto Q: the bug this test catches
    assert not np.allclose(first, truth, rtol=1e-3, atol=0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_attention_backward_is_in_units_of_c_where_g_p_overflows(dtype):
    # g_P = g V^T at 1.2 and 1.0 times the largest number (inf), P = (1/2, 1/2): g_A = +-0.05 max is finite, and so
    # are dQ, dK; the plain steps give inf - inf = NaN there
    package = imported(ROOT / "generated", fused=False)
    top = np.finfo(dtype).max
    Q, K = np.array([[[1, 1]]], dtype), np.array([[[2.0 ** -60, 0], [0, 0]]], dtype)
    V, g = np.array([[[0.6 * top, 0], [0.5 * top, 0]]], dtype), np.array([[[2, 0]]], dtype)
    layer = package.ScaledDotProductAttention()
    layer.forward(Q, K, V)
    with np.errstate(all="ignore"):
        dQ, dK, dV = layer.backward(g)
        g_P = g @ V.swapaxes(1, 2)
        plain = (g_P - (layer._saved[-1] * g_P).sum(-1, keepdims=True)) * layer._saved[-1]
    assert not np.isfinite(plain).all()          # what the guard is for
    for got, truth in zip((dQ, dK, dV), attention_gradients(Q[0], K[0], V[0], g[0])):
        np.testing.assert_allclose(got[0], truth.astype(dtype), rtol=8 * np.finfo(dtype).eps)


def test_the_attention_guards_leave_the_usual_path_one_check_of_the_gradients():
    # dK's scale after its product (no Q / sqrt(D) in the backward); the guard reads its maxima only where it runs
    source = (ROOT / "generated" / "scaled_dot_product_attention.py").read_text()
    backward = source[source.index("def backward("):source.index("def forward_is_causal(")]
    usual, guarded = backward.split("    if not (np.isfinite(dQ).all() and np.isfinite(dK).all()):")
    usual = "\n".join(line for line in usual.split("\n") if not line.startswith(" " * 8))  # no guard's own lines
    assert "np.multiply(Q," not in usual and "maximum.reduce" not in usual and "g_scale" in guarded
    assert "if np.count_nonzero(P) < P_live:" in usual     # the underflow guard's one pass over P


# ---- the softmax's adjoint at the argmax (codegen.tensor_lower.argmax_shifted), products in units (product_in_units) --

def test_the_softmax_adjoint_shift_keeps_every_attention_gradient_and_is_refused_where_unproven():
    """argmax_shifted's program against the plain one, by derive.tensor's loops at the check sizes, causal or not; a
    g_A that is not invariant under g_P - c (no Sum(P) = 1 behind it) keeps its g_P."""
    from codegen.tensor_lower import argmax_shifted, rewritten
    rng = np.random.default_rng(5)
    for op in (with_flags(CATALOG["ScaledDotProductAttention"], {"is_causal": causal}) for causal in (False, True)):
        _, arrays, _ = sample(op, rng)
        scope = check_sizes(op)
        arrays["g"] = rng.standard_normal(tuple(scope[size_of(i)] for i in op.steps[-1].indices))
        taken = set(names_of(op))
        plain = rewritten(program_of(op), taken)
        shifted_program = argmax_shifted(plain, taken)
        assert [a.name for a in shifted_program.backward][1:4] == ["P_argmax", "g_P_top", "g_P_shifted"]
        forward = evaluated_shifted(plain.forward, arrays, scope)
        before, after = (evaluated_shifted(p.backward, forward, scope) for p in (plain, shifted_program))
        for name in plain.returns:
            np.testing.assert_allclose(after[name], before[name], rtol=1e-12, atol=1e-14, err_msg=name)
        g_A = next(a for a in plain.backward if a.name == "g_A")
        P, g_P = (sp.IndexedBase(n, real=True) for n in ("P", "g_P"))
        wrong = plain._replace(backward=tuple(a._replace(expr=P[a.indices] * g_P[a.indices]) if a is g_A else a
                                              for a in plain.backward))
        assert argmax_shifted(wrong, set(taken)).backward == wrong.backward


@pytest.mark.parametrize("dtype, margin", [(np.float32, 16.0), (np.float64, 36.0)])
def test_attention_g_a_at_a_near_one_hot_rows_argmax_is_whole(dtype, margin):
    # scores (margin, 0): P_b = e^-margin is about an ulp of 1, and P_a (g_P,a - sum P g_P) rounds P_a g_P,a to an
    # ulp of g_P,a where the truth P_a P_b (g_P,a - g_P,b) is of P_b's size; shifted by g_P,a it is the others' term
    package = imported(ROOT / "generated", fused=False)
    Q, K = np.array([[[1.0]]], dtype), np.array([[[margin], [0.0]]], dtype)
    V, g = np.array([[[1.0], [0.5]]], dtype), np.array([[[1.0]]], dtype)
    layer = package.ScaledDotProductAttention()
    layer.forward(Q, K, V)
    dQ, dK, dV = layer.backward(g)
    truth = attention_gradients(Q[0], K[0], V[0], g[0])
    for got, exact in zip((dQ, dK), truth):
        np.testing.assert_allclose(got[0], exact.astype(dtype), rtol=4 * np.finfo(dtype).eps, atol=0)
    P = layer._saved[-1]
    g_P = g @ V.swapaxes(1, 2)
    plain = P * (g_P - (P * g_P).sum(-1, keepdims=True))          # the form before the shift
    assert abs(plain[0, 0, 0] * margin - truth[0][0, 0]) > 100 * np.spacing(dtype(truth[0][0, 0]))


def test_attention_dk_whose_truth_overflows_is_the_infinity_of_its_sign():
    # P = (1/2, 1/2), g_A finite, dK[s] = g_A[0, s] 1e107 + g_A[1, s] (-1e132): 8e408 - 2e435, past the largest
    # number: each product overflows before the sum cancels (inf - inf); in units of Q's column it is -inf
    package = imported(ROOT / "generated", fused=False)
    Q, K = np.array([[[1e107], [-1e132]]]), np.array([[[1e-256], [0.0]]])
    V, g = np.array([[[-1e304], [1e179]]]), np.array([[[-0.03], [-0.83]]])
    layer = package.ScaledDotProductAttention()
    layer.forward(Q, K, V)
    with np.errstate(all="ignore"):
        dQ, dK, dV = layer.backward(g)
        truth = attention_gradients(Q[0], K[0], V[0], g[0])
        np.testing.assert_array_equal(dK[0], truth[1])                 # -inf and inf, as mpmath's overflow to float
        assert np.isinf(truth[1]).all() and np.isfinite(dQ).all()
        np.testing.assert_allclose(dQ[0], truth[0], rtol=4e-16)
        P = layer._saved[-1][0]
        g_A = P * (g[0] @ V[0].T - (P * (g[0] @ V[0].T)).sum(-1, keepdims=True))
        assert not (np.sign(g_A.T @ Q[0]) == np.sign(truth[1])).all()  # the product as it is: NaN


def test_a_finite_gradient_beside_an_overflowing_one_keeps_its_small_terms():
    # the full grid's sample: dQ[0, 0] overflows, so the guard runs; dK[0, 0] = g_A[0, 0] Q[0, 0]/sqrt(2) is 2.8e-138
    # from Q[0, 0] = -1e-298, as g_A[1, 0] = 0 at Q's 1e237 beside it; Q's column in units (c2 ~ 2^-1300) rounds
    # -1e-298 to 0, so only the entries that were not finite are taken from the product in units
    package = imported(ROOT / "generated", fused=False)
    Q, K = np.array([[[-1e-298, 1e-248], [1e237, 1e-173]]]), np.array([[[-1e-198, -1e-223], [1e262, -1e-98]]])
    V = np.array([[[-1e90, 1e-20, 1e162], [-1e65, -1e-48, -1e-73]]])
    g = np.array([[[-0.987, -0.634, -0.158], [-0.243, -0.762, -0.146]]])
    layer = package.ScaledDotProductAttention()
    layer.forward(Q, K, V)
    with np.errstate(all="ignore"):
        dQ, dK, dV = layer.backward(g)
        truth = attention_gradients(Q[0], K[0], V[0], g[0])
    assert np.isinf(truth[0][0, 0]) and dQ[0, 0, 0] == truth[0][0, 0]     # the guard ran
    assert truth[1][0, 0] != 0
    np.testing.assert_allclose(dK[0], truth[1], rtol=4e-16)


# ---- an intermediate product of the backward guard in units of a finer power of two (finer_run) ----------------

def multihead_gradients(query, key, value):
    """{gradient: mpf or [mpf]} of MultiheadAttention at E = H = D = T = 1, S = len(key), every weight 1 and bias 0,
    g = 1, by mpmath from the float inputs: the projections are the inputs themselves, so no rounding of them."""
    with mpmath.workdps(60):
        q, ks, vs = mpmath.mpf(float(query)), [mpmath.mpf(float(x)) for x in key], [mpmath.mpf(float(x)) for x in value]
        scores = [q * k for k in ks]
        e = [mpmath.exp(a - max(scores)) for a in scores]
        P = [x / sum(e) for x in e]
        mean = sum(p * v for p, v in zip(P, vs))
        g_A = [p * (v - mean) for p, v in zip(P, vs)]
        g_k, g_q = [a * q for a in g_A], sum(a * k for a, k in zip(g_A, ks))
        return {"dquery": g_q, "dkey": g_k, "dWq": g_q * q, "dWk": sum(x * k for x, k in zip(g_k, ks)), "dbk": sum(g_k)}


@pytest.mark.parametrize("dtype, magnitude", [(np.float32, 20), (np.float64, 150)])
def test_multihead_dwk_whose_per_head_g_k_overflows_is_finite(dtype, magnitude):
    # query 10^m, key (10^-m, -10^-m/2): scores (1, -1/2), P not one-hot; value +-10^(m + 5 (50)) gives g_A of that
    # size, so g_k = g_A q overflows (dkey's truth too) while dWk = sum_s g_k key and dWq are finite. g_P is finite,
    # so the guard's c is 1: the run at c gave dWk inf (float32) or NaN; the run at c_f = 2^-k bounds g_A q too
    package = imported(ROOT / "generated", fused=False)
    a, c = 10.0 ** magnitude, 10.0 ** (magnitude + (5 if dtype == np.float32 else 50))
    layer = package.MultiheadAttention(embed_dim=1, num_heads=1)
    for p in ("Wq", "Wk", "Wv", "Wo", "bq", "bk", "bv", "bo"):
        setattr(layer, p, np.full(getattr(layer, p).shape, p.startswith("W"), dtype))
    query, key = np.array([[[a]]], dtype), np.array([[[1 / a], [-0.5 / a]]], dtype)
    value = np.array([[[c], [-c]]], dtype)
    layer.forward(query, key, value)
    with np.errstate(all="ignore"):
        dquery, dkey, _ = layer.backward(np.ones((1, 1, 1), dtype))
    truth = multihead_gradients(query.ravel()[0], key.ravel(), value.ravel())
    rtol = 8 * np.finfo(dtype).eps
    for got, exact in ((dquery, truth["dquery"]), (layer.dWq, truth["dWq"]), (layer.dWk, truth["dWk"])):
        assert np.isfinite(float(exact)) and abs(float(exact)) < np.finfo(dtype).max
        np.testing.assert_allclose(got.ravel()[0], float(exact), rtol=rtol)
    np.testing.assert_array_equal(np.sign(dkey.ravel()), [1, -1])         # inf and -inf, as the truth overflows
    assert np.isinf(dkey).all() and all(abs(x) > np.finfo(dtype).max for x in truth["dkey"])
    P = layer._saved[11]                                                     # the run at c, as the guard had it
    with np.errstate(all="ignore"):
        g_P = value.ravel()
        g_A = P.ravel() * (g_P - (P.ravel() * g_P).sum())
        old = (g_A * query.ravel()[0] * key.ravel()).sum()      # g_k first, then dWk: the old guard's order
    assert not np.isfinite(old)


def test_the_finer_run_is_only_where_an_intermediate_product_is_guarded():
    # MultiheadAttention's g_k and g_q are such products, read by the returned gradients; ScaledDotProductAttention
    # has none (its dQ, dK are returned): its guard is as it was
    mha = (ROOT / "generated" / "multihead_attention.py").read_text()
    sdpa = (ROOT / "generated" / "scaled_dot_product_attention.py").read_text()
    backward = mha[mha.index("def backward("):mha.index("def forward_is_causal(")]
    usual, guarded = backward.split("    if not (np.isfinite(dquery).all()")
    assert "finer" not in usual and "g_k_finer" in guarded and "dWk_finer" in guarded
    assert "finer" not in sdpa


def rms_norm_classes(folder, read_back):
    """generated copied into folder with RMSNorm's NumPy and fused modules printed now, the backward reading the
    saved x hat (read_back, codegen.tensor_lower.read_back_rules' array read) or, as before, x: {backend: class}
    (the fused one interpreted, math as numba compiles it)."""
    import shutil
    from codegen import tensor_lower
    from codegen.render import operation_files
    shutil.copytree(ROOT / "generated", folder, ignore=shutil.ignore_patterns("__pycache__"))
    with pytest.MonkeyPatch.context() as patched:
        if not read_back:
            patched.setattr(tensor_lower, "steps_read_back", lambda program: program)
        for path, text in operation_files(CATALOG["RMSNorm"]).items():
            (folder / path).write_text(text)
    package = imported(folder, fused=True)
    return {"numpy": package.RMSNorm, "fused": package.fast.RMSNorm}


def test_rms_norm_backward_reads_x_hat_where_ms_to_the_3_2_overflows(tmp_path):
    # a float32 row of spread 2e13: ms = 1.75e26 is finite, (eps + ms)^(3/2) = 2.3e39 is not; the old g_ms,
    # Sum(x g gamma) over that power, was 0 there and dx lost a term, in both backends; read back from x hat,
    # g_ms = -Sum(x hat g gamma) / (2 (eps + ms)) is finite
    from codegen import accuracy
    pytest.importorskip("numba")
    subject = accuracy.tensor_subject(CATALOG["RMSNorm"])
    rng = np.random.default_rng(5)
    arrays = {"x": np.array([[2e13, -1e13, 5e12], [0.3, -1.2, 2.0]], np.float32),
              "gamma": rng.uniform(0.5, 2, 3).astype(np.float32), "g": rng.uniform(-1, 1, (2, 3)).astype(np.float32)}
    truth = accuracy.TensorTruth(subject, arrays, accuracy.tensor_options(subject, np.float32))
    for read_back in (False, True):
        for backend, cls in rms_norm_classes(tmp_path / str(read_back), read_back).items():
            tally = accuracy.judged(accuracy.Tally(), accuracy.run_tensor_class(cls, subject, arrays), truth,
                                    np.float32, accuracy.bound("RMSNorm", np.float32))
            assert bool(tally.failures) != read_back, (backend, read_back, tally.example)


def test_rms_norms_read_back_backward_is_proven_equal_to_the_derived_one():
    # SymPy, every Sum written out at N = 1, K = 3: g_ms and dx of the program the NumPy and fused kernels lower
    # (x read back as x hat sqrt(eps + ms)) equal the derived ones; the read back is there (no (eps + ms)^(3/2))
    from codegen.tensor_lower import factor_saved, rewritten
    op = CATALOG["RMSNorm"]
    program = rewritten(program_of(factor_saved(op)), names_of(op))
    derived = program_of(op)
    assert "steps read back" in program.rewrites
    g_ms = next(a for a in program.backward if a.name == "g_ms")
    assert not any(p.exp == sp.Rational(-3, 2) for p in g_ms.expr.atoms(sp.Pow)), g_ms.expr
    eps = sp.Symbol("eps", positive=True)
    sizes = {sp.Symbol("K", integer=True, positive=True): 3, sp.Symbol("N", integer=True, positive=True): 1}

    def value(assignments, name, at):
        """Assignment name at integer indices at, every step by its value, each input entry a real symbol."""
        step = {a.name: a for a in assignments}[name]
        expr = step.expr.xreplace(sizes).xreplace(dict(zip(step.indices, at)))
        expr = expr.xreplace({s: eps for s in expr.free_symbols if s.name == "eps"})
        expr = expr.replace(lambda e: isinstance(e, sp.Sum), lambda e: sp.Sum(e.function, *e.limits).doit())
        names = {a.name for a in assignments}
        return expr.replace(lambda e: isinstance(e, sp.Indexed) and all(i.is_Integer for i in e.indices),
                            lambda e: value(assignments, e.base.name, e.indices) if e.base.name in names
                            else sp.Symbol(f"{e.base.name}_{'_'.join(map(str, e.indices))}", real=True))
    new, old = (*program.forward, *program.backward), (*derived.forward, *derived.backward)
    for name, at in (("g_ms", (0,)), ("dx", (0, 0)), ("dx", (0, 2))):
        difference = value(new, name, at) - value(old, name, at)
        assert sp.simplify(sp.powsimp(sp.together(difference), force=True)) == 0, (name, at)
        values = {s: sp.Rational(v) for s, v in zip(sorted(difference.free_symbols, key=str),
                                                      ("1e-7", "0.7", "1.3", "1.9", "-0.4", "0.2", "0.9", "2e13",
                                                       "-1e13", "5e12"))}
        with mpmath.workdps(60):
            assert abs(sp.N(difference.xreplace(values), 50)) < sp.Float("1e-40"), (name, at)


def test_rounded_names_only_a_step_of_inputs_and_params():
    from derive.declare import DeclarationError
    from derive.tensor import tensor_op
    steps = ["q[n, t, d] = Sum(x[n, t, e] * W[d, e], e)", "A[n, t, s] = Sum(q[n, t, d] * q[n, s, d], d)",
             "y[n, t, d] = Sum(A[n, t, s] * q[n, s, d], s)"]
    op = tensor_op("Projected", inputs={"x": "n t e"}, params={"W": ("d e", "uniform")}, steps=steps, sizes={"S": "T"},
                   rounded=("q",))
    assert op.rounded == ("q",)
    for wrong in ("A", "y", "z"):       # A reads a step, y is the output, z no step
        with pytest.raises(DeclarationError, match="rounded"):
            tensor_op("Projected", inputs={"x": "n t e"}, params={"W": ("d e", "uniform")}, steps=steps, sizes={"S": "T"},
                      rounded=(wrong,))


# ---- a softmax entry that underflowed (codegen.tensor_lower.underflow_recovered) -------------------------------------

def test_the_product_in_logs_is_the_product_and_normal_where_the_plain_one_underflows():
    from codegen.tensor_lower import product_of_logs
    from derive.special import ExpToInf
    e, h, r = sp.Symbol("e", real=True), sp.Symbol("h", real=True), sp.Symbol("r", positive=True)
    assert sp.simplify(product_of_logs(e, r, h).replace(ExpToInf, sp.exp) - sp.exp(e) * r * h) == 0
    # on its domain, as the kernel prints it in float64 (log(0) = -inf, whose exponential is 0): within its
    # exponent's rounding of the truth, where exp(e) r h is 0 wherever exp(e) underflows
    lost = 0
    with np.errstate(divide="ignore"):
        for e_, r_, h_ in itertools.product((-1300.0, -745.5, -50.0, 0.0), (1.0, 7.5, 1e3),
                                            (-1e282, -3.0, -1e-300, 0.0, 2.5e-310, 4.0, 1e300)):
            got = np.sign(h_) * np.exp(e_ + np.log(r_) + np.log(np.abs(h_)))
            with mpmath.workdps(50):
                truth = mpmath.exp(e_) * r_ * h_
            exponent = abs(e_) + abs(math.log(r_)) + (abs(math.log(abs(h_))) if h_ else 0)   # its rounding, relative
            assert abs(got - truth) <= (exponent + 8) * np.finfo(float).eps * abs(truth) + 5e-324, (e_, r_, h_)
            lost += np.exp(e_) * r_ * h_ == 0 and abs(truth) >= np.finfo(float).tiny
    assert lost > 0                       # what the guard is for


def test_attention_recovers_a_gradient_from_an_underflowed_softmax_entry():
    # A = (1200, 0): P = (1, e^-1200), 0 in float64; V's 1e282 at the argmax makes g_A's second entry
    # -1e282 e^-1200 = -1.4e-239, a normal number, and dK's second row with it (MultiheadAttention's full grid)
    package = imported(ROOT / "generated", fused=False)
    Q, K = np.array([[[1.0]]]), np.array([[[1200.0], [0.0]]])
    V, g = np.array([[[1e282], [0.0]]]), np.array([[[1.0]]])
    layer = package.ScaledDotProductAttention()
    layer.forward(Q, K, V)
    P = layer._saved[-1]
    assert P[0, 0, 1] == 0 and (P * (g @ V.swapaxes(1, 2)))[0, 0, 1] == 0     # the plain form loses it
    dQ, dK, dV = layer.backward(g)
    truth = attention_gradients(Q[0], K[0], V[0], g[0])[1]
    assert abs(truth[1, 0]) > 1e-240
    np.testing.assert_allclose(dK[0], truth, rtol=1300 * np.finfo(float).eps)


def test_the_underflow_check_counts_a_causal_mask_as_no_underflow():
    # masked entries are 0 by the mask: P_live counts the unmasked ones, so a causal P at usual scores passes it
    package = imported(ROOT / "generated", fused=False)
    rng = np.random.default_rng(0)
    Q, K, V = (rng.standard_normal((2, 5, 4)) for _ in range(3))
    layer = package.ScaledDotProductAttention(is_causal=True)
    layer.forward(Q, K, V)
    P = layer._saved[-1]
    unmasked = 2 * np.count_nonzero(np.arange(5) <= np.arange(5)[:, None])
    assert np.count_nonzero(P) == unmasked < P.size
    source = (ROOT / "generated" / "scaled_dot_product_attention.py").read_text()
    assert "P_live = N*np.add.reduce(np.where(np.arange(S) <= np.arange(T)[:, None], 1, 0)" in source


def test_every_params_only_kernel_is_called_by_its_class():
    # a layer with flags calls its variants' backward whole: a backward_params there is code no path runs
    for path in sorted((ROOT / "generated").glob("*.py")):
        source = path.read_text()
        if "def backward_params(" in source:
            assert "= backward_params(*self._saved" in source and "params_alone = True" in source, path.name
        else:
            assert "params_alone = True" not in source, path.name
