"""Activations in index notation that are not element-wise (element-wise ones are declared in
derive/catalog.py through derive.declare)."""
import sympy as sp

from derive.softmax import softmax
from derive.symbols import i


def log_softmax(index=i):
    """log p_i with p = softmax(x)."""
    return sp.log(softmax(index))
