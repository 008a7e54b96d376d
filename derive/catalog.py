"""The registry: every operation declared once. Derivations, kernels, tests and docs follow from it.

Every operation is declared the way users declare their own (derive.declare): activation and
elementwise_loss in the scalars x and t; tensor_op and tensor_loss in index notation, made row or
element operations (whose kernels work a row or an entry at a time, in both backends) by row_layer,
row_loss and element_loss, which also take PyTorch's options of a loss over classes.
Names follow the contract of derive.symbols: x input, y output, t target, g upstream gradient."""
from derive.declare import activation, element_loss, elementwise_loss, row_layer, row_loss, tensor_loss, tensor_op
from derive.ops import build_catalog

# SELU's constants (Klambauer et al. 2017), as torch.nn.SELU has them
SELU_ALPHA, SELU_SCALE = "1.6732632423543772848170429916717", "1.0507009873554804934193349852946"

def batch_norm(name, spec, summary):
    """A BatchNorm of input x with axes spec ("n c [l]"): its statistics over every index but c, their count M
    the product of those sizes, the running variance unbiased by M / (M - 1)."""
    axes = spec.replace("[", "").replace("]", "").split()
    at, over = ", ".join(axes), [i for i in axes if i != "c"]
    count = "*".join(i.upper() for i in over)
    return tensor_op(name, inputs={"x": spec}, params={"gamma": ("c", "ones"), "beta": ("c", "zeros")},
                     options={"eps": (1e-5, ">= 0"), "momentum": (0.1, "[0, 1]")},
                     switches={"affine": ("gamma", "beta")}, scaling={"x": 1, "eps": 2},
                     running={"mu": ("running_mean", "zeros", "mu[c]", "momentum"),
                              "var": ("running_var", "ones", f"var[c] * {count} / ({count} - 1)", "momentum")},
                     names={"C": "num_features"},
                     steps=[f"mu[c] = Sum(x[{at}], {', '.join(over)}) / ({count})",
                            f"var[c] = Sum((x[{at}] - mu[c])**2, {', '.join(over)}) / ({count})",
                            f"y[{at}] = (x[{at}] - mu[c]) / sqrt(var[c] + eps) * gamma[c] + beta[c]"],
                     summary=summary)


OPS = (
    # sigmoid and tanh backward read x, not y as PyTorch's sigmoid_backward and tanh_backward do: y (1 - y) and
    # 1 - y^2 are 0 where y rounds to 1 (at x = 20 the truth is 1.7e-17); from x the stability rewrites give
    # sigmoid(x) sigmoid(-x) and 4 exp(-2|x|) / (1 + exp(-2|x|))^2, right in the tails (tests/test_accuracy.py)
    activation("Sigmoid", "sigmoid(x)", summary="logistic sigmoid, element-wise", domain=(-6.0, 6.0)),
    activation("Tanh", "tanh(x)", summary="hyperbolic tangent, element-wise"),
    # at a kink the derivative is PyTorch's: 0 for ReLU at 0 (derive.algebra.at_kinks), slope for LeakyReLU
    activation("ReLU", "Max(0, x)", summary="max(0, x), element-wise"),
    activation("LeakyReLU", "Piecewise((x, x > 0), (negative_slope*x, True))",
               params={"negative_slope": 0.01}, summary="x for x > 0, else negative_slope * x, element-wise"),
    activation("Softplus", "log(1 + exp(x))", summary="log(1 + exp(x)), element-wise", domain=(-6.0, 6.0)),
    activation("SiLU", "x*sigmoid(x)", summary="x sigmoid(x) (swish), element-wise", domain=(-6.0, 6.0)),
    activation("GELU", "x*(1 + erf(x/sqrt(2)))/2", summary="x Phi(x), exact with erf, element-wise"),
    activation("GELUTanh", "x*(1 + tanh(sqrt(2/pi)*(x + 0.044715*x**3)))/2",
               summary="GELU's tanh approximation, element-wise"),
    # ELU, SELU: the derivative at 0 is the left side's, alpha (scale * alpha), as PyTorch's
    activation("ELU", "Piecewise((x, x > 0), (alpha*(exp(x) - 1), True))", params={"alpha": 1.0},
               summary="x for x > 0, else alpha (exp(x) - 1), element-wise"),
    activation("SELU", f"{SELU_SCALE}*Piecewise((x, x > 0), ({SELU_ALPHA}*(exp(x) - 1), True))",
               summary="scale * ELU(x) with SELU's alpha and scale, element-wise"),
    activation("Mish", "x*tanh(log(1 + exp(x)))", summary="x tanh(softplus(x)), element-wise",
               domain=(-6.0, 6.0)),
    activation("Softsign", "x/(1 + Abs(x))", summary="x / (1 + |x|), element-wise"),
    # at min_val and max_val the derivative is 0, as PyTorch's hardtanh_backward; F.hardtanh refuses
    # min_val > max_val
    activation("HardTanh", "Min(Max(x, min_val), max_val)", params={"min_val": -1.0, "max_val": 1.0},
               constraints=("min_val <= max_val",), summary="x clipped to [min_val, max_val], element-wise"),
    row_layer(tensor_op("Softmax", inputs={"x": "n k"}, summary="softmax over the last axis",
                        steps=["s[n] = Sum(exp(x[n, k]), k)", "y[n, k] = exp(x[n, k]) / s[n]"])),
    row_layer(tensor_op("LogSoftmax", inputs={"x": "n k"}, summary="log of the softmax over the last axis",
                        steps=["s[n] = Sum(exp(x[n, k]), k)", "y[n, k] = log(exp(x[n, k]) / s[n])"])),
    # PyTorch's nn.LayerNorm(normalized_shape, eps, elementwise_affine, bias) over the last axis: biased variance
    tensor_op("LayerNorm", inputs={"x": "n k"}, params={"gamma": ("k", "ones"), "beta": ("k", "zeros")},
              options={"eps": (1e-5, ">= 0")}, switches={"elementwise_affine": ("gamma", "beta"), "bias": ("beta",)},
              names={"K": "normalized_shape"}, scaling={"x": 1, "eps": 2},
              steps=["mu[n] = Sum(x[n, k], k) / K", "var[n] = Sum((x[n, k] - mu[n])**2, k) / K",
                     "y[n, k] = (x[n, k] - mu[n]) / sqrt(var[n] + eps) * gamma[k] + beta[k]"],
              summary="each row normalised to mean 0 and variance 1, then scaled by gamma and shifted by beta"),
    # PyTorch's nn.RMSNorm(normalized_shape, eps=None, elementwise_affine): eps None is the dtype's machine epsilon
    tensor_op("RMSNorm", inputs={"x": "n k"}, params={"gamma": ("k", "ones")}, options={"eps": (None, ">= 0")},
              switches={"elementwise_affine": ("gamma",)}, names={"K": "normalized_shape"}, scaling={"x": 1, "eps": 2},
              steps=["ms[n] = Sum(x[n, k]**2, k) / K", "y[n, k] = x[n, k] / sqrt(ms[n] + eps) * gamma[k]"],
              summary="each row divided by its root mean square, then scaled by gamma"),
    # PyTorch's nn.BatchNorm1d(num_features, eps, momentum, affine, track_running_stats) on (N, C) or (N, C, L), and
    # nn.BatchNorm2d on (N, C, H, W): training normalises with the batch's statistics over every axis but c (biased
    # variance) and moves the running mean and the running unbiased variance towards them; eval mode reads those
    batch_norm("BatchNorm1d", "n c [l]",
               "each channel normalised over the batch (and length), then scaled by gamma and shifted by beta"),
    batch_norm("BatchNorm2d", "n c h w",
               "each channel normalised over the batch and the image, then scaled by gamma and shifted by beta"),
    # PyTorch's nn.GLU() (dim=-1): the first half of the last axis, x[n, h], gated by the second, x[n, h + H]
    tensor_op("GLU", inputs={"x": "n k"}, sizes={"H": "K/2"}, steps=["y[n, h] = x[n, h] * sigmoid(x[n, h + H])"],
              summary="the first half of the last axis gated by the sigmoid of the second"),
    # PyTorch's nn.Embedding(num_embeddings, embedding_dim): integer x picks rows of weight; its gradient adds
    # g's rows at x's entries, a row picked twice getting both
    tensor_op("Embedding", inputs={"x": "n"}, params={"weight": ("v d", "normal")},
              names={"V": "num_embeddings", "D": "embedding_dim"}, steps=["y[n, d] = weight[x[n], d]"],
              summary="row x[n] of the table weight for each integer x[n] (a token's embedding)"),
    # PyTorch's nn.Dropout(p): in training mode each entry zeroed with probability p, the others scaled by
    # 1/(1 - p), the same mask in backward; eval() makes it the identity
    tensor_op("Dropout", inputs={"x": "n"}, options={"p": (0.5, "[0, 1]")}, noise={"m": ("n", "dropout", "p")},
              steps=["y[n] = x[n] * m[n]"],
              summary="x times a mask of 0 and 1/(1 - p) drawn in training mode (each entry kept with probability "
                      "1 - p), x in eval mode"),
    # PyTorch's F.scaled_dot_product_attention(Q, K, V, is_causal): softmax(Q K^T / sqrt(D)) V over any leading axes
    # (batch, heads); is_causal masks key s > query t (0 in Z and P, and in their gradients). The scores A, linear in
    # Q, overflow where |q| |k| passes the largest number, the softmax's truth a finite near one-hot: there the
    # kernels compute them again from c Q, c a power of two (rescaled; PyTorch's is NaN there)
    tensor_op("ScaledDotProductAttention", inputs={"Q": "n t d", "K": "n s d", "V": "n s e"}, flags={"is_causal": False},
              rescaled={"A": "Q"},
              steps=["A[n, t, s] = Sum(Q[n, t, d] * K[n, s, d], d) / sqrt(D)",
                     "Z[n, t] = Sum(Piecewise((exp(A[n, t, s]), (s <= t) | ~is_causal), (0, True)), s)",
                     "P[n, t, s] = Piecewise((exp(A[n, t, s]) / Z[n, t], (s <= t) | ~is_causal), (0, True))",
                     "y[n, t, e] = Sum(P[n, t, s] * V[n, s, e], s)"],
              summary="attention softmax(Q K^T / sqrt(D)) V, each query t reading keys s <= t where is_causal"),
    # PyTorch's nn.MultiheadAttention(embed_dim, num_heads, batch_first=True) on (N, T, E): each head h of size
    # D = E/H attends with its own projections; in_proj_weight's rows h D + d are Wq[h, d, :] (then Wk, Wv),
    # out_proj.weight[e, h D + d] is Wo[e, h, d]; forward returns the output alone (need_weights=False)
    tensor_op("MultiheadAttention", inputs={"query": "n t e", "key": "n s e", "value": "n s e"},
              params={"Wq": ("h d e", "uniform"), "bq": ("h d", "zeros"), "Wk": ("h d e", "uniform"),
                      "bk": ("h d", "zeros"), "Wv": ("h d e", "uniform"), "bv": ("h d", "zeros"),
                      "Wo": ("e h d", "uniform"), "bo": ("e", "zeros")},
              sizes={"D": "E/H"}, names={"E": "embed_dim", "H": "num_heads"}, flags={"is_causal": False},
              rescaled={"A": "q"},   # its scores overflow as ScaledDotProductAttention's
              rounded=("q", "k", "v"),   # its attention's inputs, which every float kernel holds rounded
              steps=["q[n, t, h, d] = Sum(query[n, t, e] * Wq[h, d, e], e) + bq[h, d]",
                     "k[n, s, h, d] = Sum(key[n, s, e] * Wk[h, d, e], e) + bk[h, d]",
                     "v[n, s, h, d] = Sum(value[n, s, e] * Wv[h, d, e], e) + bv[h, d]",
                     "A[n, h, t, s] = Sum(q[n, t, h, d] * k[n, s, h, d], d) / sqrt(D)",
                     "Z[n, h, t] = Sum(Piecewise((exp(A[n, h, t, s]), (s <= t) | ~is_causal), (0, True)), s)",
                     "P[n, h, t, s] = Piecewise((exp(A[n, h, t, s]) / Z[n, h, t], (s <= t) | ~is_causal), (0, True))",
                     "o[n, t, h, d] = Sum(P[n, h, t, s] * v[n, s, h, d], s)",
                     "y[n, t, e] = Sum(o[n, t, h, d] * Wo[e, h, d], h, d) + bo[e]"],
              summary="multi-head attention: H heads of size E/H, each softmax(q k^T / sqrt(D)) v of its projections "
                      "of query, key and value, concatenated and projected; key s <= query t where is_causal",
              domain=(-1.0, 1.0), tol=1e-5),   # dbk is 0 (each score row shifted alike): its differences are rounding,
    # 3e-9 of a gradient whose scale is the checks' floor, 1e-3
    # PyTorch's nn.Conv1d and nn.Conv2d(in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True):
    # cross-correlation, the window at stride 1 declared and padded and strided by the class (tensor_op's padding
    # and stride), so dx is the transposed convolution: g read through the kernel's window, flipped; weight in
    # PyTorch's layout (O, C, U, V), the bias b (the constructor's bias=False keeps it at 0, as PyTorch's None)
    tensor_op("Conv1d", inputs={"x": "n c l"}, params={"weight": ("o c u", "uniform"), "b": ("o", "uniform")},
              sizes={"M": "L - U + 1"}, names={"C": "in_channels", "O": "out_channels", "U": "kernel_size"},
              switches={"bias": ("b",)}, padding={"x": "l"}, stride="m",
              steps=["y[n, o, m] = Sum(weight[o, c, u] * x[n, c, m + u], c, u) + b[o]"],
              summary="1-d convolution (cross-correlation) of C channels into O with a kernel of U"),
    tensor_op("Conv2d", inputs={"x": "n c h w"}, params={"weight": ("o c u v", "uniform"), "b": ("o", "uniform")},
              sizes={"I": "H - U + 1", "J": "W - V + 1"},
              names={"C": "in_channels", "O": "out_channels", "U": "kernel_size", "V": "kernel_size"},
              switches={"bias": ("b",)}, padding={"x": "h w"}, stride="i j",
              steps=["y[n, o, i, j] = Sum(weight[o, c, u, v] * x[n, c, i + u, j + v], c, u, v) + b[o]"],
              summary="2-d convolution (cross-correlation) of C channels into O with a kernel of U by V"),
    # PyTorch's nn.AvgPool2d(kernel_size, stride=None, padding=0): stride None is kernel_size, and the mean counts the
    # padding's zeros (count_include_pad=True)
    tensor_op("AvgPool2d", inputs={"x": "n c h w"}, sizes={"I": "H - U + 1", "J": "W - V + 1"},
              names={"U": "kernel_size", "V": "kernel_size"}, padding={"x": "h w"}, stride=("i j", "kernel_size"),
              steps=["y[n, c, i, j] = Sum(x[n, c, i + u, j + v], u, v) / (U * V)"],
              summary="the mean of each U by V window of every channel"),
    # PyTorch's nn.MaxPool2d(kernel_size, stride=None, padding=0): padded with -inf, the gradient of each window to its
    # first largest entry (m, a mask the derivation holds constant), a NaN counting as largest
    tensor_op("MaxPool2d", inputs={"x": "n c h w"}, sizes={"I": "H - U + 1", "J": "W - V + 1"},
              names={"U": "kernel_size", "V": "kernel_size"}, padding={"x": ("h w", "-inf")},
              stride=("i j", "kernel_size"),
              steps=["m[n, c, i, j, u, v] = FirstMax(x[n, c, i + u, j + v], u, v)",
                     "y[n, c, i, j] = Sum(Piecewise((x[n, c, i + u, j + v], m[n, c, i, j, u, v] > 0), (0, True)), u, v)"],
              summary="the largest entry of each U by V window of every channel"),
    # PyTorch's nn.Linear(in_features, out_features), W stored (in_features, out_features) so y = x @ W + b; the
    # L2 penalty is the derivation l2_penalty's (symgrad derive l2_penalty), its gradient added to dW
    tensor_op("Linear", inputs={"x": "n i"}, params={"W": ("i o", "uniform"), "b": ("o", "uniform")},
              options={"l2": (0.0, ">= 0")}, penalty="l2 * Sum(W[i, o]**2, i, o)",
              names={"I": "in_features", "O": "out_features"}, steps=["y[n, o] = Sum(x[n, i] * W[i, o], i) + b[o]"],
              summary="affine map y = x @ W + b, with an optional L2 penalty on W"),
    # PyTorch's cross_entropy: dense targets (probabilities, any non-negative rows) or integer labels (t one-hot),
    # class weights, an ignored label, label smoothing; its mean over labels divides by the rows' class weights
    row_loss(tensor_loss("SoftmaxCrossEntropy", inputs={"x": "n k"}, targets={"t": "n k"}, weights={"weight": "k"},
                         options={"label_smoothing": (0.0, "[0, 1]")},
                         steps=["s[n] = Sum(exp(x[n, k]), k)", "p[n, k] = exp(x[n, k]) / s[n]",
                                "L[n] = -Sum(((1 - label_smoothing) * t[n, k] + label_smoothing / K) * weight[k]"
                                " * log(p[n, k]), k)"],
                         summary="softmax then cross-entropy, fused, as torch.nn.functional.cross_entropy",
                         domain=(-5.0, 5.0)),
             labels=True, ignore_index=-100, target_range=(0, None)),
    # any real target, as PyTorch's function takes (no range to check: the formula holds for every t). One step, so
    # that backward reads x, as PyTorch's saves its input: from a saved p = sigmoid(x), p - t cancels to 0 at t = 1
    # where the gradient is -exp(-x) (from x = 17 in float32); from x it is (1 - t) sigmoid(x) - t sigmoid(-x)
    element_loss(tensor_loss("BinaryCrossEntropyWithLogits", inputs={"x": "n k"}, targets={"t": "n k"},
                             weights={"weight": "n k", "pos_weight": "k"},
                             steps=["L[n, k] = -weight[n, k] * (pos_weight[k] * t[n, k] * log(sigmoid(x[n, k]))"
                                    " + (1 - t[n, k]) * log(1 - sigmoid(x[n, k])))"],
                             summary="sigmoid then binary cross-entropy, fused, as "
                                     "torch.nn.functional.binary_cross_entropy_with_logits", domain=(-6.0, 6.0))),
    elementwise_loss("MeanSquaredError", "(x - t)**2", summary="squared error, as torch.nn.functional.mse_loss"),
    # Huber: at |x - t| = delta both pieces have the slope delta, so no convention is needed; PyTorch
    # refuses a delta <= 0
    elementwise_loss("Huber", "Piecewise(((x - t)**2/2, Abs(x - t) < delta), (delta*(Abs(x - t) - delta/2), True))",
                     params={"delta": (1.0, "> 0")}, summary="Huber loss, as torch.nn.functional.huber_loss"),
    # PyTorch's nll_loss of log-probabilities at integer labels: class weights, an ignored label, the mean over
    # the kept rows' weights
    row_loss(tensor_loss("NLLLoss", inputs={"x": "n k"}, targets={"c": "n"}, weights={"weight": "k"},
                         steps=["L[n] = -weight[c[n]] * x[n, c[n]]"],
                         summary="negative log-likelihood of log-probabilities at integer labels, as "
                                 "torch.nn.functional.nll_loss"),
             ignore_index=-100),
    row_loss(tensor_loss("MulticlassHinge", inputs={"x": "n k"}, targets={"c": "n"}, options={"margin": 1.0},
                         steps=["L[n] = Sum((1 - KroneckerDelta(k, c[n])) * Max(0, x[n, k] - x[n, c[n]] + margin), k)"],
                         summary="multiclass SVM loss: sum over k != c of max(0, x_k - x_c + margin)")),
    # PyTorch's nn.KLDivLoss(reduction="mean", log_target=False), the nn module's default reduction as every loss
    # here, on x of any shape: x log-probabilities, t probabilities (t log t is xlogy's, 0 where t = 0: the
    # rule x log x) or, with log_target, log-probabilities; batchmean is the sum over the batch size x.shape[0],
    # the KL divergence per row that PyTorch's documentation recommends (mean divides by every entry)
    element_loss(tensor_loss("KLDivLoss", inputs={"x": "n k"}, targets={"t": "n k"}, flags={"log_target": False},
                             means={"batchmean": "N"},
                             steps=["L[n, k] = Piecewise((exp(t[n, k]) * (t[n, k] - x[n, k]), log_target),"
                                    " (t[n, k] * log(t[n, k]) - t[n, k] * x[n, k], True))"],
                             summary="Kullback-Leibler divergence t (log t - x) of target probabilities t from "
                                     "log-probabilities x, each entry (exp(t) (t - x) for log-probabilities t), as "
                                     "torch.nn.functional.kl_div")),
    # The softmax focal loss (Lin et al. 2017) at integer labels: -alpha_c (1 - p_c)^gamma log p_c, p = softmax(x),
    # cross-entropy at gamma = 0; alpha a weight per class, a row's loss scaled by its label's, the mean over
    # rows (torchvision's and kornia's focal losses; not cross_entropy's mean over the weights). Its steps read the
    # log-softmax lp, saved for backward: 1 - p_c is -expm1(lp_c), exact where p_c is near 1
    row_loss(tensor_loss("SoftmaxFocalLoss", inputs={"x": "n k"}, targets={"c": "n"}, weights={"alpha": "k"},
                         options={"gamma": (2.0, ">= 0")},
                         steps=["s[n] = Sum(exp(x[n, k]), k)", "lp[n, k] = log(exp(x[n, k]) / s[n])",
                                "L[n] = -alpha[c[n]] * (1 - exp(lp[n, c[n]]))**gamma * lp[n, c[n]]"],
                         summary="softmax focal loss -alpha_c (1 - p_c)^gamma log p_c at integer labels c, "
                                 "p = softmax(x)", domain=(-5.0, 5.0)),
             weighted_mean=False),
)

CATALOG = build_catalog(*OPS)