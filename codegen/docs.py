"""make docs: every derivation as derivations.md (a code-hosting site renders its $$ math) and as a
self-contained derivations.html that KaTeX renders from a copy bundled beside it, offline."""
import shutil
import subprocess
import tempfile
from pathlib import Path

import jinja2

from codegen.latex import equation, format_markdown

ASSETS = Path(__file__).resolve().parent / "docs_assets"
KATEX_FILES = ("katex.min.css", "katex.min.js", "fonts")
# Headless, and offline: nothing Chromium fetches on its own (updates, sync, QUIC probes).
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--virtual-time-budget=10000")
INTRO = ("Every derivation that symgrad derive NAME prints. Each step is an equation and the rule that "
         "produced it; the tests check every step (symbolically where SymPy can, otherwise numerically at "
         "explicit sizes) and render every formula with KaTeX.")


def built(derivations):
    """[(name, Derivation)] of every entry of a {name: builder} registry."""
    return [(name, build()) for name, build in derivations.items()]


def markdown_document(derivations):
    """derivations.md: a contents list, then each derivation with its steps' math between $$."""
    contents = "\n".join(f"- [{name}](#{name}): {d.title}" for name, d in derivations)
    sections = "\n\n".join(f"## {name}\n\n{d.title}\n\n{format_markdown(d)}" for name, d in derivations)
    return f"# symgrad derivations\n\n{INTRO}\n\n{contents}\n\n{sections}\n"


def html_document(derivations):
    """derivations.html: each step's rule and equation; KaTeX renders the equations when it loads."""
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(ASSETS)), undefined=jinja2.StrictUndefined,
                             autoescape=True, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    sections = [{"name": name, "title": d.title,
                 "steps": [{"rule": step.rule, "latex": equation(step)} for step in d.steps]}
                for name, d in derivations]
    return env.get_template("derivations.html.jinja").render(intro=INTRO, derivations=sections)


def write_docs(out, registry, katex):
    """Write both documents into out, with KaTeX's stylesheet, script and fonts copied beside them."""
    derivations = built(registry)
    out.mkdir(parents=True, exist_ok=True)
    for name in KATEX_FILES:
        source, target = katex / name, out / "katex" / name
        target.parent.mkdir(exist_ok=True)
        shutil.copytree(source, target, dirs_exist_ok=True) if source.is_dir() else shutil.copyfile(source, target)
    written = []
    for name, text in (("derivations.md", markdown_document(derivations)),
                       ("derivations.html", html_document(derivations))):
        (out / name).write_text(text)
        written.append(out / name)
    return written


def headless_chromium(page, *options):
    """Chromium's CompletedProcess on the file page, with a fresh profile; stdout holds what
    --dump-dom prints. The virtual time budget lets KaTeX render and its fonts load first."""
    chromium = shutil.which("chromium")
    if chromium is None:
        raise FileNotFoundError("chromium not found: make test and make screenshot install it with apt-get")
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *options, page.as_uri()],
                              capture_output=True, text=True, timeout=120, check=True)
