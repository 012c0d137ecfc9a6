"""The package's import graph, built from the sources (ast): no circle, and no
function-local import of a package module (a dependency hidden inside a function) except the
heavy optional extras listed below, loaded on use."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "deepvit_jax"

# Package modules that may be imported inside a function, and why: each pulls in a heavy or
# optional dependency that most users of the importing module never need.
LAZY = {
    "deepvit_jax.data.builders.digits": "TFDS builder (tensorflow_datasets, scikit-learn)",
    "deepvit_jax.data.builders.folder": "TFDS builder (tensorflow_datasets, Pillow)",
    "deepvit_jax.data.builders.imagenet": "TFDS builder (tensorflow_datasets)",
    "deepvit_jax.models.attention.pallas_gpu": "Pallas/Triton kernels (GPU only)",
    "deepvit_jax.models.attention.pallas_tpu": "Pallas/Mosaic kernels (TPU only)",
    "deepvit_jax.models.attention.pallas_common": "Pallas kernels (accelerators only)",
    "deepvit_jax.models.attention.pallas_forward": "Pallas kernels (accelerators only)",
    "deepvit_jax.models.attention.pallas_backward": "Pallas kernels (accelerators only)",
    "deepvit_jax.parallel": "models.attention reads the mesh axes only under a mesh",
}


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(node: ast.ImportFrom, module: str, is_pkg: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _targets(node, module: str, is_pkg: bool, modules: set[str]) -> list[str]:
    """The package modules an import statement loads."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = _resolve(node, module, is_pkg)
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                 for a in node.names]
    return [n for n in names if n in modules]


def import_graph() -> tuple[dict[str, set[str]], list[tuple[str, str, int]]]:
    """(module -> package modules it imports at module level, [(module, target, line)] of
    function-local imports of package modules)."""
    files = {_module_name(p): p for p in PKG.rglob("*.py")}
    modules = set(files)
    graph, local = {m: set() for m in modules}, []
    for module, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        is_pkg = path.name == "__init__.py"
        inside = set()
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, (ast.Import, ast.ImportFrom)):
                        inside.add(id(node))
                        local += [(module, t, node.lineno)
                                  for t in _targets(node, module, is_pkg, modules)]
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in inside:
                graph[module].update(_targets(node, module, is_pkg, modules))
    return graph, local


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _parents(module: str) -> set[str]:
    """``a.b.c`` imports ``a`` and ``a.b`` (their __init__) first: not an edge to report."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def test_no_import_circle():
    graph, _ = import_graph()
    graph = {m: {t for t in ts if t not in _parents(m) and t != m} for m, ts in graph.items()}
    assert _cycles(graph) == []
    # and the detector sees one when there is one
    graph["deepvit_jax.utils"] = graph["deepvit_jax.utils"] | {"deepvit_jax.workdir"}
    assert any("deepvit_jax.utils" in c and "deepvit_jax.workdir" in c
               for c in _cycles(graph))


def test_no_function_local_import_of_a_package_module():
    _, local = import_graph()
    hidden = [f"{m}:{line} imports {t} inside a function"
              for m, t, line in local if t not in LAZY]
    assert hidden == [], "\n".join(hidden)
    assert local, "the scan finds the allowed lazy imports (it reads function bodies)"


# Modules allowed over MAX_LINES because each is one concept (issue 22), and why.
ONE_CONCEPT = {
    "deepvit_jax/models/deepvit.py": "the model: patch embedding, Re-attention, blocks, head",
    "deepvit_jax/data/augment.py": "the host augmentation ops (RandAugment, erasing, resize)",
    "deepvit_jax/data/device_augment.py": "the same augmentation ops on the accelerator",
}
MAX_LINES = 400
MAX_FUNCTION_LINES = 60


def sizes(root: pathlib.Path = PKG) -> tuple[dict[str, int], list[tuple[int, str, str]]]:
    """({path: lines}, [(lines, path, function)]) of the Python sources under ``root``."""
    files, functions = {}, []
    for path in root.rglob("*.py"):
        rel = path.relative_to(ROOT).as_posix()
        text = path.read_text()
        files[rel] = len(text.splitlines())
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions.append((node.end_lineno - node.lineno + 1, rel, node.name))
    return files, functions


def test_no_module_over_400_lines_and_no_function_over_60():
    files, functions = sizes()
    assert set(ONE_CONCEPT) <= set(files)  # each exemption names a real module
    assert {p: n for p, n in files.items() if n > MAX_LINES and p not in ONE_CONCEPT} == {}
    assert [f for f in functions if f[0] > MAX_FUNCTION_LINES] == []
    # and the measure sees what it should: the tests' own long functions, counted right
    _, test_functions = sizes(ROOT / "tests")
    n = next(n for n, p, name in test_functions if name == "sizes" and p.endswith("imports.py"))
    assert n == 11
    assert max(n for n, _, _ in test_functions) > MAX_FUNCTION_LINES
