"""Index notation: an operation declared as named steps over arrays, derived by reverse mode.

    tensor_op("LayerNorm", inputs={"x": "n k"}, params={"gamma": ("k", "ones"), "beta": ("k", "zeros")},
              options={"eps": 1e-5}, steps=["mu[n] = Sum(x[n, k], k) / K", ..., "y[n, k] = ..."])

The language. An array's axes are index letters, and index k runs over 0..K-1 (its capital, a positive
integer). Sum(e, k, j) sums e over the whole range of each index. An index expression is an index, a
sum of indices, sizes and integers with each index counted once (m + j, h + H), or an integer target
(x[n, c[n]], a label); every one must provably stay within its axis. An index that is no axis of an
input, param or target has its size declared by a formula over the others (sizes={"M": "L - J + 1"}), and
so may a param's axis, which the constructor computes (MultiheadAttention's head size, sizes={"D": "E/H"}).
A split axis is a shift: GLU's halves are x[n, h] and x[n, h + H], with sizes={"H": "K/2"}.

The naming contract: y the output of a layer, L the loss of each entry of a loss; g the upstream
gradient of the output (for a loss, each entry's weight under the reduction); g_s the adjoint of step
s; dq the vector-Jacobian product of input or param q. A Sum over an empty range is 0 (not SymPy's
Karr convention): a contracted Kronecker delta restricts a range to max(lo, a)..min(hi, b).
"""
import dataclasses
import functools
import io
import itertools
import keyword
import math
import operator
import re
import tokenize
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import sympy as sp
from sympy.parsing.sympy_parser import auto_number, parse_expr

from derive.algebra import at_kinks, differentiated
from derive.functions import sigmoid

# uniform: PyTorch's Linear's, within 1/sqrt(fan_in); normal: standard normal, its Embedding's
INITS = ("ones", "zeros", "uniform", "normal")
NOISES = ("dropout",)   # what tensor_op's noise arrays may be (see tensor_op)
RUNNING_INITS = ("zeros", "ones")   # a running statistic's buffer starts at one of these (see tensor_op)
OUTPUT = {"layer": "y", "loss": "L"}
EPS = float(np.finfo(np.float64).eps)
OPTIONAL_AXIS = re.compile(r"\[\s*([a-z])\s*\]\s*$")
STEP = re.compile(r"\s*(\w+)\s*(?:\[([^\]]*)\])?\s*=(?!=)(.*)", re.S)
PARSE_GLOBALS = {"Integer": sp.Integer, "Float": sp.Float, "Rational": sp.Rational}


class Assignment(NamedTuple):
    """name[indices] = expr: a forward step, an adjoint or a vector-Jacobian product."""

    name: str
    indices: tuple
    expr: sp.Expr

    def __str__(self):
        at = f"[{', '.join(map(str, self.indices))}]" if self.indices else ""
        return f"{self.name}{at} = {sp.sstr(self.expr)}"


@dataclass(frozen=True)
class TensorOp:
    """One operation in index notation: its arrays by their index letters, and its steps."""

    name: str
    kind: str                      # "layer" (output y) or "loss" (output L, one loss per entry)
    summary: str
    source: str
    inputs: dict                   # {name: (index Symbol, ...)}, differentiated
    params: dict                   # {name: ((index Symbol, ...), init)}, differentiated, init in INITS
    options: dict                  # {name: default}, constants
    ranges: dict                   # {option: derive.ops.Range}: the values each option accepts
    targets: dict                  # {name: (index Symbol, ...)} of a loss, not differentiated
    labels: dict                   # {target: size}: the integer targets and the axis each indexes
    sizes: dict                    # {size Symbol: formula over the other sizes}
    steps: tuple                   # (Assignment, ...) in order, the last one the output
    fan_in: dict                   # {uniform param: size product}: init bound 1/sqrt(fan_in), as PyTorch
    domain: tuple = (-3.0, 3.0)    # inputs and params drawn uniformly from here in the checks
    tol: float = 1e-6              # largest finite-difference relative error accepted
    penalty: sp.Expr = None        # a scalar over params and options the user adds to the loss (an L2 term)
    names: dict = None             # {size: constructor argument name} where it is not the capital letter
    weights: dict = None           # {name: (index Symbol, ...)} of a loss: optional constant arrays, ones by default
    switches: dict = None          # {flag: (param, ...)}: False keeps those params at their init, untrained
    dtype_eps: tuple = ()          # options whose default None is the input dtype's machine epsilon
    noise: dict = None             # {name: ((index Symbol, ...), kind, option)}: drawn in training mode, constants
    running: dict = None           # {step: (buffer, init, estimate Expr, momentum option)}: see tensor_op
    given: dict = None             # {name: (index Symbol, ...)}: arrays the class passes in, constants (eval_mode)
    optional_axis: tuple = ()      # inputs whose last axis may be absent (a size of 1): PyTorch's (N, C) or (N, C, L)
    flags: dict = None             # {name: default}: booleans the steps' conditions read, fixed per kernel (see tensor_op)
    window: dict = None            # {"input", "padded", "strided"}: zero padding and stride around the kernels (see tensor_op)
    given_sizes: tuple = ()        # sizes the constructor takes that no array has (a pooling's window), kernel arguments
    means: dict = None             # {reduction: divisor Expr over the output's sizes}: a loss's further means (tensor_loss)
    scaling: dict = None           # {input or option: degree}: y unchanged by each v -> c^degree v (scale_degrees)
    rescaled: dict = None          # {scores step: array it is linear in}: a softmax's scores, their overflow guarded (see tensor_op)
    rounded: tuple = ()            # steps of inputs and params alone that every float kernel holds rounded (see tensor_op)

    @property
    def batch_index(self):
        """The index of a layer's batch axis, into which any leading axes of its inputs flatten (PyTorch's
        (*, K)): the first axis of every input and of the output, of no param, summed by no step and read
        only as the first index of an array, so that each of its values is computed alone; else None."""
        first = {axes[0] for axes in [*self.inputs.values(), *self.targets.values()]}
        (n,) = first if len(first) == 1 else (None,)
        if (self.kind != "layer" or n is None or self.steps[-1].indices[:1] != (n,)
                or any(n in axes for axes, _ in self.params.values())):
            return None
        for step in self.steps:
            if n in step.indices[1:] or any(n == limit[0] for s in step.expr.atoms(sp.Sum) for limit in s.limits):
                return None
            rows = step.expr.replace(lambda e: isinstance(e, sp.Indexed) and e.indices[0] == n,
                                     lambda e: e.func(e.base, sp.Integer(0), *e.indices[1:]))
            if n in rows.free_symbols:
                return None
        return n

    @property
    def constructor_sizes(self):
        """{size Symbol: the constructor's argument naming it}: the sizes of the params' axes, those named in
        names first, in its order (PyTorch's embed_dim, num_heads), then in order of appearance, but those declared by a formula (MultiheadAttention's D = E/H), which the constructor computes."""
        named = [sp.Symbol(s, integer=True, positive=True) for s in self.names or {}]
        sizes = dict.fromkeys([*named, *(size_of(i) for axes, _ in self.params.values() for i in axes)])
        return {s: self.names.get(str(s), str(s)) for s in sizes if s not in self.sizes}

    def size_arguments(self, values):
        """{constructor argument: value} of the sizes at values ({size Symbol: int}); an argument naming several
        sizes (Conv2d's kernel_size, the sizes U and V of its weight's axes) takes the tuple of theirs."""
        found = {}
        for size, name in self.constructor_sizes.items():
            found.setdefault(name, []).append(int(values[size]))
        return {name: v[0] if len(v) == 1 else tuple(v) for name, v in found.items()}

    @property
    def module(self):
        """The generated module's name: snake case of the class name, as derive.ops.Op.module."""
        return re.sub(r"(?<=[a-z])(?=[A-Z][a-z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", self.name).lower()


@dataclass(frozen=True)
class TensorDerivation:
    """Reverse mode over an op's steps: the adjoint of each step, and per input and param its program."""

    op: TensorOp
    forward: tuple                 # op.steps
    adjoints: tuple                # (Assignment g_s, ...) of every step but the output, output side first
    gradients: dict                # {input or param: (adjoints it needs ..., Assignment d<name>)}
    penalty: tuple = ()            # (Assignment d<param> of the penalty alone, ...) of each param it reads

    def __str__(self):
        return "\n".join([f"{self.op.name}:", *map(str, self.forward)] + [
            f"{name}:\n" + "\n".join(f"  {line}" for line in program) for name, program in self.gradients.items()]
            + [f"penalty P = {sp.sstr(self.op.penalty)}:\n" + "\n".join(f"  {line}" for line in self.penalty)]
            * bool(self.penalty))


class GradientCheck(NamedTuple):
    """One VJP at explicit sizes against central finite differences, and their relative difference."""

    name: str
    analytic: np.ndarray
    numeric: np.ndarray
    error: float


def size_of(index):
    """K for index k."""
    return sp.Symbol(str(index).upper(), integer=True, positive=True)


def tensor_op(name, *, inputs, steps, params=None, options=None, sizes=None, penalty=None, names=None, switches=None,
              noise=None, running=None, flags=None, padding=None, stride=None, scaling=None, rescaled=None,
              rounded=None, summary=None, domain=(-3.0, 3.0), tol=1e-6):
    """A layer y[...] computed by steps from inputs, trainable params {name: (indices, init)} and options
    {name: default or (default, range)}, a default None meaning the input dtype's machine epsilon (PyTorch's
    RMSNorm eps); penalty a scalar over params and options that the class's penalty() returns and backward
    adds the gradient of (an L2 term); names the constructor's argument for a param axis's size
    ({"I": "in_features"}), by default its capital letter; switches {flag: (param, ...)} constructor flags,
    True by default, whose False keeps those params at their ones or zeros, untrained (PyTorch's
    elementwise_affine=False, bias=False); noise {name: (indices, kind, option)} arrays the layer draws from
    its rng in training mode, constants to the derivation: kind "dropout" is a mask of 0 and 1/(1 - p), each
    entry kept with probability 1 - p for p the option, and ones in eval mode (PyTorch's Dropout); running
    {step: (buffer, init, estimate, momentum)} running statistics (PyTorch's BatchNorm): in training mode each
    forward moves the buffer (starting at init, zeros or ones) towards the estimate, an expression of the
    step and the sizes (var[c] * N / (N - 1), the unbiased variance), by buffer + momentum (estimate - buffer)
    (momentum an option; None averages every batch equally), and eval mode reads the buffer in place of the
    step (the class's track_running_stats=False keeps no buffers and always computes the step). An input's
    last index in brackets ("n c [l]") is an axis it may lack: the class then gives it a size of 1. flags
    {name: default} are constructor booleans a step's condition reads (Piecewise((exp(A[n, t, s]), (s <= t) |
    ~is_causal), (0, True))): each value gets kernels of its own, derived with the flag fixed, so that no
    kernel tests it. padding {input: "h w"} and stride "i j" make a convolution's or a pooling's window
    (PyTorch's padding and stride, an int or one per axis): the class pads the input's axes h, w with
    zeros (and crops dx), and the kernels take the stride, reading the windows at every stride-th entry of
    the output's axes i, j and adding their gradients back there (codegen.tensor_lower), so the steps
    declare the plain window, stride 1 and no padding, and the derivation is the plain window's. scaling
    {input or option: degree} declares the output unchanged where each is multiplied by c^degree for any c > 0
    (a normalisation's x -> c x, eps -> c^2 eps), which scale_degrees proves. rescaled {step: array} names a
    softmax's scores (attention's A), linear in array (Q): where a row's max overflows, the kernels compute that
    row's softmax again from c A = A(c Q), c a power of two (codegen.tensor_lower.rescaled_scores). rounded
    (step, ...) names steps that read inputs and params alone and that the op hands on as the inputs of another
    (MultiheadAttention's projections q, k, v, the inputs of its attention): every float kernel holds them rounded
    to the dtype, so the accuracy survey's conditioning allowance counts their rounding as an input's
    (codegen.accuracy.TensorTruth.scales)."""
    return declared(name, "layer", inputs, params or {}, options or {}, {}, sizes or {}, steps, summary, domain, tol,
                    penalty, names or {}, switches=switches or {}, noise=noise or {}, running=running or {},
                    flags=flags or {}, window=(padding, stride), scaling=scaling or {}, rescaled=rescaled or {},
                    rounded=rounded or ())


def tensor_loss(name, *, inputs, steps, targets=None, weights=None, params=None, options=None, sizes=None,
                penalty=None, names=None, flags=None, means=None, summary=None, domain=(-3.0, 3.0), tol=1e-6):
    """A loss L[...] of each entry (reduced later by mean, sum or none), computed by steps from inputs and targets;
    weights {name: indices} are optional constant arrays the constructor takes, ones by default (PyTorch's
    weight and pos_weight); flags as tensor_op's; means {reduction: divisor} further reductions, each the losses'
    sum divided by a formula over the output's sizes ({"batchmean": "N"}, PyTorch's kl_div)."""
    return declared(name, "loss", inputs, params or {}, options or {}, targets or {}, sizes or {}, steps, summary,
                    domain, tol, penalty, names or {}, weights or {}, flags=flags or {}, means=means or {})


def declared(name, kind, inputs, params, options, targets, sizes, steps, summary, domain, tol, penalty=None,
             size_names=None, weights=None, switches=None, noise=None, running=None, flags=None, means=None,
             window=(None, None), scaling=None, rescaled=None, rounded=()):
    """The TensorOp of a declaration, refusing anything ill-formed with a DeclarationError naming it."""
    from derive.declare import DeclarationError, check_name, declared_param  # derive.declare re-exports this module
    check_name(name)

    def refuse(problem):
        raise DeclarationError(f"{name}: {problem}")

    # an option whose default is None is the dtype's machine epsilon; float64's stands in for it in the checks
    dtype_eps = tuple(o for o, v in options.items() if (v[0] if isinstance(v, tuple) else v) is None)
    options = {o: ((EPS, v[1]) if isinstance(v, tuple) else EPS) if o in dtype_eps else v for o, v in options.items()}
    ranges = {option: declared_param(name, option, value, role="option").range for option, value in options.items()}
    options = {option: value[0] if isinstance(value, tuple) else value for option, value in options.items()}
    switches = switched(refuse, switches or {}, params, options)
    for param, value in params.items():
        if not (isinstance(value, tuple) and len(value) == 2 and value[1] in INITS):
            refuse(f"param {param} must be (indices, init) with init one of {', '.join(INITS)}, got {value!r}")
    weights, noise, running, flags = weights or {}, noise or {}, running or {}, flags or {}
    for flag, default in flags.items():
        if not isinstance(default, (bool, np.bool_)):
            refuse(f"flag {flag} must default to True or False, got {default!r}")
    if flags and running:
        refuse("flags and running statistics together are not supported yet")
    # "n c [l]": a last axis the input may lack (PyTorch's BatchNorm1d on (N, C) or (N, C, L))
    optional_axis = tuple(a for a, spec in inputs.items() if isinstance(spec, str) and OPTIONAL_AXIS.search(spec))
    inputs = {a: OPTIONAL_AXIS.sub(r"\1", spec) if a in optional_axis else spec for a, spec in inputs.items()}
    for array, value in noise.items():
        if not (isinstance(value, tuple) and len(value) == 3 and value[1] in NOISES and value[2] in options):
            refuse(f"noise {array} must be (indices, kind, option) with kind one of {', '.join(NOISES)} and an "
                   f"option's name, got {value!r}")
        if not ranges[value[2]].low >= 0 or not ranges[value[2]].high <= 1:
            refuse(f"noise {array}: option {value[2]} is a probability; declare its range within [0, 1]")
    axes = {array: axes_of(refuse, array, spec) for array, spec in
            [*inputs.items(), *((p, spec) for p, (spec, _) in params.items()), *targets.items(), *weights.items(),
             *((z, spec) for z, (spec, _, _) in noise.items())]}
    lines = [STEP.fullmatch(text) if isinstance(text, str) else None for text in steps]
    if not steps or None in lines:
        refuse(f"step {steps[lines.index(None)] if steps else None!r} is not 'name[i, j] = expression'")
    known = set().union(*axes.values())
    # a size names= gives an argument that is no array's axis's and no formula's: the constructor's (a pooling's
    # kernel_size), passed to the kernels
    given_sizes = tuple(s for s in size_names or {} if isinstance(s, str) and re.fullmatch(r"[A-Z]", s)
                        and s not in {str(size_of(i)) for i in known} and s not in (sizes or {}))
    known |= {sp.Symbol(s.lower(), integer=True) for s in given_sizes}
    size_symbols = {size_of(index): index for index in known}
    data = {i for array in [*inputs, *targets, *weights, *noise] for i in axes[array]}
    size_formulas = declared_sizes(refuse, sizes, size_symbols, data)
    known |= set(size_formulas)
    for target, spec, _ in (line.groups() for line in lines):
        axes[target] = axes_of(refuse, target, spec or "", known, what="step")
    arrays = {array: sp.IndexedBase(array, real=True) for array in axes}
    names = [*((a, "an input") for a in inputs), *((p, "a param") for p in params), *((t, "a target") for t in targets),
             *((w, "a weight") for w in weights), *((z, "a noise") for z in noise),
             *((line[1], "a step") for line in lines), *((o, "an option") for o in options),
             *((f, "a flag") for f in flags),
             *((str(i), "an index") for i in known),
             *((str(size_of(i)), "a size") for i in known)]
    check_names(refuse, names, arrays)
    if lines[-1][1] != OUTPUT[kind]:
        refuse(f"the last step defines {lines[-1][1]}; the output of a {kind} is {OUTPUT[kind]}")
    namespace = {**arrays, **{str(i): i for i in known}, **{str(size_of(i)): size_of(i) for i in known},
                 **{o: sp.Symbol(o, real=True) for o in options}, **{f: sp.Symbol(f) for f in flags}, "Sum": Summed,
                 "FirstMax": FirstMax, "KroneckerDelta": sp.KroneckerDelta}  # 1 where its two indices are equal, else 0
    formulas = {size_of(i): formula for i, formula in size_formulas.items()}
    if kind == "layer":  # an input that indexes an axis holds integer labels (an embedding's tokens): no gradient
        indexing = {index.base.name for line in lines for access in parsed(f"step {line[1]}", line[3].strip(),
                                                                            namespace, refuse).atoms(sp.Indexed)
                    for index in access.indices if isinstance(index, sp.Indexed)}
        targets = {**targets, **{a: spec for a, spec in inputs.items() if a in indexing}}
        inputs = {a: spec for a, spec in inputs.items() if a not in indexing}
        if not inputs and not params:
            refuse("no float input and no param: nothing to differentiate")
    assignments, labels, read = [], {}, set()
    for number, line in enumerate(lines):
        where = f"step {line[1]}"
        expr = summed_out(refuse, where, parsed(where, line[3].strip(), namespace, refuse), known)
        reads = reads_of(expr)
        later = [s.group(1) for s in lines[number:] if s.group(1) in reads]
        if later:
            refuse(f"{where} reads {later[0]}, which is defined {'by itself' if later[0] == line[1] else 'later'}")
        bare = unindexed(expr)
        if bare:
            refuse(f"{where} reads array {sorted(map(str, bare))[0]} without indices")
        for access in expr.atoms(sp.Indexed):
            check_access(refuse, where, access, axes, targets, labels, formulas, known)
        lhs, free = set(axes[line[1]]), expr.free_symbols & known
        if lhs != free:
            problem = (f"index {sorted(map(str, lhs - free))[0]} of the lhs is not free in the rhs" if lhs - free else
                       f"index {sorted(map(str, free - lhs))[0]} is free in the rhs but not on the lhs (Sum over it?)")
            refuse(f"{where}: {problem}")
        assignments.append(Assignment(line[1], axes[line[1]], expr))
        read |= reads
    for flag, names in switches.items():   # off, a param is its identity: ones or zeros, a drawn one (a bias) 0
        for p in names:
            if params[p][1] not in ("ones", "zeros") and not all(
                    sp.Add.make_args(sp.expand(step.expr, mul=False)).count(access) == 1
                    and not (step.expr - access).has(access.base)
                    for step in assignments for access in step.expr.atoms(sp.Indexed) if access.base.name == p):
                refuse(f"switch {flag}: param {p} is drawn at random, so off it is 0, which it may be only where it "
                       f"is a term of its own (a bias); initialise it to ones or zeros")
    penalty = None if penalty is None else penalty_of(refuse, penalty, namespace, params, axes, known, formulas)
    running = running_statistics(refuse, running, assignments, namespace, options, ranges, known)
    for a in optional_axis:   # the class adds the axis to x and takes it off y and dx: y must end in it too
        if kind != "layer" or len(inputs) > 1 or assignments[-1].indices[-1:] != axes[a][-1:]:
            refuse(f"input {a}: a last axis in brackets needs a layer of one input whose output ends in that axis")
    read |= {option for _, _, _, option in running.values()}
    read |= {str(symbol) for e in [*(s.expr for s in assignments), *[penalty] * (penalty is not None)]
             for symbol in e.free_symbols}
    read |= {option for _, _, option in noise.values()}   # a noise's option is read where the class draws it
    unread = [a for a in [*inputs, *params, *targets, *weights, *noise, *options, *flags,
                          *(s.name for s in assignments[:-1])]
              if a not in read]
    if unread:
        refuse(f"{unread[0]} is never read")
    window = window_of(refuse, *window, inputs, axes, assignments[-1].indices, options) if any(window) else None
    for v, degree in (scaling or {}).items():
        if v not in {*inputs, *options} or not isinstance(degree, int) or not degree:
            refuse(f"scaling: {v!r} -> {degree!r} must map an input or an option to a nonzero integer degree")
    for step, array in (rescaled or {}).items():
        scores = next((a for a in assignments[:-1] if a.name == step), None)
        if scores is None or array not in {*inputs, *(a.name for a in assignments)} or not linear_in(scores.expr, array):
            refuse(f"rescaled: {step!r} -> {array!r} must map a step (not the output) to an input or step it is "
                   f"linear in")
    for step in rounded:
        found = next((a for a in assignments[:-1] if a.name == step), None)
        if found is None or not reads_of(found.expr) <= {*inputs, *params}:
            refuse(f"rounded: {step!r} must name a step (not the output) that reads inputs and params alone")
    param_sizes = {str(size_of(i)) for p in params for i in axes[p]}
    for size, argument in (size_names or {}).items():
        if size not in {*param_sizes, *given_sizes} or not isinstance(argument, str) or not argument.isidentifier() or keyword.iskeyword(
                argument) or argument in {*options, "rng", "dtype", "reduction", "self", "stride", "padding"}:
            known_sizes = ", ".join(sorted(param_sizes)) or "it has none"
            refuse(f"names: {size!r} -> {argument!r} must name the size of a param's axis ({known_sizes}) by an "
                   f"identifier no option, rng, dtype or reduction takes")
    if window and window["stride_from"] is not None and window["stride_from"] not in (size_names or {}).values():
        refuse(f"stride: {window['stride_from']!r}, the argument a stride of None takes, names no size (names=)")
    return TensorOp(name=name, kind=kind, summary=summary or "; ".join(text.strip() for text in steps),
                    source=f"derive.tensor.tensor_{'op' if kind == 'layer' else 'loss'} ({name})",
                    inputs={a: axes[a] for a in inputs}, params={p: (axes[p], params[p][1]) for p in params},
                    options={o: float(v) for o, v in options.items()}, ranges=ranges,
                    targets={t: axes[t] for t in targets}, labels=labels, sizes=formulas, steps=tuple(assignments),
                    fan_in=fan_ins(assignments, [p for p, (_, init) in params.items() if init == "uniform"]),
                    domain=domain, tol=tol, penalty=penalty, names=dict(size_names or {}),
                    weights={w: axes[w] for w in weights}, switches=switches, dtype_eps=dtype_eps,
                    noise={z: (axes[z], kind, option) for z, (_, kind, option) in noise.items()}, running=running,
                    optional_axis=optional_axis, flags={f: bool(v) for f, v in flags.items()}, window=window,
                    given_sizes=given_sizes, scaling=dict(scaling or {}), rescaled=dict(rescaled or {}),
                    rounded=tuple(rounded),
                    means=loss_means(refuse, means or {}, assignments[-1].indices))


def loss_means(refuse, means, output):
    """{reduction: divisor} of a loss's declared further means ({"batchmean": "N"}: the losses' sum over N, as
    PyTorch's kl_div), each divisor a formula over the sizes of the output's axes, which the class reads from
    the losses' shape; a name of its own, neither mean, sum nor none."""
    sizes = {str(size_of(i)): size_of(i) for i in output}
    found = {}
    for reduction, text in means.items():
        if not isinstance(reduction, str) or not reduction.isidentifier() or reduction in ("mean", "sum", "none"):
            refuse(f"means: {reduction!r} must be a reduction's name other than mean, sum and none")
        found[reduction] = parsed(f"mean {reduction}", str(text), sizes, refuse)
        if not found[reduction].free_symbols:
            refuse(f"mean {reduction}: its divisor {text!r} reads none of the output's sizes "
                   f"({', '.join(sizes) or 'it has none'})")
    return found


def window_of(refuse, padding, stride, inputs, axes, output, options):
    """{"input": x, "padded": (positions of x's padded axes), "strided": (positions of the output's strided
    axes)} of a window declared padding={x: "h w"}, stride="i j"."""
    if any(name in options for name in ("padding", "stride")):
        refuse("an option named padding or stride is taken by the window's arguments")
    found = {"input": None, "padded": (), "strided": (), "stride_from": None, "fill": 0.0}
    if padding is not None:
        if not (isinstance(padding, dict) and len(padding) == 1 and next(iter(padding)) in inputs):
            refuse(f"padding must be {{input: 'axes'}} for one input, got {padding!r}")
        ((name, spec),) = padding.items()
        spec, fill = spec if isinstance(spec, tuple) else (spec, 0.0)   # ("h w", "-inf"): a max pooling's padding
        if str(fill) not in ("0", "0.0", "-inf"):
            refuse(f"padding: {name} may be padded with 0 or -inf, got {fill!r}")
        found["fill"] = float(fill)
        letters = [sp.Symbol(a, integer=True) for a in str(spec).split()]
        if not letters or any(i not in axes[name][1:] for i in letters):
            refuse(f"padding: {spec!r} must name axes of {name} but its first")
        found.update(input=name, padded=tuple(axes[name].index(i) for i in letters))
    if stride is not None:   # "i j", or ("i j", argument): stride None is that size argument's value (kernel_size)
        stride, found["stride_from"] = stride if isinstance(stride, tuple) else (stride, None)
        letters = [sp.Symbol(a, integer=True) for a in str(stride).split()]
        if not letters or any(i not in output[1:] for i in letters):
            refuse(f"stride: {stride!r} must name axes of the output but its first")
        found["strided"] = tuple(output.index(i) for i in letters)
    return found


def running_statistics(refuse, running, assignments, namespace, options, ranges, known):
    """{step: (buffer, init, estimate Expr, option)} of the declared running statistics: each of a step before
    the output, its estimate an expression of that step alone (at the step's indices) and of sizes, its
    momentum an option within [0, 1]."""
    steps = {s.name: s for s in assignments[:-1]}
    found = {}
    for step, value in running.items():
        if step not in steps:
            refuse(f"running {step!r}: not a step before the output ({', '.join(steps) or 'there is none'})")
        if not (isinstance(value, tuple) and len(value) == 4 and isinstance(value[0], str)
                and value[0].isidentifier() and value[1] in RUNNING_INITS and value[3] in options):
            refuse(f"running {step} must be (buffer name, init one of {', '.join(RUNNING_INITS)}, estimate, "
                   f"momentum option), got {value!r}")
        buffer, init, text, option = value
        if buffer in namespace or buffer in {*options, "rng", "dtype", "self", "training", "num_batches_tracked"}:
            refuse(f"running {step}: buffer name {buffer} is taken")
        if not ranges[option].low >= 0 or not ranges[option].high <= 1:
            refuse(f"running {step}: momentum {option} must be declared within [0, 1]")
        estimate = parsed(f"running {step}", str(text), namespace, refuse)
        other = reads_of(estimate) - {step}
        if other or estimate.free_symbols & known != set(steps[step].indices):
            refuse(f"running {step}: the estimate {text!r} must read {step} alone, at its indices "
                   f"{', '.join(map(str, steps[step].indices))}")
        found[step] = (buffer, init, estimate, option)
    return found


def with_flags(op, values):
    """op with its flags at values ({flag: bool}, the defaults for any not given): each condition that reads one
    decided where it can be, the flags gone."""
    fixed = {sp.Symbol(f): sp.true if values.get(f, default) else sp.false for f, default in (op.flags or {}).items()}
    return dataclasses.replace(op, steps=tuple(s._replace(expr=s.expr.xreplace(fixed)) for s in op.steps), flags={})


def flag_values(op):
    """Every setting of op's flags, {flag: bool}, the defaults first."""
    names = list(op.flags or {})
    settings = [dict(zip(names, values)) for values in itertools.product((False, True), repeat=len(names))]
    return sorted(settings, key=lambda v: v != (op.flags or {}))


def eval_mode(op):
    """op as its eval mode computes it: each step with a running statistic no longer computed but given (its
    buffer passed in), a constant to the derivation."""
    given = {s.name: s.indices for s in op.steps if s.name in (op.running or {})}
    return dataclasses.replace(op, steps=tuple(s for s in op.steps if s.name not in given),
                               given={**(op.given or {}), **given}, running={})


def switched(refuse, switches, params, options):
    """{flag: (param, ...)} of the declared switches: the op with one off is the op without its params, each kept
    at its init where that is ones or zeros, else at 0 (a bias, checked where the steps are parsed)."""
    for flag, names in switches.items():
        names = (names,) if isinstance(names, str) else names
        if not (isinstance(flag, str) and flag.isidentifier() and not keyword.iskeyword(flag)) or flag in {
                *options, *params, "rng", "dtype", "reduction", "self"}:
            refuse(f"switch {flag!r} must be an identifier no param, option, rng, dtype or reduction takes")
        if not names or any(p not in params for p in names):
            refuse(f"switch {flag} must name params, got {names!r}")
    return {flag: (names,) if isinstance(names, str) else tuple(names) for flag, names in switches.items()}


def penalty_of(refuse, text, namespace, params, axes, known, formulas):
    """The penalty: a scalar (no free index) that reads params and options alone."""
    where = "penalty"
    expr = summed_out(refuse, where, parsed(where, str(text), namespace, refuse), known)
    for access in expr.atoms(sp.Indexed):
        if access.base.name not in params:
            refuse(f"penalty reads {access.base.name}; a penalty reads params and options alone")
        check_access(refuse, where, access, axes, {}, {}, formulas, known)
    free = expr.free_symbols & known
    if free:
        refuse(f"penalty: index {sorted(map(str, free))[0]} is free; a penalty is one number (Sum over it?)")
    if not reads_of(expr):
        refuse("penalty reads no param")
    return expr


def axes_of(refuse, array, spec, known=None, what="array"):
    """The index Symbols of "n k" (or "n, k" of a step's lhs), refusing repeated or unknown letters."""
    letters = [letter for letter in re.split(r"[\s,]+", spec.strip()) if letter] if isinstance(spec, str) else None
    if not letters or any(not re.fullmatch(r"[a-z]", letter) for letter in letters):
        refuse(f"{what} {array}: indices must be single lower-case letters, got {spec!r}")
    if len(set(letters)) < len(letters):
        refuse(f"{what} {array}: an index is repeated in {spec!r}")
    axes = tuple(sp.Symbol(letter, integer=True) for letter in letters)
    unknown = [str(i) for i in axes if known is not None and i not in known]
    if unknown:
        refuse(f"{what} {array}: index {unknown[0]} is no axis of an input, param or target; "
               f"declare its size {unknown[0].upper()} in sizes")
    return axes


def declared_sizes(refuse, sizes, size_symbols, data):
    """{index: formula} of the declared sizes, each over the axes' sizes and the sizes before it; a param's axis
    may have one (MultiheadAttention's head size D = E/H, which its constructor computes), an axis of the data
    (inputs, targets, weights, noise) not: its size is the array's."""
    formulas = {}
    for size, text in sizes.items():
        if not re.fullmatch(r"[A-Z]", size):
            refuse(f"size {size!r} is not a capital letter (the size of index {size.lower()!r})")
        index = sp.Symbol(size.lower(), integer=True)
        if index in data:
            refuse(f"size {size} is already the size of an axis of index {index}")
        namespace = {str(s): s for s in [*size_symbols, *map(size_of, formulas)] if s != size_of(index)}
        formulas[index] = parsed(f"size {size}", str(text), namespace, refuse)
    return formulas


def check_names(refuse, names, arrays):
    """Refuse a name declared twice, and one the language or the naming contract reserves."""
    seen = {}
    for name, role in names:
        if not name.isidentifier() or keyword.iskeyword(name):
            refuse(f"{role} is named {name!r}, which is not an identifier")
        if name in seen:
            refuse(f"{name} is both {seen[name]} and {role}")
        seen[name] = role
    from derive.declare import FUNCTIONS
    reserved = {"g", "Sum", *(f"g_{a}" for a in arrays), *(f"d{a}" for a in arrays), *FUNCTIONS}
    taken = [name for name, role in names if name in reserved and role not in ("an index", "a size")]
    if taken:
        refuse(f"the name {taken[0]} is reserved: Sum, the functions, g (the upstream gradient), g_<step> "
               f"and d<array> (adjoints)")


def parsed(where, text, namespace, refuse):
    """text as a SymPy expression over namespace and derive.declare.FUNCTIONS, any other name refused by name."""
    from derive.declare import FUNCTIONS
    try:
        tokens = [t.string for t in tokenize.generate_tokens(io.StringIO(text).readline)]
        unknown = [(at, word) for at, word in enumerate(tokens) if word.isidentifier() and word not in namespace
                   and word not in FUNCTIONS and word not in ("True", "False")]
        expr = None if unknown else parse_expr(text, local_dict={**FUNCTIONS, **namespace},
                                               global_dict=dict(PARSE_GLOBALS), transformations=(auto_number,))
    except (SyntaxError, TypeError, ValueError, tokenize.TokenError, AttributeError, IndexError) as error:
        refuse(f"{where}: cannot parse {text!r}: {error}")
    if unknown:
        at, word = unknown[0]
        what = {"[": "array", "(": "function"}.get(tokens[at + 1], "name")
        hint = f"; declare its size {word.upper()} in sizes if it is an index" if re.fullmatch("[a-z]", word) else ""
        known = f"; known: {', '.join(sorted(FUNCTIONS))}" if what == "function" else hint if what == "name" else ""
        refuse(f"{where}: unknown {what} {word} in {text!r}{known}")
    if not isinstance(expr, sp.Expr):
        refuse(f"{where}: {text!r} is not an expression")
    return expr


class Sum(sp.Sum):
    """sp.Sum as given. SymPy's constructor folds a Piecewise out of its body, even out of an inner Sum whose
    index the condition reads (Sum(g[n] Sum(Piecewise((t[n, k], t[n, k] > 0), ...), k), n) moves
    t[n, k] > 0 out of the sum over k). Nested Sums merge, as SymPy's do."""

    def __new__(cls, function, *limits):
        while isinstance(function, Sum):   # Sum(Sum(f, inner), outer) is Sum(f, inner, outer)
            function, limits = function.function, (*function.limits, *limits)
        total = sp.Expr.__new__(cls, sp.sympify(function), *(sp.Tuple(*limit) for limit in limits))
        total.is_commutative = total.function.is_commutative
        return total


class FirstMax(sp.Function):
    """FirstMax(e, u, v): 1 where e is largest over the step's indices u, v (the first such in their order, a
    NaN counting as largest, as PyTorch's max pooling picks its index), else 0. A mask, constant wherever it is
    defined: its derivative is 0, and a step that is one is no step of the derivation."""
    is_real = True

    def fdiff(self, argindex=1):
        return sp.S.Zero


class OverRanges(sp.Expr):
    """An expression of e over ranges (v, lo, hi), ..., as Sum is their total: a reduction codegen lowers
    (ArgFirstMax here, codegen.tensor_lower.Maximum)."""

    def __new__(cls, function, *limits):
        return sp.Expr.__new__(cls, sp.sympify(function), *(sp.Tuple(*limit) for limit in limits))

    @property
    def function(self):
        return self.args[0]

    @property
    def limits(self):
        return self.args[1:]

    @property
    def free_symbols(self):
        return self.function.free_symbols - {v for v, *_ in self.limits}


class ArgFirstMax(OverRanges):
    """ArgFirstMax(e, (v, lo, hi)): the v of the first largest e over the range (a NaN counting as largest, as
    np.argmax takes it), an integer array a kernel reads another array at (x[n, t, a[n, t]]). Constant wherever
    it is defined, as FirstMax: no step of the derivation reads it."""
    is_integer = True

    def _eval_derivative(self, s):
        return sp.S.Zero

    def _sympystr(self, printer):
        return f"ArgFirstMax({printer.doprint(self.function)}, {printer.doprint(self.args[1])})"


class Summed(sp.Function):
    """Sum(e, k, ...) as written, before summed_out makes it a sum over each index's range."""


def summed_out(refuse, where, expr, known):
    """expr with each Sum(e, k, j) as Sum(e, (k, 0, K - 1), (j, 0, J - 1))."""
    if isinstance(expr, Summed):
        body, *over = expr.args
        if not over or any(index not in known for index in over) or len(set(over)) < len(over):
            refuse(f"{where}: {sp.sstr(expr).replace('Summed', 'Sum')} must sum over distinct indices")
        return Sum(summed_out(refuse, where, body, known), *((i, 0, size_of(i) - 1) for i in over))
    if isinstance(expr, sp.Indexed) or not expr.args:
        return expr
    return expr.func(*(summed_out(refuse, where, arg, known) for arg in expr.args))


def unindexed(expr):
    """The arrays expr reads without indices."""
    if isinstance(expr, sp.IndexedBase):
        return {expr}
    args = expr.indices if isinstance(expr, sp.Indexed) else expr.args
    return set().union(*map(unindexed, args))


def check_access(refuse, where, access, axes, targets, labels, formulas, known):
    """Refuse an access of the wrong arity, or one whose index may leave its axis's range."""
    array = access.base.name
    if len(access.indices) != len(axes[array]):
        refuse(f"{where}: {access} has {len(access.indices)} indices, {array} has {len(axes[array])}")
    for index, axis in zip(access.indices, axes[array]):
        if isinstance(index, sp.Indexed):
            if index.base.name not in targets:
                refuse(f"{where}: {access} is indexed by {index}; only an integer target can index an axis")
            if labels.setdefault(index.base.name, size_of(axis)) != size_of(axis):
                refuse(f"{where}: target {index.base.name} indexes axes of different sizes")
            continue
        bounds = extremes(index, known)
        if bounds is None:
            refuse(f"{where}: index {index} of {array} is not a sum of indices, sizes and integers, "
                   f"each index once, nor an integer target")
        low, high = (in_base_sizes(bound, formulas) for bound in bounds)
        if not (low.is_nonnegative and (in_base_sizes(size_of(axis), formulas) - 1 - high).is_nonnegative):
            refuse(f"{where}: index {index} of {access} may leave 0..{size_of(axis) - 1}; declare the size of "
                   f"a shifted index in sizes")


def extremes(index, known):
    """(min, max) over the indices' ranges of a sum of indices (slopes 1 or -1), sizes and integers, else None."""
    low = high = index
    for i in index.free_symbols & known:
        if linear(index, i) is None:
            return None
        first, last = (0, size_of(i) - 1)[::linear(index, i)[0]]
        low, high = low.subs(i, first), high.subs(i, last)
    return None if index.has(sp.Indexed) or not low.free_symbols <= set(map(size_of, known)) else (low, high)


def linear(expr, v):
    """(slope, rest) where expr = slope v + rest, slope 1 or -1 and rest free of v; else None."""
    expr = sp.expand(expr)
    slope = expr.coeff(v)
    return (slope, expr - slope * v) if slope in (1, -1) and not (expr - slope * v).has(v) else None


def in_base_sizes(expr, formulas):
    """expr with each declared size replaced by its formula over the axes' sizes."""
    for size, formula in reversed(formulas.items()):
        expr = expr.subs(size, formula)
    return sp.expand(expr)


def fan_ins(steps, uniform):
    """{param: product of the sizes of the indices it is summed over in the first step reading it}; a param
    summed over none (a bias) takes that of the other params of its step, as PyTorch's bias takes its weight's."""
    found = {}
    for step in steps:
        read = [p for p in uniform if p not in found and p in reads_of(step.expr)]
        own = {p: sp.Mul(*map(size_of, sorted(summed_over(step.expr, p), key=str))) for p in read}
        shared = next((fan for fan in own.values() if fan != 1), sp.S.One)
        found.update({p: shared if fan == 1 else fan for p, fan in own.items()})
    return found


def summed_over(expr, array, bound=frozenset()):
    """The indices of the Sums around expr's accesses of array that those accesses read."""
    if isinstance(expr, sp.Sum):
        return summed_over(expr.function, array, bound | {v for v, *_ in expr.limits})
    if isinstance(expr, sp.Indexed):
        return set().union(*(i.free_symbols for i in expr.indices)) & bound if expr.base.name == array else set()
    return set().union(*(summed_over(arg, array, bound) for arg in expr.args))


# Derivation: reverse mode over the named steps


def derivation(op):
    """The TensorDerivation of op: each step's adjoint from the steps that read it, each VJP likewise."""
    differentiable = set(op.inputs) | set(op.params)
    for step in op.steps:
        if reads_of(step.expr) & differentiable and not isinstance(step.expr, FirstMax):
            differentiable.add(step.name)
    output = op.steps[-1].name
    readers = {name: [s for s in op.steps if name in reads_of(s.expr) and s.name in differentiable]
               for name in differentiable}
    contributions = {name: [vjp_term(op, step, name) for step in reversed(readers[name])] for name in differentiable}
    adjoints = tuple(Assignment(f"g_{step.name}", step.indices, sp.Add(*contributions[step.name]))
                     for step in reversed(op.steps[:-1]) if step.name in differentiable)
    gradients = {}
    for name in [*op.inputs, *op.params]:
        needed, frontier = set(), [s.name for s in readers[name]]
        while frontier:
            step = frontier.pop()
            if step != output and step not in needed:
                needed.add(step)
                frontier += [s.name for s in readers[step]]
        axes = op.inputs[name] if name in op.inputs else op.params[name][0]
        gradients[name] = tuple(a for a in adjoints if a.name[2:] in needed) + (
            Assignment(f"d{name}", axes, sp.Add(*contributions[name])),)
    return TensorDerivation(op, op.steps, adjoints, gradients, penalty_gradients(op))


def penalty_gradients(op):
    """(Assignment d<param> = dP/d param, ...) of each param the penalty P reads, its deltas contracted."""
    if op.penalty is None:
        return ()
    found = []
    for name, (axes, _) in op.params.items():
        if name in reads_of(op.penalty):
            at = tuple(sp.Dummy(str(i), integer=True) for i in axes)
            derivative = at_kinks(differentiated(op.penalty, sp.IndexedBase(name, real=True)[at]))
            ranges = {a: (0, size_of(i) - 1) for a, i in zip(at, axes)}
            found.append(Assignment(f"d{name}", axes, substituted(contracted(derivative, ranges, op.sizes),
                                                                  dict(zip(at, axes)))))
    return tuple(found)


def linear_in(expr, *arrays):
    """Whether expr reads one of arrays and is c times itself where each read of them is c times it, for every c
    (SymPy's proof): attention's scores Sum(Q[n, t, d] K[n, s, d], d)/sqrt(D) in Q; its softmax's adjoint
    (Z g_Z + g_P) P in g_Z and g_P together."""
    c = sp.Symbol("c", positive=True)
    scaled = expr.replace(lambda e: isinstance(e, sp.Indexed) and e.base.name in arrays, lambda e: c * e)
    return bool(reads_of(expr) & set(arrays)) and sp.simplify(sp.factor_terms(scaled - c * expr)) == 0


def reads_of(expr):
    """The names of the arrays expr reads."""
    return {access.base.name for access in expr.atoms(sp.Indexed)}


def vjp_term(op, step, name):
    """sum over step's indices of g_step * d step / d name[at], contracted, with at named name's own indices."""
    axes = op.inputs.get(name) or (op.params[name][0] if name in op.params else next(
        s.indices for s in op.steps if s.name == name))
    at = tuple(sp.Dummy(str(i), integer=True) for i in axes)
    adjoint = sp.IndexedBase("g" if step is op.steps[-1] else f"g_{step.name}", real=True)
    derivative = at_kinks(differentiated(step.expr, sp.IndexedBase(name, real=True)[at]))
    outer = tuple((i, 0, size_of(i) - 1) for i in reversed(step.indices))
    summed = shift_first(adjoint[step.indices] * derivative, outer)
    ranges = {a: (0, size_of(i) - 1) for a, i in zip(at, axes)}
    return in_terms_of_steps(substituted(contracted(summed, ranges, op.sizes), dict(zip(at, axes))), op.steps)


def shift_first(term, outer):
    """Sum(term, *outer), a Sum in term merged with it, outer innermost, where that Sum's delta pairs an outer
    index with one of its own (a convolution's x[n, c, i + a]: delta(h, i + a)): contracting the output's
    position i = h - a leaves the sum over the kernel's a, the transposed convolution as a window of A over
    g, not of I over the kernel (I A times the work)."""
    inner = [f for f in sp.Mul.make_args(term) if isinstance(f, Sum)]
    if len(inner) == 1:
        total, own = inner[0], {v for v, *_ in inner[0].limits}
        positions = {v for v, *_ in outer}
        shifted = any(d.free_symbols & own and d.free_symbols & positions
                      for d in total.function.atoms(sp.KroneckerDelta))
        if shifted and not any(limit.free_symbols & positions for _, *bounds in total.limits for limit in bounds):
            rest = sp.Mul(*(f for f in sp.Mul.make_args(term) if f is not total))
            return Sum(rest * total.function, *outer, *total.limits)
    return Sum(term, *outer)


def in_terms_of_steps(expr, steps):
    """expr with each Sum a step defines written as that step, also within a Sum of terms:
    Sum(2 mu[n] - 2 x[n, k], k) = 2 K mu[n] - 2 Sum(x[n, k], k) = 0 where mu[n] = Sum(x[n, k], k) / K."""
    def rewritten(total):
        variables = [v for v, *_ in total.limits]
        if any(bound.has(sp.Max, sp.Min) for limit in total.limits for bound in limit[1:]):
            return total
        parts = [term.as_independent(*variables, as_Add=False) for term in sp.Add.make_args(total.function)]
        parts = [(c, Sum(f, *total.limits) if f.has(*variables) else f * sp.Mul(
            *(hi - lo + 1 for _, lo, hi in total.limits))) for c, f in parts]
        defined = [(c, next(filter(None, (definition(f, step) for step in steps)), None)) for c, f in parts]
        if all(d is None for _, d in defined):
            return total
        return sp.Add(*(c * (f if d is None else d) for (c, f), (_, d) in zip(parts, defined)))
    return expr.replace(lambda e: isinstance(e, Sum), rewritten)


def definition(total, step):
    """step[...] if total is the Sum of step's rhs, c Sum(...), at some indices, divided by c; else None."""
    coefficient, defining = step.expr.as_independent(Sum, as_Add=False)
    if not (isinstance(total, Sum) and isinstance(defining, Sum)) or [l[1:] for l in total.limits] != [
            l[1:] for l in defining.limits]:
        return None
    bound = [v for v, *_ in defining.limits]
    if set(bound) & (total.function.free_symbols - {v for v, *_ in total.limits}):
        return None   # renaming total's indices to the definition's would capture a free index
    body = substituted(total.function, {v: w for (v, *_), w in zip(total.limits, bound)})
    wilds = {i: sp.Wild(f"{i}_", exclude=bound) for i in step.indices}
    match = body.match(defining.function.xreplace(wilds))
    if match is None or any(w not in match for w in wilds.values()):
        return None
    at = tuple(match[wilds[i]] for i in step.indices)
    return sp.IndexedBase(step.name, real=True)[at] / coefficient.xreplace(dict(zip(step.indices, at)))


def contracted(expr, ranges, sizes):
    """expr with each Kronecker delta in a Sum contracted: sum_v f(v) delta(v + a, b) = f(b - a) where
    lo <= b - a <= hi; the condition folds into an enclosing Sum's range when it bounds that Sum's index,
    is dropped when the ranges of the free indices prove it, and otherwise guards the term."""
    if isinstance(expr, sp.Sum):
        limits = expr.limits
        body = contracted(expr.function, {**ranges, **{v: (lo, hi) for v, lo, hi in limits}}, sizes)
        for depth, (v, lo, hi) in enumerate(limits):
            scope = {**ranges, **{w: (l, h) for w, l, h in limits[depth + 1:]}}
            body = sp.Add(*(summed_term(p, c, v, lo, hi, scope, sizes) for p, c in terms(body)))
        return body
    if isinstance(expr, (sp.Indexed, sp.IndexedBase)) or not expr.args:
        return expr
    return expr.func(*(contracted(arg, ranges, sizes) for arg in expr.args))


def terms(expr):
    """expr as [(product, conditions)], products distributed over the sums that hold a Kronecker delta or a
    Piecewise, a Piecewise that holds a delta or is a guard Piecewise((e, c), (0, True)) opened into its
    branches, each under its condition and the negations of the conditions before it."""
    if not expr.has(sp.KroneckerDelta, sp.Piecewise):
        return [(expr, ())]
    if isinstance(expr, sp.Add):
        return [term for arg in expr.args for term in terms(arg)]
    if isinstance(expr, sp.Mul):
        found = [(sp.S.One, ())]
        for factor in expr.args:
            found = [(p * q, c + d) for p, c in found for q, d in terms(factor)]
        return found
    if isinstance(expr, sp.Piecewise) and (expr.has(sp.KroneckerDelta) or expr.args[-1] == (0, True)):
        found, before = [], ()
        for value, condition in expr.args:
            found += [(p, c + before + tuple(sorted(sp.And.make_args(condition), key=sp.default_sort_key)))
                      for p, c in terms(value) if p != 0]
            before += (sp.Not(condition),)
        return found
    return [(expr, ())]


def summed_term(product, conditions, v, lo, hi, scope, sizes):
    """sum over v in lo..hi of product where conditions hold."""
    factors = sp.Mul.make_args(product)
    for factor in factors:
        value = solved(factor, v)
        if value is not None:
            rest = substituted(sp.Mul(*(f for f in factors if f is not factor)), {v: value})
            return guarded(rest, [substituted(c, {v: value}) for c in conditions] + [
                sp.Le(lo, value), sp.Le(value, hi)], scope, sizes)
    inside = [c for c in conditions if v in c.free_symbols]
    outside = [c for c in conditions if v not in c.free_symbols]
    limits, inside = folded(inside, v, lo, hi, scope, sizes)
    varying = sp.Mul(*(f for f in factors if v in f.free_symbols))
    constant = sp.Mul(*(f for f in factors if v not in f.free_symbols))
    whole = varying == 1 and not inside and limits == (lo, hi)
    body = hi - lo + 1 if whole else Sum(guarded(varying, inside, {**scope, v: limits}, sizes), (v, *limits))
    return guarded(constant * body, outside, scope, sizes)


def solved(factor, v):
    """e if factor is a Kronecker delta that holds where v = e, v read linearly (slope 1 or -1); else None."""
    found = linear(factor.args[0] - factor.args[1], v) if isinstance(factor, sp.KroneckerDelta) else None
    return None if found is None else -found[1] * found[0]


def bound_of(condition, v):
    """("lo", e) if condition says v >= e, ("hi", e) if it says v <= e, e free of v; else None."""
    if not isinstance(condition, (sp.LessThan, sp.GreaterThan)) or condition.has(sp.Indexed):
        return None
    found = linear(condition.gts - condition.lts, v)   # slope v + rest >= 0
    return None if found is None else ("lo", -found[1]) if found[0] == 1 else ("hi", found[1])


def folded(conditions, v, lo, hi, scope, sizes):
    """((lo, hi) narrowed by the conditions that bound v, the other conditions)."""
    kept = []
    for condition in conditions:
        side, bound = bound_of(condition, v) or (None, None)
        if side == "lo":
            lo = lo if provable(bound, lo, scope, sizes) else bound if provable(lo, bound, scope, sizes) else sp.Max(
                lo, bound)
        elif side == "hi":
            hi = hi if provable(hi, bound, scope, sizes) else bound if provable(bound, hi, scope, sizes) else sp.Min(
                hi, bound)
        else:
            kept.append(condition)
    return (sp.expand(lo), sp.expand(hi)), kept


def guarded(expr, conditions, scope, sizes):
    """Piecewise((expr, conditions), (0, True)) without the conditions that scope's ranges prove."""
    open_ = []
    for condition in dict.fromkeys(conditions):
        if condition is sp.false:
            return sp.S.Zero
        if condition is not sp.true and not (isinstance(condition, (sp.LessThan, sp.GreaterThan)) and provable(
                condition.lts, condition.gts, scope, sizes)):
            open_.append(isolated(condition, scope))
    return sp.Piecewise((expr, sp.And(*open_)), (0, True)) if open_ and expr != 0 else expr


def isolated(condition, scope):
    """condition solved for the one index of scope it reads, if it bounds it: 0 <= k - H as H <= k."""
    inside = [s for s in condition.free_symbols if s in scope]
    side, bound = bound_of(condition, inside[0]) if len(inside) == 1 and bound_of(condition, inside[0]) else (0, 0)
    return sp.Le(bound, inside[0]) if side == "lo" else sp.Le(inside[0], bound) if side == "hi" else condition


def provable(lesser, greater, scope, sizes):
    """Whether lesser <= greater for every value of the indices in scope, each in its (lo, hi)."""
    gap = sp.expand(greater - lesser)
    for _ in range(len(scope) + 1):   # a bound may read an outer index: substitute again
        inside = [s for s in gap.free_symbols if s in scope]
        if not inside:
            return bool(in_base_sizes(gap, sizes).is_nonnegative)
        for s in inside:
            if linear(gap, s) is None:
                return False
            gap = sp.expand(gap.subs(s, scope[s][0] if linear(gap, s)[0] > 0 else scope[s][1]))
    return False


def substituted(expr, mapping):
    """expr with mapping's free symbols replaced: a Sum over one of them left alone, and a Sum whose index
    a replacement reads renamed first (k to k'), so that nothing is captured."""
    if isinstance(expr, sp.Symbol):
        return mapping.get(expr, expr)
    if isinstance(expr, sp.IndexedBase) or not expr.args:
        return expr
    if isinstance(expr, sp.Indexed):
        return expr.base[tuple(substituted(i, mapping) for i in expr.indices)]
    if not isinstance(expr, sp.Sum):
        return expr.func(*(substituted(arg, mapping) for arg in expr.args))
    variables = [v for v, *_ in expr.limits]
    inner = {old: new for old, new in mapping.items() if old not in variables}
    reads = set().union(*(sp.sympify(new).free_symbols for new in inner.values()))
    taken = reads | expr.free_symbols | set(variables)
    renamed = {v: next(fresh for n in itertools.count(1) if (fresh := sp.Symbol(f"{v.name}{chr(39) * n}",
                                                                                integer=True)) not in taken)
               for v in variables if v in reads}
    limits = [(renamed.get(v, v), substituted(lo, mapping), substituted(hi, mapping)) for v, lo, hi in expr.limits]
    return Sum(substituted(expr.function, {**inner, **renamed}), *limits)


# The numeric check: explicit sizes, float64 loops, central differences

def logistic(u):
    """1 / (1 + e^-u), by the exponential of -|u| (which cannot overflow)."""
    small = math.exp(-abs(u))
    return 1 / (1 + small) if u >= 0 else small / (1 + small)


OPERATIONS = {sp.Add: lambda *terms: sum(terms), sp.Mul: lambda *factors: math.prod(factors), sp.Pow: operator.pow,
              sp.And: lambda *holds: all(holds), sp.Or: lambda *holds: any(holds), sp.Not: operator.not_,
              sp.StrictLessThan: operator.lt, sp.LessThan: operator.le, sp.StrictGreaterThan: operator.gt,
              sp.GreaterThan: operator.ge, sp.Equality: operator.eq, sp.Unequality: operator.ne,
              sp.exp: math.exp, sp.log: math.log, sp.tanh: math.tanh, sp.sinh: math.sinh, sp.cosh: math.cosh,
              sp.atan: math.atan, sp.erf: math.erf, sp.Abs: abs, sp.Max: max, sp.Min: min,
              sp.sign: lambda u: float(u > 0) - float(u < 0), sigmoid: logistic,
              sp.Heaviside: lambda u, at_zero=0.5: 1.0 if u > 0 else at_zero if u == 0 else 0.0,
              sp.KroneckerDelta: lambda a, b: float(a == b)}


@functools.lru_cache(maxsize=None)
def compiled(expr):
    """A function (arrays, scope) -> the value of expr: arrays by name, symbols' values in scope. Only the
    chosen branch of a Piecewise is evaluated, and an access outside its array raises IndexError."""
    if isinstance(expr, sp.Indexed):
        return read_of(expr)
    if isinstance(expr, sp.Sum):
        return sum_of(expr)
    if isinstance(expr, FirstMax):
        return first_max_of(expr)
    if isinstance(expr, ArgFirstMax):
        return arg_first_max_of(expr)
    if isinstance(expr, sp.Piecewise):
        branches = [(compiled(value), compiled(condition)) for value, condition in expr.args]
        return lambda arrays, scope: next(value(arrays, scope) for value, holds in branches if holds(arrays, scope))
    if isinstance(expr, sp.Symbol):
        return lambda arrays, scope: scope[expr]
    if not expr.args:   # an index's integers stay integers
        value = bool(expr) if expr in (sp.true, sp.false) else int(expr) if expr.is_Integer else float(expr)
        return lambda arrays, scope: value
    if expr.func not in OPERATIONS:
        raise TypeError(f"cannot evaluate {type(expr).__name__}: {expr}")
    operation, args = OPERATIONS[expr.func], [compiled(arg) for arg in expr.args]
    return lambda arrays, scope: operation(*(arg(arrays, scope) for arg in args))


def first_max_of(mask):
    """The evaluator of FirstMax(e, u, v): e at every u, v of their ranges in order, 1 at the first largest (a NaN
    the largest, as np.argmax takes it), else 0."""
    body, *over = mask.args
    value = compiled(body)

    def first_max(arrays, scope):
        points = list(itertools.product(*(range(scope[size_of(v)]) for v in over)))
        values = [value(arrays, {**scope, **dict(zip(over, point))}) for point in points]
        return float(points[int(np.argmax(values))] == tuple(scope[v] for v in over))
    return first_max


def arg_first_max_of(position):
    """The evaluator of ArgFirstMax(e, (v, lo, hi)): the first v of the range where e is largest (a NaN the
    largest, as np.argmax takes it)."""
    v, lo, hi = position.args[1]
    value, low, high = compiled(position.function), compiled(lo), compiled(hi)

    def arg_first_max(arrays, scope):
        start = int(low(arrays, scope))
        values = [value(arrays, {**scope, v: at}) for at in range(start, int(high(arrays, scope)) + 1)]
        return start + int(np.argmax(values))
    return arg_first_max


def read_of(access):
    """The reader of one array entry, refusing an index outside the array (NumPy would wrap a negative one)."""
    name, indices = access.base.name, [compiled(i) for i in access.indices]

    def read(arrays, scope):
        at = tuple(int(index(arrays, scope)) for index in indices)
        if any(not 0 <= i < n for i, n in zip(at, arrays[name].shape)):
            raise IndexError(f"{access} reads {name}{list(at)}, outside its shape {arrays[name].shape}")
        return arrays[name][at]
    return read


def sum_of(total):
    """The evaluator of a Sum, its last limit outermost; lo > hi is an empty range."""
    body, limits = compiled(total.function), [(v, compiled(lo), compiled(hi)) for v, lo, hi in total.limits]

    def summed(arrays, scope, depth=len(limits) - 1):
        if depth < 0:
            return body(arrays, scope)
        v, lo, hi = limits[depth]
        return sum(summed(arrays, {**scope, v: value}, depth - 1)
                   for value in range(int(lo(arrays, scope)), int(hi(arrays, scope)) + 1))
    return summed


def explicit_sizes(op, given):
    """{size Symbol: int} of the given sizes and op's formulas, each a positive integer."""
    scope = {sp.Symbol(name, integer=True, positive=True): value for name, value in given.items()}
    for size, formula in op.sizes.items():
        value = formula.subs(scope)
        if not (value.is_Integer and value > 0):
            raise ValueError(f"{op.name}: size {size} = {formula} is {value} at {given}, not a positive integer")
        scope[size] = int(value)
    return scope


def check_sizes(op, smallest=3, largest=None):
    """{size: int} for the checks (and codegen's einsum paths): small distinct sizes of the axes, from smallest up,
    for which every declared size is a positive integer (GLU's K even, Conv1d's L at least J); with largest,
    none above it, distinct where they can be (a step over Conv2d's seven axes at 2..8 takes minutes)."""
    base = list(dict.fromkeys(size_of(i) for axes in [*op.inputs.values(), *(a for a, _ in op.params.values()),
                                                       *op.targets.values()] for i in axes
                              if size_of(i) not in op.sizes))
    base += [sp.Symbol(s, integer=True, positive=True) for s in op.given_sizes]
    base += [s for s in dict.fromkeys(op.labels.values()) if s not in base]
    candidates = itertools.chain(itertools.permutations(range(smallest, len(base) + smallest + 3), len(base)),
                                 itertools.product(range(1, 9), repeat=len(base)))
    if largest is not None:   # sizes up to largest: no declared size 1 (a window over the whole axis) where that
        found = []            # can be, as many distinct as can be, the smallest product first
        for values in itertools.product(range(smallest, largest + 1), repeat=len(base)):
            try:
                scope = explicit_sizes(op, {str(s): v for s, v in zip(base, values)})
            except ValueError:
                continue
            found.append(((sum(scope[s] == 1 for s in op.sizes), -len(set(values)), math.prod(values)), scope))
        if found:
            return min(found, key=lambda pair: pair[0])[1]
    for values in candidates:
        try:
            return explicit_sizes(op, {str(s): v for s, v in zip(base, values)})
        except ValueError:
            continue
    raise ValueError(f"{op.name}: no sizes up to 8 make every declared size a positive integer")


def evaluated(assignments, arrays, scope):
    """arrays with each assignment computed, in order, for every value of its indices."""
    for assignment in assignments:
        value, shape = compiled(assignment.expr), tuple(scope[size_of(i)] for i in assignment.indices)
        result = np.empty(shape)
        for at in np.ndindex(shape):
            result[at] = value(arrays, {**scope, **dict(zip(assignment.indices, at))})
        arrays = {**arrays, assignment.name: result}
    return arrays


def random_arrays(op, scope, rng):
    """Inputs and params uniform in op.domain, labels random classes, dense targets in 0..1, weights in 0.5..2,
    noise in 0..2, given arrays in 0.5..2, g in -1..1."""
    def shape(axes):
        return tuple(scope[size_of(i)] for i in axes)
    arrays = {name: rng.uniform(*op.domain, shape(axes)) for name, axes in
              [*op.inputs.items(), *((p, axes) for p, (axes, _) in op.params.items())]}
    arrays |= {t: rng.integers(0, scope[op.labels[t]], shape(axes)) if t in op.labels else
               rng.uniform(0, 1, shape(axes)) for t, axes in op.targets.items()}
    arrays |= {w: rng.uniform(0.5, 2.0, shape(axes)) for w, axes in (op.weights or {}).items()}
    arrays |= {z: rng.uniform(0.0, 2.0, shape(axes)) for z, (axes, _, _) in (op.noise or {}).items()}
    arrays |= {a: rng.uniform(0.5, 2.0, shape(axes)) for a, axes in (op.given or {}).items()}
    return arrays | {"g": rng.uniform(-1, 1, shape(op.steps[-1].indices))}


def check_derivation_numerically(op, derivation, sizes, seed=0, values=None, step=1e-6):
    """(GradientCheck, ...) of every VJP of derivation at the explicit sizes, against central differences of
    sum(g * output); inputs and params random in op.domain, labels random classes, dense targets in 0..1,
    unless values gives them."""
    rng = np.random.default_rng(seed)
    scope = {**explicit_sizes(op, sizes), **{sp.Symbol(o, real=True): v for o, v in op.options.items()}}
    arrays = random_arrays(op, scope, rng) | (values or {})
    forward = evaluated(op.steps, arrays, scope)
    output = op.steps[-1].name

    def objective(name, at, shift):
        moved = arrays[name].copy()
        moved[at] += shift
        return float(np.sum(arrays["g"] * evaluated(op.steps, {**arrays, name: moved}, scope)[output]))

    checks = []
    for name, program in derivation.gradients.items():
        analytic = evaluated(program, forward, scope)[program[-1].name]
        numeric = np.zeros_like(arrays[name])
        for at in np.ndindex(numeric.shape):
            numeric[at] = (objective(name, at, step) - objective(name, at, -step)) / (2 * step)
        scale = max(np.max(np.abs(numeric)), np.max(np.abs(analytic)), 1e-300)
        checks.append(GradientCheck(name, analytic, numeric, float(np.max(np.abs(analytic - numeric)) / scale)))
    return tuple(checks)


def scale_degrees(op):
    """{array: k} of every forward step and gradient assignment of op, which its declared scaling ({input or option:
    degree}) multiplies by c^k for any c > 0, each proven by SymPy: the expression with each array it reads times
    c to that array's k, and each option times c to its degree, simplifies to c^k times itself (a mean's k is 1,
    a variance's 2, the output's must be 0: y(c x; c^2 eps) = y(x; eps), so dx(x) = c dx(c x; c^2 eps) where x's
    degree is 1). The ValueError names the first assignment that is not so."""
    c = sp.Symbol("c", positive=True)
    options = {sp.Symbol(o, real=True): c ** d * sp.Symbol(o, real=True) for o, d in op.scaling.items()
               if o in op.options}
    degrees = {**{p: 0 for p in op.params}, **{t: 0 for t in op.targets}, "g": 0,
               **{v: d for v, d in op.scaling.items() if v in op.inputs}}
    for a in (*op.steps, *dict.fromkeys(a for program in derivation(op).gradients.values() for a in program)):
        scaled = a.expr.replace(lambda e: isinstance(e, sp.Indexed) and e.base.name in degrees,
                                lambda e: c ** degrees[e.base.name] * e).xreplace(options)
        ratio = sp.simplify(sp.factor_terms(scaled) / a.expr) if a.expr != 0 else sp.Integer(1)
        k = sp.simplify(sp.expand_log(sp.log(ratio))) / sp.log(c) if ratio.free_symbols <= {c} else None
        if k is None or not sp.simplify(k).is_integer:
            raise ValueError(f"{op.name}: {a.name} is not c^k times itself under the scaling {op.scaling} "
                             f"(scaled over plain: {sp.sstr(ratio)})")
        degrees[a.name] = int(sp.simplify(k))
    if degrees[op.steps[-1].name]:
        raise ValueError(f"{op.name}: its output {op.steps[-1].name} is c^{degrees[op.steps[-1].name]} times itself "
                         f"under the scaling {op.scaling}, not unchanged")
    return degrees


def unit_rows(op):
    """The indices of op's rows in units (a LayerNorm's n, a BatchNorm's channel c): those of its statistics, the
    steps its scaling multiplies (scale_degrees) that read fewer indices than its output."""
    degrees = scale_degrees(op)
    found = {s.indices for s in op.steps[:-1] if degrees[s.name] and len(s.indices) < len(op.steps[-1].indices)}
    if len(found) != 1:
        raise ValueError(f"{op.name}: its scaled statistics are over {sorted(map(str, found))}, not one set of indices")
    return found.pop()


def in_units(op):
    """op with each option its scaling multiplies (eps) an array over unit_rows, given: the kernels that compute
    rows in units of c, a power of two per row, with c^2 eps (y(x; eps) = y(c x; c^2 eps), scale_degrees)."""
    rows = unit_rows(op)
    arrays = {o: sp.IndexedBase(o, real=True)[rows] for o in op.scaling if o in op.options}
    symbols = {sp.Symbol(o, real=True): a for o, a in arrays.items()}
    return dataclasses.replace(op, steps=tuple(s._replace(expr=s.expr.xreplace(symbols)) for s in op.steps),
                               options={o: v for o, v in op.options.items() if o not in arrays},
                               ranges={o: r for o, r in op.ranges.items() if o not in arrays},
                               dtype_eps=tuple(o for o in op.dtype_eps if o not in arrays),
                               given={**(op.given or {}), **{o: rows for o in arrays}}, scaling={})


def isolated_entry(op):
    """op's dx at one entry of a row (unit_rows) alone far from the others, without the cancellation of its
    derived dx there, as steps over the arrays x, g, the mask others (0 at that entry, 1 elsewhere) and eps
    per row (in units, as in_units'), or None for an op that is no normalisation of its input over a row.
    With m' and d_j = x_j - m' the others' mean and deviations (m' two-pass, so that sum d_j is 0 to the
    rounding of the d_j), E = m' - x_o, n = M - 1 and h = g p (gamma g, output_param):
        centred (a mean step, LayerNorm, BatchNorm):
            dx_o M sigma^3 = (sum d_j^2/M + eps)(M h_o - sum h_j) + (n/M) E sum d_j h_j
        uncentred (a mean of squares, RMSNorm):
            dx_o M r^3 = h_o (sum_{j != o} x_j^2 + M eps) - x_o sum_{j != o} h_j x_j
    its terms far smaller than the derived form's where x_o^2 is near its bound (M - 1 or M times the
    variance): the derived form is their difference, rounded to an ulp of h_o. Its output y is the whole row:
    the others' dx too, whose derived form takes h_o times -(1 + x_hat_i x_hat_o) (centred), 0 to the others'
    spread against E, from two terms of |h_o|/M; here with H' = sum_{j != o} h_j
            dx_i M sigma^3 = (S/M + eps)(M h_i - H' - h_o) - d_i D - (E/M)(d_i (H' - n h_o) + D) + (E^2/M)(n h_i - H')
            dx_i M r^3 = h_i (sum_{j != o} x_j^2 + x_o^2 + M eps) - x_i (sum_{j != o} h_j x_j + h_o x_o)
    isolated_entry_difference proves each entry equal to the derived dx."""
    if not op.scaling or len(op.inputs) != 1:
        return None
    (x_name, entries), = op.inputs.items()
    rows = unit_rows(op)
    summed = tuple(i for i in entries if i not in rows)
    M = sp.Mul(*map(size_of, summed))
    limits = [(i, 0, size_of(i) - 1) for i in summed]
    param = output_param(op)
    if param is None:
        return None
    x, g, w = (sp.IndexedBase(a, real=True)[entries] for a in (x_name, "g", "others"))
    eps_name, = (o for o, d in op.scaling.items() if o in op.options and d == 2)
    eps = sp.IndexedBase(eps_name, real=True)[rows]
    statistics = [s.expr for s in op.steps[:-1]]
    centred = Sum(x, *limits) / M in statistics
    if not centred and Sum(x ** 2, *limits) / M not in statistics:
        return None
    step = {}

    def define(name, expr, indices=rows):
        step[name] = Assignment(name, indices, expr)
        return sp.IndexedBase(name, real=True)[indices]

    h = define("gh", g * param, entries)
    x_o = define("x_o", Sum((1 - w) * x, *limits))   # the one entry w leaves out, exactly: the others add zeros
    h_o = define("gh_o", Sum((1 - w) * h, *limits))
    if centred:
        m0 = define("mean_0", Sum(w * x, *limits) / (M - 1))
        m = define("mean", m0 + Sum(w * (x - m0), *limits) / (M - 1))
        d = define("dev", w * (x - m), entries)
        S, D, H = (define(n, Sum(e, *limits)) for n, e in (("dev_sq", d ** 2), ("dev_gh", d * h), ("gh_sum", h)))
        H_others = define("gh_others", Sum(w * h, *limits))
        E = define("gap", m - x_o)
        n = M - 1
        cubed = M * (S / M + n * E ** 2 / M ** 2 + eps) ** sp.Rational(3, 2)
        value = ((S / M + eps) * (M * h_o - H) + n / M * E * D) / cubed
        # every other entry i of the row: h_o's coefficient -(1 + x_hat_i x_hat_o), 0 to the rounding of the
        # others' spread against E, is (S/M + eps - n E d_i/M)/sigma^2 here, without its two terms of |h_o|/M
        rest = ((S / M + eps) * (M * h - H_others - h_o) - d * D - E / M * (d * (H_others - n * h_o) + D)
                + E ** 2 / M * (n * h - H_others)) / cubed
    else:
        S, D = (define(n, Sum(e, *limits)) for n, e in (("others_sq", w * x ** 2), ("others_gh", w * h * x)))
        cubed = M * ((S + x_o ** 2) / M + eps) ** sp.Rational(3, 2)
        value = (h_o * (S + M * eps) - x_o * D) / cubed
        rest = (h * (S + x_o ** 2 + M * eps) - x * (D + h_o * x_o)) / cubed
    given = {"others": entries, "g": entries, eps_name: rows}
    row = Assignment("y", entries, (1 - w) * value + w * rest)   # the whole row: its entry o and the others
    return dataclasses.replace(op, steps=(*step.values(), row), inputs={x_name: entries},
                               options={o: v for o, v in op.options.items() if o != eps_name},
                               ranges={}, dtype_eps=(), given=given, scaling={}, running={}, switches={},
                               noise={}, flags={}, penalty=None, name=f"{op.name}_isolated")


def output_param(op):
    """The param p of op's output y = f p + (terms without f) (LayerNorm's gamma[k]: y's derivative in f), or None."""
    def params_of(term):
        return [f for f in sp.Mul.make_args(term) if isinstance(f, sp.Indexed) and f.base.name in op.params]
    scaled = [term for term in sp.Add.make_args(op.steps[-1].expr) if params_of(term) and reads_of(term) - set(op.params)]
    return params_of(scaled[0])[0] if len(scaled) == 1 and len(params_of(scaled[0])) == 1 else None


def isolated_bound(op):
    """The square x_hat_o^2 of an entry beyond which the derived dx_o loses more than a few ulps to its
    cancellation (about (bound of x_hat^2) / (bound - x_hat_o^2) of them): half its bound, M - 1 for a centred
    row (Samuelson's inequality), M for an uncentred one."""
    exact = isolated_entry(op)
    M = sp.Mul(*(size_of(i) for i in op.steps[-1].indices if i not in unit_rows(op)))
    return (M - int("mean" in {s.name for s in exact.steps})) / 2   # the others' mean: centred


def isolated_entry_difference(op, sizes, entry, at=None):
    """isolated_entry(op)'s dx minus the derived dx at entry at (default o; a tuple over the summed indices, in
    row 0) of the row whose entry o is isolated, at concrete sizes {size Symbol: int}, every Sum written out and
    every step by its value: 0 where SymPy proves them equal (eps > 0)."""
    exact, rows = isolated_entry(op), unit_rows(op)
    entries = op.steps[-1].indices
    summed = [i for i in entries if i not in rows]
    eps = sp.Symbol(next(o for o in op.scaling if o in op.options), positive=True)
    x_name = next(iter(op.inputs))
    steps = {s.name: s for s in (*op.steps[:-1], *derivation(op).gradients[x_name], *exact.steps)}

    def read(access):
        """An access at integer indices: a step's value there, the mask, eps, or a symbol of its own."""
        name = access.base.name
        if name == "others":
            return sp.Integer(tuple(int(i) for i, a in zip(access.indices, entries) if a in summed) != entry)
        if name == eps.name:
            return eps
        if name in steps:
            return written_out(steps[name].expr.xreplace(dict(zip(steps[name].indices, access.indices))))
        return sp.Symbol(f"{name}_{'_'.join(map(str, access.indices))}", real=True)

    def written_out(expr):
        expr = expr.xreplace(sizes).xreplace({sp.Symbol(eps.name, real=True): eps})
        expr = expr.replace(lambda e: isinstance(e, sp.Sum), lambda e: sp.Sum(e.function, *e.limits).doit())
        return expr.replace(lambda e: isinstance(e, sp.Indexed) and all(i.is_Integer for i in e.indices), read)

    at = entry if at is None else at
    point = dict(zip(entries, (at[summed.index(i)] if i in summed else 0 for i in entries)))
    difference = (written_out(exact.steps[-1].expr.xreplace(point))
                  - written_out(steps[f"d{x_name}"].expr.xreplace(point)))
    # each root's radicand in one canonical form (the variance is written two ways), then the rational rest
    return sp.simplify(difference.replace(lambda e: e.is_Pow and e.exp.is_Rational and e.exp.q == 2,
                                          lambda e: sp.Pow(sp.factor(sp.expand(e.base)), e.exp)))
