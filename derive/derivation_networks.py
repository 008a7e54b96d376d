"""Derivations through layers: the sigmoid with cross-entropy and with MSE (seed 004), Linear, the L2
penalty and the linear softmax classifier (seed 002), the four backpropagation equations (seed 001).

Written here in index notation until derive/backprop.py exists; every step is checked all the same."""
import sympy as sp

from derive.algebra import contract, tidy
from derive.derivation_steps import (Derivation, Step, differentiation_rule, elementwise_derivation, fresh_bounds,
                                     partial, simplest, without_repeats)
from derive.symbols import K, N, i, j, k, m, n, over_classes, p, t, x, y

SIGMA = sp.Function("sigma")
D = sp.Symbol("D", integer=True, positive=True)     # input features of a Linear layer; K is its outputs
u, v = sp.symbols("u v", integer=True)               # the output and input index of a weight W_uv
W, b, g = sp.IndexedBase("W"), sp.IndexedBase("b"), sp.IndexedBase("g")
dW, db, dx = sp.IndexedBase("dW"), sp.IndexedBase("db"), sp.IndexedBase("dx")
LAMBDA = sp.Symbol("lambda")
_z = sp.Dummy("z")


class SigmaPrime(sp.Function):
    """sigma'(z), the sigmoid's derivative, printed as a reader writes it."""

    def _latex(self, printer):
        return r"\sigma'\left(%s\right)" % printer._print(self.args[0])

    def _pretty(self, printer):
        return printer._print(sp.Function("σ'")(*self.args))


class LayerName(sp.Symbol):
    """q^{layer} (z^{l+1}), named q__code so that it stays a Python identifier (lambdify compiles it)."""

    LAYERS = {"l": "l", "next": "l+1", "L": "L", "previous": "l-1"}

    def _latex(self, printer):
        q, code = self.name.split("__")
        return f"{printer._print(sp.Symbol(q))}^{{{self.LAYERS[code]}}}"

    def _sympystr(self, printer):
        q, code = self.name.split("__")
        return f"{q}^{self.LAYERS[code]}" if len(self.LAYERS[code]) == 1 else f"{q}^({self.LAYERS[code]})"


def sigmoid(arg):
    return 1 / (1 + sp.exp(-arg))


SIGMOID_DEFINITIONS = ((SIGMA(_z), sigmoid(_z)), (SigmaPrime(_z), sp.diff(sigmoid(_z), _z)))
LINEAR_FORWARD = sp.Sum(W[i, k] * x[k], (k, 0, D - 1)) + b[i]
PENALTY = LAMBDA * sp.Sum(W[i, k] ** 2, (k, 0, D - 1), (i, 0, K - 1))


def sigmoid_cross_entropy_vs_mse():
    """a = sigma(z), z = w x + b: cross-entropy gives dL/dz = a - t, MSE gives (a - t) a (1 - a),
    whose factor a (1 - a) vanishes where the sigmoid saturates (seed 004)."""
    a, z, w, bias, target, feature = sp.symbols("a z w b t x")
    activation = elementwise_derivation(sigmoid(z), z, output=a)
    slope = activation.steps[-1].rhs
    losses = {sp.Symbol("L_CE"): -target * sp.log(a) - (1 - target) * sp.log(1 - a),
              sp.Symbol("L_MSE"): (a - target) ** 2 / 2}
    steps, by_z = [*activation.steps, Step(z, w * feature + bias, "definition")], {}
    for loss, value in losses.items():
        outer = sp.diff(value, a)
        by_z[loss] = simplest(sp.factor(outer) * slope)
        steps += [Step(loss, value, "definition"),
                  Step(sp.Derivative(loss, a), outer, differentiation_rule(value, a)),
                  Step(sp.Derivative(loss, a), sp.factor(outer), "simplification"),
                  Step(sp.Derivative(loss, z), sp.Derivative(loss, a) * sp.Derivative(a, z), "chain rule"),
                  Step(sp.Derivative(loss, z), sp.Mul(sp.factor(outer), slope, evaluate=False),
                       "substitution of the steps above"),
                  Step(sp.Derivative(loss, z), by_z[loss], "simplification"),
                  Step(sp.Derivative(loss, w), sp.Derivative(loss, z) * sp.Derivative(z, w), "chain rule"),
                  Step(sp.Derivative(loss, w), by_z[loss] * feature, "substitution of the steps above")]
    ce, mse = losses
    steps += [Step(sp.Derivative(mse, z) / sp.Derivative(ce, z), tidy(sp.cancel(by_z[mse] / by_z[ce]), a),
                   "simplification: the factor MSE adds"),
              Step(sp.Limit(slope, z, sp.oo), sp.limit(sigmoid(z) * (1 - sigmoid(z)), z, sp.oo),
                   "limit: the sigmoid saturates, and the MSE gradient vanishes with a wrong a"),
              Step(sp.Limit(slope, z, -sp.oo), sp.limit(sigmoid(z) * (1 - sigmoid(z)), z, -sp.oo),
                   "limit: the same for large negative z")]
    return Derivation("Sigmoid output: cross-entropy against mean squared error, and the vanishing a (1 - a)",
                      without_repeats(steps), (*activation.definitions, (z, w * feature + bias), *losses.items()))


def linear():
    """y = W x + b: the Jacobians, the vector-Jacobian products dx, dW, db, and dW over a batch."""
    steps = [Step(y[i], LINEAR_FORWARD, "definition: K outputs from D inputs")]
    products = ((dx[j], x[j]), (dW[u, v], W[u, v]), (db[u], b[u]))
    for product, var in products:
        raw = sp.diff(fresh_bounds(LINEAR_FORWARD), var)
        jacobian = contract(raw)
        steps += [Step(sp.Derivative(y[i], var), raw, "differentiation"),
                  Step(sp.Derivative(y[i], var), jacobian, "contraction of a Kronecker delta"),
                  Step(product, over_classes(g[i] * sp.Derivative(y[i], var), i), "chain rule: g is the gradient by y"),
                  Step(product, contract(over_classes(g[i] * jacobian, i)), "contraction of a Kronecker delta")]
    objective = sp.Symbol("ell")
    steps.append(Step(sp.Derivative(objective, W[u, v]), sp.Sum(g[n, u] * x[n, v], (n, 0, N - 1)),
                      "the same for every row n of a batch: dW adds the rows' outer products"))
    definitions = ((y[i], LINEAR_FORWARD), (y[n, i], LINEAR_FORWARD.xreplace({x[k]: x[n, k]})),
                   *((product, over_classes(g[i] * sp.Derivative(y[i], var), i)) for product, var in products),
                   (objective, sp.Sum(g[n, i] * y[n, i], (i, 0, K - 1), (n, 0, N - 1))))
    return Derivation("Linear: y = W x + b and its vector-Jacobian products", tuple(steps), definitions,
                      ((j, D), (u, K), (v, D)))


def l2_penalty():
    """R = lambda sum W_uv^2 adds 2 lambda W_uv to dW: seed 002's loss += reg * sum(W*W), dW += 2*reg*W."""
    penalty = sp.Symbol("R")
    raw = sp.diff(fresh_bounds(PENALTY), W[u, v])
    steps = (Step(penalty, PENALTY, "definition: the L2 penalty, reg times the sum of squared weights"),
             Step(sp.Derivative(penalty, W[u, v]), raw, "differentiation"),
             Step(sp.Derivative(penalty, W[u, v]), partial(PENALTY, W[u, v]), "contraction of two Kronecker deltas"))
    return Derivation("L2 penalty on the weights", steps, ((penalty, PENALTY),), ((u, K), (v, D)))


def linear_softmax_classifier():
    """Seed 002: p = softmax(W x + b), L = cross-entropy + lambda sum W^2,
    dL/dW_uv = (p_u - t_u) x_v + 2 lambda W_uv."""
    loss = sp.Symbol("L")
    value = -over_classes(t[k] * sp.log(p[k]), k) + PENALTY
    through_y = over_classes(sp.Derivative(loss, y[i]) * sp.Derivative(y[i], W[u, v]), i) + partial(PENALTY, W[u, v])
    known = over_classes((p[i] - t[i]) * sp.KroneckerDelta(i, u) * x[v], i) + partial(PENALTY, W[u, v])
    steps = (Step(loss, value, "definition: cross-entropy of p = softmax(y), y = W x + b, plus the L2 penalty"),
             Step(sp.Derivative(loss, W[u, v]), through_y, "chain rule through y, and the L2 penalty's gradient"),
             Step(sp.Derivative(loss, W[u, v]), known,
                  "substitution of the softmax cross-entropy and Linear gradients, for a target row summing to 1",
                  assumes=(sp.Eq(over_classes(t[k], k), 1),)),
             Step(sp.Derivative(loss, W[u, v]), contract(known), "contraction of a Kronecker delta"))
    definitions = ((loss, value), (y[i], LINEAR_FORWARD), (p[i], sp.exp(y[i]) / over_classes(sp.exp(y[m]), m)))
    return Derivation("Linear softmax classifier with an L2 penalty", steps, definitions, ((u, K), (v, D)))


def backprop():
    """BP1-BP4 for sigmoid layers l, l+1 and the output layer L, each of K units, and a cost C."""
    z, a, w, bias, error = ({name: sp.IndexedBase(LayerName(f"{q}__{code}")) for name, code in
                             (("l", "l"), ("l+1", "next"), ("L", "L"))} for q in ("z", "a", "w", "b", "delta"))
    inputs = sp.IndexedBase(LayerName("a__previous"))
    cost = sp.Symbol("C")
    below = {"l": inputs, "l+1": a["l"], "L": a["l+1"]}
    layer_definitions = []
    for name in z:
        layer_definitions += [(z[name][j], over_classes(w[name][j, k] * below[name][k], k) + bias[name][j]),
                              (a[name][j], SIGMA(z[name][j])), (error[name][j], sp.Derivative(cost, z[name][j]))]
    kd = sp.KroneckerDelta
    bp1 = over_classes(sp.Derivative(cost, a["L"][k]) * SigmaPrime(z["L"][k]) * kd(k, j), k)
    bp2 = over_classes(error["l+1"][k] * over_classes(w["l+1"][k, m] * SigmaPrime(z["l"][m]) * kd(m, j), m), k)
    bp3 = over_classes(error["l"][k] * kd(k, j), k)
    bp4 = over_classes(error["l"][m] * kd(m, j) * inputs[k], m)
    dC_db, dC_dw = sp.Derivative(cost, bias["l"][j]), sp.Derivative(cost, w["l"][j, k])
    steps = (
        Step(error["L"][j], sp.Derivative(cost, z["L"][j]), "definition: the error of layer L"),
        Step(error["L"][j], over_classes(sp.Derivative(cost, a["L"][k]) * sp.Derivative(a["L"][k], z["L"][j]), k),
             "chain rule"),
        Step(error["L"][j], bp1, "differentiation of a = sigma(z), unit by unit"),
        Step(error["L"][j], contract(bp1), "contraction of a Kronecker delta: BP1"),
        Step(error["l"][j], over_classes(sp.Derivative(cost, z["l+1"][k]) * sp.Derivative(z["l+1"][k], z["l"][j]), k),
             "chain rule through the next layer"),
        Step(error["l"][j], bp2, "differentiation of the next layer's z, definition of its error"),
        Step(error["l"][j], contract(bp2), "contraction of a Kronecker delta: BP2"),
        Step(dC_db, over_classes(sp.Derivative(cost, z["l"][k]) * sp.Derivative(z["l"][k], bias["l"][j]), k),
             "chain rule"),
        Step(dC_db, bp3, "differentiation, definition of the error"),
        Step(dC_db, contract(bp3), "contraction of a Kronecker delta: BP3"),
        Step(dC_dw, over_classes(sp.Derivative(cost, z["l"][m]) * sp.Derivative(z["l"][m], w["l"][j, k]), m),
             "chain rule"),
        Step(dC_dw, bp4, "differentiation, definition of the error"),
        Step(dC_dw, contract(bp4), "contraction of a Kronecker delta: BP4"))
    definitions = (*layer_definitions, *SIGMOID_DEFINITIONS,
                   (cost, over_classes((a["L"][k] - t[k]) ** 2, k) / 2))
    return Derivation("The four equations of backpropagation, for sigmoid layers of K units and a cost C",
                      steps, definitions)


def adam(decoupled=False):
    """Adam's update (Kingma and Ba 2015), AdamW's if decoupled, from the bias-corrected moments to the form
    torch.optim computes. beta1 and beta2 lie in (0, 1), the moments and the step are positive."""
    from derive import optim
    positive = {s: sp.Symbol(s.name, positive=True) for s in (optim.exp_avg_sq, optim.EXP_AVG_SQ_NEXT, optim.beta1,
                                                                optim.beta2, optim.lr, optim.eps, optim.step)}
    beta1, beta2, step, lr, eps = (positive[s] for s in (optim.beta1, optim.beta2, optim.step, optim.lr, optim.eps))
    first, second = optim.EXP_AVG_NEXT, positive[optim.EXP_AVG_SQ_NEXT]
    m_hat, v_hat, updated = sp.symbols("mhat vhat param'")
    moments = tuple(e.xreplace(positive) for e in optim.adam_moments(decoupled))
    where = sp.And(beta1 < 1, beta2 < 1)
    start = optim.param * (1 - lr * optim.weight_decay) if decoupled else optim.param
    defined = start - lr * m_hat / (sp.sqrt(v_hat) + eps)
    torch_order = optim.adam_update(decoupled).xreplace(positive)
    name = "AdamW" if decoupled else "Adam"
    decay = ("the parameter decays by itself, by 1 - lr times the weight decay, and the moments average the plain "
             "gradient" if decoupled else "the moments average the gradient plus the weight decay times param (an L2 "
             "term)")
    steps = (Step(updated, defined, f"definition: the update from the bias-corrected moments mhat, vhat; {decay}",
                  where),
             Step(updated, torch_order, "substitution of mhat and vhat, in torch's order: the step size lr over the "
                  "first bias correction, the denominator sqrt(v) over the root of the second, plus eps", where),
             Step(updated, torch_order.xreplace(dict(zip((first, second), moments))),
                  "substitution of the moments m and v", where))
    definitions = ((updated, defined), (m_hat, first / (1 - beta1 ** step)), (v_hat, second / (1 - beta2 ** step)),
                   (first, moments[0]), (second, moments[1]))
    return Derivation(f"{name}: the update from bias-corrected moments, as torch.optim.{name} computes it", steps,
                      definitions)
