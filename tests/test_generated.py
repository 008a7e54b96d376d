"""Every generated kernel, parametrized over the catalog: gradients, references, dtypes, stability."""
import ast
import tracemalloc
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import generated
from codegen.verify import check_op, example_options, sample_target, with_ignored_row
from derive.catalog import CATALOG
from derive.ops import Op
from derive.reduction import REDUCTIONS
from tests import references
from tests.test_errors import OPS as FLOAT_OPS, make

OPS = list(CATALOG.values())
# the element-wise and row layers (any leading shape, a reference each); Linear is tested by name below
LAYERS = [op for op in OPS if op.kind == "layer" and isinstance(op, Op)]
LOSSES = [op for op in OPS if op.kind == "loss"]
ids = lambda ops: [op.name for op in ops]  # noqa: E731
GENERATED = Path(generated.__file__).parent
LOSS_CASES = [(op, kind, options) for op in LOSSES for kind in op.targets
              for options in ((False, True) if op.params else (False,))]


def loss_case(op, kind, with_options, shape, rng, dtype=np.float64):
    """(x, target, options) for one loss, options PyTorch's defaults or examples of every option."""
    x = rng.uniform(*op.domain, shape).astype(dtype)
    target = sample_target(kind, shape, rng)
    options = example_options(op, shape, rng) if with_options and op.params else {}
    return x, with_ignored_row(target, op) if options else target, options


def test_every_catalog_entry_is_exported_and_has_a_reference():
    assert set(generated.__all__) == set(CATALOG) | {"Sequential", "Flatten", "SGD", "Adam", "AdamW"}
    # an index-notation layer's reference is its own steps, by derive.tensor's loops (tests/test_properties.py)
    assert set(references.LAYERS) | set(references.LOSSES) == {name for name, op in CATALOG.items() if isinstance(op, Op)}


@pytest.mark.parametrize("shape", [(1, 2), (3, 5), (6, 3), (2, 11)])
@pytest.mark.parametrize("op", OPS, ids=ids(OPS))
def test_gradients_match_finite_differences(op, shape):
    rng = np.random.default_rng(sum(shape))
    for variant, check in check_op(op, getattr(generated, op.name), rng, shape):
        assert check.ok, f"{op.name} {variant} {shape}: {check.report()}"


@pytest.mark.parametrize("op", OPS, ids=ids(OPS))
def test_gradients_near_saturation(op):
    """Inputs at ten times the usual domain: large logits, saturated sigmoids and tanh."""
    wide = replace(op, domain=tuple(10 * v for v in op.domain), tol=1e-5)
    for variant, check in check_op(wide, getattr(generated, op.name), np.random.default_rng(7), (3, 4)):
        assert check.ok, f"{op.name} {variant}: {check.report()}"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("op", LAYERS, ids=ids(LAYERS))
def test_layers_match_the_reference_keep_the_dtype_and_any_shape(op, dtype):
    rng = np.random.default_rng(4)
    x = rng.normal(0, 3, (2, 3, 5)).astype(dtype)
    for options in ({}, example_options(op, x.shape, rng)):
        layer = getattr(generated, op.name)(**options)
        y = layer.forward(x)
        assert y.dtype == dtype and y.shape == x.shape
        assert layer.backward(np.ones_like(x)).dtype == dtype
        expected = references.LAYERS[op.name](x.astype(np.float64), **options)
        assert np.allclose(y, expected, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-6)


@pytest.mark.parametrize("op", LAYERS, ids=ids(LAYERS))
def test_layers_backward_on_any_leading_shape_equals_the_flat_one(op):
    rng = np.random.default_rng(3)
    x, upstream = rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 3, 4))
    layer, flat = getattr(generated, op.name)(), getattr(generated, op.name)()
    layer.forward(x)
    flat.forward(x.reshape(-1, 4))
    assert np.allclose(layer.backward(upstream), flat.backward(upstream.reshape(-1, 4)).reshape(x.shape))


@pytest.mark.parametrize("reduction", list(REDUCTIONS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("op, kind, options", LOSS_CASES,
                         ids=[f"{op.name}-{kind}-{'options' if o else 'defaults'}" for op, kind, o in LOSS_CASES])
def test_losses_match_the_reference_and_keep_the_dtype(op, kind, options, dtype, reduction):
    rng = np.random.default_rng(5)
    x, target, values = loss_case(op, kind, options, (6, 4), rng, dtype)
    loss = getattr(generated, op.name)(**values, reduction=reduction)
    value = loss.forward(x, target)
    expected_shape = () if reduction != "none" else (6,) if op.granularity == "row" else x.shape
    assert np.shape(value) == expected_shape and value.dtype == dtype
    grad = loss.backward(np.ones(expected_shape, dtype) if reduction == "none" else None)
    assert grad.dtype == dtype and grad.shape == x.shape
    reference = references.LOSSES[op.name](x.astype(np.float64), target, reduction, **values)
    assert np.allclose(value, reference, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-6)


def test_bce_mean_forward_and_backward_use_two_buffers_of_x_size():
    # the benchmark's element-wise loss: a summed forward keeps no array of losses; backward reads x, not a saved
    # p (issue 23: p - t cancels at t = 1), and (1 - t) sigmoid(x) - t sigmoid(-x) needs dx and one scratch buffer
    rng = np.random.default_rng(2)
    x = rng.standard_normal((256, 128))
    target = rng.integers(0, 2, x.shape).astype(x.dtype)
    loss = generated.BinaryCrossEntropyWithLogits()
    tracemalloc.start()
    try:
        loss.forward(x, target)
        loss.backward()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2.1 * x.nbytes


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_bce_is_exact_for_confident_right_answers(reduction):
    # x -> -inf with t = 0 (and x -> inf with t = 1): the loss is log1p(exp(-|x|)), tiny; PyTorch's
    # (1 - t) x + max(-x, 0) + log1p(...) adds it to -x and then x back, and loses 1% at x = -10 in
    # float32. x (H(x) - t) is exactly 0 there, so the loss is the softplus alone, to the last bits
    x = np.array([[-10.0, -17.0, -30.0, 10.0, 17.0, 30.0]], np.float32)
    target = np.array([[0, 0, 0, 1, 1, 1]], np.float32)
    value = generated.BinaryCrossEntropyWithLogits(reduction=reduction).forward(x, target)
    expected = np.log1p(np.exp(-np.abs(x.astype(np.float64))))
    np.testing.assert_allclose(value, expected if reduction == "none" else expected.sum(), rtol=1e-6)


def test_linear_matches_x_at_w_plus_b_and_keeps_its_dtype():
    rng = np.random.default_rng(8)
    for dtype in (np.float32, np.float64):
        layer = generated.Linear(4, 3, rng=rng, dtype=dtype)
        x = rng.normal(size=(5, 4)).astype(dtype)
        y = layer.forward(x)
        assert y.dtype == dtype and np.allclose(y, x @ layer.W + layer.b, rtol=1e-6)
        assert layer.backward(np.ones_like(y)).dtype == dtype and layer.dW.dtype == dtype


def test_linear_init_follows_pytorch_bounds():
    layer = generated.Linear(16, 1000, rng=0)
    assert np.abs(layer.W).max() <= 0.25 and np.abs(layer.W).max() > 0.24
    assert layer.W.shape == (16, 1000) and layer.b.shape == (1000,)


def test_linear_penalty_is_l2_sum_of_squares():
    layer = generated.Linear(3, 2, l2=0.5, rng=1)
    assert np.isclose(layer.penalty(), 0.5 * np.sum(layer.W ** 2))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("op", FLOAT_OPS, ids=ids(FLOAT_OPS))
def test_extreme_inputs_give_finite_values_and_gradients(op, dtype):
    big = 1e4 if dtype == np.float64 else 100.0
    x = np.array([[big, -big, 0.0, big], [-big, -big, -big, -big], [3.0, big, -big, 2.0]], dtype)
    if not isinstance(op, Op):  # an index-notation layer's further axes (BatchNorm2d's h, w) of size 1
        x = x.reshape(x.shape + (1,) * (len(next(iter(op.inputs.values()))) - 2))
    rng = np.random.default_rng(0)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        if op.kind == "layer":
            layer = make(op, x)
            y = layer.forward(*[x] * len(getattr(op, "inputs", None) or "x"))   # x for each of attention's Q, K, V
            grads = layer.backward(np.ones_like(y))
            outputs = [y, *(grads if isinstance(grads, tuple) else (grads,))]
        else:
            outputs = []
            for kind in op.targets:
                loss = getattr(generated, op.name)()
                outputs += [loss.forward(x, sample_target(kind, x.shape, rng)), loss.backward()]
    assert all(np.all(np.isfinite(out)) for out in outputs)


@pytest.mark.parametrize("rows", [1, 4])
def test_seed_000_worked_example(rows):
    """p = [0.1, 0.2, 0.25, 0.4, 0.05], true class 2: the gradient is [0.1, 0.2, -0.75, 0.4, 0.05] / N."""
    p = np.array([0.1, 0.2, 0.25, 0.4, 0.05])
    loss = generated.SoftmaxCrossEntropy()
    value = loss.forward(np.tile(np.log(p), (rows, 1)), np.full(rows, 2))
    assert np.isclose(value, -np.log(0.25))
    assert np.allclose(loss.backward(), np.tile([0.1, 0.2, -0.75, 0.4, 0.05], (rows, 1)) / rows)


def test_seed_004_sigmoid_mse_gradient_vanishes_where_cross_entropy_does_not():
    """At a saturated wrong output (a near 0, y = 1) MSE after a sigmoid barely moves; BCE does."""
    z, y = np.array([[-8.0]]), np.array([[1.0]])
    sigmoid, mse = generated.Sigmoid(), generated.MeanSquaredError()
    mse.forward(sigmoid.forward(z), y)
    through_mse = sigmoid.backward(mse.backward())
    bce = generated.BinaryCrossEntropyWithLogits()
    bce.forward(z, y)
    a = 1 / (1 + np.exp(8.0))
    assert np.isclose(through_mse, 2 * (a - 1) * a * (1 - a)) and abs(through_mse) < 1e-3
    assert np.isclose(bce.backward(), a - 1)


def kernel_loops(source):
    """Line numbers of loops and comprehensions inside the module-level kernel functions."""
    loops = (ast.For, ast.While, ast.ListComp, ast.GeneratorExp, ast.SetComp, ast.DictComp)
    kernels = [node for node in ast.parse(source).body if isinstance(node, ast.FunctionDef)]
    return [node.lineno for kernel in kernels for node in ast.walk(kernel) if isinstance(node, loops)]


# _tensor.py's input checks loop over an operation's arrays (a fixed few), and _kept.py over the at most KEPT
# arrays a site keeps, never over samples or classes
@pytest.mark.parametrize("path", sorted(set(GENERATED.glob("*.py")) - {GENERATED / "_tensor.py", GENERATED / "_kept.py"}),
                         ids=lambda p: p.name)
def test_generated_kernels_have_no_python_loops(path):
    assert kernel_loops(path.read_text()) == []


def test_the_loop_finder_finds_loops():
    source = "def f(x):\n    for n in range(3):\n        x += n\n    return [v for v in x]\n"
    assert kernel_loops(source) == [2, 4]


@pytest.mark.parametrize("path", sorted(GENERATED.glob("*.py")), ids=lambda p: p.name)
def test_generated_code_imports_numpy_alone(path):
    tree = ast.parse(path.read_text())
    imports = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
               for alias in node.names}
    imports |= {node.module.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.level == 0}
    # Python's own: math and itertools for sizes and options as Python floats and a window's few taps; sys and
    # threading for _tensor's pool of kept outputs (a reference count, a lock)
    assert imports <= {"numpy", "math", "itertools", "sys", "threading"}
