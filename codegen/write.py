"""Writing the generated package atomically: all of it succeeds, or the folder is left untouched."""
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path


# the generated package's subpackages (generated/fast/): their modules are named "fast/<module>.py"
SUBPACKAGES = ("fast",)


def modules(folder):
    """Names of the package's modules in folder, those of its subpackages as "sub/name.py"."""
    found = [path for pattern in ("*.py", *(f"{sub}/*.py" for sub in SUBPACKAGES)) for path in folder.glob(pattern)]
    return sorted(path.relative_to(folder).as_posix() for path in found)


def stage(files, parent):
    """A new temporary folder beside parent's target holding files (same file system, so os.replace is atomic)."""
    parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=".symgrad-", dir=parent))
    for name, text in files.items():
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_text(text)
    return folder


def import_package(folder, subpackages=()):
    """Import the package staged in folder under a private name, with the subpackages named (as its
    attributes), leaving sys.modules as it was."""
    name = f"_symgrad_staged_{abs(hash(str(folder)))}"
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py", submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
        for sub in subpackages:
            importlib.import_module(f"{name}.{sub}")
    finally:
        for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[key]
    return module


def publish(staged, out):
    """Move the staged files into out, replacing only those whose content changed; drop stale modules.

    If a step fails, the files already replaced or removed get their old content back, so out is as
    it was. Returns the names of the files written or removed."""
    out.mkdir(parents=True, exist_ok=True)
    names = modules(staged)
    changed = [name for name in names
               if not (out / name).exists() or (out / name).read_bytes() != (staged / name).read_bytes()]
    stale = [name for name in modules(out) if name not in names]
    previous = {}  # name -> its content before (None: it did not exist), for each file touched so far
    try:
        for name in changed + stale:
            target = out / name
            previous[name] = target.read_bytes() if target.exists() else None
            if name in names:
                target.parent.mkdir(exist_ok=True)
                os.replace(staged / name, target)
            else:
                target.unlink()
    except BaseException:
        for name, content in previous.items():
            if content is None:
                (out / name).unlink(missing_ok=True)
            else:
                (out / name).write_bytes(content)
        raise
    finally:
        shutil.rmtree(staged)
    return changed + stale


def differences(files, out):
    """Names of files whose committed copy in out differs from files, or is missing or extra."""
    present = set(modules(out)) if out.is_dir() else set()
    return sorted({name for name, text in files.items()
                   if name not in present or (out / name).read_text() != text} | (present - set(files)))
