"""The cases in PyTorch and JAX, the contenders of the optional extra symgrad[bench] (make bench installs it).

Each step returns what numpy_step returns, (y or loss, dx[, dW, db]), so the tests can compare them."""
import importlib.util

FRAMEWORKS = ("torch", "jax")
TORCH_THREADS = (1, 2)


def installed(name):
    return importlib.util.find_spec(name) is not None


def torch_threads(threads):
    import torch
    torch.set_num_threads(threads)


def torch_step(case, inputs):
    """Autograd: forward, then backward() (of the loss, or with g as the upstream gradient)."""
    import torch
    import torch.nn.functional as F
    forward = {
        "softmax_ce": F.cross_entropy,
        "bce_logits": F.binary_cross_entropy_with_logits,
        "softmax": lambda x: torch.softmax(x, -1),
        "sigmoid": torch.sigmoid,
        "tanh": torch.tanh,
        "relu": torch.relu,
        "linear": lambda x, W, b: torch.addmm(b, x, W),
    }[case.name]
    tensors = {name: torch.from_numpy(array) for name, array in inputs.items()}
    leaves = [tensors[name].requires_grad_() for name in ("x", "W", "b") if name in tensors]

    def step():
        for leaf in leaves:
            leaf.grad = None                # a fresh gradient each step, as the NumPy contenders allocate one
        if case.kind == "loss":
            out = forward(tensors["x"], tensors["target"])
            out.backward()
        else:
            out = forward(*leaves)
            out.backward(tensors["g"])
        return (out.detach(), *(leaf.grad for leaf in leaves))
    return step


def jax_step(case, inputs):
    """jit(value_and_grad) of a loss; jit of forward and vjp of a layer."""
    import jax
    import jax.numpy as jnp
    jax.config.update("jax_enable_x64", True)   # or float64 inputs would silently become float32
    forward = {
        "softmax_ce": lambda x, c: jnp.mean(jax.nn.logsumexp(x, axis=1)
                                            - jnp.take_along_axis(x, c[:, None], axis=1)[:, 0]),
        "bce_logits": lambda x, t: jnp.mean(jnp.maximum(x, 0) - x * t + jnp.log1p(jnp.exp(-jnp.abs(x)))),
        "softmax": jax.nn.softmax,
        "sigmoid": jax.nn.sigmoid,
        "tanh": jnp.tanh,
        "relu": jax.nn.relu,
        "linear": lambda x, W, b: x @ W + b,
    }[case.name]
    arrays = {name: jnp.asarray(array) for name, array in inputs.items()}
    if case.kind == "loss":
        run = jax.jit(jax.value_and_grad(forward))
        args = (arrays["x"], arrays["target"])
    else:
        def forward_backward(*args):
            *leaves, g = args
            y, vjp = jax.vjp(forward, *leaves)
            return (y, *vjp(g))
        run = jax.jit(forward_backward)
        args = tuple(arrays[name] for name in ("x", "W", "b") if name in arrays) + (arrays["g"],)
    return lambda: jax.block_until_ready(tuple(run(*args)))
