"""Losses in index notation, with PyTorch's options (seeds 000, 002, 004).

Per-row losses are scalars of one row; per-element losses are written at element i."""
import sympy as sp

from derive.functions import sigmoid
from derive.softmax import softmax
from derive.symbols import K, c, eps, k, margin, mask, over_classes, pw, t, w, x, i


def smoothed(target):
    """Label smoothing as torch.nn.functional.cross_entropy defines it: (1 - eps) t_k + eps/K."""
    return (1 - eps) * target + eps / K


def cross_entropy_options():
    """-mask sum_k s_k w_k log p_k: smoothed target s, class weights w, mask 0 for an ignored row."""
    return -mask * over_classes(smoothed(t[k]) * w[k] * sp.log(softmax(k)), k)


def cross_entropy_mean_weight():
    """Each row's weight in PyTorch's mean with integer labels: w_c, or 0 for an ignored row."""
    return w[c] * mask


def binary_cross_entropy(index=i):
    """-w_i (pw_i t_i log sigmoid(x_i) + (1 - t_i) log(1 - sigmoid(x_i))), seed 004's loss for a sigmoid."""
    a = sigmoid(x[index])
    return -w[index] * (pw[index] * t[index] * sp.log(a) + (1 - t[index]) * sp.log(1 - a))


def squared_error(index=i):
    """(x_i - t_i)^2."""
    return (x[index] - t[index]) ** 2


def multiclass_hinge():
    """Seed 002's SVM loss: sum over classes k != c of max(0, x_k - x_c + margin)."""
    return over_classes((1 - sp.KroneckerDelta(k, c)) * sp.Max(0, x[k] - x[c] + margin), k)
