"""Index-notation operations: declared, derived by reverse mode over their steps, every VJP checked
against central differences at explicit sizes; every ill-formed declaration refused in one line."""
import dataclasses

import numpy as np
import pytest
import sympy as sp

from derive.declare import DeclarationError
from derive.tensor import Sum, check_derivation_numerically, derivation, size_of, tensor_loss, tensor_op

LAYER_NORM = tensor_op(
    "LayerNorm", inputs={"x": "n k"}, params={"gamma": ("k", "ones"), "beta": ("k", "zeros")}, options={"eps": 1e-5},
    steps=["mu[n] = Sum(x[n, k], k) / K",
           "var[n] = Sum((x[n, k] - mu[n])**2, k) / K",
           "y[n, k] = (x[n, k] - mu[n]) / sqrt(var[n] + eps) * gamma[k] + beta[k]"])
CONV1D = tensor_op(
    "Conv1d", inputs={"x": "n c l"}, params={"w": ("o c j", "uniform"), "b": ("o", "uniform")},
    sizes={"M": "L - J + 1"}, steps=["y[n, o, m] = Sum(w[o, c, j] * x[n, c, m + j], c, j) + b[o]"])
NLL = tensor_loss("NLL", inputs={"x": "n k"}, targets={"c": "n"}, steps=["L[n] = -x[n, c[n]]"])

# GLU splits its last axis as a shift: the first half x[n, h], the second x[n, h + H], with H = K/2
# (a declaration with two inputs would need the caller to split the array).
# KLDiv takes logits x and target probabilities t, as PyTorch's KLDivLoss(log_softmax(x), t): an
# entry t = 0 contributes 0 (the Piecewise), so t log t is never evaluated at 0.
CASES = [
    (LAYER_NORM, {"N": 2, "K": 3}, {}),
    (CONV1D, {"N": 2, "C": 2, "L": 5, "O": 2, "J": 3}, {}),
    (NLL, {"N": 3, "K": 4}, {}),
    (tensor_op("Softmax", inputs={"x": "n k"}, options={"T": 2.0},
               steps=["s[n] = Sum(exp(x[n, k] / T), k)", "y[n, k] = exp(x[n, k] / T) / s[n]"]), {"N": 2, "K": 3}, {}),
    (tensor_op("RMSNorm", inputs={"x": "n k"}, params={"gamma": ("k", "ones")}, options={"eps": 1e-6},
               steps=["ms[n] = Sum(x[n, k]**2, k) / K", "y[n, k] = x[n, k] / sqrt(ms[n] + eps) * gamma[k]"]),
     {"N": 2, "K": 3}, {}),
    (tensor_op("BatchNorm", inputs={"x": "n k"}, params={"gamma": ("k", "ones"), "beta": ("k", "zeros")},
               options={"eps": 1e-5},
               steps=["mu[k] = Sum(x[n, k], n) / N", "var[k] = Sum((x[n, k] - mu[k])**2, n) / N",
                      "y[n, k] = (x[n, k] - mu[k]) / sqrt(var[k] + eps) * gamma[k] + beta[k]"]), {"N": 3, "K": 2}, {}),
    (tensor_op("Attention", inputs={"Q": "n t d", "K": "n s d", "V": "n s e"},
               steps=["A[n, t, s] = Sum(Q[n, t, d] * K[n, s, d], d) / sqrt(D)",
                      "Z[n, t] = Sum(exp(A[n, t, s]), s)",
                      "P[n, t, s] = exp(A[n, t, s]) / Z[n, t]",
                      "y[n, t, e] = Sum(P[n, t, s] * V[n, s, e], s)"]), {"N": 2, "T": 2, "S": 3, "D": 2, "E": 2}, {}),
    (tensor_op("GLU", inputs={"x": "n k"}, sizes={"H": "K/2"}, steps=["y[n, h] = x[n, h] * sigmoid(x[n, h + H])"]),
     {"N": 2, "K": 4}, {}),
    (tensor_loss("KLDiv", inputs={"x": "n k"}, targets={"t": "n k"},
                 steps=["s[n] = Sum(exp(x[n, k]), k)",
                        "L[n] = Sum(Piecewise((t[n, k] * (log(t[n, k]) - x[n, k] + log(s[n])), t[n, k] > 0), (0, True)),"
                        " k)"]),
     {"N": 2, "K": 3}, {"t": np.array([[0.5, 0.0, 0.5], [0.2, 0.3, 0.5]])}),
    (tensor_loss("FocalLoss", inputs={"x": "n k"}, targets={"c": "n"}, options={"gamma": 2.0},
                 steps=["s[n] = Sum(exp(x[n, k]), k)", "p[n, k] = exp(x[n, k]) / s[n]",
                        "L[n] = -(1 - p[n, c[n]])**gamma * log(p[n, c[n]])"]), {"N": 3, "K": 3}, {}),
]
DERIVED = {op.name: derivation(op) for op, _, _ in CASES}


@pytest.mark.parametrize("op, sizes, values", CASES, ids=[op.name for op, _, _ in CASES])
def test_every_vjp_matches_central_differences(op, sizes, values):
    for seed in (0, 1):
        for check in check_derivation_numerically(op, DERIVED[op.name], sizes, seed=seed, values=values):
            assert check.error < op.tol, (f"{op.name} d{check.name} (seed {seed}): relative error {check.error:.2e}\n"
                                          f"analytic:\n{check.analytic}\nnumeric:\n{check.numeric}")


def test_declaration_is_a_plain_object():
    n, k = sp.symbols("n k", integer=True)
    assert LAYER_NORM.kind == "layer" and LAYER_NORM.inputs == {"x": (n, k)}
    assert LAYER_NORM.params == {"gamma": ((k,), "ones"), "beta": ((k,), "zeros")}
    assert LAYER_NORM.options == {"eps": 1e-5}
    assert [(s.name, s.indices) for s in LAYER_NORM.steps] == [("mu", (n,)), ("var", (n,)), ("y", (n, k))]
    assert str(LAYER_NORM.steps[0]) == "mu[n] = Sum(x[n, k], (k, 0, K - 1))/K"
    assert NLL.kind == "loss" and NLL.targets == {"c": (n,)} and NLL.labels == {"c": size_of(k)}
    L, J = size_of(sp.Symbol("l")), size_of(sp.Symbol("j"))
    assert CONV1D.sizes == {size_of(sp.Symbol("m")): L - J + 1}
    assert CONV1D.fan_in == {"w": size_of(sp.Symbol("c")) * J, "b": size_of(sp.Symbol("c")) * J}


def test_layer_norm_adjoint_program_reads_its_intermediates():
    program = DERIVED["LayerNorm"].gradients["x"]
    assert [a.name for a in program] == ["g_var", "g_mu", "dx"]
    assert str(program[-1]) == ("dx[n, k] = g[n, k]*gamma[k]/sqrt(eps + var[n]) + (-2*mu[n] + 2*x[n, k])*g_var[n]/K"
                                " + g_mu[n]/K")
    # Sum_k (x - mu) = K mu - K mu: the mean's own definition removes it from g_mu
    assert str(program[1]) == "g_mu[n] = -Sum(g[n, k]*gamma[k], (k, 0, K - 1))/sqrt(eps + var[n])"
    assert [a.name for a in DERIVED["LayerNorm"].gradients["gamma"]] == ["dgamma"]


def test_conv1d_dx_is_the_transposed_convolution_within_range():
    dx = DERIVED["Conv1d"].gradients["x"][-1]
    # the kernel's j kept, the output's m = l - j contracted: a window of J over g, not of M over w
    assert str(dx) == ("dx[n, c, l] = Sum(g[n, o, -j + l]*w[o, c, j], (o, 0, O - 1), (j, Max(0, -M + l + 1), "
                       "Min(l, J - 1)))")
    (total,) = dx.expr.atoms(Sum)
    m, lower, upper = total.limits[1]
    assert lower.has(sp.Max) and upper.has(sp.Min), "the range of j is conditioned on l - j lying in 0..M-1"
    sizes = {"N": 2, "C": 2, "L": 5, "O": 2, "J": 3}
    check_derivation_numerically(CONV1D, DERIVED["Conv1d"], sizes)  # the evaluator refuses any read outside an array
    whole = dataclasses.replace(DERIVED["Conv1d"], gradients={"x": (dx._replace(expr=Sum(
        total.function, total.limits[0], (m, 0, size_of(m) - 1))),)})
    with pytest.raises(IndexError, match="outside its shape"):
        check_derivation_numerically(CONV1D, whole, sizes)


def test_a_planted_sign_error_is_caught():
    good = DERIVED["LayerNorm"]
    *adjoints, dgamma = good.gradients["gamma"]
    flipped = (*adjoints, dgamma._replace(expr=-dgamma.expr))
    bad = dataclasses.replace(good, gradients={**good.gradients, "gamma": flipped})
    errors = {c.name: c.error for c in check_derivation_numerically(LAYER_NORM, bad, {"N": 2, "K": 3})}
    assert errors["gamma"] > 1 and errors["x"] < 1e-6


def layer(**changes):
    declaration = dict(inputs={"x": "n k"}, steps=["y[n, k] = x[n, k]"])
    return lambda: tensor_op("Op", **{**declaration, **changes})


REFUSED = [
    (layer(steps=["y[n, k] = z[n, k]"]), "unknown array z in 'z[n, k]'"),
    (layer(steps=["y[n, k] = x[n, q]"]), "unknown name q in 'x[n, q]'; declare its size Q in sizes"),
    (layer(steps=["y[n, k] = x[n, 0]"]), "index k of the lhs is not free in the rhs"),
    (layer(steps=["y[n] = x[n, k]"]), "index k is free in the rhs but not on the lhs"),
    (layer(steps=["y[n, k] = x[n] * x[n, k]"]), "x[n] has 1 indices, x has 2"),
    (layer(steps=["a[n] = b[n]", "b[n] = Sum(x[n, k], k)", "y[n, k] = x[n, k] * a[n]"]),
     "step a reads b, which is defined later"),
    (layer(steps=["a[n] = a[n]", "y[n, k] = x[n, k] * a[n]"]), "step a reads a, which is defined by itself"),
    (layer(options={"x": 1.0}), "x is both an input and an option"),
    (layer(steps=["x[n, k] = 2", "y[n, k] = x[n, k]"]), "x is both an input and a step"),
    (layer(options={"K": 1.0}), "K is both an option and a size"),
    (layer(options={"g": 1.0}), "the name g is reserved"),
    (layer(steps=["y[n, k] = x[n, k]", "dx[n, k] = y[n, k]"]), "the name dx is reserved"),
    (layer(sizes={"M": "K - Q + 1"}), "size M: unknown name Q"),
    (layer(sizes={"K": "2"}), "size K is already the size of an axis of index k"),
    (layer(steps=["y[n, m] = x[n, m + 1]"]), "index m is no axis of an input, param or target; declare its size M"),
    (layer(sizes={"M": "K"}, steps=["y[n, m] = x[n, m + 1]"]), "index m + 1 of x[n, m + 1] may leave 0..K - 1"),
    (layer(sizes={"H": "K"}, steps=["y[n, h] = x[n, 2*h]"]), "index 2*h of x is not a sum of indices"),
    (layer(steps=["z[n, k] = x[n, k]"]), "the last step defines z; the output of a layer is y"),
    (layer(steps=["y[n, k] = x[n, k] * Sum(x[n, k], n, n)"]), "must sum over distinct indices"),
    (layer(steps=["y[n, k] = x * 2"]), "reads array x without indices"),
    (layer(steps=["y[n, k] = x[n, k] +"]), "cannot parse"),
    (layer(steps=["y[n, k] x[n, k]"]), "is not 'name[i, j] = expression'"),
    (layer(steps=["y[n, k] = foo(x[n, k])"]), "unknown function foo in 'foo(x[n, k])'; known: Abs, E"),
    (layer(steps=["y[n, k] = x[n, k].func"]), "unknown name func"),
    (layer(inputs={"x": "n kk"}), "indices must be single lower-case letters"),
    (layer(inputs={"x": "n n"}), "an index is repeated"),
    (layer(inputs={"x": "n k", "u": "n k"}), "u is never read"),
    (layer(steps=["s[n] = Sum(x[n, k], k)", "y[n, k] = x[n, k]"]), "s is never read"),
    (layer(params={"w": ("k", "gaussian")}), "param w must be (indices, init)"),
    (layer(options={"eps": 1e-5}), "eps is never read"),
    (layer(inputs={"my-x": "n k"}), "an input is named 'my-x', which is not an identifier"),
    (layer(options={"eps": float("nan")}), "option eps needs a finite number"),
    (layer(steps=["s[n] = Sum(x[n, k], k)", "y[n, k] = x[n, s[n]]"]), "only an integer target can index an axis"),
    (layer(steps=["s[n] = Sum(x[n, k], k)", "y[n, k] = x[n, k] - s[n]"], running={"t": ("r", "zeros", "t[n]", "m")}),
     "running 't': not a step before the output"),
    (layer(steps=["s[n] = Sum(x[n, k], k)", "y[n, k] = x[n, k] - s[n]"], options={"m": (0.1, "[0, 1]")},
           running={"s": ("r", "twos", "s[n]", "m")}), "running s must be (buffer name, init one of zeros, ones"),
    (layer(steps=["s[n] = Sum(x[n, k], k)", "y[n, k] = x[n, k] - s[n]"], options={"m": (0.1, ">= 0")},
           running={"s": ("r", "zeros", "s[n]", "m")}), "running s: momentum m must be declared within [0, 1]"),
    (layer(steps=["s[n] = Sum(x[n, k], k)", "y[n, k] = x[n, k] - s[n]"], options={"m": (0.1, "[0, 1]")},
           running={"s": ("x", "zeros", "s[n]", "m")}), "running s: buffer name x is taken"),
    (layer(steps=["s[n] = Sum(x[n, k], k)", "y[n, k] = x[n, k] - s[n]"], options={"m": (0.1, "[0, 1]")},
           running={"s": ("r", "zeros", "s[n] * x[n, 0]", "m")}), "running s: the estimate 's[n] * x[n, 0]' must "
                                                                   "read s alone"),
    (layer(inputs={"x": "n [k]"}, steps=["y[n] = Sum(x[n, k], k)"]), "input x: a last axis in brackets needs"),
    (lambda: tensor_op("layerNorm", inputs={"x": "n k"}, steps=["y[n, k] = x[n, k]"]), "start with a capital"),
    (lambda: tensor_loss("Op", inputs={"x": "n k"}, steps=["y[n] = Sum(x[n, k], k)"]),
     "the output of a loss is L"),
]


@pytest.mark.parametrize("declaration, message", REFUSED, ids=[message for _, message in REFUSED])
def test_an_ill_formed_declaration_is_refused_in_one_line(declaration, message):
    with pytest.raises(DeclarationError) as error:
        declaration()
    assert message in str(error.value) and "\n" not in str(error.value)
    assert str(error.value).startswith(("Op: ", "'layerNorm'"))


def test_a_derived_size_must_be_a_positive_integer():
    glu = next(op for op, _, _ in CASES if op.name == "GLU")
    with pytest.raises(ValueError, match="size H = K/2 is 3/2"):
        check_derivation_numerically(glu, DERIVED["GLU"], {"N": 2, "K": 3})
