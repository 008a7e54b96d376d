"""Near a zero where a function's terms cancel, its Taylor polynomial about that zero.

GELU's derivative Phi(x) + x phi(x) is 0 at x0 = -0.7518 as the sum of two terms of about 0.23: however each is
rounded, the sum near x0 carries an absolute error of an ulp of 0.23, which is hundreds of ulps of the result
and more than the input's own rounding changes it by (the accuracy contract's allowance). No rewrite of the
sum helps, since any form of it is that difference. Near x0 the function is its Taylor series in h = x - x0,
whose terms do not cancel: sum_k c_k h^k with c_m h^m the first, each next one smaller (h within the radius).

A zero of a function of x alone is a place where a sum vanishes (a factor that is an Add) while its terms do
not; a product's zero (x Phi(x) at 0) loses nothing and is left alone. A zero is where the function changes
sign, or touches 0 without changing sign (cosh(x) - 1 at 0: even_zeros). For each such zero the rule gives the
centre x0 (the float64 nearest it: h = x - x0 is then exact for float64 x near x0, Sterbenz, and the rounding
of x0 moves the value by half an ulp of x0 times the slope, within the contract's allowance for the input),
the radius within which the sum is not accurate enough, and the polynomial, computed in float64 for both
dtypes (float32's within the radius are few). The coefficients are the function's derivatives at the zero,
by mpmath from the SymPy expression, at 60 digits; the degree is the least whose first term left out is
below 2^-56 of the first kept, at the radius."""
import functools
import math
from dataclasses import dataclass

import mpmath
import numpy as np
import sympy as sp

from derive.functions import sigmoid
from derive.special import horner

SPAN = 64               # zeros are looked for in [-SPAN, SPAN]: beyond it an activation's terms no longer cancel
SCAN = 8192             # the scan's sign changes find the zeros (a double zero's, even_zeros: its derivative's)
DIGITS = 60
ROUGHLY = 2.0 ** -30    # a value this small beside its terms, in doubles, may be a zero: bisected at DIGITS
TERMS_ERROR = 2         # a form's sum is off by this many ulps of its terms' magnitude (each term to an ulp or so)
TRUNCATED = 2.0 ** -56  # the first term of the series left out, relative to the first kept, at the radius
MOST_TERMS = 48
H = sp.Symbol("h", real=True)   # the polynomial's variable, x - center
STEP = mpmath.mpf(2) ** 0.25    # the radius's steps
SAFETY = 1.25           # the kernels' functions are a few ulps, not correctly rounded as loses' simulation's
# lambdify's names for what derive.stability's forms call that mpmath lacks
MPMATH = [{"Clip": lambda a, low, high: min(max(a, low), high), "ExpToInf": mpmath.exp, "erfc": mpmath.erfc,
           "Erfc": mpmath.erfc}, "mpmath"]


@dataclass(frozen=True)
class NearZero:
    """Where a function of x cancels: |x - center| < radius, and its value there, polynomial(x - center)."""

    center: float
    radius: float
    polynomial: sp.Expr      # in H = x - center
    terms: int

    def at(self, x):
        """The polynomial's value at x (a symbol or an entry x[i]), x - center as the kernel takes it."""
        return self.polynomial.xreplace({H: x - sp.Float(self.center, 17)})


def mpmath_function(expr, x):
    """expr (of x alone, a plain or a stable form) as an mpmath function of one number."""
    return sp.lambdify(x, _plain(expr), MPMATH)


def _plain(expr):
    return expr.replace(sigmoid, lambda u: 1 / (1 + sp.exp(-u)))


def cancelling_terms(form, x, x0):
    """The terms, as mpmath functions, of the factor of form (the kernel's form, a product) that vanishes at x0 if
    it is a sum whose terms do not; None if there is none (form is 0 there as a product of a factor that is)."""
    with mpmath.workdps(DIGITS):
        for factor in sp.Mul.make_args(sp.factor_terms(form)):
            if not (factor.is_Add and factor.has(x)):
                continue
            terms = [mpmath_function(term, x) for term in factor.args]
            if vanishes(mpmath_function(factor, x), terms, x0):
                return terms
    return None


def real_zeros(expr, x, f, terms, span=SPAN, count=SCAN, where=None):
    """The zeros of f (expr by mpmath, a sum of terms) in [-span, span] where it changes sign, each to DIGITS
    digits (vanishes). A jump across 0 (a step, a sign) is no zero, nor a sign that the scan's rounding made up
    (erf(x) + 1 in the far left tail, where it is 0 in doubles). where(a, b): whether to bisect a sign change
    between the scan's points a and b (None: each)."""
    found = []
    quick = sp.lambdify(x, _plain(expr), [MPMATH[0], "math"])
    points = [-span + 2 * span * k / count for k in range(count + 1)]
    signs = [_sign(quick, p) for p in points]          # in doubles; the bisection and the check at DIGITS
    with mpmath.workdps(DIGITS):
        nonzero = [(p, s) for p, s in zip(points, signs) if s]
        for (a, sa), (b, sb) in zip(nonzero, nonzero[1:]):
            if sa == sb or where is not None and not where(a, b):
                continue
            root = _bisected(f, mpmath.mpf(a), mpmath.mpf(b), sa)
            if vanishes(f, terms, root):
                found.append(root)
    return found


def even_zeros(expr, x, f, terms, span=SPAN, count=SCAN):
    """The zeros of f (expr by mpmath, a sum of terms) in [-span, span] where it touches 0 without changing sign
    ((x - t)^2 at t, cosh(x) - 1 at 0), which no scan of its signs finds: the points where its derivative changes
    sign (real_zeros of it) at which f vanishes to DIGITS digits (vanishes). The derivative of a step or a sign
    is taken as 0: a kink is no zero of this kind."""
    slope = sp.diff(expr, x).replace(sp.DiracDelta, lambda *args: sp.S.Zero)
    if not slope.has(x):
        return []
    quick = sp.lambdify(x, _plain(slope), [MPMATH[0], "math"])

    def touching(a, b):
        """Whether f is about 0 beside its terms, in doubles, where the slope changes sign in (a, b) (bisected in
        doubles): the scan's rounding makes up sign changes of a slope in the tails (sigmoid's), where f is not
        near 0, and each costs a bisection at DIGITS."""
        point = _bisected(quick, a, b, _sign(quick, a))
        with mpmath.workprec(53):
            value, parts = _at(f, point), [_at(term, point) for term in terms]
            return value is not None and None not in parts and abs(value) <= ROUGHLY * sum(abs(p) for p in parts)
    slope_terms = [mpmath_function(term, x) for term in sp.Add.make_args(sp.expand(slope))]
    with mpmath.workdps(DIGITS):
        return [z for z in real_zeros(slope, x, mpmath_function(slope, x), slope_terms, span, count, touching)
                if vanishes(f, terms, z)]


def vanishes(f, terms, point):
    """Whether f, the sum of terms, is at point below 10^-(DIGITS - 10) of their magnitude: a zero to DIGITS."""
    value, parts = _at(f, point), [_at(term, point) for term in terms]
    return value is not None and None not in parts and abs(value) <= mpmath.mpf(10) ** (10 - DIGITS) * sum(
        abs(part) for part in parts)


def _at(f, point):
    """f(point), None where it is not a real number (1/0, a log of a negative number)."""
    try:
        value = f(point)
    except (ZeroDivisionError, ValueError, OverflowError, TypeError):
        return None
    return None if isinstance(value, complex) or mpmath.im(value) != 0 else value


def _sign(f, point):
    try:
        value = f(point)
    except (ZeroDivisionError, ValueError, OverflowError, TypeError):
        return 0
    if not isinstance(value, float) and (isinstance(value, complex) or mpmath.im(value) != 0) or value != value:
        return 0   # a float first: the scan's 8193 doubles, where mpmath.im costs more than the function
    return (value > 0) - (value < 0)


def _bisected(f, a, b, sign_a):
    for _ in range(4 * DIGITS):
        middle = (a + b) / 2
        sign = _sign(f, middle)
        if sign == 0:
            return middle
        a, b = (middle, b) if sign == sign_a else (a, middle)
    return (a + b) / 2


@functools.lru_cache(maxsize=64)   # a radius halved asks again
def taylor_coefficients(f, x0, count):
    """[f(x0), f'(x0), f''(x0)/2, ...], count of them, at DIGITS digits."""
    with mpmath.workdps(DIGITS):
        return tuple(mpmath.taylor(f, x0, count - 1))


def loses(form, x, f, x0):
    """Whether form, evaluated with each operation rounded to float64's or float32's precision (mpmath at 53
    and 24 bits: elementary functions correctly rounded), breaks SAFETY times the contract's allowance near the
    zero x0 of f (its truth), at distances from 1e-4 to 0.1 either side. SiLU's derivative cancels at its zero
    but not by enough (0.67 of the allowance; its kernel 0.82): it keeps its form and its speed."""
    evaluate = mpmath_function(form, x)
    for precision in (53, 24):
        epsilon = mpmath.mpf(2) ** (1 - precision)
        for distance in [sign * d for d in np.geomspace(1e-4, 0.1, 24) for sign in (-1, 1)]:
            with mpmath.workprec(precision):
                point = mpmath.mpf(float(x0) + distance)          # x rounded
                got = _at(evaluate, point)
            with mpmath.workdps(DIGITS):
                truth = _at(f, point)
                if got is None or truth is None or truth == 0:
                    continue
                ulp = mpmath.mpf(2) ** (mpmath.floor(mpmath.log(abs(truth), 2)) + 1 - precision)
                allowance = 8 * ulp + epsilon * abs(point * mpmath.diff(f, point))
                if SAFETY * abs(got - truth) > allowance:
                    return True
    return False


def radius(f, terms, x0):
    """The least distance from x0 (a power of STEP) beyond which, on both sides, a sum of these terms, off by
    TERMS_ERROR ulps of their magnitude, is within the contract's allowance: 8 ulps of its value plus the rounding
    of x times the slope."""
    slope = mpmath.diff(f, x0)
    def enough(h):
        point = x0 + h
        value, parts = _at(f, point), [_at(term, point) for term in terms]
        if value is None or None in parts or sum(parts) == 0:
            return False
        # the terms' magnitude times the other factors of the product, which is the value over their sum
        magnitude = sum(abs(part) for part in parts) * abs(value / sum(parts))
        allowance = 8 * abs(value) + abs(point * slope)
        return TERMS_ERROR * magnitude <= allowance
    with mpmath.workdps(DIGITS):
        r = mpmath.mpf(2) ** -10
        while not (enough(r) and enough(-r)) and r < 4:
            r *= STEP
    return math.ceil(float(r) * 64) / 64   # a number a reader can take in


def of_quantity(quantity, stable_form):
    """[NearZero] of an element-wise layer's forward or vjp quantity (in x[i] or x[j], and g[j]), per unit g;
    [] where it reads another array or sums. stable_form: derive.stability.stable(quantity), the kernel's form."""
    indexed = quantity.atoms(sp.Indexed)
    if quantity.has(sp.Sum) or not {e.base.name for e in indexed} <= {"x", "g"}:
        return []
    x = sp.Symbol("x", real=True)
    unit = {e: x if e.base.name == "x" else sp.S.One for e in indexed}
    return near_zeros(quantity.xreplace(unit), stable_form.xreplace(unit), x)


@functools.lru_cache(maxsize=256)   # the derivation and the kernels ask for the same
def near_zeros(expr, form, x):
    """[NearZero] of expr, a function of x alone, where form, the form its kernel evaluates (derive.stability's),
    is a sum that vanishes while its terms do not."""
    f = mpmath_function(expr, x)
    found, parts = [], [mpmath_function(t, x) for t in sp.Add.make_args(sp.expand(expr))]
    for x0 in real_zeros(expr, x, f, parts) + even_zeros(expr, x, f, parts):
        terms = cancelling_terms(form, x, x0)
        if terms is None or not loses(form, x, f, x0):
            continue
        try:
            r = radius(f, terms, x0)
        except (ZeroDivisionError, ValueError, OverflowError, TypeError):   # no derivative there: left alone
            continue
        count = None
        while count is None:
            try:
                count = degree_needed(f, x0, r)
            except (ValueError, ZeroDivisionError):   # the series converges too slowly there (or has no terms):
                # a smaller radius, the rest as it was
                if r < 2.0 ** -10:
                    break
                r /= 2
        if count is None:
            continue
        # the degree from the series at the zero itself, whose first term is the value's size near it; the
        # polynomial about the centre the kernel subtracts, whose constant term is the value there (tiny)
        center = float(x0)
        coefficients = taylor_coefficients(f, mpmath.mpf(center), count)
        polynomial = horner([sp.Float(c, 20) for c in coefficients], H)
        found.append(NearZero(center, r, polynomial, count))
    return tuple(found)


def degree_needed(f, x0, r):
    """The count of Taylor coefficients of f at x0 after which the next ones, at h = r, are below TRUNCATED times
    the first non-zero term (the value's size near the zero): of 16, 24, 32 and 48 computed, the first count
    whose last four are that small (mpmath's derivatives cost the square of their count)."""
    for computed in (16, 24, 32, MOST_TERMS):
        coefficients = taylor_coefficients(f, x0, computed)
        first = next((k for k, c in enumerate(coefficients) if abs(c) > mpmath.mpf(10) ** (10 - DIGITS)), None)
        if first is None:
            raise ValueError(f"f vanishes to {computed} terms at {x0}")
        lead = abs(coefficients[first]) * mpmath.mpf(r) ** first
        small = [abs(c) * mpmath.mpf(r) ** k <= TRUNCATED * lead for k, c in enumerate(coefficients)]
        for count in range(first + 1, computed - 3):
            if all(small[count:]):
                return count
    raise ValueError(f"no Taylor polynomial of {MOST_TERMS} terms is accurate to radius {r}")
