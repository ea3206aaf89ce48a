"""The package's import order, as a test: imports point downward only, and nothing imports in a circle.

    cli
    training (train, train_seq2seq, finetune), interp, retrieval, serve, scheduler
    generate, checkpoint, data, capture, viz, gradcheck, testing, optim, distributed
    models, tokenizers, tasks
    nn
    ops
    parallel, backend, kernels, memory, settings (settings imports nothing from npflux)

A module may import from its own level or any level below. Every import
counts, also one inside a function (a lazy import is still a dependency);
the one exception is a module-level ``__getattr__``, where an old name is
re-exported from the module it moved to, for one release. ``npflux/__init__.py``
(the package's front door) stands outside the order.
"""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "npflux"

LEVELS = [
    {"parallel", "backend", "kernels", "memory", "settings"},
    {"ops"},
    {"nn"},
    {"models", "tokenizers", "tasks"},
    {"generate", "checkpoint", "data", "capture", "viz", "gradcheck", "testing", "optim", "distributed"},
    {"train", "train_seq2seq", "finetune", "training", "interp", "retrieval", "serve", "scheduler"},
    {"cli"},
]
LEVEL = {unit: i for i, units in enumerate(LEVELS) for unit in units}
OUTSIDE = {"npflux"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def all_modules():
    return {module_name(p): p for p in PKG.rglob("*.py")}


def _shim_nodes(tree):
    """Nodes inside a module-level ``def __getattr__`` (compatibility re-exports)."""
    skip = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "__getattr__":
            skip.update(id(n) for n in ast.walk(node))
    return skip


def imports_of(name, path, modules):
    """The npflux modules that module ``name`` imports, anywhere in its body (shims excepted)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _shim_nodes(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # `from . import ops` imports the module npflux.ops
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {t for t in found if t == "npflux" or t.startswith("npflux.")}


def unit_of(name):
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else None


def graph():
    modules = all_modules()
    return {name: imports_of(name, path, modules) - {name} for name, path in modules.items()}


def test_every_module_has_a_level():
    units = {unit_of(m) for m in all_modules() if m not in OUTSIDE}
    assert units <= set(LEVEL), f"give these a level in LEVELS (and in docs/architecture.md): {units - set(LEVEL)}"


def test_imports_point_downward():
    upward = []
    for name, targets in graph().items():
        if name in OUTSIDE:
            continue
        for t in targets:
            if t == "npflux" or t in OUTSIDE or name.startswith(t + "."):
                continue  # the package itself, or an ancestor package (loaded first anyway)
            if LEVEL[unit_of(t)] > LEVEL[unit_of(name)]:
                upward.append(f"{name} -> {t}")
    assert not upward, "imports that point upward:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    g = {name: {t for t in targets if t not in OUTSIDE and not name.startswith(t + ".")}
         for name, targets in graph().items() if name not in OUTSIDE}
    # A package's __init__ re-exporting its submodules is not a dependency of those submodules.
    for name in g:
        g[name] = {t for t in g[name] if not (t in g and all_modules()[t].name == "__init__.py" and name.startswith(t))}
    seen, stack, cycles = set(), [], []

    def visit(node):
        if node in stack:
            cycles.append(stack[stack.index(node):] + [node])
            return
        if node in seen:
            return
        seen.add(node)
        stack.append(node)
        for t in sorted(g.get(node, ())):
            visit(t)
        stack.pop()

    for node in sorted(g):
        visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_settings_imports_nothing_from_npflux():
    assert graph()["npflux.settings"] == set()


def test_importing_npflux_loads_no_plotting_progress_or_tokenizer_library():
    import subprocess
    import sys

    code = ("import sys, npflux, npflux.checkpoint; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'matplotlib', 'tqdm', 'tokenizers', 'torch'})); "
            "print('npflux.tokenizers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]", out[0]
    assert out[1] == "False"  # npflux.checkpoint does not load the tokenizers either
