"""Reducing per-sample losses L_n to the batch's loss, and each row's weight in the gradient.

Why a batch loss is divided by N (seed 000 asks): the mean's derivative by any one L_r is 1/N,
so every row's gradient (p - y) is scaled by 1/N and the step size does not grow with the batch."""
import sympy as sp

from derive.algebra import contract
from derive.symbols import G, L, n, over_batch, r, total

# total is the sum of every entry's weight in the mean: N, or PyTorch's sum of class weights.
REDUCTIONS = {
    "mean": over_batch(L[n]) / total,
    "sum": over_batch(L[n]),
    "none": L[n],
}


def row_weight(reduced):
    """d(reduced)/dL_r; an unreduced loss is weighted by its upstream gradient G."""
    objective = over_batch(G[n] * reduced) if reduced.has(L[n]) and not reduced.has(sp.Sum) else reduced
    return contract(sp.diff(objective, L[r]))
