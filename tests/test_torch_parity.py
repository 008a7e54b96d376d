"""Every generated layer and loss against PyTorch's function of the same purpose: values and gradients,
every option and reduction, float64. PyTorch is a test dependency (the dev extra), never a run-time one."""
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import generated
from derive.catalog import CATALOG
from derive.reduction import REDUCTIONS
from codegen.verify import example_options
from tests.test_generated import LOSS_CASES, loss_case

LAYERS = {
    "Sigmoid": lambda x: torch.sigmoid(x),
    "Tanh": torch.tanh,
    "ReLU": torch.relu,
    "LeakyReLU": lambda x, negative_slope=0.01: F.leaky_relu(x, negative_slope),
    "Softplus": F.softplus,
    "SiLU": F.silu,
    "GELU": F.gelu,
    "GELUTanh": lambda x: F.gelu(x, approximate="tanh"),
    "ELU": lambda x, alpha=1.0: F.elu(x, alpha),
    "SELU": F.selu,
    "Mish": F.mish,
    "Softsign": F.softsign,
    "HardTanh": lambda x, min_val=-1.0, max_val=1.0: F.hardtanh(x, min_val, max_val),
    "Softmax": lambda x: torch.softmax(x, -1),
    "LogSoftmax": lambda x: F.log_softmax(x, -1),
}
TENSOR_OPTIONS = ("weight", "pos_weight")


def torch_loss(name, x, target, reduction, options):
    options = {k: torch.as_tensor(v) if k in TENSOR_OPTIONS else v for k, v in options.items()}
    target = torch.as_tensor(target)
    if name == "SoftmaxCrossEntropy":
        return F.cross_entropy(x, target, reduction=reduction, **options)
    if name == "BinaryCrossEntropyWithLogits":
        return F.binary_cross_entropy_with_logits(x, target, reduction=reduction, **options)
    if name == "MeanSquaredError":
        return F.mse_loss(x, target, reduction=reduction)
    if name == "Huber":
        return F.huber_loss(x, target, reduction=reduction, **options)
    if name == "NLLLoss":
        return F.nll_loss(x, target, reduction=reduction, **options)
    if name == "MulticlassHinge":  # PyTorch's multi_margin_loss divides each row by the class count; seed 002's not
        return F.multi_margin_loss(x, target, reduction=reduction, **options) * x.shape[1]
    raise KeyError(f"no PyTorch counterpart for {name}")


def torch_value_and_grad(function, x, upstream):
    tx = torch.tensor(x, requires_grad=True)
    value = function(tx)
    value.backward(torch.as_tensor(upstream) if value.ndim else None)
    return value.detach().numpy(), tx.grad.numpy()


def test_every_layer_and_loss_has_a_pytorch_counterpart():
    names = (set(LAYERS) | {"Linear", "Embedding", "Dropout", "ScaledDotProductAttention"} | set(NORMS) | set(BATCH_NORMS)
             | {op.name for op, _, _ in LOSS_CASES})
    assert names == set(CATALOG)


@pytest.mark.parametrize("name", LAYERS)
def test_layers_match_pytorch(name):
    rng = np.random.default_rng(0)
    x = rng.normal(0, 4, (5, 6))
    x[0, :3] = [0.0, 40.0, -40.0]  # the kink and both saturations
    upstream = rng.normal(size=x.shape)
    options = example_options(CATALOG[name], x.shape, rng)
    x[1, :2] = list(options.values())[:2] or [0.0, 0.0]  # a parameter's own kink (HardTanh's bounds)
    layer = getattr(generated, name)(**options)
    y, dx = layer.forward(x), None
    dx = layer.backward(upstream)
    expected_y, expected_dx = torch_value_and_grad(lambda t: LAYERS[name](t, **options), x, upstream)
    np.testing.assert_allclose(y, expected_y, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(dx, expected_dx, rtol=1e-12, atol=1e-15)


# The layers with params and switches, as torch.nn's modules: (torch module, ours) by the same arguments
NORMS = {
    "LayerNorm": (torch.nn.LayerNorm, {"eps": [1e-5, 0.3], "elementwise_affine": [True, False], "bias": [True, False]}),
    "RMSNorm": (torch.nn.RMSNorm, {"eps": [None, 0.3], "elementwise_affine": [True, False]}),
    "GLU": (torch.nn.GLU, {}),
}
NORM_CASES = [(name, dict(zip(options, values))) for name, (_, options) in NORMS.items()
              for values in itertools.product(*options.values())]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name, options", NORM_CASES, ids=[f"{n}-{o}" for n, o in NORM_CASES])
def test_norm_layers_match_torch_nn_modules(name, options, dtype):
    """Every switch and option, trained params (not the ones and zeros they start at), rows of mean 1e3, x of
    shape (N, T, 6) as a sequence model has it."""
    rng = np.random.default_rng(3)
    x = (rng.normal(size=(2, 7, 6)) + (1e3 if name != "GLU" else 0)).astype(dtype)
    upstream = rng.normal(size=(2, 7, 3 if name == "GLU" else 6)).astype(dtype)
    sized = {} if name == "GLU" else {"normalized_shape": 6, "dtype": dtype}
    module, layer = NORMS[name][0](*[6] * bool(sized), **options).double(), getattr(generated, name)(**sized, **options)
    params = dict(module.named_parameters())
    assert [p for p in layer.params] == [{"weight": "gamma", "bias": "beta"}[p] for p in params]
    for theirs, ours in zip(params.values(), layer.params):
        value = rng.normal(size=6)
        theirs.data = torch.tensor(value)
        setattr(layer, ours, value.astype(dtype))
    y, dx = layer.forward(x), None
    dx = layer.backward(upstream)
    tx = torch.tensor(x.astype(np.float64), requires_grad=True)
    ty = module(tx)
    ty.backward(torch.tensor(upstream.astype(np.float64)))
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == np.float64 else {"rtol": 2e-3, "atol": 2e-3}
    assert y.dtype == dx.dtype == dtype
    np.testing.assert_allclose(y, ty.detach().numpy(), **tol)
    np.testing.assert_allclose(dx, tx.grad.numpy(), **tol)
    for theirs, ours in zip(params.values(), layer.params):
        np.testing.assert_allclose(getattr(layer, "d" + ours), theirs.grad.numpy(), **tol)
    frozen = [p for p in ("gamma", "beta") if hasattr(layer, p) and p not in layer.params]
    assert all(getattr(layer, "d" + p) is None for p in frozen)


@pytest.mark.parametrize("name", NORMS)
def test_norm_layers_take_an_empty_batch_and_refuse_bad_options_by_name(name):
    sized = {} if name == "GLU" else {"normalized_shape": 4}
    layer = getattr(generated, name)(**sized)
    y = layer.forward(np.zeros((0, 4)))
    assert y.shape == (0, 2 if name == "GLU" else 4) and layer.backward(np.zeros_like(y)).shape == (0, 4)
    if name != "GLU":
        with pytest.raises(ValueError, match=f"{name}: eps must be"):
            getattr(generated, name)(4, eps=-1.0)
        with pytest.raises(TypeError, match=f"{name}: elementwise_affine must be True or False, got 'no'"):
            getattr(generated, name)(4, elementwise_affine="no")
        with pytest.raises(TypeError, match=f"{name}: normalized_shape must be"):
            getattr(generated, name)(4.5)


# BatchNorm: (torch module, the shapes it takes), every option by the same arguments
BATCH_NORMS = {"BatchNorm1d": (torch.nn.BatchNorm1d, [(5, 3), (4, 3, 6)]),
               "BatchNorm2d": (torch.nn.BatchNorm2d, [(4, 3, 5, 2)])}
BATCH_NORM_CASES = [(name, shape, dict(zip(("momentum", "affine", "track_running_stats"), values)))
                    for name, (_, shapes) in BATCH_NORMS.items() for shape in shapes
                    for values in itertools.product([0.1, None, 1.0], [True, False], [True, False])
                    if values[2] or values[0] == 0.1]


# every option in float64; float32 at the defaults (its kernels are the same, the dtype kept is what it adds)
BATCH_NORM_SETTINGS = [(*case, dtype) for case in BATCH_NORM_CASES for dtype in (np.float64, np.float32)
                       if dtype == np.float64 or case[2] == {"momentum": 0.1, "affine": True, "track_running_stats": True}]


@pytest.mark.parametrize("name, shape, options, dtype", BATCH_NORM_SETTINGS,
                         ids=[f"{n}-{s}-{o}-{np.dtype(d).name}" for n, s, o, d in BATCH_NORM_SETTINGS])
def test_batch_norm_matches_pytorch_in_both_modes_with_its_running_statistics(name, shape, options, dtype):
    """Three training steps (values, every gradient, running mean and unbiased variance, the batches counted),
    then eval mode, then training again: trained params, channels of mean 1e3 and different scales."""
    rng = np.random.default_rng(5)
    module = BATCH_NORMS[name][0](3, eps=1e-3, **options).double()
    layer = getattr(generated, name)(3, eps=1e-3, dtype=dtype, **options)
    if options["affine"]:
        for theirs, ours in ((module.weight, "gamma"), (module.bias, "beta")):
            value = rng.normal(size=3)
            theirs.data = torch.tensor(value)
            setattr(layer, ours, value.astype(dtype))
    scale = np.array([1.0, 10.0, 0.1]).reshape((3,) + (1,) * (len(shape) - 2))
    tol = {"rtol": 1e-10, "atol": 1e-10} if dtype == np.float64 else {"rtol": 2e-3, "atol": 2e-3}
    for mode in ("train", "train", "train", "eval", "train"):
        module.train(mode == "train")
        assert layer.train(mode == "train") is layer
        x = (rng.normal(size=shape) * scale + 1e3).astype(dtype)
        upstream = rng.normal(size=shape).astype(dtype)
        y = layer.forward(x)
        dx = layer.backward(upstream)
        tx = torch.tensor(x.astype(np.float64), requires_grad=True)
        module.zero_grad()
        ty = module(tx)
        ty.backward(torch.tensor(upstream.astype(np.float64)))
        assert y.dtype == dx.dtype == dtype
        np.testing.assert_allclose(y, ty.detach().numpy(), **tol, err_msg=f"y ({mode})")
        np.testing.assert_allclose(dx, tx.grad.numpy(), **tol, err_msg=f"dx ({mode})")
        if options["affine"]:
            np.testing.assert_allclose(layer.dgamma, module.weight.grad.numpy(), **tol, err_msg=f"dgamma ({mode})")
            np.testing.assert_allclose(layer.dbeta, module.bias.grad.numpy(), **tol, err_msg=f"dbeta ({mode})")
        else:
            assert layer.dgamma is None and layer.dbeta is None and layer.params == ()
        if options["track_running_stats"]:
            np.testing.assert_allclose(layer.running_mean, module.running_mean.numpy(), **tol)
            np.testing.assert_allclose(layer.running_var, module.running_var.numpy(), **tol)
            assert layer.num_batches_tracked == int(module.num_batches_tracked)
        else:
            assert layer.running_mean is None and module.running_mean is None


def test_batch_norm_refuses_one_value_per_channel_in_training_and_takes_an_empty_batch_as_pytorch():
    for name, x in (("BatchNorm1d", np.ones((1, 3))), ("BatchNorm2d", np.ones((1, 3, 1, 1)))):
        layer = getattr(generated, name)(3)
        with pytest.raises(ValueError, match=rf"{name}: training needs more than one value per statistic: .*of "
                                             rf"var divides by .* 1, which is 0 at an input of shape"):
            layer.forward(x)
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            BATCH_NORMS[name][0](3)(torch.tensor(x))
        assert layer.num_batches_tracked == 0 and np.array_equal(layer.running_var, np.ones(3))
        assert np.array_equal(layer.eval().forward(x), x / np.sqrt(1 + 1e-5))   # eval mode takes it
        empty = np.zeros((0,) + x.shape[1:], np.float32)
        module, layer = BATCH_NORMS[name][0](3), getattr(generated, name)(3, dtype=np.float32)
        y = layer.forward(empty)
        assert y.shape == empty.shape and y.dtype == np.float32 and module(torch.tensor(empty)).shape == y.shape
        dx = layer.backward(y)
        assert dx.shape == empty.shape and np.array_equal(layer.dgamma, np.zeros(3))
        assert layer.num_batches_tracked == int(module.num_batches_tracked) == 1
        assert np.array_equal(layer.running_mean, module.running_mean.numpy())
        with pytest.raises(ValueError, match=f"{name}: momentum must be"):
            getattr(generated, name)(3, momentum=1.5)
        with pytest.raises(TypeError, match=f"{name}: track_running_stats must be True or False"):
            getattr(generated, name)(3, track_running_stats=1)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("shape", [((2, 3, 5, 4), (2, 3, 5, 4), (2, 3, 5, 6)), ((4, 7, 3), (4, 5, 3), (4, 5, 2))],
                         ids=["heads", "T!=S"])
def test_scaled_dot_product_attention_matches_pytorch(shape, is_causal, dtype):
    """(N, heads, T, d) and (N, T, d) with S != T, causal or not, every input's gradient, scores of up to 200
    (the max shift keeps exp finite)."""
    rng = np.random.default_rng(7)
    Q, K, V = (rng.normal(size=s).astype(dtype) * (6.0 if n < 2 else 1.0) for n, s in enumerate(shape))
    layer = generated.ScaledDotProductAttention(is_causal=is_causal)
    y = layer.forward(Q, K, V)
    upstream = rng.normal(size=y.shape).astype(dtype)
    grads = layer.backward(upstream)
    tensors = [torch.tensor(a.astype(np.float64), requires_grad=True) for a in (Q, K, V)]
    ty = F.scaled_dot_product_attention(*tensors, is_causal=is_causal)
    ty.backward(torch.tensor(upstream.astype(np.float64)))
    tol = {"rtol": 1e-10, "atol": 1e-10} if dtype == np.float64 else {"rtol": 1e-3, "atol": 1e-3}
    assert y.dtype == dtype and all(d.dtype == dtype for d in grads)
    np.testing.assert_allclose(y, ty.detach().numpy(), **tol)
    for name, ours, theirs in zip("QKV", grads, tensors):
        np.testing.assert_allclose(ours, theirs.grad.numpy(), **tol, err_msg=f"d{name}")


def test_attention_takes_empty_axes_and_refuses_mismatched_ones_by_name():
    layer = generated.ScaledDotProductAttention(is_causal=True)
    for shape in ((0, 4, 3), (2, 0, 3)):
        y = layer.forward(np.ones(shape), np.ones(shape), np.ones(shape))
        assert y.shape == shape and all(d.shape == shape for d in layer.backward(np.ones(shape)))
    with pytest.raises(ValueError, match=r"ScaledDotProductAttention: K has shape \(2, 4, 5\) and Q has \(2, 4, 3\)"):
        layer.forward(np.ones((2, 4, 3)), np.ones((2, 4, 5)), np.ones((2, 4, 5)))
    with pytest.raises(TypeError, match="ScaledDotProductAttention: is_causal must be True or False"):
        generated.ScaledDotProductAttention(is_causal="yes")


def test_rms_norms_default_eps_is_the_dtypes_machine_epsilon_as_pytorch():
    x = np.full((1, 3), 1e-4, np.float32)  # mean square 1e-8: float32's eps (1.2e-7) outweighs it
    ours = generated.RMSNorm(3, dtype=np.float32).forward(x)
    theirs = torch.nn.RMSNorm(3)(torch.tensor(x)).detach().numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    assert abs(ours[0, 0] - 1.0) > 0.5  # with float64's eps instead it would be 1


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_embedding_matches_pytorch_and_adds_the_gradient_of_a_repeated_index(dtype):
    rng = np.random.default_rng(4)
    layer = generated.Embedding(6, 3, rng=rng, dtype=dtype)
    tokens = np.array([[0, 5, 5, 2], [5, 1, 0, 5]])  # 5 four times, 0 twice, 3 and 4 never
    y = layer.forward(tokens)
    upstream = rng.normal(size=y.shape).astype(dtype)
    assert layer.backward(upstream) is None and y.dtype == layer.dweight.dtype == dtype
    table = torch.tensor(layer.weight, requires_grad=True)
    ty = torch.nn.functional.embedding(torch.tensor(tokens), table)
    ty.backward(torch.tensor(upstream))
    np.testing.assert_array_equal(y, ty.detach().numpy())
    np.testing.assert_allclose(layer.dweight, table.grad.numpy(), rtol=1e-6 if dtype == np.float32 else 1e-15)
    assert not layer.dweight[[3, 4]].any() and layer.dweight.shape == (6, 3)


def test_embedding_takes_an_empty_batch_and_refuses_bad_indices_by_name():
    layer = generated.Embedding(4, 2)
    assert layer.forward(np.zeros((0, 3), int)).shape == (0, 3, 2)
    layer.backward(np.zeros((0, 3, 2)))
    assert not layer.dweight.any()
    with pytest.raises(ValueError, match=r"Embedding: x\[1\] = 4 is not a class index in \[0, 4\)"):
        layer.forward(np.array([0, 4]))
    with pytest.raises(TypeError, match="Embedding: x must hold integer class labels, got dtype float64"):
        layer.forward(np.array([0.0, 1.0]))
    with pytest.raises(TypeError, match="Embedding: embedding_dim must be"):
        generated.Embedding(4, 2.5)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_dropout_is_pytorchs_inverted_dropout_and_the_identity_in_eval_mode(dtype):
    """A random mask cannot equal PyTorch's draw: its law can. Each entry kept with probability 1 - p and
    scaled by 1/(1 - p) (so E[y] = x), backward through the same mask; eval() the identity, bit for bit."""
    x, p = np.random.default_rng(0).normal(size=(200, 500)).astype(dtype), 0.3
    layer = generated.Dropout(p=p, rng=1)
    y = layer.forward(x)
    kept = y != 0
    assert y.dtype == dtype and abs(kept.mean() - (1 - p)) < 4 * np.sqrt(p * (1 - p) / x.size)
    np.testing.assert_allclose(y[kept], x[kept] / dtype(1 - p), rtol=1e-6 if dtype == np.float32 else 1e-15)
    g = np.ones_like(x)
    np.testing.assert_array_equal(layer.backward(g), np.where(kept, dtype(1 / (1 - p)), 0))
    torch_y = F.dropout(torch.tensor(x), p, training=True)
    assert abs((torch_y != 0).float().mean().item() - kept.mean()) < 8 * np.sqrt(p * (1 - p) / x.size)
    assert layer.eval() is layer and not layer.training
    np.testing.assert_array_equal(layer.forward(x), x)
    np.testing.assert_array_equal(layer.backward(g), g)
    layer.train()
    assert layer.training and not np.array_equal(layer.forward(x), x)


def test_dropout_at_p_0_and_1_and_one_seed_as_pytorch():
    x = np.random.default_rng(1).normal(size=(4, 5, 6))
    np.testing.assert_array_equal(generated.Dropout(p=0.0).forward(x), x)
    np.testing.assert_array_equal(generated.Dropout(p=1.0).forward(x), F.dropout(torch.tensor(x), 1.0).numpy())
    np.testing.assert_array_equal(generated.Dropout(rng=7).forward(x), generated.Dropout(rng=7).forward(x))
    with pytest.raises(ValueError, match=r"Dropout: p must be"):
        generated.Dropout(p=1.5)
    with pytest.raises(TypeError, match="Dropout: mode must be True or False"):
        generated.Dropout().train("yes")
    net = generated.Sequential([generated.Linear(6, 6, rng=0), generated.Dropout(), generated.ReLU()])
    assert net.eval() is net and not net.layers[1].training
    net.train()
    assert net.layers[1].training


def test_linear_matches_pytorch():
    rng = np.random.default_rng(1)
    layer = generated.Linear(4, 3, l2=0.0, rng=rng)
    x, upstream = rng.normal(size=(2, 5, 4)), rng.normal(size=(2, 5, 3))  # (*, in_features), as F.linear
    y, dx = layer.forward(x), layer.backward(upstream)
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, layer.W, layer.b))
    ty = F.linear(tx, tw.T, tb)
    ty.backward(torch.as_tensor(upstream))
    for ours, theirs in ((y, ty), (dx, tx.grad), (layer.dW, tw.grad), (layer.db, tb.grad)):
        np.testing.assert_allclose(ours, theirs.detach().numpy(), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("reduction", list(REDUCTIONS))
@pytest.mark.parametrize("op, kind, options", LOSS_CASES,
                         ids=[f"{op.name}-{kind}-{'options' if o else 'defaults'}" for op, kind, o in LOSS_CASES])
def test_losses_match_pytorch(op, kind, options, reduction):
    rng = np.random.default_rng(2)
    x, target, values = loss_case(op, kind, options, (6, 5), rng)
    shape = () if reduction != "none" else (6,) if op.granularity == "row" else x.shape
    upstream = rng.normal(size=shape)
    loss = getattr(generated, op.name)(**values, reduction=reduction)
    value = loss.forward(x, target)
    dx = loss.backward(upstream if reduction == "none" else None)
    expected, expected_dx = torch_value_and_grad(lambda t: torch_loss(op.name, t, target, reduction, values),
                                                 x, upstream)
    np.testing.assert_allclose(value, expected, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(dx, expected_dx, rtol=1e-10, atol=1e-15)


DENSE_CASES = [(op, kind, options) for op, kind, options in LOSS_CASES if kind == "dense"]
# PyTorch takes any real dense target; ours refuses only these (stated here, not read from the catalog,
# so that a range the catalog adds shows up as a failure): probability rows with a negative entry
REFUSED_BELOW = {"SoftmaxCrossEntropy": 0.0}


@pytest.mark.parametrize("op, kind, options", DENSE_CASES,
                         ids=[f"{op.name}-{'options' if o else 'defaults'}" for op, _, o in DENSE_CASES])
def test_dense_targets_beyond_zero_and_one_as_pytorch(op, kind, options):
    """Dense targets anywhere PyTorch takes them, beyond [0, 1] too (BCE with logits reads any real
    target), give PyTorch's loss and gradient."""
    rng = np.random.default_rng(5)
    x, _, values = loss_case(op, kind, options, (6, 5), rng)
    target = rng.uniform(REFUSED_BELOW.get(op.name, -3.0), 4.0, x.shape)
    loss = getattr(generated, op.name)(**values)
    value, dx = loss.forward(x, target), loss.backward()
    expected, expected_dx = torch_value_and_grad(lambda t: torch_loss(op.name, t, target, "mean", values), x, None)
    np.testing.assert_allclose(value, expected, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(dx, expected_dx, rtol=1e-10, atol=1e-15)


def test_all_rows_ignored_gives_nan_and_a_zero_gradient_as_pytorch():
    x, target = np.zeros((2, 3)), np.array([-100, -100])
    loss = generated.SoftmaxCrossEntropy()
    value, dx = loss.forward(x, target), loss.backward()
    expected, expected_dx = torch_value_and_grad(lambda t: F.cross_entropy(t, torch.tensor(target)), x, None)
    assert np.isnan(value) and np.isnan(expected)
    np.testing.assert_array_equal(dx, expected_dx)


# One kind of special value per row: a NaN, +inf, -inf, both infinities, a row of -inf, finite values.
SPECIAL = np.array([[np.nan, 1.0, 2.0, -1.0], [np.inf, 1.0, 0.0, -1.0], [-np.inf, 1.0, 0.0, -1.0],
                    [np.inf, -np.inf, 0.5, 1.0], [-np.inf] * 4, [0.5, 1.0, 0.0, -1.0]])


def whole_rows(mask):
    return np.broadcast_to(mask.any(axis=1, keepdims=True), mask.shape)


def at_entries(mask, shape):
    """A mask over SPECIAL's entries as one over an output of the given shape: per entry, per row or whole."""
    return mask if shape == mask.shape else mask.any(axis=1) if len(shape) == 1 else mask.any()


# Where we deliberately differ from PyTorch (README, "NaN and infinities"): at these entries of SPECIAL
# one of the two results may be NaN where the other is a number. Everything else must be equal, NaN for NaN.
STRICTER = {
    "ReLU": np.isnan(SPECIAL),                     # PyTorch's backward passes g through at a NaN x; ours is NaN
    "LeakyReLU": np.isnan(SPECIAL),                # PyTorch's backward gives slope * g at a NaN x; ours is NaN
    "HardTanh": np.isnan(SPECIAL),                 # PyTorch's backward gives 0 at a NaN x; ours is NaN
    "MulticlassHinge": whole_rows(~np.isfinite(SPECIAL)),  # PyTorch turns a NaN margin (NaN, inf - inf) into 0
    "SoftmaxCrossEntropy": whole_rows(np.isnan(SPECIAL)),  # a NaN in an ignored row: PyTorch skips the row
    "NLLLoss": whole_rows(np.isnan(SPECIAL)),              # the same
    "BinaryCrossEntropyWithLogits": SPECIAL == -np.inf,    # ours +inf, the limit; PyTorch computes -inf + inf
}


def assert_as_pytorch_or_stricter(name, what, ours, theirs):
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    differ = ~np.isclose(ours, theirs, rtol=1e-12, atol=1e-15, equal_nan=True)
    allowed = (at_entries(STRICTER[name], ours.shape) & (np.isnan(ours) != np.isnan(theirs))
               if name in STRICTER else np.zeros(ours.shape, bool))
    wrong = differ & ~allowed
    assert not wrong.any(), (f"{name} {what}: ours {ours[wrong]} where PyTorch gives {theirs[wrong]}, "
                             f"at {np.argwhere(wrong).tolist()}")


@pytest.mark.parametrize("name", LAYERS)
def test_layers_on_nan_and_infinities_as_pytorch(name):
    upstream = np.ones_like(SPECIAL)
    with np.errstate(invalid="ignore"):  # inf - inf in the max shift of a softmax
        layer = getattr(generated, name)()
        y, dx = layer.forward(SPECIAL), layer.backward(upstream)
    expected, expected_dx = torch_value_and_grad(LAYERS[name], SPECIAL, upstream)
    assert_as_pytorch_or_stricter(name, "forward", y, expected)
    assert_as_pytorch_or_stricter(name, "backward", dx, expected_dx)


def test_linear_on_nan_and_infinities_as_pytorch():
    layer = generated.Linear(4, 3, rng=0)
    upstream = np.ones((6, 3))
    with np.errstate(invalid="ignore"):
        y, dx = layer.forward(SPECIAL), layer.backward(upstream)
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (SPECIAL, layer.W, layer.b))
    ty = F.linear(tx, tw.T, tb)
    ty.backward(torch.as_tensor(upstream))
    for what, ours, theirs in (("y", y, ty), ("dx", dx, tx.grad), ("dW", layer.dW, tw.grad), ("db", layer.db, tb.grad)):
        assert_as_pytorch_or_stricter("Linear", what, ours, theirs.detach().numpy())


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("op, kind, options", LOSS_CASES,
                         ids=[f"{op.name}-{kind}-{'options' if o else 'defaults'}" for op, kind, o in LOSS_CASES])
def test_losses_on_nan_and_infinities_as_pytorch(op, kind, options, reduction):
    _, target, values = loss_case(op, kind, options, SPECIAL.shape, np.random.default_rng(3))
    upstream = np.ones(SPECIAL.shape[0] if op.granularity == "row" else SPECIAL.shape)
    with np.errstate(invalid="ignore"):
        loss = getattr(generated, op.name)(**values, reduction=reduction)
        value = loss.forward(SPECIAL, target)
        dx = loss.backward(upstream if reduction == "none" else None)
    expected, expected_dx = torch_value_and_grad(lambda t: torch_loss(op.name, t, target, reduction, values),
                                                 SPECIAL, upstream)
    assert_as_pytorch_or_stricter(op.name, "forward", value, expected)
    assert_as_pytorch_or_stricter(op.name, "backward", dx, expected_dx)


def test_the_comparison_allows_only_the_listed_differences():
    nan_row = np.where(np.isnan(SPECIAL), np.nan, 0.0)
    assert_as_pytorch_or_stricter("ReLU", "backward", nan_row, np.zeros(SPECIAL.shape))
    with pytest.raises(AssertionError, match=r"Softmax forward: ours \[0.\] where PyTorch gives \[nan\]"):
        assert_as_pytorch_or_stricter("Softmax", "forward", np.zeros(SPECIAL.shape), nan_row)
    with pytest.raises(AssertionError, match=r"ReLU backward: ours \[1.\] where PyTorch gives \[0.\], at \[\[5, 0\]\]"):
        assert_as_pytorch_or_stricter("ReLU", "backward", np.eye(6, 4, -5), np.zeros(SPECIAL.shape))


# multi_margin_loss reads uninitialised memory for an empty batch (PyTorch 2.13), so there is nothing to compare
EMPTY_CASES = [(op, kind, options) for op, kind, options in LOSS_CASES if op.name != "MulticlassHinge"]


@pytest.mark.parametrize("reduction", list(REDUCTIONS))
@pytest.mark.parametrize("op, kind, options", EMPTY_CASES,
                         ids=[f"{op.name}-{kind}-{'options' if o else 'defaults'}" for op, kind, o in EMPTY_CASES])
def test_an_empty_batch_as_pytorch(op, kind, options, reduction):
    x, target, values = loss_case(op, kind, options, (0, 4), np.random.default_rng(4))
    upstream = np.ones((0,) if op.granularity == "row" else x.shape)
    loss = getattr(generated, op.name)(**values, reduction=reduction)
    value, dx = loss.forward(x, target), loss.backward(upstream if reduction == "none" else None)
    expected, expected_dx = torch_value_and_grad(lambda t: torch_loss(op.name, t, target, reduction, values),
                                                 x, upstream)
    np.testing.assert_array_equal(value, expected)  # NaN for NaN
    assert dx.shape == expected_dx.shape == x.shape
