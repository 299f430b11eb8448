"""The house rules of the package, read from the source with ``ast`` (nothing is imported).

- One top-level import: the repository's ``model/`` folder is the subpackage
  ``wildactor_kernels.model``; no file imports a top-level ``model``.
- Imports run one way: kernels (``wildactor_kernels``) <- ``wildactor_kernels.model`` <- the CLI
  (``wildactor_kernels.model.cli``); ``benchmarks/`` imports the library and is never imported by
  it. Lazy imports inside functions count, and so do ``importlib.import_module`` calls with a
  constant name.
- No import cycles between the package's modules.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = "wildactor_kernels"
MODEL = f"{PKG}.model"
CLI = f"{MODEL}.cli"


def _package_modules() -> dict[str, str]:
    """``{dotted module name: path}`` for every module of the distribution (as installed)."""
    mods = {}
    for top, name in ((os.path.join(ROOT, PKG), PKG), (os.path.join(ROOT, "model"), MODEL)):
        for dirpath, _, files in os.walk(top):
            rel = os.path.relpath(dirpath, top)
            base = name if rel == "." else name + "." + rel.replace(os.sep, ".")
            for f in files:
                if f.endswith(".py"):
                    mods[base if f == "__init__.py" else f"{base}.{f[:-3]}"] = os.path.join(dirpath, f)
    return mods


def _imports(path: str, module: str, is_pkg: bool) -> list[tuple[str, int]]:
    """Absolute names imported anywhere in the file (top level, functions, import_module)."""
    tree = ast.parse(open(path, encoding="utf-8").read(), filename=path)
    package = module if is_pkg else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module
            out.append((target, node.lineno))
            out += [(f"{target}.{a.name}", node.lineno) for a in node.names]  # maybe submodules
        elif isinstance(node, ast.Call):
            fn = node.func
            fname = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            if fname in ("import_module", "__import__") and node.args and isinstance(
                    node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                name = node.args[0].value
                out.append((package + name if name.startswith(".") else name, node.lineno))
    return out


def _graph() -> tuple[dict[str, set[str]], dict[str, list[tuple[str, int]]]]:
    mods = _package_modules()
    edges: dict[str, set[str]] = {m: set() for m in mods}
    raw: dict[str, list[tuple[str, int]]] = {}
    for m, path in mods.items():
        raw[m] = _imports(path, m, path.endswith("__init__.py"))
        for name, _ in raw[m]:
            if name in mods and name != m:
                edges[m].add(name)
    return edges, raw


def _layer(module: str) -> int:
    if module == CLI or module.startswith(CLI + "."):
        return 2
    if module == MODEL or module.startswith(MODEL + "."):
        return 1
    return 0


def test_no_top_level_model_or_benchmarks_import():
    bad = []
    for m, imports in _graph()[1].items():
        for name, line in imports:
            top = name.split(".")[0]
            if top in ("model", "benchmarks", "tests"):
                bad.append(f"{m}:{line} imports {name}")
    assert not bad, "the package imports outside itself:\n" + "\n".join(bad)


def test_tests_and_benchmarks_use_the_namespaced_model():
    bad = []
    for folder in ("tests", "benchmarks"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for f in files:
                if not f.endswith(".py"):
                    continue
                path = os.path.join(dirpath, f)
                for name, line in _imports(path, f"{folder}.{f[:-3]}", False):
                    if name == "model" or name.startswith("model."):
                        bad.append(f"{os.path.relpath(path, ROOT)}:{line} imports {name}")
    assert not bad, "top-level `model` imports (use wildactor_kernels.model):\n" + "\n".join(bad)


def test_imports_run_one_way():
    edges, raw = _graph()
    bad = []
    for m, imports in raw.items():
        for name, line in imports:
            if name in edges and _layer(name) > _layer(m):
                bad.append(f"{m}:{line} imports {name} (layer {_layer(m)} -> {_layer(name)})")
    assert not bad, ("upward imports (kernels <- wildactor_kernels.model <- cli):\n" + "\n".join(bad))


def _private_part(name: str, mods: dict[str, str]) -> str | None:
    """The package that owns the first private part (``_name``) of the dotted ``name``, or None.

    A private module (``wildactor_kernels._utils``) belongs to the package that holds it; a private
    name of a module (``wildactor_kernels.quant.linear._warn_once``) to that module's package.
    """
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.startswith("_") and not part.startswith("__"):
            holder = ".".join(parts[:i])
            is_pkg = holder in mods and os.path.basename(mods[holder]) == "__init__.py"
            return holder if is_pkg or holder not in mods else holder.rpartition(".")[0]
    return None


def _private_imports_across_packages(importer: str, imports, mods: dict[str, str]) -> list[str]:
    """Imports by ``importer`` of private names or modules owned by another package of the
    library; the model (``wildactor_kernels.model``) is a package of its own, not a part of the
    kernel package it is installed in."""
    bad = []
    for name, line in imports:
        if name.split(".")[0] != PKG:
            continue
        owner = _private_part(name, mods)
        if owner is None:
            continue
        inside = importer == owner or importer.startswith(owner + ".")
        if not inside or (_layer(importer) > 0) != (_layer(owner) > 0):
            bad.append(f"{importer}:{line} imports {name} (private to {owner})")
    return bad


def test_no_private_names_imported_across_packages():
    """``_names`` stay inside their package: the model never imports the kernels' private helpers,
    a kernel sub-package never imports another's, and benchmarks/ and the CLI use public names."""
    mods = _package_modules()
    bad = []
    for m, imports in _graph()[1].items():
        bad += _private_imports_across_packages(m, imports, mods)
    for dirpath, _, files in os.walk(os.path.join(ROOT, "benchmarks")):
        for f in sorted(files):
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                bad += _private_imports_across_packages(
                    f"benchmarks.{f[:-3]}", _imports(path, f"benchmarks.{f[:-3]}", False), mods)
    assert not bad, "private names imported across packages:\n" + "\n".join(bad)


def test_private_import_rule_sees_a_violation():
    mods = _package_modules()

    def flagged(importer: str, name: str) -> bool:
        return bool(_private_imports_across_packages(importer, [(name, 1)], mods))

    assert flagged(f"{MODEL}.quant", f"{PKG}.quant.linear._warn_once")
    assert flagged(f"{MODEL}.wildactor", f"{PKG}._utils.logger")
    assert flagged(f"{PKG}.rope.op", f"{PKG}.attention.kernels._block_d")
    assert flagged("benchmarks.x", f"{PKG}._utils.resolve_backend")
    assert flagged("benchmarks.x", f"{MODEL}.quant._to_int8")
    assert not flagged(f"{PKG}.rope.op", f"{PKG}._utils.resolve_backend")
    assert not flagged(f"{PKG}.quant.module", f"{PKG}.quant.linear._warn_once")
    assert not flagged(f"{MODEL}.cli", f"{MODEL}.quant._mode_of")
    assert not flagged("benchmarks.x", f"{PKG}.quant.scaled_mm_rowwise")


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
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

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def _without_package_inits(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    """Drop the edges *into* a package ``__init__`` from its own descendants.

    ``from . import name`` in a submodule reads a name its package re-exports; the package's
    ``__init__`` importing that submodule in turn is how every package is built, not a cycle of
    responsibilities. Every other edge stays.
    """
    paths = _package_modules()
    pkgs = {m for m in edges if os.path.basename(paths[m]) == "__init__.py"}
    return {m: {w for w in ws if not (w in pkgs and m.startswith(w + "."))} for m, ws in edges.items()}


def test_no_import_cycles():
    cycles = _cycles(_without_package_inits(_graph()[0]))
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_cycle_detector_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to copy the tracked tree")
def test_wheel_has_one_top_level_package(tmp_path):
    """``pip wheel --no-deps .`` of the tracked files: only ``wildactor_kernels/`` at the top, with
    the model package inside it and no benchmarks or tests."""
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    _copy_tracked_tree(src)
    out = tmp_path / "wheel"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "-w", str(out), str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    (whl,) = list(out.glob("*.whl"))
    names = zipfile.ZipFile(whl).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {PKG}, tops
    assert f"{PKG}/model/__init__.py" in names and f"{PKG}/model/wildactor.py" in names
    assert not any(n.startswith(("model/", "benchmarks/", "tests/")) for n in names)
    entry = zipfile.ZipFile(whl).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert f"wildactor = {CLI}:main" in entry
    assert f"{PKG}/attention/backend_table.json" in names  # package data the dispatcher reads
    assert any(".dist-info/" in n and n.rsplit("/", 1)[-1] == "LICENSE" for n in names), names[-8:]

    # Installed from the wheel, run from a folder outside the checkout: the namespaced model
    # imports, a top-level `model` does not exist, and the CLI's demo runs.
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site),
                        str(whl)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(site)
    probe = ("import wildactor_kernels, wildactor_kernels.model as m\n"
             "from wildactor_kernels.model import WildActor\n"
             "import wildactor_kernels.model.export, wildactor_kernels.model.parallel\n"  # subpackages too
             f"assert wildactor_kernels.__file__.startswith({str(site)!r}), wildactor_kernels.__file__\n"
             f"assert m.__file__.startswith({str(site)!r}), m.__file__\n"
             "import importlib.util\n"
             "assert importlib.util.find_spec('model') is None\n"
             "assert importlib.util.find_spec('benchmarks') is None\n")
    r = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    demo = ["demo", "--steps", "2", "--frames", "1", "--height", "4", "--width", "4", "--device", "cpu",
            "--repeats", "1", "--no-progress"]
    # the `wildactor` console script the wheel installs (its entry point), else the module
    script = site / "bin" / "wildactor"
    wildactor = [str(script)] if script.is_file() and os.name != "nt" else [sys.executable, "-m", CLI]
    r = subprocess.run([*wildactor, *demo], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, (r.stdout[-1500:], r.stderr[-1500:])
    assert "Traceback" not in r.stderr
    assert "OK: sampling with and without the reference cache agrees" in r.stdout
    # benchmarks/ is not installed: outside a checkout `wildactor bench` says so, in one line
    r = subprocess.run([*wildactor, "bench", "--device", "cpu"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, (r.stdout[-1500:], r.stderr[-1500:])
    assert "source checkout" in r.stderr and "Traceback" not in r.stderr, r.stderr


def _copy_tracked_tree(dst) -> None:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        if os.path.isfile(os.path.join(ROOT, rel)):
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(os.path.join(ROOT, rel), dst / rel)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to copy the tracked tree")
def test_editable_install_serves_the_namespaced_model(tmp_path):
    """``pip install -e .`` (PEP 660, setuptools' package_dir mapping) into a fresh environment:
    from a folder outside the checkout ``wildactor_kernels.model`` is the checkout's ``model/``
    folder, a top-level ``model`` or ``benchmarks`` does not exist, and ``wildactor bench`` finds
    the checkout."""
    pytest.importorskip("setuptools")
    src, venv = tmp_path / "src", tmp_path / "venv"
    _copy_tracked_tree(src)
    # A fresh environment that sees this one's packages as plain paths: this environment's own
    # .pth files (an editable install of another checkout among them) are not run there.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = str(venv / ("Scripts" if os.name == "nt" else "bin") / "python")
    purelib = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    import site
    with open(os.path.join(purelib, "deps.pth"), "w") as fh:
        fh.write("\n".join(site.getsitepackages()) + "\n")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--target", purelib, "-e", str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not os.path.exists(os.path.join(purelib, PKG))  # editable: served from the checkout
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    probe = ("import importlib.util, os\n"
             "import wildactor_kernels, wildactor_kernels.model as m\n"
             "from wildactor_kernels.model import WildActor\n"
             "from wildactor_kernels.model.export import TwoGraphRunner\n"
             f"src = {str(src)!r}\n"
             "assert wildactor_kernels.__file__ == os.path.join(src, 'wildactor_kernels', '__init__.py'), "
             "wildactor_kernels.__file__\n"
             "assert m.__file__ == os.path.join(src, 'model', '__init__.py'), m.__file__\n"
             "assert importlib.util.find_spec('model') is None\n"
             "assert importlib.util.find_spec('benchmarks') is None\n"
             "from wildactor_kernels.model.cli import find_checkout\n"
             "assert find_checkout() == src, find_checkout()\n")
    r = subprocess.run([py, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_bench_never_takes_site_packages_for_a_checkout(tmp_path, monkeypatch, capsys):
    """A site-packages folder where another distribution installed a top-level ``benchmarks``
    package is not a checkout: `wildactor bench` runs only a real checkout's scripts."""
    from wildactor_kernels.model import cli

    import wildactor_kernels

    site = tmp_path / "site-packages"
    for rel in ("wildactor_kernels/__init__.py", "wildactor_kernels/model/__init__.py",
                "benchmarks/__init__.py", "benchmarks/suite.py"):
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text("")
    monkeypatch.setattr(wildactor_kernels, "__file__", str(site / "wildactor_kernels" / "__init__.py"))
    elsewhere = tmp_path / "work" / "sub"
    elsewhere.mkdir(parents=True)
    assert cli.find_checkout(str(elsewhere)) is None
    monkeypatch.chdir(elsewhere)
    assert cli.main(["bench", "--device", "cpu"]) == 2
    assert "source checkout" in capsys.readouterr().err
    checkout = tmp_path / "work"
    for rel in ("setup.py", "wildactor_kernels/__init__.py", "model/__init__.py", "benchmarks/suite.py"):
        (checkout / rel).parent.mkdir(parents=True, exist_ok=True)
        (checkout / rel).write_text("")
    assert cli.find_checkout(str(elsewhere)) == str(checkout)
    (checkout / "setup.py").unlink()
    assert cli.find_checkout(str(elsewhere)) is None


def test_bench_runs_the_checkout_suite_with_the_callers_paths(tmp_path, monkeypatch):
    """`wildactor bench` starts ``python -m benchmarks.suite`` in the checkout, with the options
    unchanged except that a relative ``--json`` is the caller's, not a file inside the checkout."""
    from wildactor_kernels.model import cli

    seen = {}

    def fake_call(cmd, cwd=None, env=None):
        seen.update(cmd=cmd, cwd=cwd, env=env)
        return 0

    monkeypatch.setattr(subprocess, "call", fake_call)
    monkeypatch.chdir(tmp_path)
    argv = ["bench", "--suite", "model", "--json", "out/x.jsonl", "--json=y.jsonl", "--iters", "2"]
    assert cli.main(argv) == 0
    assert seen["cwd"] == ROOT
    assert seen["cmd"][1:3] == ["-m", "benchmarks.suite"]
    assert seen["cmd"][3:] == ["--suite", "model", "--json", str(tmp_path / "out" / "x.jsonl"),
                               f"--json={tmp_path / 'y.jsonl'}", "--iters", "2"]
    assert seen["env"]["PYTHONPATH"].split(os.pathsep)[0] == ROOT
