"""Property-based tests (hypothesis) of every catalog entry at extreme values: logits up to +-1e4 in
float32 and float64, exponentials' overflow points (+-80, +-88.8, +-100, +-700), rows with one huge
entry and all-equal rows. No floating-point overflow or invalid operation happens on the way, every
value and gradient is finite, and each value agrees with the float64 reference of tests/references.py."""
import numpy as np
import pytest
import sympy as sp
from hypothesis import assume, given, settings, strategies as st
from hypothesis.extra.numpy import arrays

import generated
from codegen.tensor_lower import lowered, max_shifted, mean_corrected, names_of, program_of
from derive.catalog import CATALOG
from derive.ops import Op
from derive.tensor import size_of, with_flags
from tests.references import evaluated_shifted
from tests import references
from tests.test_errors import CASES, backward, case_ids, forward, make

BOUND = 1e4
EXTREMES = [0.0, 80.0, -80.0, 88.8, -88.8, 100.0, -100.0, 700.0, -700.0, BOUND, -BOUND]
ROWS = ("free", "all equal", "one huge entry")


@st.composite
def extreme_case(draw, kind, dtype):
    """(x, target): x of shape (N, K) from [-1e4, 1e4] and the extremes, target of the kind."""
    n, k = draw(st.integers(1, 4)), draw(st.integers(1, 5))
    width = np.finfo(dtype).bits
    values = st.one_of(st.floats(-BOUND, BOUND, width=width), st.sampled_from(EXTREMES))
    x = draw(arrays(dtype, (n, k), elements=values))
    rows = draw(st.sampled_from(ROWS))
    if rows == "all equal":
        x[:] = x[:, :1]
    elif rows == "one huge entry":
        x[:] = -BOUND
        x[np.arange(n), draw(arrays(np.int64, n, elements=st.integers(0, k - 1)))] = BOUND
    if kind == "labels":
        return x, draw(arrays(np.int64, n, elements=st.integers(0, k - 1)))
    return x, None if kind is None else draw(arrays(dtype, (n, k), elements=st.floats(0, 1, width=width)))


def reference(op, instance, x, target):
    """The float64 value of op at x from tests/references.py (per entry for a loss)."""
    if not isinstance(op, Op):  # an index-notation layer: its steps, by derive.tensor's loops
        return steps_value(op, instance, x)
    x = x.astype(np.float64)
    if op.kind == "layer":
        return references.LAYERS[op.name](x)
    return references.LOSSES[op.name](x, target, "none")


def steps_value(op, instance, x):
    """The output of an index-notation layer's steps at x and instance's params and options, in float64 (an
    option left None at x's machine epsilon; the noise its last forward drew), x's leading axes flattened into
    the batch axis as the class flattens them."""
    (name, axes), *_ = op.inputs.items()   # x for every input (attention's Q, K and V)
    lead = x.shape[:x.ndim - len(axes) + 1]
    saved = dict(zip(lowered(op)[1].args, instance._saved))   # what backward reads: the noise too
    arrays = {**{a: x.reshape((-1,) + x.shape[len(lead):]).astype(np.float64) for a in op.inputs},
              **{p: getattr(instance, p).astype(np.float64) for p in op.params},
              **{z: saved[z].astype(np.float64) for z in op.noise or {}}}
    window = op.window or {}
    if window.get("input"):   # the class's padding around the steps' input (zeros, -inf for a max)
        widths = [(0, 0)] * len(axes)
        for axis, width in zip(window["padded"], instance.padding):
            widths[axis] = (width, width)
        arrays[window["input"]] = np.pad(arrays[window["input"]], widths, constant_values=window["fill"])
    scope = {size_of(i): size for name, axes in [*op.inputs.items(), *((p, a) for p, (a, _) in op.params.items())]
             for i, size in zip(axes, arrays[name].shape)}
    for size, argument in op.constructor_sizes.items():   # a pooling's window: the constructor's kernel_size
        if str(size) in op.given_sizes:
            shared = [s for s, a in op.constructor_sizes.items() if a == argument]
            value = getattr(instance, argument)
            scope[size] = value[shared.index(size)] if len(shared) > 1 else value
    scope |= {size_of(i): int(formula.subs(scope)) for i, formula in op.sizes.items()}
    options = {o: getattr(instance, o) for o in op.options}
    scope |= {sp.Symbol(o, real=True): float(np.finfo(x.dtype).eps if v is None else v) for o, v in options.items()}
    # the instance's flags; a sum of exponentials shifted by its max and a centred mean corrected (each rewrite's
    # test is test_tensor_codegen's), as the plain exp overflows at these values and the plain mean of a
    # constant row of 2731.2 is 1e-13 off, which x - mu then divides by sqrt(eps)
    variant, taken = with_flags(op, {f: getattr(instance, f) for f in op.flags or {}}), set(names_of(op))
    program = mean_corrected(max_shifted(program_of(variant), taken), taken)
    value = evaluated_shifted(program.forward, arrays, scope)[op.steps[-1].name]
    if window.get("strided"):   # the class's stride of the output
        index = [slice(None)] * value.ndim
        for axis, stride in zip(window["strided"], instance.stride):
            index[axis] = slice(None, None, stride)
        value = value[tuple(index)]
    return value.reshape(lead + value.shape[1:])


def check_extremes(op, kind, x, target, instance):
    """Forward and backward of instance at x raise no floating-point error, give finite values and
    gradients, and values close to the reference."""
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        y = forward(op, instance, x, target)
        dx = backward(op, instance, y, "none")
    gradients = [dx] + [getattr(instance, "d" + name) for name in getattr(instance, "params", ())]
    assert y.dtype == x.dtype and all(np.isfinite(a).all() for a in [y] + gradients)
    scale = 64 * np.finfo(x.dtype).eps * (1 + np.abs(x).max()) * x.shape[-1]
    np.testing.assert_allclose(y, reference(op, instance, x, target), atol=scale,
                               rtol=1e-4 if x.dtype == np.float32 else 1e-10)


# an index-notation layer's reference is derive.tensor's loops, a second per example at BatchNorm2d's sizes: fewer
# (codegen.accuracy's survey holds each of them to the accuracy contract over the whole range besides)
INDEXED = [(op, kind) for op, kind in CASES if not isinstance(op, Op)]
PLAIN = [(op, kind) for op, kind in CASES if isinstance(op, Op)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("op, kind", PLAIN, ids=case_ids(PLAIN))
@settings(max_examples=30, deadline=None, derandomize=True, database=None)
@given(data=st.data())
def test_extreme_values_give_finite_values_and_gradients_close_to_the_reference(op, kind, dtype, data):
    extreme_values_case(op, kind, dtype, data)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("op, kind", INDEXED, ids=case_ids(INDEXED))
@settings(max_examples=5, deadline=None, derandomize=True, database=None)
@given(data=st.data())
def test_extreme_values_of_an_index_notation_layer_give_finite_values_close_to_its_steps(op, kind, dtype, data):
    extreme_values_case(op, kind, dtype, data)


def extreme_values_case(op, kind, dtype, data):
    x, target = data.draw(extreme_case(kind, dtype))
    if not isinstance(op, Op):  # an index-notation layer's further axes (BatchNorm2d's h, w) of size 1
        x = x.reshape(x.shape + (1,) * (len(next(iter(op.inputs.values()))) - 2))
    instance = make(op, x, "none")
    if not isinstance(op, Op):  # a shape an index-notation layer refuses (GLU's odd width, BatchNorm's single
        try:                    # row in training) is no case of this test
            instance.forward(*[x] * len(op.inputs))
        except ValueError as error:
            assume("at these sizes" not in str(error) and "more than one value" not in str(error))
    check_extremes(op, kind, x, target, instance)


def test_the_check_catches_a_softmax_without_the_max_shift():
    class Unshifted(generated.Softmax):
        def forward(self, x):
            y = np.exp(x) / np.sum(np.exp(x), axis=-1, keepdims=True)
            self._saved = (y,)
            return y
    x = np.array([[BOUND, 0.0]])
    check_extremes(CATALOG["Softmax"], None, x, None, generated.Softmax())
    with pytest.raises(FloatingPointError, match="overflow"):
        check_extremes(CATALOG["Softmax"], None, x, None, Unshifted())


LOSS_CASES = [(op, kind) for op, kind in CASES if op.kind == "loss"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("op, kind", LOSS_CASES, ids=case_ids(LOSS_CASES))
@settings(max_examples=30, deadline=None, derandomize=True, database=None)
@given(data=st.data())
def test_summed_losses_at_extreme_values_are_the_references_total(op, kind, dtype, data):
    # a mean or a sum takes the summed forward (an element-wise loss adds each term's total): its
    # error must stay that of adding the losses one by one, a rounding of the largest term per entry
    x, target = data.draw(extreme_case(kind, dtype))
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        value = forward(op, make(op, x, "sum"), x, target)
    expected = reference(op, None, x, target).sum()
    scale = 64 * np.finfo(dtype).eps * (1 + np.abs(x).max()) * x.size
    assert value.dtype == dtype and np.isfinite(value)
    assert abs(float(value) - expected) <= scale + (1e-4 if dtype == np.float32 else 1e-10) * abs(expected)
