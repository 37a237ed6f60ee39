"""The benchmark package's modules import each other in one direction: no import cycle, lazy imports included."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "nnunet_proto" / "benchmark"


def _benchmark_imports(path: Path):
    """Modules of nnunet_proto.benchmark that ``path`` imports anywhere (top level or inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
        out |= {n.split(".")[2] for n in names if n.startswith("nnunet_proto.benchmark.")}
    return out - {path.stem}


def test_no_module_of_the_benchmark_imports_another_in_a_circle():
    graph = {p.stem: _benchmark_imports(p) for p in PKG.glob("*.py") if p.stem != "__init__"}
    assert graph["plots"] and "report" not in graph["plots"], graph["plots"]  # the old report <-> plots cycle
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            assert state.get(nxt) != "open", f"import cycle: {' -> '.join(path + [nxt])}"
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_report_is_split_by_what_it_reports():
    sizes = {p.stem: len(p.read_text().splitlines()) for p in PKG.glob("*.py")}
    assert sizes["report"] < 400 and {"results", "sections", "signal", "plots"} <= set(sizes)
