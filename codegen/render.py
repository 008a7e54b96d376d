"""Rendering the generated package: every file's text, from the catalog and the templates."""
import hashlib
from pathlib import Path

import jinja2

from codegen.kernels import kernel_code, layer_kernels, loss_kernels, reductions

ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "templates"
# Everything whose change can change a generated file; its digest goes in every header.
GENERATOR = ("derive/*.py", "codegen/lower.py", "codegen/printer.py", "codegen/kernels.py",
             "codegen/render.py", "templates/*.jinja")
# The derivations printed for readers (symgrad derive, make docs) never reach a generated file.
NOT_GENERATOR = "derive/derivation*.py"
CATALOG_SOURCE = "derive/catalog.py"


def environment():
    """The Jinja environment: strict about undefined names, no stray blank lines."""
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), undefined=jinja2.StrictUndefined,
                              trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                              autoescape=False)


def generator_digest():
    """sha256 of the generator's own files, so a header changes whenever they do."""
    digest = hashlib.sha256()
    for pattern in GENERATOR:
        for path in sorted(set(ROOT.glob(pattern)) - set(ROOT.glob(NOT_GENERATOR))):
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


def op_context(op):
    """What an op's template needs: the op and its printed kernels."""
    if op.kind == "layer":
        forward, backward = (kernel_code(k) for k in layer_kernels(op))
        return {"op": op, "forward": forward, "backward": backward}
    return {"op": op, "kernels": [kernel_code(k) for k in loss_kernels(op)], "reductions": reductions()}


def render_package(catalog):
    """{file name: text} of the whole generated package."""
    env, generator = environment(), generator_digest()
    ops = list(catalog.values())
    exports = [{"name": op.name, "module": op.module} for op in ops]
    files = {"__init__.py": render(env, "package.py.jinja", CATALOG_SOURCE, generator, {"ops": exports}),
             "_checks.py": render(env, "checks.py.jinja", "templates/checks.py.jinja", generator, {})}
    for op in ops:
        files[f"{op.module}.py"] = render(env, f"{op.kind}.py.jinja", f"{CATALOG_SOURCE} ({op.name})",
                                          generator, op_context(op))
    return files
