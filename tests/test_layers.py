"""The layers of docs/ARCHITECTURE.md hold: every import inside the package goes to its own layer or
one below, and the package's parts import one another without cycles (read from the source with
``ast``, so imports inside functions count too). The examples import only the package's public names and
nothing from benchmarks/; the benchmarks import no private name of another module."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: each part of the package (a top-level module or subpackage) and its layer, bottom to top
LAYERS = {
    # 0. foundation: the contract type, argument checks, the training recipe, checkpoints
    "_version": 0, "labeled": 0, "checks": 0, "training": 0, "checkpoint": 0,
    # 1. kernels: the compiled extension, backend choice, the ops and their Python backends
    "_extension": 1, "_C": 1, "backends": 1, "contracts": 1, "triton_kernels": 1, "ops": 1, "lora": 1,
    # 2. curvature operators, 3. solvers, 4. methods
    "curvature": 2, "solvers": 3, "methods": 4,
    # 5. evaluation: data, models, metrics; the study runner and its report
    "data": 5, "models": 5, "eval": 5, "study": 5, "report": 5,
    # 6. faces
    "cli": 6,
}


def _sources() -> dict[str, Path]:
    """Dotted module name (``unlearn_kernels.x.y``) -> source file, the Triton kernels included
    under the name they install as."""
    out = {}
    for path in (ROOT / "unlearn_kernels").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in (ROOT / "triton_kernels").glob("*.py"):
        name = "unlearn_kernels.triton_kernels" + ("" if path.stem == "__init__" else f".{path.stem}")
        out[name] = path
    return out


def _imports(module: str, path: Path) -> set[str]:
    """The package modules ``module`` imports (absolute names)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)  # submodules named in the list
    return {name for name in found if name.startswith("unlearn_kernels.")}


def _part(module: str) -> str:
    return module.split(".")[1]


SOURCES = _sources()
EDGES = {(module, target) for module, path in SOURCES.items() if module != "unlearn_kernels"
         for target in _imports(module, path) if target in SOURCES or _part(target) in LAYERS}


def test_every_part_has_a_layer():
    parts = {_part(m) for m in SOURCES if m != "unlearn_kernels"}
    assert parts <= set(LAYERS), f"add {sorted(parts - set(LAYERS))} to LAYERS and to docs/ARCHITECTURE.md"


@pytest.mark.parametrize("module", sorted(m for m in SOURCES if m != "unlearn_kernels"))
def test_imports_go_down(module):
    up = sorted(target for source, target in EDGES if source == module
                and LAYERS.get(_part(target), -1) > LAYERS[_part(module)])
    assert not up, f"{module} (layer {LAYERS[_part(module)]}) imports from a higher layer: {up}"


def _part_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for source, target in EDGES:
        edge = (_part(source), _part(target))
        if edge[0] != edge[1]:
            graph.setdefault(edge[0], set()).add(edge[1])
    return graph


def test_triton_kernels_import_nothing_from_ops():
    # the ops load the Triton modules; what both need (checks, fakes) lives in contracts/
    assert "ops" not in _part_graph().get("triton_kernels", set())


def test_parts_import_one_another_without_cycles():
    graph = _part_graph()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            assert state.get(nxt) != 1, f"import cycle: {' -> '.join(path + [node, nxt])}"
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def _imported(path: Path) -> list[tuple[str, str | None]]:
    """(module, name) for every import in ``path`` (those inside functions too): name None for ``import
    module``; a relative module keeps its leading dots."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            found += [("." * node.level + (node.module or ""), alias.name) for alias in node.names]
    return found


def _private(module: str, name: str | None) -> bool:
    return any(part.startswith("_") for part in module.split(".") if part) or (name or "").startswith("_")


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.py")), ids=lambda path: path.name)
def test_examples_import_only_the_packages_public_names(path):
    # the examples are what users copy: what they import, a user can (benchmarks/ is not installed)
    wrong = [(module, name) for module, name in _imported(path) if module.split(".")[0] == "benchmarks"
             or module.split(".")[0] == "unlearn_kernels" and _private(module, name)]
    assert not wrong, f"{path.name} imports {wrong}"


@pytest.mark.parametrize("path", sorted((ROOT / "benchmarks").glob("*.py")), ids=lambda path: path.name)
def test_benchmarks_import_no_private_name(path):
    # what one suite or the runner takes from another module (a sibling, the package) is public there
    wrong = [(module, name) for module, name in _imported(path) if _private(module, name)]
    assert not wrong, f"benchmarks/{path.name} imports {wrong}"
