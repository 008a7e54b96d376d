"""The symgrad command: symgrad codegen, symgrad derive NAME, symgrad docs, symgrad explain NAME, symgrad demo.

A user's error (a bad option, a declaration file that does not load, an operation that cannot be
derived) ends the command with one line on stderr, symgrad <command>: <what is wrong>, and a non-zero
status, having written nothing; SYMGRAD_DEBUG=1 shows the traceback instead."""
import argparse
import ast
import base64
import functools
import importlib.util
import math
import os
import re
import sys
from pathlib import Path

import numpy as np

from codegen.latex import FORMATS
from codegen.render import ROOT
from derive.declare import DeclarationError

KATEX_DIST = ROOT / "build" / "node" / "node_modules" / "katex" / "dist"
# class names the generated package defines besides the operations: templates/package.py.jinja exports
# Sequential and the optimizers, and every layer or loss module imports Layer or Loss from _base
RESERVED_CLASSES = ("Layer", "Loss", "Sequential", "Flatten", "SGD", "Adam", "AdamW")
# what a user's input can raise; DeclarationError (a ValueError) is also how the engine names a failing operation
USER_ERRORS = (DeclarationError, OSError, ValueError, SyntaxError)
# a user error's exit status: 2 where 1 is the command's verdict (a gradient or a step that does not hold)
ERROR_STATUS = {"check": 2, "derive": 2}


def declared_catalog(path):
    """{name: Op} of a declaration file, refused as codegen refuses it (a name taken by the catalog or the
    package); what the file's own code raises becomes a DeclarationError naming the file."""
    from derive.catalog import CATALOG
    from derive.declare import load_ops
    from derive.ops import build_catalog
    try:
        ops = load_ops(path)
    except (DeclarationError, OSError):
        raise
    except Exception as error:  # the file's code failed (SyntaxError, NameError, ...): the user's error
        raise DeclarationError(f"{path}: {type(error).__name__}: {error}") from error
    return build_catalog(*ops, taken={*CATALOG, *RESERVED_CLASSES})


def run_derive(args):
    from codegen.latex import format_derivation
    from derive.derivation_steps import declared_derivation
    from derive.derivations import DERIVATIONS
    if args.expr is not None and (args.name or args.ops):
        raise ValueError("give --expr alone, not with a derivation's name or --ops")
    op = None
    if args.ops:
        op = declared_op(args.ops, args.name)
        derivation = declared_derivation(op)
    elif args.expr is not None:
        derivation = expression_derivation(args.expr, args.wrt)
    elif args.list or not args.name:
        print("\n".join(DERIVATIONS))
        return 0
    elif args.name not in DERIVATIONS:
        raise ValueError(f"no derivation named {args.name!r}; try one of: {', '.join(DERIVATIONS)}")
    else:
        derivation = DERIVATIONS[args.name]()
    # a derivation of the user's (--expr, --ops) is always checked (quietly unless asked): no test has seen it
    if (args.check or args.expr is not None or args.ops) and not checked(derivation, args.check):
        return 1
    print(self_contained_html(args.name or "derivation", derivation, KATEX_DIST) if args.format == "html"
          else format_derivation(derivation, args.format))
    return 0


def self_contained_html(name, derivation, katex):
    """make docs' derivations.html of one derivation, with KaTeX's script and stylesheet inlined and its woff2
    fonts as data: URLs (the woff and ttf copies dropped): one file that renders wherever it is opened, offline."""
    from codegen.docs import html_document
    if not (katex / "katex.min.js").exists():
        raise FileNotFoundError(f"no KaTeX in {katex}; make docs installs it (npm ci in build/node)")

    def font(match):
        return f"url(data:font/woff2;base64,{base64.b64encode((katex / match[1]).read_bytes()).decode()})"
    css = re.sub(r",url\(fonts/[^)]+\) format\(\"(?:woff|truetype)\"\)", "", (katex / "katex.min.css").read_text())
    css = re.sub(r"url\((fonts/[^)]+\.woff2)\)", font, css)
    page = html_document([(name, derivation)])
    inlined = {'<link rel="stylesheet" href="katex/katex.min.css">': f"<style>{css}</style>",
               '<script src="katex/katex.min.js"></script>': f"<script>{(katex / 'katex.min.js').read_text()}</script>"}
    for tag, contents in inlined.items():
        if tag not in page:
            raise RuntimeError(f"codegen/docs_assets/derivations.html.jinja no longer has {tag}: inline KaTeX anew")
        page = page.replace(tag, contents)
    return page


def expression_derivation(text, wrt):
    """The element-wise derivation of text by wrt, text parsed as a declaration's expression is."""
    from derive.declare import expression
    from derive.derivation_steps import elementwise_derivation
    return elementwise_derivation(*expression(text, wrt), f"y = {text}")


def declared_op(path, name):
    """Operation name of a declaration file."""
    catalog = declared_catalog(path)
    if name not in catalog:
        missing = f"no operation named {name!r} in {path}" if name else f"--ops {path} needs an operation's name"
        raise DeclarationError(f"{missing}; it declares {', '.join(catalog) or 'none'}")
    return catalog[name]


def checked(derivation, verbose):
    """Check every step, report on stderr each one (if verbose) or each that fails; whether all hold. The
    derivation of an index-notation op is checked at the sizes its generated code is verified at."""
    from derive.derivation_check import check_derivation
    checks = check_derivation(derivation)
    for check in checks:
        if verbose or not check.ok:
            print(check.report(), file=sys.stderr)
    if not all(check.ok for check in checks):
        print("symgrad derive: a step does not hold; nothing printed", file=sys.stderr)
        return False
    return True


def run_docs(args):
    from codegen.docs import headless_chromium, write_docs
    from derive.derivation_steps import declared_derivation
    from derive.derivations import DERIVATIONS
    katex = Path(args.katex)
    if not (katex / "katex.min.js").exists():
        raise FileNotFoundError(f"no KaTeX in {katex}; make docs installs it (npm ci in build/node)")
    # declared operations go under their class names, which no built-in derivation's (lower case) can be
    declared = {name: functools.partial(declared_derivation, op)
                for name, op in (declared_catalog(args.ops) if args.ops else {}).items()}
    for path in write_docs(Path(args.out), {**DERIVATIONS, **declared}, katex):
        print(f"wrote {path}")
    if args.screenshot:
        headless_chromium(Path(args.out).resolve() / "derivations.html", "--window-size=1000,1250",
                          f"--screenshot={Path(args.screenshot).resolve()}")
        print(f"wrote {args.screenshot}")
    return 0


def run_explain(args):
    from codegen.explain import explanation
    from derive.catalog import CATALOG
    if args.ops:
        op = declared_op(args.ops, args.name)
    elif args.name in CATALOG:
        op = CATALOG[args.name]
    else:
        raise ValueError(f"no operation named {args.name!r} in the catalog; try one of: {', '.join(CATALOG)}, "
                         f"or --ops FILE for a declared one")
    print(explanation(op))
    return 0


def run_codegen(args):
    from codegen.pipeline import CACHE, codegen, numba_installed, summary
    from derive.catalog import CATALOG
    if args.ops and not args.out:
        print("symgrad codegen: --ops needs --out (the folder of the package to generate)", file=sys.stderr)
        return 2
    out, budget, jobs = Path(args.out or ROOT / "generated"), budget_option(args.budget), jobs_option(args.jobs)
    reports, changed, seconds = codegen(declared_catalog(args.ops) if args.ops else CATALOG, out,
                                        cache=None if args.no_cache else CACHE, backend=args.backend, budget=budget,
                                        jobs=jobs)
    print(summary(reports))
    if changed is None:
        print(f"FAILED: {out} left untouched", file=sys.stderr)
        return 1
    print(f"{len(changed)} file(s) written in {out} ({seconds:.1f} s)" if changed
          else f"{out} up to date ({seconds:.1f} s)")
    if args.backend == "all" and not numba_installed():
        print("the fused backend (fast/) was not generated: numba, which verifies it, is not installed "
              "(pip install 'symgrad[fast]')")
    return 0


def run_new(args):
    from derive.declare import add_declaration, declaration_source
    name = args.name[:1].upper() + args.name[1:]  # a class name: swish -> Swish
    line = declaration_source(name, args.expr)
    if args.write:
        Path(args.write).write_text(add_declaration(Path(args.write).read_text() if Path(args.write).exists()
                                                    else None, line))
        print(f"{name} declared in {args.write}; generate it with: symgrad codegen --ops {args.write} --out DIR")
    else:
        print(line)
    return 0


def shape_option(text):
    """--shape's sizes: positive integers separated by commas."""
    sizes = text.split(",")
    if not all(size.strip().isdigit() and int(size) > 0 for size in sizes):
        raise ValueError(f"--shape {text!r}: expected positive integers separated by commas, e.g. 4,5")
    return tuple(int(size) for size in sizes)


def budget_option(text):
    """--budget's seconds: a positive number, None where none is given."""
    if text is None:
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise ValueError(f"--budget {text!r}: expected a positive number of seconds, e.g. 60")
    return seconds


def jobs_option(text):
    """--jobs' count of processes: a positive integer, None (one per core) where none is given."""
    if text is None:
        return None
    if not text.strip().isdigit() or int(text) < 1:
        raise ValueError(f"--jobs {text!r}: expected a positive whole number of processes, e.g. 2")
    return int(text)


def init_options(text):
    """--init's {name: value} from 'in_features=4,out_features=3', each value a Python literal; a comma
    splits only before the next name=, so a value may be a tuple: 'shape=(2, 3),scale=0.5'."""
    return dict(init_option(item) for item in re.split(r",(?=\s*[A-Za-z_]\w*\s*=)", text) if item.strip())


def init_option(item):
    """(name, value) of one --init item name=value."""
    name, equals, value = (part.strip() for part in item.partition("="))
    try:
        if equals and name.isidentifier():
            return name, ast.literal_eval(value)
    except (ValueError, TypeError, SyntaxError):
        pass
    raise ValueError(f"--init {item.strip()!r}: expected name=value, the value a Python literal (4, 0.1, 'mean', None)")


def run_check(args):
    from codegen.verify import check_class, load_class
    cls, shape, init = load_class(args.target), shape_option(args.shape), init_options(args.init)
    try:
        result = check_class(cls, shape, np.random.default_rng(args.seed), target=args.kind, tol=args.tol, init=init)
    except Exception as error:  # the class's own code failed, or its constructor wants --init: the user's error
        raise ValueError(f"{args.target}: {type(error).__name__}: {error}") from error
    for line in result.report().splitlines():
        print(f"{args.target} {line}")
    return 0 if result.ok else 1


def run_demo(args):
    missing = [name for name in ("sklearn", "matplotlib") if importlib.util.find_spec(name) is None]
    if missing:
        print(f"symgrad demo: {', '.join(missing)} missing; install the demo extra: pip install 'symgrad[demo]'",
              file=sys.stderr)
        return 2
    # each scene's own number of epochs unless --epochs is given
    epochs = {} if args.epochs is None else dict(epochs=args.epochs)
    if args.scene in ("mlp", "all"):
        from codegen.demo import Config, run, summary
        print(summary(run(Config(hidden=args.hidden, **epochs), Path(args.out))))
        print(f"loss_curves.png, gradient_factor.png and results.json written in {args.out}")
    if args.scene in ("cnn", "all"):
        from codegen import demo_cnn
        print(demo_cnn.summary(demo_cnn.run(demo_cnn.Config(**epochs), Path(args.out))))
        print(f"cnn_training.png, cnn_filters.png and cnn_results.json written in {args.out}")
    if args.scene in ("transformer", "all"):
        from codegen import demo_transformer
        result = demo_transformer.run(demo_transformer.Config(steps=args.steps), Path(args.out))
        print(demo_transformer.summary(result))
        print(f"transformer_training.png, transformer_attention.png and transformer_results.json written in {args.out}")
    return 0


def parser():
    top = argparse.ArgumentParser(prog="symgrad", description="Derive, generate and verify gradient code.")
    commands = top.add_subparsers(dest="command", required=True)
    derive = commands.add_parser("derive", help="print a derivation, every step with the rule that produced it")
    derive.add_argument("name", nargs="?", help="which derivation (see --list), or which operation of --ops FILE")
    derive.add_argument("--list", action="store_true", help="list the derivations")
    derive.add_argument("--format", choices=(*FORMATS, "html"), default="latex",
                        help="latex: an align* block; markdown: math between $$; text: for a terminal; html: a "
                             "self-contained page, KaTeX inside")
    derive.add_argument("--expr", help="derive this element-wise expression instead, e.g. 'log(1 + exp(x))'")
    derive.add_argument("--wrt", default="x", help="the variable of --expr (default x)")
    derive.add_argument("--ops", metavar="FILE", help="derive operation NAME of this declaration file instead")
    derive.add_argument("--check", action="store_true", help="check every step first, reporting on stderr")
    derive.set_defaults(run=run_derive)
    docs = commands.add_parser("docs", help="write every derivation as Markdown and as HTML rendered by KaTeX")
    docs.add_argument("--out", default=str(ROOT / "build" / "docs"), help="the folder to write")
    docs.add_argument("--katex", default=str(KATEX_DIST), help="KaTeX's dist folder, bundled beside the HTML")
    docs.add_argument("--ops", metavar="FILE", help="also the derivations of this declaration file's operations")
    docs.add_argument("--screenshot", help="also save a PNG of the HTML as headless Chromium renders it")
    docs.set_defaults(run=run_docs)
    explain = commands.add_parser("explain", help="print an operation at every stage: its declaration, derivation, "
                                  "array program and kernel source")
    explain.add_argument("name", help="a catalog operation (Softmax), or an operation of --ops FILE")
    explain.add_argument("--ops", metavar="FILE", help="explain operation NAME of this declaration file instead")
    explain.set_defaults(run=run_explain)
    generate = commands.add_parser("codegen", help="derive, generate and verify the kernels")
    generate.add_argument("--out", help="the package folder to write (default: generated/ of this checkout)")
    generate.add_argument("--ops", help="a declaration file of your own (a Python file defining OPS)")
    generate.add_argument("--backend", choices=("numpy", "fast", "all"), default="all",
                          help="which backends to generate and verify: numpy (generated/), fast (numba's fused "
                               "loops in fast/), or all")
    generate.add_argument("--budget", metavar="SECONDS",
                          help="the seconds each stage of an operation may take before it is refused (default 30)")
    generate.add_argument("--jobs", metavar="N",
                          help="the processes that derive and verify the operations, each its own (default: one "
                               "per core); the files written are the same whatever N")
    generate.add_argument("--no-cache", action="store_true",
                          help="derive and verify every operation anew, reading and writing no cache "
                               "(build/codegen-cache)")
    generate.set_defaults(run=run_codegen)
    new = commands.add_parser("new", help="print (or --write) the declaration of an element-wise operation")
    new.add_argument("name", help="the class name, e.g. Swish")
    new.add_argument("expr", help="its forward in x, e.g. 'x*sigmoid(x)'")
    new.add_argument("--write", help="add the declaration to this file (created if missing)")
    new.set_defaults(run=run_new)
    check = commands.add_parser("check", help="finite-difference check of any layer or loss class")
    check.add_argument("target", help="path/to/module.py:ClassName")
    check.add_argument("--shape", default="4,5", help="the input's shape (default 4,5)")
    check.add_argument("--kind", choices=("labels", "dense"), default="dense",
                       help="a loss's target: integer labels or a float array of the input's shape")
    check.add_argument("--init", default="", help="the constructor's arguments, e.g. 'in_features=5,out_features=3'")
    check.add_argument("--seed", type=int, default=0)
    check.add_argument("--tol", type=float, default=1e-6, help="the largest relative error accepted")
    check.set_defaults(run=run_check)
    demo = commands.add_parser("demo", help="train generated layers: an MLP on the digits (MSE vs cross-entropy), a "
                               "CNN on the digits and a transformer reversing digits")
    demo.add_argument("--out", default="build/demo", help="the folder for the plots and the results' JSON")
    demo.add_argument("--scene", choices=("mlp", "cnn", "transformer", "all"), default="all", help="which scene to run")
    demo.add_argument("--hidden", choices=("relu", "tanh"), default="relu", help="the MLP's hidden activation")
    demo.add_argument("--epochs", type=int, help="the MLP's and the CNN's epochs (default 20 and 12)")
    demo.add_argument("--steps", type=int, default=150, help="the transformer's training steps")
    demo.set_defaults(run=run_demo)
    return top


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        return args.run(args)
    except USER_ERRORS as error:
        if os.environ.get("SYMGRAD_DEBUG") == "1":
            raise
        print(f"symgrad {args.command}: {' '.join(str(error).split()) or type(error).__name__}", file=sys.stderr)
        return ERROR_STATUS.get(args.command, 1)


if __name__ == "__main__":
    sys.exit(main())
