"""The four backpropagation equations (seed 001) and the linear layer's gradients, in index notation.

A layer computes z_j = sum_k a_k W_kj + b_j and a'_j = sigma(z_j); C is the cost, dC/da^L is
written dCda, delta_j = dC/dz_j. The batch index n appears where a sum over the batch does."""
import sympy as sp

from derive.algebra import contract
from derive.symbols import N, W, X, b, dy, j, k, l2, m, n, r

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


def linear(row=n, col=j):
    """y_nj = sum_k x_nk W_kj + b_j over a batch."""
    return over(X[row, k] * W[k, col], k) + b[col]


def linear_backward():
    """{x, W, b: gradient} of sum_nj g_nj y_nj: BP2 before the activation, BP4 and BP3 summed over the batch."""
    upstream = over(over(dy[n, j] * linear(n, j), j), n)
    return {"x": contract(sp.diff(upstream, X[r, q])).subs({r: n, q: k}),
            "W": contract(sp.diff(upstream, W[q, r])).subs({q: k, r: j}),
            "b": contract(sp.diff(upstream, b[q])).subs(q, j)}


def l2_penalty():
    """l2 sum_kj W_kj^2 (seed 002's regularization)."""
    return l2 * over(over(W[k, j] ** 2, j), k)


def l2_gradient():
    """d(l2 sum W^2)/dW_kj = 2 l2 W_kj."""
    return contract(sp.diff(l2_penalty(), W[q, r])).subs({q: k, r: j})


def init_bound(gain_slope=sp.sqrt(5)):
    """PyTorch's Linear init bound: kaiming_uniform with a = sqrt(5), gain sqrt(2/(1 + a^2)) times
    sqrt(3/fan_in), which simplifies to 1/sqrt(fan_in)."""
    return sp.simplify(sp.sqrt(2 / (1 + gain_slope ** 2)) * sp.sqrt(3 / K_in))
