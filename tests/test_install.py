"""symgrad installs anywhere: its wheel, installed (not editable) into a fresh virtual environment and
run from outside the repository, imports every generated layer, prints a derivation and regenerates
the package with symgrad codegen --out. The slowest test (about half a minute): it builds a wheel and
installs NumPy, SymPy and Jinja2 (the versions this environment has) into the new environment."""
import os
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest

import generated
from codegen.render import ROOT, TEMPLATES
from codegen.write import modules

SOURCES = ("pyproject.toml", "README.md", "derive", "codegen", "generated", "templates")
GENERATED = Path(generated.__file__).parent
ENV = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}


def run(args, cwd):
    """stdout of a command that must succeed; on failure, its output in the assertion message."""
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)
    command = " ".join(str(a) for a in args)
    assert result.returncode == 0, f"{command} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(wheel, venv folder, a working folder outside the repository) with symgrad installed from the wheel."""
    work = tmp_path_factory.mktemp("install")
    source = work / "source"  # a copy, so that building leaves no build/ or egg-info in the repository
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", ".symgrad-*"))
        else:
            shutil.copy2(ROOT / name, source / name)
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", source, "-w", work / "dist"], cwd=work)
    (wheel,) = (work / "dist").glob("symgrad-*.whl")
    run([sys.executable, "-m", "venv", work / "venv"], cwd=work)
    pins = [f"{name}=={version(name)}" for name in ("numpy", "sympy", "jinja2")]
    run([work / "venv" / "bin" / "python", "-m", "pip", "install", "--quiet", wheel, *pins], cwd=work)
    return wheel, work / "venv", work


def test_the_wheel_holds_the_templates_and_the_generated_package(installed):
    names = set(zipfile.ZipFile(installed[0]).namelist())
    assert {f"templates/{path.name}" for path in TEMPLATES.glob("*.jinja")} <= names
    assert {f"generated/{name}" for name in modules(GENERATED)} <= names


def test_every_generated_layer_imports_from_the_installed_package(installed):
    _, venv, work = installed
    script = ("import generated, numpy as np\n"
              "for name in generated.__all__: getattr(generated, name)\n"
              "loss = generated.SoftmaxCrossEntropy()\n"
              "loss.forward(np.zeros((2, 3)), np.array([0, 2])); loss.backward()\n"
              "print(generated.__file__); print(' '.join(generated.__all__))")
    where, names = run([venv / "bin" / "python", "-c", script], cwd=work).splitlines()
    assert Path(where).is_relative_to(venv) and not Path(where).is_relative_to(ROOT)
    assert names.split() == generated.__all__


def test_symgrad_derive_runs_from_the_installed_package(installed):
    _, venv, work = installed
    printed = run([venv / "bin" / "symgrad", "derive", "softmax"], cwd=work)
    assert "\\begin{align*}" in printed and printed.rstrip().endswith("\\end{align*}")


def test_symgrad_codegen_out_writes_the_committed_package_and_no_unverified_fused_one(installed):
    """The environment has no numba: the NumPy package is the committed one, byte for byte, and the fused
    one, which nothing here could run to verify, is not written (and codegen says so)."""
    _, venv, work = installed
    out = work / "regenerated"
    printed = run([venv / "bin" / "symgrad", "codegen", "--out", out], cwd=work)
    written = {name: (out / name).read_bytes() for name in modules(out)}
    assert not [path for path in out.iterdir() if path.is_dir()]
    assert written == {name: (GENERATED / name).read_bytes() for name in modules(GENERATED) if "/" not in name}
    assert "the fused backend (fast/) was not generated: numba, which verifies it, is not installed" in printed
