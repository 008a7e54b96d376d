"""Softmax and cross-entropy in index notation over a general class count K (seeds 000-004)."""
import sympy as sp

from derive.algebra import contract, in_terms_of, tidy
from derive.symbols import K, c, i, j, k, m, over_classes, p, t, x


def softmax(index=i):
    """p_index = exp(x_index) / sum_m exp(x_m)."""
    return sp.exp(x[index]) / over_classes(sp.exp(x[m]), m)


def softmax_jacobian():
    """dp_i/dx_j = p_i (delta_ij - p_j)."""
    raw = contract(sp.diff(softmax(i), x[j]))
    return tidy(in_terms_of(raw, p, softmax(i), i), p[i])


def softmax_jacobian_cases():
    """The two cases of the Jacobian that the seeds write out: i = j and i != j."""
    jacobian = softmax_jacobian()
    return {"i = j": tidy(jacobian.subs(j, i), p[i]),
            "i != j": jacobian.subs(sp.KroneckerDelta(i, j), 0)}


def cross_entropy(target=t[k]):
    """L = -sum_k t_k log p_k, with p = softmax(x) written out; target is t_k's expression."""
    return -over_classes(target * sp.log(softmax(k)), k)


def sparse_target(index=k):
    """The one-hot row of integer label c: t_index = delta(index, c)."""
    return sp.KroneckerDelta(index, c)


def cross_entropy_gradient(target=t[k]):
    """dL/dx_j in terms of p: p_j sum_k t_k - t_j for a general target row."""
    return in_terms_of(contract(sp.diff(cross_entropy(target), x[j])), p, softmax(i), i)


def target_sum_is_one(expr):
    """Substitute sum_k t_k = 1, which holds for one-hot and probability rows."""
    return expr.subs(over_classes(t[k], k), 1)
