"""The registry: every operation declared once. Derivations, kernels, tests and docs follow from it.

Names follow the contract of derive.symbols: x input, y output, t target, g upstream gradient."""
import re
from dataclasses import dataclass, field

import sympy as sp

from derive import activations, backprop, losses
from derive.functions import sigmoid
from derive.softmax import softmax
from derive.symbols import K, c, eps, i, margin, mask, p, pw, slope, w, y


@dataclass(frozen=True)
class Param:
    """A constructor option: its symbol in the derivation, PyTorch's default, and the value at which
    the option has no effect (None if it always matters), which gives the plain kernel."""

    name: str
    symbol: sp.Basic
    default: object
    neutral: object = None
    kind: str = "scalar"           # scalar | class_weights | element_weights | ignore_index
    example: object = None         # a value other than the default, for the tests (scalars)


@dataclass(frozen=True)
class Op:
    """One operation: its forward in index notation and what its forward saves for backward."""

    name: str                      # class name in generated/
    kind: str                      # layer: forward(x) -> y; loss: forward(x, target) -> loss; linear
    summary: str                   # one line for docstrings and the codegen table
    source: str                    # the derivation the forward comes from
    forward: sp.Expr               # layer: y_i; loss: the loss of a row, or of element i
    saved: tuple = ()              # ((base, definition over index i), ...) kept for backward
    params: tuple = ()             # (Param, ...) in constructor order
    targets: tuple = ()            # loss target kinds: "labels" (integers) and/or "dense" (x's shape)
    granularity: str = "row"       # loss: one value per "row" or per "element"
    target_range: tuple = (None, None)  # loss: (low, high) a dense target's entries must lie in
    mean_weight: dict = field(default_factory=dict)  # target -> each entry's weight in the mean
    domain: tuple = (-3.0, 3.0)    # inputs drawn uniformly from here in the tests
    tol: float = 1e-6              # largest finite-difference relative error accepted

    @staticmethod
    def index_range(index):
        """The limits of a sum over a row's classes."""
        return (index, 0, K - 1)

    @property
    def module(self):
        """The generated module's name: snake case of the class name."""
        return re.sub(r"(?<=[a-z])(?=[A-Z][a-z])", "_", self.name).lower()


KINDS = ("layer", "loss", "linear")


def build_catalog(*ops):
    """{name: op}, refusing a name declared twice."""
    catalog = {}
    for op in ops:
        if op.name in catalog:
            raise ValueError(f"operation {op.name!r} is declared twice in the catalog")
        if op.kind not in KINDS:
            raise ValueError(f"operation {op.name!r}: kind must be one of {KINDS}, got {op.kind!r}")
        catalog[op.name] = op
    return catalog


def layer(name, summary, forward, saves_output=False, **options):
    """A layer y = forward(x); saves_output when backward is best written with y (sigmoid, softmax)."""
    saved = ((y, forward),) if saves_output else ()
    return Op(name=name, kind="layer", summary=summary, source=f"derive.activations ({name})",
              forward=forward, saved=saved, **options)


WEIGHT = Param("weight", w, None, neutral=1, kind="class_weights")

CATALOG = build_catalog(
    # sigmoid and tanh backward read y: y (1 - y) and 1 - y^2, as PyTorch's sigmoid_backward and tanh_backward
    layer("Sigmoid", "logistic sigmoid, element-wise", activations.logistic(), saves_output=True,
          domain=(-6.0, 6.0)),
    layer("Tanh", "hyperbolic tangent, element-wise", activations.tanh(), saves_output=True),
    layer("ReLU", "max(0, x), element-wise", activations.relu()),
    layer("LeakyReLU", "x for x > 0, else negative_slope * x, element-wise", activations.leaky_relu(),
          params=(Param("negative_slope", slope, 0.01, example=0.2),)),
    layer("Softplus", "log(1 + exp(x)), element-wise", activations.softplus(), domain=(-6.0, 6.0)),
    layer("Softmax", "softmax over the last axis", softmax(i), saves_output=True),
    layer("LogSoftmax", "log of the softmax over the last axis", activations.log_softmax(), saves_output=True),
    Op(name="Linear", kind="linear", summary="affine map y = x @ W + b, with an optional L2 penalty on W",
       source="derive.backprop.linear", forward=backprop.linear()),
    Op(name="SoftmaxCrossEntropy", kind="loss",
       summary="softmax then cross-entropy, fused, as torch.nn.functional.cross_entropy",
       source="derive.losses.cross_entropy_options", forward=losses.cross_entropy_options(),
       saved=((p, softmax(i)),), targets=("labels", "dense"), target_range=(0, None), domain=(-5.0, 5.0),
       params=(WEIGHT, Param("ignore_index", mask, -100, neutral=1, kind="ignore_index"),
               Param("label_smoothing", eps, 0.0, neutral=0, example=0.2)),
       mean_weight={"labels": losses.cross_entropy_mean_weight()}),
    Op(name="BinaryCrossEntropyWithLogits", kind="loss",
       summary="sigmoid then binary cross-entropy, fused, as torch.nn.functional.binary_cross_entropy_with_logits",
       source="derive.losses.binary_cross_entropy", forward=losses.binary_cross_entropy(),
       saved=((p, sigmoid(sp.Indexed(sp.IndexedBase("x"), i))),), targets=("dense",), granularity="element",
       target_range=(0, 1),
       domain=(-6.0, 6.0),
       params=(Param("weight", w, None, neutral=1, kind="element_weights"),
               Param("pos_weight", pw, None, neutral=1, kind="class_weights"))),
    Op(name="MeanSquaredError", kind="loss", summary="squared error, as torch.nn.functional.mse_loss",
       source="derive.losses.squared_error", forward=losses.squared_error(), targets=("dense",),
       granularity="element"),
    Op(name="MulticlassHinge", kind="loss",
       summary="seed 002's multiclass SVM loss: sum over j != c of max(0, x_j - x_c + margin)",
       source="derive.losses.multiclass_hinge", forward=losses.multiclass_hinge(), targets=("labels",),
       params=(Param("margin", margin, 1.0, example=0.5),)),
)
_ = c  # the label symbol appears in the loss declarations through derive.losses
