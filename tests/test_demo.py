"""symgrad demo, in a few epochs and steps: generated layers learn the digits and to reverse digits, the plots and
results are written, and the CNN's and the transformer's training is PyTorch's step for step."""
import functools
import io
import json
import sys

import numpy as np
import pytest
import torch
from torch import nn

from codegen import demo_transformer
from codegen.bench.torch_transformer import TorchTransformer
from codegen.cli import main
from codegen.demo import SETUPS, Config, Progress, gradient_factors, load_digits_split, mlp, train
from codegen.demo_cnn import Config as CNNConfig
from codegen.demo_cnn import cnn, epoch_batches, images
from codegen.demo_cnn import train as train_cnn
from codegen.demo_transformer import Config as TransformerConfig
from codegen.demo_transformer import (LENGTH, VOCABULARY, Transformer, inputs_and_targets, split,
                                      training_batches)
from codegen.demo_transformer import train as train_transformer

EPOCHS = 3


def test_a_short_demo_learns_the_digits_and_writes_the_plots_and_results(tmp_path, capsys):
    assert main(["demo", "--scene", "mlp", "--epochs", str(EPOCHS), "--out", str(tmp_path)]) == 0
    for name in ("loss_curves.png", "gradient_factor.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG"), name
    results = json.loads((tmp_path / "results.json").read_text())["results"]
    assert list(results) == [setup.name for setup in SETUPS]
    # chance is 0.1
    assert results["softmax_ce"]["test_accuracy"] >= 0.9
    # seed 004: with sigmoid outputs, the same weights and steps, MSE learns slower than cross-entropy
    assert results["sigmoid_mse"]["test_accuracy"] < results["sigmoid_bce"]["test_accuracy"] - 0.2
    assert all(len(result["history"]["train_loss"]) == EPOCHS + 1 for result in results.values())
    out, err = capsys.readouterr()
    assert "softmax + cross-entropy" in out and "results.json written" in out
    # not a terminal: one progress line an epoch, no redraws
    assert len(err.splitlines()) == EPOCHS * len(SETUPS) and "\r" not in err


def test_the_three_networks_start_from_the_same_weights():
    first, *others = [mlp(setup, Config()).parameters() for setup in SETUPS]
    for params in others:
        for (layer, name), (first_layer, _) in zip(params, first):
            np.testing.assert_array_equal(getattr(layer, name), getattr(first_layer, name))


def test_training_is_deterministic():
    data, config = load_digits_split(0), Config(epochs=1)
    runs = [train(SETUPS[0], data, config, Progress(io.StringIO()))["history"] for _ in range(2)]
    assert runs[0] == runs[1]


def test_the_gradient_factors_from_the_kernels_are_the_seeds_formulas():
    a, mse, ce = gradient_factors()
    assert a.min() < 0.01 and a.max() > 0.99
    np.testing.assert_allclose(mse, (1 - a) * a * (1 - a), rtol=1e-12)
    np.testing.assert_allclose(ce, 1 - a, rtol=1e-9)


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_the_progress_bar_redraws_in_place_on_a_terminal():
    stream = Terminal()
    for done in (1, 2):
        Progress(stream).update("epoch 1/1", done, 2, 0.5, 0.25)
    assert stream.getvalue() == ("\repoch 1/1 [############            ] 1/2 loss 0.5000 acc 0.250"
                                 "\repoch 1/1 [########################] 2/2 loss 0.5000 acc 0.250\n")


def test_without_the_demo_extra_the_command_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    assert main(["demo"]) == 2
    assert "pip install 'symgrad[demo]'" in capsys.readouterr().err


def torch_layer(layer):
    """The torch.nn module of a generated layer of the CNN, with its weights; Linear's W is (in, out), torch's
    weight (out, in)."""
    kind = type(layer).__name__
    if kind == "Conv2d":
        O, C, U, V = layer.weight.shape
        module = nn.Conv2d(C, O, (U, V), stride=layer.stride, padding=layer.padding).double()
        values = {"weight": layer.weight, "bias": layer.b}
    elif kind == "BatchNorm2d":
        module = nn.BatchNorm2d(len(layer.gamma), eps=layer.eps, momentum=layer.momentum).double()
        values = {"weight": layer.gamma, "bias": layer.beta}
    elif kind == "Linear":
        module, values = nn.Linear(*layer.W.shape).double(), {"weight": layer.W.T, "bias": layer.b}
    elif kind.endswith("Pool2d"):
        module, values = getattr(nn, kind)(layer.kernel_size, layer.stride, layer.padding), {}
    else:
        module, values = getattr(nn, kind)(), {}
    with torch.no_grad():
        for name, value in values.items():
            getattr(module, name).copy_(torch.from_numpy(np.ascontiguousarray(value)))
    return module


SMALL_CNN = CNNConfig(channels=(4, 8), epochs=2)


@pytest.fixture
def one_torch_thread():
    """torch on one thread, as the demo's NumPy: small convolutions on a second thread of a busy machine take
    several times as long."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_cnn_scene_trains_as_pytorch_trains_the_same_network(one_torch_thread):
    """The demo's own training run against torch (float64) from the same initial weights on the same batches: the
    loss of every step agrees, and so do the test loss and accuracy after each epoch in eval mode, so Conv2d,
    BatchNorm2d in both modes and its running statistics, ReLU, the pooling, Flatten, the head, cross-entropy, SGD
    with momentum and the annealed learning rate are PyTorch's math."""
    data = images(load_digits_split(SMALL_CNN.seed))
    _, result = train_cnn(SMALL_CNN, data, Progress(io.StringIO()))
    net = nn.Sequential(*map(torch_layer, cnn(SMALL_CNN).layers))
    optimizer = torch.optim.SGD(net.parameters(), lr=SMALL_CNN.lr, momentum=SMALL_CNN.momentum)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=SMALL_CNN.epochs)
    x_train, x_test, y_train, y_test = (torch.from_numpy(a) for a in data)
    losses, test_losses, test_accuracies = [], [], []
    for batches in epoch_batches(SMALL_CNN, len(x_train)):
        for rows in batches:
            loss = nn.functional.cross_entropy(net(x_train[rows]), y_train[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        scheduler.step()
        with torch.no_grad():
            logits = net.eval()(x_test)
        net.train()
        test_losses.append(nn.functional.cross_entropy(logits, y_test).item())
        test_accuracies.append((logits.argmax(dim=1) == y_test).double().mean().item())
    history = result["history"]
    assert len(losses) == len(history["train_loss"]) > 80
    np.testing.assert_allclose(history["train_loss"], losses, rtol=0, atol=1e-6)
    np.testing.assert_allclose(history["test_loss"][1:], test_losses, rtol=0, atol=1e-6)
    assert history["test_accuracy"][1:] == test_accuracies


def test_the_cnn_scene_learns_the_digits_and_writes_its_plots_and_results(tmp_path, capsys):
    assert main(["demo", "--scene", "cnn", "--epochs", "2", "--out", str(tmp_path)]) == 0
    for name in ("cnn_training.png", "cnn_filters.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG"), name
    report = json.loads((tmp_path / "cnn_results.json").read_text())
    result, history = report["result"], report["result"]["history"]
    assert report["config"]["epochs"] == 2 and history["epoch"] == [0, 1, 2]
    assert len(history["train_loss"]) == 2 * -(-report["train_size"] // report["config"]["batch"])
    # chance is 0.1; make demo's 10 epochs reach 0.99
    assert history["test_accuracy"][0] < 0.2 and result["test_accuracy"] > 0.9
    assert len(result["mistakes"]) == round((1 - result["test_accuracy"]) * report["test_size"])
    assert not (tmp_path / "results.json").exists()
    out, err = capsys.readouterr()
    assert "cnn_results.json written" in out and "test accuracy" in out
    # not a terminal: one progress line an epoch
    assert len(err.splitlines()) == 2 and "\r" not in err


SMALL = TransformerConfig(width=8, heads=2, steps=6, batch=8, train_size=64, test_size=16, evaluate_every=3)


def test_the_transformer_scene_trains_as_pytorch_trains_the_same_network():
    """The demo's own training run against torch (float64) from the same initial weights on the same batches: the
    loss of every step agrees, so embeddings, causal attention, LayerNorm, GELU, the head, cross-entropy with
    ignored positions, the residual plumbing and Adam are PyTorch's math."""
    _, result = train_transformer(SMALL, Progress(io.StringIO()))
    net = TorchTransformer(Transformer(SMALL))
    optimizer = torch.optim.Adam(net.parameters(), lr=SMALL.lr)
    train_set, _ = split(SMALL)
    losses = []
    for rows in training_batches(SMALL, train_set):
        tokens, targets = (torch.from_numpy(a) for a in inputs_and_targets(train_set[rows]))
        loss = nn.functional.cross_entropy(net(tokens).reshape(-1, VOCABULARY), targets.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    np.testing.assert_allclose(result["history"]["train_loss"], losses, rtol=0, atol=1e-6)


def test_the_transformer_scene_learns_to_reverse_and_writes_its_plots_and_results(tmp_path, capsys, monkeypatch):
    # make demo's network and batches, a tenth of its held-out sequences: their forward passes are most of the time
    monkeypatch.setattr(demo_transformer, "Config", functools.partial(TransformerConfig, test_size=100,
                                                                      evaluate_every=20))
    assert main(["demo", "--scene", "transformer", "--steps", "40", "--out", str(tmp_path)]) == 0
    for name in ("transformer_training.png", "transformer_attention.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG"), name
    report = json.loads((tmp_path / "transformer_results.json").read_text())
    result, history = report["result"], report["result"]["history"]
    assert report["config"]["steps"] == 40 and len(history["train_loss"]) == 40 and history["step"] == [0, 20, 40]
    # chance is 0.1 a token; after 40 of make demo's 150 steps about half the reversed digits are right
    assert history["test_accuracy"][0] < 0.2 and result["teacher_forced_accuracy"] > 0.3
    assert result["token_accuracy"] > 0.3 and history["test_loss"][-1] < 0.8 * history["test_loss"][0]
    assert not (tmp_path / "results.json").exists()
    out, err = capsys.readouterr()
    assert "transformer_results.json written" in out and "per-token accuracy" in out
    # not a terminal: one progress line
    assert len(err.splitlines()) == 1 and "\r" not in err


def test_the_test_sequences_are_held_out():
    train_set, test = split(TransformerConfig())
    assert len(test) > 0.99 * TransformerConfig().test_size
    assert not set(map(tuple, test)) & set(map(tuple, train_set))
    tokens, targets = inputs_and_targets(test)
    # the reversed digits follow the separator: target t is token 15 - t
    np.testing.assert_array_equal(targets[:, LENGTH:], tokens[:, LENGTH - 1::-1])
