"""erf and erfc with NumPy alone: NumPy has neither, so the kernels evaluate series, a continued fraction
and a polynomial that SymPy and mpmath write out (accurate to a few ulp; the tests measure them against
math.erf and math.erfc)."""
import functools

import mpmath
import sympy as sp
from sympy.codegen.cfunctions import expm1

SERIES_BELOW = 2          # |u| below this: Taylor series; above: erfc's continued fraction
SERIES_TERMS = 34         # enough that the first term left out is below 1e-17 at |u| = 2
FRACTION_DEPTH = 60       # enough for 1e-16 relative accuracy of erfc at |u| = 2


def erf_series(u):
    """2/sqrt(pi) sum_n (-1)^n u^(2n+1) / (n! (2n+1)), in Horner form in u^2."""
    v = sp.Dummy("v")
    coefficients = [sp.erf.taylor_term(2 * n + 1, v) / v ** (2 * n + 1) for n in range(SERIES_TERMS)]
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


# erfc(z) = exp(-a^2) F(v)/(a + K), a = |z|, v = a/(a + K) - 1/2 in [-1/2, 1/2), and 2 minus it where z < 0:
# one polynomial over the whole line, where 1 - erf's series near 0 and a polynomial in the tail were two branches,
# both computed everywhere (a float32 array's erfc was 40% of a transformer step, most of it those passes and
# the arrays both kept at once: a new array costs a page fault per 4 KiB, at 1e6 entries thirty passes' time)
ERFC_SHIFT = {"float32": 3, "float64": 4}      # K, per dtype one for which few terms fit F to its precision:
ERFC_DEGREE = {"float32": 10, "float64": 23}   # relative error below 2^-(p + 3) (tested; float32's the fewest)
ERFC_UNDERFLOWS = {"float32": 11, "float64": 28}   # exp(-a^2) is 0 from here: |z| is clipped here (z^2 stays
                                                   # finite), F fitted up to here, and erfc(inf) = 0 exactly


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
    """The coefficients, constant first, and the relative error of the polynomial F of degree ERFC_DEGREE[dtype]
    in v = a/(a + K) - 1/2 with (a + K) exp(a^2) erfc(a) = F(v) for 0 <= a <= ERFC_UNDERFLOWS[dtype]
    (K = ERFC_SHIFT[dtype]): mpmath's Chebyshev fit at 40 digits. F is smooth in v up to v = 1/2 (a = oo, where
    it is 1/sqrt(pi)) and decreases from K at v = -1/2, so one polynomial covers the whole half line. Its terms
    over |v| <= 1/2 add up to about K (tested), so Horner's rule loses little to cancellation: none at v = -1/2,
    at most K sqrt(pi) times the value's rounding at v = 1/2. The error is relative to F's least value."""
    with mpmath.workdps(40):
        shift, end = mpmath.mpf(ERFC_SHIFT[dtype]), ERFC_UNDERFLOWS[dtype]

        def scaled(v):
            a = shift * (1 + 2 * v) / (1 - 2 * v)
            return (a + shift) * mpmath.exp(a * a) * mpmath.erfc(a)
        last = end / (end + shift) - mpmath.mpf(1) / 2
        poly, error = mpmath.chebyfit(scaled, [-mpmath.mpf(1) / 2, last], ERFC_DEGREE[dtype] + 1, error=True)
        return tuple(sp.Float(mpmath.nstr(c, 20), 20) for c in reversed(poly)), float(error / scaled(last))


def erfc_steps(z, dtype="float64"):
    """erfc(z) in dtype as assignments [(symbol, expr)], the last one y, in an order that keeps three arrays of
    z's size at once. With a = |z| clipped at ERFC_UNDERFLOWS (NaN passes the clip):
    - exp(-a^2) = exp(-h^2) exp((h - a)(a + h)), h = a rounded down to 1/256: h^2 has at most 24 bits in float32
      (a < 11) and is exact, the second exponent is in (-1/4, 0], so rounding a^2 costs no digit (exp(-a^2) as
      written is off by a^2 times the rounding of a^2: 500 ulps at a = 26), and each exponential is at most 1,
      where float32's np.exp is off by two units of 2^-24 (above 1, of 2^-23). d = h - a is exact, so h - d is a
      again, remade in an array an exponent used.
    - erfc(a) = exp(-a^2)/(a + K) F(v), v = a/(a + K) - 1/2 (erfc_tail_polynomial): v is a/(a + K) less an exact
      1/2, off by an ulp of 1/2 at most, as a = 0 needs (1 - 2K/(a + K) was off by an ulp of K, K ulps of erfc).
    - erfc(z) = (1 - sign z) + sign(z) erfc(a): each term exact, the sum rounded once, 1 at z = 0."""
    coefficients, _ = erfc_tail_polynomial(dtype)
    a, h, s, d, q, b, e, r, f, v, g, tail, sign, m, y = sp.symbols("a h s d q b e r f v g tail sign m y")
    return [(a, sp.Min(sp.Abs(z), ERFC_UNDERFLOWS[dtype])), (h, sp.floor(256 * a) / 256), (s, a + h), (d, h - a),
            (q, sp.exp(d * s)), (b, h - d), (e, sp.exp(-h ** 2) * q), (r, b + ERFC_SHIFT[dtype]), (f, e / r),
            (v, b / r - sp.Rational(1, 2)), (g, horner(coefficients, v)), (tail, f * g),
            (sign, sp.sign(z)), (m, 1 - sign), (y, m + sign * tail)]


def erfc_numpy(z, dtype="float64"):
    """erfc(z) to dtype's precision as one expression: erfc_steps, each step's value put where it is read."""
    value = sp.Symbol("y")
    for lhs, expr in reversed(erfc_steps(z, dtype)):
        value = value.xreplace({lhs: expr})
    return value


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


class TimesPowerOfTwo(sp.Function):
    """p 2^m for an integer-valued m with p 2^m a normal number: the kernels add m to the exponent field
    of p's bits, an integer addition where p PowerOfTwo(m) is a multiplication (the fused BCE's loop is
    bound by its multiplier ports). Numbers evaluate."""

    nargs = 2

    @classmethod
    def eval(cls, p, m):
        if p.is_number and m.is_Integer:
            return p * sp.Integer(2) ** m
        return None


class ZeroOrNaN(sp.Function):
    """u - u: 0 for a finite u, NaN for NaN (or an infinity), as the kernels compute it (their fastmath flags
    have no nnan, so LLVM keeps it) and SymPy would fold it. Added to exp's result, it keeps a NaN argument
    NaN where TimesPowerOfTwo alone may not: adding to the exponent field turns a NaN whose payload has low
    bits set into a number. Numbers evaluate."""

    nargs = 1

    @classmethod
    def eval(cls, u):
        if u.is_number:
            return sp.Integer(0) if u.is_finite else sp.nan
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
    truncation below half an ulp), times 2^n as p 2^(n - h) 2^h, h = floor(n/2), so that both factors are
    normal numbers down to the subnormal results and up to the overflow: p 2^(n - h) as p's exponent field
    plus n - h (TimesPowerOfTwo: exact, no product), times 2^h the one product, which rounds the subnormal
    results and overflows to inf once; plus n - n, 0, or NaN for a NaN u (ZeroOrNaN), which the kernels add
    in the product's fused multiply-add. (n clipped to the normal range for the exponent field and the rest
    as the product's factor, the same values, made a LogSoftmax backward 10% slower: two more operations.)

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
            (h, sp.floor(n / 2)), (p, TimesPowerOfTwo(p, n - h)), (p, p * PowerOfTwo(h) + ZeroOrNaN(n))]


@functools.lru_cache(maxsize=None)
def log1p_polynomial(dtype):
    """The coefficients, constant first, of the polynomial P of least degree with log(1 + z) = z P(z) on
    [0, 1] to a relative error below 2^-(precision + 1), and that error: mpmath's Chebyshev fit of
    log(1 + z)/z at 40 digits, whose error over [0, 1] divided by ln2 (P's least value) bounds the relative one.
    log(1 + z)/z is analytic but at z = -1, so each degree gains a factor 3 + 2 sqrt(2): degree 9 in
    float32, 20 in float64. The terms add up to at most 3.4 (tested), five times P's least value."""
    precision, _ = FORMATS[dtype]
    with mpmath.workdps(40):
        def scaled(z):
            return mpmath.log1p(z) / z if z else mpmath.mpf(1)
        tolerance = mpmath.mpf(2) ** -(precision + 1)
        degree = 0
        while True:
            poly, error = mpmath.chebyfit(scaled, [0, 1], degree + 1, error=True)
            if error / mpmath.log(2) < tolerance:
                break
            degree += 1
        # exact decimal rationals: the printer rounds each to the dtype once
        return tuple(sp.Rational(mpmath.nstr(c, 25)) for c in reversed(poly)), float(error / mpmath.log(2))


def log1p_steps(z, dtype):
    """log1p(z) for z in [0, 1] in dtype as assignments [(symbol, expr)], the last one the value: z P(z) with
    log1p_polynomial's P by Horner's rule, no division (the former 2 atanh(z/(2 + z)) series spent one, the
    costliest operation of the fused BCE's loop). P(0) rounds to 1 in both dtypes, so log1p(z) = z for the
    tiny and the subnormal z. (z + z^2 R(z), R one degree more, rounds no better here, 1.5 ulps, and its
    extra constant made LLVM spill registers in the BCE loop: 25% slower.)"""
    coefficients, _ = log1p_polynomial(dtype)
    y = sp.Symbol("y")
    return [(y, z * horner(coefficients, z))]
