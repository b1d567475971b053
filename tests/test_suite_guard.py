"""The suite's own honesty: every test function checks something.

A test passes the guard when its body (nested functions included) has an `assert`, uses
`pytest.raises` / `pytest.warns` / `pytest.fail`, or calls a checking helper: a name that
starts with `assert` (`assert_fp32_close`, `np.testing.assert_allclose`, `_assert_...`),
anything under `*.testing.*`, or a function of the same test file or of tests/helpers/ whose
own body checks (found transitively). Exceptions go in ALLOWED with a reason.

Run: .venv/bin/pytest tests/test_suite_guard.py -q      (well under a second)
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
# "tests/<file>.py::<function>" -> why it checks nothing the guard can see
ALLOWED: dict[str, str] = {}  # none today: every test function asserts or raises
PYTEST_CHECKS = {"raises", "warns", "fail", "deprecated_call"}


def _call_name(call: ast.Call) -> list[str]:
    """`np.testing.assert_allclose(...)` -> ["np", "testing", "assert_allclose"]."""
    parts, node = [], call.func
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return parts[::-1]


def _checks(function: ast.AST, helpers: set[str]) -> bool:
    for node in ast.walk(function):
        if isinstance(node, ast.Assert):
            return True
        if not isinstance(node, ast.Call):
            continue
        name = _call_name(node)
        if not name:
            continue
        if name[-1].lstrip("_").startswith("assert") or "testing" in name[:-1]:
            return True
        if len(name) == 2 and name[0] == "pytest" and name[1] in PYTEST_CHECKS:
            return True
        if len(name) == 1 and name[0] in helpers:
            return True
    return False


def checking_helpers(trees: list[ast.Module]) -> set[str]:
    """Names of the module-level non-test functions (and classes' methods) that check."""
    functions = [node for tree in trees for node in ast.walk(tree)
                 if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                 and not node.name.startswith("test")]
    helpers: set[str] = set()
    while True:  # a helper that calls a checking helper checks too
        found = {f.name for f in functions if f.name not in helpers and _checks(f, helpers)}
        if not found:
            return helpers
        helpers |= found


def find_unchecked_tests(source: str, *, shared_helpers: set[str] = frozenset()) -> list[str]:
    """Test functions in `source` (module level, or methods of `Test*` classes) that check
    nothing; names as pytest's ids without parameters."""
    tree = ast.parse(source)
    helpers = checking_helpers([tree]) | set(shared_helpers)
    found = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            candidates = [(node.name, node)]
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            candidates = [(f"{node.name}::{f.name}", f) for f in node.body
                          if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))]
        else:
            continue
        found += [name for name, f in candidates
                  if name.split("::")[-1].startswith("test") and not _checks(f, helpers)]
    return found


def count_tests(source: str) -> int:
    return sum(isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
               and node.name.startswith("test") for node in ast.walk(ast.parse(source)))


def _shared_helpers() -> set[str]:
    trees = [ast.parse(p.read_text()) for p in sorted((TESTS / "helpers").glob("*.py"))]
    trees.append(ast.parse((TESTS / "conftest.py").read_text()))
    return checking_helpers(trees)


def test_every_test_function_checks_something():
    shared = _shared_helpers()
    unchecked, seen = {}, 0
    for path in sorted(TESTS.rglob("test_*.py")):
        rel = path.relative_to(TESTS.parent).as_posix()
        seen += count_tests(path.read_text())
        for name in find_unchecked_tests(path.read_text(), shared_helpers=shared):
            unchecked[f"{rel}::{name}"] = path
    assert seen > 100 and (TESTS / "distributed" / "test_pipeline.py").exists()  # it looked
    missing = sorted(set(unchecked) - set(ALLOWED))
    assert not missing, ("test functions with no assert, no pytest.raises / warns and no "
                         f"checking helper (add a check, or an ALLOWED entry with a reason): "
                         f"{missing}")
    stale = sorted(set(ALLOWED) - set(unchecked))
    assert not stale, f"ALLOWED entries that now check something or no longer exist: {stale}"
    assert all(reason.strip() for reason in ALLOWED.values())


def test_no_test_file_imports_another():
    """Shared code lives in tests/conftest.py and tests/helpers/, not in a test file."""
    offenders = []
    for path in sorted(TESTS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            offenders += [f"{path.relative_to(TESTS.parent)}: {name}" for name in names
                          if name.split(".")[-1].startswith("test_")]
    assert not offenders, offenders


def test_the_guard_finds_a_test_without_a_check():
    source = '''
import numpy as np
import pytest

def helper_that_checks(x):
    assert x

def helper_that_calls_one(x):
    helper_that_checks(x)

def quiet_helper(x):
    return x + 1

def test_only_runs_code():
    y = quiet_helper(1)
    print(y == 2)

def test_assert():
    assert quiet_helper(1) == 2

def test_raises():
    with pytest.raises(ValueError):
        int("x")

def test_numpy():
    np.testing.assert_array_equal([1], [1])

def test_local_helper():
    helper_that_calls_one(True)

def test_shared_helper():
    assert_fp32_close(1, 1, "x")

def test_nested_assert():
    def inner():
        assert True
    inner()

def test_comparison_without_assert():
    quiet_helper(1) == 2

class TestGroup:
    def test_method_without_check(self):
        quiet_helper(2)

    def test_method_with_check(self):
        assert quiet_helper(2) == 3
'''
    assert find_unchecked_tests(source) == ["test_only_runs_code",
                                            "test_comparison_without_assert",
                                            "TestGroup::test_method_without_check"]
    assert "helper_that_calls_one" in checking_helpers([ast.parse(source)])
    assert "quiet_helper" not in checking_helpers([ast.parse(source)])
