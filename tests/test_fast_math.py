"""generated.fast's exp and log1p (printed from derive/special.py's steps) against NumPy's, compiled as
the kernels compile them: the largest error in ulps over dense grids and at the ends (overflow,
subnormals, underflow to 0, +-inf, NaN, 0), and a wrong or dropped coefficient is caught."""
import numpy as np
import pytest
import sympy as sp

from codegen.fused import FusedPrinter, in_unit_interval, runtime_variant, scalar_code
from derive.special import ExpToInf, exp_steps, log1p_steps
from derive.stability import sigmoid_by_branches
from sympy.codegen.cfunctions import log1p

numba = pytest.importorskip("numba")
runtime = pytest.importorskip("generated.fast._runtime")

DTYPES = [np.float32, np.float64]
# the largest error allowed, in ulps of the correctly rounded value (float32 against float64's
# np.exp; float64 against np.exp and np.log1p themselves, which are within 1 ulp)
MAX_ULPS = {"exp": 1, "log1p": 2}
STEPS = {"exp": exp_steps, "log1p": log1p_steps}
_compiled = {}


def compiled(function, dtype):
    """function (scalar Python) as a ufunc compiled with the kernels' fastmath flags, once per test run."""
    key = (function, dtype)
    if key not in _compiled:
        name = np.dtype(dtype).name
        _compiled[key] = numba.vectorize([f"{name}({name})"], fastmath=runtime.FASTMATH)(function)
    return _compiled[key]


def printed(assignments, dtype):
    """The function printed from assignments as _runtime prints its own."""
    variant = runtime_variant(assignments, np.dtype(dtype).name)
    source = "\n    ".join([f"def f(u):", f"T = np.{variant['dtype']}", *variant["body"], f"return {variant['result']}"])
    namespace = dict(vars(runtime))
    exec(source, namespace)  # noqa: S102 - the printer's own output, as _runtime holds it
    return namespace["f"]


def grid(name, dtype):
    """Dense points of the domain, each end's neighbourhood, and the special values."""
    info = np.finfo(dtype)
    if name == "exp":
        ends = [np.log(info.max), np.log(info.smallest_subnormal), np.log(info.smallest_normal)]
        points = [np.linspace(1.05 * np.log(info.smallest_subnormal), 1.05 * np.log(info.max), 3_000_001),
                  np.linspace(-1, 1, 200_001), *(np.linspace(e - 0.5, e + 0.5, 100_001) for e in ends),
                  [np.inf, -np.inf, np.nan, 0.0, -0.0, info.max, -info.max, info.tiny, 1e-30]]
    else:
        points = [np.linspace(0, 1, 2_000_001), np.exp(-np.linspace(0, -1.02 * np.log(info.smallest_subnormal), 200_001)),
                  [np.nan, 0.0, 1.0, info.tiny, info.smallest_subnormal, info.eps]]
    return np.concatenate([np.asarray(p, np.float64) for p in points]).astype(dtype)


def max_ulps(function, name, dtype):
    """The largest error of function over name's grid in ulps of the correctly rounded value (the
    smallest subnormal in the subnormal range), with the point where it is; an infinity or NaN
    where the reference has none, or none where it has one, counts as inf."""
    u = grid(name, dtype)
    with np.errstate(all="ignore"):
        ours = function(u).astype(np.float64)
        exact = getattr(np, name)(u.astype(np.float64))
        rounded = exact.astype(dtype).astype(np.float64)
    spacing = np.maximum(np.spacing(np.abs(rounded).astype(dtype)).astype(np.float64), np.finfo(dtype).smallest_subnormal)
    same = (ours == rounded) | (np.isnan(ours) & np.isnan(exact))
    with np.errstate(all="ignore"):
        error = np.where(same, 0.0, np.abs(ours - exact) / spacing)
    error = np.where(~same & (~np.isfinite(ours) | ~np.isfinite(rounded)), np.inf, error)
    worst = int(np.argmax(error))
    return error[worst], u[worst]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("name", list(STEPS))
def test_runtime_functions_are_within_a_few_ulps_everywhere(name, dtype):
    function = getattr(runtime, f"{name}_{np.dtype(dtype).name}")
    error, at = max_ulps(compiled(function, dtype), name, dtype)
    assert error <= MAX_ULPS[name], f"{name} {np.dtype(dtype).name}: {error:.3g} ulps at {at!r}"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_the_ends_are_np_exps_to_the_bit(dtype):
    info = np.finfo(dtype)
    u = np.array([np.inf, -np.inf, np.nan, 0.0, -0.0, info.max, -info.max, 1000.0, -1000.0,
                  np.log(info.max), np.nextafter(np.log(info.max), np.inf, dtype=dtype),
                  np.log(info.smallest_subnormal) - 1], dtype)
    with np.errstate(all="ignore"):
        assert np.array_equal(compiled(getattr(runtime, f"exp_{np.dtype(dtype).name}"), dtype)(u), np.exp(u), equal_nan=True)
    z = np.array([np.nan, 0.0, info.smallest_subnormal, info.tiny], dtype)
    assert np.array_equal(compiled(getattr(runtime, f"log1p_{np.dtype(dtype).name}"), dtype)(z), np.log1p(z), equal_nan=True)


def wrong_coefficient(expr):
    """expr with its third coefficient below 1 (1/24 in exp, 1/7 in log1p's series) 1% off."""
    coefficient = sorted((r for r in expr.atoms(sp.Rational) if 0 < r < 1), reverse=True)[2]
    return expr.xreplace({coefficient: coefficient * sp.Rational(101, 100)})


def dropped_term(expr):
    """expr with its last term (the smallest coefficient) left out."""
    return expr.xreplace({min(r for r in expr.atoms(sp.Rational) if r > 0): sp.Integer(0)})


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("mistake", [wrong_coefficient, dropped_term])
@pytest.mark.parametrize("name", list(STEPS))
def test_a_wrong_or_dropped_coefficient_is_caught(name, mistake, dtype):
    assignments = STEPS[name](sp.Symbol("u"), np.dtype(dtype).name)
    polynomial = max(range(len(assignments)), key=lambda k: len(assignments[k][1].atoms(sp.Rational)))
    lhs, expr = assignments[polynomial]
    assignments[polynomial] = (lhs, mistake(expr))
    wrong, at = max_ulps(compiled(printed(assignments, dtype), dtype), name, dtype)
    assert wrong > MAX_ULPS[name], f"{mistake.__name__} in {name} {np.dtype(dtype).name}: {wrong:.3g} ulps at {at!r}"


def test_log1p_is_the_runtimes_only_where_its_argument_is_in_0_1():
    x = sp.Symbol("x")
    assert in_unit_interval(sp.exp(-sp.Abs(x))) and not in_unit_interval(sp.exp(x))
    assert scalar_code(log1p(sp.exp(-sp.Abs(x))), {}) == "log1p(exp(-abs(x)))"
    assert scalar_code(log1p(sp.exp(x)), {}) == "math.log1p(exp(x))"
    assert FusedPrinter().doprint(sp.log(x)) == "math.log(x)"


def test_the_sigmoid_by_branches_keeps_the_value_and_shares_softplus_exponential():
    u = sp.Symbol("u")
    plain = 1 / (1 + ExpToInf(u))
    branches = sigmoid_by_branches(plain)
    assert branches.has(sp.Piecewise) and branches.atoms(sp.exp) == {sp.exp(-sp.Abs(u))}
    for value in (-1000, -30, -1, sp.Rational(-1, 1000), 0, sp.Rational(1, 1000), 1, 30, 1000):
        exact = 1 / (1 + sp.exp(sp.sympify(value)))
        assert abs(sp.N(branches.subs(u, value) - exact, 60)) <= sp.Float(1e-50) * sp.N(exact, 60), value
