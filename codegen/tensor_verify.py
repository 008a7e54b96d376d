"""Finite-difference checks of a generated index-notation class: every input's and param's gradient, in
float64 at small distinct sizes (codegen.tensor_lower.check_sizes), seeded, at the default options and at
other values in their ranges (derive.declare.example); a loss under every reduction; a penalty added to the
checked scalar."""
import numpy as np
import sympy as sp

from codegen.tensor_lower import check_sizes
from codegen.verify import check_gradient
from derive.declare import example
from derive.tensor import size_of


def guarded_targets(op):
    """The dense targets a Piecewise condition of a step reads (KLDiv's t > 0): the checks give them zeros."""
    return {a.base.name for s in op.steps for p in s.expr.atoms(sp.Piecewise) for _, c in p.args
            for a in sp.sympify(c).atoms(sp.Indexed) if a.base.name in op.targets}


def sample(op, rng):
    """(constructor sizes, {input or target: array}, {param: array}) at the check sizes: inputs and params
    uniform in op.domain, labels uniform classes, dense targets uniform in [0, 1], a guarded one with zeros."""
    sizes = check_sizes(op)

    def shape(axes):
        return tuple(sizes[size_of(i)] for i in axes)
    arrays = {a: rng.uniform(*op.domain, shape(axes)) for a, axes in op.inputs.items()}
    for t, axes in op.targets.items():
        if t in op.labels:
            arrays[t] = rng.integers(0, sizes[op.labels[t]], shape(axes))
        else:
            arrays[t] = rng.uniform(0.0, 1.0, shape(axes))
            if t in guarded_targets(op):
                arrays[t].flat[::3] = 0.0
    params = {p: rng.uniform(*op.domain, shape(axes)) for p, (axes, _) in op.params.items()}
    constructor = op.size_arguments(sizes)
    return constructor, arrays, params


def drawn_alike(op, instance):
    """instance with its rng at one seed, so that each forward draws the same noise (a dropout mask): the
    differences then differentiate one function."""
    if op.noise:
        instance._rng = np.random.default_rng(0)
    return instance


EVAL = "eval mode"    # an option set's key: the class in eval mode, reading buffers in place of its running steps


def built(cls, constructor, options, buffers, reduction):
    """An instance of cls with options, and in eval mode at the given buffers where options say so."""
    instance = cls(**constructor, **{o: v for o, v in options.items() if o != EVAL},
                   **({"reduction": reduction} if reduction else {}))
    if options.get(EVAL):
        for buffer, value in buffers.items():
            setattr(instance, buffer, value.copy())
        instance.eval()
    return instance


def check_tensor_op(op, cls, rng):
    """[(variant, GradientCheck)] of every input's and param's gradient of op's generated class cls, against
    central differences of sum(forward * u) (a layer, a loss unreduced) or of the reduced loss."""
    constructor, arrays, params = sample(op, rng)
    option_sets = ([{}] + ([{o: example(v, op.ranges[o]) for o, v in op.options.items()}] if op.options else [])
                   + [{flag: False} for flag in op.switches or {}] + [{EVAL: True}] * bool(op.running)
                   + [{flag: not default} for flag, default in (op.flags or {}).items()]
                   # a window's padding and stride other than 0 and 1: the class's pad, crop, stride and dilation
                   + [{"stride": 2, "padding": 1}] * bool(op.window))
    # eval mode reads running statistics: random ones, positive (a variance), the same for every forward
    buffers = {buffer: rng.uniform(0.5, 2.0, np.shape(getattr(cls(**constructor), buffer)))
               for buffer, _, _, _ in (op.running or {}).values()}
    reductions = (None,) if op.kind == "layer" else ("mean", "sum", "none", *(op.means or {}))
    names = [*op.inputs, *op.targets]
    checks = []
    every_param = params
    for options in option_sets:
        # a switch turned off keeps its params at their init: none is set, none has a gradient
        off = {p for flag, names in (op.switches or {}).items() if options.get(flag) is False for p in names}
        params = {p: value for p, value in every_param.items() if p not in off}
        for reduction in reductions:
            label = ", ".join([f"{o}={v:g}" if o in op.options else o if o == EVAL else f"{o}={v}"
                               for o, v in options.items()]
                              + [reduction] * bool(reduction))
            label = label or "defaults"
            instance = built(cls, constructor, options, buffers, reduction)
            for p, value in params.items():
                setattr(instance, p, value.copy())
            out = drawn_alike(op, instance).forward(*(arrays[a] for a in names))
            upstream = rng.standard_normal(np.shape(out)) if reduction in (None, "none") else None
            analytic = instance.backward(upstream) if upstream is not None else instance.backward()
            analytic = dict(zip(op.inputs, analytic if isinstance(analytic, tuple) else (analytic,)))
            analytic.update({p: getattr(instance, f"d{p}") for p in params})
            if any(getattr(instance, f"d{p}") is not None for p in off):
                raise ValueError(f"{op.name} ({label}): a param its switch turned off has a gradient")

            def objective(name, value, instance=instance, weight=1.0 if upstream is None else upstream, params=params):
                """The checked scalar with name (an input or a param) at value, the others as sampled."""
                if name in params:   # a fresh instance with the param at value, the others as sampled
                    instance = built(cls, constructor, options, buffers, reduction)
                    for p in params:
                        setattr(instance, p, value if p == name else params[p])
                given = [value if a == name else arrays[a] for a in names]
                penalty = instance.penalty() if op.penalty is not None else 0.0
                return float(np.sum(drawn_alike(op, instance).forward(*given) * weight) + penalty)
            for name, grad in analytic.items():
                start = arrays[name] if name in arrays else params[name]
                checks.append((f"d{name} ({label})", check_gradient(lambda v, name=name: objective(name, v), start,
                                                                    grad, tol=op.tol)))
    return checks
