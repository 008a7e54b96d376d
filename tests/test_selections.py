"""Selections printed as products with a mask (codegen/inplace.py's selected and factored) give np.where's values and
the input's dtype at every input, extremes, infinities and NaN included; a branch that may be infinite where the other
is chosen keeps np.where, and codegen/bounds.py, which decides, refuses what it cannot bound."""
import numpy as np
import pytest
import sympy as sp
from sympy.codegen.cfunctions import expm1

from codegen.bounds import finite_where_unselected
from codegen.inplace import assignments_in_place
from codegen.printer import print_code
from derive.special import Clip

x, g, t, alpha, y, v0 = sp.symbols("x g t alpha y v0")
BELOW_ZERO = Clip(x, -sp.oo, 0)

# (name, assignments before y, y's Piecewise, the factor its second branch is the first's times, if it is): each
# with both branches finite wherever the other is chosen, at every input: infinities too
FINITE = [
    ("KLDiv's t log t, 0 at t = 0", [(v0, sp.Eq(t, 0))],
     sp.Piecewise((0, v0), (sp.log(sp.Piecewise((1, v0), (t, True))) * t, True)), None),
    ("exp of a clipped x, or tanh", [], sp.Piecewise((sp.exp(BELOW_ZERO), x > 0), (sp.tanh(x), True)), None),
]
# each can be infinite where the other branch is chosen: np.where gives a number there, products NaN (inf * 0)
OVERFLOWING = [
    ("ELU, x at x = -inf", sp.Piecewise((x, x > 0), (expm1(BELOW_ZERO), True))),
    ("SELU, 1.05 x at x = -max", sp.Piecewise((1.0507 * x, x > 0), (1.758 * expm1(BELOW_ZERO), True))),
    ("Huber, (t - x)^2 / 2 beyond delta", sp.Piecewise(((t - x) ** 2 / 2, alpha > sp.Abs(t - x)),
                                                       (alpha * (sp.Abs(t - x) - alpha / 2), True))),
]


def inputs(dtype):
    """x, g and t over every sign and magnitude, their extremes, infinities and NaN side by side with small numbers."""
    info = np.finfo(dtype)
    special = np.array([-np.inf, -info.max, -1e30, -88.0, -1.0, -info.tiny, 0.0, info.tiny, 1.0, 88.0, 1e30, info.max,
                        np.inf, np.nan])
    rng = np.random.default_rng(0)
    x_values = np.concatenate([np.repeat(special, special.size), rng.standard_normal(500)]).astype(dtype)
    g_values = np.concatenate([np.tile(special, special.size), rng.standard_normal(500)]).astype(dtype)
    t_values = np.concatenate([np.tile(np.abs(special), special.size), rng.random(500)]).astype(dtype)
    t_values[::3] = 0
    return {"x": x_values, "g": g_values, "t": t_values}


def run(lines, arrays, options):
    """The lines' y and every value they made, run on arrays."""
    namespace = {"np": np, **arrays, **options}
    with np.errstate(all="ignore"):
        for lhs, code in lines:
            exec(f"{lhs} = {code}", namespace)  # noqa: S102 - the printed kernel lines under test
    return namespace


def printed(before, expr):
    return assignments_in_place([*before, (y, expr)], [y], {"x", "g", "t"})


def value_of(before, expr, arrays, options):
    """expr's value as the in-place lines compute it alone."""
    return run(printed(before, expr), arrays, options)["y"]


def reference(before, expr, arrays, options, factor=None):
    """np.where of y's condition and its branches, each computed alone by the same lines (the second as the first
    times factor, where it is given: the grouping the products compute, which rounds alike)."""
    (value, condition), (other, _) = expr.args
    first = value_of(before, value, arrays, options)
    second = (first * value_of(before, factor, arrays, options) if factor is not None
              else value_of(before, other, arrays, options))
    mask = run([*((str(lhs), print_code(e)) for lhs, e in before), ("y", print_code(condition))], arrays, options)["y"]
    with np.errstate(all="ignore"):
        return np.where(mask, first, second)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("alpha_value", [0.5, "max"])
@pytest.mark.parametrize("name, before, expr, factor", FINITE, ids=[case[0] for case in FINITE])
def test_a_selection_of_finite_branches_is_products_equal_to_np_where_in_its_dtype(name, before, expr, factor,
                                                                                     alpha_value, dtype):
    lines = printed(before, expr)
    code = "\n".join(code for _, code in lines)
    inner = len(expr.atoms(sp.Piecewise)) - 1            # selections inside a branch, between numbers here
    assert code.count("np.where") == inner and "where=" not in code, code
    arrays = inputs(dtype)
    options = {"alpha": float(np.finfo(dtype).max) if alpha_value == "max" else alpha_value}
    made = run(lines, arrays, options)
    expected = reference(before, expr, arrays, options, factor)
    assert made["y"].dtype == dtype and expected.dtype == dtype
    assert np.array_equal(made["y"], expected, equal_nan=True), code
    # no float64 temporary in a float32 kernel: every array it made is of the dtype, or a mask
    assert {v.dtype for v in made.values() if isinstance(v, np.ndarray)} <= {np.dtype(dtype), np.dtype(bool)}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name, expr", OVERFLOWING, ids=[case[0] for case in OVERFLOWING])
def test_a_branch_that_can_overflow_where_the_other_is_chosen_keeps_np_where(name, expr, dtype):
    lines = printed([], expr)
    arrays, options = inputs(dtype), {"alpha": 1.0}
    got = run(lines, arrays, options)["y"]
    expected = reference([], expr, arrays, options)
    assert np.array_equal(got, expected, equal_nan=True), "\n".join(code for _, code in lines)
    # what the products would give: NaN where np.where gives a number, so the values above tell the choice
    (value, condition), (other, _) = expr.args
    products = run([(str(y), f"({print_code(value)}) * ({print_code(condition)}) + ({print_code(other)}) * "
                               f"~({print_code(condition)})")], arrays, options)["y"]
    assert (np.isnan(products) & ~np.isnan(expected)).any()


def test_a_selection_between_a_number_and_an_array_keeps_its_dtype():
    """g alpha where x > 0, else g: alpha times a mask would be float64, so the masked multiplication stays."""
    lines = printed([], sp.Piecewise((g * alpha, x > 0), (g, True)))
    made = run(lines, inputs(np.float32), {"alpha": 0.5})
    assert "where=" in lines[-1][1] and made["y"].dtype == np.float32


@pytest.mark.parametrize("value, other, condition, definitions, finite", [
    (x, alpha * expm1(BELOW_ZERO), x > 0, {}, False),              # x at x = -inf, where it is not chosen
    (sp.exp(BELOW_ZERO), sp.tanh(x), x > 0, {}, True),             # each within [-1, 1] at every x
    (sp.exp(BELOW_ZERO), 2 * Clip(x, -1, 1) + 1, x > 0, {}, True),     # within [-1, 3] at every x
    (sp.exp(BELOW_ZERO), 2 * Clip(x, -sp.oo, 0) + 1, x > 0, {}, True),  # 1 where x > 0, where it is not chosen
    (sp.exp(BELOW_ZERO), 2 * Clip(x, 0, sp.oo) + 1, x > 0, {}, False),  # inf at x = inf, where it is not chosen
    (sp.exp(x), sp.S.One, x > 0, {}, True),                        # exp(x) at most 1 where x <= 0, not chosen
    (sp.S.One, sp.exp(x), x > 0, {}, False),                       # exp(x) inf at x = inf, not chosen
    (sp.S.Zero, sp.log(t), t > 0, {}, False),                      # log(t) where t > 0 ... chosen where t <= 0
    (sp.log(t), sp.S.Zero, t > 0, {}, False),                      # log(0) where t = 0 is not chosen: -inf
    (sp.S.Zero, sp.log(sp.Piecewise((1, v0), (t, True))) * t, v0, {v0: sp.Eq(t, 0)}, True),
    (sp.S.One, 1 / x, x > 0, {}, False),                           # 1/x at x = 0
    (sp.S.One, sp.gamma(x), x > 0, {}, False),                     # a function without a rule
    (sp.S.One, sp.tanh(x) * alpha, x > 0, {}, False),              # an option ranges over [-inf, inf] too
])
def test_the_bounds_prove_finite_only_what_is(value, other, condition, definitions, finite):
    assert finite_where_unselected(value, other, condition, definitions) is finite
