"""Imports go one way: ops -> methods -> training -> trainers; only training/compat.py imports nnU-Net."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PKG = REPO / "nnunet_proto"


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module


def test_only_compat_imports_nnunetv2():
    offenders = [str(p.relative_to(REPO)) for p in PKG.rglob("*.py")
                 if p.name != "compat.py" and any(m.split(".")[0] == "nnunetv2" for m in _imports(p))]
    assert offenders == []


def test_ops_and_methods_are_pure():
    for sub, forbidden in (("ops", ("nnunetv2", "nnunet_proto.methods", "nnunet_proto.training",
                                    "batchgenerators", "nnunet_proto.data")),
                           ("methods", ("nnunetv2", "nnunet_proto.training", "batchgenerators", "nnunet_proto.data"))):
        for p in (PKG / sub).rglob("*.py"):
            bad = [m for m in _imports(p) if m.startswith(forbidden)]
            assert not bad, f"{p.relative_to(REPO)} imports {bad}"


def test_trainer_leaves_import_only_the_package():
    """nnU-Net imports every module of the trainers folder while searching: leaves stay light and import only
    the installed package, torch and the standard library (never nnunetv2 or each other)."""
    import sys

    allowed = {"nnunet_proto", "torch"} | set(sys.stdlib_module_names)
    for p in (REPO / "trainers").glob("*.py"):
        for m in _imports(p):
            assert m.split(".")[0] in allowed, f"{p.name} imports {m}"


def test_nothing_imports_the_cli():
    """The CLI is the top layer: library modules (e.g. the benchmark runner) never import it (no import cycle)."""
    offenders = [str(p.relative_to(REPO)) for p in PKG.rglob("*.py")
                 if p.name != "cli.py" and "nnunet_proto.cli" in set(_imports(p))]
    assert offenders == []
