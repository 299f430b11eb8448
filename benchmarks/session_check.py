"""The CPU half of ``benchmarks/gpu_session.sh --dry-run``: every step's command is checked
without measuring anything, so that the one GPU run does not lose a step to a typo.

Reads one step a line on stdin, ``NAME<TAB>COMMAND`` (the command as bash's ``printf %q``
quotes it), and for each:

- ``PY path/to/script.py ARGS`` and ``PY -m module ARGS``: the script (module) runs as
  ``__main__`` in this process with ``argparse.ArgumentParser.parse_args`` stopped right after
  a successful parse: its imports must succeed and ``ARGS`` must parse. Nothing is measured or
  written.
- ``PY -m pytest ARGS``: ``pytest --collect-only`` with the same arguments in a subprocess: the
  options must exist, the files must import and the selection must not be empty.
  ``--junitxml`` goes to a temporary folder; ``-n N`` becomes ``-n 0`` (no workers spawned).
  Options of a plugin missing here (pytest-timeout, pytest-xdist; both on the GPU machine) are
  dropped with a note, as the session itself drops them.

Prints ``### check NAME: ok`` or ``### check NAME: FAILED ...`` per step; exit status 1 if any
step failed. Usage (what the session script does)::

    printf 'rope\\t%s\\n' "$(printf '%q ' python3 benchmarks/bench_rope.py --shapes wan5b-720p)" |
        python3 benchmarks/session_check.py
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import runpy
import shlex
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Parsed(BaseException):
    """Raised by the patched ``parse_args`` once the arguments parsed (a BaseException: a
    script's own ``except Exception`` around its start must not swallow it)."""


@contextlib.contextmanager
def _stop_after_parse():
    orig = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        raise _Parsed(orig(self, args, namespace))

    argparse.ArgumentParser.parse_args = parse_args
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args = orig


def check_python(argv: list[str]) -> str | None:
    """Run ``argv`` (``[script, *args]`` or ``["-m", module, *args]``) up to its argument parse.
    Returns None when the arguments parsed, else what went wrong."""
    if argv[0] == "-m":
        target, args, run = argv[1], argv[2:], lambda: runpy.run_module(argv[1], run_name="__main__",
                                                                         alter_sys=True)
        if importlib.util.find_spec(target) is None:
            return f"no module {target}"
    else:
        target, args = argv[0], argv[1:]
        path = target if os.path.isabs(target) else os.path.join(ROOT, target)
        if not os.path.isfile(path):
            return f"no script {target}"
        run = lambda: runpy.run_path(path, run_name="__main__")  # noqa: E731
    old_argv, old_path = sys.argv[:], sys.path[:]
    sys.argv = [target, *args]
    err = io.StringIO()
    try:
        with _stop_after_parse(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            run()
    except _Parsed:
        return None
    except SystemExit as e:  # argparse's error exit (2), or a script exiting before it parsed
        said = [ln.strip() for ln in err.getvalue().strip().splitlines() if ln.strip()]
        return f"exit {e.code} before its arguments parsed: {' | '.join(said[-2:])[-600:]}"
    except BaseException as e:  # noqa: BLE001 - an import or start-up error is the finding
        return f"{type(e).__name__}: {e}"[:600]
    finally:
        sys.argv, sys.path[:] = old_argv, old_path
    return "ran to the end without parsing arguments"


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def pytest_collect_argv(args: list[str], tmp: str, notes: list[str]) -> list[str]:
    """``pytest ARGS`` turned into a collection that writes nothing outside ``tmp``."""
    out: list[str] = []
    it = iter(args)
    plugins = {"--timeout": "pytest_timeout", "-n": "xdist", "--dist": "xdist"}
    for a in it:
        key, _, val = a.partition("=")
        if key in plugins:
            val = val or next(it, "")
            if not _has(plugins[key]):
                notes.append(f"{key} {val} dropped: {plugins[key]} is not installed here")
                continue
            out += [key, "0" if key == "-n" else val]
        elif key == "--junitxml":
            out.append(f"--junitxml={os.path.join(tmp, 'junit.xml')}")
        elif a == "--junitxml":
            next(it, None)
            out.append(f"--junitxml={os.path.join(tmp, 'junit.xml')}")
        else:
            out.append(a)
    return [*out, "--collect-only"]


def check_pytest(args: list[str], python: str) -> tuple[str | None, list[str]]:
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        argv = [python, "-m", "pytest", *pytest_collect_argv(args, tmp, notes)]
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        try:
            res = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
        except subprocess.TimeoutExpired:
            return "pytest --collect-only timed out", notes
    tail = (res.stdout + res.stderr).strip().splitlines()
    if res.returncode != 0:  # 5: nothing selected; 4: usage error; 2: collection errors
        return f"pytest --collect-only exit {res.returncode}: " + " | ".join(tail[-8:]), notes
    notes.append(tail[-1] if tail else "")
    return None, notes


def main(lines: list[str] | None = None) -> int:
    lines = sys.stdin.read().splitlines() if lines is None else lines
    failed = 0
    for line in lines:
        if not line.strip():
            continue
        name, _, cmd = line.partition("\t")
        words = shlex.split(cmd)
        if len(words) < 2:
            print(f"### check {name}: FAILED: no command")
            failed += 1
            continue
        python, argv = words[0], words[1:]
        notes: list[str] = []
        if argv[:2] == ["-m", "pytest"]:
            err, notes = check_pytest(argv[2:], sys.executable if python in ("python", "python3") else python)
        else:
            err = check_python(argv)
        if err is None:
            print(f"### check {name}: ok" + (f" ({'; '.join(n for n in notes if n)})" if notes else ""),
                  flush=True)
        else:
            failed += 1
            print(f"### check {name}: FAILED: {err}", flush=True)
    print(f"### check: {len([ln for ln in lines if ln.strip()]) - failed} commands parse, {failed} failed",
          flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
