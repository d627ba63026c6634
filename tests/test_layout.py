"""The fixed layout and the boundaries between rooms (STYLE.md): dataplane/ never imports
the control plane's libraries; the appliance never imports the exchange in a box or the
benchmarks; host/ keeps only the CLI, configuration and shared helpers at its top."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN_IN_DATAPLANE = {"logging", "prometheus_client", "pyroute2", "bcc", "host"}
HOST_TOP = {"__init__.py", "cli.py", "config.py", "netns.py", "signals.py"}
ROOMS = ("appliance", "exchange", "bench")


def _imports(path: Path, depth: int = 1) -> set[str]:
    """Every module ``path`` imports, anywhere in it (functions included), cut to its first
    ``depth`` dotted parts."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {".".join(a.name.split(".")[:depth]) for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mod = node.module.split(".")
            names.add(".".join(mod[:depth]))
            if len(mod) < depth:  # from host import exchange
                names |= {".".join([*mod, a.name]) for a in node.names}
    return names


def test_top_level_layout():
    for d in ("bpf", "dataplane", "host", "ansible", "image", "runbooks", "tests"):
        assert (ROOT / d).is_dir(), d


def test_host_has_its_rooms_and_a_small_top():
    top = {p.name for p in (ROOT / "host").glob("*.py")}
    assert top == HOST_TOP, f"modules at host/'s top that belong in a room: {top - HOST_TOP}"
    for room in ROOMS:
        assert (ROOT / "host" / room / "__init__.py").is_file(), room


def test_dataplane_stays_in_its_tier():
    files = sorted((ROOT / "dataplane").glob("*.py"))
    assert files
    for f in files:
        bad = _imports(f) & FORBIDDEN_IN_DATAPLANE
        assert not bad, f"{f.name} imports {sorted(bad)}"


def test_the_appliance_never_imports_the_exchange_or_the_benches():
    files = sorted((ROOT / "host" / "appliance").glob("*.py"))
    shared = [ROOT / "host" / n for n in sorted(HOST_TOP)]
    assert len(files) > 5
    for f in [*files, *shared]:
        if f == ROOT / "host" / "cli.py":  # the verb list names every room; not its rooms' cli
            continue
        bad = _imports(f, depth=2) & {"host.exchange", "host.bench"}
        assert not bad, f"{f.relative_to(ROOT)} imports {sorted(bad)}"


def test_the_exchange_never_imports_the_benches():
    for f in sorted((ROOT / "host" / "exchange").glob("*.py")):
        bad = _imports(f, depth=2) & {"host.bench"}
        assert not bad, f"{f.relative_to(ROOT)} imports {sorted(bad)}"


def test_the_layout_check_sees_imports_inside_functions(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def g():\n    from host.exchange import lab\n    from host import bench\n")
    assert {"host.exchange", "host.bench"} <= _imports(f, depth=2)


def test_generator_is_independent_of_the_code_it_checks():
    assert "dataplane" not in _imports(ROOT / "host" / "exchange" / "itchgen.py")
    assert "dataplane" not in _imports(ROOT / "tests" / "reference.py")


def test_no_test_module_imports_another():
    tests = {p.stem for p in (ROOT / "tests").glob("test_*.py")}
    for f in sorted((ROOT / "tests").glob("*.py")):
        mods = {m.split(".")[-1] for m in _imports(f, depth=2) if m.startswith("tests")}
        assert not mods & tests, f"{f.name} imports test modules {sorted(mods & tests)}"
