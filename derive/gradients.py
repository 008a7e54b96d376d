"""Derivations of any catalog entry: a layer's vector-Jacobian product, a loss's gradient, and the
variants a kernel is generated for (options at their neutral values, or in general)."""
import itertools

import sympy as sp

from derive.algebra import at_kinks, contract, differentiated, in_terms_of, tidy
from derive.functions import as_sigmoid
from derive.symbols import c, dy, g, i, j, t, x

TARGETS = ("labels", "dense")


def neutralize(expr, values):
    """expr with each symbol, or every entry of each IndexedBase, replaced by its value in values."""
    for symbol, value in values.items():
        if isinstance(symbol, sp.IndexedBase):
            expr = expr.replace(lambda e, s=symbol: isinstance(e, sp.Indexed) and e.base == s, lambda e, v=value: v)
        else:
            expr = expr.subs(symbol, value)
    return sp.sympify(expr)  # a lone w[c] neutralized is the Python 1


def variants(op, target):
    """{variant: substitutions}: "plain" with every option neutral, "general" with options as given; for each
    setting of the op's flags but the defaults, the same with the flags fixed so ("plain_log_target"), as
    flag_settings names them."""
    fixed = {param.symbol: param.neutral for param in op.params if param.kind == "ignore_index"
             and target != "labels"}
    plain = {param.symbol: param.neutral for param in op.params if param.neutral is not None}
    found = {}
    for suffix, setting in flag_settings(op).items():
        flags = {sp.Symbol(name): sp.true if value else sp.false for name, value in setting.items()}
        at = f"_{suffix}" if suffix else ""
        found[f"plain{at}"] = {**plain, **flags}
        if plain != fixed:
            found[f"general{at}"] = {**fixed, **flags}
    return found


def flag_settings(op):
    """{suffix: {flag: bool}}: every setting of the op's flags (Params of kind flag), the defaults first under
    "", each other under the flags it changes ("log_target", "not_<flag>" for one whose default is True)."""
    flags = [p for p in op.params if p.kind == "flag"]
    settings = {}
    for values in sorted(itertools.product((False, True), repeat=len(flags)),
                         key=lambda v: v != tuple(p.default for p in flags)):
        settings["_".join(p.name if v else f"not_{p.name}" for p, v in zip(flags, values) if v != p.default)] = {
            p.name: v for p, v in zip(flags, values)}
    return settings


def with_target(expr, target):
    """expr for integer labels (t_k = delta(k, c)) or for a dense target (t as it is)."""
    if target == "dense":
        return expr
    if target != "labels":
        raise ValueError(f"unknown target kind {target!r}; expected one of {TARGETS}")
    at = sp.Wild("at")
    return contract(expr.replace(t[at], lambda at: sp.KroneckerDelta(at, c)))


def derivative(expr, wrt):
    """d expr / d wrt with kinks by convention, deltas contracted and sigmoids named."""
    # 1/(1 + e^-u) named sigmoid(u) first: its derivative is then sigmoid (1 - sigmoid), which logistic
    # evaluates at any u, where the quotient rule's e^-u/(1 + e^-u)^2 is inf/inf from u = -89 in float32
    return as_sigmoid(contract(at_kinks(differentiated(as_sigmoid(expr), wrt))))


def saved_form(expr, op):
    """expr written with the quantities the op's forward saves, in place of their definitions."""
    for base, definition in op.saved:
        expr = in_terms_of(expr, base, definition, i)
    return expr


def layer_backward(op, values=None):
    """dx_j = sum_i g_i dy_i/dx_j, contracted and written with what the forward saved."""
    forward = neutralize(op.forward, values or {})
    vjp = saved_form(derivative(sp.Sum(dy[i] * forward, op.index_range(i)), x[j]), op)
    # a vector op reads best with its saved output in front, y_j (g_j - sum_i g_i y_i), an
    # element-wise one with the upstream gradient in front, g_j y_j (1 - y_j)
    return tidy(vjp, op.saved[0][0][j] if op.saved and op.forward.has(sp.Sum) else dy[j])


def loss_forward(op, target, values=None):
    """The loss of a row (or of element i) for the target kind and option values."""
    return with_target(neutralize(op.forward, values or {}), target)


def loss_gradient(op, target, values=None):
    """dL/dx_j times the upstream weight: g for a per-row loss, g_i summed over elements otherwise."""
    loss = loss_forward(op, target, values)
    objective = g * loss if op.granularity == "row" else sp.Sum(dy[i] * loss, op.index_range(i))
    return saved_form(derivative(objective, x[j]), op)


def mean_weight(op, target, values=None):
    """Each loss entry's weight in the mean (1 but for PyTorch's class-weighted mean)."""
    return with_target(neutralize(op.mean_weight.get(target, sp.Integer(1)), values or {}), target)
