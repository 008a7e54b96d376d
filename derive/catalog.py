"""The registry: every operation declared once. Derivations, kernels, tests and docs follow from it.

Names follow the contract of derive.symbols: x input, y output, t target, g upstream gradient."""
from dataclasses import dataclass

import sympy as sp

from derive.softmax import cross_entropy, softmax
from derive.symbols import K, i, p, y


@dataclass(frozen=True)
class Op:
    """One operation: its forward in index notation and what its forward saves for backward."""

    name: str                      # class name in generated/
    kind: str                      # "layer" (forward(x) -> y) or "loss" (forward(x, target) -> loss)
    summary: str                   # one line for docstrings and the codegen table
    source: str                    # the derivation the forward comes from
    forward: sp.Expr               # layer: y_i; loss: the per-sample loss over a target row t
    saved: tuple                   # ((base, definition over index i), ...) kept for backward
    domain: tuple = (-3.0, 3.0)    # inputs drawn uniformly from here in the tests
    tol: float = 1e-6              # largest finite-difference relative error accepted

    @staticmethod
    def index_range(index):
        """The limits of a sum over a row's classes."""
        return (index, 0, K - 1)

    @property
    def module(self):
        """The generated module's name: snake case of the class name."""
        return "".join("_" + ch.lower() if ch.isupper() else ch for ch in self.name).lstrip("_")


def build_catalog(*ops):
    """{name: op}, refusing a name declared twice."""
    catalog = {}
    for op in ops:
        if op.name in catalog:
            raise ValueError(f"operation {op.name!r} is declared twice in the catalog")
        if op.kind not in ("layer", "loss"):
            raise ValueError(f"operation {op.name!r}: kind must be 'layer' or 'loss', got {op.kind!r}")
        catalog[op.name] = op
    return catalog


CATALOG = build_catalog(
    Op(name="Softmax", kind="layer", summary="softmax over the last axis",
       source="derive.softmax.softmax", forward=softmax(i), saved=((y, softmax(i)),)),
    Op(name="SoftmaxCrossEntropy", kind="loss",
       summary="softmax then cross-entropy, fused, for integer labels or probability rows",
       source="derive.softmax.cross_entropy", forward=cross_entropy(), saved=((p, softmax(i)),),
       domain=(-5.0, 5.0)),
)
