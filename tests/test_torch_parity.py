"""Every generated layer and loss against PyTorch's function of the same purpose: values and gradients,
every option and reduction, float64. PyTorch is a test dependency (the dev extra), never a run-time one."""
import itertools
import math
import warnings

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
TENSOR_OPTIONS = ("weight", "pos_weight", "alpha")


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
    if name == "KLDivLoss":
        with warnings.catch_warnings():  # kl_div's "mean" divides by every entry, and it warns so
            warnings.simplefilter("ignore", UserWarning)
            return F.kl_div(x, target, reduction=reduction, **options)
    if name == "SoftmaxFocalLoss":  # no PyTorch function: Lin et al.'s formula written out, alpha scaling each row
        log_p = F.log_softmax(x, -1).gather(1, target[:, None])[:, 0]
        alpha = options.get("alpha", torch.ones(x.shape[-1], dtype=x.dtype))
        losses = -(1 - log_p.exp()) ** options.get("gamma", 2.0) * log_p * alpha[target]
        return {"none": losses, "sum": losses.sum(), "mean": losses.mean()}[reduction]
    raise KeyError(f"no PyTorch counterpart for {name}")


def torch_value_and_grad(function, x, upstream):
    tx = torch.tensor(x, requires_grad=True)
    value = function(tx)
    value.backward(torch.as_tensor(upstream) if value.ndim else None)
    return value.detach().numpy(), tx.grad.numpy()


def test_every_layer_and_loss_has_a_pytorch_counterpart():
    names = (set(LAYERS) | {"Linear", "Embedding", "Dropout", "ScaledDotProductAttention",
                                    "MultiheadAttention", "Conv1d", "Conv2d", "AvgPool2d", "MaxPool2d"} | set(NORMS) | set(BATCH_NORMS)
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


def multihead_from_torch(module, layer):
    """layer's params set to module's: in_proj_weight's rows h D + d are Wq[h, d, :], then Wk's, then Wv's."""
    E, H = module.embed_dim, module.num_heads
    weights = module.in_proj_weight.detach().numpy().reshape(3, H, E // H, E)
    biases = module.in_proj_bias.detach().numpy().reshape(3, H, E // H)
    layer.Wq, layer.Wk, layer.Wv = (w.astype(layer.Wq.dtype) for w in weights)
    layer.bq, layer.bk, layer.bv = (b.astype(layer.Wq.dtype) for b in biases)
    layer.Wo = module.out_proj.weight.detach().numpy().reshape(E, H, E // H).astype(layer.Wq.dtype)
    layer.bo = module.out_proj.bias.detach().numpy().astype(layer.Wq.dtype)


@pytest.mark.parametrize("dtype, is_causal, T, S", [(np.float64, False, 5, 7), (np.float64, True, 6, 6),
                                                    (np.float64, True, 4, 6), (np.float32, True, 6, 6)])
def test_multihead_attention_matches_torch_nn_multihead_attention(dtype, is_causal, T, S):
    """Values, the three inputs' gradients and all eight params' against nn.MultiheadAttention(batch_first=True)
    with random (not zero) biases; causal as its attn_mask of keys s > t."""
    torch.manual_seed(0)
    rng = np.random.default_rng(8)
    E, H = 6, 3
    module = torch.nn.MultiheadAttention(E, H, batch_first=True).double()
    with torch.no_grad():
        module.in_proj_bias.normal_()
        module.out_proj.bias.normal_()
    layer = generated.MultiheadAttention(E, H, is_causal=is_causal, dtype=dtype)
    multihead_from_torch(module, layer)
    query, key, value = (rng.normal(size=(2, n, E)).astype(dtype) for n in (T, S, S))
    y = layer.forward(query, key, value)
    upstream = rng.normal(size=y.shape).astype(dtype)
    grads = layer.backward(upstream)
    tensors = [torch.tensor(a.astype(np.float64), requires_grad=True) for a in (query, key, value)]
    mask = torch.triu(torch.ones(T, S, dtype=torch.bool), diagonal=1) if is_causal else None
    ty, _ = module(*tensors, attn_mask=mask, need_weights=False)
    ty.backward(torch.tensor(upstream.astype(np.float64)))
    tol = {"rtol": 1e-10, "atol": 1e-10} if dtype == np.float64 else {"rtol": 1e-3, "atol": 1e-4}
    assert y.dtype == dtype and all(d.dtype == dtype for d in grads)
    np.testing.assert_allclose(y, ty.detach().numpy(), **tol)
    for name, ours, theirs in zip(("query", "key", "value"), grads, tensors):
        np.testing.assert_allclose(ours, theirs.grad.numpy(), **tol, err_msg=f"d{name}")
    expected = torch.nn.MultiheadAttention(E, H, batch_first=True).double()
    expected.in_proj_weight.data, expected.in_proj_bias.data = module.in_proj_weight.grad, module.in_proj_bias.grad
    expected.out_proj.weight.data, expected.out_proj.bias.data = module.out_proj.weight.grad, module.out_proj.bias.grad
    gradients = generated.MultiheadAttention(E, H)
    multihead_from_torch(expected, gradients)
    for p in layer.params:
        np.testing.assert_allclose(getattr(layer, f"d{p}"), getattr(gradients, p), **tol, err_msg=f"d{p}")


def test_multihead_attention_refuses_a_head_count_that_does_not_divide_embed_dim():
    with pytest.raises(ValueError, match=r"MultiheadAttention: size D = E/H is 2.66667 at these sizes; it must be a "
                                         r"positive integer"):
        generated.MultiheadAttention(8, 3)
    with pytest.raises(ValueError, match="MultiheadAttention: num_heads must be an integer > 0, got 0"):
        generated.MultiheadAttention(8, 0)


CONV_CASES = [("Conv1d", (2, 3, 9), 4, 3, {}), ("Conv1d", (2, 3, 10), 2, 4, {"stride": 3, "padding": 2}),
              ("Conv1d", (3, 7), 2, 1, {"bias": False}),   # unbatched (C, L), a kernel of 1
              ("Conv2d", (2, 3, 8, 7), 4, 3, {}), ("Conv2d", (2, 3, 8, 7), 4, 3, {"stride": 2, "padding": 1}),
              ("Conv2d", (2, 2, 9, 8), 3, (3, 2), {"stride": (2, 3), "padding": (0, 2), "bias": False}),
              ("Conv2d", (1, 1, 5, 5), 2, 5, {"padding": 2})]   # the kernel as large as the image


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("name, shape, out, kernel, options", CONV_CASES,
                         ids=[f"{c[0]}-{c[3]}-{c[4]}" for c in CONV_CASES])
def test_convolutions_match_torch_nn_conv(name, shape, out, kernel, options, dtype):
    """y, dx, dweight and db against nn.Conv1d/Conv2d at strides, paddings (ints and pairs), bias=False."""
    torch.manual_seed(0)
    rng = np.random.default_rng(9)
    channels = shape[-1 - int(name[-2])]   # (N, C, L) or (N, C, H, W)
    module = getattr(torch.nn, name)(channels, out, kernel, **options).double()
    layer = getattr(generated, name)(module.in_channels, out, kernel, **options, dtype=dtype)
    layer.weight = module.weight.detach().numpy().astype(dtype)
    if module.bias is not None:
        layer.b = module.bias.detach().numpy().astype(dtype)
    x = rng.normal(size=shape).astype(dtype)
    y = layer.forward(x)
    upstream = rng.normal(size=y.shape).astype(dtype)
    dx = layer.backward(upstream)
    tx = torch.tensor(x.astype(np.float64), requires_grad=True)
    ty = module(tx)
    ty.backward(torch.tensor(upstream.astype(np.float64)))
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == np.float64 else {"rtol": 1e-4, "atol": 1e-4}
    assert y.dtype == dx.dtype == layer.dweight.dtype == dtype
    np.testing.assert_allclose(y, ty.detach().numpy(), **tol)
    np.testing.assert_allclose(dx, tx.grad.numpy(), **tol, err_msg="dx")
    np.testing.assert_allclose(layer.dweight, module.weight.grad.numpy(), **tol, err_msg="dweight")
    if module.bias is None:
        assert layer.db is None and "b" not in layer.params and not layer.b.any()
    else:
        np.testing.assert_allclose(layer.db, module.bias.grad.numpy(), **tol, err_msg="db")


POOL_CASES = [((2, 3, 8, 6), 2, {}), ((2, 3, 7, 7), 3, {"stride": 2, "padding": 1}),
              ((3, 9, 8), (3, 2), {"stride": (1, 2), "padding": (1, 0)}), ((1, 1, 4, 4), 4, {"padding": 2})]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape, kernel, options", POOL_CASES + [((2, 2, 6, 6), 2, {"stride": 1})],
                         ids=[f"{c[1]}-{c[2]}" for c in POOL_CASES] + ["2-overlapping"])
@pytest.mark.parametrize("name", ["AvgPool2d", "MaxPool2d"])
def test_pooling_matches_torch_nn_pooling(name, shape, kernel, options, dtype):
    """Stride None (the kernel's), strides and paddings as ints and pairs (the average counting the padding's
    zeros, the max padded with -inf beside negative inputs), an unbatched (C, H, W) input, ties (the max's
    gradient to the first largest entry, as PyTorch's), overlapping windows whose gradients add up, a NaN."""
    rng = np.random.default_rng(11)
    x = -np.abs(rng.normal(size=shape)).astype(dtype)
    x[..., 0, :2] = x[..., 1, :2] = -0.5                 # ties within a window
    x.flat[-1] = np.nan
    layer = getattr(generated, name)(kernel, **options)
    y = layer.forward(x)
    upstream = rng.normal(size=y.shape).astype(dtype)
    dx = layer.backward(upstream)
    tx = torch.tensor(x.astype(np.float64), requires_grad=True)
    ty = getattr(torch.nn, name)(kernel, **options)(tx)
    ty.backward(torch.tensor(upstream.astype(np.float64)))
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == np.float64 else {"rtol": 1e-5, "atol": 1e-5}
    assert y.dtype == dx.dtype == dtype and y.shape == ty.shape
    np.testing.assert_allclose(y, ty.detach().numpy(), **tol)
    np.testing.assert_allclose(dx, tx.grad.numpy(), **tol, err_msg="dx")


def test_convolutions_refuse_bad_windows_by_name():
    with pytest.raises(TypeError, match=r"Conv2d: stride must be an integer or a tuple of 2 integers, got \(1, 2, 3\)"):
        generated.Conv2d(1, 1, 3, stride=(1, 2, 3))
    with pytest.raises(ValueError, match=r"Conv2d: padding must be at least 0, got -1"):
        generated.Conv2d(1, 1, 3, padding=-1)
    with pytest.raises(ValueError, match=r"Conv1d: kernel_size must be an integer > 0, got 0"):
        generated.Conv1d(1, 1, 0)
    with pytest.raises(ValueError, match=r"Conv2d: size I = H - U \+ 1 is 0 at these sizes"):
        generated.Conv2d(1, 1, 3).forward(np.ones((1, 1, 2, 5)))   # a kernel taller than the image


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


# a loss's own further reductions (KLDivLoss's batchmean), with its defaults and its other options (log_target)
MEAN_CASES = [(op, kind, options, mean) for op, kind, options in LOSS_CASES for mean in op.means]


@pytest.mark.parametrize("op, kind, options, reduction", MEAN_CASES,
                         ids=[f"{op.name}-{'options' if o else 'defaults'}-{m}" for op, _, o, m in MEAN_CASES])
def test_further_means_match_pytorch(op, kind, options, reduction):
    test_losses_match_pytorch(op, kind, options, reduction)


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


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_kl_div_with_zeros_in_its_targets_matches_pytorch_in_every_reduction_without_warnings(dtype):
    """Probability rows with zeros (a one-hot row among them: t log t is 0 there, as xlogy's), log_target both
    ways, every reduction, x of three axes (batchmean divides by the first); float32 kept, within its rounding."""
    rng = np.random.default_rng(9)
    x = np.log(rng.dirichlet(np.ones(4), (3, 2))).astype(dtype)
    t = rng.dirichlet(np.ones(4), (3, 2))
    t[0, 0], t[1, 1, :2], t[2, 0] = [0.0, 1.0, 0.0, 0.0], 0.0, 0.0   # a one-hot row, zeros, a row of zeros
    tol = {"rtol": 1e-12, "atol": 1e-15} if dtype == np.float64 else {"rtol": 1e-5, "atol": 1e-6}
    for log_target, reduction in itertools.product((False, True), ("none", "sum", "mean", "batchmean")):
        target = (np.log(t + 0.01) if log_target else t).astype(dtype)
        upstream = rng.normal(size=x.shape).astype(dtype)
        loss = generated.KLDivLoss(log_target=log_target, reduction=reduction)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            value, dx = loss.forward(x, target), loss.backward(upstream if reduction == "none" else None)
        expected, expected_dx = torch_value_and_grad(
            lambda tx: torch_loss("KLDivLoss", tx, target.astype(np.float64), reduction, {"log_target": log_target}),
            x.astype(np.float64), upstream.astype(np.float64))
        assert value.dtype == dx.dtype == dtype
        np.testing.assert_allclose(value, expected, **tol, err_msg=f"{reduction}, log_target={log_target}")
        np.testing.assert_allclose(dx, expected_dx, **tol, err_msg=f"{reduction}, log_target={log_target}")


def torch_focal_loss(x, c, gamma, alpha=None):
    """Lin et al.'s softmax focal loss in PyTorch's float64, each row's: -alpha_c (1 - p_c)^gamma log p_c."""
    return torch_loss("SoftmaxFocalLoss", x, c, "none", {"gamma": gamma, **({} if alpha is None else {"alpha": alpha})})


def test_the_focal_loss_at_gamma_0_is_cross_entropy_and_alpha_scales_each_row():
    """gamma = 0: F.cross_entropy with weight alpha, row by row (its mean divides by the rows' weights, ours by
    the rows, as torchvision's and kornia's focal losses do)."""
    rng = np.random.default_rng(10)
    x, c, alpha = rng.normal(0, 3, (7, 5)), rng.integers(0, 5, 7), rng.uniform(0.2, 2.0, 5)
    for weight in (None, alpha):
        rows = generated.SoftmaxFocalLoss(alpha=weight, gamma=0.0, reduction="none")
        value, dx = rows.forward(x, c), rows.backward(np.ones(7))
        expected, expected_dx = torch_value_and_grad(lambda t: F.cross_entropy(
            t, torch.tensor(c), None if weight is None else torch.tensor(weight), reduction="none"), x, np.ones(7))
        np.testing.assert_allclose(value, expected, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(dx, expected_dx, rtol=1e-12, atol=1e-15)
        mean = generated.SoftmaxFocalLoss(alpha=weight, gamma=0.0)
        np.testing.assert_allclose(mean.forward(x, c), expected.mean(), rtol=1e-12)
        np.testing.assert_allclose(mean.backward(), expected_dx / 7, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_the_focal_loss_is_finite_and_right_at_confident_and_hopeless_logits(dtype):
    """Margins up to 1e4 either way: log p_c from the max-shifted log-softmax, 1 - p_c as -expm1(log p_c) (p_c
    rounds to 1 from a margin of 17 in float32), and the gradient's gamma (1 - p_c)^(gamma - 1) log p_c finite
    where p_c is 1 (for 0 <= gamma < 1 too, where PyTorch's autograd of the written-out form is NaN), each
    value within the dtype's rounding of PyTorch's float64 (beside 1: a log-softmax near 0 is as exact as its
    log of a sum near 1, in PyTorch's as in ours); the dtype kept."""
    x = np.array([[30.0, 0.0, -1.0], [200.0, 0.0, 0.0], [0.0, 1e4, 0.0], [-1e3, 0.0, 1.0], [5.0, 5.0, 5.0]])
    c = np.array([0, 0, 0, 0, 2])
    truth = torch_value_and_grad(lambda t: torch_focal_loss(t, c, 2.0), x, np.ones(5))
    for gamma in (0.0, 0.5, 2.0):
        loss = generated.SoftmaxFocalLoss(gamma=gamma, reduction="none")
        value, dx = loss.forward(x.astype(dtype), c), loss.backward(np.ones(5, dtype))
        assert value.dtype == dx.dtype == dtype and np.isfinite(value).all() and np.isfinite(dx).all(), gamma
    tol = {"rtol": 1e-12, "atol": 1e-15} if dtype == np.float64 else {"rtol": 1e-5, "atol": 1e-6}
    np.testing.assert_allclose(value, truth[0], **tol)   # gamma = 2, the last
    np.testing.assert_allclose(dx, truth[1], **tol)


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
    "GELU": np.isinf(SPECIAL),  # backward: ours the limits 1 and 0 (x clipped in x exp(-x^2/2)); PyTorch inf * 0
    # backward: ours the limits (docs/stability.md, products beyond underflow); PyTorch inf * 0
    "GELUTanh": np.isinf(SPECIAL),
    "Mish": np.isinf(SPECIAL),
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
