"""generated.fast, the fused numba kernels: the NumPy kernels' checks, run compiled (finite differences,
the references, agreement with NumPy in float32 and float64, dtypes, special values, errors)."""
import ast
import inspect
from pathlib import Path

import numpy as np
import pytest

import generated
from codegen.render import fast_context
from codegen.verify import check_op, example_options, sample_target
from derive.catalog import CATALOG
from derive.gradients import flag_settings
from derive.ops import Op
from derive.reduction import REDUCTIONS
from tests import references

numba = pytest.importorskip("numba")
fast = pytest.importorskip("generated.fast")

# the Op layers and losses: an index-notation op has no fused form (codegen.pipeline.TENSOR_NOT_FUSED)
LAYERS_AND_LOSSES = [op for op in CATALOG.values() if isinstance(op, Op)]
# those with at least one kernel in fused form: the generator's own answer
OPS = [op for op in LAYERS_AND_LOSSES if fast_context(op) is not None]
LAYERS = [op for op in OPS if op.kind == "layer"]
LOSSES = [op for op in OPS if op.kind == "loss"]
ids = lambda ops: [op.name for op in ops]  # noqa: E731
FAST = Path(fast.__file__).parent
AGREE = {np.float32: dict(rtol=2e-5, atol=1e-6), np.float64: dict(rtol=1e-12, atol=1e-14)}


def test_every_layer_and_loss_has_a_fast_class_and_generated_does_not_import_numba():
    # the index-notation classes (codegen.tensor_fused) are tests/test_tensor_fused.py's
    assert set(fast.__all__) - {op.name for op in CATALOG.values() if not isinstance(op, Op)} == {op.name for op in OPS}
    # only an op with a tanh in its forward and backward has no fused kernel (tanh has no fused form yet); GELUTanh's
    # tanh is a sigmoid since the rule "1 + tanh" (issue 23)
    assert {op.name for op in LAYERS_AND_LOSSES if op not in OPS} == {"Mish"}
    assert "fast" not in (Path(generated.__file__).read_text())
    for path in FAST.glob("*.py"):
        tree = ast.parse(path.read_text())
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        assert path.name == "__init__.py" or "numba" in imported, path.name


@pytest.mark.parametrize("name, kernels", [("softmax_cross_entropy", ("forward_labels_plain", "backward_labels_plain",
                                                                      "forward_dense_plain", "backward_dense_plain",
                                                                      "forward_labels_plain_with_dx",
                                                                      "forward_dense_plain_with_dx")),
                                           ("binary_cross_entropy_with_logits", (
                                               "forward_dense_plain", "backward_dense_plain",
                                               "forward_dense_plain_with_dx_summed"))])
def test_the_plain_loss_kernels_are_compiled_by_numba(name, kernels):
    module = getattr(fast, name)
    for kernel in kernels:
        assert isinstance(getattr(module, f"_{kernel}"), numba.core.registry.CPUDispatcher), kernel


@pytest.mark.parametrize("op", OPS, ids=ids(OPS))
def test_gradients_match_finite_differences(op):
    for variant, check in check_op(op, getattr(fast, op.name), np.random.default_rng(1), (3, 5)):
        assert check.ok, f"{op.name} (fast) {variant}: {check.report()}"


def loss_inputs(op, kind, dtype, rng, shape=(6, 7)):
    x = (rng.uniform(*op.domain, shape) * 3).astype(dtype)
    return x, sample_target(kind, shape, rng)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("op", LAYERS, ids=ids(LAYERS))
def test_layers_agree_with_numpy_and_the_reference_and_keep_the_dtype(op, dtype):
    rng = np.random.default_rng(4)
    x = rng.normal(0, 3, (2, 3, 5)).astype(dtype)
    g = rng.normal(size=x.shape).astype(dtype)
    for options in ({}, example_options(op, x.shape, rng)):
        ours, theirs = getattr(fast, op.name)(**options), getattr(generated, op.name)(**options)
        y, dx = ours.forward(x), ours.backward(g)
        assert y.dtype == dtype and dx.dtype == dtype and y.shape == x.shape == dx.shape
        assert np.allclose(y, theirs.forward(x), **AGREE[dtype])
        assert np.allclose(dx, theirs.backward(g), **AGREE[dtype])
        expected = references.LAYERS[op.name](x.astype(np.float64), **options)
        assert np.allclose(y, expected, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-6)


@pytest.mark.parametrize("reduction", list(REDUCTIONS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("op", LOSSES, ids=ids(LOSSES))
def test_losses_agree_with_numpy_and_the_reference_and_keep_the_dtype(op, dtype, reduction):
    rng = np.random.default_rng(5)
    for kind in op.targets:
        x, target = loss_inputs(op, kind, dtype, rng)
        ours, theirs = getattr(fast, op.name)(reduction=reduction), getattr(generated, op.name)(reduction=reduction)
        value = ours.forward(x, target)
        G = rng.normal(size=np.shape(value)).astype(dtype) if reduction == "none" else None
        dx = ours.backward(G)
        assert value.dtype == dtype and dx.dtype == dtype and dx.shape == x.shape
        assert np.allclose(value, theirs.forward(x, target), **AGREE[dtype]), f"{kind} loss"
        assert np.allclose(dx, theirs.backward(G), **AGREE[dtype]), f"{kind} gradient"
        reference = references.LOSSES[op.name](x.astype(np.float64), target, reduction)
        assert np.allclose(value, reference, rtol=1e-5 if dtype == np.float32 else 1e-12, atol=1e-6)


ROW_LOSSES = [op for op in LOSSES if op.granularity == "row" and "labels" in op.targets]


@pytest.mark.parametrize("op", ROW_LOSSES, ids=ids(ROW_LOSSES))
def test_a_mean_written_in_forward_keeps_the_accuracy_at_a_confident_row(op):
    """A row loss's fused forward under a mean reads the label's entry of its saved arrays as their
    definitions (the focal loss's -expm1(lp[c])): kept whole, not folded into 1 - exp(x[c] - m)/s, which
    keeps about 3 digits of 1 - p = 3e-13 at the first row."""
    x = np.array([[30.0, 0.0, 0.0, 0.0], [0.0, -1.0, 2.0, 1e-3], [-5.0, 5.0, 28.0, -1.0]])
    c = np.array([0, 2, 2])
    values, gradients = [], []
    for where in (fast, generated):
        loss = getattr(where, op.name)()
        values.append(loss.forward(x, c))
        gradients.append(loss.backward())
    assert np.allclose(*values, rtol=1e-12, atol=0)
    assert np.allclose(*gradients, rtol=1e-10, atol=1e-300), f"{gradients[0]}\n{gradients[1]}"


WITH_DX = [(op, path) for op in LOSSES for path in fast_context(op)["paths"] if path["with_dx"]]
# the focal loss's dx reads lp at the label as its definition in one pass (entries_at_label: closer to float64 than
# the two kernels' saved float32 lp): the two agree as the fast and NumPy classes do
ROUNDED_OTHERWISE = {"SoftmaxFocalLoss"}


def within_ulps(ours, theirs, ulps=8):
    """Whether ours is theirs to ulps units in the last place of the largest entry of each row of theirs. The
    loops are one kernel's or two kernels' and numba's vectorizer does not promise their sums the same
    association (they agreed to the bit in most runs, but for softmax-CE's dense rows in some processes)."""
    theirs = np.asarray(theirs)
    scale = np.spacing(np.abs(theirs).max(axis=-1, keepdims=True) if theirs.ndim else abs(theirs))
    return np.all(np.abs(ours - theirs) <= ulps * scale)


def two_kernel_path(loss, module, path, x, target):
    """The loss and dx as the class gave them before its forward wrote dx: path's plain forward, then
    its backward kernel, called as the class calls them, reduced by the class's own _reduced."""
    env = {"x": x, "c": target[:, None] if target.dtype.kind in "iu" else None, "t": target, "self": loss}
    forward, backward = path["forward"], path["backward"]
    env |= zip(forward["returns"], getattr(module, forward["name"])(*[eval(a, env) for a in forward["call"]]))
    loss._saved = (getattr(module, backward["name"]), tuple(eval(a, env) for a in backward["before"]),
                   tuple(eval(a, env) for a in backward["after"]), None)
    return loss._reduced(env["L"], env["total"]), loss.backward()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("op, path", WITH_DX, ids=[f"{op.name}-{path['forward']['name']}" for op, path in WITH_DX])
def test_a_mean_or_a_sum_writes_dx_in_forward_as_the_two_kernels_give_it(op, path, dtype, reduction, monkeypatch):
    """Under a mean or a sum the forward writes dx (backward calls no kernel: the backward kernel,
    made to raise, is never called) and the loss and dx are those of the two kernels it replaces, to a
    few ulps (but where ROUNDED_OTHERWISE says). Under "none" the class calls the kernel made to raise:
    the patch is where the class looks."""
    module = inspect.getmodule(getattr(fast, op.name))
    kind, variant = path["forward"]["name"].split("_", 2)[1:]
    options = flag_settings(op)[variant.partition("_")[2]]
    x, target = loss_inputs(op, kind, dtype, np.random.default_rng(7), shape=(33, 17))
    target = target.astype(dtype) if kind == "dense" else target
    expected, expected_dx = two_kernel_path(getattr(fast, op.name)(reduction=reduction, **options), module, path, x,
                                            target)

    def refused(*args, **kwargs):
        raise AssertionError(f"{path['backward']['name']} called")
    monkeypatch.setattr(module, path["backward"]["name"], refused)
    loss = getattr(fast, op.name)(reduction=reduction, **options)
    value = loss.forward(x, target)
    retained, dx = loss.backward(retain_graph=True), loss.backward()
    assert value.dtype == dtype and within_ulps(value, expected), f"{value!r} against {expected!r}"
    same = (lambda a, b: np.allclose(a, b, **AGREE[dtype])) if op.name in ROUNDED_OTHERWISE else within_ulps
    assert same(dx, expected_dx) and same(retained, expected_dx)
    unreduced = getattr(fast, op.name)(reduction="none", **options)
    G = np.ones(np.shape(unreduced.forward(x, target)), dtype)
    with pytest.raises(AssertionError, match="called"):
        unreduced.backward(G)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("op", OPS, ids=ids(OPS))
def test_infinities_nan_and_empty_batches_give_what_numpy_gives(op, dtype):
    x = np.array([[30.0, -np.inf, 0.0, 1.0], [np.nan, 1.0, 2.0, 3.0], [-1e4, 1e4, -2.0, 5.0]], dtype)
    rng = np.random.default_rng(0)
    for rows in (x, x[:0]):
        with np.errstate(all="ignore"):
            if op.kind == "layer":
                results = []
                for where in (fast, generated):
                    layer = getattr(where, op.name)()
                    results.append([layer.forward(rows), layer.backward(np.ones_like(rows))])
            else:
                targets = {kind: sample_target(kind, rows.shape, rng) for kind in op.targets}
                results = []
                for where in (fast, generated):
                    outputs = []
                    for kind, target in targets.items():
                        for reduction in ("sum", "mean"):  # a fused mean writes dx in forward
                            loss = getattr(where, op.name)(reduction=reduction)
                            outputs += [loss.forward(rows, target), loss.backward()]
                    results.append(outputs)
        for ours, theirs in zip(*results):
            assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
            assert np.allclose(ours, theirs, equal_nan=True, **AGREE[dtype]), f"{ours}\n{theirs}"


@pytest.mark.parametrize("reduction", list(REDUCTIONS))
@pytest.mark.parametrize("op", LOSSES, ids=ids(LOSSES))
def test_a_retained_backward_gives_a_new_array_and_a_freed_one_refuses_the_next(op, reduction):
    """As the NumPy classes: retain_graph=True keeps what forward made (a fused mean's dx included) and
    gives an array of the caller's own each time; a backward without it frees that, and the next raises."""
    rng = np.random.default_rng(6)
    for kind in op.targets:
        x, target = loss_inputs(op, kind, np.float64, rng)
        ours, theirs = getattr(fast, op.name)(reduction=reduction), getattr(generated, op.name)(reduction=reduction)
        value = ours.forward(x, target)
        theirs.forward(x, target)
        G = np.ones(np.shape(value)) if reduction == "none" else None
        first = ours.backward(G, retain_graph=True)
        first += 1  # the caller's to write into
        second = ours.backward(G, retain_graph=True)
        last = ours.backward(G)
        expected = theirs.backward(G)
        assert np.allclose(second, expected, **AGREE[np.float64]) and np.allclose(last, expected, **AGREE[np.float64])
        with pytest.raises(RuntimeError, match="called a second time"):
            ours.backward(G)


def raised(call):
    try:
        call()
    except Exception as error:  # noqa: BLE001 - the point is to compare whatever is raised
        return type(error), str(error)
    return None


BAD_CALLS = {
    "integer x": lambda cls: cls().forward(np.arange(6).reshape(2, 3), np.array([0, 1])),
    "label out of range": lambda cls: cls().forward(np.zeros((2, 3)), np.array([0, 3])),
    "target of another shape": lambda cls: cls().forward(np.zeros((2, 3)), np.zeros((3, 3))),
    "backward first": lambda cls: cls().backward(),
    "a G with a mean": lambda cls: ((loss := cls()).forward(np.zeros((2, 3)), np.zeros((2, 3))), loss.backward(np.ones(2))),
}


@pytest.mark.parametrize("bad", list(BAD_CALLS))
@pytest.mark.parametrize("op", LOSSES, ids=ids(LOSSES))
def test_bad_input_raises_what_numpy_raises(op, bad):
    ours = raised(lambda: BAD_CALLS[bad](getattr(fast, op.name)))
    assert ours is not None and ours == raised(lambda: BAD_CALLS[bad](getattr(generated, op.name)))


@pytest.mark.parametrize("op", LAYERS, ids=ids(LAYERS))
def test_layers_refuse_what_numpy_refuses(op):
    for bad in (np.arange(4), np.zeros(3, np.float16)):
        ours = raised(lambda: getattr(fast, op.name)().forward(bad))
        assert ours is not None and ours == raised(lambda: getattr(generated, op.name)().forward(bad))
    assert raised(lambda: getattr(fast, op.name)().backward(np.ones(3)))[0] is RuntimeError


@pytest.mark.parametrize("op", LOSSES, ids=ids(LOSSES))
def test_dense_targets_out_of_range_raise_what_numpy_raises(op):
    for bad in (-1.0, 2.0, np.nan):
        target = np.full((2, 3), 0.5)
        target[1, 2] = bad
        calls = [lambda where: getattr(where, op.name)().forward(np.zeros((2, 3)), target)]
        calls += [lambda where: getattr(where, op.name)().forward(np.zeros((2, 3), np.float32), target.astype(np.float16))]
        for call in calls:
            assert raised(lambda: call(fast)) == raised(lambda: call(generated)), (op.name, bad)


NEAR_LOOPS = [(module, name.removesuffix("_parallel")) for module in sorted(
    {getattr(fast, op.module) for op in CATALOG.values() if hasattr(fast, op.name)}, key=lambda m: m.__name__)
    for name in vars(module) if name.startswith("_") and name.endswith("_parallel")]


@pytest.mark.parametrize("module, loop", NEAR_LOOPS, ids=lambda v: getattr(v, "__name__", v))
def test_a_near_zero_loop_runs_on_every_thread_from_parallel_from_entries_and_writes_the_same(module, loop, monkeypatch):
    # the Taylor polynomial's loop after a fused kernel: on one thread below _runtime.PARALLEL_FROM entries (a
    # parallel region costs more there), over every thread from it; each entry written alike either way
    assert NEAR_LOOPS, "no fused kernel has a loop near a zero: GELU's backward had one"
    serial, parallel = getattr(module, loop), getattr(module, loop + "_parallel")
    x = np.linspace(-3, 3, fast._runtime.PARALLEL_FROM)
    g = np.random.default_rng(0).standard_normal(x.size)
    outs = [f(x, g, np.zeros_like(x)) for f in (serial, parallel)]
    assert np.array_equal(*outs) and np.count_nonzero(outs[0]) > 0
    called = []
    for name in (loop, loop + "_parallel"):
        monkeypatch.setattr(module, name, lambda x, g, out, name=name: called.append(name) or out)
    public = loop.removeprefix("_").removesuffix("_near_zero")
    for size in (fast._runtime.PARALLEL_FROM - 1, fast._runtime.PARALLEL_FROM):
        getattr(module, public)(x[:size], g[:size])
    assert called == [loop, loop + "_parallel"]
