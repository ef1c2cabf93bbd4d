"""Imports stay cheap, wings export their names lazily, and no ketamap module imports in a cycle.

* ``import ketamap`` and ``import ketamap.<wing>`` (run in a fresh interpreter)
  load none of the heavy stacks; each wing's ``__init__.py`` is
  ``lazy_loader.attach_stub`` over an ``__init__.pyi`` that lists its names.
* The module-level import graph of ``src/ketamap`` (read with :mod:`ast`, not
  by importing) has no cycle.
* Every name of a wing's ``__all__`` resolves, and ``__all__`` and the stub agree.
"""

from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
import tomllib
from collections import deque
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"

WINGS = [
    "ketamap.atlas",
    "ketamap.engine",
    "ketamap.invivo",
    "ketamap.invivo.ensembles",
    "ketamap.invivo.spines",
    "ketamap.io",
    "ketamap.pipelines",
    "ketamap.report",
    "ketamap.simulate",
    "ketamap.stats",
    "ketamap.wholebrain",
]

# the names each wing exported when its __init__ imported them eagerly: they stay public
# (the sessions-file readers moved to ketamap.manifest)
PUBLIC = {
    "ketamap.atlas": [
        "Atlas", "Ontology", "make_phantom", "load_allen", "load_brainglobe",
        "write_brainglobe", "load_atlas", "PHANTOM_REGIONS",
    ],
    "ketamap.invivo": ["ensembles", "spines"],
    "ketamap.invivo.ensembles": [
        "EnsembleParams", "SessionResult", "analyse_session", "compare_sessions",
        "compare_mice", "match_cells", "track_cells",
    ],
    "ketamap.invivo.spines": [
        "SpineParams", "analyse_dendrite", "cluster_sign_flip", "export_annotations",
        "export_napari", "import_annotations", "interval_rates", "mixed_model", "pooled_rates",
        "presence_matrix", "return_to_lost_sites", "score_spines", "track_spines",
    ],
    "ketamap.engine": ["run_stage", "fingerprint", "stage_key"],
    "ketamap.io": [],
    "ketamap.pipelines": ["run_study", "run_ensembles", "run_ensembles_mice", "run_spines"],
    "ketamap.report": [
        "figures", "html", "qc", "maps", "render_report", "write_report", "save_figures",
        "make_figures",
    ],
    "ketamap.simulate": [
        "BrainParams", "SimulatedBrain", "simulate_brain", "simulate_census", "true_effects",
        "SCENARIOS", "GroupDesign", "Scenario", "get_scenario",
    ],
    "ketamap.stats": [
        "multitest", "regions", "voxels", "network", "benjamini_hochberg", "holm",
        "StatsParams", "compare_regions", "VoxelParams", "density_map", "group_maps",
        "voxel_test", "NetworkParams", "compare_networks",
    ],
    "ketamap.wholebrain": ["DetectionParams", "detect_cells"],
}  # fmt: skip

HEAVY = [
    "numpy", "dask", "scipy", "pandas", "pyarrow", "matplotlib", "SimpleITK", "ants",
    "skimage", "sklearn", "statsmodels", "zarr", "tifffile", "jinja2", "typer",
    "brainglobe_atlasapi", "pynwb", "h5py",
]  # fmt: skip


# ----------------------------------------------------------------------------- subprocess


def _loaded_after(statement: str, candidates: list[str]) -> list[str]:
    """Run ``statement`` in a fresh interpreter; return which ``candidates`` it imported."""
    code = (
        f"import sys\n{statement}\nprint(','.join(m for m in {candidates!r} if m in sys.modules))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "EAGER_IMPORT"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return [m for m in out.stdout.strip().split(",") if m]


@pytest.mark.parametrize("module", ["ketamap", *WINGS])
def test_importing_a_wing_loads_no_heavy_stack(module):
    assert _loaded_after(f"import {module}", HEAVY) == []


@pytest.mark.parametrize(
    "statement, forbidden",
    [
        # the detector needs neither the registration libraries nor the figures
        ("from ketamap.wholebrain import detect_cells", ["SimpleITK", "ants", "matplotlib"]),
        # reading traces needs numpy only
        (
            "from ketamap.io.traces.suite2p import read_suite2p",
            ["dask", "matplotlib", "pandas", "SimpleITK"],
        ),
        ("from ketamap.stats import benjamini_hochberg", ["dask", "matplotlib", "SimpleITK"]),
    ],
)
def test_a_name_loads_only_what_it_needs(statement, forbidden):
    assert _loaded_after(statement, forbidden) == []


def test_the_probe_sees_imports():
    # the subprocess check can fail: a statement that does import a heavy stack is seen
    assert _loaded_after("import ketamap.io.volumes", ["dask", "zarr"]) == ["dask", "zarr"]


# ----------------------------------------------------------------------------- import graph


def _module_names(src: Path, package: str) -> dict[str, Path]:
    """Map every module (and package, by its ``__init__.py``) under ``src/package`` to its file."""
    out = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = list(path.relative_to(src).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _module_level_imports(body: list[ast.stmt]):
    """Yield the import statements run when the module is imported.

    Function bodies are skipped, as is the body of ``if TYPE_CHECKING:``; class
    bodies and ``if`` / ``try`` / ``with`` blocks run at import time and count.
    """
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _module_level_imports(node.orelse)
            continue
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            for item in getattr(node, field, None) or []:
                if isinstance(item, (ast.ExceptHandler, ast.match_case)):
                    yield from _module_level_imports(item.body)
                elif isinstance(item, ast.stmt):
                    yield from _module_level_imports([item])


def _lazy_names(init: Path) -> dict[str, str] | None:
    """For a lazy package (``lazy_loader.attach_stub``), map each exported name to its submodule.

    Returns None for a package whose ``__init__`` imports eagerly. A submodule
    exported by name (``from . import x``) maps to itself.
    """
    tree = ast.parse(init.read_text(encoding="utf-8"))
    calls = [
        n for n in ast.walk(tree)
        if isinstance(n, ast.Call)
        and getattr(n.func, "attr", getattr(n.func, "id", None)) == "attach_stub"
    ]  # fmt: skip
    stub = init.with_suffix(".pyi")
    if not calls or not stub.is_file():
        return None
    names = {}
    for node in ast.parse(stub.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            for alias in node.names:
                names[alias.name] = alias.name if node.module is None else node.module
    return names


def import_graph(src: Path, package: str) -> dict[str, list[str]]:
    """Return the module-level import edges between modules of ``package`` under ``src``.

    ``import a.b`` is an edge to ``a.b``; ``from a import b`` is an edge to
    ``a.b`` when that is a module, else to ``a``, except that a name a lazy
    package exports (its ``__init__.pyi``) is an edge to the submodule that
    defines it, which the attribute access imports. A lazy package's own
    ``__init__`` imports nothing, so it has no edge to its submodules. An edge
    to ``a.b.c`` also adds edges to the packages ``a`` and ``a.b`` (their
    ``__init__`` runs first), except the importer's own enclosing packages.
    """
    modules = _module_names(src, package)
    lazy = {
        name: names
        for name, path in modules.items()
        if path.name == "__init__.py" and (names := _lazy_names(path)) is not None
    }
    graph: dict[str, list[str]] = {}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        here = name if is_pkg else name.rpartition(".")[0]
        edges: set[str] = set()
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in _module_level_imports(tree.body):
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names)
                continue
            if node.level:
                base = here.split(".")[: len(here.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in modules:
                    edges.add(sub)
                elif target in lazy and alias.name in lazy[target]:
                    edges.add(f"{target}.{lazy[target][alias.name]}")
                else:
                    edges.add(target)
        # importing a.b.c first runs the __init__ of a and a.b (unless they are the
        # importer's own packages, which are already running)
        for target in list(edges):
            parts = target.split(".")
            for i in range(1, len(parts)):
                parent = ".".join(parts[:i])
                if not (name == parent or name.startswith(parent + ".")):
                    edges.add(parent)
        graph[name] = sorted(e for e in edges if e in modules and e != name)
    return graph


def _shortest_cycle(graph: dict[str, list[str]], start: str, members: set[str]) -> list[str]:
    """Return the shortest path ``start -> ... -> start`` inside one strongly connected set."""
    parent: dict[str, str | None] = {start: None}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        for w in graph.get(v, ()):
            if w == start:
                path = [v]
                while parent[path[-1]] is not None:
                    path.append(parent[path[-1]])
                return [*reversed(path), start]
            if w in members and w not in parent:
                parent[w] = v
                queue.append(w)
    raise AssertionError(f"{start} is on no cycle")


def find_cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """Return one cycle per strongly connected component that has one (Tarjan).

    Each cycle is a list of nodes starting and ending with the component's
    smallest node; components are sorted. Iterative, so deep graphs are fine.
    """
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[set[str]] = []
    counter = 0
    nodes = sorted(set(graph) | {w for ws in graph.values() for w in ws})
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(graph.get(root, ())))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(graph.get(w, ()))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    component = set()
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.add(w)
                        if w == v:
                            break
                    if len(component) > 1 or v in graph.get(v, ()):
                        components.append(component)
    return sorted(_shortest_cycle(graph, min(c), c) for c in components)


def test_cycle_finder_on_small_graphs():
    assert find_cycles({"a": ["b"], "b": ["c"], "c": []}) == []
    assert find_cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a", "e"], "e": []}) == [
        ["a", "b", "c", "a"]
    ]
    assert find_cycles({"x": ["x"], "y": []}) == [["x", "x"]]
    two = {"a": ["b"], "b": ["a", "c"], "c": ["d"], "d": ["e"], "e": ["c"], "f": ["a"]}
    assert find_cycles(two) == [["a", "b", "a"], ["c", "d", "e", "c"]]
    # a long chain closing on itself is found without recursion limits
    chain = {f"m{i:05d}": [f"m{i + 1:05d}"] for i in range(5000)}
    chain["m05000"] = ["m00000"]
    (cycle,) = find_cycles(chain)
    assert len(cycle) == 5002 and cycle[0] == cycle[-1] == "m00000"


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_import_graph_reads_what_runs_at_import_time(tmp_path):
    _write(
        tmp_path,
        {
            "kp/__init__.py": "",
            "kp/a.py": "import os\nfrom kp.b import thing\n",
            "kp/b.py": (
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n    from kp import a\n"
                "def f():\n    import kp.a\n"
                "thing = 1\n"
            ),
            "kp/c.py": "from kp import d\n",
            "kp/d.py": "try:\n    from . import c\nexcept ImportError:\n    c = None\n",
            "kp/e.py": "from kp.lazy import f\nclass K:\n    import kp.a as a\n",
            "kp/lazy/__init__.py": (
                "import lazy_loader as lazy\n"
                "__getattr__, __dir__, __all__ = lazy.attach_stub(__name__, __file__)\n"
            ),
            "kp/lazy/__init__.pyi": "from .m import f\n",
            "kp/lazy/m.py": "from kp.e import K\n",
            # an eager package: importing any of its modules runs its __init__
            "kp/eager/__init__.py": "from kp.eager.impl import g\n",
            "kp/eager/impl.py": "from kp.user import h\ng = 1\n",
            "kp/eager/other.py": "",
            "kp/user.py": "import kp.eager.other\nh = 2\n",
        },
    )
    graph = import_graph(tmp_path, "kp")
    assert graph["kp.a"] == ["kp.b"]
    assert graph["kp.b"] == []  # TYPE_CHECKING and function-level imports do not count
    assert graph["kp.c"] == ["kp.d"] and graph["kp.d"] == ["kp.c"]
    assert graph["kp.e"] == ["kp.a", "kp.lazy", "kp.lazy.m"]  # through the stub to the module
    assert graph["kp.lazy"] == []  # a lazy __init__ imports nothing
    assert graph["kp.eager.impl"] == ["kp.user"]  # not its own package
    assert graph["kp.user"] == ["kp.eager", "kp.eager.other"]
    assert find_cycles(graph) == [
        ["kp.c", "kp.d", "kp.c"],
        ["kp.e", "kp.lazy.m", "kp.e"],
        ["kp.eager", "kp.eager.impl", "kp.user", "kp.eager"],
    ]


def test_no_import_cycle_in_ketamap():
    graph = import_graph(SRC, "ketamap")
    assert len(graph) > 50
    assert "ketamap.io.traces" in graph["ketamap.io.traces.suite2p"]  # edges are seen
    cycles = find_cycles(graph)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


# ----------------------------------------------------------------------------- lazy exports


def _stub(module: str) -> tuple[list[str], dict[str, str]]:
    """Return the stub's ``__all__`` and its imported names (name -> submodule)."""
    path = SRC / Path(*module.split(".")) / "__init__.pyi"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    declared = None
    names = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            declared = ast.literal_eval(node.value)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 1, f"{path}: only `from .x import y` is lazy"
            for alias in node.names:
                assert alias.asname is None, f"{path}: lazy_loader ignores `as` names"
                names[alias.name] = node.module or alias.name
    assert declared is not None, f"{path} declares no __all__"
    return declared, names


@pytest.mark.parametrize("module", WINGS)
def test_wing_exports_resolve_and_match_the_stub(module):
    init = SRC / Path(*module.split(".")) / "__init__.py"
    assert _lazy_names(init) is not None, f"{init} does not use lazy_loader.attach_stub"
    pkg = importlib.import_module(module)
    declared, names = _stub(module)
    assert len(declared) == len(set(declared))
    assert sorted(declared) == sorted(names) == sorted(pkg.__all__)
    assert set(PUBLIC[module]) <= set(pkg.__all__), "a public name was dropped"
    assert set(pkg.__all__) <= set(dir(pkg))
    for name, sub in names.items():
        value = getattr(pkg, name)
        defining = importlib.import_module(f"{module}.{sub}")
        assert value is (defining if sub == name else getattr(defining, name)), name


def test_stubs_ship_with_the_package():
    # attach_stub reads __init__.pyi at import time: without it the wing does not import
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "**/*.pyi" in data["tool"]["setuptools"]["package-data"]["ketamap"]


# ----------------------------------------------------------------------------- layers

# The house, top floor first (docs/architecture.md): a module may import from its own
# floor and the floors below, never from one above, at module level or in a function.
LAYERS = [
    ["ketamap.cli"],
    ["ketamap.pipelines", "ketamap.demo", "ketamap.napari"],
    ["ketamap.wholebrain", "ketamap.invivo", "ketamap.simulate"],
    ["ketamap.stats", "ketamap.report"],
    ["ketamap.atlas", "ketamap.manifest"],
    ["ketamap.engine"],
    ["ketamap.io"],
    ["ketamap.params", "ketamap.space", "ketamap.errors", "ketamap"],
]


def _floor(module: str) -> int | None:
    rank = {m: i for i, floor in enumerate(LAYERS) for m in floor}
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in rank:
            return rank[".".join(parts[:n])]
    return None


def upward_imports(src: Path, package: str) -> list[str]:
    """Every import (module level or in a function) of a module from a floor above it."""
    found = []
    for module, path in _module_names(src, package).items():
        here = _floor(module)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                there = _floor(name) if name.startswith(package) else None
                if there is not None and here is not None and there < here:
                    found.append(f"{module} imports {name} (line {node.lineno})")
    return found


def test_every_module_has_a_floor():
    assert [m for m in _module_names(SRC, "ketamap") if _floor(m) is None] == []


def test_no_module_imports_from_a_floor_above():
    assert upward_imports(SRC, "ketamap") == []


def test_an_upward_import_is_seen(tmp_path):
    pkg = tmp_path / "ketamap"
    (pkg / "io").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "io" / "__init__.py").write_text("")
    (pkg / "io" / "x.py").write_text("def f():\n    from ketamap.cli import app\n")
    assert upward_imports(tmp_path, "ketamap") == ["ketamap.io.x imports ketamap.cli (line 2)"]
