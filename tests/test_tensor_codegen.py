"""Index-notation operations generated, verified and written by codegen, then compared with PyTorch autograd:
every forward and every input's and param's gradient in float64 to 1e-10, float32 kept, extreme inputs
finite and accurate, a planted lowering bug caught by verification, the max shift shown to keep values."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import sympy as sp
import torch
import torch.nn.functional as F

import generated
from codegen.pipeline import codegen
from codegen.render import render_package
from codegen.tensor_lower import (Aligned, ArrayLowering, LoweringError, Maximum, Scale, check_sizes, lowered, max_shifted,
                                  mean_corrected, names_of, program_of)
from codegen.tensor_verify import sample
from derive.special import ExpToInf
from derive.stability import INDEX_REWRITES
from codegen.write import import_package
from derive.ops import build_catalog
from derive.catalog import CATALOG
from derive.tensor import Sum, TensorOp, evaluated, size_of
from tests.references import evaluated_shifted

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "tensor_ops.py"
spec = importlib.util.spec_from_file_location("tensor_ops_examples", EXAMPLES)
examples = importlib.util.module_from_spec(spec)
spec.loader.exec_module(examples)
# the examples and the catalog's index-notation layers (those of no row or element form) but Dropout, whose random
# mask PyTorch cannot draw alike (tests/test_torch_parity.py checks its law), and those with flags, whose kernels
# are the examples' of each setting (ScaledDotProductAttention's: Attention and CausalAttention; test_torch_parity
# compares its class with PyTorch)
OPS = {**{op.name: op for op in examples.OPS},
       **{name: op for name, op in CATALOG.items() if isinstance(op, TensorOp) and not op.noise and not op.flags}}


def focal(x, c, gamma):
    lp = F.log_softmax(x, 1).gather(1, c[:, None])[:, 0]
    return -(1 - lp.exp()) ** gamma * lp


def kl_div(x, t, reduction):
    log_p = F.log_softmax(x, 1)
    return (F.kl_div(log_p, t, reduction="none").sum(1) if reduction == "none"
            else F.kl_div(log_p, t, reduction={"mean": "batchmean", "sum": "sum"}[reduction]))


def pool_window(name):
    """A pooling's kernel_size where instance_of makes it, at the check sizes (its stride None the same)."""
    return tuple(check_sizes(CATALOG[name])[size_of(sp.Symbol(i, integer=True))] for i in "uv")


def reduced(L, reduction):
    return {"mean": L.mean(), "sum": L.sum(), "none": L}[reduction]


# PyTorch's output of each op: f(arrays, params, options, reduction) from tensors by the declared names;
# KLDiv's mean is kl_div's batchmean (the mean of each row's divergence), as the per-row loss is reduced
TORCH = {
    "TemperedSoftmax": lambda a, p, o, r: torch.softmax(a["x"] / o["T"], dim=1),
    "LayerNorm": lambda a, p, o, r: F.layer_norm(a["x"], a["x"].shape[1:], p["gamma"], p["beta"], o["eps"]),
    "RMSNorm": lambda a, p, o, r: F.rms_norm(a["x"], a["x"].shape[1:], p["gamma"], o["eps"]),
    # training mode: the batch's statistics (tests/test_torch_parity.py checks the running ones and eval mode)
    "BatchNorm1d": lambda a, p, o, r: F.batch_norm(a["x"], None, None, p["gamma"], p["beta"], training=True,
                                                   eps=o["eps"]),
    "BatchNorm2d": lambda a, p, o, r: F.batch_norm(a["x"], None, None, p["gamma"], p["beta"], training=True,
                                                   eps=o["eps"]),
    "Attention": lambda a, p, o, r: F.scaled_dot_product_attention(a["Q"], a["K"], a["V"]),
    "CausalAttention": lambda a, p, o, r: F.scaled_dot_product_attention(a["Q"], a["K"], a["V"], is_causal=True),
    "ValidConv1d": lambda a, p, o, r: F.conv1d(a["x"], p["w"], p["b"]),
    "Conv1d": lambda a, p, o, r: F.conv1d(a["x"], p["weight"], p["b"]),
    # the class made at the check sizes (instance_of): its kernel_size, stride None the kernel's, as F.avg_pool2d's
    "AvgPool2d": lambda a, p, o, r: F.avg_pool2d(a["x"], pool_window("AvgPool2d")),
    "MaxPool2d": lambda a, p, o, r: F.max_pool2d(a["x"], pool_window("MaxPool2d")),
    "Conv2d": lambda a, p, o, r: F.conv2d(a["x"], p["weight"], p["b"]),
    "GLU": lambda a, p, o, r: F.glu(a["x"], dim=1),
    "Linear": lambda a, p, o, r: F.linear(a["x"], p["W"].T, p["b"]),
    "Embedding": lambda a, p, o, r: F.embedding(a["x"], p["weight"]),
    "KLDiv": lambda a, p, o, r: kl_div(a["x"], a["t"], r),
    "NLL": lambda a, p, o, r: F.nll_loss(a["x"], a["c"], reduction=r),
    "FocalLoss": lambda a, p, o, r: reduced(focal(a["x"], a["c"], o["gamma"]), r),
}
SETTINGS = [(name, r) for name, op in OPS.items() for r in ((None,) if op.kind == "layer" else ("mean", "sum", "none"))]


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    out = tmp_path_factory.mktemp("generated") / "tensor_ops"
    reports, changed, _ = codegen(build_catalog(*OPS.values()), out, cache=None, backend="numpy")
    assert changed is not None and all(r.ok for r in reports), "\n".join(str(r) for r in reports)
    return import_package(out)


def close(ours, theirs, what, tol=1e-10):
    theirs = theirs.detach().numpy() if isinstance(theirs, torch.Tensor) else np.asarray(theirs)
    assert np.shape(ours) == np.shape(theirs), f"{what}: shape {np.shape(ours)} vs PyTorch's {np.shape(theirs)}"
    assert np.all(np.isfinite(ours)), f"{what}: not finite\n{ours}"
    gap = np.max(np.abs(ours - theirs), initial=0) / max(1.0, np.max(np.abs(theirs), initial=0))
    assert gap < tol, f"{what}: relative gap {gap:.2e}\nours:\n{ours}\nPyTorch:\n{theirs}"


def instance_of(package, op, arrays, params, reduction=None, dtype=np.float64, options=None):
    """op's generated class made for arrays' sizes, with params set to the given values."""
    constructor = op.size_arguments({size: arrays_size(arrays, op, sp.Symbol(str(size).lower(), integer=True))
                                     for size in op.constructor_sizes})
    extra = {"dtype": dtype} if op.params else {}
    instance = getattr(package, op.name)(**constructor, **(options or {}), **extra,
                                         **({"reduction": reduction} if reduction else {}))
    for p, value in params.items():
        setattr(instance, p, value.astype(dtype))
    return instance


def run(package, op, arrays, params, reduction, rng, dtype=np.float64, options=None):
    """(output, gradients by name) of op's generated class, and the upstream gradient used."""
    instance = instance_of(package, op, arrays, params, reduction, dtype, options)
    out = instance.forward(*(arrays[a] for a in [*op.inputs, *op.targets]))
    upstream = rng.standard_normal(np.shape(out)).astype(dtype) if reduction in (None, "none") else None
    grads = instance.backward(upstream) if upstream is not None else instance.backward()
    grads = dict(zip(op.inputs, grads if isinstance(grads, tuple) else (grads,)))
    grads.update({p: getattr(instance, f"d{p}") for p in op.params})
    return out, grads, upstream


def arrays_size(arrays, op, index):
    """The size of index's axis in the first array that has it (a param's size, from the inputs' shapes)."""
    for a, axes in [*op.inputs.items(), *op.targets.items()]:
        if index in axes:
            return arrays[a].shape[axes.index(index)]
    return check_sizes(op)[size_of(index)]


def torch_run(op, arrays, params, reduction, upstream, options=None):
    """(output, gradients by name) of PyTorch's form of op, by autograd."""
    tensors = {a: torch.tensor(v, requires_grad=a in op.inputs) for a, v in arrays.items()}
    weights = {p: torch.tensor(v, requires_grad=True) for p, v in params.items()}
    out = TORCH[op.name](tensors, weights, {**op.options, **(options or {})}, reduction)
    (out * torch.tensor(upstream) if upstream is not None else out).sum().backward()
    return out, {**{a: tensors[a].grad for a in op.inputs}, **{p: weights[p].grad for p in params}}


@pytest.mark.parametrize("name, reduction", SETTINGS, ids=[f"{n}-{r}" if r else n for n, r in SETTINGS])
def test_forward_and_every_gradient_match_pytorch_in_float64(package, name, reduction):
    op = OPS[name]
    rng = np.random.default_rng(1)
    _, arrays, params = sample(op, rng)
    for options in ({}, {o: 0.5 * v for o, v in op.options.items()}):
        out, grads, upstream = run(package, op, arrays, params, reduction, rng, options=options)
        theirs, their_grads = torch_run(op, arrays, params, reduction, upstream, options)
        close(out, theirs, f"{name} forward {options}")
        for a, grad in grads.items():
            close(grad, their_grads[a], f"{name} d{a} {options}")


@pytest.mark.parametrize("name", OPS)
def test_float32_stays_float32(package, name):
    op = OPS[name]
    rng = np.random.default_rng(2)
    _, arrays, params = sample(op, rng)
    arrays = {a: v.astype(np.float32) if v.dtype.kind == "f" else v for a, v in arrays.items()}
    out, grads, _ = run(package, op, arrays, params, "none" if op.kind == "loss" else None, rng, np.float32)
    assert out.dtype == np.float32 and all(g.dtype == np.float32 for g in grads.values()), (
        out.dtype, {a: g.dtype for a, g in grads.items()})
    theirs, their_grads = torch_run(op, {a: v.astype(np.float64) if v.dtype.kind == "f" else v
                                         for a, v in arrays.items()},
                                    {p: v.astype(np.float32).astype(np.float64) for p, v in params.items()},
                                    "none" if op.kind == "loss" else None, np.ones(np.shape(out)))
    close(out, theirs, f"{name} float32 forward", tol=1e-5)


# logits far apart: the max shift keeps every exponential finite; attention's scores Q K^T / sqrt(D) too
EXTREME = ["TemperedSoftmax", "KLDiv", "NLL", "FocalLoss", "GLU", "Attention", "CausalAttention"]


@pytest.mark.parametrize("name", EXTREME)
def test_logits_of_1e4_give_finite_accurate_results(package, name):
    op = OPS[name]
    rng = np.random.default_rng(3)
    _, arrays, params = sample(op, rng)
    first = next(iter(op.inputs))
    arrays[first] = rng.choice([-1e4, 1e4], arrays[first].shape) * (rng.uniform(0.5, 1, arrays[first].shape))
    reduction = "sum" if op.kind == "loss" else None
    out, grads, upstream = run(package, op, arrays, params, reduction, rng)
    theirs, their_grads = torch_run(op, arrays, params, reduction, upstream)
    close(out, theirs, f"{name} forward at 1e4")
    for a, grad in grads.items():
        close(grad, their_grads[a], f"{name} d{a} at 1e4")


def test_layer_norm_of_rows_with_mean_1e3_in_float32(package):
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((16, 64)) + 1e3).astype(np.float32)
    g = rng.standard_normal((16, 64)).astype(np.float32)
    layer = package.LayerNorm(64, dtype=np.float32)
    y, dx = layer.forward(x), None
    dx = layer.backward(g)
    xt = torch.tensor(x, requires_grad=True)
    yt = F.layer_norm(xt, (64,), eps=1e-5)
    (yt * torch.tensor(g)).sum().backward()
    assert y.dtype == dx.dtype == np.float32
    # both are float32: PyTorch's own error against float64 is 7e-5 here, a one-pass variance's is 1e0
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-4, atol=1e-4)


def test_the_lowering_computes_what_the_derivation_says(package):
    """Every op's generated forward and backward against derive.tensor's loop evaluator of its derivation (no
    rewrite, no NumPy), at the check sizes."""
    from derive.tensor import derivation
    rng = np.random.default_rng(5)
    for op in OPS.values():
        constructor, arrays, params = sample(op, rng)
        scope = {**check_sizes(op), **{sp.Symbol(o, real=True): v for o, v in op.options.items()}}
        found = derivation(op)
        reduction = "none" if op.kind == "loss" else None
        # a window's class at stride 1 and no padding computes its steps as declared (test_torch_parity: the rest)
        out, grads, upstream = run(package, op, arrays, params, reduction, rng,
                                   options={"stride": 1} if op.window else None)
        values = evaluated(op.steps, {**arrays, **params, "g": upstream}, scope)
        np.testing.assert_allclose(out, values[op.steps[-1].name], rtol=1e-12, atol=1e-12, err_msg=op.name)
        # the causal mask's derivative as derived adds the masked entries' terms and takes them away again
        # (the kernels never form them): that reference cancels, to 1e-9 here
        rtol = 1e-8 if op.name == "CausalAttention" else 1e-11
        for name, program in found.gradients.items():
            expected = evaluated(program, values, scope)[program[-1].name]
            np.testing.assert_allclose(grads[name], expected, rtol=rtol, atol=rtol, err_msg=f"{op.name} d{name}")


@pytest.mark.parametrize("name", ["TemperedSoftmax", "Attention", "CausalAttention", "KLDiv", "FocalLoss"])
def test_the_max_shift_keeps_every_value(name):
    """max_shifted's program gives s exp(-m) for each shifted sum s, g_s exp(m) for its adjoint, and every
    other array as it was; no Scale is left to print."""
    op = OPS[name]
    rng = np.random.default_rng(6)
    _, arrays, params = sample(op, rng)
    scope = {**check_sizes(op), **{sp.Symbol(o, real=True): v for o, v in op.options.items()}}
    arrays = {**arrays, **params, "g": rng.standard_normal(tuple(scope[size_of(i)] for i in op.steps[-1].indices))}
    plain = program_of(op)
    shifted = max_shifted(plain, set(names_of(op)))
    added = [a.name for a in shifted.forward if isinstance(a.expr, Maximum)]
    assert added and not any(a.expr.has(Scale) for a in shifted.forward + shifted.backward)
    before = evaluated(plain.backward, evaluated(plain.forward, arrays, scope), scope)
    after = evaluated_shifted(shifted.backward, evaluated_shifted(shifted.forward, arrays, scope), scope)
    for maximum in added:
        step = maximum[: -len("_max")]
        shape = (slice(None),) * after[maximum].ndim
        np.testing.assert_allclose(after[step] * np.exp(after[maximum])[shape], before[step], rtol=1e-12)
        if f"g_{step}" in before:
            np.testing.assert_allclose(after[f"g_{step}"] * np.exp(-after[maximum]), before[f"g_{step}"], rtol=1e-12,
                                       atol=1e-14)
    unchanged = [a.name for a in plain.forward + plain.backward if not any(a.name in (m[:-4], f"g_{m[:-4]}")
                                                                             for m in added)]
    for a in unchanged:  # an entry that is 0 comes from cancelling terms of the array's size (a masked one)
        atol = 1e-14 * max(1.0, float(np.abs(before[a]).max()))
        np.testing.assert_allclose(after[a], before[a], rtol=1e-12, atol=atol if op.name != "CausalAttention" else 1e3 * atol,
                                   err_msg=a)


def test_a_planted_lowering_bug_is_caught_and_nothing_written(tmp_path, monkeypatch):
    """The transposed convolution reading its kernel unflipped (w[l + m] for w[l - m]): verification fails
    on ValidConv1d's dx, and codegen writes nothing."""
    native = ArrayLowering.native

    def unflipped(self, *args):
        expr, axes = native(self, *args)
        if isinstance(expr, Aligned) and expr.args[1].name.endswith("::-1"):
            expr = expr.args[0]
        return expr, axes
    monkeypatch.setattr(ArrayLowering, "native", unflipped)
    out = tmp_path / "pkg"
    reports, changed, _ = codegen(build_catalog(OPS["ValidConv1d"]), out, cache=None, backend="numpy")
    (report,) = reports
    assert changed is None and not out.exists()
    assert not report.ok and any(failure.startswith("dx") for failure in report.failures), report.failures
    assert all(not failure.startswith(("dw", "db")) for failure in report.failures), "only dx reads the flip"


def test_the_fused_backend_says_why_it_skips_a_tensor_op(tmp_path):
    reports, changed, _ = codegen(build_catalog(OPS["GLU"]), tmp_path / "pkg", cache=None, backend="fast")
    skipped = [r for r in reports if r.name == "GLU (fast)"]
    assert changed is not None and skipped and skipped[0].failures[0].startswith("skipped: no fused numba form (")
    assert not (tmp_path / "pkg" / "fast" / "glu.py").exists()


def test_inputs_are_checked_in_one_clear_line(package):
    layer = package.LayerNorm(4)
    with pytest.raises(ValueError, match=r"LayerNorm: x must have at least 1 axis, got shape \(\)"):
        layer.forward(np.ones(()))
    with pytest.raises(ValueError, match=r"BatchNorm2d: x must have 4 axes, got shape \(2, 3, 3\)"):
        package.BatchNorm2d(3).forward(np.ones((2, 3, 3)))  # its statistics sum over n: no leading axes
    with pytest.raises(ValueError, match=r"BatchNorm1d: x must have 2 or 3 axes, got shape \(2, 3, 3, 1\)"):
        package.BatchNorm1d(3).forward(np.ones((2, 3, 3, 1)))
    with pytest.raises(ValueError, match=r"Attention: K has leading axes \(3, 2\) and Q has \(2, 3\): they must"):
        package.Attention().forward(np.ones((2, 3, 4, 5)), np.ones((3, 2, 4, 5)), np.ones((3, 2, 4, 5)))
    with pytest.raises(ValueError, match=r"LayerNorm: gamma has shape \(4,\) and x has \(2, 3\): their axes k"):
        layer.forward(np.ones((2, 3)))
    with pytest.raises(TypeError, match="LayerNorm: gamma has dtype float64 but x has float32"):
        package.LayerNorm(3).forward(np.ones((2, 3), np.float32))
    attention = package.Attention()
    with pytest.raises(ValueError, match=r"Attention: K has shape \(2, 3, 4\) and Q has \(2, 3, 5\): their axes d"):
        attention.forward(np.ones((2, 3, 5)), np.ones((2, 3, 4)), np.ones((2, 3, 4)))
    with pytest.raises(ValueError, match="GLU: size H = K/2 is 1.5 at these sizes"):
        package.GLU().forward(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"ValidConv1d: size M = L - J \+ 1 is -1"):
        package.ValidConv1d(O=2, C=1, J=5).forward(np.ones((1, 1, 3)))
    nll = package.NLL()
    with pytest.raises(TypeError, match="NLL: c must hold integer class labels, got dtype float64"):
        nll.forward(np.ones((2, 3)), np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"NLL: c\[1\] = 3 is not a class index in \[0, 3\)"):
        nll.forward(np.ones((2, 3)), np.array([0, 3]))
    with pytest.raises(RuntimeError, match="called before forward"):
        package.NLL().backward()
    with pytest.raises(ValueError, match='takes G exactly when reduction="none"'):
        nll.forward(np.ones((2, 3)), np.array([0, 1]))
        nll.backward(np.ones(2))


@pytest.mark.parametrize("name", [name for name, op in OPS.items() if op.batch_index is not None])
def test_a_layer_of_rows_takes_any_leading_axes_as_pytorch(package, name):
    """x of shape (*, ...): (2, 3, ...) gives each of the 6 slices' values and gradients, () one slice's."""
    op, rng = OPS[name], np.random.default_rng(5)
    _, arrays, params = sample(op, rng)
    arrays = {a: v[:1] for a, v in arrays.items()}  # one slice of the batch axis, then (2, 3) of them
    stacked = {a: rng.uniform(*op.domain, (2, 3) + v.shape[1:]) if a in op.inputs else
               rng.integers(0, check_sizes(op)[op.labels[a]], (2, 3) + v.shape[1:]) for a, v in arrays.items()}
    layer = instance_of(package, op, arrays, params)
    y = layer.forward(*stacked.values())
    g = rng.standard_normal(y.shape)
    grads = layer.backward(g)
    grads = grads if isinstance(grads, tuple) else () if grads is None else (grads,)
    param_grads = {p: getattr(layer, f"d{p}") for p in layer.params}
    assert y.shape[:2] == (2, 3) and all(d.shape == stacked[a].shape for d, a in zip(grads, stacked))
    expected_param_grads = {p: 0 for p in param_grads}
    for at in np.ndindex(2, 3):
        one = layer.forward(*(v[at] for v in stacked.values()))
        # to a few units in the last place of the largest entry: one matrix product over the whole batch (a
        # convolution's) may add a slice's terms in another order than a product over the slice alone
        np.testing.assert_allclose(y[at], one, rtol=1e-13, atol=1e-14 * (1 + np.abs(one).max()))
        dx = layer.backward(g[at])
        for d, got in zip(dx if isinstance(dx, tuple) else (dx,), grads):  # none for integer x
            np.testing.assert_allclose(got[at], d, rtol=1e-13, atol=1e-14 * (1 + np.abs(d).max()))
        expected_param_grads = {p: total + getattr(layer, f"d{p}") for p, total in expected_param_grads.items()}
    for p, total in expected_param_grads.items():
        np.testing.assert_allclose(param_grads[p], total, rtol=1e-12, atol=1e-13)


def test_attention_of_heads_is_pytorchs_four_dimensional_sdpa(package):
    rng = np.random.default_rng(6)
    q, k, v = (rng.standard_normal((2, 4, 5, 8)) for _ in range(3))
    for name, causal in (("Attention", False), ("CausalAttention", True)):
        layer = getattr(package, name)()
        y = layer.forward(q, k, v)
        g = rng.standard_normal(y.shape)
        grads = layer.backward(g)
        tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
        ty = F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
        ty.backward(torch.tensor(g))
        close(y, ty, f"{name} (2, 4, 5, 8)")
        for ours, theirs in zip(grads, (tq, tk, tv)):
            close(ours, theirs.grad, f"{name} gradient")


def test_a_network_of_tensor_layers_trains(package):
    rng = np.random.default_rng(7)
    net = package.Sequential([package.LayerNorm(6), package.GLU(), package.RMSNorm(3)])
    x, target = rng.standard_normal((5, 6)), rng.standard_normal((5, 3))
    opt = package.SGD(net.parameters(), lr=0.1)
    losses = []
    for _ in range(20):
        y = net.forward(x)
        losses.append(float(np.sum((y - target) ** 2)))
        net.backward(2 * (y - target))
        opt.step()
    assert [name for _, name in net.parameters()] == ["gamma", "beta", "gamma"]
    assert losses[-1] < 0.8 * losses[0]


def test_rendering_is_deterministic_and_every_file_says_what_it_is():
    # the examples and LayerNorm: the catalog's whole package is rendered and compared by tests/test_codegen.py
    catalog = build_catalog(*examples.OPS, CATALOG["LayerNorm"])
    first, second = render_package(catalog, fused=False), render_package(catalog, fused=False)
    assert first == second
    assert first["layer_norm.py"].startswith("# Code generated by symgrad from derive/catalog.py (LayerNorm). DO NOT "
                                             "EDIT.\n# Template templates/tensor.py.jinja; inputs sha256 ")


def test_the_array_program_reads_as_the_rules_say():
    """Stage 4 alone, printed: a window for m + j copied to a matrix for one product (im2col), padding and a
    window for l - j (a window of the kernel's J over g) with the kernel flipped, not the window, take_along_axis
    at a label, put_along_axis for its delta, slices for GLU's halves."""
    conv_forward, conv_backward = lowered(next(op for op in examples.OPS if op.name == "ValidConv1d"))
    assert "x_windows = sliding_window_view(x, J, axis=2).transpose(1, 3, 0, 2).reshape(C*J, N*M)" in str(conv_forward)
    assert "(w.reshape(O, C*J) @ x_windows).reshape(O, N, M).transpose(1, 0, 2)" in str(conv_forward)
    assert ("(w[:, :, ::-1].transpose(1, 0, 2).reshape(C, O*J) @ sliding_window_view(np.pad(g, ((0, 0), (0, 0), "
            "(J - 1, L - M))), J, axis=2).transpose(1, 3, 0, 2).reshape(O*J, N*L))") in str(conv_backward)
    assert ("dw = (x_windows @ g.transpose(0, 2, 1).reshape(N*M, O)).reshape(C, J, O).transpose(2, 0, 1)"
            in str(conv_backward))  # forward's copy, read as saved
    nll_forward, nll_backward = lowered(OPS["NLL"])
    assert "L = -np.take_along_axis(x, c[:, None], axis=1)[:, 0]" in str(nll_forward)
    assert "np.put_along_axis(dx, c[:, None], -g[:, None], axis=1)" in str(nll_backward)
    glu_forward, glu_backward = lowered(OPS["GLU"])
    assert "x[:, :H]" in str(glu_forward) and "x[:, H:]" in str(glu_forward)
    assert "dx[:, :H] +=" in str(glu_backward) and "dx[:, H:] +=" in str(glu_backward)
    softmax_forward, _ = lowered(OPS["TemperedSoftmax"])
    assert "s_max = np.maximum.reduce(" in str(softmax_forward)


def test_a_step_of_indices_becomes_a_mask_equal_to_it_at_every_index():
    from derive.stability import index_steps_as_masks
    s, t, a = sp.Symbol("s", integer=True), sp.Symbol("t", integer=True), sp.IndexedBase("a", real=True)
    step = sp.Heaviside(s - t, 0)
    entry = sp.exp(a[s]) * (2 - 3 * step) + step * a[t]
    total = sp.Sum(sp.exp(a[s]) * step, (s, 0, 3)) / a[t] - sp.Sum(sp.exp(a[s]), (s, 0, 3)) / a[t]
    values = {a[v]: sp.Rational(v + 2, 3) for v in range(4)}
    for expr in (entry, total):
        masked = index_steps_as_masks(expr)
        assert not masked.has(sp.Heaviside) and masked.has(sp.Piecewise)
        for at in [(u, v) for u in range(4) for v in range(4)]:
            point = {s: at[0], t: at[1]}
            before, after = (e.subs(point).doit().xreplace(values) for e in (expr, masked))  # subs: s bound in a Sum
            assert sp.simplify(before - after) == 0, (expr, at)


@pytest.mark.parametrize("rule, rewrite", [(name, rewrite) for name, rewrite, _ in INDEX_REWRITES],
                         ids=[name for name, _, _ in INDEX_REWRITES])
def test_each_index_rewrite_keeps_every_value_of_every_example(rule, rewrite):
    """Each rule of derive.stability.INDEX_REWRITES alone, on every forward step and adjoint of every example
    (max-shifted as the lowering rewrites them), evaluated at the check sizes by derive.tensor's loops."""
    rng, changed = np.random.default_rng(8), []
    for op in OPS.values():
        _, arrays, params = sample(op, rng)
        scope = {**check_sizes(op), **{sp.Symbol(o, real=True): v for o, v in op.options.items()}}
        arrays = {**arrays, **params, "g": rng.standard_normal(tuple(scope[size_of(i)] for i in op.steps[-1].indices))}
        plain = max_shifted(program_of(op), set(names_of(op)))
        def ruled_form(a):  # ExpToInf is exp, printed to overflow quietly: the loops evaluate it as exp
            return a._replace(expr=rewrite(a.expr).replace(lambda e: isinstance(e, ExpToInf), lambda e: sp.exp(e.args[0])))
        ruled = plain._replace(forward=tuple(map(ruled_form, plain.forward)), backward=tuple(map(ruled_form, plain.backward)))
        changed += [op.name] if ruled != plain else []
        before = evaluated_shifted(plain.backward, evaluated_shifted(plain.forward, arrays, scope), scope)
        after = evaluated_shifted(ruled.backward, evaluated_shifted(ruled.forward, arrays, scope), scope)
        for name, value in before.items():
            scale = max(1.0, float(np.abs(value).max())) if np.size(value) else 1.0
            np.testing.assert_allclose(after[name], value, rtol=1e-12, atol=1e-12 * scale, err_msg=f"{rule}: {op.name} {name}")
    assert changed, f"{rule} changes no example: its test shows nothing"


def test_the_corrected_mean_keeps_every_value_and_changes_the_centring_means():
    """codegen.tensor_lower.mean_corrected on every op's forward, evaluated by derive.tensor's loops."""
    rng, changed = np.random.default_rng(9), []
    for op in OPS.values():
        _, arrays, params = sample(op, rng)
        scope = {**check_sizes(op), **{sp.Symbol(o, real=True): v for o, v in op.options.items()}}
        plain = program_of(op)
        corrected = mean_corrected(plain, set(names_of(op)))
        changed += [op.name] if corrected != plain else []
        before = evaluated(plain.forward, {**arrays, **params}, scope)
        after = evaluated(corrected.forward, {**arrays, **params}, scope)
        for name, value in before.items():
            np.testing.assert_allclose(after[name], value, rtol=1e-13, atol=1e-14, err_msg=f"{op.name} {name}")
    assert sorted(changed) == ["BatchNorm1d", "BatchNorm2d", "LayerNorm"]


def test_layer_norm_of_a_constant_row_is_beta_exactly_in_float32(tmp_path, monkeypatch):
    """Where mu's rounding made x - mu about 1e-5 in float32, and dividing by sqrt(eps) made it 2e-3: the
    corrected mean (a test that fails without it, its generated class beside)."""
    x = np.array([[88.8, 88.8, 88.8], [700.0] * 3, [1234.567] * 3], np.float32)
    assert not generated.LayerNorm(3, dtype=np.float32).forward(x).any()
    monkeypatch.setattr("codegen.tensor_lower.mean_corrected", lambda program, taken: program)
    codegen(build_catalog(OPS["LayerNorm"]), tmp_path / "plain", cache=None, backend="numpy")
    assert import_package(tmp_path / "plain").LayerNorm(3, dtype=np.float32).forward(x).any()


def test_weights_outside_a_row_or_element_loss_are_refused_naming_them():
    from derive.declare import tensor_loss
    op = tensor_loss("Weighted", inputs={"x": "n k"}, weights={"alpha": "k"}, steps=["L[n, k] = alpha[k] * x[n, k]"])
    with pytest.raises(LoweringError, match="Weighted: weights .alpha. are options of row_loss and element_loss"):
        lowered(op)
