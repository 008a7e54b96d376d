"""Declaring an operation: the one mechanism the built-in catalog and users' own files share.

    from derive.declare import activation, elementwise_loss
    OPS = [activation("Swish", "x*sigmoid(x)"),
           activation("ELU", "Piecewise((x, x > 0), (alpha*(exp(x) - 1), True))", params={"alpha": 1.0})]

An expression is SymPy source in x (and t for a loss) and the parameters; each becomes an Op of
derive.catalog, derived, generated and verified like every built-in one."""
import importlib.util
import keyword
import math
import operator
import re
from dataclasses import replace
from typing import NamedTuple

import sympy as sp
from sympy.core.function import AppliedUndef
from tokenize import TokenError

from sympy.parsing.sympy_parser import auto_number, auto_symbol, parse_expr

from derive.functions import sigmoid
from derive.ops import Op, Param, Range
from derive.symbols import K, c, i, k, m, mask, pw, t, w, x, y

# The functions an expression may use, by the names it uses them under.
FUNCTIONS = {name: getattr(sp, name) for name in ("exp", "log", "sqrt", "tanh", "sinh", "cosh", "atan", "erf",
                                                 "Abs", "sign", "Max", "Min", "Piecewise", "pi", "E")}
FUNCTIONS["sigmoid"] = sigmoid
# A constraint between two options, "min_val <= max_val", and how to test it at the defaults
CONSTRAINT = re.compile(r"\s*(\w+)\s*(<=|<|>=|>)\s*(\w+)\s*")
COMPARISONS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}


class DeclarationError(ValueError):
    """A declaration that cannot become an operation; the message names the operation."""


def parse(name, text, variables):
    """text as a SymPy expression over the given {name: symbol}, refusing anything else."""
    if isinstance(text, sp.Basic):
        expr = text
    else:
        try:
            expr = parse_expr(text, local_dict={**FUNCTIONS, **variables}, global_dict={
                "Integer": sp.Integer, "Float": sp.Float, "Rational": sp.Rational, "Symbol": sp.Symbol,
                "Function": sp.Function}, transformations=(auto_symbol, auto_number))
        except (SyntaxError, TypeError, ValueError, TokenError, AttributeError) as error:
            raise DeclarationError(f"{name}: cannot parse {text!r}: {error}") from None
    if not isinstance(expr, sp.Expr):
        raise DeclarationError(f"{name}: {text!r} is not an expression")
    unknown_functions = sorted({str(f.func) for f in expr.atoms(AppliedUndef)})
    if unknown_functions:
        raise DeclarationError(f"{name}: unknown function {', '.join(unknown_functions)} in {text!r}; "
                               f"known: {', '.join(sorted(FUNCTIONS))}")
    unknown = sorted(str(s) for s in expr.free_symbols if s not in set(variables.values()))
    if unknown:
        raise DeclarationError(f"{name}: unknown symbol {', '.join(unknown)} in {text!r}; declare it in params "
                               f"or use {', '.join(variables)}")
    return expr


def check_name(name):
    """Refuse a name that cannot be a Python class name."""
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
        raise DeclarationError(f"{name!r} is not a valid Python identifier, so it cannot name a class")
    if not name[0].isupper():
        raise DeclarationError(f"{name!r}: operation names are class names and start with a capital letter")


def differentiable(name, expr, wrt):
    """Refuse an expression that does not read wrt (a constant has nothing to differentiate, and its
    kernels would return a number where an array of x's shape is due) or whose derivative SymPy
    cannot write down."""
    if wrt not in expr.free_symbols:
        raise DeclarationError(f"{name}: {expr} does not depend on {wrt}: nothing to differentiate")
    derivative = sp.diff(expr, wrt)
    if derivative.has(sp.Derivative) or derivative.has(sp.Subs):
        raise DeclarationError(f"{name}: SymPy finds no derivative of {expr} in {wrt}: {derivative}")


def declared_params(name, params):
    """Params of the options {name: default or (default, range)}, a range as derive.ops.Range.of reads it
    ("> 0", "[0, 1]"; none: any finite number); each option's symbol is its name."""
    return tuple(declared_param(name, option, value) for option, value in params.items())


def declared_param(name, option, value, role="parameter"):
    """The Param of one option of the operation name, value its default or (default, range); role names
    what the declaration calls it in an error."""
    check_name(option.capitalize())
    default, text = value if isinstance(value, tuple) and len(value) == 2 else (value, None)
    if isinstance(default, bool) or not isinstance(default, (int, float)) or not math.isfinite(default):
        raise DeclarationError(f"{name}: {role} {option} needs a finite number as default, got {value!r}")
    try:
        bounds = Range() if text is None else Range.of(text)
    except ValueError as error:
        raise DeclarationError(f"{name}: {role} {option}: {error}") from None
    if default not in bounds:
        raise DeclarationError(f"{name}: {role} {option}'s default {default} is outside its range {text!r}")
    return Param(option, sp.Symbol(option, real=True), float(default), example=example(float(default), bounds),
                 range=bounds)


def example(default, bounds):
    """A value other than default within bounds, for the tests: 0.7 times it where that is inside."""
    near = [float(f"{scale * default:.6g}") for scale in (0.7, 1.3)] if default else [0.3, -0.3]
    halfway = [(default + end) / 2 for end in bounds[:2] if math.isfinite(end)]
    return next(value for value in near + halfway if value != default and value in bounds)


def declared_constraints(name, constraints, params):
    """Constraints "a <= b" (<, <=, >, >=) between two of params as (a, relation, b), refusing one that
    reads anything else or that the defaults break."""
    defaults = {param.name: param.default for param in params}
    declared = []
    for text in (constraints,) if isinstance(constraints, str) else constraints:
        match = CONSTRAINT.fullmatch(text) if isinstance(text, str) else None
        if match is None or match[1] == match[3] or not {match[1], match[3]} <= defaults.keys():
            raise DeclarationError(f"{name}: constraint {text!r} is not a comparison 'a <= b' (<, <=, >, >=) "
                                   f"between two of its parameters ({', '.join(defaults) or 'it has none'})")
        left, relation, right = match.groups()
        if not COMPARISONS[relation](defaults[left], defaults[right]):
            raise DeclarationError(f"{name}: the defaults {left}={defaults[left]}, {right}={defaults[right]} "
                                   f"break constraint {text!r}")
        declared.append((left, relation, right))
    return tuple(declared)


def activation(name, expr, *, params=None, constraints=(), summary=None, saves_output=False, domain=(-3.0, 3.0),
               tol=1e-6):
    """An element-wise layer y = expr(x); saves_output when backward is best written with y; constraints
    between params as declared_constraints reads them."""
    check_name(name)
    params = declared_params(name, params or {})
    scalar = sp.Symbol("x", real=True)
    forward = parse(name, expr, {"x": scalar, **{p.name: p.symbol for p in params}})
    differentiable(name, forward, scalar)
    forward = forward.subs(scalar, x[i])
    return Op(name=name, kind="layer", summary=summary or f"{sp.sstr(forward.subs(x[i], sp.Symbol('x')))}, element-wise",
              source=f"derive.declare.activation ({name})", forward=forward,
              saved=((y, forward),) if saves_output else (), params=params,
              constraints=declared_constraints(name, constraints, params), domain=domain, tol=tol)


def elementwise_loss(name, expr, *, params=None, constraints=(), summary=None, domain=(-3.0, 3.0), tol=1e-6):
    """A loss of each element, expr(x, t), against a target of x's shape, reduced as PyTorch reduces."""
    check_name(name)
    params = declared_params(name, params or {})
    scalars = {"x": sp.Symbol("x", real=True), "t": sp.Symbol("t", real=True)}
    loss = parse(name, expr, {**scalars, **{p.name: p.symbol for p in params}})
    differentiable(name, loss, scalars["x"])
    loss = loss.subs({scalars["x"]: x[i], scalars["t"]: t[i]})
    return Op(name=name, kind="loss", summary=summary or f"{expr}, element-wise",
              source=f"derive.declare.elementwise_loss ({name})", forward=loss, targets=("dense",),
              granularity="element", params=params, constraints=declared_constraints(name, constraints, params),
              domain=domain, tol=tol)


def load_ops(path):
    """The OPS list of a user's declaration file."""
    spec = importlib.util.spec_from_file_location(f"symgrad_user_ops_{abs(hash(str(path)))}", path)
    if spec is None:
        raise DeclarationError(f"{path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ops = getattr(module, "OPS", None)
    if not isinstance(ops, (list, tuple)) or not all(isinstance(op, (Op, TensorOp)) for op in ops):
        raise DeclarationError(f"{path}: defines no OPS list of declarations (activation(...), elementwise_loss(...), "
                               f"tensor_op(...), tensor_loss(...))")
    return tuple(ops)


def declaration_source(name, expr):
    """The line that declares an element-wise activation, for `symgrad new` (checked before it is printed)."""
    activation(name, expr)
    return f"activation({name!r}, {expr!r})"


DECLARATION_FILE = '''"""Operations of my own, for symgrad codegen --ops THIS_FILE --out DIR."""
from derive.declare import activation, elementwise_loss

OPS = [
]
'''


def add_declaration(text, line):
    """A declaration file's text with line added to its OPS list (a new file's text if text is None)."""
    lines = (text or DECLARATION_FILE).splitlines()
    closing = max((number for number, content in enumerate(lines) if content.strip() == "]"), default=None)
    if closing is None:
        raise DeclarationError("cannot find the closing ] of the OPS list to add the declaration to")
    return "\n".join(lines[:closing] + [f"    {line},"] + lines[closing:]) + "\n"


def expression(text, wrt="x"):
    """(expr, wrt's symbol) of text for symgrad derive --expr: parsed as a declaration is, with the same
    functions, and every other name a real constant (beta, gamma: not SymPy's functions of those names)."""
    import io
    import tokenize
    if not wrt.isidentifier() or keyword.iskeyword(wrt) or wrt in FUNCTIONS:
        raise DeclarationError(f"--wrt {wrt!r}: not a variable's name")
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (TokenError, SyntaxError) as error:
        raise DeclarationError(f"--expr: cannot parse {text!r}: {error}") from None
    # a name before ( is a call: left to parse, which refuses it unless FUNCTIONS has it
    called = {name.string for name, after in zip(tokens, tokens[1:]) if after.string == "("}
    names = {token.string for token in tokens if token.type == tokenize.NAME} - called - set(FUNCTIONS)
    symbols = {name: sp.Symbol(name, real=True) for name in {*names, wrt} - set(keyword.kwlist)}
    expr = parse("--expr", text, symbols)
    differentiable("--expr", expr, symbols[wrt])
    return expr, symbols[wrt]


# Index-notation declarations (derive.tensor imports this module's FUNCTIONS and errors when called, so last)
from derive.tensor import TensorOp, size_of, substituted, tensor_loss, tensor_op  # noqa: E402,F401


def row_layer(op):
    """The layer of a TensorOp whose steps read one input x[n, k] a row at a time (no params, every Sum
    over the last axis), as an Op of one row: the form whose kernels, NumPy and fused, work a row at a
    time and whose backward may read the saved output y. Its steps are inlined into one expression in
    the row's entries x[i], each Sum's index m over 0..K-1 (derive.symbols' naming contract)."""
    form = row_form(op, "layer", "row")
    if form.flags:
        raise DeclarationError(f"{op.name}: a row layer has no flags (a tensor_op takes them)")
    return Op(name=op.name, kind="layer", summary=op.summary, source=f"derive.declare.row_layer ({op.name})",
              forward=form.expr, saved=((y, form.expr),), params=form.options, domain=op.domain, tol=op.tol)


def row_loss(op, *, labels=False, ignore_index=None, target_range=(None, None), weighted_mean=True):
    """The loss of a TensorOp whose steps read one input x[n, k] a row at a time (no params, every Sum over
    the last axis) against an integer label c[n] or a dense target t[n, k], as an Op of one row: the form
    whose kernels, NumPy and fused, work a row at a time. PyTorch's options of a loss over classes:
    labels, integer labels taken for the dense target too (t one-hot); ignore_index, the label whose rows
    count 0 (None: no such option); target_range, (low, high) a dense target's entries must lie in. A weight
    over the classes (weights={"weight": "k"}) is an optional array, ones by default; under a mean each
    row counts with the weight of its label, as in PyTorch, or with 1 where weighted_mean is False (a focal
    loss's alpha, which scales each row's loss and leaves the mean over rows)."""
    form = row_form(op, "loss", "row")
    if labels and not form.dense:
        raise DeclarationError(f"{op.name}: labels=True takes integer labels for a dense target t[n, k]; it has none")
    params, expr, takes_labels = form.weights, form.expr, labels or not form.dense
    if ignore_index is not None:   # PyTorch's order: weight, ignore_index, then the scalar options
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int) or not takes_labels:
            raise DeclarationError(f"{op.name}: ignore_index is an integer label of a loss that takes labels, got "
                                   f"{ignore_index!r}")
        params += (Param("ignore_index", mask, ignore_index, neutral=1, kind="ignore_index"),)
        expr = mask * expr
    params += form.options + form.flags
    # PyTorch's mean over labelled rows: each row counts with its label's class weight, an ignored row with 0
    counted = sp.Mul(*(p.symbol[c] for p in params if p.kind == "class_weights" and weighted_mean),
                     *[mask] * (ignore_index is not None))
    targets = ("labels", "dense") if labels else ("dense",) if form.dense else ("labels",)
    return Op(name=op.name, kind="loss", summary=op.summary, source=f"derive.declare.row_loss ({op.name})",
              forward=expr, saved=form.saved, targets=targets, params=params, domain=op.domain, tol=op.tol,
              target_range=target_range, mean_weight={"labels": counted} if takes_labels and counted != 1 else {},
              means=form.means)


def element_loss(op, *, target_range=(None, None)):
    """The loss of each entry L[n, k] of a TensorOp whose steps read x[n, k] and a dense target t[n, k] entry by
    entry (no Sum, no params), as an element-wise Op in x[i] and t[i]. A weight over x's axes (weights=
    {"weight": "n k"}) and one over its last axis ({"pos_weight": "k"}) are optional arrays, ones by default,
    as PyTorch's weight and pos_weight."""
    form = row_form(op, "loss", "element")
    return Op(name=op.name, kind="loss", summary=op.summary, source=f"derive.declare.element_loss ({op.name})",
              forward=form.expr, saved=form.saved, targets=("dense",), granularity="element",
              params=form.weights + form.options + form.flags,
              domain=op.domain, tol=op.tol, target_range=target_range, means=form.means)


class RowForm(NamedTuple):
    """A TensorOp as one row's (or one entry's) expression: its forward, the intermediates over a row's
    entries that backward may read, its weights and options as Params, whether it reads a dense target."""

    expr: sp.Expr
    saved: tuple
    weights: tuple                 # Params of kind class_weights or element_weights
    options: tuple                 # Params of kind scalar
    dense: bool
    flags: tuple = ()              # Params of kind flag: each setting its own kernels (derive.gradients.variants)
    means: dict = None             # {reduction: x's axes}: a loss's further means (Op.means)


def row_form(op, kind, granularity):
    """The RowForm of a TensorOp of kind that works a row at a time (granularity "row": every Sum over the last
    axis) or an entry at a time ("element": no Sum), in derive.symbols' naming contract: its steps inlined,
    x[n, j] read as x[j], a dense target t[n, j] as t[j], a label c[n] as c, a weight over x's axes as w[j]
    and one over the last axis as w[j] (pw[j] beside the other), the output's last index as i, and each
    Sum over the classes indexed by its depth, k then m for a loss, m for a layer. Anything else is
    refused, naming the operation."""
    (name, (row, axis)), = op.inputs.items() if len(op.inputs) == 1 and len(next(iter(op.inputs.values()))) == 2 \
        else ((None, (None, None)),)
    weights = op.weights or {}
    labels = [t for t, axes in op.targets.items() if t in op.labels and axes == (row,)]
    dense = [t for t, axes in op.targets.items() if t not in op.labels and axes == (row, axis)]
    entries = [w for w, axes in weights.items() if axes == (row, axis)]
    classes = [w for w, axes in weights.items() if axes == (axis,)]
    element = granularity == "element"
    what = f"{'an element' if element else 'a row'} {kind}"
    allowed = ("no targets or weights" if kind == "layer" else
               "one dense target t[n, k], at most one weight over x's axes and one over its last" if element else
               "one integer label c[n] or dense target t[n, k], at most one weight over the classes")
    if (op.kind != kind or name is None or op.params or op.sizes or op.penalty is not None
            or (kind == "layer" and (op.targets or weights)) or len(op.targets) > 1
            or len(labels) + len(dense) < len(op.targets) or (element and not dense)
            or len(entries) + len(classes) < len(weights) or len(entries) > element or len(classes) > 1):
        raise DeclarationError(f"{op.name}: {what} has one input over two axes, no params, sizes or penalty, and "
                               f"{allowed}")
    output = (row, axis) if kind == "layer" or element else (row,)
    if op.steps[-1].indices != output:
        raise DeclarationError(f"{op.name}: {what}'s output is {op.steps[-1].name}[{', '.join(map(str, output))}]")
    contract = {name: x, **{target: t for target in dense}, **{weight: w for weight in entries},
                **{weight: pw if entries else w for weight in classes}}
    inlined = written_out(op.steps)

    def entry(expr, depth):
        return one_entry(op, expr, row, axis, labels, contract, kind, what, depth)
    expr = entry(inlined[op.steps[-1].name].expr, 0)
    if element and expr.has(sp.Sum):
        raise DeclarationError(f"{op.name}: {what} sums over nothing")
    # what backward may read: each intermediate over a row's entries that the output reads (a softmax p[n, k]),
    # its Sums named as they are where the output reads it (inside a Sum over the classes, or not)
    saved = tuple((sp.IndexedBase(s.name, real=True), entry(inlined[s.name].expr, depth))
                  for s in op.steps[:-1] if s.indices == (row, axis)
                  for depth in [read_depth(written_out(op.steps, keep=s.name)[op.steps[-1].name].expr, s.name)]
                  if depth is not None)
    options = tuple(
        # the plain kernel at the default, where the default makes the forward shorter (label smoothing 0)
        replace(p, neutral=p.default) if sp.count_ops(expr.subs(p.symbol, p.default)) < sp.count_ops(expr) else p
        for p in (Param(o, sp.Symbol(o, real=True), v, example=example(v, op.ranges[o]), range=op.ranges[o])
                  for o, v in op.options.items()))
    weighting = tuple(Param(name, contract[name], None, neutral=1,
                            kind="element_weights" if name in entries else "class_weights") for name in weights)
    flags = tuple(Param(f, sp.Symbol(f), bool(v), kind="flag") for f, v in (op.flags or {}).items())
    return RowForm(expr, saved, weighting, options, bool(dense), flags, means_on_axes(op, output, what))


def means_on_axes(op, output, what):
    """{reduction: axes of x} of a TensorOp's further means (derive.tensor.loss_means), each divisor a product of
    distinct sizes of the output's axes: its first axis is x's first (the batch), its last x's last (the
    classes), as the row and element kernels read x of any shape."""
    found = {}
    for reduction, divisor in (op.means or {}).items():
        factors = sp.Mul.make_args(divisor)
        axes = [0 if f == size_of(output[0]) else -1 if f == size_of(output[-1]) else None for f in factors]
        if None in axes or len(set(axes)) < len(axes):
            raise DeclarationError(f"{op.name}: {what}'s mean {reduction} divides by a product of the sizes of its "
                                   f"first and last axes, not {divisor}")
        found[reduction] = tuple(sorted(axes, reverse=True))
    return found


def written_out(steps, keep=None):
    """{name: step} with the intermediates each reads written out (each Sum's own index left alone), but keep."""
    inlined = {}
    for step in steps:
        inlined[step.name] = step._replace(expr=step.expr.replace(
            lambda e: isinstance(e, sp.Indexed) and e.base.name in inlined and e.base.name != keep,
            lambda e: substituted(inlined[e.base.name].expr, dict(zip(inlined[e.base.name].indices, e.indices)))))
    return inlined


def read_depth(expr, name):
    """How many Sums enclose the first read of array name in expr (None: it is not read)."""
    if isinstance(expr, sp.Indexed):
        return 0 if expr.base.name == name else None
    if isinstance(expr, sp.Sum):
        inner = read_depth(expr.function, name)
        return None if inner is None else inner + 1
    return min((d for d in (read_depth(arg, name) for arg in expr.args) if d is not None), default=None)


def one_entry(op, expr, row, axis, labels, contract, kind, what, depth):
    """expr, over the arrays of contract at row alone, as one row's: each array {name: its contract base} read
    at its last index, a label as c, the free axis as i, each Sum over the classes indexed by its depth
    (k, then m, for a loss; m for a layer) from depth on."""
    names = (k, m) if kind == "loss" else (m,)
    levels = {}   # {depth: its Sums' index}, a Dummy until the free axis is i

    def renamed(e, level):
        if isinstance(e, sp.Sum):
            (index, low, high), = e.limits if len(e.limits) == 1 else ((None, None, None),)
            if index != axis:
                raise DeclarationError(f"{op.name}: {what} sums over its last axis {axis} alone")
            name = levels.setdefault(level, sp.Dummy(str(axis), integer=True))
            body = renamed(e.function, level + 1).xreplace({index: name})
            return sp.Sum(body, (name, low, high.xreplace({size_of(axis): K})))
        if isinstance(e, sp.Indexed) or not e.args:
            return e
        return e.func(*(renamed(arg, level) for arg in e.args))
    expr = renamed(expr, depth).xreplace({sp.IndexedBase(t, real=True)[row]: c for t in labels})
    misread = [e for e in expr.atoms(sp.Indexed) if e.base.name not in contract or (
        e.indices[:-1] != ((row,) if len(op.inputs.get(e.base.name) or op.targets.get(e.base.name)
                                        or op.weights[e.base.name]) == 2 else ()))]
    if misread:
        raise DeclarationError(f"{op.name}: {what} reads its arrays at its row {row} alone, not {misread[0]}")
    expr = expr.replace(lambda e: isinstance(e, sp.Indexed), lambda e: contract[e.base.name][e.indices[-1]])
    return expr.xreplace({axis: i}).xreplace({levels[level]: names[level] for level in levels if level < len(names)})
