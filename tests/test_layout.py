"""The layout of ../shared/DESIGN.md section 2 holds: layers only look down, no import cycles, the library
never imports the app, argparse or Gradio, and importing the front doors loads nothing heavy."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Lower layers first; a module may import its own layer and the ones before it (DESIGN: speed <-
# generation <- models <- rerank <- sd_app). training may use all of pipelines; nothing uses training.
LAYERS = ["speed", "generation", "models", "rerank"]


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(path: Path, runtime_only: bool) -> set[str]:
    """Absolute module names imported anywhere in the file (function-level included)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if runtime_only and _is_type_checking_block(node):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def _sources(*packages: str) -> dict[str, Path]:
    return {_module_name(p): p for package in packages for p in sorted((REPO / package).rglob("*.py"))}


def test_the_library_never_imports_the_app_argparse_or_gradio():
    offenders = []
    for name, path in _sources("pipelines").items():
        imported = {module.split(".")[0] for module in _imports(path, runtime_only=False)}
        banned = {"sd_app", "gradio"} | (set() if name.startswith("pipelines.training") else {"argparse"})
        offenders += [f"{name} imports {module}" for module in sorted(imported & banned)]
    assert not offenders


def test_layers_only_look_down():
    offenders = []
    for name, path in _sources("pipelines").items():
        parts = name.split(".")
        if len(parts) < 3 or parts[1] not in LAYERS:
            continue
        allowed = set(LAYERS[: LAYERS.index(parts[1]) + 1])
        for module in _imports(path, runtime_only=True):
            target = module.split(".")
            if target[0] == "pipelines" and len(target) > 1 and target[1] in LAYERS + ["training"]:
                if target[1] not in allowed:
                    offenders.append(f"{name} imports {module}")
    assert not offenders


def test_no_import_cycles():
    sources = _sources("pipelines", "sd_app")
    graph = {
        name: {m for m in _imports(path, runtime_only=True) if m in sources and m != name}
        for name, path in sources.items()
    }
    cycles = []

    def walk(node: str, stack: list[str], done: set[str]) -> None:
        for nxt in sorted(graph[node]):
            if nxt in stack:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in done:
                walk(nxt, stack + [nxt], done)
        done.add(node)

    done: set[str] = set()
    for name in sorted(graph):
        if name not in done:
            walk(name, [name], done)
    assert not cycles, [" -> ".join(cycle) for cycle in cycles]


def test_front_doors_import_nothing_heavy():
    code = (
        "import sys; import sd_app.cli, pipelines.generation.request, pipelines.generation.schedulers; "
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'gradio') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"
