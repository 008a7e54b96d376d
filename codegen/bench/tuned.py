"""The NumPy baselines: the fastest NumPy we could write for each case, and the seed's SoftmaxLayer.

The tuned classes have the generated API and compute the same values (tests/test_bench.py checks
them), only faster: each array result gets one buffer that in-place ufuncs (out=) fill, every
exponential is taken once, and losses use log-sum-exp rather than the log of a softmax. They also
keep a NaN where the generated kernels do (a baseline that turns it into a number computes another
function). They cover what the benchmark times, no more: integer labels and reduction="mean", no
input checks."""
import numpy as np


def row_sums(a):
    """Sums over the last axis, as a column; einsum reads the rows faster than np.sum."""
    return np.einsum("...k->...", a)[..., None]


class Softmax:
    def forward(self, x):
        y = np.subtract(x, x.max(axis=-1, keepdims=True))
        np.exp(y, out=y)
        y /= row_sums(y)
        self._y = y
        return y

    def backward(self, g):
        # dx = y * (g - <g, y>): einsum takes the row dot products without a (N, K) product array
        dx = np.subtract(g, np.einsum("...k,...k->...", g, self._y)[..., None])
        dx *= self._y
        return dx


class SoftmaxCrossEntropy:
    _shape = None

    def forward(self, x, labels):
        n, k = x.shape
        # the labels' flat positions (faster to index than (rows, labels)) from the rows' first ones, kept
        # while the shape stays, as the generated code keeps its row numbers
        if x.shape != self._shape:
            self._shape, self._starts = x.shape, np.arange(0, n * k, k)
        at = self._starts + labels
        # the one (N, K) buffer: x - max, then its exp, then (in backward) dx
        e = np.subtract(x, x.max(axis=1, keepdims=True))
        shifted_at_label = e.reshape(-1)[at]
        np.exp(e, out=e)
        sums = np.einsum("ij->i", e)
        self._e, self._sums, self._at = e, sums, at
        # log-sum-exp minus the label's logit, averaged (np.mean costs microseconds more)
        return np.add.reduce(np.log(sums) - shifted_at_label) / n

    def backward(self):
        # dx = (softmax - onehot) / N, written over the saved exponentials: like torch without
        # retain_graph, one backward per forward
        e, n = self._e, self._e.shape[0]
        e *= (1 / (n * self._sums))[:, None]
        e.reshape(-1)[self._at] -= 1 / n
        self._e = None
        return e


def sigmoid(x):
    """1 / (1 + exp(-x)), exact at both ends: exp(-x) overflows to inf where sigmoid is 0, which is
    meant, so NumPy is told not to warn (the generated kernels may not warn either)."""
    with np.errstate(over="ignore"):
        y = np.negative(x)
        np.exp(y, out=y)
        y += 1
        return np.reciprocal(y, out=y)


class Sigmoid:
    def forward(self, x):
        self._y = sigmoid(x)
        return self._y

    def backward(self, g):
        dx = np.subtract(1, self._y)
        dx *= self._y
        dx *= g
        return dx


class Tanh:
    def forward(self, x):
        self._y = np.tanh(x)
        return self._y

    def backward(self, g):
        dx = np.square(self._y)
        np.subtract(1, dx, out=dx)
        dx *= g
        return dx


class ReLU:
    """NaN in dx at a NaN x, as the generated ReLU (the README's NaN policy): the fastest NumPy we found
    that keeps the NaN. Measured against the comparison below, backward alone, at (1024, 100) and
    (8192, 1000): this 1.1x-1.4x; np.heaviside(x, 0) 3.5x-12x and np.sign of forward's output 1.8x-2.9x
    (neither has a SIMD loop); the comparison plus a test for NaN in x (np.isnan(x).any(), a sum, a dot
    product), repaired only where x has one, 1.1x-1.7x; PyTorch's not(x <= 0), which passes g on at NaN,
    1.05x-1.2x."""

    def forward(self, x):
        self._x = x
        return x.clip(0, np.inf)              # np.maximum(x, 0) has no SIMD loop against a number

    def backward(self, g):
        step = self._x.clip(0, 1)             # 0 for x <= 0, x in (0, 1], NaN at NaN
        np.ceil(step, out=step)               # 0 at x = 0, as torch
        return np.multiply(step, g, out=step)


class ReLUByComparison(ReLU):
    """ReLU's backward as g (x > 0): one boolean pass instead of two float ones, but 0 at a NaN x, a number
    where the NaN policy asks NaN, so it is not a baseline for the generated ReLU. make bench times it
    beside the tuned ReLU (as "tuned-cmp") to show what the policy costs."""

    def backward(self, g):
        return np.multiply(g, self._x > 0)    # faster than np.where


class Linear:
    """y = x @ W + b with W of shape (in_features, out_features); the benchmark sets W and b."""

    def __init__(self, in_features, out_features):
        self.W = np.zeros((in_features, out_features))
        self.b = np.zeros(out_features)

    def forward(self, x):
        self._x = x
        y = x @ self.W
        y += self.b
        return y

    def backward(self, g):
        self.dW = self._x.T @ g               # BLAS reads the transposed views in place
        self.db = g.sum(axis=0)
        return g @ self.W.T


class BinaryCrossEntropyWithLogits:
    def forward(self, x, t):
        self._x, self._t = x, t
        # max(x, 0) - x t = x ((x > 0) - t) and log1p(exp(-|x|)) are both >= 0 for t in [0, 1], so
        # their totals add without cancellation; the first total is a dot product, with no buffer
        a = np.subtract(x > 0, t, dtype=x.dtype)
        hinge = np.vdot(x, a)
        np.negative(np.abs(x, out=a), out=a)                # -|x|: two SIMD passes beat np.copysign's one
        np.exp(a, out=a)
        np.log1p(a, out=a)
        return (hinge + a.sum()) / x.size

    def backward(self):
        dx = sigmoid(self._x)
        dx -= self._t
        dx *= 1 / dx.size
        return dx


class SoftmaxLayer:
    """Seed 000's layer as written there (its comments translated): softmax forward, and a backward
    that takes the labels and returns the mean cross-entropy's gradient."""

    def __init__(self, name='Softmax'):
        pass

    def forward(self, in_data):
        shift_scores = in_data - np.max(in_data, axis=1).reshape(-1, 1)  # subtract each row's largest number
        self.top_val = np.exp(shift_scores) / np.sum(np.exp(shift_scores), axis=1).reshape(-1, 1)
        return self.top_val

    def backward(self, residual):
        N = residual.shape[0]
        dscores = self.top_val.copy()
        dscores[range(N), list(residual)] -= 1  # the loss's derivative with respect to the softmax input
        dscores /= N
        return dscores


class SeedSoftmaxCrossEntropy:
    """The seed's SoftmaxLayer behind the loss API; the loss is the seed's log-likelihood cost of its
    probabilities, -mean(log p[label])."""

    def __init__(self):
        self._layer = SoftmaxLayer()

    def forward(self, x, labels):
        self._labels = labels
        p = self._layer.forward(x)
        return -np.mean(np.log(p[range(x.shape[0]), labels]))

    def backward(self):
        return self._layer.backward(self._labels)
