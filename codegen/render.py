"""Rendering the generated package: every file's text, from the catalog and the templates."""
import copy
import hashlib
import re
from pathlib import Path

import jinja2
import sympy as sp

from codegen.fused import FASTMATH, FusionError, fused_code, runtime_functions
from codegen.kernels import (erf_kernel, erfc_kernel, kernel_code, layer_kernels, loss_kernels, reductions,
                             sgd_kernel, with_gradient, adam_kernel, MEAN, WITH_DX)
from codegen.printer import print_code, range_arguments
from codegen.stages import in_stage
from codegen.tensor_fused import fast_context as tensor_fast_context
from codegen.tensor_lower import module_context
from derive.gradients import flag_settings, variants
from derive.tensor import TensorOp

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "templates"
# Everything whose change can change a generated file; its digest goes in every header.
GENERATOR = ("derive/*.py", "codegen/lower.py", "codegen/printer.py", "codegen/kernels.py", "codegen/inplace.py",
             "codegen/bounds.py",
             "codegen/fused.py", "codegen/render.py", "codegen/tensor_lower.py", "codegen/tensor_fused.py",
             "templates/*.jinja")
# The derivations printed for readers (symgrad derive, make docs) never reach a generated file; nor does the
# registry's file itself: each entry is in its own files' digests (their context holds it), so that a changed
# entry changes its own files alone, and make codegen derives that operation alone.
NOT_GENERATOR = ("derive/derivation*.py", "derive/catalog.py")
CATALOG_SOURCE = "derive/catalog.py"
# Loss targets: how forward recognises each kind, and how it checks and prepares it.
# A 1-d target of a row loss is labels whatever its dtype, so that float labels get label_column's error.
KIND_TESTS = {"labels": 'target.dtype.kind in "iu" or target.ndim == 1', "dense": 'target.dtype.kind == "f"'}
# How the layer and loss templates print kernels: NumPy ones in generated/, fused numba ones in generated/fast/
# (importing the package and its checks from the folder above).
NUMPY = {"kernels": "kernel.py.jinja", "package": ".", "fallback": None, "runtime": []}
FAST = "fast"
# checks of _checks that generated/fast/_runtime.py has a compiled form of
FAST_CHECKS = {"dense_target"}
# the labels' flat positions, remade from the label column c once ignored labels are replaced (label_column
# gives them, as at, only when no label is ignored)
POSITIONS = "at = label_positions(c, x)"
RELABEL = "kept_labels("
TARGET_DOCS = {"labels": "integer class labels of shape (N,)", "dense": "a float array of x's shape"}


def environment():
    """The Jinja environment: strict about undefined names, no stray blank lines."""
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), undefined=jinja2.StrictUndefined,
                              trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                              autoescape=False)


def generator_digest():
    """sha256 of the generator's own files, so a header changes whenever they do."""
    digest = hashlib.sha256()
    for pattern in GENERATOR:
        for path in sorted(set(ROOT.glob(pattern)) - {path for other in NOT_GENERATOR for path in ROOT.glob(other)}):
            digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def inputs_digest(*parts):
    """sha256 over the text of every input of one file, shortened for the header."""
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def render(env, template, source, generator, context):
    """One file's text from template and context, with the do-not-edit header."""
    digest = inputs_digest(template, repr(context), generator)
    return env.get_template(template).render(source=source, template=f"templates/{template}",
                                             digest=digest, **context)


def param_context(param):
    """A constructor option as the templates use it: the _checks function that checks it in __init__ and
    that function's arguments after the class's name (the option's name, its value, what it accepts)."""
    checks = {"scalar": ("option", range_arguments(param.range)), "class_weights": ("weights", ["ndim=1"]),
              "element_weights": ("weights", []), "ignore_index": ("option", ["integer=True"]), "flag": ("flag", [])}
    check, accepted = checks[param.kind]
    return {"name": param.name, "default": repr(param.default), "check": check,
            "arguments": [f'"{param.name}"', param.name, *accepted]}



def with_calls(code, op):
    """A kernel's code plus how a class passes each argument: options from self, arrays by name."""
    sources = {param.symbol.name: f"self.{param.name}" for param in op.params if param.kind == "scalar"}
    arrays = [arg for arg in code["args"] if "=" not in arg]  # out=None is the caller's choice
    call = [sources.get(arg, arg) for arg in arrays]
    saved = [(arg, sources.get(arg, arg)) for arg in arrays if arg != "g"]
    # a backward's arguments around g: what forward saves for it, in order
    split = arrays.index("g") if "g" in arrays else len(arrays)
    # a forward that can sum the losses as it goes does so when the reduction reads only their total
    summed = ['self.reduction != "none"'] if "summed=False" in code["args"] else []
    return dict(code, call=call + summed, saved=saved, names=arrays, before=call[:split], after=call[split + 1:])


def neutral_tests(op, target, unignored="at is not None"):
    """Python tests that every option is at its neutral value; unignored is the test that no label is
    ignored."""
    tests = {"scalar": lambda p: f"self.{p.name} == {print_code(p.neutral)}",
             "class_weights": lambda p: f"self.{p.name} is None",
             "element_weights": lambda p: f"self.{p.name} is None",
             "ignore_index": lambda p: unignored}
    return [tests[p.kind](p) for p in op.params
            if p.neutral is not None and (p.kind != "ignore_index" or target == "labels")]


def common_condition(op):
    """When forward's common case applies to integer labels that are all classes: a mean, every option
    neutral, every flag at its default, and an ignore_index that no class can equal (Python source, a line per
    test)."""
    ignore = " and ".join(f"not 0 <= self.{p.name} < x.shape[1]" for p in op.params if p.kind == "ignore_index")
    return ['self.reduction == "mean"'] + neutral_tests(op, "labels", unignored=ignore) + flag_tests(op, "")


def flag_tests(op, suffix):
    """Python tests that the class's flags are at the setting whose variants' suffix is suffix (none without flags)."""
    return [f"self.{name}" if value else f"not self.{name}" for name, value in flag_settings(op)[suffix].items()]


def general_preparation(op, target):
    """Lines that turn the options into the general kernel's arrays."""
    lines = {"class_weights": lambda p: f"{p.symbol.name} = class_weights(self.{p.name}, x, \"{p.name}\")",
             "element_weights": lambda p: f"{p.symbol.name} = element_weights(self.{p.name}, x, \"{p.name}\")",
             "ignore_index": lambda p: f"c, {p.symbol.name} = kept_labels(c, self.{p.name}, x.dtype)"}
    return [lines[p.kind](p) for p in op.params if p.kind in lines
            and (p.kind != "ignore_index" or target == "labels")]


def positions(prepare, *codes):
    """The line remaking the labels' flat positions after the lines prepare replaced ignored labels, when a
    kernel of codes reads them."""
    relabeled = any(RELABEL in line for line in prepare)
    return [POSITIONS] if relabeled and any("at" in code["call"] for code in codes) else []


def checks_called(lines, paths):
    """The _checks functions that lines and the paths' preparations call."""
    return sorted({line.split(" = ")[1].split("(")[0] for line in lines + [line for path in paths for line in path["prepare"]]})


def target_lines(op, prepare):
    """The lines forward checks and prepares its targets with: prepare's, and the common case's positions."""
    return [prepare[t] for t in op.targets] + ([POSITIONS] if "labels" in op.targets else [])


def loss_context(op):
    """Paths through a loss's forward: per target kind, the plain kernel then the general one."""
    by_target = []
    for target in op.targets:
        paths = []
        for variant in variants(op, target):
            forward, backward = (with_calls(kernel_code(k), op) for k in loss_kernels(op, target, variant))
            general, _, suffix = variant.partition("_")
            general = general == "general"
            # what forward made for backward alone (never the caller's arrays) backward may overwrite
            made = [name for name in forward["returns"] if name in backward["args"]]
            donor = made[0] if made and "out=None" in backward["args"] else None
            prepare = general_preparation(op, target) if general else []
            # the plain labels path is also forward's common case, taken first with as few Python operations as it
            # takes: at (64, 10) those are most of a call
            common = common_condition(op) if target == "labels" and not general else None
            paths.append({"forward": forward, "backward": backward, "donor": donor, "with_dx": None, "common": common,
                          "condition": " and ".join(flag_tests(op, suffix) + (
                              [] if general else neutral_tests(op, target))) or None,
                          "prepare": prepare + positions(prepare, forward, backward)})
        by_target.append((target, paths))
    has_ignore = any(p.kind == "ignore_index" for p in op.params)
    bounds = "".join(f", {name}={value!r}" for name, value in zip(("low", "high"), op.target_range)
                     if value is not None)
    labels = "c, at = label_column(target, x, self.ignore_index)" if has_ignore else "c, at = label_column(target, x)"
    prepare = {"labels": labels,
               "dense": f"t = dense_target(target, x{bounds})"}
    checks = checks_called(target_lines(op, prepare), [path for _, paths in by_target for path in paths])
    mean, = (red for red in reductions(op.granularity) if red["name"] == "mean")
    # a further mean divides by the product of x's sizes on its axes (kl_div's batchmean: x.shape[0])
    means = [{"name": name, "count": " * ".join(f"x.shape[{axis}]" for axis in axes)} for name, axes in op.means.items()]
    return {"op": op, "params": [param_context(p) for p in op.params], "mean_reduction": mean, "means": means,
            "paths": [path for _, paths in by_target for path in paths], "by_target": by_target,
            "kind_tests": KIND_TESTS, "checks": checks,
            "prepare": prepare, "target_doc": " or ".join(TARGET_DOCS[t] for t in op.targets)}


def op_context(op, kernels=None):
    """What an op's template needs: the op and its printed kernels (a layer's, when given, those)."""
    if op.kind == "layer":
        forward, backward = (with_calls(kernel_code(k), op) for k in kernels or layer_kernels(op))
        context = {"op": op, "forward": forward, "backward": backward, "params": [param_context(p) for p in op.params],
                   "vector": op.forward.has(sp.Sum), **NUMPY}
    else:
        context = dict(loss_context(op), **NUMPY)
    return dict(context, runtime=special_functions(context))


def special_functions(context):
    """The functions of _special a NumPy module imports: those its printed kernels call (erfc, not erf,
    where a rewrite took 1 + erf for erfc)."""
    def lines(value, printed=False):
        """The strings of a kernel's printed lines in value, at any depth (a loss's are per target and path)."""
        if isinstance(value, str) and printed:
            yield value
        elif isinstance(value, dict):
            for key, item in value.items():
                yield from lines(item, printed or key in ("lines", "summed_lines"))
        elif isinstance(value, (list, tuple)):
            for item in value:
                yield from lines(item, printed)
    code = "\n".join(lines(context))
    return [name for name in ("erf", "erfc", "argmax_positions", "row_sum_but") if re.search(rf"\b{name}\(", code)]


def fast_context(op, context=None):
    """An op's context (op_context's, when given, that) with every kernel also printed as fused loops
    where it has that form, None when none of its kernels has one."""
    kernels = (layer_kernels(op) if op.kind == "layer"
               else [k for target in op.targets for variant in variants(op, target)
                     for k in loss_kernels(op, target, variant)])
    context = copy.deepcopy(context) if context is not None else op_context(op, kernels if op.kind == "layer" else None)
    rows = context["vector"] if op.kind == "layer" else op.granularity == "row"
    printed = {}
    for kernel in kernels:
        try:
            printed[kernel.name] = {"fused": fused_code(kernel, rows, op.kind == "loss"), "fused_error": None}
        except FusionError as error:
            printed[kernel.name] = {"fused": None, "fused_error": str(error)}
        # an element-wise loss's fused forward also comes summed over rows, for a mean or a sum
        summed = op.kind == "loss" and not rows and printed[kernel.name]["fused"] and kernel.name.startswith("forward")
        printed[kernel.name]["summed"] = fused_code(kernel, rows, True, summed=True) if summed else None
    if not any(p["fused"] for p in printed.values()):
        return None
    codes = ([context["forward"], context["backward"]] if op.kind == "layer"
             else [path[side] for path in context["paths"] for side in ("forward", "backward")])
    for code in codes:
        code.update(printed[code["name"]])
        if code["fused"]:  # the fused kernel's own arguments (the labels c, where NumPy's take positions)
            code.update({key: value for key, value in with_calls({"args": code["fused"]["signature"]}, op).items()
                         if key in ("call", "saved", "names", "before", "after")}, returns=code["fused"]["returns"])
        if code["summed"]:
            code["call"] = code["call"] + ['self.reduction != "none"']
    for path in context.get("paths", []):
        prepare = [line for line in path["prepare"] if line != POSITIONS]
        path["prepare"] = prepare + positions(prepare, path["forward"], path["backward"])
        path["with_dx"] = with_dx_code(op, path, {kernel.name: kernel for kernel in kernels}, printed)
    # the NumPy module, where a kernel is not fused or a fused one's lines call one of its own (a redo, a Near)
    fallback = op.module if any(p["fused"] is None or any("numpy_kernels." in line for line in p["fused"]["call"])
                                for p in printed.values()) else None
    runtime = {name for p in printed.values() for code in (p["fused"], p["summed"]) if code for name in code["runtime"]}
    # _runtime's dense_target tests the range in one compiled pass (NumPy's makes boolean arrays)
    called = checks_called(target_lines(op, context["prepare"]), context["paths"]) if "paths" in context else []
    checks = [check for check in called if check not in FAST_CHECKS]
    runtime |= set(called) & FAST_CHECKS
    return dict(context, kernels="fused.py.jinja", package="..", fallback=fallback, runtime=sorted(runtime),
                checks=checks)


def with_dx_code(op, path, kernels, printed):
    """A loss path's fused forward that also writes dx under a mean or a sum (with_gradient), printed
    with how the class calls it and the reductions it serves; None where its forward or backward is not
    fused. An element-wise loss's sums its losses per row, as its summed forward; a row loss's gives one
    per row anyway."""
    forward, backward = (printed[path[side]["name"]] for side in ("forward", "backward"))
    rows = op.granularity == "row"
    if not ((forward["fused"] if rows else forward["summed"]) and backward["fused"]):
        return None
    kernel = with_gradient(kernels[path["forward"]["name"]], kernels[path["backward"]["name"]])
    code = fused_code(kernel, rows, True, summed=not rows)
    call = with_calls({"args": code["signature"]}, op)["call"]
    # the common case is a mean: it passes True, where the checked path passes the reduction's test
    return {"name": kernel.name, "doc": kernel.doc, "fused": code, "reductions": WITH_DX,
            "call": [{MEAN.name: 'self.reduction == "mean"'}.get(arg, arg) for arg in call],
            "common_call": [{MEAN.name: "True"}.get(arg, arg) for arg in call]}


def render_package(catalog, fused=True):
    """{file name: text} of the whole generated package, the fused numba modules in fast/ if fused."""
    env, generator = environment(), generator_digest()
    modules = {name: operation_files(op, fused, env, generator) for name, op in catalog.items()}
    return {**package_files(catalog, modules, fused, env, generator),
            **{name: text for files in modules.values() for name, text in files.items()}}


def operation_files(op, fused=True, env=None, generator=None):
    """{file name: text} of op's own modules: its NumPy one, and its fused one if fused and it has that form."""
    env, generator = env or environment(), generator or generator_digest()
    source = f"{CATALOG_SOURCE} ({op.name})"
    if isinstance(op, TensorOp):  # index notation: lowered to whole arrays by codegen.tensor_lower, fused loops by
        with in_stage(op.name, "lowering its derivation to arrays and printing them"):  # codegen.tensor_fused
            files = {f"{op.module}.py": render(env, "tensor.py.jinja", source, generator, module_context(op))}
        if fused:
            with in_stage(op.name, "printing its fused kernels (--backend numpy skips them)"):
                try:
                    files[f"{FAST}/{op.module}.py"] = render(env, "tensor_fused.py.jinja", source, generator,
                                                             tensor_fast_context(op))
                except FusionError:  # the codegen summary says why (codegen.tensor_fused.fusion_error)
                    pass
        return files
    with in_stage(op.name, "deriving and printing its NumPy kernels"):
        context = op_context(op)
        files = {f"{op.module}.py": render(env, f"{op.kind}.py.jinja", source, generator, context)}
    if fused and op.kind in ("layer", "loss"):
        with in_stage(op.name, "printing its fused kernels (--backend numpy skips them)"):
            context = fast_context(op, context)
        if context is not None:
            files[f"{FAST}/{op.module}.py"] = render(env, f"{op.kind}.py.jinja", source, generator, context)
    return files


def runtime_files(env=None, generator=None):
    """{file name: text} of the runtime every operation's module may import, the index-notation one's helpers
    (_tensor.py) included: the input checks and the pool of kept outputs, which the fused runtime imports too."""
    env, generator = env or environment(), generator or generator_digest()
    return {name: render(env, template, f"templates/{template}", generator, {})
            for name, template in (("_checks.py", "checks.py.jinja"), ("_kept.py", "kept.py.jinja"),
                                   ("_tensor.py", "tensor_runtime.py.jinja"))}


def package_files(catalog, modules, fused=True, env=None, generator=None):
    """{file name: text} of the package's other files, given each operation's own modules (modules,
    {name: operation_files}): they list the operations and hold what all of them share."""
    env, generator = env or environment(), generator or generator_digest()
    ops = list(catalog.values())
    files = {"__init__.py": render(env, "package.py.jinja", CATALOG_SOURCE, generator,
                                   {"ops": [{"name": op.name, "module": op.module} for op in ops]}),
             **runtime_files(env, generator),
             "_base.py": render(env, "base.py.jinja", "derive/reduction.py", generator,
                                {"reductions": {g: reductions(g) for g in ("row", "element")}}),
             "network.py": render(env, "network.py.jinja", "derive/optim.py", generator,
                                  {"sgd": kernel_code(sgd_kernel()), "adam": kernel_code(adam_kernel(False)),
                                   "adamw": kernel_code(adam_kernel(True))}),
             "_special.py": render(env, "special.py.jinja", "derive/special.py", generator,
                                   {"erf": kernel_code(erf_kernel()),
                                    "erfcs": [kernel_code(erfc_kernel(dtype)) for dtype in ("float32", "float64")]})}
    if not any(isinstance(op, TensorOp) for op in ops):
        del files["_tensor.py"]
    if not fused:
        return files
    fast = [{"name": op.name, "module": op.module} for op in ops if f"{FAST}/{op.module}.py" in modules[op.name]]
    files[f"{FAST}/__init__.py"] = render(env, "fast_package.py.jinja", CATALOG_SOURCE, generator, {"ops": fast})
    files[f"{FAST}/_runtime.py"] = render(env, "fast_runtime.py.jinja", "codegen/fused.py", generator,
                                          {"fastmath": "{" + ", ".join(f'"{flag}"' for flag in FASTMATH) + "}",
                                           "functions": runtime_functions()})
    return files
