"""Every derivation symgrad prints: the gradient and the stable forms of each catalog entry, computed
from the entry, and the named ones a student asks for (seeds 000-004). Pure: each returns a Derivation."""
import sympy as sp

from derive.algebra import in_terms_of
from derive.catalog import CATALOG
from derive.derivation_steps import Derivation, elementwise_derivation, jacobian_steps, op_derivations
from derive.softmax import softmax
from derive.symbols import i, j, p

X = sp.Symbol("x")                                  # the input of an element-wise activation
ALPHA = sp.Symbol("alpha", positive=True)           # LeakyReLU's slope below 0


def activation(expr, title):
    """A builder of the element-wise derivation of expr by x."""
    return lambda: elementwise_derivation(expr, X, title)


def softmax_jacobian():
    """dp_i/dx_j = p_i (delta_ij - p_j), and its cases i = j and i != j (seeds 001-004)."""
    steps, _ = jacobian_steps(p, softmax(i), i, j, lambda e: in_terms_of(e, p, softmax(i), i))
    return Derivation("The softmax Jacobian and its two cases (seeds 001 to 004)", tuple(steps), ((p[i], softmax(i)),))


NAMED = {
    "softmax_jacobian": softmax_jacobian,
    "sigmoid_derivative": activation(1 / (1 + sp.exp(-X)), "Sigmoid activation (seed 001)"),
    "tanh_derivative": activation(sp.tanh(X), "Tanh activation (seed 001)"),
    "relu_derivative": activation(sp.Piecewise((0, X < 0), (X, True)), "ReLU activation"),
    "leaky_relu_derivative": activation(sp.Piecewise((ALPHA * X, X < 0), (X, True)), "LeakyReLU activation"),
}


def build_registry(catalog, named):
    """{name: function returning its Derivation}: each catalog entry's, then the named ones; a name
    declared twice is refused."""
    registry = {}
    for builders in [*(op_derivations(op) for op in catalog.values()), named]:
        for name, build in builders.items():
            if name in registry:
                raise ValueError(f"derivation {name!r} is declared twice")
            registry[name] = build
    return registry


DERIVATIONS = build_registry(CATALOG, NAMED)
