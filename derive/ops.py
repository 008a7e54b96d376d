"""What an operation is: the dataclasses every declaration produces, and the registry's rules."""
import math
import re
from dataclasses import dataclass, field
from typing import NamedTuple

import sympy as sp

from derive.symbols import K


# Range.of's forms: a comparison ("> 0", "<= 1") or an interval ("[0, 1]", "(0, 1]")
RANGE = re.compile(r"\s*(?:(?P<side>[<>]=?)\s*(?P<bound>[^\s,]+)|"
                   r"(?P<left>[\[(])\s*(?P<low>[^\s,]+)\s*,\s*(?P<high>[^\s,]+)\s*(?P<right>[\])]))\s*")


class Range(NamedTuple):
    """The values a scalar option accepts: low to high, an open end excluded. An infinite end is no
    bound, and infinity itself is accepted only at a closed one ("[0, inf]"); NaN never is."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = True
    high_open: bool = True

    def __contains__(self, value):
        return ((self.low < value) if self.low_open else (self.low <= value)) and (
            (value < self.high) if self.high_open else (value <= self.high))

    @classmethod
    def of(cls, text):
        """The range written "> a", ">= a", "< b", "<= b", or as an interval "[a, b]", "(a, b]", "[a, b)", "(a, b)"."""
        match = RANGE.fullmatch(text) if isinstance(text, str) else None
        if match is None:
            raise ValueError(f"range {text!r} is none of '> a', '>= a', '< b', '<= b', '[a, b]', '(a, b]', "
                             f"'[a, b)', '(a, b)'")
        if match["side"]:
            value, closed = bound(text, match["bound"]), match["side"].endswith("=")
            found = (cls(low=value, low_open=not closed) if match["side"][0] == ">"
                     else cls(high=value, high_open=not closed))
        else:
            found = cls(bound(text, match["low"]), bound(text, match["high"]), match["left"] == "(",
                        match["right"] == ")")
        if not found.low < found.high:
            raise ValueError(f"range {text!r} holds at most one value")
        return found


def bound(text, word):
    """A range's end as a float (inf and -inf too), refusing anything else."""
    try:
        value = float(word)
    except ValueError:
        value = math.nan
    if math.isnan(value):
        raise ValueError(f"range {text!r}: {word!r} is not a number")
    return value


@dataclass(frozen=True)
class Param:
    """A constructor option: its symbol in the derivation, PyTorch's default, and the value at which
    the option has no effect (None if it always matters), which gives the plain kernel."""

    name: str
    symbol: sp.Basic
    default: object
    neutral: object = None
    kind: str = "scalar"           # scalar | class_weights | element_weights | ignore_index | flag (True or False:
                                   # each value its own kernels, derived with the flag fixed)
    example: object = None         # a value other than the default, for the tests (scalars)
    range: Range = Range()         # the values a scalar accepts: by default any finite real number


@dataclass(frozen=True)
class Op:
    """One operation: its forward in index notation and what its forward saves for backward."""

    name: str                      # class name in generated/
    kind: str                      # layer: forward(x) -> y; loss: forward(x, target) -> loss
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
    constraints: tuple = ()        # ((option, "<=", option), ...): comparisons the constructor checks
    means: dict = field(default_factory=dict)  # loss: {reduction: axes}, further means: the losses' sum over the
                                   # product of x's sizes on those axes (kl_div's batchmean, (0,): the batch size)

    @staticmethod
    def index_range(index):
        """The limits of a sum over a row's classes."""
        return (index, 0, K - 1)

    @property
    def module(self):
        """The generated module's name: snake case of the class name (LeakyReLU -> leaky_relu, NLLLoss -> nll_loss)."""
        return re.sub(r"(?<=[a-z])(?=[A-Z][a-z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", self.name).lower()


KINDS = ("layer", "loss")


RESERVED_MODULES = ("__init__", "_base", "_checks", "_special", "network", "fast")


def build_catalog(*ops, taken=()):
    """{name: op}, refusing a name declared twice, one in taken, or two names with one module."""
    catalog, modules = {}, {}
    for op in ops:
        if op.name in catalog:
            raise ValueError(f"operation {op.name!r} is declared twice (names must be unique)")
        if op.name in taken:
            raise ValueError(f"operation {op.name!r}: the name is taken by symgrad's own {op.name}")
        if op.kind not in KINDS:
            raise ValueError(f"operation {op.name!r}: kind must be one of {KINDS}, got {op.kind!r}")
        if op.module in modules or op.module in RESERVED_MODULES:
            raise ValueError(f"operation {op.name!r}: its module name {op.module!r} is already used"
                             f" by {modules.get(op.module, 'the generated package')}")
        catalog[op.name], modules[op.module] = op, op.name
    return catalog


