"""A trainable network from generated parts alone: whole-MLP gradients, SGD, Adam, and a loss that falls."""
import numpy as np
import pytest
import torch

import generated
from codegen.verify import check_gradient
from generated import SGD, Linear, ReLU, Sequential, SoftmaxCrossEntropy, Tanh


def mlp(rng, l2=0.0):
    return Sequential([Linear(4, 8, l2=l2, rng=rng), Tanh(), Linear(8, 6, l2=l2, rng=rng), ReLU(),
                       Linear(6, 3, l2=l2, rng=rng)])


def blobs(rng, n=300):
    """Three separable clusters in 4 dimensions."""
    labels = rng.integers(0, 3, n)
    centers = np.array([[2.0, 0, 0, 1], [-2.0, 1, 0, 0], [0, -2.0, 2, 0]])
    return centers[labels] + 0.5 * rng.normal(size=(n, 4)), labels


@pytest.mark.parametrize("l2", [0.0, 0.05])
def test_every_parameter_gradient_of_an_mlp_matches_finite_differences(l2):
    rng = np.random.default_rng(0)
    net, loss = mlp(rng, l2), SoftmaxCrossEntropy()
    x, labels = blobs(rng, 5)

    def objective():
        return float(loss.forward(net.forward(x), labels) + net.penalty())

    objective()
    net.backward(loss.backward())
    for layer, name in net.parameters():
        value, analytic = getattr(layer, name), getattr(layer, "d" + name).copy()

        def at(v, layer=layer, name=name, value=value):
            setattr(layer, name, v)
            result = objective()
            setattr(layer, name, value)
            return result
        result = check_gradient(at, value, analytic)
        assert result.ok, f"{type(layer).__name__}.{name}: {result.report()}"


class Recording:
    """A layer without params that notes each backward it runs."""

    def __init__(self):
        self.calls = 0

    def forward(self, x):
        return x

    def backward(self, g):
        self.calls += 1
        return g


def test_sequential_backward_computes_no_input_gradient_unless_asked():
    """As for a torch input that requires no grad: backward returns None, the first Linear sets the same dW and
    db as with input_grad=True but computes no dx, and a layer before it is not run backward."""
    x, labels = blobs(np.random.default_rng(6), 7)
    found = {}
    for input_grad in (False, True):
        first = Recording()
        net, loss = Sequential([first, *mlp(np.random.default_rng(6)).layers]), SoftmaxCrossEntropy()
        loss.forward(net.forward(x), labels)
        dx = net.backward(loss.backward(), input_grad=input_grad)
        found[input_grad] = dx, first.calls, [getattr(layer, "d" + name) for layer, name in net.parameters()]
    (none, skipped, params), (dx, ran, expected) = found[False], found[True]
    assert none is None and skipped == 0 and dx.shape == x.shape and ran == 1
    for got, want in zip(params, expected):
        np.testing.assert_array_equal(got, want)
    assert Sequential([Recording()]).backward(np.ones(2)) is None
    assert Sequential([]).backward(np.ones(2), input_grad=True).tolist() == [1.0, 1.0]


def test_parameters_lists_each_linear_weight_and_bias():
    net = mlp(np.random.default_rng(1))
    assert [(type(layer).__name__, name) for layer, name in net.parameters()] == [
        ("Linear", "W"), ("Linear", "b")] * 3


def test_training_makes_the_loss_fall_and_classifies():
    rng = np.random.default_rng(2)
    net, loss = mlp(rng), SoftmaxCrossEntropy()
    optimizer = SGD(net.parameters(), lr=0.1, momentum=0.9)
    x, labels = blobs(rng)
    losses = []
    for _ in range(60):
        losses.append(float(loss.forward(net.forward(x), labels)))
        net.backward(loss.backward())
        optimizer.step()
    accuracy = np.mean(np.argmax(net.forward(x), axis=1) == labels)
    assert losses[-1] < 0.2 * losses[0] and accuracy > 0.95, (losses[0], losses[-1], accuracy)


def test_sgd_with_momentum_follows_torch_optim_sgd():
    rng = np.random.default_rng(3)
    layer = Linear(3, 2, rng=rng)
    reference = [torch.tensor(layer.W.copy(), requires_grad=True), torch.tensor(layer.b.copy(), requires_grad=True)]
    ours = SGD([(layer, "W"), (layer, "b")], lr=0.05, momentum=0.8)
    theirs = torch.optim.SGD(reference, lr=0.05, momentum=0.8)
    for _ in range(4):
        layer.dW, layer.db = rng.normal(size=layer.W.shape), rng.normal(size=layer.b.shape)
        for tensor, grad in zip(reference, (layer.dW, layer.db)):
            tensor.grad = torch.tensor(grad)
        ours.step()
        theirs.step()
    np.testing.assert_allclose(layer.W, reference[0].detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(layer.b, reference[1].detach().numpy(), rtol=1e-12)


@pytest.mark.parametrize("optimizer", [SGD, generated.Adam, generated.AdamW])
def test_optimizers_update_in_place_so_references_stay_valid(optimizer):
    """The param and the optimizer's state are updated where they are (no copy back), as torch.optim's."""
    layer = Linear(2, 2, rng=4)
    weights = layer.W
    layer.dW, layer.db = np.ones_like(layer.W), np.ones_like(layer.b)
    step = optimizer([(layer, "W"), (layer, "b")], lr=0.5)
    states = [a for name in ("velocities", "exp_avgs", "exp_avg_sqs") for a in getattr(step, name, [])]
    step.step()
    assert layer.W is weights and not np.array_equal(weights, Linear(2, 2, rng=4).W)
    assert all(state.any() for state in states)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"lr": 0.0}, ValueError, "SGD: lr must be a finite real number > 0, got 0.0"),
    ({"lr": 0.1, "momentum": 1.0}, ValueError, r"SGD: momentum must be a real number in \[0, 1\), got 1.0"),
    ({"lr": "0.1"}, TypeError, "SGD: lr must be a finite real number > 0, got '0.1'")])
def test_sgd_refuses_bad_settings(kwargs, error, message):
    with pytest.raises(error, match=message):
        SGD([], **kwargs)


def test_sgd_step_before_backward_names_the_parameter():
    with pytest.raises(RuntimeError, match="no gradient for Linear.W"):
        SGD([(Linear(2, 2), "W")], lr=0.1).step()


@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-12), (np.float32, 2e-5)])
@pytest.mark.parametrize("name, options", [
    ("Adam", {}), ("Adam", {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1}),
    ("AdamW", {}), ("AdamW", {"lr": 0.01, "betas": (0.5, 0.9), "eps": 1e-3, "weight_decay": 0.3})])
def test_adam_and_adamw_follow_torch_optim_step_for_step(name, options, dtype, rtol):
    rng = np.random.default_rng(5)
    layer = Linear(3, 2, rng=rng, dtype=dtype)
    reference = [torch.tensor(layer.W.copy(), requires_grad=True), torch.tensor(layer.b.copy(), requires_grad=True)]
    ours = getattr(generated, name)([(layer, "W"), (layer, "b")], **options)
    theirs = getattr(torch.optim, name)(reference, **options)
    for _ in range(6):
        layer.dW, layer.db = (rng.normal(size=a.shape).astype(dtype) for a in (layer.W, layer.b))
        for tensor, grad in zip(reference, (layer.dW, layer.db)):
            tensor.grad = torch.tensor(grad)
        ours.step()
        theirs.step()
        for mine, torch_tensor in zip((layer.W, layer.b), reference):
            assert mine.dtype == dtype
            np.testing.assert_allclose(mine, torch_tensor.detach().numpy(), rtol=rtol, atol=rtol * 1e-2)


@pytest.mark.parametrize("name, kwargs, error, message", [
    ("Adam", {"lr": -1.0}, ValueError, r"Adam: lr must be a finite real number >= 0, got -1.0"),
    ("Adam", {"betas": (0.9, 1.0)}, ValueError, r"Adam: betas\[1\] must be a real number in \[0, 1\), got 1.0"),
    ("Adam", {"betas": 0.9}, TypeError, r"Adam: betas must be a pair \(beta1, beta2\), got 0.9"),
    ("AdamW", {"eps": -1e-8}, ValueError, r"AdamW: eps must be a finite real number >= 0, got -1e-08"),
    ("AdamW", {"weight_decay": "0.1"}, TypeError, "AdamW: weight_decay must be a finite real number >= 0, got '0.1'")])
def test_adam_refuses_bad_settings_naming_them(name, kwargs, error, message):
    with pytest.raises(error, match=message):
        getattr(generated, name)([], **kwargs)


def test_adam_step_before_backward_names_the_parameter():
    with pytest.raises(RuntimeError, match="no gradient for Linear.W"):
        generated.Adam([(Linear(2, 2), "W")]).step()


def test_adam_trains_the_mlp():
    rng = np.random.default_rng(0)
    x, labels = blobs(rng)
    net, loss = mlp(rng), SoftmaxCrossEntropy()
    optimizer = generated.Adam(net.parameters(), lr=0.01)
    losses = []
    for _ in range(100):
        losses.append(float(loss.forward(net.forward(x), labels)))
        net.backward(loss.backward())
        optimizer.step()
    assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])
