"""symgrad explain: one operation at every stage of the generator, in pipeline order, each stage's plain
object under its heading: declaration -> derivation -> array program -> kernel source. Each stage is
called as codegen calls it, and nothing is changed or written."""
import dataclasses

import sympy as sp
from sympy.printing.str import StrPrinter

from codegen.kernels import kernel_assignments, kernel_code, layer_kernels, loss_kernels
from codegen.render import environment
from codegen.stages import in_stage
from codegen.tensor_lower import lowered, names_of, program_of, rewritten
from derive.derivation_tensor import tensor_derivation
from derive.derivations import entry_derivations
from derive.gradients import variants
from derive.tensor import TensorOp

STAGES = ("declaration", "derivation", "array program", "kernel source")


class ProgramPrinter(StrPrinter):
    """SymPy's str, with codegen.tensor_lower's MatMul printed as the function it is (StrPrinter takes it for
    a product of matrices by its name)."""

    def _print_MatMul(self, expr):
        return self._print_Function(expr)


def program(expr):
    return ProgramPrinter().doprint(expr)


def explanation(op):
    """The text of symgrad explain: each of STAGES under a heading, its objects printed as SymPy prints them."""
    stages = tensor_stages(op) if isinstance(op, TensorOp) else elementwise_stages(op)
    return "\n\n".join(f"== {number}. {stage}: {source} ==\n{text}"
                       for number, (stage, (source, text)) in enumerate(zip(STAGES, stages), 1))


def tensor_stages(op):
    """[(where it comes from, text)] of each stage of an index-notation operation."""
    with in_stage(op.name, "deriving it"):
        derived = steps_text(tensor_derivation(op))
    with in_stage(op.name, "rewriting and lowering its derivation"):
        program = rewritten(program_of(op), names_of(op))
        functions = lowered(op)
    stable = (f"stable forms, after {', '.join(program.rewrites) or 'no rewrite'}:\n"
              + "\n".join(f"  {a}" for a in (*program.forward, *program.backward)))
    statements = "\n\n".join(
        f"{f.name}({', '.join(f.args)}) -> {', '.join(f.returns)}\n" + "\n".join(
            f"  {line}" for line in f.lines(ProgramPrinter())) for f in functions)
    return [(f"{type(op).__module__}.{type(op).__name__}", declaration(op)),
            ("derive.derivation_tensor.tensor_derivation, codegen.tensor_lower.rewritten", f"{derived}\n\n{stable}"),
            ("codegen.tensor_lower.lowered: statements", statements),
            ("codegen.tensor_lower.TensorPrinter", "\n\n".join(map(str, functions)))]


def elementwise_stages(op):
    """[(where it comes from, text)] of each stage of an element-wise (or catalog) operation."""
    with in_stage(op.name, "deriving it"):
        derived = "\n\n".join(steps_text(build()) for build in entry_derivations(op).values())
    with in_stage(op.name, "deriving and printing its NumPy kernels"):
        kernels = kernels_of(op)
        function = environment().get_template("kernel.py.jinja").module.function
        source = "\n\n".join(str(function(kernel_code(k))) for k in kernels)
    return [(f"{type(op).__module__}.{type(op).__name__}", declaration(op)),
            ("derive.derivations.entry_derivations", derived),
            ("codegen.kernels.Kernel outputs and kernel_assignments", "\n\n".join(map(kernel_text, kernels))),
            ("templates/kernel.py.jinja", source)]


def kernels_of(op):
    """The NumPy kernels of an element-wise op's module, as codegen.render makes them."""
    if op.kind == "layer":
        return layer_kernels(op)
    return [k for target in op.targets for variant in variants(op, target) for k in loss_kernels(op, target, variant)]


def declaration(op):
    """op's fields, one a line; a tuple of objects (steps, params, saved arrays) one item a line."""
    lines = []
    for field in dataclasses.fields(op):
        value = getattr(op, field.name)
        if isinstance(value, tuple) and any(not isinstance(item, (str, int, float, type(None))) for item in value):
            lines += [f"{field.name}:"] + [f"  {printed(item)}" for item in value]
        else:
            lines.append(f"{field.name}: {printed(value)}")
    return "\n".join(lines)


def printed(value):
    return str(value) if isinstance(value, tuple) and hasattr(value, "_fields") else sp.sstr(value)


def steps_text(derivation):
    """A Derivation as its title, then each step's number and rule and its equation, lhs = rhs."""
    return "\n".join([derivation.title] + [
        f"  ({number}) {step.rule}" + (f", where {sp.sstr(step.condition)}" if step.condition is not None else "")
        + f"\n      {sp.sstr(step.lhs)} = {sp.sstr(step.rhs)}" for number, step in enumerate(derivation.steps, 1)])


def kernel_text(kernel):
    """A kernel's outputs as lowered, then the assignments sympy.cse makes of them."""
    _, assignments, _, _ = kernel_assignments(kernel)
    return "\n".join([f"{kernel.name}: {kernel.derivation}", "  outputs:"]
                     + [f"    {name} = {program(expr)}" for name, expr in kernel.outputs]
                     + ([f"    at the label: {program(kernel.at_label)}"] if kernel.at_label is not None else [])
                     + ["  assignments:"] + [f"    {symbol} = {program(expr)}" for symbol, expr in assignments])
