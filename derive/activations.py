"""Activations in index notation: element-wise ones (a diagonal Jacobian, seed 001) and log softmax."""
import sympy as sp

from derive.functions import sigmoid
from derive.softmax import softmax
from derive.symbols import i, slope, x


def logistic(index=i):
    """y_i = 1 / (1 + exp(-x_i))."""
    return sigmoid(x[index])


def tanh(index=i):
    return sp.tanh(x[index])


def relu(index=i):
    """max(0, x_i); its derivative at 0 is 0 (derive.algebra.at_kinks)."""
    return sp.Max(0, x[index])


def leaky_relu(index=i):
    """x_i for x_i > 0, else slope x_i: the derivative at 0 is slope, as in PyTorch."""
    return sp.Piecewise((x[index], x[index] > 0), (slope * x[index], True))


def softplus(index=i):
    """log(1 + exp(x_i)), whose derivative is the sigmoid."""
    return sp.log(1 + sp.exp(x[index]))


def log_softmax(index=i):
    """log p_i with p = softmax(x)."""
    return sp.log(softmax(index))
