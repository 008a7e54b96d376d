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


# Sigmoid's and Tanh's backward read x, as the generated ones do (issue 23's accuracy contract): y (1 - y) and
# 1 - y^2 from the saved y are 0 where y rounds to 1. From x, in the fewest passes we found: sigmoid(x)
# sigmoid(-x) = 1 / (2 + 2 cosh(x)) and 1 - tanh(x)^2 = 1 / cosh(x)^2, one buffer each; cosh overflows to inf
# only where the truth is below the smallest normal number, and gives 0 there; NaN stays NaN. Measured at
# (1024, 100) and (8192, 1000), float32 and float64: 1.5x-4x faster than the exp(-|x|) forms.

class Sigmoid:
    def forward(self, x):
        self._x = x
        return sigmoid(x)

    def backward(self, g):
        with np.errstate(over="ignore"):
            dx = np.cosh(self._x)
        dx *= 2
        dx += 2
        return np.divide(g, dx, out=dx)


class Tanh:
    def forward(self, x):
        self._x = x
        return np.tanh(x)

    def backward(self, g):
        with np.errstate(over="ignore"):
            dx = np.cosh(self._x)
            np.square(dx, out=dx)
        return np.divide(g, dx, out=dx)


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
        # the generated kernels' function since issue 23: (1 - t) sigmoid(x) - t sigmoid(-x), which is -exp(-x)
        # at t = 1 for large x, where sigmoid(x) - t cancels to 0 (from x = 17 in float32)
        x, t = self._x, self._t
        with np.errstate(over="ignore"):   # exp(x) = inf gives t/inf = 0, the limit
            a = np.negative(x)
            np.exp(a, out=a)
            a += 1
            dx = np.subtract(1, t, dtype=x.dtype)
            np.divide(dx, a, out=dx)
            np.exp(x, out=a)
            a += 1
            np.divide(t, a, out=a)
        dx -= a
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


# The layers of issue 25, float32 at the benchmark's sizes; forward(*inputs) -> y, backward(g) -> the inputs'
# gradients, setting d<param> as the generated classes do. The benchmark sets the params.

class LayerNorm:
    """Rows of x (N, K) normalised, scaled by gamma and shifted by beta: three (N, K) buffers in all, as each
    new one costs its page faults (at (8192, 1024) float32 an array is 32 MiB, glibc's largest heap block, so
    every one is a fresh mmap): x - mean scaled in place into x hat, y, and in backward g gamma; dx is written
    over x hat, like torch without retain_graph, one backward per forward."""

    def __init__(self, normalized_shape, eps=1e-5):
        self.gamma, self.beta, self.eps = np.ones(normalized_shape), np.zeros(normalized_shape), eps

    def forward(self, x):
        K = x.shape[-1]
        xhat = np.subtract(x, row_sums(x) / K)
        var = np.einsum("nk,nk->n", xhat, xhat)[:, None] / K
        rstd = 1 / np.sqrt(var + x.dtype.type(self.eps))
        xhat *= rstd
        y = np.multiply(xhat, self.gamma)
        y += self.beta
        self._xhat, self._rstd = xhat, rstd
        return y

    def backward(self, g):
        # dx = rstd (g gamma - mean(g gamma) - xhat mean(g gamma xhat)), the means over each row
        xhat, K = self._xhat, g.shape[-1]
        self.dbeta = np.einsum("nk->k", g)
        self.dgamma = np.einsum("nk,nk->k", g, xhat)
        gg = np.multiply(g, self.gamma)
        dx = np.multiply(xhat, np.einsum("nk,nk->n", gg, xhat)[:, None] / -K, out=xhat)
        dx += gg
        dx -= row_sums(gg) / K
        dx *= self._rstd
        self._xhat = None
        return dx


class BatchNorm2d:
    """x (N, C, H, W) normalised per channel over N, H and W (training mode, the batch's biased variance),
    then scaled and shifted; the per-channel sums are einsums over the view (N, C, H W)."""

    def __init__(self, num_features, eps=1e-5):
        self.gamma, self.beta, self.eps = np.ones(num_features), np.zeros(num_features), eps

    def forward(self, x):
        n, c = x.shape[:2]
        x3 = x.reshape(n, c, -1)
        m = x3.shape[0] * x3.shape[2]
        xhat = np.subtract(x3, (np.einsum("nci->c", x3) / m)[:, None])
        var = np.einsum("nci,nci->c", xhat, xhat) / m
        rstd = (1 / np.sqrt(var + x.dtype.type(self.eps)))[:, None]
        xhat *= rstd
        y = np.multiply(xhat, self.gamma[:, None])
        y += self.beta[:, None]
        self._xhat, self._rstd, self._m = xhat, rstd, m
        return y.reshape(x.shape)

    def backward(self, g):
        xhat, m = self._xhat, self._m
        g3 = g.reshape(xhat.shape)
        self.dbeta = np.einsum("nci->c", g3)
        self.dgamma = np.einsum("nci,nci->c", g3, xhat)
        # dx = gamma rstd (g - dbeta / m - xhat dgamma / m), per channel
        dx = np.multiply(xhat, (self.dgamma / -m)[:, None])
        dx += g3
        dx -= (self.dbeta / m)[:, None]
        dx *= self.gamma[:, None] * self._rstd
        return dx.reshape(g.shape)


class CausalAttention:
    """softmax(Q K^T / sqrt(D) + causal mask) V over leading axes (N, heads): one (T, T) score buffer per head,
    made the softmax in place (the mask added as a precomputed -inf triangle), and reused by backward for dS."""

    def forward(self, Q, K, V):
        T, D = Q.shape[-2:]
        scale = Q.dtype.type(1 / np.sqrt(D))
        P = Q @ K.swapaxes(-1, -2)
        P *= scale
        P += np.triu(np.full((T, T), -np.inf, Q.dtype), 1)
        P -= P.max(axis=-1, keepdims=True)
        np.exp(P, out=P)
        P /= row_sums(P)
        self._saved, self._scale = (Q, K, V, P), scale
        return P @ V

    def backward(self, g):
        Q, K, V, P = self._saved
        dV = P.swapaxes(-1, -2) @ g
        # dS = P (dP - rowsum(dP P)), written over dP; P is 0 where masked, so dS is too
        dS = g @ V.swapaxes(-1, -2)
        dS -= np.einsum("...ts,...ts->...t", dS, P)[..., None]
        dS *= P
        dS *= self._scale
        return dS @ K, dS.swapaxes(-1, -2) @ Q, dV


class Conv2d:
    """3x3 convolution (cross-correlation, stride 1, padding 1) of x (N, C, H, W) by weight (O, C, 3, 3) plus
    bias (O,): im2col from a strided view of the padded x, copied once to columns (N, C 9, H W), and one
    matrix product per image; backward adds the columns' gradient back in 9 shifted slices (col2im)."""

    def __init__(self, in_channels, out_channels, kernel_size=3, padding=1):
        self.weight = np.zeros((out_channels, in_channels, kernel_size, kernel_size))
        self.bias = np.zeros(out_channels)
        self.padding = padding

    def forward(self, x):
        n, c, h, w = x.shape
        o, _, kh, kw = self.weight.shape
        p = self.padding
        padded = np.zeros((n, c, h + 2 * p, w + 2 * p), x.dtype)
        padded[:, :, p:p + h, p:p + w] = x
        windows = np.lib.stride_tricks.sliding_window_view(padded, (kh, kw), axis=(2, 3))   # (n, c, h, w, kh, kw)
        cols = np.ascontiguousarray(windows.transpose(0, 1, 4, 5, 2, 3)).reshape(n, c * kh * kw, -1)
        y = self.weight.reshape(o, -1) @ cols
        y += self.bias[:, None]
        self._cols, self._shape = cols, x.shape
        return y.reshape(n, o, h, w)

    def backward(self, g):
        n, c, h, w = self._shape
        o, _, kh, kw = self.weight.shape
        p = self.padding
        g3 = g.reshape(n, o, -1)
        self.dbias = np.einsum("noi->o", g3)
        self.dweight = np.einsum("noi,nki->ok", g3, self._cols, optimize=True).reshape(self.weight.shape)
        dcols = (self.weight.reshape(o, -1).T @ g3).reshape(n, c, kh, kw, h, w)
        dpadded = np.zeros((n, c, h + 2 * p, w + 2 * p), g.dtype)
        for i in range(kh):
            for j in range(kw):
                dpadded[:, :, i:i + h, j:j + w] += dcols[:, :, i, j]
        return dpadded[:, :, p:p + h, p:p + w]


class MLP:
    """One SGD step (momentum, as torch.optim.SGD) of Linear-ReLU-Linear-softmax cross-entropy, the fastest NumPy we
    could write: the bias added in place to the matrix product, ReLU in place (its backward reads the output,
    h > 0 where x > 0), the loss's gradient written over its exponentials, no gradient of the input x, and the
    update in place with one scratch buffer per parameter."""

    def __init__(self, arrays, lr, momentum):
        self.params = [arrays[name].copy() for name in ("W1", "b1", "W2", "b2")]
        self.velocities = [np.zeros_like(p) for p in self.params]
        self.scratch = [np.empty_like(p) for p in self.params]
        self.x, self.labels, self.lr, self.momentum = arrays["x"], arrays["labels"], lr, momentum
        self.loss = SoftmaxCrossEntropy()

    def step(self):
        W1, b1, W2, b2 = self.params
        h = self.x @ W1
        h += b1
        np.maximum(h, 0, out=h)
        logits = h @ W2
        logits += b2
        loss = self.loss.forward(logits, self.labels)
        dlogits = self.loss.backward()
        dh = dlogits @ W2.T
        dh *= h > 0
        grads = (self.x.T @ dh, np.einsum("nk->k", dh), h.T @ dlogits, np.einsum("nk->k", dlogits))
        for param, grad, velocity, scratch in zip(self.params, grads, self.velocities, self.scratch):
            velocity *= self.momentum
            velocity += grad
            np.multiply(velocity, -self.lr, out=scratch)
            param += scratch
        return loss

    def weights(self):
        return self.params
