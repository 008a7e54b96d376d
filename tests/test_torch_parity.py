"""Every generated layer and loss against PyTorch's function of the same purpose: values and gradients,
every option and reduction, float64. PyTorch is a test dependency (the dev extra), never a run-time one."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import generated
from derive.catalog import CATALOG
from derive.reduction import REDUCTIONS
from tests.test_generated import LOSS_CASES, loss_case

LAYERS = {
    "Sigmoid": lambda x: torch.sigmoid(x),
    "Tanh": torch.tanh,
    "ReLU": torch.relu,
    "LeakyReLU": lambda x, negative_slope=0.01: F.leaky_relu(x, negative_slope),
    "Softplus": F.softplus,
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
    # PyTorch's multi_margin_loss divides each row by the class count; seed 002's hinge does not
    return F.multi_margin_loss(x, target, reduction=reduction, **options) * x.shape[1]


def torch_value_and_grad(function, x, upstream):
    tx = torch.tensor(x, requires_grad=True)
    value = function(tx)
    value.backward(torch.as_tensor(upstream) if value.ndim else None)
    return value.detach().numpy(), tx.grad.numpy()


def test_every_layer_and_loss_has_a_pytorch_counterpart():
    names = set(LAYERS) | {"Linear"} | {op.name for op, _, _ in LOSS_CASES}
    assert names == set(CATALOG)


@pytest.mark.parametrize("name", LAYERS)
def test_layers_match_pytorch(name):
    rng = np.random.default_rng(0)
    x = rng.normal(0, 4, (5, 6))
    x[0, :3] = [0.0, 40.0, -40.0]  # the kink and both saturations
    upstream = rng.normal(size=x.shape)
    options = {"negative_slope": 0.2} if name == "LeakyReLU" else {}
    layer = getattr(generated, name)(**options)
    y, dx = layer.forward(x), None
    dx = layer.backward(upstream)
    expected_y, expected_dx = torch_value_and_grad(lambda t: LAYERS[name](t, **options), x, upstream)
    np.testing.assert_allclose(y, expected_y, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(dx, expected_dx, rtol=1e-12, atol=1e-15)


def test_linear_matches_pytorch():
    rng = np.random.default_rng(1)
    layer = generated.Linear(4, 3, l2=0.0, rng=rng)
    x, upstream = rng.normal(size=(5, 4)), rng.normal(size=(5, 3))
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


def test_all_rows_ignored_gives_nan_and_a_zero_gradient_as_pytorch():
    x, target = np.zeros((2, 3)), np.array([-100, -100])
    loss = generated.SoftmaxCrossEntropy()
    value, dx = loss.forward(x, target), loss.backward()
    expected, expected_dx = torch_value_and_grad(lambda t: F.cross_entropy(t, torch.tensor(target)), x, None)
    assert np.isnan(value) and np.isnan(expected)
    np.testing.assert_array_equal(dx, expected_dx)
