"""The element-wise stability rewrites on index-notation assignments (codegen.tensor_lower.ASSIGNMENT_REWRITES):
each keeps every value of every catalog op, GLU's gate derivative no longer cancels, and the rules left out are
left out for the reason their comment gives."""
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
from derive.tensor import TensorOp, check_sizes, size_of, with_flags
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
