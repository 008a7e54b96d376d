"""derive.special's exp and log1p steps for the fused kernels, beside tests/test_fast_math.py's ulps: exp's scaling
p 2^(n - h) 2^h is p 2^n (SymPy) with each factor normal over the whole clamp, TimesPowerOfTwo as printed is
np.ldexp for every m it may get, a NaN with a payload stays NaN (ZeroOrNaN) and would not without it, and log1p's
polynomial is the least degree within half an ulp against mpmath."""
import mpmath
import numpy as np
import pytest
import sympy as sp

from codegen.fused import runtime_variant
from derive.special import (FORMATS, PowerOfTwo, TimesPowerOfTwo, ZeroOrNaN, exp_steps, log1p_polynomial,
                             log1p_steps)

numba = pytest.importorskip("numba")
runtime = pytest.importorskip("generated.fast._runtime")
DTYPES = ["float32", "float64"]


def as_powers(expr):
    """expr with TimesPowerOfTwo(p, m) and PowerOfTwo(m) as the products they stand for, ZeroOrNaN(n) as 0 (n is
    a number there)."""
    return expr.replace(lambda e: isinstance(e, TimesPowerOfTwo), lambda e: e.args[0] * 2 ** e.args[1]).replace(
        lambda e: isinstance(e, PowerOfTwo), lambda e: 2 ** e.args[0]).replace(
        lambda e: isinstance(e, ZeroOrNaN), lambda e: sp.Integer(0))


def scaling(dtype):
    """exp_steps' last three: h, p 2^(n - h), times 2^h."""
    return exp_steps(sp.Symbol("u"), dtype)[-3:]


@pytest.mark.parametrize("dtype", DTYPES)
def test_exps_scaling_is_p_times_2_to_the_n(dtype):
    (h, half), (p, scaled), (_, result) = scaling(dtype)
    n, p0 = sp.symbols("n p0")
    value = as_powers(result.xreplace({p: scaled}).xreplace({p: p0}))
    assert sp.simplify(value.xreplace({h: half}) - p0 * 2 ** n) == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_each_factor_is_a_normal_number_over_the_clamps_whole_range(dtype):
    # p = exp(r), |r| <= ln2/2 (a little more where v/ln2 rounds), in [1/2, 2): p 2^(n - h) must be normal, its
    # exponent in [1 - emax, emax], and 2^h too; the one product then rounds once, to a subnormal or to inf
    precision, emax = FORMATS[dtype]
    steps = exp_steps(sp.Symbol("u"), dtype)
    lo, hi = steps[0][1].args[1:]
    n_of = sp.Lambda(sp.Symbol("v"), steps[1][1].xreplace({steps[0][0]: sp.Symbol("v")}))
    (h, half), _, _ = scaling(dtype)
    assert (int(n_of(lo)), int(n_of(hi))) == (-(emax + precision), emax + 2)
    for n in range(int(n_of(lo)), int(n_of(hi)) + 1):
        k = int(half.subs(sp.Symbol("n"), n))
        assert 1 - emax <= n - k - 1 and n - k <= emax and 1 - emax <= k <= emax, (n, k)


@pytest.mark.parametrize("dtype", DTYPES)
def test_times_power_of_two_as_printed_is_ldexp_for_every_m(dtype):
    _, emax = FORMATS[dtype]
    p, m = sp.symbols("p m")
    variant = runtime_variant([(sp.Symbol("y"), TimesPowerOfTwo(p, m))], dtype)
    source = "\n    ".join(["def f(p, m):", f"T = np.{dtype}", *variant["body"], "return y"])
    namespace = dict(vars(runtime))
    exec(source, namespace)  # noqa: S102 - the printer's own output
    f = numba.vectorize([f"{dtype}({dtype}, {dtype})"])(namespace["f"])
    ms = np.arange(2 - emax, emax + 1, dtype=dtype)
    half = np.array(0.5, dtype)
    for value in (half, np.nextafter(half, 1, dtype=dtype), np.array(1, dtype), np.nextafter(np.array(2, dtype), 0)):
        assert np.array_equal(f(np.full_like(ms, value), ms), np.ldexp(value, ms.astype(int)))


def payload_nans(dtype):
    """NaNs of dtype with payloads, low bits set (the exponent-field addition's case) and not, of both signs."""
    if dtype == "float32":
        bits = np.array([0x7FC00001, 0x7FC00003, 0xFFC000FF, 0x7FC001FF, 0x7FC00000, 0xFFC00000], np.uint32)
    else:
        bits = np.array([0x7FF8000000000001, 0x7FF8000000000FFF, 0xFFF8000000000123, 0x7FF8000000000000], np.uint64)
    return bits.view(dtype)


def exp_of(assignments, dtype):
    """The steps printed as _runtime prints them, compiled as a ufunc with the kernels' fastmath flags."""
    variant = runtime_variant(assignments, dtype)
    source = "\n    ".join(["def f(u):", f"T = np.{dtype}", *variant["body"], f"return {variant['result']}"])
    namespace = dict(vars(runtime))
    exec(source, namespace)  # noqa: S102 - the printer's own output
    return numba.vectorize([f"{dtype}({dtype})"], fastmath=runtime.FASTMATH)(namespace["f"])


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_nan_with_a_payload_gives_nan_and_would_give_a_number_without_zero_or_nan(dtype):
    nans = payload_nans(dtype)
    compiled = numba.vectorize([f"{dtype}({dtype})"], fastmath=runtime.FASTMATH)(getattr(runtime, f"exp_{dtype}"))
    assert np.isnan(compiled(nans)).all()
    steps = exp_steps(sp.Symbol("u"), dtype)
    p, last = steps[-1]
    without = steps[:-1] + [(p, last.replace(lambda e: isinstance(e, ZeroOrNaN), lambda e: sp.Integer(0)))]
    assert not np.isnan(exp_of(without, dtype)(nans)).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_log1ps_polynomial_is_the_least_degree_within_half_an_ulp(dtype):
    precision, _ = FORMATS[dtype]
    coefficients, error = log1p_polynomial(dtype)
    tolerance = 2.0 ** -(precision + 1)
    assert error < tolerance
    with mpmath.workdps(40):   # checked apart from the fit's own estimate, relative to log1p, dense near 0 and 1
        points = [mpmath.mpf(k) / 2000 for k in range(1, 2001)] + [mpmath.mpf(10) ** -k for k in range(1, 40)]
        polynomial = [mpmath.mpf(c.p) / c.q for c in coefficients]
        worst = max(abs(z * mpmath.polyval(polynomial[::-1], z) / mpmath.log1p(z) - 1) for z in points)
        assert worst < tolerance
        fewer = mpmath.chebyfit(lambda z: mpmath.log1p(z) / z if z else mpmath.mpf(1), [0, 1], len(coefficients) - 1,
                                error=True)[1]
        assert fewer / mpmath.log(2) >= tolerance
    # Horner's rule: the terms add up to about five times P's least value (ln2)
    assert sum(abs(float(c)) for c in coefficients) < 3.4


@pytest.mark.parametrize("dtype", DTYPES)
def test_log1p_has_no_division_and_is_z_where_z_is_tiny(dtype):
    (_, expr), = log1p_steps(sp.Symbol("z"), dtype)
    assert not any(power.exp.is_negative for power in expr.atoms(sp.Pow))
    constant = log1p_polynomial(dtype)[0][0]
    assert np.array(float(constant), dtype) == 1    # z P(z) = z once z P's other terms are below an ulp
