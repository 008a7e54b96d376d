"""symgrad demo's CNN scene: a small convolutional network of generated layers learns scikit-learn's 8x8 digits.

The data and split are the MLP scene's; the images keep their 8x8 shape, one channel. Two blocks of Conv2d,
BatchNorm2d, ReLU and 2x2 pooling (8x8 to 4x4 to 2x2), then Flatten and a Linear head, trained by SGD with momentum,
the learning rate annealed by a cosine over the epochs. BatchNorm2d normalises with each batch's statistics while
training and with its running ones for the held-out figures, as a torch.nn.Module in train() and eval() mode.
"""
import json
import math
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from codegen.demo import CLASSES, Progress, load_digits_split
from generated import (SGD, BatchNorm2d, Conv2d, Flatten, Linear, MaxPool2d, ReLU, Sequential,
                       SoftmaxCrossEntropy)

# the pooling of both blocks, kernel 2 and stride 2 (generated.AvgPool2d in its place works the same way)
POOL = MaxPool2d
SIDE = 8


@dataclass(frozen=True)
class Config:
    channels: tuple = (16, 32)
    epochs: int = 12
    lr: float = 0.05
    momentum: float = 0.9
    batch: int = 32
    seed: int = 0


def images(data):
    """The split of load_digits_split with each row of 64 pixels made a (1, 8, 8) image."""
    x_train, x_test, y_train, y_test = data
    return x_train.reshape(-1, 1, SIDE, SIDE), x_test.reshape(-1, 1, SIDE, SIDE), y_train, y_test


def cnn(config):
    """Two blocks of a 3x3 convolution (zero padding 1), BatchNorm2d, ReLU and 2x2 pooling, then the linear head."""
    rng, (first, second) = np.random.default_rng(config.seed), config.channels
    return Sequential([Conv2d(1, first, 3, padding=1, rng=rng), BatchNorm2d(first), ReLU(), POOL(2),
                       Conv2d(first, second, 3, padding=1, rng=rng), BatchNorm2d(second), ReLU(), POOL(2),
                       Flatten(), Linear(second * (SIDE // 4) ** 2, CLASSES, rng=rng)])


def learning_rate(config, epoch):
    """The learning rate of epoch 1..epochs: torch.optim.lr_scheduler.CosineAnnealingLR(T_max=epochs), stepped
    after each epoch, from config.lr towards 0."""
    return config.lr * (1 + math.cos(math.pi * (epoch - 1) / config.epochs)) / 2


def epoch_batches(config, count):
    """Each epoch's batches, the row indices of each step: the training set in a new order each epoch, as the MLP
    scene's."""
    shuffle = np.random.default_rng(config.seed + 1)
    for _ in range(config.epochs):
        order = shuffle.permutation(count)
        yield [order[start:start + config.batch] for start in range(0, count, config.batch)]


def evaluate(net, loss, data, epoch):
    """The test loss and accuracy at the end of epoch, BatchNorm2d on its running statistics (eval mode)."""
    _, x_test, _, y_test = data
    logits = net.eval().forward(x_test)
    net.train()
    return dict(epoch=epoch, test_loss=float(loss.forward(logits, y_test)),
                test_accuracy=float(np.mean(logits.argmax(axis=1) == y_test)))


def train(config, data, progress):
    """SGD on mini-batches: the network, in eval mode, and its figures: the loss of every step, the test loss and
    accuracy before training and after each epoch, and the test digits it gets wrong at the end. One BLAS thread, as
    the transformer scene's: the matrices are small and the machine may be shared."""
    from threadpoolctl import threadpool_limits
    x_train, x_test, y_train, y_test = data
    net, loss = cnn(config), SoftmaxCrossEntropy()
    optimizer = SGD(net.parameters(), config.lr, config.momentum)
    start = time.perf_counter()
    with threadpool_limits(1, user_api="blas"):
        losses, evaluations = [], [evaluate(net, loss, data, 0)]
        for epoch, batches in enumerate(epoch_batches(config, len(x_train)), 1):
            optimizer.lr, total, correct = learning_rate(config, epoch), 0.0, 0
            for step, rows in enumerate(batches, 1):
                logits = net.forward(x_train[rows])
                losses.append(float(loss.forward(logits, y_train[rows])))
                net.backward(loss.backward())
                optimizer.step()
                total += losses[-1] * len(rows)
                correct += np.sum(logits.argmax(axis=1) == y_train[rows])
                seen = min(step * config.batch, len(x_train))
                progress.update(f"cnn epoch {epoch:>2}/{config.epochs}", step, len(batches), total / seen,
                                correct / seen)
            evaluations.append(evaluate(net, loss, data, epoch))
        predicted = net.eval().forward(x_test).argmax(axis=1)
    wrong = np.flatnonzero(predicted != y_test)
    history = dict(train_loss=losses, **{key: [e[key] for e in evaluations] for key in evaluations[0]})
    return net, dict(label="CNN, two conv blocks", seconds=time.perf_counter() - start,
                     test_accuracy=history["test_accuracy"][-1], test_loss=history["test_loss"][-1],
                     mistakes=[dict(index=int(i), label=int(y_test[i]), predicted=int(predicted[i])) for i in wrong],
                     history=history)


def plot_training(result, config, path):
    from matplotlib.figure import Figure
    history, steps = result["history"], len(result["history"]["train_loss"])
    at_step = np.array(history["epoch"]) * steps // config.epochs
    figure = Figure(figsize=(9, 3.6), layout="constrained")
    losses, accuracies = figure.subplots(1, 2)
    losses.plot(np.arange(1, steps + 1), history["train_loss"], linewidth=0.6, label="training batch")
    losses.plot(at_step, history["test_loss"], marker=".", label="test set, eval mode")
    losses.set(yscale="log", xlabel="step", ylabel="cross-entropy (log scale)", title="Loss")
    accuracies.plot(history["epoch"], history["test_accuracy"], marker=".",
                    label=f"test set, eval mode: {result['test_accuracy']:.4f} at the end")
    accuracies.axhline(1 / CLASSES, color="grey", linestyle=":", label="chance")
    # a logit axis: 0.1, 0.9 and 0.99 as far apart as they are hard to reach
    ticks = (0.1, 0.5, 0.9, 0.98, 0.99, 0.995)
    accuracies.set(yscale="logit", ylim=(0.05, 0.997), xlabel="epoch", ylabel="test accuracy (logit scale)",
                   title="Test accuracy")
    accuracies.set_yticks(ticks, [str(tick) for tick in ticks])
    accuracies.set_yticks([], minor=True)
    losses.legend(fontsize="small")
    accuracies.legend(loc="lower right", fontsize="small")
    first, second = config.channels
    figure.suptitle(f"CNN (conv {first}, conv {second}, BatchNorm2d, {POOL.__name__}) on digits, SGD lr {config.lr} "
                    f"cosine-annealed, momentum {config.momentum}, batch {config.batch}", fontsize="medium")
    figure.savefig(path, dpi=100)


def plot_filters(net, image, path, columns=8):
    """The first convolution's filters, each above the map its block (conv, BatchNorm2d in eval mode, ReLU) makes
    of image."""
    from matplotlib.figure import Figure
    weights = net.layers[0].weight[:, 0]
    maps = Sequential(net.layers[:3]).eval().forward(image[None])[0]
    rows = -(-len(weights) // columns)
    figure = Figure(figsize=(9, 1.1 * 2 * rows + 0.5), layout="constrained")
    left, right = figure.subfigures(1, 2, width_ratios=(1.4, columns))
    digit = left.subplots()
    digit.imshow(image[0], cmap="gray_r")
    digit.set_title("a test digit", fontsize="small")
    grid = right.subplots(2 * rows, columns, squeeze=False)
    bound = np.abs(weights).max()
    for at, (kernel, feature) in enumerate(zip(weights, maps)):
        row, column = divmod(at, columns)
        grid[2 * row, column].imshow(kernel, cmap="RdBu_r", vmin=-bound, vmax=bound)
        grid[2 * row + 1, column].imshow(feature, cmap="magma")
    for axes in (digit, *grid.flat):
        axes.set_axis_off()
    figure.suptitle("The first convolution's learned 3x3 filters (red positive, blue negative),\neach above its map of "
                    "the digit after BatchNorm2d and ReLU", fontsize="medium")
    figure.savefig(path, dpi=100)


def run(config, out):
    """Train the CNN, write cnn_training.png, cnn_filters.png and cnn_results.json to out."""
    data = images(load_digits_split(config.seed))
    net, result = train(config, data, Progress(sys.stderr))
    out.mkdir(parents=True, exist_ok=True)
    plot_training(result, config, out / "cnn_training.png")
    plot_filters(net, data[1][0], out / "cnn_filters.png")
    report = dict(config=asdict(config), train_size=len(data[0]), test_size=len(data[1]), result=result)
    (out / "cnn_results.json").write_text(json.dumps(report, indent=2) + "\n")
    return result


def summary(result):
    """One line: the test accuracy and loss, and the training time (evaluations included)."""
    return (f"{result['label']:<30} test accuracy {result['test_accuracy']:.4f}  test loss "
            f"{result['test_loss']:.4f}  {result['seconds']:.1f} s")
