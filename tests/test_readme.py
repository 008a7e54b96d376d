"""The README's Python examples run as written, so the README stays true."""
import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks(text):
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_readme_examples_run():
    namespace = {}
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 3
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    assert namespace["a"].dtype.name == "float32" and namespace["dlogits"].dtype.name == "float32"


def test_python_blocks_finds_each_block():
    assert python_blocks("x\n```python\na = 1\n```\n```\nno\n```\n```python\nb = 2\n```") == ["a = 1\n", "b = 2\n"]
