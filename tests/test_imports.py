"""The package's layering: no import circles, and the vLLM engine (loaded in vLLM's processes) stays
clear of the API."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# installed name -> source folder (pyproject's package-dir)
PACKAGES = {"kvblend": ROOT / "kvblend", "kvblend.kernels": ROOT / "kernels", "kvblend.integrations": ROOT / "integrations"}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def _type_checking_only(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def imported(path: Path, name: str, known: set[str]) -> set[str]:
    """kvblend modules a module imports at run time (function-level imports count; TYPE_CHECKING ones do not)."""
    out: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def visit(node):
        if isinstance(node, ast.If) and _type_checking_only(node):
            return
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for target in targets:
            parts = target.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a and a.b too
                if ".".join(parts[:i]) in known:
                    out.add(".".join(parts[:i]))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    out.discard(name)
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            connect(v)
    return found


def test_the_package_has_no_import_circles():
    mods = modules()
    graph = {name: imported(path, name, set(mods)) for name, path in mods.items()}
    # kvblend/__init__ loads its public names lazily; a package importing its own submodules is no circle
    for name in graph:
        graph[name] = {m for m in graph[name] if not name.startswith(m + ".")}
    assert "kvblend.api" in graph and "kvblend.engines.hf" in graph["kvblend.api"]
    assert cycles(graph) == []


def test_cycle_finder_sees_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_vllm_engine_does_not_import_the_api():
    code = "import sys, kvblend.engines.vllm, kvblend.engines.vllm_connector; print('kvblend.api' in sys.modules)"
    if subprocess.run([sys.executable, "-c", "import vllm"], capture_output=True).returncode != 0:
        code = "import sys, kvblend.engines.vllm; print('kvblend.api' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_vllm_plugin_loads_light():
    """vLLM runs kvblend's plugin in each of its processes, kvblend's or not: importing it loads no other
    kvblend module (the model adapter comes with the first `worker_model()`)."""
    code = "import sys, kvblend.engines.vllm_plugin; print(sorted(m for m in sys.modules if m.startswith('kvblend.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['kvblend.engines', 'kvblend.engines.vllm_plugin']"
