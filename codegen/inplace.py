"""Reusing buffers: a kernel line whose result has the input's full shape writes into a temporary
that no later line reads (ufunc out=), instead of allocating a new array. This is what hand-tuned
NumPy does; it saves an allocation and its page faults per line, not arithmetic."""
import sympy as sp
from sympy.codegen.cfunctions import expm1, log1p

from codegen.lower import AtLabel, AxisSum, BatchSum, Column, LabelEntry, MatMul, RowMax, RowSum, Squeeze, Transpose
from codegen.printer import print_code

UNARY = {sp.exp: "exp", sp.log: "log", sp.tanh: "tanh", log1p: "log1p", expm1: "expm1"}
# these produce an array smaller than the input (a column, a scalar), one of another shape, or a view
NARROWING = (RowSum, RowMax, BatchSum, AxisSum, AtLabel, LabelEntry, Column, Squeeze, MatMul, Transpose)


def is_full(expr, full):
    """Whether expr has the input's full shape: it reads a full array outside any narrowing function."""
    if isinstance(expr, sp.Symbol):
        return expr.name in full
    if isinstance(expr, NARROWING):
        return False
    return any(is_full(arg, full) for arg in expr.args)


def assignments_in_place(assignments, later, full):
    """[(lhs, code)] for [(lhs, expr)], writing into dead full-size temporaries where it can; later are
    expressions read after these lines (returned names, the label update)."""
    full = set(full)
    lines = []
    for position, (lhs, expr) in enumerate(assignments):
        rest = [e for _, e in assignments[position + 1:]] + list(later)
        dead = lambda s: (isinstance(s, sp.Symbol) and s.name.startswith("v") and s.name in full  # noqa: E731
                          and not any(s in e.free_symbols for e in rest))
        if is_full(expr, full) and not isinstance(expr, sp.logic.boolalg.Boolean):
            full.add(lhs.name)  # a float buffer of the input's shape (a mask is bool: never an out=)
        lines += _in_place(lhs, expr, dead, full)
    return lines


def _in_place(lhs, expr, dead, full):
    """The lines computing lhs = expr, in place where an operand's buffer is free."""
    if type(expr) in UNARY and not isinstance(expr.args[0], sp.Symbol) and is_full(expr.args[0], full):
        # the argument is a fresh array of full size: apply the function over it
        return [(lhs, print_code(expr.args[0])), (lhs, f"np.{UNARY[type(expr)]}({lhs}, out={lhs})")]
    operation = _binary(expr)
    if operation:
        name, left, right = operation
        if name == "divide" and is_full(left, full) and not is_full(right, full):
            # a full array over a column: one reciprocal per row, then a product, which is faster
            name, right = "multiply", 1 / right
        for operand in (left, right):
            if dead(operand):
                return [(lhs, f"np.{name}({print_code(left)}, {print_code(right)}, out={operand})")]
    return [(lhs, print_code(expr))]


def _binary(expr):
    """(ufunc, left, right) for a product, quotient or sum of exactly two terms, else None."""
    if isinstance(expr, sp.Mul) and len(expr.args) == 2:
        left, right = expr.args
        if isinstance(right, sp.Pow) and right.exp == -1:
            return "divide", left, right.base
        if isinstance(left, sp.Pow) and left.exp == -1:
            return "divide", right, left.base
        return "multiply", left, right
    if isinstance(expr, sp.Add) and len(expr.args) == 2:
        return "add", *expr.args
    return None
