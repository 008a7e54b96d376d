"""Bad input to every generated class gets an error that names what was wrong; the edge cases (an
empty batch, NaN, a second backward) have the documented result. Parametrized over the catalog, so a
new entry is covered with no new test code."""
import functools
import re
import warnings

import numpy as np
import pytest
import sympy as sp

import generated
from generated._checks import dense_target
from codegen.verify import example_options, sample_target, with_ignored_row
from derive.catalog import CATALOG
from derive.reduction import REDUCTIONS
from derive.tensor import TensorOp, size_of
from tests import references

# every op whose x is a float array: all but Embedding, whose x holds integer indices (its checks are
# tests/test_torch_parity.py's)
OPS = [op for op in CATALOG.values() if not (isinstance(op, TensorOp) and not op.inputs)]
# (op, target kind): every loss once per target kind, every other op once
CASES = [(op, kind) for op in OPS for kind in (op.targets if op.kind == "loss" else None) or (None,)]
LOSS_CASES = [(op, kind) for op, kind in CASES if kind]
LABEL_OPS = [op for op in OPS if "labels" in op.targets]
case_ids = lambda cases: [f"{op.name}-{kind}" if kind else op.name for op, kind in cases]  # noqa: E731
NOT_FLOATS = [np.int64, np.bool_, object, np.complex128, np.float16]


def parameterized(op):
    """Whether op is a layer of index notation (Linear, LayerNorm, GLU), made for x's width where it has params."""
    return isinstance(op, TensorOp)


def has_classes(op):
    """Whether op reads rows of classes on its last axis (softmax, a row loss, Linear's features)."""
    if parameterized(op):  # an index-notation layer with params or a derived size, unless its x has one axis alone
        return bool(op.params or op.sizes) and any(len(axes) > 1 for axes in op.inputs.values())
    return {"layer": op.forward.has(sp.Sum), "loss": op.granularity == "row"}[op.kind]


def class_axis(op):
    """The first axis of an index-notation layer's first input whose size a param's axis or a declared size
    reads (Linear's in_features, BatchNorm's channels, GLU's K that H = K/2 halves, attention's embed_dim)."""
    read = {size_of(i) for axes, _ in op.params.values() for i in axes}
    read |= {s for formula in op.sizes.values() for s in formula.free_symbols}
    return next(n for n, i in enumerate(next(iter(op.inputs.values()))) if size_of(i) in read)


def make(op, x, reduction="mean", **options):
    """A fresh instance of op's generated class for input x."""
    cls = getattr(generated, op.name)
    if parameterized(op):
        return cls(**constructor_sizes(op, x), **({"rng": 0, "dtype": x.dtype} if op.params else {}),
                   **({"rng": 0} if op.noise and not op.params else {}))
    return cls(**options, reduction=reduction) if op.kind == "loss" else cls(**options)


def constructor_sizes(op, x):
    """An index-notation layer's size arguments for input x: an axis of x's its size there, any other
    (Linear's out_features) 2."""
    (axes, *_) = op.inputs.values()
    measured = {size_of(i): n for i, n in zip(axes, x.shape)}
    for other in (2, 1):   # 1 where 2 would leave a declared size no positive integer (attention's heads of x's
        found = {size: measured.get(size, other) for size in op.constructor_sizes}   # width 1, a kernel longer
        known = {**measured, **found}                                                 # than x's length 1)
        if all(f.subs(known).is_integer and f.subs(known) > 0 for f in op.sizes.values() if f.free_symbols <= set(known)):
            break
    return op.size_arguments(found)


def output_shape(op, rows, x_shape=None):
    """The shape of op's output for rows rows of the inputs' shape (4, 4) (a layer's, and its further axes)."""
    x = np.zeros(layer_shape(op, 4) if x_shape is None else x_shape)
    return (rows, *make(op, x).forward(*[x] * len(getattr(op, "inputs", None) or "x")).shape[1:])


def forward(op, instance, x, target):
    """instance's forward at x (x for every input of a layer of several: attention's Q, K and V)."""
    if op.kind == "loss":
        return instance.forward(x, target)
    return instance.forward(*[x] * len(getattr(op, "inputs", None) or "x"))


def backward(op, instance, y, reduction="mean", **options):
    """instance.backward with an all-ones upstream gradient where it takes one (options: a loss's); of a layer
    of several inputs, the first input's gradient."""
    takes_upstream = op.kind != "loss" or reduction == "none"
    upstream = (np.ones(np.shape(y), y.dtype),) if takes_upstream else ()
    grads = instance.backward(*upstream, **(options if op.kind == "loss" else {}))
    return grads[0] if isinstance(grads, tuple) else grads


@pytest.mark.parametrize("reduction", list(REDUCTIONS))
@pytest.mark.parametrize("op, kind", LOSS_CASES, ids=case_ids(LOSS_CASES))
def test_a_second_backward_of_a_loss_raises_and_a_new_forward_allows_one_more(op, kind, reduction):
    x, target = inputs(op, kind)
    instance = make(op, x, reduction)
    y = forward(op, instance, x, target)
    first = backward(op, instance, y, reduction).copy()
    with pytest.raises(RuntimeError, match=r"called a second time after one forward.*retain_graph=True"):
        backward(op, instance, y, reduction)
    forward(op, instance, x, target)
    assert np.array_equal(backward(op, instance, y, reduction), first)


def layer_shape(op, rows):
    """An index-notation layer's input shape with rows rows: width 4 (even: GLU halves it), then 2, 3 on any
    further axes (BatchNorm1d's length, BatchNorm2d's height and width)."""
    rank = len(next(iter(op.inputs.values())))
    return (rows, 4, *(2, 3)[:max(rank - 2, 0)])


def inputs(op, kind, shape=(4, 3), dtype=np.float64, seed=0):
    shape = layer_shape(op, shape[0]) if parameterized(op) else shape
    rng = np.random.default_rng(seed)
    return rng.uniform(*op.domain, shape).astype(dtype), sample_target(kind, shape, rng) if kind else None


def message(excinfo):
    return str(excinfo.value)


@pytest.mark.parametrize("dtype", NOT_FLOATS, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("op, kind", CASES, ids=case_ids(CASES))
def test_non_float_x_gets_a_type_error_naming_its_dtype(op, kind, dtype):
    x, target = inputs(op, kind)
    instance = make(op, x)
    name = next(iter(op.inputs)) if parameterized(op) else "x"   # attention's first input is Q
    with pytest.raises(TypeError, match=rf"{name} must be a float32 or float64 array, got dtype {np.dtype(dtype)}$"):
        forward(op, instance, x.astype(dtype), target)


@pytest.mark.parametrize("op, kind", [c for c in CASES if has_classes(c[0])],
                         ids=case_ids([c for c in CASES if has_classes(c[0])]))
def test_an_empty_or_missing_class_axis_is_refused(op, kind):
    full, at = (layer_shape(op, 3), class_axis(op)) if parameterized(op) else ((3, 1), 1)
    for shape in (full[:at] + (0,) + full[at + 1:], ()) if op.kind == "layer" else ((3, 0),):
        x = np.zeros(shape)
        target = np.zeros(3, int) if kind == "labels" else np.zeros(shape)
        instance = make(op, np.zeros(full[:at] + (1,) + full[at + 1:]))
        # an index-notation layer names the param whose axis x's must match, or the size x's makes; one without
        # a batch axis (BatchNorm's, which it sums over) the number of axes it takes
        name = next(iter(op.inputs)) if parameterized(op) else "x"
        expected = ((f"{op.name}: (.* and {name} has {re.escape(str(shape))}: their axes|size .* at these sizes)"
                     if shape else f"{op.name}: {name} must have (at least (1 axis|\\d axes)|(\\d or )?\\d axes), got shape \\(\\)")
                    if parameterized(op)
                    else re.escape(f"x needs a non-empty last (class) axis, got shape {shape}"))
        with pytest.raises(ValueError, match=expected):
            forward(op, instance, x, target)


@pytest.mark.parametrize("op, kind", [c for c in CASES if c[0].kind != "layer" and has_classes(c[0])],
                         ids=case_ids([c for c in CASES if c[0].kind != "layer" and has_classes(c[0])]))
def test_x_of_the_wrong_rank_is_refused(op, kind):
    instance = make(op, np.zeros((2, 3)))
    for shape in ((3,), (2, 3, 4)):
        with pytest.raises(ValueError, match=re.escape(f"x must have 2 dimensions, got shape {shape}")):
            forward(op, instance, np.zeros(shape), np.zeros(shape[0], int) if kind == "labels" else np.zeros(shape))


def any_shape(op):
    """Whether op takes x of any shape: an element-wise op, an index-notation one whose x has one axis alone."""
    return not (parameterized(op) and any(len(axes) > 1 for axes in op.inputs.values())) and not has_classes(op)


@pytest.mark.parametrize("op, kind", [c for c in CASES if any_shape(c[0])],
                         ids=case_ids([c for c in CASES if any_shape(c[0])]))
@pytest.mark.parametrize("shape", [(), (0,), (2, 0), (3,), (2, 3, 2)])
def test_element_wise_ops_take_any_shape_even_empty(op, kind, shape):
    x, target = np.full(shape, 0.5), np.full(shape, 0.25)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        instance = make(op, x, reduction="none")
        y = forward(op, instance, x, target)
        dx = backward(op, instance, y, reduction="none")
    assert np.shape(y) == shape and dx.shape == shape


@pytest.mark.parametrize("op, kind", LOSS_CASES, ids=case_ids(LOSS_CASES))
def test_a_target_of_the_wrong_shape_names_the_expected_and_actual_shapes(op, kind):
    x = np.zeros((4, 3))
    if kind == "labels":
        expected, wrong = (4,), [(5,), (3,), (4, 1), (4, 3)]
    else:
        expected, wrong = (4, 3), [(4, 4), (3, 3), (4, 3, 1)]
    for shape in wrong:
        target = np.zeros(shape, int if kind == "labels" else float)
        with pytest.raises(ValueError) as excinfo:
            make(op, x).forward(x, target)
        assert all(part in message(excinfo) for part in ("target", str(expected), str(shape))), message(excinfo)


@pytest.mark.parametrize("op", LABEL_OPS, ids=[op.name for op in LABEL_OPS])
def test_labels_out_of_range_name_the_first_position_and_value(op):
    x = np.zeros((6, 3))
    ignore_index = next((p.default for p in op.params if p.kind == "ignore_index"), None)
    for bad, at in ((3, 2), (-1, 1), (1000, 4), (-100 if ignore_index is None else -99, 0)):
        target = np.array([0, 1, 2, 0, 1, 7])  # 7: a second bad label, after the one named
        target[at] = bad
        with pytest.raises(ValueError, match=rf"target\[{at}\] = {bad} is not a class index in \[0, 3\)"):
            make(op, x).forward(x, target)
    if ignore_index is not None:
        make(op, x).forward(x, np.array([0, ignore_index, 2, 0, 1, 2]))


@pytest.mark.parametrize("op", LABEL_OPS, ids=[op.name for op in LABEL_OPS])
def test_float_or_bool_labels_are_refused(op):
    x = np.zeros((3, 3))
    with pytest.raises(ValueError, match=r"integer class labels, got dtype float64: target\[1\] = 1\.5$"):
        make(op, x).forward(x, np.array([0.0, 1.5, 2.0]))
    with pytest.raises(ValueError, match=r"target\[0\] = 0\.0 \(convert with target\.astype\(int\)\)"):
        make(op, x).forward(x, np.array([0.0, 1.0, 2.0]))
    with pytest.raises(TypeError, match="integer class labels, got dtype bool"):
        make(op, x).forward(x, np.array([True, False, True]))


DENSE_OPS = [op for op in OPS if "dense" in op.targets]


@pytest.mark.parametrize("op", DENSE_OPS, ids=[op.name for op in DENSE_OPS])
def test_dense_targets_outside_their_range_name_the_first_position_and_value(op):
    x = np.zeros((3, 3))
    low, high = op.target_range
    for bound, step in ((low, -0.25), (high, 0.5)):
        target = np.full((3, 3), 0.5)
        target[0, 0] = np.nan  # passes, and hides no entry out of range (the check skips NaN, fmin)
        target[1, 2] = (0.0 if bound is None else bound) + step
        target[2, 2] = target[1, 2]
        if bound is None:  # no bound on that side: accepted
            make(op, x).forward(x, target)
            continue
        with pytest.raises(ValueError, match=re.escape(f"target[1, 2] = {target[1, 2]}")):
            make(op, x).forward(x, target)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("low, high", [(0, 1), (0, None), (0, 0.1), (-1, 1)])
def test_a_dense_target_range_holds_to_the_last_float_at_each_bound(low, high, dtype):
    """Each bound itself passes and the next float beyond it is refused, whichever test decides: the one
    reduction of the target read as integers (low = 0), or the exact one it hands -0 and NaN to. A bound
    compares in the target's dtype, as NumPy compares (0.1 is float16's nearest to it). The refusal names
    the entry."""
    x = np.zeros(6)
    inside = [low, -0.0, np.nan, np.finfo(dtype).smallest_subnormal] + ([] if high is None else [high])
    beyond = [np.nextafter(dtype(low), dtype(-np.inf))] + ([] if high is None else [np.nextafter(dtype(high), dtype(np.inf))])
    for value in inside:
        if value >= low and (high is None or value <= high) or np.isnan(value):
            target = np.array([0, 0, value, 0, 0, 0], dtype)
            assert np.array_equal(dense_target(target, x, low, high), target.astype(x.dtype), equal_nan=True)
    for value in beyond:
        target = np.array([0, 0, 0, 0, value, 0], dtype)
        with pytest.raises(ValueError, match=re.escape(f"target[4] = {target[4]}")):
            dense_target(target, x, low, high)


@pytest.mark.parametrize("op", [op for op in OPS if op.targets == ("dense",)],
                         ids=[op.name for op in OPS if op.targets == ("dense",)])
def test_a_non_float_dense_target_is_refused(op):
    with pytest.raises(TypeError, match="target must hold a float array of x's shape, got dtype int64"):
        make(op, np.zeros((2, 3))).forward(np.zeros((2, 3)), np.zeros((2, 3), int))


@pytest.mark.parametrize("op, kind", CASES, ids=case_ids(CASES))
def test_an_upstream_gradient_of_the_wrong_shape_or_dtype_is_refused(op, kind):
    x, target = inputs(op, kind)
    instance = make(op, x, reduction="none")
    y = forward(op, instance, x, target)
    name = "G" if op.kind == "loss" else "g"
    wrong = y.shape[:-1] + (y.shape[-1] + 1,)
    with pytest.raises(ValueError, match=re.escape(f"{name} must have shape {y.shape}, got {wrong}")):
        instance.backward(np.ones(wrong))
    with pytest.raises(TypeError, match=f"{name} must be a float array, got dtype int64"):
        instance.backward(np.ones(y.shape, int))
    if op.kind == "loss":
        with pytest.raises(ValueError, match='takes G exactly when reduction="none"'):
            instance.backward()
        mean = make(op, x)
        mean.forward(x, target)
        with pytest.raises(ValueError, match='takes G exactly when reduction="none"'):
            mean.backward(np.ones(y.shape))


@pytest.mark.parametrize("op, kind", CASES, ids=case_ids(CASES))
def test_backward_without_a_successful_forward_is_refused(op, kind):
    x, target = inputs(op, kind)
    instance = make(op, x)
    before = rf"{op.name}\.backward\(\) called before forward\(\) \(or after one that raised\)"
    with pytest.raises(RuntimeError, match=before):
        backward(op, instance, np.ones(output_shape(op, 4) if parameterized(op) else (4, 3)))
    y = forward(op, instance, x, target)
    with pytest.raises(TypeError):
        forward(op, instance, x.astype(int), target)
    with pytest.raises(RuntimeError, match=before):
        backward(op, instance, y)


def test_sequential_backward_before_forward_names_the_layer():
    net = generated.Sequential([generated.Linear(3, 2), generated.ReLU()])
    with pytest.raises(RuntimeError, match=r"ReLU\.backward\(\) called before forward\(\)"):
        net.backward(np.ones((4, 2)))


def test_sequential_refuses_what_is_not_a_layer():
    with pytest.raises(TypeError, match=r"layers\[1\] \(int\) has no forward\(\) and backward\(\)"):
        generated.Sequential([generated.ReLU(), 3])


def test_sgd_step_before_backward_or_after_a_parameter_changed_shape_is_refused():
    layer = generated.Linear(3, 2)
    optimizer = generated.SGD([(layer, "W")], lr=0.1)
    with pytest.raises(RuntimeError, match=r"no gradient for Linear\.W: call backward\(\) first"):
        optimizer.step()
    layer.W = np.zeros((4, 2))
    layer.forward(np.zeros((5, 4)))
    layer.backward(np.ones((5, 2)))
    with pytest.raises(ValueError, match=re.escape("Linear.W has shape (4, 2), its gradient (4, 2) and SGD's "
                                                   "velocity (3, 2): was W replaced after SGD was made?")):
        optimizer.step()


def test_linear_refuses_x_of_another_width_or_dtype():
    layer = generated.Linear(3, 2)
    with pytest.raises(ValueError, match=re.escape("Linear: W has shape (3, 2) and x has (4, 2): their axes i must")):
        layer.forward(np.zeros((4, 2)))
    with pytest.raises(TypeError, match="Linear: W has dtype float64 but x has float32"):
        layer.forward(np.zeros((4, 3), np.float32))


LOSSES = [op for op in OPS if op.kind == "loss"]


@pytest.mark.parametrize("op", LOSSES, ids=[op.name for op in LOSSES])
def test_bad_loss_options_are_named(op):
    x, target = inputs(op, op.targets[0])
    # mean, sum, none and the op's own further means (KLDivLoss's batchmean)
    with pytest.raises(ValueError, match=re.escape(f"reduction must be one of {(*REDUCTIONS, *op.means)}, got 'avg'")):
        make(op, x, reduction="avg")
    for param in op.params:
        if param.kind in ("class_weights", "element_weights"):
            with pytest.raises(ValueError, match=rf"{param.name} (must have shape|of shape \(2,\) does not)"):
                make(op, x, **{param.name: np.ones(2)}).forward(x, target)
            with pytest.raises(TypeError, match=f"{param.name} must hold real numbers, got dtype <U1"):
                make(op, x, **{param.name: np.array(["a"] * 3)}).forward(x, target)


@pytest.mark.parametrize("reduction", list(REDUCTIONS))
@pytest.mark.parametrize("op, kind", CASES, ids=case_ids(CASES))
def test_a_second_backward_gives_the_same_result(op, kind, reduction):
    """Layers keep what forward saved; a loss frees it unless told to retain it, as in PyTorch."""
    x, target = inputs(op, kind)
    options = example_options(op, x.shape, np.random.default_rng(1)) if not parameterized(op) else {}
    instance = make(op, x, reduction, **options)
    y = forward(op, instance, x, target)
    first = backward(op, instance, y, reduction, retain_graph=True)
    kept = [first.copy()] + [getattr(instance, "d" + name).copy() for name in getattr(instance, "params", ())]
    second = backward(op, instance, y, reduction)
    assert np.array_equal(first, kept[0]), "the second backward changed the first one's result"
    again = [second] + [getattr(instance, "d" + name) for name in getattr(instance, "params", ())]
    assert all(np.array_equal(a, b) for a, b in zip(again, kept))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("reduction", list(REDUCTIONS))
@pytest.mark.parametrize("op, kind", CASES, ids=case_ids(CASES))
def test_an_empty_batch_gives_pytorchs_result_without_warnings(op, kind, reduction, dtype):
    """N = 0: layers give empty outputs; a loss's mean is NaN and its sum 0, as in PyTorch."""
    x, target = inputs(op, kind, shape=(0, 3), dtype=dtype)
    expected = output_shape(op, 0) if op.kind == "layer" and parameterized(op) else (0, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        instance = make(op, x, reduction)
        y = forward(op, instance, x, target)
        dx = backward(op, instance, y, reduction)
    assert dx.shape == x.shape and dx.dtype == dtype and y.dtype == dtype
    if op.kind != "loss":
        assert y.shape == expected
        assert all(np.array_equal(getattr(instance, "d" + name), np.zeros_like(getattr(instance, name)))
                   for name in getattr(instance, "params", ()))
    elif reduction == "none":
        assert y.shape == ((0,) if op.granularity == "row" else x.shape)
    else:
        assert y.shape == () and (np.isnan(y) if reduction == "mean" else y == 0)


IGNORING = [op for op in OPS if not parameterized(op) and any(p.kind == "ignore_index" for p in op.params)]


@pytest.mark.parametrize("op", IGNORING, ids=[op.name for op in IGNORING])
def test_every_row_ignored_gives_a_nan_mean_and_a_zero_gradient_as_pytorch(op):
    ignore_index = next(p.default for p in op.params if p.kind == "ignore_index")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = make(op, np.zeros((2, 3)))
        value = loss.forward(np.ones((2, 3)), np.full(2, ignore_index))
        assert np.isnan(value) and np.array_equal(loss.backward(), np.zeros((2, 3)))


@pytest.mark.parametrize("op, kind", CASES, ids=case_ids(CASES))
def test_inputs_are_not_modified(op, kind):
    rng = np.random.default_rng(6)
    x, target = inputs(op, kind, shape=(4, 3))
    options = example_options(op, x.shape, rng) if not parameterized(op) else {}
    target = with_ignored_row(target, op) if kind else None
    arrays = [x] + ([target] if kind else []) + [v for v in options.values() if isinstance(v, np.ndarray)]
    before = [a.copy() for a in arrays]
    for a in arrays:  # a write into any of them raises
        a.flags.writeable = False
    for reduction in REDUCTIONS if op.kind == "loss" else ("mean",):
        instance = make(op, x, reduction, **options)
        y = forward(op, instance, x, target)
        upstream = rng.normal(size=np.shape(y))
        upstream_before = upstream.copy()
        upstream.flags.writeable = False
        if op.kind != "loss" or reduction == "none":
            instance.backward(upstream)
        else:
            instance.backward()
        assert np.array_equal(upstream, upstream_before)
    assert all(np.array_equal(a, b) for a, b in zip(arrays, before))


def nan_problems(op, kind, make_instance, reduction):
    """How the outputs of one forward and backward with one NaN in x (or the target) break the NaN
    policy; [] when they keep it. The policy: every value that depends on the NaN is NaN (an element,
    the row of a row op, the loss), every other stays finite; the gradient is NaN at the NaN itself."""
    x, target = inputs(op, kind, shape=(4, 3), seed=2)
    target = with_ignored_row(target, op) if kind else None  # row 0 ignored where the op can; the NaN is in row 2
    at = (2, 1)
    if parameterized(op):
        return layer_nan_problems(op, make_instance, x, at + (1,) * (x.ndim - 2))
    problems = []
    for where in ("x", "target") if kind == "dense" else ("x",):
        x_nan, target_nan = x.copy(), None if target is None else target.copy()
        (x_nan if where == "x" else target_nan)[at] = np.nan
        instance = make_instance(x_nan)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            y = forward(op, instance, x_nan, target_nan)
            dx = backward(op, instance, y, reduction)
        depends = np.zeros(x.shape if op.kind == "loss" else y.shape, bool)
        # a row loss with no sum over the classes (NLL) reads the entry at the label alone
        at_label_only = not parameterized(op) and op.kind == "loss" and op.granularity == "row" and not op.forward.has(
            sp.Sum) and where == "x"
        read = not at_label_only or target[at[0]] == at[1]
        # a gradient that does not read the entry (KLDivLoss's -t, linear in x) keeps its NaN out, as PyTorch's
        gradient_read = read and (op.kind == "layer" or gradient_reads(op.name, kind, where))
        depends[at[0] if has_classes(op) else at] = read
        if op.kind == "loss":
            depends = depends[:, 0] if op.granularity == "row" else depends
            depends = depends if reduction == "none" else np.array(depends.any())
        if not np.array_equal(np.isnan(y), depends):
            problems.append(f"NaN in {where}: forward NaN at {np.argwhere(np.isnan(y)).tolist()}")
        gradient = instance.dW if parameterized(op) else dx
        nan_at, rows = (at[1], at[1]) if parameterized(op) else (at, at[0] if has_classes(op) else at)
        elsewhere = np.ones(gradient.shape, bool)
        elsewhere[rows] = not gradient_read
        if gradient_read and not np.isnan(gradient[nan_at]).all() or np.isnan(gradient[elsewhere]).any():
            problems.append(f"NaN in {where}: gradient NaN at {np.argwhere(np.isnan(gradient)).tolist()}")
    return problems


@functools.cache
def gradient_reads(name, kind, where):
    """Whether some variant of a catalog loss's gradient reads x (or the target t, where says), itself or through
    what its forward saved (a softmax p): NLLLoss's -delta(c, j) and KLDivLoss's -t do not read x."""
    from derive.gradients import loss_gradient, variants
    from derive.symbols import t, x
    op = CATALOG[name]
    arrays = [t] if where == "target" else [x] + [base for base, _ in op.saved]
    return any(loss_gradient(op, kind, values).has(*arrays) for values in variants(op, kind).values())


def layer_nan_problems(op, make_instance, x, at):
    """The NaN policy of an index-notation layer, told by where its values depend on x[at]: every value of
    y, dx and each param's gradient that changes when x[at] does (by three steps, so that no coincidence hides
    one) is NaN once x[at] is, and no other."""
    upstream = np.random.default_rng(0).normal(size=output_shape(op, x.shape[0], x.shape))

    def outputs(x):
        layer = make_instance(x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            y = layer.forward(*[x] * len(op.inputs))   # x for every input (attention's Q, K, V)
            grads = layer.backward(upstream)
        grads = grads if isinstance(grads, tuple) else (grads,)
        return {"y": y, **{f"d{a}": d for a, d in zip(op.inputs, grads)},
                **{f"d{p}": getattr(layer, f"d{p}") for p in layer.params}}
    plain = outputs(x)
    depends = {name: np.zeros(value.shape, bool) for name, value in plain.items()}
    for step in (0.37, -1.9, 100.0):   # and one that makes x[at] the largest (a max pooling reads only that)
        moved = x.copy()
        moved[at] += step
        for name, value in outputs(moved).items():
            depends[name] |= value != plain[name]
    # a value no entry of x moves (attention's dbv = Sum g_o, its softmax rows summing to 1) depends on x only
    # through an identity: NaN there or not, either is right
    moved = outputs(x + np.random.default_rng(1).normal(size=x.shape))
    free = {name: np.isclose(value, moved[name], rtol=1e-12, atol=0) for name, value in plain.items()}
    x[at] = np.nan
    return [f"NaN in x: {name} NaN at {np.argwhere(np.isnan(value)).tolist()}, its dependents at "
            f"{np.argwhere(depends[name]).tolist()}" for name, value in outputs(x).items()
            if not np.array_equal(np.isnan(value) & ~free[name], depends[name] & ~free[name])]


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("options", [False, True], ids=["defaults", "options"])
@pytest.mark.parametrize("op, kind", CASES, ids=case_ids(CASES))
def test_nan_propagates_to_every_value_that_depends_on_it(op, kind, options, reduction):
    values = example_options(op, (4, 3), np.random.default_rng(3)) if options and not parameterized(op) else {}
    assert nan_problems(op, kind, lambda x: make(op, x, reduction, **values), reduction) == []


def test_the_nan_check_catches_a_kernel_that_swallows_nan():
    """np.where(x > 0, g, 0), ReLU's backward before kinks became steps, turns a NaN x into 0."""
    class Swallowing(generated.ReLU):
        def backward(self, g):
            (x,) = self._saved
            return np.where(x > 0, g, 0)
    problems = nan_problems(CATALOG["ReLU"], None, lambda x: Swallowing(), "mean")
    assert problems == ["NaN in x: gradient NaN at []"]


def test_the_layer_nan_check_catches_a_gradient_that_swallows_nan_or_spreads_it():
    class Swallowing(generated.LayerNorm):
        def backward(self, g):
            return np.nan_to_num(super().backward(g))

    class Spreading(generated.LayerNorm):
        def backward(self, g):
            dx = super().backward(g)
            return dx + 0 * dx.sum()  # NaN in one row's gradient makes every row's NaN
    op = CATALOG["LayerNorm"]
    x = inputs(op, None, seed=2)[0]
    assert layer_nan_problems(op, lambda x: generated.LayerNorm(4), x.copy(), (2, 1)) == []
    for cls in (Swallowing, Spreading):
        (problem,) = layer_nan_problems(op, lambda x: cls(4), x.copy(), (2, 1))
        assert problem.startswith("NaN in x: dx NaN at")


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("op", LABEL_OPS, ids=[op.name for op in LABEL_OPS])
def test_labels_find_their_rows_whatever_batch_size_came_before(op, reduction):
    """label_positions keeps the row numbers of the last batch size it saw: a batch of another size,
    after one or between two of one size, still reads each row's own label (a mean: in the common case)."""
    for n in (5, 3, 5, 7, 3, 1):
        x, labels = inputs(op, "labels", shape=(n, 4), seed=n)
        expected = references.LOSSES[op.name](x, labels, reduction)
        assert np.allclose(make(op, x, reduction).forward(x, labels), expected, rtol=1e-12, atol=0), n


def checked_only(monkeypatch, op):
    """Patches op's module so that its checked path raises AssertionError: what still runs took the common case."""
    def checked(*args, **kwargs):
        raise AssertionError("the checked path ran")
    monkeypatch.setattr(getattr(generated, op.module), "label_column", checked)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("op", LABEL_OPS, ids=[op.name for op in LABEL_OPS])
def test_the_common_case_gives_the_checked_paths_bits(op, dtype, monkeypatch):
    """forward's common case (an array of labels, each a class, a mean, no option) is a shortcut for speed
    at small sizes: its loss, dx, retained dx and freed state are those of the checked path (which a list
    of the same labels takes), bit for bit."""
    x, labels = inputs(op, "labels", shape=(6, 5), dtype=dtype, seed=2)
    checked = make(op, x)
    results = [checked.forward(x, labels.tolist()), checked.backward(retain_graph=True), checked.backward()]
    checked_only(monkeypatch, op)
    common = make(op, x)
    for expected, got in zip(results, [common.forward(x, labels), common.backward(retain_graph=True),
                                       common.backward()]):
        assert got.dtype == expected.dtype == dtype and np.array_equal(got, expected)
    with pytest.raises(RuntimeError, match="called a second time"):
        common.backward()
    with pytest.raises(AssertionError, match="the checked path ran"):
        common.forward(x, labels.tolist())


@pytest.mark.parametrize("op", LABEL_OPS, ids=[op.name for op in LABEL_OPS])
def test_the_common_case_leaves_what_it_cannot_take_to_the_checked_path(op, monkeypatch):
    """Each input or option outside the common case goes the checked way (which here raises): a label
    outside [0, K), another reduction, every option away from its neutral value, an ignore_index that is a
    class."""
    x, labels = inputs(op, "labels", shape=(6, 5), seed=3)
    checked_only(monkeypatch, op)
    make(op, x).forward(x, labels)  # taken: the rest would be too, but for what each changes
    bad = labels.copy()
    bad[2] = x.shape[1]
    others = [(make(op, x), bad), (make(op, x), -bad), (make(op, x, "sum"), labels),
              (make(op, x), labels.astype(np.float64)), (make(op, x), labels[:, None])]
    options = example_options(op, x.shape, np.random.default_rng(0))
    others += [(make(op, x, **{p.name: options[p.name]}), labels) for p in op.params
               if p.neutral is not None and p.kind != "ignore_index"]
    if op in IGNORING:
        others.append((make(op, x, ignore_index=1), labels))
    for loss, target in others:
        with pytest.raises(AssertionError, match="the checked path ran"):
            loss.forward(x, target)


@pytest.mark.parametrize("op", IGNORING, ids=[op.name for op in IGNORING])
def test_an_ignore_index_that_is_a_class_drops_that_class_rows(op):
    """label_column reports ignored rows itself; here ignore_index = 1 is also a valid class index."""
    x, labels = inputs(op, "labels", shape=(6, 3), seed=4)
    labels[[1, 4]] = 1
    loss = make(op, x, ignore_index=1)
    expected = references.LOSSES[op.name](x, labels, "mean", ignore_index=1)
    assert np.isclose(loss.forward(x, labels), expected, rtol=1e-12)
    assert not loss.backward()[[1, 4]].any()
