"""Every generated kernel, parametrized over the catalog: gradients, references, dtypes, stability."""
import ast
from pathlib import Path

import numpy as np
import pytest

import generated
from codegen.verify import check_op, sample_target
from derive.catalog import CATALOG
from derive.gradients import TARGETS
from derive.reduction import REDUCTIONS

OPS = list(CATALOG.values())
LAYERS = [op for op in OPS if op.kind == "layer"]
LOSSES = [op for op in OPS if op.kind == "loss"]
ids = lambda ops: [op.name for op in ops]  # noqa: E731
GENERATED = Path(generated.__file__).parent


def reference_softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def reference_cross_entropy(x, target, reduction):
    """torch.nn.functional.cross_entropy's definition, written plainly in float64."""
    log_p = np.log(reference_softmax(x.astype(np.float64)))
    rows = np.eye(x.shape[1])[target] if target.dtype.kind in "iu" else target
    losses = -(rows * log_p).sum(axis=1)
    return {"mean": losses.mean(), "sum": losses.sum(), "none": losses}[reduction]


REFERENCE_LAYERS = {"Softmax": reference_softmax}
REFERENCE_LOSSES = {"SoftmaxCrossEntropy": reference_cross_entropy}


def test_every_catalog_entry_is_exported_and_has_a_reference():
    assert sorted(generated.__all__) == sorted(CATALOG)
    assert set(REFERENCE_LAYERS) | set(REFERENCE_LOSSES) == set(CATALOG)


@pytest.mark.parametrize("shape", [(1, 2), (3, 5), (6, 3), (2, 11)])
@pytest.mark.parametrize("op", OPS, ids=ids(OPS))
def test_gradients_match_finite_differences(op, shape):
    rng = np.random.default_rng(sum(shape))
    for variant, check in check_op(op, getattr(generated, op.name), rng, shape):
        assert check.ok, f"{op.name} {variant} {shape}: {check.report()}"


@pytest.mark.parametrize("op", LAYERS, ids=ids(LAYERS))
def test_layers_work_on_any_leading_shape(op):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 3, 4))
    layer = getattr(generated, op.name)()
    assert np.allclose(layer.forward(x), REFERENCE_LAYERS[op.name](x))
    upstream = rng.normal(size=x.shape)
    flat = getattr(generated, op.name)()
    flat.forward(x.reshape(-1, 4))
    assert np.allclose(layer.backward(upstream), flat.backward(upstream.reshape(-1, 4)).reshape(x.shape))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("op", LAYERS, ids=ids(LAYERS))
def test_layers_keep_the_dtype_and_match_the_reference(op, dtype):
    x = np.random.default_rng(4).normal(size=(5, 7)).astype(dtype)
    layer = getattr(generated, op.name)()
    y = layer.forward(x)
    assert y.dtype == dtype and layer.backward(np.ones_like(x)).dtype == dtype
    assert np.allclose(y, REFERENCE_LAYERS[op.name](x.astype(np.float64)), rtol=1e-5 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("reduction", list(REDUCTIONS))
@pytest.mark.parametrize("kind", TARGETS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("op", LOSSES, ids=ids(LOSSES))
def test_losses_keep_the_dtype_and_match_the_reference(op, dtype, kind, reduction):
    rng = np.random.default_rng(5)
    x = rng.normal(0, 3, (6, 4)).astype(dtype)
    target = sample_target(kind, x.shape, rng)
    loss = getattr(generated, op.name)(reduction=reduction)
    value = loss.forward(x, target)
    expected_shape = (6,) if reduction == "none" else ()
    assert np.shape(value) == expected_shape and value.dtype == dtype
    grad = loss.backward(np.ones(6, dtype) if reduction == "none" else None)
    assert grad.dtype == dtype and grad.shape == x.shape
    reference = REFERENCE_LOSSES[op.name](x, target, reduction)
    assert np.allclose(value, reference, rtol=1e-5 if dtype == np.float32 else 1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("op", OPS, ids=ids(OPS))
def test_extreme_logits_give_finite_values_and_gradients(op, dtype):
    x = np.array([[1e4, -1e4, 0.0, 1e4], [-1e4, -1e4, -1e4, -1e4], [3.0, 1e4, -1e4, 2.0]], dtype)
    if op.kind == "layer":
        layer = getattr(generated, op.name)()
        outputs = [layer.forward(x), layer.backward(np.ones_like(x))]
    else:
        loss = getattr(generated, op.name)()
        outputs = []
        for kind in TARGETS:
            target = sample_target(kind, x.shape, np.random.default_rng(0))
            outputs += [loss.forward(x, target), loss.backward()]
    assert all(np.all(np.isfinite(out)) for out in outputs)


@pytest.mark.parametrize("rows", [1, 4])
def test_seed_000_worked_example(rows):
    """p = [0.1, 0.2, 0.25, 0.4, 0.05], true class 2: the gradient is [0.1, 0.2, -0.75, 0.4, 0.05] / N."""
    p = np.array([0.1, 0.2, 0.25, 0.4, 0.05])
    loss = generated.SoftmaxCrossEntropy()
    value = loss.forward(np.tile(np.log(p), (rows, 1)), np.full(rows, 2))
    assert np.isclose(value, -np.log(0.25))
    assert np.allclose(loss.backward(), np.tile([0.1, 0.2, -0.75, 0.4, 0.05], (rows, 1)) / rows)


@pytest.mark.parametrize("op", OPS, ids=ids(OPS))
def test_inputs_are_not_modified(op):
    rng = np.random.default_rng(6)
    x = rng.normal(size=(4, 3))
    before = x.copy()
    if op.kind == "layer":
        layer = getattr(generated, op.name)()
        layer.forward(x)
        g = rng.normal(size=x.shape)
        g_before = g.copy()
        layer.backward(g)
        assert np.array_equal(g, g_before)
    else:
        for kind in TARGETS:
            target = sample_target(kind, x.shape, rng)
            target_before = target.copy()
            loss = getattr(generated, op.name)()
            loss.forward(x, target)
            loss.backward()
            assert np.array_equal(target, target_before)
    assert np.array_equal(x, before)


@pytest.mark.parametrize("op", OPS, ids=ids(OPS))
def test_backward_before_forward_is_refused(op):
    with pytest.raises(RuntimeError, match="before forward"):
        getattr(generated, op.name)().backward(*([np.ones((2, 3))] if op.kind == "layer" else []))


@pytest.mark.parametrize("target, message", [
    (np.array([0, 3, 1]), r"target\[1\] = 3 is not a class index in \[0, 3\)"),
    (np.array([0, -1, 1]), r"target\[1\] = -1"),
    (np.array([0, 1]), r"shape \(3,\)"),
    (np.full((3, 2), 0.5), r"shape \(3, 3\)"),
    (np.array([[0.5, -0.1, 0.6]] * 3), "non-negative"),
])
def test_bad_targets_get_errors_that_name_them(target, message):
    with pytest.raises(ValueError, match=message):
        generated.SoftmaxCrossEntropy().forward(np.zeros((3, 3)), target)


def test_non_float_logits_are_refused():
    with pytest.raises(TypeError, match="float32 or float64"):
        generated.SoftmaxCrossEntropy().forward(np.zeros((2, 3), dtype=int), np.array([0, 1]))


def python_loops(source):
    """Line numbers of for/while loops and comprehensions in source: kernels must be vectorized."""
    loops = (ast.For, ast.While, ast.ListComp, ast.GeneratorExp, ast.SetComp, ast.DictComp)
    return [node.lineno for node in ast.walk(ast.parse(source)) if isinstance(node, loops)]


@pytest.mark.parametrize("path", sorted(GENERATED.glob("*.py")), ids=lambda p: p.name)
def test_generated_code_has_no_python_loops(path):
    assert python_loops(path.read_text()) == []


def test_the_loop_finder_finds_loops():
    assert python_loops("def f(x):\n    for n in range(3):\n        x += n\n    return [v for v in x]\n") == [2, 4]


@pytest.mark.parametrize("path", sorted(GENERATED.glob("*.py")), ids=lambda p: p.name)
def test_generated_code_imports_numpy_alone(path):
    imports = {alias.name.split(".")[0] for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, ast.Import) for alias in node.names}
    imports |= {node.module.split(".")[0] for node in ast.walk(ast.parse(path.read_text()))
                if isinstance(node, ast.ImportFrom) and node.level == 0}
    assert imports <= {"numpy"}
