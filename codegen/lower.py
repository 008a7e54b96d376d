"""Lowering from index notation (one row, index j) to whole-array expressions over a batch.

An element x_j becomes the array x (rows on axis 0, classes on the last axis); a sum over the
class index becomes a reduction over the last axis that keeps it; x_c at the integer label
becomes the gathered column; a sum over the batch becomes a total. The results are still SymPy
expressions, so cse can share subexpressions between everything a kernel computes."""
import sympy as sp

from derive.symbols import K, N, ClassMax, c


class RowSum(sp.Function):
    """Sum over the class axis, keeping it."""


class RowMax(sp.Function):
    """Max over the class axis, keeping it."""


class AtLabel(sp.Function):
    """Each row's entry at its integer label, as a column."""


class BatchSum(sp.Function):
    """Sum of every entry."""


class Column(sp.Function):
    """A per-row vector as a column, to broadcast against rows."""


class Squeeze(sp.Function):
    """A column of per-row values as a vector."""


class LoweringError(ValueError):
    """An index expression with no whole-array form."""


def lower(expr, index, *, column=False):
    """The array expression of expr at free index index (a column of per-row values if column)."""
    if isinstance(expr, sp.Indexed):
        (at,) = expr.indices
        array = sp.Symbol(expr.base.name)
        if at == index:
            return Column(array) if column else array
        if at == c:
            return AtLabel(array)
        raise LoweringError(f"cannot lower {expr}: its index {at} is neither {index} nor the label {c}")
    if isinstance(expr, sp.Sum):
        (bound, lower_limit, upper), = expr.limits
        if lower_limit != 0 or upper not in (K - 1, N - 1):
            raise LoweringError(f"cannot lower {expr}: only sums over a whole row or batch lower")
        reduce = RowSum if upper == K - 1 else BatchSum
        return reduce(lower(expr.function, bound))
    if isinstance(expr, ClassMax):
        return RowMax(sp.Symbol(expr.args[0].name))
    if isinstance(expr, sp.KroneckerDelta):
        raise LoweringError(f"cannot lower {expr}: split it off with split_at_label first")
    if not expr.args:
        return expr
    return expr.func(*[lower(arg, index, column=column) for arg in expr.args])


def split_at_label(expr, index):
    """(dense, at_label) with expr = dense + at_label * delta(index, c), at_label taken at index = c."""
    expanded = sp.expand(expr)
    delta = sp.KroneckerDelta(index, c)
    at_label = expanded.coeff(delta)
    dense = sp.expand(expanded - at_label * delta)
    if dense.has(sp.KroneckerDelta) or at_label.has(sp.KroneckerDelta):
        raise LoweringError(f"cannot split {expr} into a dense part and one at the label")
    return dense, at_label.subs(index, c)
