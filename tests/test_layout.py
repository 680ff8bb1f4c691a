"""The floor plan holds: no import cycle inside grassjax/, the layers import only downwards (nothing in
train/ imports the studies), and code lines stay within 100 columns."""

import ast
import pathlib

from tests.conftest import REPO

PACKAGE = REPO / "grassjax"
# Each layer may import the ones before it, never one after it.
LAYERS = [
    ("functional",),
    ("nn",),
    ("data", "generation", "compiled", "host", "extras", "runlog"),
    ("train",),
    ("inference", "bench", "baselines"),
    ("studies",),
]


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: pathlib.Path) -> set[str]:
    """The grassjax modules a file imports, anywhere in it (lazy imports count: a cycle is a cycle)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("grassjax")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("grassjax"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges = {}
    for name, path in modules.items():
        edges[name] = {m for m in imports_of(path) if m in modules and m != name}
    return edges


def test_no_import_cycle_inside_grassjax():
    edges = graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(edges[node]):
            if nxt.startswith(node + ".") or node.startswith(nxt + "."):
                continue  # a package and its own modules
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) < 2:
        return None  # grassjax itself: its lazy load_run sits on top
    return next((i for i, names in enumerate(LAYERS) if parts[1] in names), None)


def test_layers_import_only_downwards_and_train_never_the_studies():
    wrong = []
    for module, targets in graph().items():
        mine = layer_of(module)
        for target in targets:
            theirs = layer_of(target)
            if mine is not None and theirs is not None and theirs > mine:
                wrong.append(f"{module} imports {target}")
    assert not wrong, wrong
    assert all(layer_of(m) is not None for m in graph() if m.count(".") >= 1), "a module outside LAYERS"


def test_the_checker_sees_a_lazy_import_from_the_studies(tmp_path):
    """The checks above must be able to fail: a function-level import counts."""
    path = tmp_path / "x.py"
    path.write_text("def f():\n    from grassjax.studies.compare import summarise\n")
    assert "grassjax.studies.compare" in imports_of(path)


def test_code_lines_are_at_most_100_columns():
    files = [*PACKAGE.rglob("*.py"), *(REPO / "experiments").rglob("*.py"), REPO / "launch.py"]
    long = [f"{p.relative_to(REPO)}:{i}" for p in files
            for i, line in enumerate(p.read_text().splitlines(), 1) if len(line) > 100]
    assert not long, long
