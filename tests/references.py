"""Plain NumPy definitions of every catalog operation, written from the formulas (PyTorch's, for the
losses), in float64. The generated kernels are compared with these; none of this is generated."""
import math

import numpy as np

from codegen.tensor_lower import Maximum
from derive.tensor import compiled, evaluated, size_of

erf = np.vectorize(math.erf)
SELU_ALPHA, SELU_SCALE = 1.6732632423543772848170429916717, 1.0507009873554804934193349852946


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def log_softmax(x):
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def log_sigmoid(x):
    return -np.logaddexp(0, -x)


def reduce(losses, reduction, total=None):
    return {"mean": losses.sum() / (losses.size if total is None else total), "sum": losses.sum(),
            "none": losses}[reduction]


def cross_entropy(x, target, reduction, weight=None, ignore_index=-100, label_smoothing=0.0):
    """torch.nn.functional.cross_entropy: weighted mean over kept rows, label smoothing's eps/K term."""
    n, k = x.shape
    log_p = log_softmax(x)
    weight = np.ones(k) if weight is None else weight
    if target.dtype.kind == "f":
        smoothed = target * (1 - label_smoothing) + label_smoothing / k
        return reduce(-(log_p * smoothed * weight).sum(axis=1), reduction, n)
    kept = target != ignore_index
    safe = np.where(kept, target, 0)
    nll = -weight[safe] * log_p[np.arange(n), safe] * kept
    smooth = -(log_p * weight).sum(axis=1) * kept
    losses = (1 - label_smoothing) * nll + label_smoothing / k * smooth
    return reduce(losses, reduction, (weight[safe] * kept).sum())


def binary_cross_entropy_with_logits(x, target, reduction, weight=None, pos_weight=None):
    weight = 1.0 if weight is None else weight
    pos_weight = 1.0 if pos_weight is None else pos_weight
    losses = -weight * (pos_weight * target * log_sigmoid(x) + (1 - target) * log_sigmoid(-x))
    return reduce(losses, reduction)


def nll_loss(x, target, reduction, weight=None, ignore_index=-100):
    """torch.nn.functional.nll_loss: -weight[c] x[c] over kept rows, the mean divided by their weights."""
    n, k = x.shape
    weight = np.ones(k) if weight is None else weight
    kept = target != ignore_index
    safe = np.where(kept, target, 0)
    return reduce(-weight[safe] * x[np.arange(n), safe] * kept, reduction, (weight[safe] * kept).sum())


def mean_squared_error(x, target, reduction):
    return reduce((x - target) ** 2, reduction)


def huber(x, target, reduction, delta=1.0):
    """torch.nn.functional.huber_loss: quadratic below delta, linear above."""
    z = np.abs(x - target)
    return reduce(np.where(z < delta, z ** 2 / 2, delta * (z - delta / 2)), reduction)


def multiclass_hinge(x, target, reduction, margin=1.0):
    """Seed 002's SVM loss: sum over j != y of max(0, x_j - x_y + margin)."""
    rows = np.arange(len(target))
    margins = np.maximum(0, x - x[rows, target][:, None] + margin)
    margins[rows, target] = 0
    return reduce(margins.sum(axis=1), reduction, len(target))


def kl_div(x, target, reduction, log_target=False):
    """torch.nn.functional.kl_div: xlogy(t, t) - t x (0 where t = 0), or exp(t) (t - x) for log-probabilities t;
    batchmean the sum over the batch size x.shape[0]."""
    if log_target:
        losses = np.exp(target) * (target - x)
    else:
        kept = np.where(target == 0, 1.0, target)
        losses = np.where(target == 0, 0.0, target * np.log(kept)) - target * x
    return losses.sum() / x.shape[0] if reduction == "batchmean" else reduce(losses, reduction)


def softmax_focal_loss(x, target, reduction, alpha=None, gamma=2.0):
    """Lin et al.'s focal loss of a softmax: -alpha[c] (1 - p_c)^gamma log p_c, the mean over rows (alpha does
    not divide it); 1 - p_c as the other classes' probabilities, exact where p_c is near 1."""
    n, k = x.shape
    rows = np.arange(n)
    log_p, p = log_softmax(x), softmax(x)
    alpha = np.ones(k) if alpha is None else alpha
    p[rows, target] = 0
    others = p.sum(axis=1)
    return reduce(-alpha[target] * others ** gamma * log_p[rows, target], reduction, n)


LAYERS = {
    "Sigmoid": lambda x: np.exp(log_sigmoid(x)),
    "Tanh": np.tanh,
    "ReLU": lambda x: np.maximum(x, 0),
    "LeakyReLU": lambda x, negative_slope=0.01: np.where(x > 0, x, negative_slope * x),
    "Softplus": lambda x: np.logaddexp(0, x),
    "SiLU": lambda x: x * np.exp(log_sigmoid(x)),
    "GELU": lambda x: x * (1 + erf(x / math.sqrt(2))) / 2,
    "GELUTanh": lambda x: x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3))) / 2,
    "ELU": lambda x, alpha=1.0: np.where(x > 0, x, alpha * np.expm1(np.minimum(x, 0))),
    "SELU": lambda x: SELU_SCALE * np.where(x > 0, x, SELU_ALPHA * np.expm1(np.minimum(x, 0))),
    "Mish": lambda x: x * np.tanh(np.logaddexp(0, x)),
    "Softsign": lambda x: x / (1 + np.abs(x)),
    "HardTanh": lambda x, min_val=-1.0, max_val=1.0: np.clip(x, min_val, max_val),
    "Softmax": softmax,
    "LogSoftmax": log_softmax,
}
LOSSES = {
    "SoftmaxCrossEntropy": cross_entropy,
    "BinaryCrossEntropyWithLogits": binary_cross_entropy_with_logits,
    "MeanSquaredError": mean_squared_error,
    "Huber": huber,
    "MulticlassHinge": multiclass_hinge,
    "NLLLoss": nll_loss,
    "KLDivLoss": kl_div,
    "SoftmaxFocalLoss": softmax_focal_loss,
}


def evaluated_shifted(program, arrays, scope):
    """derive.tensor.evaluated, with a Maximum step computed by its own loops (as the Sum's are)."""
    for a in program:
        if isinstance(a.expr, Maximum):
            value, shape = compiled(a.expr.function), tuple(scope[size_of(i)] for i in a.indices)
            (v, lo, hi), = a.expr.limits
            result = np.empty(shape)
            for at in np.ndindex(shape):
                inner = {**scope, **dict(zip(a.indices, at))}
                result[at] = max(value(arrays, {**inner, v: k}) for k in range(int(lo.subs(scope)),
                                                                              int(hi.subs(scope)) + 1))
            arrays = {**arrays, a.name: result}
        else:
            arrays = evaluated([a], arrays, scope)
    return arrays
