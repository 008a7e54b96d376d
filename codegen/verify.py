"""Finite-difference gradient checks, for generated kernels and for any NumPy layer.

    from codegen.verify import check_gradient
    result = check_gradient(f, x, analytic)   # f: array -> float, analytic: df/dx at x
    assert result.ok, result.report()
"""
import importlib
import importlib.util
import inspect
import itertools
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from derive.reduction import REDUCTIONS

EPS = 1e-6
# Central differences in float64 with step EPS cannot resolve slopes much below 1e-10 (rounding in
# f is about 1e-16, over 2 EPS): a gradient that is zero everywhere measures up to that noise, so
# errors are taken relative to at least this scale, not to the noise itself.
SCALE_FLOOR = 1e-3


def numerical_gradient(f, x, eps=EPS):
    """df/dx by central differences (f(x + h) - f(x - h)) / 2h, one coordinate at a time, in float64."""
    x = np.array(x, dtype=np.float64)
    grad = np.empty_like(x)
    for index in np.ndindex(x.shape):
        saved = x[index]
        x[index] = saved + eps
        above = f(x)
        x[index] = saved - eps
        below = f(x)
        x[index] = saved
        grad[index] = (above - below) / (2 * eps)
    return grad


@dataclass(frozen=True)
class GradientCheck:
    """The outcome of comparing an analytic gradient with central differences."""

    analytic: np.ndarray
    numeric: np.ndarray
    tol: float
    floor: float = SCALE_FLOOR     # the least scale errors are taken relative to (see check_gradient)

    @property
    def error(self):
        """max |analytic - numeric| relative to the larger of the two gradients' max norms (at least floor)."""
        scale = max(np.max(np.abs(self.analytic), initial=0.0), np.max(np.abs(self.numeric), initial=0.0), self.floor)
        gap = np.max(np.abs(self.analytic - self.numeric), initial=0.0)
        return float(gap / scale)

    @property
    def worst(self):
        """The index where analytic and numeric differ most."""
        gap = np.abs(self.analytic - self.numeric)
        return tuple(int(v) for v in np.unravel_index(np.argmax(gap), gap.shape)) if gap.size else ()

    @property
    def ok(self):
        return bool(np.all(np.isfinite(self.analytic))) and self.error <= self.tol

    def report(self):
        """One line: the error against the tolerance and the worst entry, analytic beside numeric."""
        verdict = "OK" if self.ok else "FAILED"
        if not self.analytic.size:
            return f"{verdict}: empty gradient"
        at = self.worst
        return (f"{verdict}: relative error {self.error:.2e} (tolerance {self.tol:.0e}); worst at index "
                f"{at}: analytic {self.analytic[at]:.10g} vs numeric {self.numeric[at]:.10g}")


def check_gradient(f, x, analytic, *, eps=EPS, tol=1e-6):
    """Compare analytic (df/dx at x) with central differences of the scalar function f."""
    analytic = np.asarray(analytic, dtype=np.float64)
    if analytic.shape != np.shape(x):
        raise ValueError(f"analytic gradient has shape {analytic.shape}, x has {np.shape(x)}")
    # a difference of two values of f carries f's rounding, |f| eps, over 2 eps: where f is large (a sum of
    # many losses), a slope of that size is noise, and the floor of the scale grows with it (to where that
    # noise is 1e-6 of it, as SCALE_FLOOR is of a slope's noise where |f| is near 1)
    noise = abs(float(f(np.array(x, dtype=np.float64)))) * np.finfo(np.float64).eps / eps
    return GradientCheck(analytic, numerical_gradient(f, x, eps), tol, max(SCALE_FLOOR, 1e6 * noise))


def check_layer(make_layer, x, upstream, *, tol=1e-6):
    """Check layer.backward(upstream) against d sum(forward(x) * upstream)/dx."""
    layer = make_layer()
    layer.forward(x)
    analytic = layer.backward(upstream)
    return check_gradient(lambda z: float(np.sum(make_layer().forward(z) * upstream)), x, analytic, tol=tol)


def check_parameters(layer, x, upstream, *, tol=1e-6):
    """[(name, GradientCheck)] for each parameter of layer: its d-attribute after backward against
    differences of sum(forward(x) * upstream) + penalty() in that parameter."""
    def objective():
        return float(np.sum(layer.forward(x) * upstream) + (layer.penalty() if hasattr(layer, "penalty") else 0))

    layer.forward(x)
    layer.backward(upstream)
    checks = []
    for name in layer.params:
        analytic, value = getattr(layer, "d" + name), getattr(layer, name)

        def at(v, name=name, value=value):
            setattr(layer, name, v)
            result = objective()
            setattr(layer, name, value)
            return result
        checks.append((name, check_gradient(at, value, analytic, tol=tol)))
    return checks


def check_loss(make_loss, x, target, upstream=None, *, tol=1e-6):
    """Check loss.backward() (or backward(upstream) when unreduced) against its loss's differences."""
    loss = make_loss()
    loss.forward(x, target)
    analytic = loss.backward() if upstream is None else loss.backward(upstream)
    weight = 1.0 if upstream is None else upstream
    return check_gradient(lambda z: float(np.sum(make_loss().forward(z, target) * weight)), x, analytic, tol=tol)


def sample_target(kind, shape, rng):
    """Integer labels, or non-negative values of x's shape (rows need not sum to 1: PyTorch accepts them)."""
    return rng.integers(0, shape[-1], shape[0]) if kind == "labels" else rng.uniform(0.0, 1.0, shape)


def example_options(op, shape, rng):
    """Constructor options other than the defaults, to exercise every option's derivative."""
    values = {"class_weights": lambda p: rng.uniform(0.5, 2.0, shape[-1]),
              "element_weights": lambda p: rng.uniform(0.5, 2.0, shape),
              "ignore_index": lambda p: p.default, "scalar": lambda p: p.example, "flag": lambda p: not p.default}
    return {p.name: values[p.kind](p) for p in op.params}


def with_ignored_row(target, op):
    """target with its first label set to the op's ignore_index, where the op has one."""
    ignore = [p.default for p in op.params if p.kind == "ignore_index"]
    if not ignore or target.dtype.kind not in "iu" or len(target) < 2:
        return target
    target = target.copy()
    target[0] = ignore[0]
    return target


def reference(op):
    """f(x, t) -> (value, derivative in x) of an element-wise op's forward at its default options, in
    NumPy float64, as SymPy's expressions say (not the kernels'); None for an op over rows."""
    import sympy as sp
    from codegen.printer import KernelPrinter
    from derive.algebra import differentiated
    from derive.functions import sigmoid
    from derive.gradients import neutralize
    from derive.symbols import i, t, x
    if op.forward.has(sp.Sum) or op.granularity == "row" and op.kind == "loss":
        return None
    xs, ts = sp.symbols("x t", real=True)
    values = {p.symbol: p.default if p.neutral is None else p.neutral for p in op.params}
    scalar = neutralize(op.forward, values).xreplace({x[i]: xs, t[i]: ts})
    scalar = scalar.replace(sigmoid, lambda u: 1 / (1 + sp.exp(-u)))
    if scalar.free_symbols - {xs, ts}:
        return None
    # printed as the kernels are (SymPy's NumPy printer rewrites a Heaviside of a max into a Piecewise
    # whose condition it then simplifies, which recursed without end); a kink's value is not read here
    derivative = differentiated(scalar, xs).replace(sp.Heaviside, lambda u, *_: sp.Heaviside(u, 0))
    functions = [{"erf": np.vectorize(math.erf, otypes=[float]), "np": np}, "numpy"]
    return sp.lambdify((xs, ts), [scalar, derivative], modules=functions, printer=KernelPrinter())


def defined_points(op, shape, rng, target=None, rounds=100):
    """x of shape drawn from the op's domain where its forward and derivative are finite (log x is not,
    at x < 0): an entry that is not is drawn again, up to rounds times."""
    x = rng.uniform(*op.domain, shape)
    f = reference(op)
    if f is None:
        return x
    t = np.zeros(shape) if target is None or np.shape(target) != shape else target
    with np.errstate(all="ignore"):
        for _ in range(rounds):
            try:
                values = f(x, t)
            except (TypeError, ValueError, ZeroDivisionError):  # what lambdify cannot evaluate: x as drawn
                return x
            bad = ~np.all([np.isfinite(np.broadcast_to(v, shape)) for v in values], axis=0)
            if not bad.any():
                break
            x[bad] = rng.uniform(*op.domain, int(bad.sum()))
    return x


def check_op(op, cls, rng, shape=(4, 5)):
    """[(variant, GradientCheck)] for every variant of a catalog op's generated class, in float64:
    default options and example ones, every target kind and reduction, at points where the op is defined."""
    from derive.tensor import TensorOp
    if isinstance(op, TensorOp):  # index notation: every input and param at its own sizes (codegen.tensor_verify)
        from codegen.tensor_verify import check_tensor_op
        return check_tensor_op(op, cls, rng)
    x = defined_points(op, shape, rng)
    option_sets = [{}] + ([example_options(op, shape, rng)] if op.params else [])
    if op.kind == "layer":
        return [(f"{options or 'defaults'}", check_layer(lambda: cls(**options), x, rng.standard_normal(shape),
                                                         tol=op.tol)) for options in option_sets]
    checks = []
    for kind in op.targets:
        for options in option_sets:
            target = sample_target(kind, shape, rng)
            target = with_ignored_row(target, op) if options else target
            x = defined_points(op, shape, rng, target)
            for reduction in (*REDUCTIONS, *op.means):
                upstream = rng.standard_normal(shape[0] if op.granularity == "row" else shape)
                label = f"{kind}, {reduction}, {'options' if options else 'defaults'}"
                make = lambda: cls(**options, reduction=reduction)  # noqa: E731
                checks.append((label, check_loss(make, x, target, upstream if reduction == "none" else None,
                                                 tol=op.tol)))
    return checks


# how far a fused kernel's values may be from the NumPy kernel's (relative to the larger max norm): its
# fastmath reassociates sums and contracts multiply-adds, a few ulps; a wrong branch is off by far more
AGREEMENT = 1e-9


def check_agreement(op, reference, cls, rng, shape=(4, 5)):
    """[(variant, GradientCheck)]: the forward values and gradients of cls (a fused class) against those of
    reference (the op's NumPy class) at the same inputs, default options (and each flag's other setting, whose
    kernels are others), every target kind and reduction.
    A wrong value that its own gradient is consistent with (a branch chosen by the target alone) passes
    the finite differences, and not this."""
    def both(make, run):
        return [np.asarray(run(make(c)), dtype=np.float64) for c in (cls, reference)]

    def compared(label, make, run):
        mine, theirs = both(make, run)
        return (label, GradientCheck(mine, theirs, AGREEMENT))
    if op.kind == "layer":
        x, g = defined_points(op, shape, rng), rng.standard_normal(shape)
        return [compared("forward", lambda c: c(), lambda layer: layer.forward(x)),
                compared("backward", lambda c: c(), lambda layer: (layer.forward(x), layer.backward(g))[1])]
    checks = []
    flags = [{}] + [{p.name: not p.default} for p in op.params if p.kind == "flag"]
    for kind in op.targets:
        target = sample_target(kind, shape, rng)
        x = defined_points(op, shape, rng, target)
        for options, reduction in itertools.product(flags, (*REDUCTIONS, *op.means)):
            upstream = rng.standard_normal(shape[0] if op.granularity == "row" else shape)
            gradient = (lambda loss: loss.backward(upstream)) if reduction == "none" else (lambda loss: loss.backward())
            make = lambda c, reduction=reduction, options=options: c(**options, reduction=reduction)  # noqa: E731
            label = f"{kind}, {reduction}{''.join(f', {o}={v}' for o, v in options.items())}"
            checks += [compared(f"{label}: forward", make, lambda loss: loss.forward(x, target)),
                       compared(f"{label}: backward", make, lambda loss: (loss.forward(x, target), gradient(loss))[1])]
    return checks


def load_class(spec):
    """The class named by "path/to/module.py:ClassName". A module inside a package (generated/fast/relu.py)
    is imported as part of its whole package, from the folder above the top one, so that its relative
    imports (from .. import, from .._base import) work; what the module's own code raises is a ValueError."""
    path, _, name = spec.rpartition(":")
    if not path or not name:
        raise ValueError(f"expected path/to/module.py:ClassName, got {spec!r}")
    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"no file {path}")
    top = path.parent
    while (top / "__init__.py").exists() and (top.parent / "__init__.py").exists():
        top = top.parent
    dotted = ".".join(path.relative_to(top.parent).with_suffix("").parts)
    try:
        if (top / "__init__.py").exists():
            if str(top.parent) not in sys.path:
                sys.path.insert(0, str(top.parent))
            module = importlib.import_module(dotted)
        else:
            loaded = importlib.util.spec_from_file_location(f"symgrad_checked_{path.stem}", path)
            module = importlib.util.module_from_spec(loaded)
            loaded.loader.exec_module(module)
    except Exception as error:  # the user's module failed to import: their error, said in one line
        raise ValueError(f"{path}: importing it raised {type(error).__name__}: {error}") from error
    if Path(module.__file__).resolve() != path:
        raise ValueError(f"{path}: {dotted} is already imported from {module.__file__}")
    if not inspect.isclass(getattr(module, name, None)):
        raise ValueError(f"{path} defines no class {name}")
    return getattr(module, name)


@dataclass(frozen=True)
class ClassCheck:
    """check_class's verdict: the gradient in the input, then in each parameter the class lists in params."""

    checks: tuple                  # ((name, GradientCheck), ...), the input x first

    @property
    def ok(self):
        return all(check.ok for _, check in self.checks)

    def report(self):
        """One line per gradient: d<name>, then GradientCheck.report()."""
        return "\n".join(f"d{name}: {check.report()}" for name, check in self.checks)


def check_class(cls, shape, rng, *, target="dense", tol=1e-6, init=None):
    """gradcheck for any class with the forward/backward convention, in float64 at random inputs, of one
    instance cls(**init): a layer (forward(x)) against sum(forward(x) * u), and in each of its params
    (Linear's W, b) too; a loss (forward(x, target)) against its value."""
    instance = cls(**(init or {}))  # one instance: a fresh Linear would draw other weights
    x = rng.uniform(-2.0, 2.0, shape)
    if len(inspect.signature(cls.forward).parameters) != 2:  # forward(self, x, target)
        return ClassCheck((("x", check_loss(lambda: instance, x, sample_target(target, shape, rng), tol=tol)),))
    upstream = rng.standard_normal(np.shape(instance.forward(x)))
    checks = [("x", check_layer(lambda: instance, x, upstream, tol=tol))]
    return ClassCheck((*checks, *check_parameters(instance, x, upstream, tol=tol))
                      if getattr(instance, "params", None) else tuple(checks))
