"""The four backpropagation equations (seed 001), in index notation.

A layer computes z_j = sum_k a_k W_kj + b_j and a'_j = sigma(z_j); C is the cost, dC/da^L is
written dCda, delta_j = dC/dz_j. The batch index n appears where a sum over the batch does."""
import sympy as sp

from derive.algebra import contract
from derive.symbols import N, W, b, j, k, m, n, r

sigma = sp.Function("sigma")
a, z, dCda, delta = (sp.IndexedBase(name) for name in ("a", "z", "dCda", "delta"))
q = sp.Symbol("q", integer=True)
# k runs over a layer's inputs, j over its outputs
K_in, K_out = sp.symbols("K_in K_out", integer=True, positive=True)
SIZES = {k: K_in, q: K_in, j: K_out, m: K_out, r: K_out, n: N}


def over(expr, index):
    """sum over the whole range of index."""
    return sp.Sum(expr, (index, 0, SIZES[index] - 1))


def pre_activation(index=j, inputs=lambda at: a[at]):
    """z_index = sum_k a_k W_k,index + b_index, with a_k given by inputs(k)."""
    return over(inputs(k) * W[k, index], k) + b[index]


def bp1():
    """delta^L_j = sum_i dC/da_i da_i/dz_j = dC/da_j sigma'(z_j)."""
    return contract(over(dCda[m] * sp.diff(sigma(z[m]), z[j]), m))


def bp2():
    """delta^l_k = sum_j delta^{l+1}_j dz^{l+1}_j/dz^l_k, with a^l = sigma(z^l)."""
    next_z = pre_activation(j, lambda at: sigma(z[at]))
    return contract(over(delta[j] * sp.diff(next_z, z[q]), j)).subs(q, k)


def bp3():
    """dC/db_j = sum_i delta_i dz_i/db_j = delta_j."""
    return contract(over(delta[m] * sp.diff(pre_activation(m), b[j]), m))


def bp4():
    """dC/dW_kj = sum_i delta_i dz_i/dW_kj = a_k delta_j."""
    return contract(over(delta[m] * sp.diff(pre_activation(m), W[q, r]), m)).subs({q: k, r: j})
