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

import sympy as sp
from sympy.core.function import AppliedUndef
from tokenize import TokenError

from sympy.parsing.sympy_parser import auto_number, auto_symbol, parse_expr

from derive.functions import sigmoid
from derive.ops import Op, Param, Range
from derive.symbols import K, c, i, k, m, t, x, y

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
from derive.tensor import TensorOp, size_of, tensor_loss, tensor_op  # noqa: E402,F401


def row_layer(op):
    """The layer of a TensorOp whose steps read one input x[n, k] a row at a time (no params, every Sum
    over the last axis), as an Op of one row: the form whose kernels, NumPy and fused, work a row at a
    time and whose backward may read the saved output y. Its steps are inlined into one expression in
    the row's entries x[i], each Sum's index m over 0..K-1 (derive.symbols' naming contract)."""
    expr, params = row_form(op, "layer", m)
    return Op(name=op.name, kind="layer", summary=op.summary, source=f"derive.declare.row_layer ({op.name})",
              forward=expr, saved=((y, expr),), params=params, domain=op.domain, tol=op.tol)


def row_loss(op):
    """The loss of a TensorOp whose steps read one input x[n, k] a row at a time against an integer label
    c[n] (no params, every Sum over the last axis), as an Op of one row, its Sum's index k and its label
    c (derive.symbols' naming contract): the form whose kernels, NumPy and fused, work a row at a time."""
    expr, params = row_form(op, "loss", k)
    return Op(name=op.name, kind="loss", summary=op.summary, source=f"derive.declare.row_loss ({op.name})",
              forward=expr, targets=("labels",), params=params, domain=op.domain, tol=op.tol)


def row_form(op, kind, first):
    """(forward of one row, params of the options) of a TensorOp of kind that works a row at a time: its
    steps inlined, each Sum's index first (a second one a Dummy), x[n, j] read as x[j], a label c[n] as c
    and the output's last index (a layer's) as i; anything else refused, naming the operation."""
    (name, (row, axis)), = op.inputs.items() if len(op.inputs) == 1 and len(next(iter(op.inputs.values()))) == 2 \
        else ((None, (None, None)),)
    labels = [t for t, axes in op.targets.items() if t in op.labels and axes == (row,)]
    if (op.kind != kind or name is None or op.params or op.sizes
            or (op.targets and (kind == "layer" or len(op.targets) > 1 or not labels))):
        with_targets = "targets" if kind == "layer" else "targets but one integer label per row"
        raise DeclarationError(f"{op.name}: a row {kind} has one input over two axes, and no params, sizes or "
                               f"{with_targets}")
    expr = op.steps[-1].expr
    for step in reversed(op.steps[:-1]):  # inline each intermediate where it is read
        expr = expr.replace(lambda e: isinstance(e, sp.Indexed) and e.base.name == step.name,
                            lambda e, step=step: step.expr.xreplace(dict(zip(step.indices, e.indices))))
    bounds = []

    def bound(total):  # each sum over the last axis, its index a Dummy until the free axis is i
        (index, low, high), = total.limits if len(total.limits) == 1 else ((None, None, None),)
        if index != axis:
            raise DeclarationError(f"{op.name}: a row {kind} sums over its last axis {axis} alone")
        bounds.append(sp.Dummy(str(first), integer=True))
        return sp.Sum(total.function.xreplace({index: bounds[-1]}), (bounds[-1], low, high.xreplace({size_of(axis): K})))
    expr = expr.replace(lambda e: isinstance(e, sp.Sum), bound).xreplace({sp.IndexedBase(t, real=True)[row]: c
                                                                          for t in labels})
    output = (row, axis) if kind == "layer" else (row,)
    if op.steps[-1].indices != output or any(e.base.name != name or e.indices[0] != row
                                             for e in expr.atoms(sp.Indexed)):
        raise DeclarationError(f"{op.name}: a row {kind}'s output is {op.steps[-1].name}[{', '.join(map(str, output))}]"
                               f" and it reads x[{row}, ...] alone")
    expr = expr.replace(lambda e: isinstance(e, sp.Indexed), lambda e: x[e.indices[1]]).xreplace({axis: i})
    expr = expr.xreplace({bounds[0]: first}) if bounds else expr  # the first sum's index first, others Dummies
    params = declared_params(op.name, op.options)
    return expr.xreplace({sp.Symbol(p.name, real=True): p.symbol for p in params}), params
