"""Operations in index notation, for symgrad codegen --ops examples/tensor_ops.py --out DIR --backend numpy.

Each array's axes are index letters; index k runs over 0..K-1. The layers' params are made by the
generated constructor from the sizes of their axes (ValidConv1d(O=8, C=3, J=3)); the losses take integer labels
(NLL, FocalLoss) or target probabilities (KLDiv). derive/catalog.py declares more the same way (LayerNorm,
RMSNorm, BatchNorm1d and BatchNorm2d with their running statistics, GLU, Embedding, Linear)."""
from derive.declare import tensor_loss, tensor_op

SOFTMAX = tensor_op("TemperedSoftmax", inputs={"x": "n k"}, options={"T": 2.0},
                    steps=["s[n] = Sum(exp(x[n, k] / T), k)", "y[n, k] = exp(x[n, k] / T) / s[n]"],
                    summary="softmax of x / T over the last axis (T the temperature)")
# one head: queries Q (n t d), keys K (n s d), values V (n s e)
ATTENTION = tensor_op(
    "Attention", inputs={"Q": "n t d", "K": "n s d", "V": "n s e"},
    steps=["A[n, t, s] = Sum(Q[n, t, d] * K[n, s, d], d) / sqrt(D)",
           "Z[n, t] = Sum(exp(A[n, t, s]), s)",
           "P[n, t, s] = exp(A[n, t, s]) / Z[n, t]",
           "y[n, t, e] = Sum(P[n, t, s] * V[n, s, e], s)"],
    summary="scaled dot-product attention softmax(Q K^T / sqrt(D)) V, one head")
# the causal mask: query t attends to keys s <= t; a masked entry is 0 in Z and P (and in their gradients)
CAUSAL_ATTENTION = tensor_op(
    "CausalAttention", inputs={"Q": "n t d", "K": "n s d", "V": "n s e"},
    steps=["A[n, t, s] = Sum(Q[n, t, d] * K[n, s, d], d) / sqrt(D)",
           "Z[n, t] = Sum(Piecewise((exp(A[n, t, s]), s <= t), (0, True)), s)",
           "P[n, t, s] = Piecewise((exp(A[n, t, s]) / Z[n, t], s <= t), (0, True))",
           "y[n, t, e] = Sum(P[n, t, s] * V[n, s, e], s)"],
    summary="scaled dot-product attention with a causal mask (key s <= query t), one head")
CONV1D = tensor_op(
    "ValidConv1d", inputs={"x": "n c l"}, params={"w": ("o c j", "uniform"), "b": ("o", "uniform")},
    sizes={"M": "L - J + 1"}, steps=["y[n, o, m] = Sum(w[o, c, j] * x[n, c, m + j], c, j) + b[o]"],
    summary="1-d convolution (cross-correlation, stride 1, no padding) of C channels into O")
# KLDiv takes logits x and target probabilities t, as PyTorch's kl_div(log_softmax(x), t): an entry
# t = 0 contributes 0 (the Piecewise), so t log t is never evaluated at 0
KL_DIV = tensor_loss(
    "KLDiv", inputs={"x": "n k"}, targets={"t": "n k"},
    steps=["s[n] = Sum(exp(x[n, k]), k)",
           "L[n] = Sum(Piecewise((t[n, k] * (log(t[n, k]) - x[n, k] + log(s[n])), t[n, k] > 0), (0, True)), k)"],
    summary="KL divergence of the softmax of x from target probabilities t, per row")
NLL = tensor_loss("NLL", inputs={"x": "n k"}, targets={"c": "n"}, steps=["L[n] = -x[n, c[n]]"],
                  summary="negative log-likelihood of log-probabilities x at integer labels c")
# The focal loss in log-softmax form: lp = log p is x - log s, never log of a p that underflows, and its
# backward reads no 1/p (tests/test_tensor_derive.py's form through p is the same function, but its
# backward divides by p[n, c[n]], which is 0 at logits far apart)
FOCAL_LOSS = tensor_loss(
    "FocalLoss", inputs={"x": "n k"}, targets={"c": "n"}, options={"gamma": 2.0},
    steps=["s[n] = Sum(exp(x[n, k]), k)", "lp[n, k] = x[n, k] - log(s[n])",
           "L[n] = -(1 - exp(lp[n, c[n]]))**gamma * lp[n, c[n]]"],
    summary="softmax focal loss -(1 - p)^gamma log p at integer labels c")

OPS = [SOFTMAX, ATTENTION, CAUSAL_ATTENTION, CONV1D, KL_DIV, NLL, FOCAL_LOSS]
