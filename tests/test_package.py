"""The package as shipped: one top-level name, no import circles, every module importable alone.

An installed wheel must put only ``fleetdrain`` into site-packages (``agent`` or ``drill`` at the
top would clash with anything else that ships one). A module-level import circle works or fails
depending on which module is imported first, so it is checked statically over the whole graph,
and each module is also imported on its own in a fresh interpreter.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import sysconfig
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fleetdrain.drill.report.model import DrillReport

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fleetdrain"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {
    _module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "__pycache__" not in p.parts
}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.Module, *, deferred: bool) -> list[ast.Import | ast.ImportFrom]:
    """The import statements of a module, except those under ``if TYPE_CHECKING:`` (never run).

    Without ``deferred``: only those run when the module is imported (top level, and inside
    top-level ``try``/``if`` blocks). With it: also those inside functions and classes, which
    run later; a circle through one of those works today and breaks the day the import moves.
    """
    found: list[ast.Import | ast.ImportFrom] = []
    todo: list[ast.AST] = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            todo += node.orelse
        elif isinstance(node, ast.If | ast.Try) or deferred:
            todo += list(ast.iter_child_nodes(node))
    return found


def _resolve(module: str, node: ast.Import | ast.ImportFrom, is_package: bool) -> set[str]:
    """The fleetdrain modules an import statement loads (including the packages on the way)."""
    targets: set[str] = set()
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            anchor = module.split(".")
            if not is_package:
                anchor.pop()
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join([*anchor, base] if base else anchor)
        names = [base] + [f"{base}.{alias.name}" for alias in node.names]
    for name in names:
        parts = name.split(".")
        # Importing a.b.c runs a, a.b and a.b.c.
        for i in range(1, len(parts) + 1):
            candidate = ".".join(parts[:i])
            if candidate in MODULES:
                targets.add(candidate)
    return targets


def import_graph(*, deferred: bool = False) -> dict[str, set[str]]:
    """Import edges between fleetdrain's modules (module level, or with ``deferred`` all).

    A module's own ancestors are left out: a package ``__init__`` that re-exports its
    submodules is imported before them and is not a circle.
    """
    graph: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        edges: set[str] = set()
        for node in _imports(tree, deferred=deferred):
            edges |= _resolve(name, node, path.name == "__init__.py")
        ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
        graph[name] = edges - ancestors - {name}
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module (the circles)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []
    counter = 0

    def visit(node: str) -> None:
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                item = stack.pop()
                on_stack.discard(item)
                component.append(item)
                if item == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return circles


def test_the_circle_finder_finds_a_circle() -> None:
    # The check below is only worth something if it can fail.
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_in_the_package_even_through_deferred_imports() -> None:
    graph = import_graph()
    assert "fleetdrain.agent.cli" in graph and len(graph) == len(MODULES)
    assert strongly_connected(graph) == []
    everything = import_graph(deferred=True)
    # cli imports wrap inside a function: the deferred graph must see that edge.
    assert "fleetdrain.agent.wrap" in everything["fleetdrain.agent.cli"]
    assert strongly_connected(everything) == []


def _import_alone(module: str) -> tuple[str, int, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", f"import {module}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return module, result.returncode, result.stderr[-2000:]


@pytest.mark.slow
def test_every_module_imports_on_its_own_in_a_fresh_interpreter() -> None:
    # __main__ modules run a program when imported.
    modules = [m for m in MODULES if not m.endswith("__main__")]
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        results = list(pool.map(_import_alone, modules))
    failed = {m: err for m, code, err in results if code != 0}
    assert not failed, failed


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fleetdrain's wheel, built from the files git tracks (not the working tree's leftovers)."""
    src = tmp_path_factory.mktemp("src")
    tracked = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for rel in filter(None, tracked):
        source = ROOT / os.fsdecode(rel)
        if not source.is_file():
            continue  # deleted in the working tree, not yet in git
        target = src / os.fsdecode(rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    [built] = out.glob("fleetdrain-*.whl")
    return built


@pytest.mark.slow
def test_the_wheel_puts_only_fleetdrain_into_site_packages(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    top = {name.split("/", 1)[0] for name in names}
    assert top == {"fleetdrain", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}
    # The whole package is in it, not only the agent.
    for module in (
        "fleetdrain/agent/cli.py",
        "fleetdrain/controller/drain/core.py",
        "fleetdrain/drill/runner.py",
        "fleetdrain/ops/status.py",
        "fleetdrain/cli.py",
    ):
        assert module in names, module
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    with zipfile.ZipFile(wheel) as zf:
        scripts = zf.read(entry_points).decode()
    assert "fleetdrain-agent = fleetdrain.agent.cli:main" in scripts
    assert "fleetdrain = fleetdrain.cli:main" in scripts


@pytest.mark.slow
def test_the_wheel_ships_the_template_the_drill_deploys(wheel: Path) -> None:
    # template.yaml stays at the root for `sam deploy`; the package has it beside the reader
    # (a symlink in the checkout), and the wheel has the file itself, byte for byte.
    packaged = PACKAGE / "drill" / "aws" / "template.yaml"
    assert packaged.resolve() == (ROOT / "template.yaml").resolve()
    with zipfile.ZipFile(wheel) as zf:
        shipped = zf.read("fleetdrain/drill/aws/template.yaml")
    assert shipped == (ROOT / "template.yaml").read_bytes()


# ------------------------------------------------------------------ installed: extras, the wheel


def _hide(tmp_path: Path, *modules: str) -> str:
    """A PYTHONPATH directory in which ``modules`` cannot be imported, as when they are not
    installed (``pip install fleetdrain`` without the extra)."""
    hidden = tmp_path / "hidden"
    for module in modules:
        (hidden / module).mkdir(parents=True)
        (hidden / module / "__init__.py").write_text(
            f'raise ModuleNotFoundError("No module named {module!r}", name={module!r})\n'
        )
    return str(hidden)


@pytest.mark.parametrize(
    ("hidden", "argv", "line"),
    [
        (
            "boto3",
            ["drill", "--scenario", "stop-task"],
            "fleetdrain drill: needs the drill extra: pip install 'fleetdrain[drill]' "
            "(no module named 'boto3')",
        ),
        (
            "moto",
            ["drill"],
            "fleetdrain drill: needs the drill extra: pip install 'fleetdrain[drill]' "
            "(no module named 'moto')",
        ),
        (
            "samtranslator",
            ["drill", "--json", "r.json"],
            "fleetdrain drill: needs the drill extra: pip install 'fleetdrain[drill]' "
            "(no module named 'samtranslator')",
        ),
        (
            "boto3",
            ["drill", "--aws", "--cluster", "ci"],
            "fleetdrain drill --aws: needs the drill extra: pip install 'fleetdrain[drill]' "
            "(no module named 'boto3')",
        ),
        (
            "boto3",
            ["status", "--table", "drains"],
            "fleetdrain status: needs the controller extra: pip install 'fleetdrain[controller]' "
            "(no module named 'boto3')",
        ),
    ],
)
def test_a_command_whose_extra_is_missing_says_what_to_install_and_exits_2(
    hidden: str, argv: list[str], line: str, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FLEETDRAIN_"))}
    env["PYTHONPATH"] = _hide(tmp_path, hidden)
    result = subprocess.run(
        [sys.executable, "-m", "fleetdrain.cli", *argv],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stderr, result.stdout) == (2, line + "\n", "")


def test_a_command_does_not_ask_for_what_it_does_not_use(tmp_path: Path) -> None:
    # status and drill --aws need boto3, not moto: without moto they get past the check.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FLEETDRAIN_"))}
    env["PYTHONPATH"] = _hide(tmp_path, "moto", "samtranslator")
    result = subprocess.run(
        [sys.executable, "-m", "fleetdrain.cli", "drill", "--aws"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "extra" not in result.stderr and result.stderr.startswith("fleetdrain: error:")


def _environment_without_fleetdrain(target: Path) -> Path:
    """A directory holding this environment's installed packages but fleetdrain (an editable
    install here): symlinks, so a fresh venv gets the dependencies without a download."""
    site = Path(sysconfig.get_paths()["purelib"])
    target.mkdir()
    for entry in site.iterdir():
        name = entry.name.lower()
        if name.startswith(("fleetdrain", "__editable__", "_virtualenv")) or name.endswith(".pth"):
            continue
        (target / entry.name).symlink_to(entry)
    return target


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_the_drill_runs_from_an_installed_wheel_outside_the_checkout(
    wheel: Path, tmp_path: Path
) -> None:
    # pip install '<wheel>[drill]' into a clean venv (dependencies: this environment's, by a
    # .pth; the wheel's own requirements must be met by them, --no-index), then the drill from
    # a directory outside the checkout, with nothing of the checkout on the path.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    deps = _environment_without_fleetdrain(tmp_path / "deps")
    (Path(purelib) / "deps.pth").write_text(f"{deps}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env = {k: v for k, v in env.items() if not k.startswith(("AWS_", "FLEETDRAIN_"))}
    pip = [sys.executable, "-m", "pip", "--python", str(python), "--disable-pip-version-check"]
    install = subprocess.run(
        [*pip, "install", "-q", "--no-index", f"{wheel}[drill]"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    where = subprocess.run(
        [str(python), "-c", "import fleetdrain.drill.aws.template as t; print(t.TEMPLATE)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    template = Path(where)
    assert template.is_relative_to(purelib) and template.is_file() and not template.is_symlink()
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    drill = [str(venv / "bin" / "fleetdrain"), "drill", "--scenario", "stop-task"]
    result = subprocess.run(
        [*drill, "--json", "report.json", "--workdir", "work"],
        cwd=run_dir,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = DrillReport.read_json(run_dir / "report.json")
    (scenario,) = report.scenarios
    assert (scenario.name, scenario.ok, scenario.lost) == ("stop-task", True, 0), scenario.notes
    assert scenario.passed >= 1
