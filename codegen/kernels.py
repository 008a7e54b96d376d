"""From a catalog entry to the kernels of its generated module: which derivation each output
comes from, lowered to arrays, with common subexpressions shared and printed as NumPy."""
from dataclasses import dataclass

import sympy as sp

from codegen.lower import AtLabel, Squeeze, lower, split_at_label
from codegen.printer import print_code
from derive.gradients import TARGETS, layer_backward, loss_forward, loss_gradient
from derive.reduction import REDUCTIONS, row_weight
from derive.stability import stable
from derive.symbols import g, i, j, n, r

# Kernel arguments in the order a reader expects them; names are those of derive.symbols.
ARG_ORDER = ("x", "c", "t", "y", "p", "g")


@dataclass(frozen=True)
class Kernel:
    """A function of the generated module: outputs computed from its arguments."""

    name: str
    doc: str
    derivation: str                # the index-notation result it prints, for the reader
    outputs: tuple                 # ((name, array expression), ...) in return order
    at_label: sp.Expr = None       # added to outputs[0] at each row's label, if any


def layer_kernels(op):
    """forward(x) -> y and backward(saved, g) -> dx of a layer."""
    backward = layer_backward(op)
    return (Kernel("forward", f"y = {op.summary}.", f"y_i = {sp.sstr(op.forward)}",
                   (("y", lower(stable(op.forward), i)),)),
            Kernel("backward", "dx = g times the Jacobian of y (a vector-Jacobian product).",
                   f"dx_j = {sp.sstr(backward)}", (("dx", lower(backward, j)),)))


def loss_kernels(op):
    """forward_<target>(x, target) -> (L, saved...) and backward_<target>(saved, g) -> dx."""
    kernels = []
    for target in TARGETS:
        loss = loss_forward(op, target)
        saved = tuple((base.name, lower(stable(definition), i)) for base, definition in op.saved)
        kernels.append(Kernel(f"forward_{target}", f"Per-sample loss L and saved quantities, {target}.",
                              f"L = {sp.sstr(loss)}", (("L", Squeeze(lower(stable(loss), j))),) + saved))
        gradient = g * loss_gradient(op, target)
        dense, at_label = split_at_label(gradient, j) if target == "labels" else (gradient, None)
        kernels.append(Kernel(f"backward_{target}", f"dL/dx with row weight g, {target}.",
                              f"dx_j = {sp.sstr(gradient)}", (("dx", lower(dense, j)),),
                              None if at_label is None else lower(at_label, j)))
    return tuple(kernels)


def reductions():
    """[{name, value, weight}]: the batch loss from L and each row's weight g, printed."""
    return [{"name": name, "value": print_code(lower(reduced, n)),
             "weight": print_code(lower(row_weight(reduced), r, column=True))}
            for name, reduced in REDUCTIONS.items()]


def kernel_code(kernel):
    """The printable form of a kernel: arguments, assignment lines, scatter and returns."""
    exprs = [expr for _, expr in kernel.outputs] + ([kernel.at_label] if kernel.at_label is not None else [])
    temporaries, reduced = sp.cse(exprs, symbols=sp.numbered_symbols("v"), order="canonical")
    names = [name for name, _ in kernel.outputs]
    lines = [(str(lhs), print_code(rhs)) for lhs, rhs in temporaries]
    lines += [(name, print_code(expr)) for name, expr in zip(names, reduced)]
    uses_label = kernel.at_label is not None or any(e.has(AtLabel) for e in exprs)
    return {"name": kernel.name, "doc": kernel.doc, "derivation": kernel.derivation,
            "args": arguments(exprs, uses_label), "lines": lines, "uses_label": uses_label,
            "at_label": None if kernel.at_label is None else print_code(reduced[-1]),
            "returns": names}


def arguments(exprs, uses_label):
    """The free arrays of exprs in ARG_ORDER, with the label c when a row's label is used."""
    free = {s.name for e in exprs for s in e.free_symbols} | ({"c"} if uses_label else set())
    unknown = free - set(ARG_ORDER)
    if unknown:
        raise ValueError(f"kernel uses names outside the naming contract: {sorted(unknown)}")
    return [name for name in ARG_ORDER if name in free]
