"""The package's shape: no import cycles (lazy and type-checking imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def _modules() -> dict[str, tuple[Path, bool]]:
    found = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if package else parts)] = (path, package)
    return found


def _imports(name: str, path: Path, package: bool, known: set[str]) -> set[str]:
    """The traineval modules `name` imports anywhere in its body."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                here = name.split(".") if package else name.split(".")[:-1]
                here = here[: len(here) - (node.level - 1)]
                base = ".".join(here + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target.startswith("traineval") and target != name:
                out.add(target)
                break
    return out


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, if any (depth-first search)."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles():
    modules = _modules()
    known = set(modules)
    graph = {name: _imports(name, *modules[name], known) for name in modules}
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_can_fail():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def _reached(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_the_loop_imports_nothing_of_the_modes():
    """The engine below its plug-ins: the loop and all it imports, however indirectly, leave
    `traineval.modes` alone (the step types live in `traineval.training.steps`)."""
    modules = _modules()
    known = set(modules)
    graph = {name: _imports(name, *modules[name], known) for name in modules}
    reached = _reached(graph, "traineval.training.loop")
    assert "traineval.training.steps" in reached
    assert sorted(m for m in reached if m.startswith("traineval.modes")) == []


# The wings of the package, lowest first: a module imports its own wing and the wings below
# it, never one above (nor a sibling on its own level). docs/architecture.md says what each
# wing owns.
WINGS: tuple[tuple[str, ...], ...] = (
    ("system",),
    ("config",),
    ("tasks",),
    ("data",),
    ("models",),
    ("runs",),
    ("loggers", "callbacks"),
    ("reporting",),
    ("training",),
    ("evaluation",),
    ("modes",),
    ("assembly",),
    ("commands",),
    ("federated", "tuning"),
    ("cli",),
    ("__main__",),  # python -m traineval: the command line
    ("",),  # the package itself: the public names, re-exported
)


def _wing(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def _arrows_up(graph: dict[str, set[str]]) -> list[str]:
    level = {wing: rank for rank, wings in enumerate(WINGS) for wing in wings}
    found = []
    for name, targets in sorted(graph.items()):
        here = _wing(name)
        for target in sorted(targets):
            there = _wing(target)
            if there != here and level[there] >= level[here]:
                found.append(f"{name} -> {target}")
    return found


def test_every_wing_imports_only_the_wings_below_it():
    modules = _modules()
    known = set(modules)
    graph = {name: _imports(name, *modules[name], known) for name in modules}
    assert sorted({_wing(name) for name in graph}) == sorted(w for ws in WINGS for w in ws)
    assert _arrows_up(graph) == []


def test_the_wing_order_can_fail():
    graph = {"traineval.training.loop": {"traineval.modes.base"}, "traineval.modes.base": set()}
    assert _arrows_up(graph) == ["traineval.training.loop -> traineval.modes.base"]
    assert _arrows_up({"traineval.loggers.a": {"traineval.callbacks.b"}}) != []


def test_the_top_of_the_package_is_the_facade_the_command_line_and_the_tasks():
    top = sorted(p.name for p in (SRC / "traineval").glob("*.py"))
    assert top == ["__init__.py", "__main__.py", "cli.py", "tasks.py"]


def test_git_ignores_no_file_of_the_package():
    """A .gitignore pattern meant for run folders (`runs/`) once hid a package's
    `__init__.py` from commits: every file of the package must reach a fresh clone."""
    import shutil
    import subprocess

    root = SRC.parent
    if not (root / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    files = [
        str(p.relative_to(root))
        for p in (SRC / "traineval").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    ]
    found = subprocess.run(
        ["git", "check-ignore", "--no-index", "--stdin"],
        input="\n".join(files),
        capture_output=True,
        text=True,
        cwd=root,
        check=False,
    )
    assert found.stdout.split() == []


def _mode_checks(tree: ast.AST, modes: set[str]) -> list[str]:
    """The `isinstance(x, <a built-in mode class>)` calls in `tree`."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "isinstance":
            classes = node.args[1] if len(node.args) > 1 else None
            named = classes.elts if isinstance(classes, ast.Tuple) else [classes]
            found += [n.id for n in named if isinstance(n, ast.Name) and n.id in modes]
    return found


def test_no_code_outside_the_modes_branches_on_a_concrete_mode():
    """A mode owns what differs about it (data, model options, its Flower settings): the
    rest of the package asks the Mode contract, so a user's mode takes every route."""
    import traineval.modes as modes
    from traineval.modes.contract import Mode

    concrete = {
        name
        for name, value in vars(modes).items()
        if isinstance(value, type) and issubclass(value, Mode) and value is not Mode
    }
    assert {"Federated", "Supervised", "PPO"} <= concrete
    assert _mode_checks(ast.parse("isinstance(m, (Federated, int))"), concrete) == ["Federated"]
    found = [
        f"{path.relative_to(SRC)}: {name}"
        for path in (SRC / "traineval").rglob("*.py")
        if "modes" not in path.relative_to(SRC / "traineval").parts
        for name in _mode_checks(ast.parse(path.read_text()), concrete)
    ]
    assert found == []


# Public entry points whose keyword options are their documented call shape (the
# specification's `train` and `cross_validate`, optimizers and schedules by name, a mode's or
# a model's settings): their internals take the options as one object. Nothing else may join.
WIDE_BY_DESIGN = {
    "assembly/manager.py:train",  # the specification's train(model, loaders, ...)
    "assembly/manager.py:find_learning_rate",
    "assembly/evaluator.py:cross_validate",  # the specification's Evaluator.cross_validate
    "tuning/driver.py:tune",
    "federated/flower.py:server_app",
    "federated/flower.py:__init__",  # FlowerServer: server_app's options
    "models/policies.py:__init__",  # ActorCritic's architecture
    "training/loop.py:__init__",  # Loop(...): keyword-only parts, the hook-order test's
}


def _too_wide_or_too_long() -> list[str]:
    """`path:function` of every function whose code (its docstring aside) is over 60 lines
    or which takes over six parameters (self, cls not counted; *args and **kwargs one each)."""
    found = []
    for path in sorted((SRC / "traineval").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            a = node.args
            named = [
                x for x in [*a.posonlyargs, *a.args, *a.kwonlyargs] if x.arg not in ("self", "cls")
            ]
            count = len(named) + (a.vararg is not None) + (a.kwarg is not None)
            body = node.body[1:] if ast.get_docstring(node) is not None else node.body
            start = body[0].lineno if body else node.lineno
            lines = (node.end_lineno or node.lineno) - start + 1
            where = f"{path.relative_to(SRC / 'traineval').as_posix()}:{node.name}"
            if (count > 6 and where not in WIDE_BY_DESIGN) or lines > 60:
                found.append(f"{where} ({count} parameters, {lines} lines of code)")
    return found


def test_every_function_fits_a_screen_and_takes_six_parameters_at_most():
    assert _too_wide_or_too_long() == []


def test_the_width_rule_can_fail(monkeypatch):
    monkeypatch.setattr(f"{__name__}.WIDE_BY_DESIGN", set())
    found = _too_wide_or_too_long()
    assert len(found) == 8
    assert any(f.startswith("tuning/driver.py:tune (12 parameters") for f in found)
