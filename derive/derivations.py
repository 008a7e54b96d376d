"""Every derivation symgrad prints: the gradient and the stable forms of each catalog entry, computed
from the entry, and the named ones a student asks for (the softmax Jacobian, backpropagation, the
optimizers' updates...). Pure: each returns a Derivation; derivation(NAME) is what symgrad derive NAME prints."""
import functools

import sympy as sp

from derive.algebra import contract, in_terms_of, tidy
from derive.catalog import CATALOG
from derive.derivation_networks import (SIGMA, SIGMOID_DEFINITIONS, adam, backprop, l2_penalty, linear,
                                        linear_softmax_classifier, sigmoid, sigmoid_cross_entropy_vs_mse)
from derive.derivation_steps import (LOSS, MEAN, OUTPUT, Derivation, Step, elementwise_derivation,
                                     jacobian_steps, op_derivations, partial, rewrite_steps)
from derive.reduction import REDUCTIONS, row_weight
from derive.softmax import cross_entropy, cross_entropy_gradient, softmax
from derive.symbols import G, K, L, c, i, j, k, n, over_batch, over_classes, p, r, t, x
from derive.tensor import TensorOp

X = sp.Symbol("x")                                  # the input of an element-wise activation
ALPHA = sp.Symbol("alpha", positive=True)           # LeakyReLU's slope below 0
EPSILON = sp.Symbol("epsilon")                      # label smoothing's share spread over the classes


def activation(expr, title):
    """A builder of the element-wise derivation of expr by x."""
    return lambda: elementwise_derivation(expr, X, title)


def softplus():
    """Softplus: its derivative is the sigmoid."""
    plain = elementwise_derivation(sp.log(1 + sp.exp(X)), X, "Softplus: its derivative is the sigmoid")
    sigma = Step(sp.Derivative(OUTPUT, X), SIGMA(X), "the sigmoid: numerator and denominator divided by exp(x)")
    return Derivation(plain.title, (*plain.steps, sigma), (*plain.definitions, *SIGMOID_DEFINITIONS))


def softmax_jacobian():
    """dp_i/dx_j = p_i (delta_ij - p_j), and its cases i = j and i != j."""
    steps, _ = jacobian_steps(p, softmax(i), i, j, lambda e: in_terms_of(e, p, softmax(i), i))
    return Derivation("The softmax Jacobian and its two cases", tuple(steps), ((p[i], softmax(i)),))


def label_smoothing():
    """t_k = (1 - epsilon) delta_kc + epsilon / K still sums to 1, so dL/dx_j = p_j - t_j holds."""
    smoothed = (1 - EPSILON) * sp.KroneckerDelta(k, c) + EPSILON / K
    total = over_classes(t[k], k)
    d = sp.Derivative(LOSS, x[j])
    general = cross_entropy_gradient()
    steps = (Step(t[k], smoothed, "definition: label smoothing of the integer label c"),
             Step(total, over_classes(smoothed, k), "substitution"),
             Step(total, contract(over_classes(smoothed, k)), "contraction of a Kronecker delta: it still sums to 1"),
             Step(LOSS, -over_classes(t[k] * sp.log(p[k]), k), "definition"),
             Step(d, general, "the cross-entropy gradient, derived in softmax cross entropy"),
             Step(d, general.subs(total, 1), "substitution: the row sums to 1"),
             Step(d, general.subs(total, 1).subs(t[j], smoothed.subs(k, j)), "substitution of the smoothed row"))
    return Derivation("Label smoothing: the gradient is still p - t, with the smoothed t", steps,
                      ((t[k], smoothed), (p[i], softmax(i)), (LOSS, cross_entropy())))


def class_weights():
    """L = -w_c log p_c: the row's gradient is scaled by w_c; the weighted mean divides by the weights' sum."""
    w, ell, omega = sp.IndexedBase("w"), sp.IndexedBase("ell"), sp.IndexedBase("omega")
    split = -w[c] * sp.expand_log(sp.log(softmax(c)), force=True)
    d = sp.Derivative(LOSS, x[j])
    raw = partial(split, x[j])
    mean = over_batch(omega[n] * ell[n]) / over_batch(omega[n])
    steps = (Step(LOSS, -w[c] * sp.log(p[c]), "definition: the weight w of the label's class (PyTorch's weight)"),
             Step(LOSS, split, "substitution of the definition of p, split logs"),
             Step(d, raw, "differentiation: chain rule, contraction of a Kronecker delta"),
             Step(d, tidy(in_terms_of(raw, p, softmax(i), i), w[c]), "substitution of the definition of p"),
             Step(MEAN, mean, "definition: the weighted mean over the batch, omega the weight of row n's label"),
             Step(sp.Derivative(MEAN, ell[r]), partial(mean, ell[r]),
                  "contraction of a Kronecker delta: in place of the mean's 1/N"))
    return Derivation("Class weights: each row's gradient scaled by its class weight", steps,
                      ((LOSS, -w[c] * sp.log(p[c])), (p[i], softmax(i)), (MEAN, mean)))


def reductions():
    """Each reduction of the per-sample losses L_n, and the weight it gives row r's gradient."""
    steps, definitions = [], []
    for name, reduced in REDUCTIONS.items():
        # an unreduced loss returns every L_n; the objective backward sees weighs each by its upstream G_n
        objective = reduced if reduced.has(sp.Sum) else over_batch(G[n] * reduced)
        total = sp.Symbol(f"L_{name}")
        steps += [Step(total, objective, f"definition: reduction {name}"),
                  Step(sp.Derivative(total, L[r]), row_weight(reduced), "contraction of a Kronecker delta")]
        definitions.append((total, objective))
    return Derivation("Reductions over a batch, and each row's weight in the gradient",
                      tuple(steps), tuple(definitions))


def softmax_shift_invariance():
    """softmax(x) = softmax(x - M) for any M, so M = max_k x_k and no exponential overflows."""
    top = sp.Symbol("M")
    numerator, denominator = sp.exp(x[i]), over_classes(sp.exp(x[k]), k)
    scale = sp.exp(-top)
    steps = (Step(p[i], numerator / denominator, "definition"),
             Step(p[i], sp.Mul(scale * numerator, sp.Pow(sp.Mul(scale, denominator, evaluate=False), -1,
                                                          evaluate=False), evaluate=False),
                  "multiplication of numerator and denominator by the same exp(-M), for any M"),
             Step(p[i], sp.exp(x[i] - top) / over_classes(sp.exp(x[k] - top), k),
                  "combine exponentials: every exponent is at most 0 when M is the row's max"))
    return Derivation("Softmax is shift invariant: softmax(x) = softmax(x - M)", steps, ((p[i], softmax(i)),))


def log_softmax():
    """log p_i = x_i - logsumexp(x), through the rewrites the kernels apply."""
    return Derivation("Log-softmax: x minus the log-sum-exp, never forming p",
                      tuple(rewrite_steps(sp.log(p[i]), sp.log(softmax(i)))), ((p[i], softmax(i)),))


def binary_cross_entropy_stable():
    """The naive -t log sigma(x) - (1 - t) log(1 - sigma(x)) equals max(x, 0) - x t + log(1 + e^{-|x|})."""
    target = sp.Symbol("t")
    naive = -target * sp.log(SIGMA(X)) - (1 - target) * sp.log(1 - SIGMA(X))
    softplus_negative = sp.log(1 + sp.exp(-X))
    steps = (Step(LOSS, naive, "definition: binary cross-entropy of the logit x"),
             Step(LOSS, -target * sp.log(1 / (1 + sp.exp(-X))) - (1 - target) * sp.log(sp.exp(-X) / (1 + sp.exp(-X))),
                  "substitution of the sigmoid, and 1 minus it"),
             Step(LOSS, target * softplus_negative + (1 - target) * (X + softplus_negative), "split logs"),
             Step(LOSS, (1 - target) * X + softplus_negative, "simplification: exp(-x) overflows for x far below 0"),
             Step(LOSS, (1 - target) * X + sp.Max(-X, 0) + sp.log(1 + sp.exp(-sp.Abs(X))),
                  "the two cases of log(1 + exp(-x)): for x below 0 take exp(-x) out of the log"),
             Step(LOSS, sp.Max(X, 0) - X * target + sp.log(1 + sp.exp(-sp.Abs(X))),
                  "simplification: x + max(-x, 0) = max(x, 0); no exponent is positive"))
    return Derivation("Binary cross-entropy with logits: the stable form the kernel uses", steps,
                      ((LOSS, naive), *SIGMOID_DEFINITIONS))


def batch_norm():
    """BatchNorm1d's backward through its steps, ending in the textbook's compact dx (derive.derivation_tensor)."""
    from derive.derivation_tensor import batch_norm_textbook  # imported here: that module builds on this one
    return batch_norm_textbook(CATALOG["BatchNorm1d"])


def attention():
    """Attention's backward, softmax through the matrix products: ScaledDotProductAttention's derivation."""
    from derive.derivation_tensor import tensor_derivation
    from derive.tensor import with_flags
    return tensor_derivation(with_flags(CATALOG["ScaledDotProductAttention"], {}))


NAMED = {
    "softmax_jacobian": softmax_jacobian,
    "sigmoid_cross_entropy_vs_mse": sigmoid_cross_entropy_vs_mse,
    "sigmoid_derivative": activation(sigmoid(X), "Sigmoid activation"),
    "tanh_derivative": activation(sp.tanh(X), "Tanh activation"),
    "relu_derivative": activation(sp.Piecewise((0, X < 0), (X, True)), "ReLU activation"),
    "leaky_relu_derivative": activation(sp.Piecewise((ALPHA * X, X < 0), (X, True)), "LeakyReLU activation"),
    "softplus_derivative": softplus,
    "backprop": backprop,
    "l2_penalty": l2_penalty,
    "linear_softmax_classifier": linear_softmax_classifier,
    "linear_jacobians": linear,
    "adam": adam,
    "adamw": functools.partial(adam, decoupled=True),
    "label_smoothing": label_smoothing,
    "class_weights": class_weights,
    "reductions": reductions,
    "softmax_shift_invariance": softmax_shift_invariance,
    "log_sum_exp": log_softmax,
    "binary_cross_entropy_stable": binary_cross_entropy_stable,
    "batch_norm": batch_norm,
    "attention": attention,
}


def entry_derivations(op):
    """{name: function returning the Derivation} of a catalog entry: an index-notation one's reverse mode
    through its steps, any other's its gradient and its stable forms."""
    if isinstance(op, TensorOp):
        from derive.derivation_tensor import tensor_derivation  # imported here: that module builds on this one
        from derive.tensor import with_flags   # the flags' defaults: the kernels a default instance runs
        return {op.module: functools.partial(tensor_derivation, with_flags(op, {}) if op.flags else op)}
    return op_derivations(op)


def build_registry(catalog, named):
    """{name: function returning its Derivation}: each catalog entry's, then the named ones; a name
    declared twice is refused (a named one must not take the name of an entry's module, or of it
    with _stable: Linear will be linear, LogSoftmax log_softmax)."""
    registry = {}
    for builders in [*map(entry_derivations, catalog.values()), named]:
        for name, build in builders.items():
            if name in registry:
                raise ValueError(f"derivation {name!r} is declared twice")
            registry[name] = build
    return registry


DERIVATIONS = build_registry(CATALOG, NAMED)


def derivation(name):
    """The Derivation that symgrad derive NAME prints: a catalog entry's by its module name (sigmoid,
    softmax_cross_entropy_stable) or a named one (backprop); in a notebook it shows its steps typeset."""
    if name not in DERIVATIONS:
        raise KeyError(f"no derivation named {name!r}; try one of: {', '.join(DERIVATIONS)}")
    return DERIVATIONS[name]()
