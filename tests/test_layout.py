"""The repository's face and its import rules: what a learner meets at the top, and how the code hangs together."""

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPTS = {"train", "compare", "bench"}  # what a user runs
METHOD = {"epsdpo", "epsdpo_chunked", "epsdpo_trl"}  # what a copier takes
FACE = {f"{name}.py" for name in SCRIPTS | METHOD} | {"test_epsdpo.py", "conftest.py"}


def tracked_python_files():
    listed = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True)
    return [ROOT / name for name in listed.stdout.split()]


def imported_modules(path):
    """The top-level names of every module a file imports, anywhere in it (inside functions too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_top_level_holds_the_method_its_scripts_and_its_tests_alone():
    top = {path.name for path in tracked_python_files() if path.parent == ROOT}
    assert top <= FACE and len(top) <= 8, sorted(top - FACE)
    packages = {path.parent.name for path in tracked_python_files() if path.name == "__init__.py"}
    assert packages <= {"training", "tests"}, packages  # the machinery in one package


def test_no_script_imports_a_script_and_the_package_imports_none():
    # compare.py runs python train.py in processes of its own. The TRL integration is for TRL's users: neither the
    # package nor a script imports it (it would import TRL).
    top = {path.stem for path in tracked_python_files() if path.parent == ROOT}
    assert SCRIPTS <= top and "epsdpo_trl" in top
    for path in tracked_python_files():
        if path.parent.name == "tests" or path.name in ("test_epsdpo.py", "conftest.py"):
            continue
        scripts_imported = imported_modules(path) & SCRIPTS
        assert not scripts_imported, f"{path.relative_to(ROOT)} imports {scripts_imported}"
        if path.parent in (ROOT, ROOT / "training") and path.name != "epsdpo_trl.py":
            assert "epsdpo_trl" not in imported_modules(path), f"{path.relative_to(ROOT)} imports epsdpo_trl"


def test_the_method_imports_torch_and_the_standard_library_alone():
    for name in ("epsdpo.py", "epsdpo_chunked.py"):  # epsdpo_chunked.py imports epsdpo.py
        outside = imported_modules(ROOT / name) - set(sys.stdlib_module_names) - {"torch", "epsdpo"}
        assert not outside, f"{name} imports {outside}"


def test_no_module_assigns_to_another_modules_attributes():
    # Tests aside: code that replaces another module's function or constant at run time hides what runs.
    for path in tracked_python_files():
        if path.parent.name == "tests" or path.name.startswith("test_") or path.name == "conftest.py":
            continue
        tree = ast.parse(path.read_text())
        modules = {
            (alias.asname or alias.name).split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.Import | ast.ImportFrom)
            for alias in node.names
            if isinstance(node, ast.Import) or node.module in ("training", None)
        }
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            for target in targets:
                if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name):
                    assert target.value.id not in modules, (
                        f"{path.relative_to(ROOT)}:{node.lineno} assigns to {target.value.id}.{target.attr}"
                    )
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setattr" and node.args:
                first = node.args[0]
                assert not (isinstance(first, ast.Name) and first.id in modules), (
                    f"{path.relative_to(ROOT)}:{node.lineno}"
                )


def test_ci_runs_the_formatter_and_the_linter_before_the_tests():
    steps = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines() if line.strip() and line[0] != "#"]
    commands = [
        next((i for i, step in enumerate(steps) if step.startswith(prefix)), None)
        for prefix in ("ruff format --check", "ruff check", "python -m pytest")
    ]
    assert None not in commands and commands == sorted(commands), steps
