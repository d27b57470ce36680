"""Suites import the plugin only through its declared public API (pytest_kvperf.__all__)."""

import ast
from pathlib import Path

import pytest_kvperf

ROOT = Path(__file__).resolve().parents[1]


def plugin_imports(path: Path):
    """(line, 'module:name') for every import of pytest_kvperf in one file."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        top = (getattr(node, "module", None) or "").split(".")[0]
        if isinstance(node, ast.ImportFrom) and top == "pytest_kvperf":
            for alias in node.names:
                yield node.lineno, f"{node.module}:{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "pytest_kvperf":
                    yield node.lineno, alias.name


def test_suites_import_only_the_public_api():
    public = {f"pytest_kvperf:{name}" for name in pytest_kvperf.__all__}
    found, outside = [], []
    for path in sorted((ROOT / "suites").rglob("*.py")):
        for line, what in plugin_imports(path):
            found.append(what)
            if what not in public:
                outside.append(f"{path.relative_to(ROOT)}:{line}: {what}")
    assert found, "no suite imports the plugin: this check would check nothing"
    assert not outside, "suites import pytest_kvperf internals:\n" + "\n".join(outside)


def test_public_api_resolves():
    for name in pytest_kvperf.__all__:
        assert getattr(pytest_kvperf, name) is not None, name
