"""The one printer: SymPy's NumPyPrinter with the array operations of codegen.lower added."""
from sympy import Expr, Heaviside, Max, Min, Mul, Symbol, default_sort_key as sp_key, oo
from sympy.printing.numpy import NumPyPrinter
from sympy.printing.precedence import PRECEDENCE, precedence

from derive.special import Clip


def one_bound_clip(expr):
    """(u, low, high) for Max(u, number) = clip(u, number, inf) and Min(u, number) = clip(u, -inf,
    number), else None. Against a number, max and min print as these clips: np.maximum(u, 0) has no
    SIMD loop for a number (1.6x slower than clip at (8192, 1000), 3x at (1024, 100))."""
    numbers = [a for a in expr.args if a.is_number]
    if not isinstance(expr, (Max, Min)) or len(expr.args) != 2 or len(numbers) != 1:
        return None
    (u,) = [a for a in expr.args if not a.is_number]
    return (u, numbers[0], oo) if isinstance(expr, Max) else (u, -oo, numbers[0])


def positive_first(terms):
    """terms in their order but for a positive one moved first, when the first is negative and there is
    one: on arrays -a + b is a negation and an addition, b - a one subtraction."""
    terms = list(terms)
    positive = next((t for t in terms if not t.could_extract_minus_sign()), None)
    if positive is not None and terms[0].could_extract_minus_sign():
        terms.remove(positive)
        terms.insert(0, positive)
    return terms


class KernelPrinter(NumPyPrinter):
    """Prints as np.<name>, comparisons as operators, and knows the row/batch reductions."""

    def __init__(self):
        super().__init__({"fully_qualified_modules": True, "allow_unknown_functions": False})

    def _print(self, expr, **kwargs):
        # a constant such as sqrt(2) prints as a Python float: np.sqrt(2) is a float64 scalar that
        # would turn float32 arrays into float64, a Python float keeps their dtype
        if isinstance(expr, Expr) and expr.is_number and expr.is_real and not expr.is_Rational:
            return repr(float(expr))
        return super()._print(expr, **kwargs)

    def _module_format(self, fqn, register=True):
        return "np." + fqn[len("numpy."):] if fqn.startswith("numpy.") else super()._module_format(fqn, register)

    def _as_ordered_terms(self, expr, order=None):
        return positive_first(super()._as_ordered_terms(expr, order=order))

    def _print_Pow(self, expr, rational=False):
        # integer powers print as a reader writes them: 1/N, y**2 (a Python int keeps the dtype)
        base = self.parenthesize(expr.base, precedence(expr), strict=False)
        if expr.exp == -1:
            return f"1/{base}"
        if expr.exp.is_Integer and expr.exp > 0:
            return f"{base}**{expr.exp}"
        return super()._print_Pow(expr, rational)

    def _print_Relational(self, expr):
        left, right = (self.parenthesize(arg, precedence(expr)) for arg in expr.args)
        return f"{left} {expr.rel_op} {right}"

    def _print_Piecewise(self, expr):
        # np.where evaluates both branches; the rewrites of derive.stability keep both finite
        (value, condition), *rest = expr.args
        if not rest:
            return self._print(value)
        otherwise = self._print(type(expr)(*rest)) if len(rest) > 1 or rest[0][1] is not True else self._print(rest[0][0])
        return f"np.where({self._print(condition)}, {self._print(value)}, {otherwise})"

    def _print_Max(self, expr):
        clip = one_bound_clip(expr)
        return self._print(Clip(*clip, evaluate=False)) if clip else self._fold("np.maximum", expr.args)

    def _print_Min(self, expr):
        clip = one_bound_clip(expr)
        return self._print(Clip(*clip, evaluate=False)) if clip else self._fold("np.minimum", expr.args)

    # pairwise: np.logical_or.reduce((a, b, c)) makes one array of its arguments, which fails where one is
    # a number (a condition on options alone) and the others arrays
    def _print_Or(self, expr):
        return self._fold("np.logical_or", sorted(expr.args, key=sp_key))

    def _print_And(self, expr):
        return self._fold("np.logical_and", sorted(expr.args, key=sp_key))

    def _fold(self, function, args):
        first, *rest = args
        text = self._print(first)
        for arg in rest:
            text = f"{function}({text}, {self._print(arg)})"
        return text

    def _print_Clip(self, expr):
        # the method: np.clip's dispatch costs a microsecond a call; an infinite bound keeps clip's
        # SIMD loop (None would call np.maximum against a number)
        u, lo, hi = expr.args
        return f"{self.parenthesize(u, PRECEDENCE['Func'], strict=True)}.clip({self._print(lo)}, {self._print(hi)})"

    def _print_Heaviside(self, expr):
        # the step of derive.algebra.at_kinks: 1 for u > 0, 0 for u <= 0, NaN for NaN (np.clip
        # propagates it); np.heaviside and np.sign say the same but have no SIMD loop (ten times slower),
        # nor do np.maximum and np.minimum against a number (three times slower than clip's); the
        # method clip skips np.clip's dispatch, a microsecond a call
        u, at_zero = expr.args
        if at_zero == 1:  # derive.stability.steps_as_branches's complement: 1 - H(-u)
            return f"(1 - {self._print(Heaviside(-u, 0))})"
        if at_zero != 0:
            raise ValueError(f"only Heaviside(u, 0) and (u, 1) print, got {expr}")
        return f"np.ceil({self.parenthesize(u, PRECEDENCE['Func'], strict=True)}.clip(0, 1))"

    def _print_erf(self, expr):
        # _special's erf, printed from derive.special.erf_numpy once (NumPy has no erf): inlined,
        # its series and continued fraction would be copied into every kernel, nested in erf(erf(x))
        return f"erf({self._print(expr.args[0])})"

    def _print_erfc(self, expr):
        # _special's erfc, printed from derive.special.erfc_numpy once, as erf
        return f"erfc({self._print(expr.args[0])})"

    _print_Erfc = _print_erfc

    def _print_ExpToInf(self, expr):
        return f"np.exp({self._print(expr.args[0])})"

    def _print_Expm1(self, expr):
        return f"np.expm1({self._print(expr.args[0])})"

    def _print_Abs(self, expr):
        return f"np.abs({self._print(expr.args[0])})"

    # a row sum is einsum's: it reads rows two to three times faster than np.add.reduce from 100
    # classes on, and a row dot product needs no product array
    def _print_RowSum(self, expr):
        return f'np.einsum("...k->...", {self._print(expr.args[0])})[..., None]'

    def _print_RowDot(self, expr):
        left, right = (self._print(a) for a in expr.args)
        return f'np.einsum("...k,...k->...", {left}, {right})[..., None]'

    def _print_Dot(self, expr):
        return f"np.vdot({', '.join(self._print(a) for a in expr.args)})"

    # other reductions call the ufunc's reduce: np.sum and np.max add a Python wrapper that costs
    # microseconds a call, most of a small batch's time

    def _print_RowMax(self, expr):
        return f"np.maximum.reduce({self._print(expr.args[0])}, axis=-1, keepdims=True)"

    def _print_RowArgmax(self, expr):
        # _special's argmax_positions: np.argmax's column (1.0 ms at (8192, 1000) float32, where
        # np.maximum.reduce takes 1.1; at (1024, 100) 28 us to 58) as flat positions, which take reads
        return f"argmax_positions({self._print(expr.args[0])})"

    def _print_AtIndex(self, expr):
        return f"{self.parenthesize(expr.args[0], PRECEDENCE['Func'], strict=True)}.take({self._print(expr.args[1])})"

    def _print_RowSumBut(self, expr):
        # _special's row_sum_but: the entry (1) less one for einsum's sum and put back, as fast as the plain sum
        # (a mask by np.where or add.reduce's where= took 1.3 to 1.7 times as long)
        summand, at = expr.args
        factors = Mul.make_args(summand)
        if len(factors) == 2 and all(isinstance(f, Symbol) for f in factors):
            # a row dot product but one entry (a softmax layer's, derive.softmax.vjp_at_argmax): no product array;
            # the saved array is read through a copy with 0 at the entry, the caller's g as it is: neither is written
            by, e = sorted(factors, key=lambda f: f.name != "g")
            return f"row_sum_but({self._print(e)}, {self._print(at)}, {self._print(by)})"
        return f"row_sum_but({self._print(summand)}, {self._print(at)})"

    def _print_AtLabel(self, expr):
        # at: each row's flat position of its label, which take reads in any memory layout, and
        # faster than indexing by (row, label) pairs
        return f"{self.parenthesize(expr.args[0], PRECEDENCE['Func'], strict=True)}.take(at)"

    def _print_LabelEntry(self, expr):
        return f"{self._print(expr.args[0])}[c]"

    def _print_BatchSum(self, expr):
        return f"np.add.reduce({self._print(expr.args[0])}, axis=None)"

    def _print_Column(self, expr):
        return f"{self._print(expr.args[0])}[:, None]"

    def _print_Squeeze(self, expr):
        return f"{self.parenthesize(expr.args[0], PRECEDENCE['Func'], strict=True)}[..., 0]"

    def _print_Shifted(self, expr):
        return f"({self._print(expr.args[0])} - {self._print(expr.args[1])})"

    def _print_FullLike(self, expr):
        like, value = expr.args
        return f"{self._print(like)}.copy()" if like == value else f"np.full_like({self._print(like)}, {self._print(value)})"


def print_code(expr):
    """expr as NumPy source."""
    return KernelPrinter().doprint(expr)


def range_arguments(bounds):
    """A derive.ops.Range as _checks.option's keyword arguments: those that differ from the default (any finite
    number)."""
    return [f"{field}={print_code(value) if field in ('low', 'high') else value}"
            for field, value in bounds._asdict().items() if value != type(bounds)._field_defaults[field]]
