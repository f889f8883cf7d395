"""Every hook is documented where it is declared, and in the plugin authors' guide."""

import inspect
from pathlib import Path

import pytest

from sluice import hookspecs

pytestmark = pytest.mark.unit

HOOKS = [name for name, fn in vars(hookspecs).items() if name.startswith("sluice_") and callable(fn)]
GUIDE = (Path(__file__).resolve().parents[2] / "docs" / "writing-plugins.md").read_text()


def test_there_are_hooks():
    assert len(HOOKS) >= 14


@pytest.mark.parametrize("name", HOOKS)
def test_hook_has_a_real_docstring(name):
    doc = inspect.getdoc(getattr(hookspecs, name)) or ""
    assert len(doc.split()) >= 20, f"{name} is not documented"
    assert "Called" in doc or "Broadcast" in doc, f"{name}: the docstring must say when it is called"


@pytest.mark.parametrize("name", HOOKS)
def test_hook_is_declared_with_the_marker(name):
    assert hasattr(getattr(hookspecs, name), "sluice_spec"), f"{name} lacks @hookspec"


@pytest.mark.parametrize("name", HOOKS)
def test_hook_is_in_the_guide(name):
    assert f"`{name}" in GUIDE or f"{name}(" in GUIDE, f"docs/writing-plugins.md does not mention {name}"
