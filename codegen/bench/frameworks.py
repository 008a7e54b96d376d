"""The cases in PyTorch and JAX, the contenders of the optional extra symgrad[bench] (make bench installs it).

Each step returns what numpy_step returns, (y or loss, dx[, dW, db]), so the tests can compare them."""
import importlib.util
from pathlib import Path

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


def blas_threads(threads):
    """NumPy's BLAS (OpenBLAS) on threads threads, through threadpoolctl; torch's own pool is left alone."""
    import numpy as np
    import threadpoolctl
    numpy_folder = str(Path(np.__file__).parent.parent)
    for library in threadpoolctl.ThreadpoolController().select(user_api="blas").lib_controllers:
        if library.filepath.startswith(numpy_folder):
            library.set_num_threads(threads)


def torch_layer_step(case, arrays):
    """Autograd of one layer of codegen/bench/layers.py: forward of case.inputs and case.params, backward of
    the upstream g; returns (y, the inputs' gradients, the params' gradients)."""
    import torch
    import torch.nn.functional as F
    forward = {
        "layer_norm": lambda x, gamma, beta: F.layer_norm(x, x.shape[-1:], gamma, beta, 1e-5),
        "batch_norm2d": lambda x, gamma, beta: F.batch_norm(x, None, None, gamma, beta, training=True, eps=1e-5),
        "attention": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "conv2d": lambda x, weight, bias: F.conv2d(x, weight, bias, padding=1),
    }[case.name]
    leaves = [torch.from_numpy(arrays[name]).requires_grad_() for name in (*case.inputs, *case.params)]
    g = torch.from_numpy(arrays["g"])

    def step():
        for leaf in leaves:
            leaf.grad = None
        y = forward(*leaves)
        y.backward(g)
        return (y.detach(), *(leaf.grad for leaf in leaves))
    return step


class TorchMLP:
    """The training step of codegen/bench/steps.py in PyTorch: nn.Linear, nn.ReLU, nn.Linear, F.cross_entropy
    and torch.optim.SGD, from the same weights (W (in, out) in NumPy is nn.Linear's weight transposed)."""

    def __init__(self, arrays, lr, momentum):
        import torch
        (I, H), C = arrays["W1"].shape, arrays["W2"].shape[1]
        self.model = torch.nn.Sequential(torch.nn.Linear(I, H), torch.nn.ReLU(), torch.nn.Linear(H, C))
        with torch.no_grad():
            for layer, W, b in ((self.model[0], "W1", "b1"), (self.model[2], "W2", "b2")):
                layer.weight.copy_(torch.from_numpy(arrays[W].T))
                layer.bias.copy_(torch.from_numpy(arrays[b]))
        self.x, self.labels = torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["labels"])
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=momentum)

    def step(self):
        import torch.nn.functional as F
        self.optimizer.zero_grad()
        loss = F.cross_entropy(self.model(self.x), self.labels)
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def weights(self):
        """[W1, b1, W2, b2] in NumPy's layout."""
        first, second = self.model[0], self.model[2]
        return [first.weight.detach().numpy().T, first.bias.detach().numpy(),
                second.weight.detach().numpy().T, second.bias.detach().numpy()]
