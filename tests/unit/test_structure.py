"""The package's structure rules, checked on the source with ``ast``.

* MPI is imported and called only in comm.py, center.py, center_inbox.py, status_board.py,
  snapshots.py, side_channel.py and collective.py (each owns one group of MPI objects: the world
  and its barriers, the center's window, the inboxes of a center that computes, the status
  board's window, the state channel's windows, the workers' messages to the master, the
  workers' all-reduce); every other module reaches MPI through their functions.
* Every exception class is defined in errors.py.
* config.py reaches none of the modules that touch MPI or run training, not even indirectly;
  the modules it is built from (config_io.py, stability.py) import nothing of the package but
  errors.py, so the config layer stays one way: config → its parts → errors.
* Only rundir.py names, creates, lists or deletes the files of a run folder (runlock.py its lock
  file): no other module spells a run-folder file name or changes a ``run_dir``.
"""

from __future__ import annotations

import ast
import builtins
import re
from functools import cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "easgd_mpi"
# status_board split from center (the center's exchange and the workers' status rows are two
# windows with unrelated jobs): it owns its window's MPI calls, as center does its own.
# center_inbox: the windows of a center that computes (inboxes, counters, center-side rows) are
# a group of their own, built only for the rules whose servers apply updates.
# side_channel: a user loop's states and metrics, whose sizes no window can know in advance,
# as point-to-point messages the master only probes (docs/ARCHITECTURE.md §4.7).
MPI_MODULES = {
    "comm",
    "center",
    "center_inbox",
    "status_board",
    "snapshots",
    "side_channel",
    "collective",
}
NOT_FROM_CONFIG = MPI_MODULES | {"training", "session", "worker", "master", "center_server"}
#: The parts of config.py: TOML and the other sources as text, the stability region.
CONFIG_PARTS = ("config_io", "stability")

#: Methods of MPI communicators, windows and requests (mpi4py's names). A call of one of these
#: on anything but an imported module (``threading.Lock()`` is not MPI) is an MPI call.
MPI_METHODS = frozenset(
    """
    Abort Accumulate Allgather Allgatherv Allocate Allocate_shared Allreduce Alltoall Barrier
    Bcast Compare_and_swap Create Create_dynamic Disconnect Dup Fence Fetch_and_op Flush
    Flush_all Flush_local Free Gather Gatherv Get Get_accumulate Get_rank Get_size Iallgather
    Iallreduce Ibarrier Ibcast Igather Improbe Iprobe Irecv Ireduce Iscatter Isend Lock Lock_all
    Mprobe Probe Put Raccumulate Recv Reduce Rget Rget_accumulate Rput Scatter Send Sendrecv
    Split Split_type Start Sync Test Testall Testany Unlock Unlock_all Wait Waitall Waitany
    allgather allreduce alltoall barrier bcast bsend exscan gather ibsend improbe iprobe irecv
    isend issend mprobe probe recv reduce scan scatter send sendrecv ssend
    """.split()
)


#: The files of a run folder (README "Running", docs/CHECKPOINT.md), as a name or a path ending in
#: one; found in a string or an f-string's text. Their owner: rundir.py, the lock runlock.py.
RUN_FOLDER_FILE = re.compile(
    r"(?:^|/)\.?(checkpoint-|metrics\.jsonl|config\.toml|center\.pt|PREEMPTED|COMPLETED"
    r"|easgd\.lock)"
)
LOCK_FILE = "easgd.lock"
#: A variable that holds a run folder, and what changes, lists or joins a path onto it.
RUN_FOLDER_VARIABLE = re.compile(r"^run_?(dir|folder)$")
FILE_CHANGES = frozenset(
    "mkdir makedirs unlink remove rmdir rmtree rename replace touch write_text write_bytes "
    "glob rglob iterdir listdir scandir".split()
)


def _modules() -> dict[str, Path]:
    """Dotted names inside the package ("comm", "backend.cupy_backend") → files."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts) or "__init__"] = path
    return found


@cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _label(path: Path) -> str:
    return str(path.relative_to(PACKAGE.parents[1]))


def _imported_modules(tree: ast.Module) -> set[str]:
    """Names bound to imported modules anywhere in the file (``import threading``)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def mpi_uses(tree: ast.Module, label: str) -> list[str]:
    """Each import of mpi4py, use of the name ``MPI`` and MPI method call in one file."""
    modules = _imported_modules(tree)
    uses = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(
            a.name.split(".")[0] == "mpi4py" for a in node.names
        ):
            uses.append(f"{label}:{node.lineno}: imports mpi4py")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "mpi4py":
            uses.append(f"{label}:{node.lineno}: imports from mpi4py")
        elif isinstance(node, ast.Name) and node.id == "MPI":
            uses.append(f"{label}:{node.lineno}: uses MPI")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in MPI_METHODS
            and not (isinstance(node.func.value, ast.Name) and node.func.value.id in modules)
        ):
            uses.append(f"{label}:{node.lineno}: calls .{node.func.attr}()")
    return uses


def _docstrings(tree: ast.Module) -> set[int]:
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, kinds)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }


def _mentions_run_folder(node: ast.AST) -> bool:
    return any(
        (isinstance(n, ast.Name) and RUN_FOLDER_VARIABLE.match(n.id))
        or (isinstance(n, ast.Attribute) and RUN_FOLDER_VARIABLE.match(n.attr))
        for n in ast.walk(node)
    )


def run_folder_uses(tree: ast.Module, label: str) -> list[tuple[str, str]]:
    """(file name or "", where and what) for each string naming a run-folder file (docstrings
    aside: they touch nothing), each listing, creating or deleting call on a run folder
    variable, and each path joined onto one."""
    docstrings = _docstrings(tree)
    uses = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            found = RUN_FOLDER_FILE.search(node.value)
            if found and id(node) not in docstrings:
                uses.append((found.group(1), f"{label}:{node.lineno}: names {node.value!r}"))
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in FILE_CHANGES and _mentions_run_folder(node):
                uses.append(("", f"{label}:{node.lineno}: calls {name}() on a run folder"))
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            if _mentions_run_folder(node.left):
                uses.append(("", f"{label}:{node.lineno}: joins a path onto a run folder"))
    return uses


def _base_name(base: ast.expr) -> str | None:
    if isinstance(base, ast.Name):
        return base.id
    if isinstance(base, ast.Attribute):
        return base.attr
    return None


def exception_classes() -> list[tuple[str, str]]:
    """(class name, where) of every class in the package that derives from an exception."""
    known = {
        n for n, v in vars(builtins).items() if isinstance(v, type) and issubclass(v, BaseException)
    }
    classes = [
        (node, path)
        for path in _modules().values()
        for node in ast.walk(_tree(path))
        if isinstance(node, ast.ClassDef)
    ]
    found: dict[str, str] = {}
    grew = True
    while grew:  # a class is an exception if one of its bases is (in any module, any order)
        grew = False
        for node, path in classes:
            if node.name not in found and any(_base_name(b) in known for b in node.bases):
                found[node.name] = f"{_label(path)}:{node.lineno}"
                known.add(node.name)
                grew = True
    return sorted(found.items())


def _package_imports(name: str, path: Path) -> set[str]:
    """The package's modules that ``name`` (at ``path``) imports, at any depth of its code."""
    if name == "__init__":  # the package's own __init__: its relative imports start at the top
        package = []
    else:
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    targets = set()
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
            stem = [*base, *(node.module.split(".") if node.module else [])]
            # ``from . import x`` / ``from .backend import cupy_backend``: x may be a module.
            candidates = [".".join(stem)] + [".".join([*stem, a.name]) for a in node.names]
            targets.update(c for c in candidates if c)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "easgd_mpi":
                    targets.add(".".join(parts[1:]))
    return targets


def reachable_from(start: str) -> dict[str, str]:
    """Every package module that ``start`` imports, directly or not → the module importing it."""
    modules = _modules()
    seen: dict[str, str] = {}
    todo = [start]
    while todo:
        current = todo.pop()
        for target in _package_imports(current, modules[current]):
            # Importing a.b runs a's __init__ first.
            parts = target.split(".")
            for k in range(1, len(parts) + 1):
                mod = ".".join(parts[:k])
                if mod in modules and mod not in seen and mod != start:
                    seen[mod] = current
                    todo.append(mod)
    return seen


def test_only_the_mpi_modules_touch_mpi():
    uses = [
        use
        for name, path in _modules().items()
        if name not in MPI_MODULES
        for use in mpi_uses(_tree(path), _label(path))
    ]
    assert not uses, (
        "MPI calls belong in "
        + ", ".join(f"{m}.py" for m in sorted(MPI_MODULES))
        + "; move these into a named function there:\n"
        + "\n".join(uses)
    )


def test_the_mpi_modules_are_seen_to_use_mpi():
    # The rule above means something only if the scan finds MPI where it is.
    for name in MPI_MODULES:
        path = _modules()[name]
        assert mpi_uses(_tree(path), _label(path)), name


def test_only_rundir_touches_run_folder_files():
    uses = [
        where
        for name, path in _modules().items()
        if name != "rundir"
        for found, where in run_folder_uses(_tree(path), _label(path))
        if not (name == "runlock" and found == LOCK_FILE)
    ]
    assert not uses, (
        "the files of a run folder are rundir.py's (its lock runlock.py's): use its functions "
        "or RunFolder instead:\n" + "\n".join(uses)
    )


def test_rundir_and_runlock_are_seen_to_touch_run_folder_files():
    # The rule above means something only if the scan finds the files where they are handled.
    found = {f for f, _ in run_folder_uses(_tree(_modules()["rundir"]), "rundir.py")}
    assert {
        "checkpoint-",
        "metrics.jsonl",
        "config.toml",
        "center.pt",
        "PREEMPTED",
        "COMPLETED",
    } <= found
    runlock = _modules()["runlock"]
    assert {f for f, _ in run_folder_uses(_tree(runlock), "runlock.py")} == {LOCK_FILE}


@pytest.mark.parametrize(
    "source, found",
    [
        ("p = Path(run_dir) / 'metrics.jsonl'\n", True),
        ("p = self.run_dir / name\n", True),
        ("for s in self.run_dir.glob(pattern):\n    s.unlink()\n", True),
        ("def f(run_folder):\n    os.makedirs(run_folder)\n", True),
        ("name = f'checkpoint-{n:06d}.h5'\n", True),
        ("target = f'{folder}/COMPLETED'\n", True),
        ("torch.save(state, Path(out) / 'center.pt')\n", True),
        ("stale = '.checkpoint-*.h5.tmp-*'\n", True),
        ("say(f'run folder {run_dir}: each run has its own config.toml')\n", False),
        ("found = find_checkpoint(spec, cfg.run_dir)\n", False),
        ('def f():\n    """config.toml and metrics.jsonl: read by plot."""\n', False),
        ("output.parent.mkdir(parents=True)\n", False),
    ],
)
def test_the_scan_tells_run_folder_files_from_other_text(source, found):
    assert bool(run_folder_uses(ast.parse(source), "probe.py")) is found


def test_every_exception_class_is_in_errors_py():
    classes = exception_classes()
    assert {"EasgdError", "ConfigError", "AgreedError"} <= {name for name, _ in classes}
    elsewhere = [f"{where}: {name}" for name, where in classes if "/errors.py:" not in where]
    assert not elsewhere, "exception classes belong in errors.py:\n" + "\n".join(elsewhere)


def test_config_imports_nothing_that_touches_mpi():
    reached = reachable_from("config")
    bad = {m: via for m, via in reached.items() if m in NOT_FROM_CONFIG}
    assert not bad, "config.py must not import (even through another module): " + ", ".join(
        f"{m} (imported by {via})" for m, via in sorted(bad.items())
    )


@pytest.mark.parametrize("part", CONFIG_PARTS)
def test_the_parts_of_config_import_only_errors(part):
    assert part in reachable_from("config"), f"config.py no longer imports {part}.py"
    reached = reachable_from(part)
    assert set(reached) <= {"errors"}, f"{part}.py must import no module of the package but " + (
        "errors.py (config.py imports it): " + ", ".join(sorted(set(reached) - {"errors"}))
    )


@pytest.mark.parametrize(
    "source, found",
    [
        ("from mpi4py import MPI\n", True),
        ("import mpi4py\n", True),
        ("def f(c):\n    return c.bcast(1)\n", True),
        ("def f(w):\n    w.Allreduce(None, None)\n", True),
        ("import threading\nlock = threading.Lock()\n", False),
        ("def f(d):\n    return d.get('x')\n", False),
    ],
)
def test_the_scan_tells_mpi_from_other_calls(source, found):
    assert bool(mpi_uses(ast.parse(source), "probe.py")) is found


def _top(name: str) -> str:
    """A module's floor-plan unit: the package's files, its sub-packages as one module each."""
    return name.split(".")[0] if name else "__init__"


def import_graph() -> dict[str, set[str]]:
    """unit → the units it imports (at any depth of its code), self-imports left out."""
    graph: dict[str, set[str]] = {}
    modules = _modules()
    for name, path in modules.items():
        unit = _top(name)
        targets = {
            _top(t) for t in _package_imports(name, path) if _top(t) in {_top(m) for m in modules}
        }
        graph.setdefault(unit, set()).update(targets - {unit})
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_packages_imports_run_one_way():
    cycle = find_cycle(import_graph())
    assert cycle is None, "an import cycle (docs/ARCHITECTURE.md §1.1): " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    graph = import_graph()
    graph["errors"] = {"session"}  # errors.py importing the session would close a loop
    assert find_cycle(graph) is not None


def floors(graph: dict[str, set[str]]) -> dict[str, int]:
    """unit → its floor: 1 + the highest floor of what it imports (1 for a unit importing none)."""
    found: dict[str, int] = {}

    def floor(unit):
        if unit not in found:
            found[unit] = 1 + max((floor(t) for t in graph.get(unit, ())), default=0)
        return found[unit]

    for unit in graph:
        floor(unit)
    return found


ARCHITECTURE = PACKAGE.parents[1] / "docs" / "ARCHITECTURE.md"
TABLE_ROW = re.compile(r"^\| (\d+) \| `([\w.]+?)(?:\.py|/)?` \| .* \| ([^|]*) \|$")


def documented_modules() -> dict[str, tuple[int, set[str]]]:
    """docs/ARCHITECTURE.md §1.2's module table: unit → (floor, the package units it imports)."""
    rows = {}
    for line in ARCHITECTURE.read_text(encoding="utf-8").splitlines():
        row = TABLE_ROW.match(line)
        if row:
            imports = row.group(3).strip()
            named = {n.strip().strip("`") for n in imports.split(",")} if imports != "—" else set()
            rows[row.group(2)] = (int(row.group(1)), named)
    return rows


def test_the_architecture_module_table_is_the_code():
    """Every module is in §1.2's table with the floor and the imports the code has."""
    graph = import_graph()
    code = {unit: (floor, graph[unit]) for unit, floor in floors(graph).items()}
    documented = documented_modules()
    assert set(documented) == set(code), (
        "modules missing from docs/ARCHITECTURE.md §1.2: "
        f"{sorted(set(code) - set(documented))}; in the table but not in the code: "
        f"{sorted(set(documented) - set(code))}"
    )
    wrong = {
        unit: f"table {documented[unit]}, code {(floor, sorted(imports))}"
        for unit, (floor, imports) in code.items()
        if documented[unit] != (floor, imports)
    }
    assert not wrong, "docs/ARCHITECTURE.md §1.2 differs from the code: " + repr(wrong)
