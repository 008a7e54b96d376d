"""generated/_tensor.kept: a kernel line's new array (an index-notation op's full-size result or temporary) written
into one an earlier call made at that line, once nothing else holds it (codegen.inplace prints the call). An array
the caller still holds, or a view of it, is never written again; a pool that ignored the references would."""
import numpy as np
import pytest

import generated
from codegen.tensor_verify import sample
from derive.catalog import CATALOG
from derive.ops import Op

LAYERS = [op for op in CATALOG.values() if not isinstance(op, Op) and op.kind == "layer"]
KEPT, POOL = generated._tensor, generated._kept   # KEPT_FROM is _tensor's; the pool is _kept's


@pytest.fixture
def every_size(monkeypatch):
    """kept for arrays of any size: the check sizes' arrays are below KEPT_FROM."""
    monkeypatch.setattr(KEPT, "KEPT_FROM", 0)
    monkeypatch.setattr(POOL, "_kept", {})


def layer_of(op, seed, dtype=np.float64):
    """(op's class at its check sizes, its params drawn from seed, and a function of a seed giving its inputs)."""
    rng = np.random.default_rng(seed)
    constructor, _, params = sample(op, rng)
    layer = getattr(generated, op.name)(**constructor, **({"rng": seed} if op.params or op.noise else {}),
                                        **({"dtype": dtype} if op.params else {}))
    for p, value in params.items():
        setattr(layer, p, value.astype(dtype))
    return layer, lambda s: [sample(op, np.random.default_rng(s))[1][a] for a in [*op.inputs, *op.targets]]


def step(layer, inputs, seed):
    """[y, each gradient] of one forward and backward."""
    y = layer.forward(*inputs)
    grads = layer.backward(np.random.default_rng(seed).standard_normal(y.shape))
    grads = grads if isinstance(grads, tuple) else () if grads is None else (grads,)
    return [y, *grads, *(getattr(layer, "d" + p) for p in layer.params)]


def held_values_kept(make, seed=0):
    """Whether the arrays of a first step (held) and a view of a second's (its arrays dropped) keep their values
    through more steps of that layer and of another of its class."""
    layer, inputs = make(seed)
    other, _ = make(seed + 1)
    first = step(layer, inputs(1), 1)
    copies = [a.copy() for a in first]
    second = step(layer, inputs(2), 2)
    views = [a.reshape(-1)[1:] for a in second]
    view_copies = [v.copy() for v in views]
    del second
    for s in range(3, 7):
        step(layer if s % 2 else other, inputs(s), s)
    return all(np.array_equal(a, c, equal_nan=True) for a, c in zip(first + views, copies + view_copies))


@pytest.mark.parametrize("name", [op.name for op in LAYERS])
def test_an_array_the_caller_holds_is_never_written_again(every_size, name):
    assert held_values_kept(lambda seed: layer_of(CATALOG[name], seed))


def test_a_pool_ignoring_the_references_would_write_them(every_size, monkeypatch):
    # the check above catches the bug it guards against: a pool that took every kept array as free
    make = lambda seed: layer_of(CATALOG["LayerNorm"], seed)  # noqa: E731
    assert held_values_kept(make)
    monkeypatch.setattr(POOL, "_ALONE", 1 << 30)
    assert not held_values_kept(make)


@pytest.mark.parametrize("name", [op.name for op in LAYERS])
def test_kept_arrays_give_the_values_of_new_ones(every_size, monkeypatch, name):
    op = CATALOG[name]
    layer, inputs = layer_of(op, 0)
    kept = [step(layer, inputs(s), s) for s in range(1, 5)]
    monkeypatch.setattr(KEPT, "KEPT_FROM", float("inf"))
    layer, inputs = layer_of(op, 0)
    new = [step(layer, inputs(s), s) for s in range(1, 5)]
    for ours, theirs in zip(kept, new):
        assert all(np.array_equal(a, b, equal_nan=True) for a, b in zip(ours, theirs))


@pytest.mark.parametrize("name", ["LayerNorm", "BatchNorm2d", "RMSNorm"])
def test_strided_inputs_other_dtypes_and_shapes_changing(every_size, monkeypatch, name):
    """Each call's values as with new arrays (KEPT_FROM past every size): a strided input, a float32 and a float64
    layer sharing each kernel line's arrays, the batch changing from call to call."""
    op = CATALOG[name]

    def steps():
        found, rng = [], np.random.default_rng(4)
        layers = {dtype: layer_of(op, 0, dtype)[0] for dtype in (np.float32, np.float64)}
        for batch in (3, 5, 3, 2, 5):
            for dtype, layer in layers.items():
                shape = (batch,) + layer_of(op, 0)[1](0)[0].shape[1:]
                x = rng.standard_normal((shape[0], 2 * shape[1]) + shape[2:]).astype(dtype)[:, ::2]
                found.append(step(layer, [np.asfortranarray(x) if batch == 5 else x], batch))
        return found

    kept = steps()
    monkeypatch.setattr(KEPT, "KEPT_FROM", float("inf"))
    for ours, theirs in zip(kept, steps()):
        for a, b in zip(ours, theirs):
            assert a.dtype == b.dtype and a.shape == b.shape
            np.testing.assert_allclose(a, b, rtol=1e-5 if a.dtype == np.float32 else 1e-12, atol=1e-6)


def test_kept_gives_what_the_ufunc_gives(every_size):
    a32, a64 = np.ones((3, 4), np.float32), np.ones((3, 4))
    for operands in [(a32, 2.5), (a32, np.float64(2.5)), (a32, a64[:1]), (a32[:, :1], a64[0]), (np.arange(12),)]:
        ufunc = np.sqrt if len(operands) == 1 else np.multiply
        ours, theirs = KEPT.kept(("test", "a"), ufunc, *operands), ufunc(*operands)
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape and np.array_equal(ours, theirs)


def test_a_kept_array_comes_back_only_once_nothing_holds_it(every_size):
    a = KEPT.kept_empty(("test", "a"), (3, 4), np.float64)
    b = KEPT.kept_empty(("test", "a"), (3, 4), np.float64)
    assert b is not a
    view, kept = b[1:], id(a)
    del a, b
    c = KEPT.kept_empty(("test", "a"), (3, 4), np.float64)
    assert id(c) == kept and c is not view.base
    assert KEPT.kept_empty(("test", "a"), (3, 4), np.float32).dtype == np.float32   # held: none free, a new one
