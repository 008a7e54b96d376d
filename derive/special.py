"""erf and erfc with NumPy alone: NumPy has neither, so the kernels evaluate series, a continued fraction
and a polynomial that SymPy and mpmath write out (accurate to a few ulp in float64; the tests measure them
against math.erf and math.erfc)."""
import functools

import mpmath
import sympy as sp
from sympy.codegen.cfunctions import expm1

SERIES_BELOW = 2          # |u| below this: Taylor series; above: erfc's continued fraction
SERIES_TERMS = 34         # enough that the first term left out is below 1e-17 at |u| = 2
FRACTION_DEPTH = 60       # enough for 1e-16 relative accuracy of erfc at |u| = 2


def erf_series(u, terms=SERIES_TERMS):
    """2/sqrt(pi) sum_n (-1)^n u^(2n+1) / (n! (2n+1)), in Horner form in u^2."""
    v = sp.Dummy("v")
    coefficients = [sp.erf.taylor_term(2 * n + 1, v) / v ** (2 * n + 1) for n in range(terms)]
    square = u ** 2
    result = sp.Integer(0)
    for coefficient in reversed(coefficients):
        result = sp.Float(sp.N(coefficient, 20), 20) + square * result
    return u * result


def erfc_continued_fraction(x, depth=FRACTION_DEPTH):
    """Laplace's continued fraction erfc(x) = exp(-x^2)/sqrt(pi) / (x + (1/2)/(x + 1/(x + (3/2)/(x + ...))))."""
    tail = x
    for k in range(depth, 0, -1):
        # unevaluated: SymPy would otherwise re-canonicalise the whole nest at every level
        tail = sp.Add(x, sp.Mul(sp.Rational(k, 2), sp.Pow(tail, -1, evaluate=False), evaluate=False),
                      evaluate=False)
    return sp.exp(-x ** 2) / (sp.sqrt(sp.pi) * tail)


class ExpToInf(sp.Function):
    """exp(u) that the kernels let overflow to inf, used only where inf gives the exact value
    (1/(1 + inf) = 0): the kernel evaluates it with NumPy's overflow warning off, as PyTorch's
    sigmoid does. Numbers evaluate as exp."""

    nargs = 1

    @classmethod
    def eval(cls, u):
        if u.is_number:
            return sp.exp(u)
        return None

    def fdiff(self, argindex=1):
        return self

    # readers see exp: that the kernels let it overflow is not part of the mathematics
    def _latex(self, printer):
        return printer._print(sp.exp(self.args[0], evaluate=False))

    def _pretty(self, printer):
        return printer._print(sp.exp(self.args[0], evaluate=False))

    def _sympystr(self, printer):
        return printer._print(sp.exp(self.args[0], evaluate=False))


class Expm1(expm1):
    """expm1(u) kept as written: SymPy's own writes expm1(u - 0.001) back as 0.999 exp(u) - 1 (exp takes a
    float term out as a factor), the form that cancels. Numbers evaluate as exp(u) - 1."""

    @classmethod
    def eval(cls, u):
        return sp.exp(u) - 1 if u.is_number else None


class Clip(sp.Function):
    """u limited to [lo, hi] (hi may be oo): a branch's argument kept in its range. A function of its
    own, not Max/Min, whose assumption queries grow exponentially over the continued fraction."""

    nargs = 3

    @classmethod
    def eval(cls, u, lo, hi):
        if u.is_number and lo.is_number and hi.is_number:
            return sp.Max(lo, sp.Min(u, hi))
        return None


def erf_numpy(u):
    """erf(u) for the kernels; each branch's argument is clamped to its range so that the branch
    np.where does not pick stays finite."""
    # past |u| = 30, erfc is below the smallest double and u^2 would overflow
    inner, outer = Clip(u, -SERIES_BELOW, SERIES_BELOW), Clip(sp.Abs(u), SERIES_BELOW, 30)
    return sp.Piecewise((erf_series(inner), sp.Abs(u) < SERIES_BELOW),
                        (sp.sign(u) * (1 - erfc_continued_fraction(outer)), True))


ERFC_SERIES_BELOW = sp.Rational(1, 2)   # |z| below this: 1 - erf's series, which loses no digit there
# per dtype, the terms and the degree that bring each truncation below 2^-(p + 3), an eighth of an ulp (tested): a
# float32 array is summed in float32, where float64's 13 terms and degree 22 add nothing but passes (a third of them)
ERFC_SERIES_TERMS = {"float32": 7, "float64": 13}   # the first term left out, relative to erfc(1/2)
ERFC_SHIFT = 3                          # t = (z - K)/(z + K) maps [1/2, oo) into (-1, 1]
ERFC_DEGREE = {"float32": 10, "float64": 22}        # the polynomial's relative error
ERFC_UNDERFLOWS = 28                    # exp(-28^2) is 0 in both dtypes, so z clipped there gives erfc = 0 exactly
                                        # (at 27 it was 5e-319, a subnormal GELU's x = -1.8e308 made -4.7e-11)


class Erfc(sp.erfc):
    """erfc(u) kept as written: SymPy's own writes erfc(-u) back as 2 - erfc(u), the form that cancels.
    Numbers evaluate as erfc."""

    @classmethod
    def eval(cls, u):
        return sp.erfc(u) if u.is_number else None

    # readers see erfc
    def _latex(self, printer):
        return printer._print(sp.erfc(self.args[0], evaluate=False))

    def _sympystr(self, printer):
        return printer._print(sp.erfc(self.args[0], evaluate=False))


@functools.lru_cache(maxsize=None)
def erfc_tail_polynomial(dtype="float64"):
    """The coefficients, constant first, and the relative error of the polynomial P of degree ERFC_DEGREE[dtype]
    in t = (z - K)/(z + K) with (z + K) exp(z^2) erfc(z) = P(t) for z >= ERFC_SERIES_BELOW (K = ERFC_SHIFT):
    mpmath's Chebyshev fit at 40 digits. The left side is smooth in t up to t = 1 (z = oo, where it is
    1/sqrt(pi)), so one polynomial covers the whole tail, and no power of t grows: every coefficient is
    below 2 in magnitude, so Horner's rule loses nothing to cancellation."""
    with mpmath.workdps(40):
        shift = mpmath.mpf(ERFC_SHIFT)

        def scaled(t):
            if t == 1:
                return 1 / mpmath.sqrt(mpmath.pi)
            z = shift * (1 + t) / (1 - t)
            return (z + shift) * mpmath.erfc(z) * mpmath.exp(z * z)
        low = (mpmath.mpf(ERFC_SERIES_BELOW.p) / ERFC_SERIES_BELOW.q - shift) / (
            mpmath.mpf(ERFC_SERIES_BELOW.p) / ERFC_SERIES_BELOW.q + shift)
        poly, error = mpmath.chebyfit(scaled, [low, 1], ERFC_DEGREE[dtype] + 1, error=True)
        return tuple(sp.Float(mpmath.nstr(c, 20), 20) for c in reversed(poly)), float(error * mpmath.sqrt(mpmath.pi))


def erfc_tail(z, dtype="float64"):
    """erfc(z) for z >= ERFC_SERIES_BELOW: exp(-z^2) P(t)/(z + K), t = (z - K)/(z + K), relatively accurate
    however small erfc(z) is (1 - erf(z) is 0 from z = 6 in float64)."""
    coefficients, _ = erfc_tail_polynomial(dtype)
    return gaussian(z) * horner(coefficients, (z - ERFC_SHIFT) / (z + ERFC_SHIFT)) / (z + ERFC_SHIFT)


def gaussian(z):
    """exp(-z^2) = exp(-h^2) exp(-(z - h)(z + h)) with h = z rounded to 1/256 (|z| < 32): h^2 has at most 26
    bits and is exact, and the second exponent is below 1/8, so rounding z^2 costs no digit; exp(-z^2) as
    written is off by z^2 times the rounding of z^2, 500 ulps at z = 26."""
    h = sp.floor(256 * z + sp.Rational(1, 2)) / 256
    return sp.exp(-h ** 2) * sp.exp(-(z - h) * (z + h))


def erfc_numpy(z, dtype="float64"):
    """erfc(z) for the kernels, to dtype's precision: 1 - erf(z) by erf's series where |z| < 1/2, erfc_tail(z)
    above and 2 - erfc_tail(-z) below; each branch's argument clamped to its range, so that the branch np.where
    does not pick stays finite."""
    inner, outer = Clip(z, -ERFC_SERIES_BELOW, ERFC_SERIES_BELOW), Clip(sp.Abs(z), ERFC_SERIES_BELOW, ERFC_UNDERFLOWS)
    tail = erfc_tail(outer, dtype)
    return chosen(sp.Heaviside(ERFC_SERIES_BELOW - sp.Abs(z), 0), 1 - erf_series(inner, ERFC_SERIES_TERMS[dtype]),
                  chosen(sp.Heaviside(z, 0), tail, 2 - tail))


def chosen(step, value, other):
    """value where the step is 1, other where it is 0, as step value + (1 - step) other: exact where both are
    finite, as the clamps make erfc's branches (each product is the value or 0), and NaN where the step is.
    np.where's loop branches on each entry, about 30 multiplications' time on a mask of random signs."""
    return step * value + (1 - step) * other


# exp and log1p without libm, for the fused kernels: numba leaves math.exp and math.log1p scalar calls,
# which its loop vectorizer cannot inline; these are arithmetic, a floor and a bit view, which it can.
# IEEE 754 formats: significand bits (with the implicit one) and the largest exponent.
FORMATS = {"float32": (24, 127), "float64": (53, 1023)}


class PowerOfTwo(sp.Function):
    """2^m for an integer-valued m with 2^m a normal number: the kernels write m + bias into the
    exponent field of a float's bits instead of computing it. Integers evaluate."""

    nargs = 1

    @classmethod
    def eval(cls, m):
        if m.is_Integer:
            return sp.Integer(2) ** m
        return None


def taylor_degree(radius, tolerance, coefficient):
    """The least d whose Taylor remainder bound coefficient(d + 1) radius^(d + 1) is below tolerance."""
    degree = 0
    while coefficient(degree + 1) * radius ** (degree + 1) >= tolerance:
        degree += 1
    return degree


def horner(coefficients, v):
    """sum_k coefficients[k] v^k, nested as Horner's rule evaluates it."""
    result = sp.Integer(0)
    for coefficient in reversed(coefficients):
        result = coefficient + v * result
    return result


def exp_steps(u, dtype):
    """exp(u) in dtype as assignments [(symbol, expr)], the last one the value: u = n ln2 + r with
    n = round(u/ln2), exp(r) by its Taylor series (|r| <= ln2/2: the degree that brings the
    truncation below half an ulp), times 2^n as two powers of two, p 2^h 2^(n - h), so that both
    factors are normal numbers down to the subnormal results and up to the overflow.

    u is first clamped to [lo, hi], where exp(lo) rounds to 0 and exp(hi) to inf: then u = -inf
    gives 0 and u = inf gives inf (NaN passes the clamp and the polynomial, and gives NaN).
    Cody-Waite: ln2 = ln2_hi + ln2_lo with ln2_hi short enough that n ln2_hi is exact."""
    precision, emax = FORMATS[dtype]
    ln2 = sp.log(2)
    lo, hi = (1 - emax - precision - 1) * ln2, (emax + 2) * ln2
    # n needs as many bits as the largest |n|, |lo|/ln2; ln2_hi keeps the rest of the significand
    n_bits = int(sp.ceiling(sp.log(emax + precision + 1, 2)))
    ln2_hi = sp.floor(ln2 * 2 ** (precision - n_bits)) / sp.Integer(2) ** (precision - n_bits)
    # relative to exp(r) >= exp(-ln2/2), the remainder is below 2 |r|^(d + 1)/(d + 1)!
    degree = taylor_degree(ln2 / 2, sp.Integer(2) ** -(precision + 1), lambda k: 2 / sp.factorial(k))
    v, n, r, h, p = sp.symbols("v n r h p")
    return [(v, Clip(u, lo, hi)), (n, sp.floor(v / ln2 + sp.Rational(1, 2))),
            (r, v - n * ln2_hi), (r, r - n * (ln2 - ln2_hi)),
            (p, horner([1 / sp.factorial(k) for k in range(degree + 1)], r)),
            (h, sp.floor(n / 2)), (p, p * PowerOfTwo(h)), (p, p * PowerOfTwo(n - h))]


def log1p_steps(z, dtype):
    """log1p(z) for z in [0, 1] in dtype as assignments [(symbol, expr)], the last one the value:
    log(1 + z) = 2 atanh(z/(2 + z)), z/(2 + z) in [0, 1/3], by atanh's odd series: with
    s = 2z/(2 + z) and w = s^2/4, 2 atanh(s/2) = s + s w (1/3 + w/5 + w^2/7 + ...), as many terms as
    bring the truncation below half an ulp at w = 1/9."""
    precision, _ = FORMATS[dtype]
    # the series' tail past w^m is below w^m/(2m + 1)/(1 - w), relative to its first term
    w_max = sp.Rational(1, 9)
    terms = taylor_degree(w_max, sp.Integer(2) ** -(precision + 1), lambda m: 1 / ((2 * m + 1) * (1 - w_max)))
    s, w, y = sp.symbols("s w y")
    return [(s, 2 * z / (z + 2)), (w, s ** 2 / 4),
            (y, s + s * w * horner([sp.Rational(1, 2 * m + 3) for m in range(terms)], w))]
