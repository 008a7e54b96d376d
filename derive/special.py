"""erf with NumPy alone: NumPy has no erf, so the kernels evaluate a series and a continued fraction
that SymPy writes out (accurate to a few ulp in float64; the tests measure it against math.erf)."""
import sympy as sp

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
