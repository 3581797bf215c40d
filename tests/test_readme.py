"""The README's Python examples run as written (offline ones; examples that need downloaded weights are
recognised by a hub id in quotes and are checked only for syntax)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
NEEDS_DOWNLOAD = re.compile(r"\"(deepmind|anas-awadalla|openai)[/\"]")


def test_readme_has_examples():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example(index):
    code = BLOCKS[index]
    compiled = compile(code, f"README.md example {index}", "exec")
    if NEEDS_DOWNLOAD.search(code):
        return  # needs a model hub: syntax only
    namespace: dict = {}
    exec(compiled, namespace)
    if "out" in namespace and "ar" in namespace:  # Perceiver AR example: prompt + 20 new tokens
        assert tuple(namespace["out"].shape) == (2, 320)
    if "dense" in namespace:
        assert tuple(namespace["dense"].shape) == (2, 1024, 2)
        assert tuple(namespace["some"].shape) == (2, 10, 2)
