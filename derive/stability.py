"""Numerically stable rewrites, each an identity (tests check every one preserves the value).

The kernels evaluate what these return; the derivations differentiate the plain forms."""
import sympy as sp
from sympy.codegen.cfunctions import log1p

from derive.functions import sigmoid
from derive.symbols import ClassMax


def split_logs(expr):
    """log(a/b) = log a - log b and log(exp u) = u: log p never forms p, which underflows."""
    return sp.expand_log(expr, force=True)


def log_of_sigmoid(expr):
    """log sigmoid(u) = -log(1 + exp(-u)) and log(1 - sigmoid(u)) = -log(1 + exp(u)): no log of 0."""
    u = sp.Wild("u")
    expr = expr.replace(sp.log(sigmoid(u)), lambda u: -sp.log(1 + sp.exp(-u)))
    return expr.replace(sp.log(1 - sigmoid(u)), lambda u: -sp.log(1 + sp.exp(u)))


def softplus(expr):
    """log(1 + exp(u)) = max(u, 0) + log1p(exp(-|u|)): the exponential never exceeds 1."""
    u = sp.Wild("u")
    return expr.replace(sp.log(1 + sp.exp(u)), lambda u: sp.Max(u, 0) + log1p(sp.exp(-sp.Abs(u))))


def shift_by_max(expr):
    """sum_k exp(x_k) = exp(M) sum_k exp(x_k - M) with M = max_k x_k: no exp overflows."""
    def shifted(total):
        (index, lower, upper), = total.limits
        exponent = total.function.args[0]
        shift = ClassMax(_indexed_base(exponent, index))
        return sp.exp(shift) * sp.Sum(sp.exp(exponent - shift), (index, lower, upper))
    return expr.replace(lambda e: isinstance(e, sp.Sum) and isinstance(e.function, sp.exp), shifted)


def _indexed_base(exponent, index):
    """The base of the one array the exponent indexes with index (the row to take the max of)."""
    bases = {e.base for e in exponent.atoms(sp.Indexed) if index in e.indices}
    if len(bases) != 1:
        raise ValueError(f"shift_by_max: cannot tell which row to take the max of in exp({exponent})")
    return bases.pop()


def logistic(expr):
    """sigmoid(u) from e = exp(-|u|) <= 1: 1/(1 + e) for u >= 0, e/(1 + e) otherwise."""
    def stable(u):
        small = sp.exp(-sp.Abs(u))
        return sp.Piecewise((1 / (1 + small), u >= 0), (small / (1 + small), True))
    u = sp.Wild("u")
    return expr.replace(sigmoid(u), stable)


REWRITES = (("split logs", split_logs), ("log of a sigmoid", log_of_sigmoid), ("softplus", softplus),
            ("shift by the row max", shift_by_max), ("split logs", split_logs), ("logistic", logistic),
            ("combine exponentials", sp.powsimp))


def stable(expr):
    """expr with every rewrite of REWRITES applied in order."""
    for _, rewrite in REWRITES:
        expr = rewrite(expr)
    return expr
