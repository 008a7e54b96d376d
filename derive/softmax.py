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


def sums_split_at(expr, at, argmax):
    """expr with each row sum sum_i f_i written f_at + sum_i (1 - delta(i, argmax)) f_i, at the index that stands for
    the row's argmax (a kernel reads it at the argmax's positions): the term at the argmax apart, so that a value at
    the argmax can read the others' share alone, and the whole sum is that share plus one term."""
    return sums_split(expr, at, lambda index, f: (1 - sp.KroneckerDelta(index, argmax)) * f)


def sums_split(expr, at, others):
    """expr with each row sum sum_i f_i written f_at + sum_i others(i, f_i), others(i, f_i) f_i at every i but at (0
    there): the term at at apart."""
    def split(total):
        (index, low, high), = total.limits
        return total.function.xreplace({index: at}) + sp.Sum(others(index, total.function), (index, low, high))
    return expr.replace(lambda e: isinstance(e, sp.Sum), split)


def vjp_at_argmax(vjp, saved, one_less, at, argmax):
    """A softmax layer's vector-Jacobian product y_j (g_j - sum_i g_i y_i) at j = the row's argmax a, without the
    cancellation of g_a - sum_i g_i y_i where y_a is near 1: with sum_i y_i = 1 it is
    y_a (g_a (1 - y_a) - sum_{i != a} g_i y_i), 1 - y_a then written one_less: T/(1 + T), y_a = e_a/(1 + T) with
    e_a = exp(0) = 1 and T the others' share that forward's shifted sum 1 + T keeps (derive.stability), or
    sum_{i != a} y_i (sum_i y_i = 1 again), where T is not kept. saved is the layer's saved output (y), at the index
    read at the argmax, argmax the ClassArgmax the others' sums skip."""
    return vjp_apart(vjp, saved, one_less, at, lambda index, f: (1 - sp.KroneckerDelta(index, argmax)) * f)


def vjp_apart(vjp, saved, one_less, at, others):
    """vjp_at_argmax's form at the entry at, the others summed by others (sums_split): y_at (g_at one_less -
    sum_i others(i, g_i y_i)), one_less standing for 1 - y_at, the others' share."""
    entry = sums_split(vjp, at, others).xreplace({j: at})
    inner = entry / saved[at]   # g_a - g_a y_a - sum_{i != a} g_i y_i
    upstream = [e for e in inner.atoms(sp.Indexed) if e.indices == (at,) and e.base != saved]
    return saved[at] * sp.collect(inner, upstream).xreplace({1 - saved[at]: one_less})


def others_share(saved, argmax):
    """sum_{i != a} y_i, a the row's argmax: 1 - y_a, as sum_i y_i = 1, without rounding y_a near 1 away."""
    return sp.Sum((1 - sp.KroneckerDelta(i, argmax)) * saved[i], (i, 0, K - 1))


def above_half(saved, index):
    """Whether saved's entry at index is above 1/2: at most one entry of a row is (they sum to 1, none negative), and
    then it is the row's argmax; the others are at most 1/2, where y (g - sum_i g_i y_i) does not cancel."""
    return saved[index] > sp.S.Half


def below_half(saved):
    """others for sums_split: f_i at the entries at most 1/2, 0 at the one above (above_half)."""
    return lambda index, f: sp.Piecewise((0, above_half(saved, index)), (f, True))


def vjp_above_half(vjp, saved):
    """A softmax layer's vector-Jacobian product at an entry j above 1/2 (above_half: the row's argmax, the others at
    most 1/2), with no argmax: vjp_at_argmax's form y_j (g_j S - sum_{y_i <= 1/2} g_i y_i), its others the entries at
    most 1/2 and S = sum_{y_i <= 1/2} y_i their share, 1 - y_j (sum_i y_i = 1). Fused loops find both sums by a
    select in the pass that sums g_i y_i, where an argmax takes a pass of its own and a max one more."""
    others = below_half(saved)
    return vjp_apart(vjp, saved, sp.Sum(others(i, saved[i]), (i, 0, K - 1)), j, others)
