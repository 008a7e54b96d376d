"""The same quantities with explicit symbols x_0..x_{K-1}, to check general-K results against."""
import sympy as sp

from derive.derivation_check import first_argmax
from derive.stability import ClassArgmax
from derive.symbols import ClassMax, K


def explicit_symbols(name, size):
    return sp.symbols(f"{name}_0:{size}", real=True)


def softmax_row(xs):
    """[p_0, ..., p_{K-1}] written out with the explicit symbols xs."""
    total = sum(sp.exp(v) for v in xs)
    return [sp.exp(v) / total for v in xs]


def at_explicit_size(expr, size, arrays, extra=None):
    """expr at K = size with sums expanded and every x[a] replaced by arrays['x'][a]. K and extra's symbols
    are replaced structurally (xreplace): subs compared every Piecewise condition with every other, and
    took a minute of make test on GELU's erf series."""
    expr = expr.xreplace({K: size, **(extra or {})}).doit()
    return expr.replace(lambda e: isinstance(e, sp.Indexed) and e.base.name in arrays,
                        lambda e: arrays[e.base.name][int(e.indices[0])])


def is_zero(expr, xs):
    """Whether expr vanishes identically: exponentials become positive symbols, then rational cancel."""
    bases = {sp.exp(v): sp.Symbol(f"e_{v}", positive=True) for v in xs}
    return sp.cancel(sp.expand(sp.powsimp(expr)).subs(bases)) == 0


def max_of(values):
    """ClassMax of the explicit row, for substituting into stable forms."""
    return lambda expr: expr.replace(lambda e: isinstance(e, ClassMax), lambda e: sp.Max(*values))


def argmax_of(values):
    """ClassArgmax of a row whose numbers are values (the index of its first max), for substituting into stable
    forms before their sums are written out at explicit symbols."""
    return lambda expr: expr.replace(lambda e: isinstance(e, ClassArgmax), lambda e: first_argmax(values))


def at_point(expr, size, arrays, scalars=None):
    """expr at K = size with every array entry and scalar replaced by the given numbers, to 50 digits;
    ClassMax becomes the max of its row, sigmoid its definition."""
    from derive.functions import sigmoid
    expr = expr.replace(lambda e: isinstance(e, ClassArgmax), lambda e: first_argmax(arrays[e.args[0].name]))
    expr = at_explicit_size(expr, size, arrays, scalars)
    expr = expr.replace(lambda e: isinstance(e, ClassMax), lambda e: sp.Max(*arrays[e.args[0].name]))
    expr = expr.replace(sigmoid, lambda u: 1 / (1 + sp.exp(-u)))
    return sp.N(expr, 50)
