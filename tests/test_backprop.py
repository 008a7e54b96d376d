"""The four backpropagation equations against explicit expansion, and the catalog's Linear against them."""
import numpy as np
import pytest
import sympy as sp

from derive import backprop, tensor
from derive.backprop import K_in, K_out, a, b, dCda, delta, sigma, z
from derive.catalog import CATALOG
from derive.symbols import N, W, X, dy, j, k, n

SIZES = [(2, 3), (3, 2), (1, 4)]


def entries(base, *shape):
    """{index: explicit symbol} and {base[index]: symbol} for an array of the given shape."""
    names = {index: sp.Symbol(f"{base.name}_{'_'.join(map(str, index))}") for index in np.ndindex(*shape)}
    return names, {sp.Indexed(base, *index): s for index, s in names.items()}


def explicit(expr, sizes, table):
    """expr at explicit sizes, sums expanded, every array entry replaced by its explicit symbol."""
    return expr.subs(sizes).doit().xreplace(table)


def random_point(symbols, rng):
    return {s: sp.Float(v, 40) for s, v in zip(symbols, rng.normal(size=len(symbols)))}


@pytest.mark.parametrize("inputs, outputs", SIZES)
def test_bp1_delta_is_dc_da_times_sigma_prime(inputs, outputs):
    zs, z_table = entries(z, outputs)
    activations = sp.symbols(f"a0:{outputs}")
    cost_weights = sp.symbols(f"c0:{outputs}")
    cost = sum(cw * act ** 3 for act, cw in zip(activations, cost_weights))  # C as a function of a
    as_z = {act: sp.tanh(zs[(m,)]) for m, act in enumerate(activations)}
    point = random_point(list(zs.values()) + list(cost_weights), np.random.default_rng(outputs))
    for at in range(outputs):
        general = backprop.bp1().subs(j, at).subs(dCda[at], sp.diff(cost, activations[at]).subs(as_z))
        general = general.xreplace(z_table).replace(sigma, sp.tanh).doit()
        expected = sp.diff(cost.subs(as_z), zs[(at,)])
        assert abs(sp.N((general - expected).subs(point), 40)) < 1e-30


@pytest.mark.parametrize("inputs, outputs", SIZES)
def test_bp2_bp3_bp4_against_a_written_out_layer(inputs, outputs):
    zs, z_table = entries(z, inputs)
    ws, w_table = entries(W, inputs, outputs)
    bs, b_table = entries(b, outputs)
    ds = sp.symbols(f"d0:{outputs}")
    nxt = [sum(sp.tanh(zs[(m,)]) * ws[(m, o)] for m in range(inputs)) + bs[(o,)] for o in range(outputs)]
    cost = sum(d * z_next for d, z_next in zip(ds, nxt))  # so delta^{l+1} = d
    sizes = {K_in: inputs, K_out: outputs}
    table = {**z_table, **w_table, **b_table, **{delta[o]: ds[o] for o in range(outputs)},
             **{a[m]: sp.tanh(zs[(m,)]) for m in range(inputs)}}
    point = random_point(list(zs.values()) + list(ws.values()) + list(ds), np.random.default_rng(inputs))

    def same(general, expected):
        general = explicit(general, sizes, table).replace(sigma, sp.tanh).doit()
        return abs(sp.N((general - expected).subs(point), 40)) < 1e-30

    for m in range(inputs):
        assert same(backprop.bp2().subs(k, m), sp.diff(cost, zs[(m,)]))
    for o in range(outputs):
        assert same(backprop.bp3().subs(j, o), sp.diff(cost, bs[(o,)]))
        for m in range(inputs):
            assert same(backprop.bp4().subs({k: m, j: o}), sp.diff(cost, ws[(m, o)]))


@pytest.mark.parametrize("inputs, outputs", SIZES)
def test_linear_backward_is_the_batched_bp2_bp3_bp4(inputs, outputs):
    batch = 3
    xs, x_table = entries(X, batch, inputs)
    ws, w_table = entries(W, inputs, outputs)
    gs, g_table = entries(dy, batch, outputs)
    _, b_table = entries(b, outputs)
    y = [[sum(xs[(r, m)] * ws[(m, o)] for m in range(inputs)) + sp.Symbol(f"b_{o}") for o in range(outputs)]
         for r in range(batch)]
    objective = sum(gs[(r, o)] * y[r][o] for r in range(batch) for o in range(outputs))
    grads = linear_gradients()
    sizes = {K_in: inputs, K_out: outputs, N: batch}
    table = {**x_table, **w_table, **g_table, **b_table}
    for r in range(batch):
        for m in range(inputs):
            assert sp.expand(explicit(grads["x"].subs({n: r, k: m}), sizes, table) - sp.diff(objective, xs[(r, m)])) == 0
    for m in range(inputs):
        for o in range(outputs):
            assert sp.expand(explicit(grads["W"].subs({k: m, j: o}), sizes, table) - sp.diff(objective, ws[(m, o)])) == 0
    for o in range(outputs):
        assert sp.expand(explicit(grads["b"].subs(j, o), sizes, table) - sp.diff(objective, sp.Symbol(f"b_{o}"))) == 0
    # BP4 summed over the batch, with a = x and delta = g, is the weight gradient
    bp4_batched = sp.Sum(backprop.bp4().subs({a[k]: X[n, k], delta[j]: dy[n, j]}), (n, 0, N - 1))
    assert sp.expand(explicit(bp4_batched - grads["W"], sizes, table)) == 0


def linear_gradients():
    """{x, W, b: gradient} of the catalog's Linear by its reverse mode (derive.tensor), in backprop's letters:
    its input axis i as k (K_in), its output axis o as j (K_out)."""
    op = CATALOG["Linear"]
    (_, i), (o,) = op.inputs["x"], op.params["b"][0]
    letters = {i: k, o: j, tensor.size_of(i): K_in, tensor.size_of(o): K_out}
    return {name: program[-1].expr.xreplace(letters) for name, program in tensor.derivation(op).gradients.items()}


def test_linear_penalty_gradient_is_twice_l2_w():
    (_, i), (o,) = CATALOG["Linear"].inputs["x"], CATALOG["Linear"].params["b"][0]
    (gradient,) = tensor.derivation(CATALOG["Linear"]).penalty
    assert gradient.name == "dW" and gradient.expr == 2 * sp.Symbol("l2", real=True) * W[i, o]
