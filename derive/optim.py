"""Stochastic gradient descent with momentum, as torch.optim.SGD (no dampening, no Nesterov)."""
import sympy as sp

param, grad, velocity, lr, momentum = sp.symbols("param grad velocity lr momentum")


def sgd_velocity():
    """v' = momentum v + grad (v starts at 0, so the first step is the plain gradient)."""
    return momentum * velocity + grad


def sgd_update():
    """param' = param - lr v'."""
    return param - lr * sp.Symbol("velocity_next")
