"""The symbols of index notation that every derivation shares (the naming contract).

One sample is one row; its class (or feature) index runs over 0..K-1, and every index is
assumed to lie in that range, which is what lets a Kronecker delta contract a sum.

    x[i]  input row (the logits of a loss)      y[i]  forward output of a layer
    t[i]  target row of a loss                  c     integer class label of a row
    p[i]  softmax(x), saved by a loss           g     upstream gradient: g[i] of a layer, or the
    lp[i] log-softmax, saved by a loss                reduction's weight of one row of a loss
    L[n]  per-sample loss of row n              G[n]  upstream gradient of an unreduced loss
    i, j, k, m  class indices                   n, r  batch indices
    K  class count                              N  number of loss entries (rows or elements)
    total  the mean's denominator, sum_n of each entry's weight (N unless classes are weighted)
    w[k]  class weight (pos_weight: pw[k])      mask  1 for a row whose label is kept, 0 if ignored
    eps  label smoothing                        margin  hinge margin
    X[n, k], W[k, j], b[j]  a linear layer's input, weight and bias; l2 its penalty factor
"""
import sympy as sp

K = sp.Symbol("K", integer=True, positive=True)
N = sp.Symbol("N", integer=True, positive=True)
i, j, k, m = sp.symbols("i j k m", integer=True)
n, r = sp.symbols("n r", integer=True)
c = sp.Symbol("c", integer=True)
g = sp.Symbol("g")
total = sp.Symbol("total", positive=True)
mask = sp.Symbol("mask")
eps = sp.Symbol("eps")
margin = sp.Symbol("margin", positive=True)
l2 = sp.Symbol("l2")

# every array holds real numbers: SymPy then differentiates |x| as sign(x), not through re and im
x, y, t, p = (sp.IndexedBase(name, real=True) for name in "xytp")
dy = sp.IndexedBase("g", real=True)
L, G = sp.IndexedBase("L", real=True), sp.IndexedBase("G", real=True)
w, pw = sp.IndexedBase("w", real=True), sp.IndexedBase("pw", real=True)
X, W, b = sp.IndexedBase("x", real=True), sp.IndexedBase("W", real=True), sp.IndexedBase("b", real=True)


def over_classes(expr, index):
    """sum_{index=0}^{K-1} expr."""
    return sp.Sum(expr, (index, 0, K - 1))


def over_batch(expr, index=n):
    """sum_{index=0}^{N-1} expr."""
    return sp.Sum(expr, (index, 0, N - 1))


class ClassMax(sp.Function):
    """max_k x_k of a row: the same for every class index, so it can shift exponentials."""

    nargs = 1
    is_real = True                 # the max of a row of real numbers

    def _latex(self, printer):
        return r"\max_{k} %s_{k}" % printer._print(self.args[0])
