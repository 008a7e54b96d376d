"""Derivations of any catalog entry: a layer's vector-Jacobian product, a loss's gradient."""
import sympy as sp

from derive.algebra import contract, in_terms_of, tidy
from derive.symbols import c, dy, i, j, t, x

TARGETS = ("labels", "probs")


def with_target(expr, target):
    """expr for integer labels (t_k = delta(k, c)) or for probability rows (t_k as it is)."""
    if target == "probs":
        return expr
    if target != "labels":
        raise ValueError(f"unknown target kind {target!r}; expected one of {TARGETS}")
    at = sp.Wild("at")
    return contract(expr.replace(t[at], lambda at: sp.KroneckerDelta(at, c)))


def saved_form(expr, op):
    """expr written with the quantities the op's forward saves, in place of their definitions."""
    for base, definition in op.saved:
        expr = in_terms_of(expr, base, definition, i)
    return expr


def layer_backward(op):
    """dx_j = sum_i g_i dy_i/dx_j, contracted and written with the saved output."""
    vjp = contract(sp.Sum(dy[i] * sp.diff(op.forward, x[j]), op.index_range(i)))
    leading = op.saved[0][0][j]
    return tidy(saved_form(vjp, op), leading)


def loss_forward(op, target):
    """The per-sample loss for the target kind."""
    return with_target(op.forward, target)


def loss_gradient(op, target):
    """dL/dx_j for the target kind, written with the saved quantities."""
    return saved_form(contract(sp.diff(loss_forward(op, target), x[j])), op)
