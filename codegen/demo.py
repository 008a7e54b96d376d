"""symgrad demo: generated layers alone learn scikit-learn's digits, and seed 004's MSE vs cross-entropy claim in plots.

Training uses only `generated` and NumPy; scikit-learn supplies the data and matplotlib the plots (the demo extra).
"""
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from generated import (SGD, BinaryCrossEntropyWithLogits, Linear, MeanSquaredError, ReLU, Sequential, Sigmoid,
                       SoftmaxCrossEntropy, Tanh)

HIDDEN = {"relu": ReLU, "tanh": Tanh}
CLASSES = 10


def one_hot(labels):
    return np.eye(CLASSES)[labels]


@dataclass(frozen=True)
class Setup:
    """One of the three networks: what follows the logits, the loss, and the loss's target from integer labels."""
    name: str
    label: str
    output: tuple
    loss: type
    target: Callable


SETUPS = (
    Setup("softmax_ce", "softmax + cross-entropy", (), SoftmaxCrossEntropy, lambda labels: labels),
    Setup("sigmoid_mse", "sigmoid + MSE", (Sigmoid,), MeanSquaredError, one_hot),
    # sigmoid and binary cross-entropy fused on the logits, as PyTorch does it
    Setup("sigmoid_bce", "sigmoid + binary cross-entropy", (), BinaryCrossEntropyWithLogits, one_hot),
)


@dataclass(frozen=True)
class Config:
    hidden: str = "relu"
    epochs: int = 20
    lr: float = 0.1
    momentum: float = 0.9
    batch: int = 32
    seed: int = 0


def load_digits_split(seed):
    """(x_train, x_test, y_train, y_test): the 8x8 digits scaled to [0, 1], a stratified 75/25 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    # pixel intensities are 0..16
    return train_test_split(digits.data / 16, digits.target, test_size=0.25, random_state=seed,
                            stratify=digits.target)


def mlp(setup, config):
    """A 64-64-10 MLP; the same seed gives every setup the same initial weights."""
    rng = np.random.default_rng(config.seed)
    return Sequential([Linear(64, 64, rng=rng), HIDDEN[config.hidden](), Linear(64, CLASSES, rng=rng),
                       *(layer() for layer in setup.output)])


class Progress:
    """A bar per epoch, redrawn after each batch on a terminal; elsewhere (CI logs) one line at the epoch's end."""
    WIDTH = 24

    def __init__(self, stream):
        self.stream, self.live = stream, stream.isatty()

    def update(self, title, done, total, loss, accuracy):
        if not (self.live or done == total):
            return
        bar = "#" * (self.WIDTH * done // total)
        start, end = "\r" if self.live else "", "\n" if done == total else ""
        self.stream.write(f"{start}{title} [{bar:<{self.WIDTH}}] {done}/{total} "
                          f"loss {loss:.4f} acc {accuracy:.3f}{end}")
        self.stream.flush()


def evaluate(net, loss, setup, data):
    """Training loss, training accuracy and test accuracy of the network as it is now."""
    x_train, x_test, y_train, y_test = data
    out = net.forward(x_train)
    return dict(train_loss=float(loss.forward(out, setup.target(y_train))),
                train_accuracy=float(np.mean(np.argmax(out, axis=1) == y_train)),
                test_accuracy=float(np.mean(np.argmax(net.forward(x_test), axis=1) == y_test)))


def train(setup, data, config, progress):
    """Mini-batch SGD; returns the final figures and their history, from before training to each epoch's end."""
    x_train, y_train = data[0], data[2]
    net, loss = mlp(setup, config), setup.loss()
    optimizer = SGD(net.parameters(), config.lr, config.momentum)
    # the same shuffles for every setup, so only the loss differs
    shuffle = np.random.default_rng(config.seed + 1)
    batches = -(-len(x_train) // config.batch)
    history = [evaluate(net, loss, setup, data)]
    start = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        order = shuffle.permutation(len(x_train))
        total = correct = 0.0
        for step in range(batches):
            rows = order[step * config.batch:(step + 1) * config.batch]
            out = net.forward(x_train[rows])
            total += float(loss.forward(out, setup.target(y_train[rows]))) * len(rows)
            correct += np.sum(np.argmax(out, axis=1) == y_train[rows])
            net.backward(loss.backward())
            optimizer.step()
            seen = min((step + 1) * config.batch, len(x_train))
            progress.update(f"{setup.name:<11} epoch {epoch:>2}/{config.epochs}", step + 1, batches,
                            total / seen, correct / seen)
        history.append(evaluate(net, loss, setup, data))
    return dict(label=setup.label, seconds=time.perf_counter() - start, **history[-1],
                history={key: [h[key] for h in history] for key in history[0]})


def gradient_factors(a_min=1e-3):
    """(a, |dL/dz| for MSE + sigmoid, |dL/dz| for CE + sigmoid) at target y = 1, from the generated kernels."""
    z = np.linspace(np.log(a_min / (1 - a_min)), -np.log(a_min / (1 - a_min)), 401)
    y = np.ones_like(z)
    sigmoid = Sigmoid()
    a = sigmoid.forward(z)
    mse = MeanSquaredError(reduction="none")
    mse.forward(a, y)
    # upstream gradient 1/2: seed 004's loss is (a - y)**2 / 2, so dL/dz = (a - y) a (1 - a)
    mse_dz = sigmoid.backward(mse.backward(np.full_like(z, 0.5)))
    ce = BinaryCrossEntropyWithLogits(reduction="none")
    ce.forward(z, y)
    ce_dz = ce.backward(np.ones_like(z))
    return a, np.abs(mse_dz), np.abs(ce_dz)


def plot_loss_curves(results, config, path):
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator
    figure = Figure(figsize=(9, 3.6), layout="constrained")
    losses, accuracies = figure.subplots(1, 2)
    for result in results.values():
        losses.plot(result["history"]["train_loss"], marker=".", label=result["label"])
        accuracies.plot(result["history"]["test_accuracy"], marker=".", label=result["label"])
    # where the MSE network stalls: every output near 0, wrong for the true class and saturated
    losses.axhline(1 / CLASSES, color="grey", linestyle=":", label="MSE when every output is 0")
    losses.set(yscale="log", xlabel="epoch", ylabel="training loss (log scale)", title="Training loss")
    accuracies.set(xlabel="epoch", ylabel="test accuracy", title="Test accuracy", ylim=(0, 1))
    for axes in (losses, accuracies):
        axes.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
    losses.legend(fontsize="small")
    accuracies.legend(loc="lower right", fontsize="small")
    figure.suptitle(f"64-64-10 MLP ({HIDDEN[config.hidden].__name__} hidden) on digits, the same initial weights, "
                    f"SGD lr {config.lr}, momentum {config.momentum}, batch {config.batch}", fontsize="medium")
    figure.savefig(path, dpi=100)


def plot_gradient_factor(path):
    from matplotlib.figure import Figure
    a, mse, ce = gradient_factors()
    figure = Figure(figsize=(9, 3.6), layout="constrained")
    linear, saturated = figure.subplots(1, 2)
    for axes in (linear, saturated):
        axes.plot(a, mse, label="MSE + sigmoid: (a - y) a (1 - a)")
        axes.plot(a, ce, label="cross-entropy + sigmoid: a - y")
        axes.set(xlabel="output a = sigmoid(z)", ylabel="|dL/dz|")
        axes.legend(fontsize="small")
    linear.set(xlim=(0, 1), ylim=(0, 1.02), title="Gradient at the logit z for target y = 1")
    saturated.set(xscale="logit", yscale="log", title="Logit and log axes: the saturated ends")
    ticks = (0.001, 0.01, 0.1, 0.5, 0.9, 0.99, 0.999)
    saturated.set_xticks(ticks, [str(tick) for tick in ticks])
    saturated.set_xticks([], minor=True)
    figure.savefig(path, dpi=100)


def run(config, out):
    """Train the three networks, write loss_curves.png, gradient_factor.png and results.json to out."""
    data = load_digits_split(config.seed)
    progress = Progress(sys.stderr)
    results = {setup.name: train(setup, data, config, progress) for setup in SETUPS}
    out.mkdir(parents=True, exist_ok=True)
    plot_loss_curves(results, config, out / "loss_curves.png")
    plot_gradient_factor(out / "gradient_factor.png")
    report = dict(config=asdict(config), train_size=len(data[0]), test_size=len(data[1]), results=results)
    (out / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    return results


def summary(results):
    """One line a network: its final test accuracy, training loss and training time."""
    return "\n".join(f"{result['label']:<30} test accuracy {result['test_accuracy']:.4f}  "
                     f"training loss {result['train_loss']:.4f}  {result['seconds']:.1f} s"
                     for result in results.values())
