"""Repository-level contracts: every package lists its stages; CI runs the README's test command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["price_fusion", "ehr_embedded", "cnc_gcode", "implant_dims", "building_embed"]


@pytest.mark.parametrize("package", PACKAGES)
def test_python_dash_m_package_lists_stages(package: str) -> None:
    proc = subprocess.run([sys.executable, "-m", package], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert package in proc.stdout
    if (ROOT / package / "train.py").exists():
        assert f"python -m {package}.train" in proc.stdout


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "./scripts/test.sh" in readme and "./scripts/test.sh" in ci


def _lock() -> dict[str, str]:
    """constraints.txt as normalised name -> version (common.config.package_name, as pip compares names)."""
    from common.config import package_name

    locked = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"constraints.txt: {line!r} is not NAME==VERSION (regenerate with scripts/lock.sh)"
            locked[package_name(name.strip())] = version.strip()
    return locked


def test_the_install_is_the_lock() -> None:
    """Every locked package installed here has the locked version, and every dependency in pyproject.toml is locked: a
    drifted venv or a dependency added without `scripts/lock.sh` fails here. (Tools a developer adds to .venv by hand,
    absent from the lock, are allowed.)"""
    import tomllib

    from packaging.requirements import Requirement

    from common.config import installed_packages, package_name

    locked = _lock()
    assert locked["torch"] == "2.14.1" and locked["torchvision"] == "0.29.1"  # the wheels these machines carry
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*pyproject["dependencies"], *pyproject["optional-dependencies"]["dev"]]
    unlocked = [r for r in wanted if package_name(Requirement(r).name) not in locked]
    assert not unlocked, f"pyproject.toml dependencies missing from constraints.txt (run scripts/lock.sh): {unlocked}"
    # the same record every run writes into config.yaml (_meta.environment.packages)
    drift = {name: (version, locked[name]) for name, version in installed_packages().items()
             if name in locked and locked[name] != version}
    assert not drift, f"installed (version, locked) differ from constraints.txt: {drift}; rerun ./scripts/test.sh"


_STAGE_CHECK = r'''
import contextlib, importlib, io, json, sys
results = {}
for name in sys.argv[1:]:
    try:
        module = importlib.import_module(name)
    except Exception as exc:  # reported, the test fails on it
        results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        continue
    main = getattr(module, "main", None)
    if not callable(main):
        results[name] = {"error": "no main(argv)"}
        continue
    out = io.StringIO()
    code = None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        try:
            main(["--help"])
        except SystemExit as exc:
            code = exc.code
    undocumented = []
    config_class = getattr(main, "config_class", None)
    if config_class is not None:
        from common.config import describe_config
        undocumented = [key for key, _, _, doc in describe_config(config_class) if not doc]
    results[name] = {"help_exit": code, "help": out.getvalue(), "undocumented": undocumented}
print(json.dumps(results))
'''


def _documented_stages() -> list[str]:
    """Every `python -m <pkg>.<stage>` a README or script names, and every stage `python -m <pkg>` lists."""
    import ast
    import re

    texts = [p.read_text() for p in [ROOT / "README.md", *ROOT.glob("*/README.md"), *(ROOT / "scripts").rglob("*")]
             if p.is_file()]
    pattern = re.compile(rf"python -m ((?:{'|'.join(PACKAGES)})(?:\.[a-z_]+)+)")
    stages = {m for text in texts for m in pattern.findall(text)}
    for package in PACKAGES:
        tree = ast.parse((ROOT / package / "__main__.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "STAGES" for t in node.targets):
                stages |= {f"{package}.{k.value}" for k in node.value.keys}  # type: ignore[union-attr]
    return sorted(stages)


def test_every_documented_stage_has_a_main_and_a_full_help() -> None:
    """`python -m <pkg>.<stage> --help` works for every stage the READMEs describe; a config-driven stage's help
    lists its config keys with types and defaults (common.cli.config_main), and every key has a docstring."""
    import json

    stages = _documented_stages()
    assert "ehr_embedded.predict" in stages and "price_fusion.train" in stages
    proc = subprocess.run([sys.executable, "-c", _STAGE_CHECK, *stages], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    problems = {name: r["error"] for name, r in results.items() if "error" in r}
    assert not problems, problems
    for name, result in results.items():
        assert result["help_exit"] == 0, f"{name} --help exited {result['help_exit']}"
        if "--config" in result["help"]:
            assert "config keys" in result["help"] and " = " in result["help"], f"{name}: --help lists no config keys"
        assert result["undocumented"] == [], f"{name}: config keys without a docstring: {result['undocumented']}"


def test_test_file_names_are_unique_across_packages() -> None:
    # tests/<pkg>/ are not packages (rootdir-relative imports): two files of one name make collection of the whole
    # suite fail with "import file mismatch", although each package's folder passes on its own
    names: dict[str, list[str]] = {}
    for path in sorted((ROOT / "tests").rglob("test_*.py")):
        names.setdefault(path.name, []).append(str(path.relative_to(ROOT)))
    assert not {name: paths for name, paths in names.items() if len(paths) > 1}


def _first_party_imports(path: Path, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The first-party modules `module` (source at `path`) imports anywhere in its body: module level, inside
    functions and classes, relative or absolute. `from pkg import name` counts as importing `pkg.name` when that is a
    module, else `pkg` itself."""
    import ast

    base = module if is_package else module.rpartition(".")[0]
    imported: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names if alias.name in known}
        elif isinstance(node, ast.ImportFrom):
            source = node.module or ""
            if node.level:
                parts = base.split(".")
                anchor = ".".join(parts[: len(parts) - (node.level - 1)])
                source = f"{anchor}.{source}" if source else anchor
            for alias in node.names:
                if f"{source}.{alias.name}" in known:
                    imported.add(f"{source}.{alias.name}")
                elif source in known:
                    imported.add(source)
    imported.discard(module)
    return imported


def _import_graph() -> dict[str, set[str]]:
    """Module name -> the first-party modules it imports, over `common` and every package."""
    sources: dict[str, tuple[Path, bool]] = {}
    for top in ["common", *PACKAGES]:
        for path in sorted((ROOT / top).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            sources[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    known = set(sources)
    return {name: _first_party_imports(path, name, is_package, known) for name, (path, is_package) in sources.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph` as [a, b, ..., a], or None when the graph has none (iterative depth-first
    search: a module met again while still on the search path closes a circle)."""
    done: set[str] = set()
    for root in sorted(graph):
        if root in done:
            continue
        path: list[str] = [root]
        on_path = {root}
        pending = [iter(sorted(graph[root]))]
        while pending:
            nxt = next(pending[-1], None)
            if nxt is None:
                pending.pop()
                done.add(path[-1])
                on_path.discard(path.pop())
            elif nxt in on_path:
                return [*path[path.index(nxt):], nxt]
            elif nxt not in done:
                path.append(nxt)
                on_path.add(nxt)
                pending.append(iter(sorted(graph[nxt])))
    return None


def test_cycle_finder_reports_a_circle_and_accepts_a_tree() -> None:
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_first_party_modules_import_no_circle() -> None:
    """No module of `common` or of a package reaches itself through its imports, counting imports inside functions
    (a function-local import hides a circle from the interpreter until that function runs, not from the reader)."""
    graph = _import_graph()
    assert {"common.cli", "common.checkpoint", "ehr_embedded.evaluate"} <= set(graph)
    assert "common.checkpoint" in graph["building_embed.publish.convert_to_hf"]  # `from common import checkpoint`
    assert "common.config" in graph["common.cli"]  # imported inside `config_main`, not at module level
    assert "price_fusion.config" in graph["price_fusion.model"]  # `from .config import ModelConfig`
    cycle = _find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])
