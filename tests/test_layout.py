"""The fixed layout and the tier boundaries (STYLE.md): dataplane/ never imports the
control plane's libraries; the top-level folders exist."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN_IN_DATAPLANE = {"logging", "prometheus_client", "pyroute2", "bcc", "host"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_top_level_layout():
    for d in ("bpf", "dataplane", "host", "ansible", "image", "runbooks", "tests"):
        assert (ROOT / d).is_dir(), d


def test_dataplane_stays_in_its_tier():
    files = sorted((ROOT / "dataplane").glob("*.py"))
    assert files
    for f in files:
        bad = _imports(f) & FORBIDDEN_IN_DATAPLANE
        assert not bad, f"{f.name} imports {sorted(bad)}"


def test_generator_is_independent_of_the_code_it_checks():
    assert "dataplane" not in _imports(ROOT / "host" / "itchgen.py")
    assert "dataplane" not in _imports(ROOT / "tests" / "reference.py")
