"""Lowering from index notation (one row, index j) to whole-array expressions over a batch.

An element x_j becomes the array x (rows on axis 0, classes on the last axis); a sum over the
class index becomes a reduction over the last axis that keeps it; x_c at the integer label
becomes the gathered column; a sum over the batch becomes a total. (An operation over more axes is
codegen.tensor_lower's.) The results are still SymPy expressions, so cse can share subexpressions
between everything a kernel computes."""
import sympy as sp

from derive.stability import ClassArgmax
from derive.symbols import ClassMax, c, pw, w

# Arrays of one entry per class (shape (K,)): at the label they are indexed, not gathered by row.
CLASS_VECTORS = (w, pw)


class RowSum(sp.Function):
    """Sum over the class axis, keeping it."""


class RowMax(sp.Function):
    """Max over the class axis, keeping it (the fused kernels' form of a max read at the argmax)."""


class RowArgmax(sp.Function):
    """Each row's index of its max (the first of ties), as a column of flat positions (C order) in its
    argument's shape: what AtIndex reads and RowSumBut skips."""


class AtIndex(sp.Function):
    """Each row's entry of the first argument at the second (a RowArgmax), as a column: a row's max is read at
    its argmax, where np.argmax and a take cost one pass, cheaper than np.maximum.reduce's."""


class RowSumBut(sp.Function):
    """Sum over the class axis of the first argument but its entry at the second (a RowArgmax), keeping the
    axis: derive.stability's shifted sum 1 + T, T summed without the max's 1. That entry is exp(0) = 1 wherever
    the max is finite: NumPy's _special.row_sum_but sums it less one (0 exactly), the fused kernels by ties
    (fused.sum_but_by_ties), and either keeps a NaN there (an infinite max) in the sum."""


class AtLabel(sp.Function):
    """Each row's entry at its integer label, as a column."""


class LabelEntry(sp.Function):
    """A per-class vector's entry at each row's label, as a column."""


class BatchSum(sp.Function):
    """Sum of every entry."""


class Column(sp.Function):
    """A per-row vector as a column, to broadcast against rows."""


class Squeeze(sp.Function):
    """A column of per-row values as a vector."""


class Shifted(sp.Function):
    """a - m, m the row max of a: one value wherever the shift is read (exp(a - m) and a log-softmax's
    (a - m) - log(sum)), so a - m is rounded once and never a - (m + log(sum)), whose sum loses the
    log's low bits when m is large (float32 log-softmax at [0, 1e4, 1e4]: -0.69336, not -0.693147)."""


def grouped_shifts(add):
    """An Add whose terms hold a (or its entry at the label) and -max(a) (its row max, read at the argmax) with
    a - max(a) as one Shifted term; likewise r a and -r max(a) for a positive rational r (the halves of
    derive.stability.shift_in_halves), as Shifted(r a, r max(a))."""
    for term in add.args:
        if (isinstance(term, sp.Mul) and term.args[0].is_Rational and term.args[0] < 0
                and isinstance(term.args[1], AtIndex) and len(term.args) == 2):
            array, scale = term.args[1].args[0], -term.args[0]
            for entry in (array, AtLabel(array)):   # the row, or its entry at the label: x_c - max, exact at c = a
                if scale * entry in add.args:
                    rest = [t for t in add.args if t is not term and t != scale * entry]
                    return sp.Add(Shifted(scale * entry, -term), *rest)
    return add


class FullLike(sp.Function):
    """An array of the first argument's shape and dtype holding the second (a number, or an array
    that broadcasts): a result that reads no full-size array as a value, as the constant gradient of
    2x or a branch between numbers, still has x's shape and dtype."""


def reads_value(expr, names):
    """Whether expr's value reads one of the arrays names outside a condition (a Piecewise's
    condition gives a mask, not the dtype), so that an array of theirs carries its shape and dtype."""
    if isinstance(expr, sp.Symbol):
        return expr.name in names
    if isinstance(expr, sp.Piecewise):
        return any(reads_value(value, names) for value, _ in expr.args)
    if isinstance(expr, sp.logic.boolalg.Boolean):
        return False
    return any(reads_value(arg, names) for arg in expr.args)


def shaped_like(expr, like, names):
    """expr as an array of like's shape and dtype: expr itself where it reads one of names as a value
    and is not one of them (a result must be an array of its own, never an argument)."""
    if isinstance(expr, sp.Symbol) and expr.name in names or not reads_value(expr, names):
        return FullLike(like, expr)
    return expr


def argmax_of(base):
    """The column of each row's argmax of the array base (an IndexedBase)."""
    return RowArgmax(sp.Symbol(base.name))


def but_at(summand, index):
    """(rest, array) of a summand rest (1 - delta(index, ClassArgmax(array))): a row sum's term but at the row's
    argmax; else None."""
    for factor in sp.Mul.make_args(summand):
        deltas = factor.atoms(sp.KroneckerDelta)
        if len(deltas) == 1 and factor == 1 - next(iter(deltas)):
            (delta,) = deltas
            at = [a for a in delta.args if isinstance(a, ClassArgmax)]
            if at and index in delta.args:
                return summand / factor, at[0].args[0]
    return None


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
            return LabelEntry(array) if expr.base in CLASS_VECTORS else AtLabel(array)
        raise LoweringError(f"cannot lower {expr}: its index {at} is neither {index} nor the label {c}")
    if isinstance(expr, sp.Sum):
        bound, lower_limit, upper = expr.limits[-1]
        inner = sp.Sum(expr.function, *expr.limits[:-1]) if len(expr.limits) > 1 else expr.function
        if lower_limit != 0:
            raise LoweringError(f"cannot lower {expr}: only sums over a whole row or batch lower")
        skipped = but_at(inner, bound)
        if skipped is not None:
            rest, array = skipped
            return RowSumBut(lower(rest, bound), argmax_of(array))
        reduce = BatchSum if str(upper) == "N - 1" else RowSum
        return reduce(lower(inner, bound))
    if isinstance(expr, ClassMax):
        return AtIndex(sp.Symbol(expr.args[0].name), argmax_of(expr.args[0]))
    if isinstance(expr, ClassArgmax):
        return argmax_of(expr.args[0])
    if isinstance(expr, sp.KroneckerDelta):
        raise LoweringError(f"cannot lower {expr}: split it off with split_at_label first")
    if not expr.args:
        return expr
    lowered = expr.func(*[lower(arg, index, column=column) for arg in expr.args])
    if isinstance(expr, sp.Piecewise) and not any(value.atoms(sp.Indexed) for value, _ in expr.args):
        # a choice between numbers by a condition on arrays: np.where would give float64 numbers
        (array, *_), = [sorted(cond.atoms(sp.Indexed), key=str) for _, cond in expr.args[:1]]
        return FullLike(sp.Symbol(array.base.name), lowered)
    return grouped_shifts(lowered) if isinstance(lowered, sp.Add) else into_branches(lowered)


def into_branches(expr):
    """a * Piecewise((u, c), (v, True)) as Piecewise((a u, c), (a v, True)): np.where then picks
    arrays of the input's dtype rather than bare constants (which would be float64)."""
    if not isinstance(expr, sp.Mul):
        return expr
    pieces = [f for f in expr.args if isinstance(f, sp.Piecewise)]
    if len(pieces) != 1:
        return expr
    scale = sp.Mul(*[f for f in expr.args if f is not pieces[0]])
    return sp.Piecewise(*[(scale * value, cond) for value, cond in pieces[0].args])


def split_at_label(expr, index):
    """(dense, at_label) with expr = dense + at_label * delta(index, c), at_label taken at index = c."""
    expanded = sp.expand(expr)
    delta = sp.KroneckerDelta(index, c)
    at_label = expanded.coeff(delta)
    dense = sp.expand(expanded - at_label * delta)
    if dense.has(sp.KroneckerDelta) or at_label.has(sp.KroneckerDelta):
        raise LoweringError(f"cannot split {expr} into a dense part and one at the label")
    return sp.factor_terms(dense), sp.factor_terms(at_label.subs(index, c))
