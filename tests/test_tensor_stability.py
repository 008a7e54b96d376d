"""The element-wise stability rewrites on index-notation assignments (codegen.tensor_lower.ASSIGNMENT_REWRITES):
each keeps every value of every catalog op, GLU's gate derivative no longer cancels, and the rules left out are
left out for the reason their comment gives."""
import dataclasses

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
from derive.tensor import TensorOp, check_sizes, scale_degrees, size_of, unit_rows, with_flags
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
