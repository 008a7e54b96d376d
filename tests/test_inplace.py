"""The in-place lowering (codegen/inplace.py) changes where values are written, never what they are:
the whole generated package, printed with every line a whole expression instead, gives the same
losses and gradients for every operation, option, target and reduction. A lowering that forgets
which buffers are still needed is caught."""
import re

import numpy as np
import sympy as sp
import pytest

import generated

import codegen.kernels as kernels
import codegen.tensor_lower as tensor_lower
from codegen.printer import print_code
from codegen.render import render_package
from codegen.tensor_verify import sample
from codegen.verify import example_options, sample_target, with_ignored_row
from codegen.write import import_package, stage
from derive.catalog import CATALOG
from derive.declare import example
from derive.ops import Op
from derive.reduction import REDUCTIONS

REAL, REAL_TENSOR = kernels.assignments_in_place, tensor_lower.tensor_in_place


def whole_lines(assignments, later, full, output=None, recompute=False, updates=()):
    """Each assignment printed as one expression: NumPy allocates every result."""
    return [(str(lhs), print_code(expr)) for lhs, expr in assignments]


def whole_tensor_lines(function, printer, view, new_array):
    """An index-notation function's statements printed as they are: NumPy allocates every result."""
    return [statement.source(printer) for statement in function.statements]


def careless_lines(assignments, later, full, output=None, recompute=False, updates=()):
    """The in-place lines, but every operation that allocates writes over its first operand when that
    is a temporary, needed later or not: the bug the lowering's liveness analysis prevents."""
    overwrite = re.compile(r"^np\.(\w+)\(([uv]\d+), ([^=]*)\)$")
    return [(lhs, overwrite.sub(r"np.\1(\2, \3, out=\2)", code))
            for lhs, code in REAL(assignments, later, full, output, recompute, updates)]


def careless_tensor_lines(function, printer, view, new_array):
    """The same carelessness in an index-notation function: every ufunc that allocates writes over its first
    operand when that is an array's name (a temporary, or one forward saved: LayerNorm's y_gamma), needed later
    or not."""
    overwrite = re.compile(r"^(\w+) = np\.(\w+)\(([a-z_]\w*)((?:, [^=]*)?)\)$")
    kept = re.compile(r'^(\w+) = kept\(\(__name__, "[\w.]+"\), np\.(\w+), ([a-z_]\w*)((?:, [^=]*)?)\)$')
    return [kept.sub(r"\1 = np.\2(\3\4, out=\3)", overwrite.sub(r"\1 = np.\2(\3\4, out=\3)", line))
            for line in REAL_TENSOR(function, printer, view, new_array)]


def package(lowering, folder, monkeypatch, tensor_lowering=REAL_TENSOR):
    """The NumPy package printed with lowering (and tensor_lowering for the index-notation ops), imported from
    a folder of its own."""
    with monkeypatch.context() as patch:
        patch.setattr(kernels, "assignments_in_place", lowering)
        patch.setattr(tensor_lower, "tensor_in_place", tensor_lowering)
        files = {name: text for name, text in render_package(CATALOG).items() if not name.startswith("fast/")}
    return import_package(stage(files, folder))


def results(pkg, op, seed=0, shape=(4, 5)):
    """Every value a class of op gives: forward and backward under each option set, target and reduction."""
    rng = np.random.default_rng(seed)
    cls = getattr(pkg, op.name)
    if not isinstance(op, Op):  # an index-notation layer at its check sizes and other options
        constructor, arrays, _ = sample(op, rng)
        options = {o: example(v, op.ranges[o]) for o, v in op.options.items()}
        layer = cls(**constructor, **options, **({"rng": seed} if op.params or op.noise else {}))  # one mask
        y = layer.forward(*arrays.values())
        grads = layer.backward(rng.standard_normal(y.shape))  # None for integer x (Embedding's)
        grads = grads if isinstance(grads, tuple) else () if grads is None else (grads,)  # attention's dQ, dK, dV
        return [y, *grads, *(getattr(layer, "d" + p) for p in layer.params)]
    x = rng.uniform(*op.domain, shape)
    option_sets = [{}] + ([example_options(op, shape, rng)] if op.params else [])
    found = []
    for options in option_sets:
        if op.kind == "layer":
            layer = cls(**options)
            found += [layer.forward(x), layer.backward(rng.standard_normal(shape))]
            continue
        for kind in op.targets:
            target = sample_target(kind, shape, rng)
            target = with_ignored_row(target, op) if options else target
            for reduction in REDUCTIONS:
                loss = cls(**options, reduction=reduction)
                upstream = (rng.standard_normal(shape[0] if op.granularity == "row" else shape),) if reduction == "none" else ()
                found += [loss.forward(x, target), loss.backward(*upstream)]
    return found


def differences(pkg, reference):
    """Names of the operations whose values differ between two packages (or that raise in the first)."""
    differ = []
    for op in CATALOG.values():
        try:
            ours = results(pkg, op)
        except Exception:  # noqa: BLE001 - a careless lowering may also fail outright
            differ.append(op.name)
            continue
        theirs = results(reference, op)
        if not all(np.allclose(a, b, rtol=1e-12, atol=1e-13, equal_nan=True) for a, b in zip(ours, theirs)):
            differ.append(op.name)
    return differ


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    with pytest.MonkeyPatch.context() as monkeypatch:
        return package(whole_lines, tmp_path_factory.mktemp("whole"), monkeypatch, whole_tensor_lines)


def test_in_place_kernels_give_what_whole_expressions_give(whole):
    # the committed package is the real lowering's print (tests/test_codegen.py renders it and compares)
    assert differences(generated, whole) == []


def test_a_lowering_that_overwrites_live_buffers_is_caught(whole, tmp_path, monkeypatch):
    """Both lowerings careless in one package (a render of the catalog each would double the time): each one's
    carelessness shows in operations only it lowers."""
    careless = differences(package(careless_lines, tmp_path, monkeypatch, careless_tensor_lines), whole)
    assert len([name for name in careless if isinstance(CATALOG[name], Op)]) >= 3, careless
    assert "LayerNorm" in careless, careless


def test_an_update_in_place_is_written_into_its_argument_or_refused():
    """SGD's velocity: v' = momentum v + grad lands in v; an update whose argument a later line still reads
    cannot, and says so."""
    from codegen.inplace import assignments_in_place
    v, grad, momentum, v_next, a, a_next, b = sp.symbols("velocity grad momentum velocity_next a a_next b")
    lines = assignments_in_place([(v_next, momentum * v + grad)], [v_next], ("velocity", "grad"),
                                 updates=(("velocity_next", "velocity"),))
    values = {"np": np, "velocity": np.ones(3), "grad": np.arange(3.0), "momentum": 0.5}
    kept = values["velocity"]
    for lhs, code in lines:
        exec(f"{lhs} = {code}", values)  # noqa: S102 - the printed lines themselves
    assert values["velocity_next"] is kept and np.array_equal(kept, [0.5, 1.5, 2.5])
    with pytest.raises(ValueError, match="a_next is not computed in place into a"):
        assignments_in_place([(a_next, 2 * a), (b, a + 1)], [a_next, b], ("a",), updates=(("a_next", "a"),))


def test_a_returned_name_of_a_temporary_keeps_the_temporary_from_being_written_over():
    """Adam's m' = v1 is returned and v1 is read again for the update: no later line may write into v1."""
    from codegen.inplace import assignments_in_place
    x, v1, m, p = sp.symbols("x v1 m p")
    lines = assignments_in_place([(v1, 2 * x + 1), (m, v1), (p, 3 * v1 + 1)], [m, p], ("x",))
    values = {"np": np, "x": np.arange(4.0)}
    for lhs, code in lines:
        exec(f"{lhs} = {code}", values)  # noqa: S102 - the printed lines themselves
    np.testing.assert_array_equal(values["m"], 2 * np.arange(4.0) + 1)
    np.testing.assert_array_equal(values["p"], 6 * np.arange(4.0) + 4)
