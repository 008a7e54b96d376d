"""The fast forms of window operations (issue 25, target 2): a window contracted with one array is one matrix
product over a copy whose runs are the positions (im2col), a strided window is read at its stride in the view, and
the transposed read of a strided position is its adjoint's scatter (windows_added, col2im). Speed is shown by
python -m codegen.bench; these tests hold the forms and their values."""
import numpy as np
import pytest

import generated
from codegen.tensor_lower import lowered, trimmed
from derive.catalog import CATALOG
from derive.tensor import with_flags


def windows_added_by_loops(windows, shape, axes, taps, stride):
    """windows_added's meaning, one entry at a time: windows[..., p, q, t, r] added at (s p + t, s' q + r)."""
    added = np.zeros(shape, windows.dtype)
    windows = np.broadcast_to(windows, windows.shape[:len(shape)] + tuple(taps))
    for index in np.ndindex(*windows.shape):
        at = list(index[:len(shape)])
        for k, axis in enumerate(axes):
            at[axis] = stride[k] * index[axis] + index[len(shape) + k]
        added[tuple(at)] += windows[index]
    return added


@pytest.mark.parametrize("taps, stride, size", [((3, 3), (1, 1), (7, 6)), ((2, 2), (2, 2), (6, 6)),
                                                ((3, 2), (2, 3), (8, 9)), ((2, 3), (3, 1), (9, 5)),
                                                ((2, 3), (3, 4), (9, 11))],
                         ids=["overlapping", "tiling", "strides", "overlapping-one-way", "gaps"])
def test_windows_added_adds_each_window_where_it_was_read(taps, stride, size):
    rng = np.random.default_rng(0)
    positions = [(n - t) // s + 1 for n, t, s in zip(size, taps, stride)]
    windows = rng.standard_normal((2, 3, *positions, *taps)).astype(np.float32)
    shape = (2, 3, *size)
    added = generated._tensor.windows_added(windows, shape, (2, 3), taps, stride)
    assert added.dtype == np.float32
    np.testing.assert_allclose(added, windows_added_by_loops(windows, shape, (2, 3), taps, stride), atol=1e-6)
    # a tap axis of size 1: one value for every tap (an average pooling's g)
    one = windows[..., :1, :]
    np.testing.assert_allclose(generated._tensor.windows_added(one, shape, (2, 3), taps, stride),
                               windows_added_by_loops(one, shape, (2, 3), taps, stride), atol=1e-6)
    # windows in a product's order (c, t, r, n, p, q), as Conv2d's dx gets them: the sum laid out as (c, n, h, w)
    product = np.ascontiguousarray(windows.transpose(1, 4, 5, 0, 2, 3)).transpose(3, 0, 4, 5, 1, 2)
    added = generated._tensor.windows_added(product, shape, (2, 3), taps, stride)
    np.testing.assert_allclose(added, windows_added_by_loops(windows, shape, (2, 3), taps, stride), atol=1e-6)
    assert added.transpose(1, 0, 2, 3).flags.c_contiguous


def test_first_max_marks_the_first_largest_of_each_window_a_nan_largest():
    rng = np.random.default_rng(2)
    a = rng.integers(0, 3, (4, 5, 2, 3)).astype(np.float32)    # ties in most windows
    a[0, 0, 1, 2], a[1, 1] = np.nan, -np.inf
    a[2, 2, 0, 1] = a[2, 2, 1, 0] = np.nan
    mask = generated._tensor.first_max(a, (2, 3))
    flat = a.reshape(4, 5, 6)
    expected = np.arange(6) == np.argmax(flat, axis=-1)[..., None]
    assert mask.dtype == np.float32
    np.testing.assert_array_equal(mask.reshape(4, 5, 6), expected)


def test_trimmed_keeps_each_entry_on_its_axis():
    """'...' before entries whose trailing ':' were dropped would move them to the last axes: x[:, :, ::2] of 5
    axes is not x[..., ::2]."""
    assert trimmed([":", ":", "::2", ":", ":"]) == [":", ":", "::2"]
    assert trimmed([":", ":", "None", "None", ":", ":"]) == [":", ":", "None", "None"]
    assert trimmed([":", ":", ":U", ":", "::2"]) == ["...", ":U", ":", "::2"]


def printed(name):
    forward, backward, *_ = lowered(with_flags(CATALOG[name], {}))
    return str(forward), str(backward)


def test_a_convolution_is_one_matrix_product_over_strided_windows():
    """Conv2d: forward copies the window with the positions (j) last, the runs the copy reads, as one matrix
    (no batch of small products) and saves it; dweight reads that copy again rather than a second
    one; the windows read at the stride; dx adds the product's windows back at the stride, g never dilated nor a
    window read backwards; dweight reads the saved copy as it is, not transposed (the faster product)."""
    forward, backward = printed("Conv2d")
    assert ("x_windows = sliding_window_view(sliding_window_view(x, U, axis=2)[:, :, ::stride[0]], V, axis=3)"
            "[:, :, :, ::stride[1]].transpose(1, 4, 5, 0, 2, 3).reshape(C*U*V, N*I*J)") in forward
    assert "(weight.reshape(O, C*U*V) @ x_windows).reshape(O, N, I, J).transpose(1, 0, 2, 3)" in forward
    assert "return y, x_windows" in forward and "def backward(x, weight, x_windows, g, stride)" in backward
    assert "I = (H - U) // stride[0] + 1" in forward
    assert ("dx = windows_added((weight.transpose(1, 2, 3, 0).reshape(C*U*V, O) @ g.transpose(1, 0, 2, 3)"
            ".reshape(O, N*I*J)).reshape(C, U, V, N, I, J).transpose(3, 0, 4, 5, 1, 2), (N, C, H, W), (2, 3), "
            "(U, V), (stride[0], stride[1]))") in backward
    assert ("dweight = (x_windows @ g.transpose(0, 2, 3, 1).reshape(N*I*J, O)).reshape(C, U, V, O)"
            ".transpose(3, 0, 1, 2)") in backward
    assert "sliding_window_view" not in backward
    assert "np.einsum" not in forward + backward and "::-1" not in forward + backward


@pytest.mark.parametrize("name", ["AvgPool2d", "MaxPool2d"])
def test_a_pooling_reads_its_strided_windows_and_adds_them_back(name):
    forward, backward = printed(name)
    assert "[:, :, ::stride[0]]" in forward and "[:, :, :, ::stride[1]]" in forward
    assert "windows_added(" in backward and "np.pad" not in backward and "np.einsum" not in backward


@pytest.mark.parametrize("name, build", [("Conv2d", lambda: generated.Conv2d(3, 4, 3, stride=2, padding=1,
                                                                            dtype=np.float32)),
                                         ("AvgPool2d", lambda: generated.AvgPool2d(2)),
                                         ("MaxPool2d", lambda: generated.MaxPool2d(3, stride=2, padding=1))])
def test_the_fast_forms_keep_float32(name, build):
    layer = build()
    x = np.random.default_rng(1).standard_normal((2, 3, 9, 8)).astype(np.float32)
    y = layer.forward(x)
    dx = layer.backward(np.ones_like(y))
    assert y.dtype == dx.dtype == np.float32 and dx.shape == x.shape


@pytest.mark.parametrize("axis, index_shape, shape, into_zeros", [
    (0, (50,), (7, 5), True), (1, (4, 6), (3, 9, 2), False), (2, (30,), (2, 3, 4), True), (0, (0,), (4, 3), False)])
def test_labels_that_repeat_add_up_as_np_add_at_adds_them(axis, index_shape, shape, into_zeros):
    # _tensor.added_at (an Embedding's backward) sums each label's entries by sorting, not np.add.at's step per
    # entry: the same sums, a repeated label adding each, any axis, a value that broadcasts, no label at all
    rng = np.random.default_rng(axis)
    target = np.zeros(shape) if into_zeros else rng.standard_normal(shape)
    index = rng.integers(0, shape[axis], index_shape)
    value = rng.standard_normal(shape[:axis] + index_shape + (1,) * len(shape[axis + 1:]))
    expected = target.copy()
    np.add.at(expected, (slice(None),) * axis + (index,), value)
    assert np.allclose(generated._tensor.added_at(target.copy(), index, axis, value), expected, rtol=1e-14, atol=1e-14)
    if index.size:
        assert len(set(index.ravel().tolist())) < index.size   # some label repeats
