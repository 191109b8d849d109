"""The package's imports go one way: each module imports only its own layer and those below.

Read from the source (every import statement, those inside functions too), so a new cycle,
an upward import or a private name taken from another module fails here, in CI, before anyone
reads the code. The layers, lowest first, are those of docs/architecture.md.

As import-linter and grimp do, ``from package import submodule`` counts as an import of the
submodule, and importing a submodule does not count as importing its package's __init__ (which
Python runs first): a package's __init__ may gather its submodules without making a cycle.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "minifcn"

# (prefix, layer): a module is in the layer of the longest prefix that names it
LAYERS = [
    ("minifcn.arguments", 0),
    ("minifcn.backend.arrays", 1),
    ("minifcn.backend.reference", 2),
    ("minifcn.backend.cpu", 3),
    ("minifcn.backend.cuda", 3),
    ("minifcn.backend", 4),              # dispatch and the package: the one place that chooses
    ("minifcn.distributed", 5),          # the ranks of a run and their sums
    ("minifcn.autograd", 6),
    ("minifcn.tensor", 7),
    ("minifcn.function", 8),
    ("minifcn.gradcheck", 8),
    ("minifcn.functional", 9),           # the ops
    ("minifcn.nn", 10),
    ("minifcn.optim", 11),
    ("minifcn.checkpoint", 11),
    ("minifcn.models", 12),
    ("minifcn.data", 13),
    ("minifcn.metrics", 13),
    ("minifcn.visualize", 13),
    ("minifcn.training", 14),
    ("minifcn.train", 14),
    ("minifcn.predict", 14),
    ("minifcn.__main__", 15),
    ("minifcn", 15),                     # the package itself gathers the public names
]


def module_name(path):
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def layer(module):
    prefix = max((p for p, _ in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return dict(LAYERS)[prefix]


def imports(module):
    """[(imported minifcn module, names taken from it, line)] of every import in ``module``."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names if alias.name.split(".")[0] == "minifcn"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1 packages
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "minifcn":
                continue
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if submodule in MODULES:  # "from package import submodule"
                    found.append((submodule, [], node.lineno))
                else:
                    found.append((base, [alias.name], node.lineno))
    return found


GRAPH = {module: sorted({target for target, _, _ in imports(module) if target != module}) for module in MODULES}


def test_every_module_has_a_layer_and_every_import_a_module():
    for module in MODULES:
        layer(module)
        for target, _, line in imports(module):
            assert target in MODULES, f"{module}:{line} imports {target}, which is not a module of the package"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_the_layers(module):
    for target, _, line in imports(module):
        assert layer(target) <= layer(module), (
            f"{module} (layer {layer(module)}) imports {target} (layer {layer(target)}) on line {line}: "
            f"an upward import; move the code down, or pass what it needs in")


def test_no_import_cycles():
    """Depth-first search for a path back to where it started."""
    state, stack = {}, []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for target in GRAPH[module]:
            if state.get(target) == "open":
                cycle = stack[stack.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[module] = "done"

    for module in MODULES:
        if module not in state:
            visit(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_private_names_taken_from_other_modules(module):
    for target, names, line in imports(module):
        private = [name for name in names if name.startswith("_")]
        assert not private, f"{module}:{line} imports the private {private} from {target}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_private_modules_of_other_libraries(module):
    """Private modules (numpy._core, ...) change without notice between versions."""
    for node in ast.walk(ast.parse(MODULES[module].read_text(encoding="utf-8"))):
        names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        for name in names:
            if not name.startswith("minifcn"):
                assert not any(part.startswith("_") for part in name.split(".")), \
                    f"{module}:{node.lineno} imports the private module {name}"


def test_the_ops_know_nothing_of_threads_memory_or_kernels():
    """functional/ reaches the backends only through minifcn.backend's dispatch."""
    for module in MODULES:
        if module.startswith("minifcn.functional"):
            for target in GRAPH[module]:
                assert not target.startswith(("minifcn.backend.cpu", "minifcn.backend.cuda",
                                              "minifcn.distributed")), f"{module} imports {target}"


def test_the_check_finds_a_cycle_and_an_upward_import(monkeypatch):
    """The checks above can fail: a made-up graph with a cycle, and a made-up upward import."""
    monkeypatch.setitem(GRAPH, "minifcn.backend.arrays", GRAPH["minifcn.backend.arrays"] + ["minifcn.tensor"])
    with pytest.raises(pytest.fail.Exception, match="import cycle"):
        test_no_import_cycles()
    assert layer("minifcn.tensor") > layer("minifcn.backend.arrays")
