"""The house rules, read from the source with ``ast``: no import circles between eplbd's modules, and
imports only in the allowed directions (the daemon never imports the reference engine; the policies
import neither the daemon nor the client; the client and the wire protocol import nothing of the
daemon, the offline tools or the reference engine, so an engine can load them alone). Imports inside
functions count: a lazy import in a circle is still a circle."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
# package -> its directory (pyproject's package-dir: client/ and proto/ ship as eplbd.client, eplbd.proto)
DIRS = {"eplbd": ROOT / "eplbd", "eplbd.client": ROOT / "client", "eplbd.proto": ROOT / "proto"}
TOP_LEVEL = {"__init__", "cli", "settings", "config", "errors", "files", "chaos"}  # entry points, foundations
FORBIDDEN = {  # importer prefix -> imported prefixes it must not reach
    "eplbd.daemon": ("eplbd.refengine", "eplbd.client"),
    "eplbd.policy": ("eplbd.daemon", "eplbd.client", "eplbd.refengine", "eplbd.offline", "eplbd.integrations"),
    "eplbd.client": ("eplbd.daemon", "eplbd.offline", "eplbd.refengine"),
    "eplbd.proto": ("eplbd.daemon", "eplbd.offline", "eplbd.refengine", "eplbd.client", "eplbd.policy",
                    "eplbd.integrations"),
    "eplbd.offline": ("eplbd.refengine",),
}


def modules() -> dict[str, pathlib.Path]:
    out = {}
    for pkg, base in DIRS.items():
        for path in base.rglob("*.py"):
            rel = path.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([pkg, *parts])
            if any(name.startswith(other + ".") or name == other for other in DIRS if other != pkg and
                   other.startswith(pkg + ".")):
                continue  # eplbd/ does not contain client/ or proto/, but be safe
            out[name] = path
    return out


def imports(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """The eplbd modules ``name`` imports (resolved to the longest known module name)."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = name.split(".") if is_pkg else name.split(".")[:-1]
                parent = parent[:len(parent) - (node.level - 1)]
                base = ".".join(parent + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports(name, path, known) for name, path in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
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

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def _is_package_init(name: str, g: dict[str, set[str]]) -> bool:
    return any(other.startswith(name + ".") for other in g)


def test_no_import_circles():
    g = graph()
    # A package's __init__ re-exporting its submodules is not a circle with them: leave those edges out.
    g = {m: {t for t in ts if not (_is_package_init(t, g) and m.startswith(t + "."))} for m, ts in g.items()}
    assert cycles(g) == []


def test_imports_go_only_in_the_allowed_directions():
    bad = [f"{m} imports {t}" for m, ts in graph().items() for t in sorted(ts)
           for src, banned in FORBIDDEN.items() if (m == src or m.startswith(src + ".")) and t.startswith(banned)]
    assert bad == []


def test_the_top_level_holds_only_entry_points_and_foundations():
    loose = sorted(p.stem for p in (ROOT / "eplbd").glob("*.py"))
    assert set(loose) <= TOP_LEVEL, f"modules outside a room: {sorted(set(loose) - TOP_LEVEL)}"
    for room in ("daemon", "policy", "offline", "refengine", "integrations"):
        init = ROOT / "eplbd" / room / "__init__.py"
        assert ast.get_docstring(ast.parse(init.read_text())), f"eplbd/{room}/__init__.py says what lives there"


def test_the_checker_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
