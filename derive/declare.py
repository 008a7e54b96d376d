"""Declaring an operation: the one mechanism the built-in catalog and users' own files share.

    from derive.declare import activation, elementwise_loss
    OPS = [activation("Swish", "x*sigmoid(x)"),
           activation("ELU", "Piecewise((x, x > 0), (alpha*(exp(x) - 1), True))", params={"alpha": 1.0})]

An expression is SymPy source in x (and t for a loss) and the parameters; each becomes an Op of
derive.catalog, derived, generated and verified like every built-in one."""
import importlib.util
import keyword

import sympy as sp
from sympy.core.function import AppliedUndef
from tokenize import TokenError

from sympy.parsing.sympy_parser import auto_number, auto_symbol, parse_expr

from derive.functions import sigmoid
from derive.ops import Op, Param
from derive.symbols import i, t, x, y

# The functions an expression may use, by the names it uses them under.
FUNCTIONS = {name: getattr(sp, name) for name in ("exp", "log", "sqrt", "tanh", "sinh", "cosh", "atan", "erf",
                                                 "Abs", "sign", "Max", "Min", "Piecewise", "pi", "E")}
FUNCTIONS["sigmoid"] = sigmoid


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
        except (SyntaxError, TypeError, ValueError, TokenError) as error:
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
    """Params of the options {name: default}; each option's symbol is its name."""
    for option, default in params.items():
        check_name(option.capitalize())
        if not isinstance(default, (int, float)):
            raise DeclarationError(f"{name}: parameter {option} needs a number as default, got {default!r}")
    return tuple(Param(option, sp.Symbol(option, real=True), float(default),
                       example=round(0.7 * default, 6) if default else 0.3) for option, default in params.items())


def activation(name, expr, *, params=None, summary=None, saves_output=False, domain=(-3.0, 3.0), tol=1e-6):
    """An element-wise layer y = expr(x); saves_output when backward is best written with y."""
    check_name(name)
    params = declared_params(name, params or {})
    scalar = sp.Symbol("x", real=True)
    forward = parse(name, expr, {"x": scalar, **{p.name: p.symbol for p in params}})
    differentiable(name, forward, scalar)
    forward = forward.subs(scalar, x[i])
    return Op(name=name, kind="layer", summary=summary or f"{sp.sstr(forward.subs(x[i], sp.Symbol('x')))}, element-wise",
              source=f"derive.declare.activation ({name})", forward=forward,
              saved=((y, forward),) if saves_output else (), params=params, domain=domain, tol=tol)


def elementwise_loss(name, expr, *, params=None, summary=None, domain=(-3.0, 3.0), tol=1e-6):
    """A loss of each element, expr(x, t), against a target of x's shape, reduced as PyTorch reduces."""
    check_name(name)
    params = declared_params(name, params or {})
    scalars = {"x": sp.Symbol("x", real=True), "t": sp.Symbol("t", real=True)}
    loss = parse(name, expr, {**scalars, **{p.name: p.symbol for p in params}})
    differentiable(name, loss, scalars["x"])
    loss = loss.subs({scalars["x"]: x[i], scalars["t"]: t[i]})
    return Op(name=name, kind="loss", summary=summary or f"{expr}, element-wise",
              source=f"derive.declare.elementwise_loss ({name})", forward=loss, targets=("dense",),
              granularity="element", params=params, domain=domain, tol=tol)


def load_ops(path):
    """The OPS list of a user's declaration file."""
    spec = importlib.util.spec_from_file_location(f"symgrad_user_ops_{abs(hash(str(path)))}", path)
    if spec is None:
        raise DeclarationError(f"{path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    ops = getattr(module, "OPS", None)
    if not isinstance(ops, (list, tuple)) or not all(isinstance(op, Op) for op in ops):
        raise DeclarationError(f"{path}: defines no OPS list of declarations (activation(...), elementwise_loss(...))")
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
