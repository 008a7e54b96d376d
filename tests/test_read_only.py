"""The row operations' backward reads what forward saved and the arrays it is given, and writes into none of them:
it works where they are read-only (a y a caller froze, or shares with another thread) and leaves them as they were."""
import numpy as np
import pytest

import generated
from derive.catalog import CATALOG
from derive.ops import Op
from tests.accuracy import element_wise

ROW_OPS = [name for name, op in CATALOG.items() if type(op) is Op and not element_wise(op)]


def packages():
    """The NumPy package, and the fused one where numba is installed."""
    try:
        import generated.fast
    except ImportError:
        return [generated]
    return [generated, generated.fast]


def frozen(array):
    """A read-only copy of array."""
    array = np.array(array)
    array.flags.writeable = False
    return array


def arrays_in(saved):
    """Every NumPy array in what forward saved (a tuple of arrays, or a loss's (kernel, arrays, options, into))."""
    if isinstance(saved, np.ndarray):
        return [saved]
    return [a for item in saved for a in arrays_in(item)] if isinstance(saved, (tuple, list)) else []


def backward_on_frozen(layer, x, target, g):
    """(forward's value, dx) of layer on read-only x, target and g, with every array forward saved made read-only
    first; it asserts the saved arrays are unchanged after. A loss takes retain_graph=True: without it, its backward
    writes dx into an exponential it saved, its own buffer, which it then frees."""
    args = (frozen(x),) if target is None else (frozen(x), frozen(target))
    value = layer.forward(*args)
    saved = arrays_in(layer._saved)
    for array in saved:
        array.flags.writeable = False
    before = [array.copy() for array in saved]
    dx = layer.backward(frozen(g)) if target is None else layer.backward(retain_graph=True)
    assert all(np.array_equal(a, b, equal_nan=True) for a, b in zip(saved, before))
    return value, dx


def case(name, dtype):
    """(x, target or None, g) of a row op: rows of five entries, one near one-hot (the softmax layer's value at the
    argmax), labels at either end."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(4, 5)).astype(dtype)
    x[0] = [40.0, 0.5, -3.0, 1.0, 0.0]
    g = rng.normal(size=(4, 5)).astype(dtype)
    target = None if isinstance(getattr(generated, name)(), generated._base.Layer) else np.array([0, 4, 2, 1])
    return x, target, g


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ROW_OPS)
def test_the_backward_of_a_row_op_works_on_read_only_arrays_and_writes_none(name, dtype):
    x, target, g = case(name, dtype)
    for package in packages():
        if not hasattr(package, name):
            continue
        layer = getattr(package, name)()
        expected = (layer.forward(x.copy()) if target is None else layer.forward(x.copy(), target.copy()),
                    layer.backward(g.copy()) if target is None else layer.backward())
        value, dx = backward_on_frozen(getattr(package, name)(), x, target, g)
        assert np.array_equal(value, expected[0]) and np.array_equal(dx, expected[1]), package.__name__


def test_the_check_catches_a_backward_that_writes_into_what_forward_saved(monkeypatch):
    # the softmax layer's row_sum_but as it was: the saved y's entry at the argmax set aside in y itself, put back
    import generated.softmax as module

    def in_place(e, at, by=None):
        kept = e.take(at)
        e.put(at, kept - kept)
        total = (np.einsum("...k->...", e) if by is None else np.einsum("...k,...k->...", by, e))[..., None]
        e.put(at, kept)
        return total
    monkeypatch.setattr(module, "row_sum_but", in_place)
    x, _, g = case("Softmax", np.float64)
    with pytest.raises(ValueError, match="read-only"):
        backward_on_frozen(generated.Softmax(), x, None, g)
