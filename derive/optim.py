"""The optimizers' updates: SGD with momentum, as torch.optim.SGD (no dampening, no Nesterov), and Adam and
AdamW, as torch.optim.Adam and AdamW (no amsgrad)."""
import sympy as sp

param, grad, velocity, lr, momentum = sp.symbols("param grad velocity lr momentum")


def sgd_velocity():
    """v' = momentum v + grad (v starts at 0, so the first step is the plain gradient)."""
    return momentum * velocity + grad


def sgd_update():
    """param' = param - lr v'."""
    return param - lr * sp.Symbol("velocity_next")


# Adam (Kingma and Ba 2015) as torch.optim.Adam and AdamW compute it: moments m, v from 0, step t from 1
exp_avg, exp_avg_sq, beta1, beta2, eps, weight_decay, step = sp.symbols(
    "exp_avg exp_avg_sq beta1 beta2 epsilon weight_decay step")
EXP_AVG_NEXT, EXP_AVG_SQ_NEXT = sp.symbols("exp_avg_next exp_avg_sq_next")


def adam_gradient(decoupled):
    """The gradient the moments average: Adam's weight decay is an L2 term, grad + weight_decay param;
    AdamW's (decoupled) decays the parameter itself and leaves the gradient alone."""
    return grad if decoupled else grad + weight_decay * param


def adam_moments(decoupled):
    """(m', v'): the running averages of the gradient and of its square, m' = beta1 m + (1 - beta1) g."""
    g = adam_gradient(decoupled)
    return beta1 * exp_avg + (1 - beta1) * g, beta2 * exp_avg_sq + (1 - beta2) * g ** 2


def adam_update(decoupled):
    """param' = param - lr mhat / (sqrt(vhat) + eps), mhat = m' / (1 - beta1^t), vhat = v' / (1 - beta2^t),
    in torch's order: the step size lr / (1 - beta1^t) and the denominator sqrt(v') / sqrt(1 - beta2^t) + eps;
    AdamW first multiplies param by 1 - lr weight_decay."""
    start = param * (1 - lr * weight_decay) if decoupled else param
    return start - lr / (1 - beta1 ** step) * EXP_AVG_NEXT / (sp.sqrt(EXP_AVG_SQ_NEXT) / sp.sqrt(1 - beta2 ** step) + eps)
