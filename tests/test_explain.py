"""symgrad explain: an operation at every stage of the generator, in pipeline order, each stage showing what
that stage makes of it: the declaration, the derivation (down to derive.tensor's VJPs or the kernels'
backward, and the stable forms), the array program before printing, and the source codegen writes."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import sympy as sp

from codegen.cli import main
from codegen.explain import STAGES, explanation, kernels_of
from codegen.render import render_package
from codegen.tensor_lower import lowered
from derive.catalog import CATALOG
from derive.declare import load_ops
from derive.gradients import layer_backward
from derive.ops import build_catalog
from derive.tensor import TensorOp, derivation
from tests.test_cli_errors import assert_one_line_error

SYMGRAD = Path(sys.executable).parent / "symgrad"
EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "tensor_ops.py"
TENSOR = {op.name: op for op in load_ops(EXAMPLES)}
DECLARED = """from derive.declare import activation, elementwise_loss
OPS = [activation("Swish", "x*sigmoid(beta*x)", params={"beta": 1.0}), elementwise_loss("LogCosh", "log(cosh(x - t))")]
"""
NAMES = [*TENSOR, "Softmax", "HardTanh", "Linear", "SoftmaxCrossEntropy", "Swish", "LogCosh"]
HEADING = re.compile(r"^== (\d)\. ([a-z ]+): (.+) ==$", re.M)


@pytest.fixture(scope="module")
def declared(tmp_path_factory):
    path = tmp_path_factory.mktemp("ops") / "ops.py"
    path.write_text(DECLARED)
    return path


@pytest.fixture(scope="module")
def ops(declared):
    return {**TENSOR, **CATALOG, **{op.name: op for op in load_ops(declared)}}


@pytest.fixture(scope="module")
def explained(ops):
    """{name: [(number, stage, body), ...]} of every explained operation."""
    found = {}
    for name in NAMES:
        text = explanation(ops[name])
        headings = list(HEADING.finditer(text))
        found[name] = [(int(h[1]), h[2], text[h.end():headings[n + 1].start() if n + 1 < len(headings) else None])
                       for n, h in enumerate(headings)]
    return found


@pytest.fixture(scope="module")
def written(ops):
    """{name: the text codegen writes for it}, all rendered at once."""
    files = render_package(build_catalog(*(ops[name] for name in NAMES)), fused=False)
    return {name: files[f"{ops[name].module}.py"] for name in NAMES}


def stage(explained, name, which):
    return next(body for _, found, body in explained[name] if found == which)


@pytest.mark.parametrize("name", NAMES)
def test_the_stages_come_in_pipeline_order(explained, name):
    assert [(number, found) for number, found, _ in explained[name]] == list(enumerate(STAGES, 1))
    assert all(body.strip() for _, _, body in explained[name])


@pytest.mark.parametrize("name", NAMES)
def test_the_declaration_is_the_ops_own_fields(ops, explained, name):
    op, text = ops[name], stage(explained, name, "declaration")
    assert f"\nname: {name}\n" in text and f"\nkind: {op.kind}\n" in text
    formulas = [str(s) for s in op.steps] if isinstance(op, TensorOp) else [f"forward: {sp.sstr(op.forward)}"]
    assert all(f in text for f in formulas), text


@pytest.mark.parametrize("name", NAMES)
def test_the_derivation_ends_at_what_the_kernels_compute(ops, explained, name):
    op, text = ops[name], stage(explained, name, "derivation")
    if isinstance(op, TensorOp):   # derive.tensor's VJPs, reached by the printed steps, then codegen's rewrites
        expected = [str(program[-1]) for program in derivation(op).gradients.values()] + ["stable forms, after "]
    elif op.kind == "layer":
        expected = [f"dx[j] = {sp.sstr(layer_backward(op))}", f"{name}: the numerically stable forms"]
    elif op.kind == "loss":
        expected = [f"{name}: the numerically stable forms", "Derivative(Lbar, x[r, j])"]
    else:
        expected = ["dW[u, v] = g[u]*x[v]", "db[u] = g[u]"]
    assert all(e in text for e in expected), (expected, text)


@pytest.mark.parametrize("name", NAMES)
def test_the_array_program_is_the_lowered_one_before_printing(ops, explained, name):
    op, text = ops[name], stage(explained, name, "array program")
    if isinstance(op, TensorOp):
        for function in lowered(op):
            assert f"{function.name}({', '.join(function.args)}) -> {', '.join(function.returns)}" in text
            assert all(f"  {s.target} = " in text or f"  {s.target}[" in text or f"({s.target}, " in text
                       for s in function.statements)
        assert "np.einsum" not in text and "np.add.reduce" not in text
    else:
        for kernel in kernels_of(op):
            assert f"{kernel.name}: {kernel.derivation}\n  outputs:\n" in text
            assert all(f"    {output} = " in text for output, _ in kernel.outputs)


def test_window_products_are_ir_in_the_program_and_numpy_in_the_source(explained):
    # a convolution: a window view copied once into a matrix and one matrix product (codegen.tensor_lower)
    program, source = (stage(explained, "ValidConv1d", which) for which in ("array program", "kernel source"))
    assert all(f"{ir}(" in program for ir in ("MatMul", "Reshaped", "Window")) and "sliding_window_view" not in program
    assert " @ " in source and "sliding_window_view(" in source and ".reshape(" in source
    assert not any(f"{ir}(" in source for ir in ("MatMul", "Reshaped", "Window"))


@pytest.mark.parametrize("name", NAMES)
def test_the_kernel_source_is_what_codegen_writes(written, explained, name):
    text = stage(explained, name, "kernel source")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    module = {line.strip() for line in written[name].splitlines()}
    assert lines and [line for line in lines if line not in module] == []
    assert text.count("def ") >= 2 and "def forward" in text


def test_the_command_explains_a_catalog_and_a_declared_operation(declared, capsys):
    assert main(["explain", "Softmax"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("== 1. declaration: derive.ops.Op ==\nname: Softmax\n") and "def backward(x, at, y, rest, g):" in out
    assert main(["explain", "GLU"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("== 1. declaration: derive.tensor.TensorOp ==\nname: GLU\n")
    assert "stable forms, after logistic, 1 - sigmoid:" in out and "dx[:, H:] += " in out


@pytest.mark.parametrize("arguments, named", [
    ("explain Softmaxx", "no operation named 'Softmaxx' in the catalog"),
    ("explain --ops {tmp}/ops.py Mish", "no operation named 'Mish' in"),
    ("explain --ops {tmp}/missing.py Swish", "missing.py"),
    ("explain --ops {tmp}/syntax.py Swish", "syntax.py: SyntaxError"),
])
def test_a_user_error_is_one_line(declared, arguments, named):
    (declared.parent / "syntax.py").write_text("OPS = [activation(\n")
    argv = [part.format(tmp=declared.parent) for part in arguments.split()]
    result = subprocess.run([str(SYMGRAD), *argv], capture_output=True, text=True, timeout=300)
    assert_one_line_error(result, named)
    assert result.stderr.startswith("symgrad explain: ") and not result.stdout
