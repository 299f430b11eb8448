"""One kernel dialect across the library, read from the source with ``ast`` (nothing is imported).

- Inside every ``@triton.jit`` function: fla's prefixes (``p_`` pointers, ``o_`` offsets, ``m_``
  masks, ``b_`` register blocks, ``i_`` program ids), constexpr parameters in capitals, and none
  of the tutorial names (``*_ptr``, ``offs_*``, ``mask``, ``acc``, ``pid``, ``m_i`` as a max).
- Launchers are named ``<op>_fwd`` / ``<op>_bwd`` and entries ``<op>_triton``.
- The shared plumbing lives in ``wildactor_kernels/_utils.py`` only: dot flags, autotune configs
  under the interpreter, fake/meta registration.
- Every constant is defined once.
"""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG_DIR = os.path.join(ROOT, "wildactor_kernels")
UTILS = os.path.join(PKG_DIR, "_utils.py")

PREFIXES = ("p_", "o_", "m_", "b_", "i_")
TUTORIAL_NAMES = {"mask", "acc", "pid", "m_i", "l_i", "offs", "x_ptr", "out_ptr"}
# public names of kernel modules that are neither launchers nor entries, with what they are
NOT_LAUNCHERS = {
    "fp8_store_mode": "how the FP8 quantizer stores on this device (a query, launches nothing)",
    "fp8_block_m": "the query tile the 8-bit attention kernel used (a query)",
    "hopper_supported": "why the Hopper kernel cannot take these tensors (a query)",
    "hopper_layout_reason": "the layout half of hopper_supported (a query)",
}


def _library_files(*tops: str) -> list[str]:
    out = []
    for top in tops:
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            out += [os.path.join(dirpath, f) for f in sorted(files) if f.endswith(".py")]
    return sorted(out)


def _tree(path: str) -> ast.Module:
    return ast.parse(open(path, encoding="utf-8").read(), filename=path)


def _is_jit(fn: ast.FunctionDef) -> bool:
    return any(ast.unparse(d).split("(")[0] in ("triton.jit", "jit") for d in fn.decorator_list)


def _jit_functions() -> list[tuple[str, ast.FunctionDef]]:
    out = []
    for path in _library_files("wildactor_kernels"):
        out += [(os.path.relpath(path, ROOT), n) for n in ast.walk(_tree(path))
                if isinstance(n, ast.FunctionDef) and _is_jit(n)]
    return out


def _calls(node: ast.AST) -> set[str]:
    return {ast.unparse(n.func) for n in ast.walk(node) if isinstance(n, ast.Call)}


def _stored(fn: ast.FunctionDef):
    """``(name, value, line)`` of every plain assignment inside ``fn``."""
    for n in ast.walk(fn):
        if isinstance(n, ast.Assign):
            for t in n.targets:
                for x in ast.walk(t):
                    if isinstance(x, ast.Name):
                        yield x.id, n.value, n.lineno
        elif isinstance(n, (ast.AnnAssign, ast.AugAssign)) and isinstance(n.target, ast.Name) and n.value:
            yield n.target.id, n.value, n.lineno
        elif isinstance(n, ast.For):
            for x in ast.walk(n.target):
                if isinstance(x, ast.Name):
                    yield x.id, None, n.lineno


def dialect_problems(fn: ast.FunctionDef, where: str) -> list[str]:
    bad = []
    for a in fn.args.args:
        if a.annotation is not None and "constexpr" in ast.unparse(a.annotation) and not a.arg.isupper():
            bad.append(f"{where}:{fn.lineno} {fn.name}: constexpr parameter {a.arg!r} is not in capitals")
        if a.arg in TUTORIAL_NAMES or a.arg.endswith("_ptr") or a.arg.startswith("offs"):
            bad.append(f"{where}:{fn.lineno} {fn.name}: parameter {a.arg!r} (tutorial name; use p_/o_/m_)")
    for name, value, line in _stored(fn):
        calls = _calls(value) if value is not None else set()
        if name in TUTORIAL_NAMES or name.endswith("_ptr") or name.startswith("offs"):
            bad.append(f"{where}:{line} {fn.name}: {name!r} is a tutorial name (fla prefixes: {PREFIXES})")
        if "tl.program_id" in calls and not name.startswith("i_"):
            bad.append(f"{where}:{line} {fn.name}: program id {name!r} without the i_ prefix")
        func = ast.unparse(value.func) if isinstance(value, ast.Call) else None
        if func == "tl.arange" and not name.startswith("o_"):
            bad.append(f"{where}:{line} {fn.name}: offsets {name!r} (tl.arange) without the o_ prefix")
        if func in ("tl.make_block_ptr", "tl.make_tensor_descriptor"):
            if not name.startswith(("p_", "desc_")):
                bad.append(f"{where}:{line} {fn.name}: block pointer {name!r} without the p_ prefix")
        if name.startswith("m_") and calls & {"tl.max", "tl.maximum", "tl.min", "tl.minimum", "tl.sum"}:
            bad.append(f"{where}:{line} {fn.name}: {name!r} holds a reduction, but m_ means a mask")
        if func == "tl.zeros" and not name.startswith("b_"):
            bad.append(f"{where}:{line} {fn.name}: register block {name!r} without the b_ prefix")
    return bad


def test_dialect_checker_catches_tutorial_names():
    src = ("@triton.jit\n"
           "def k(x_ptr, n, block: tl.constexpr):\n"
           "    pid = tl.program_id(0)\n"
           "    offs = tl.arange(0, 16)\n"
           "    m_i = tl.max(tl.load(x_ptr + offs), 0)\n"
           "    acc = tl.zeros((16,), dtype=tl.float32)\n")
    fn = ast.parse(src).body[0]
    bad = "\n".join(dialect_problems(fn, "k.py"))
    for needle in ("'block' is not in capitals", "'x_ptr' (tutorial", "program id 'pid'",
                   "'offs' is a tutorial", "'m_i' holds a reduction", "'acc' is a tutorial"):
        assert needle in bad, bad
    ok = ast.parse("@triton.jit\ndef k(p_x, N, BLOCK: tl.constexpr):\n    i_m = tl.program_id(0)\n"
                   "    o_n = tl.arange(0, BLOCK)\n    m_n = o_n < N\n"
                   "    b_x = tl.load(p_x + o_n, mask=m_n)\n").body[0]
    assert dialect_problems(ok, "k.py") == []


def test_every_kernel_speaks_the_fla_dialect():
    fns = _jit_functions()
    assert len(fns) > 20, [f.name for _, f in fns]  # every kernel file was read
    bad = [p for where, fn in fns for p in dialect_problems(fn, where)]
    assert not bad, "kernels outside the fla dialect:\n" + "\n".join(bad)


def _kernel_modules() -> list[str]:
    return [p for p in _library_files("wildactor_kernels")
            if any(isinstance(fn, ast.FunctionDef) and _is_jit(fn) for fn in ast.walk(_tree(p)))]


def _all_names(tree: ast.Module) -> list[str]:
    for n in tree.body:
        if isinstance(n, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in n.targets):
            return list(ast.literal_eval(n.value))
    return []


def test_launchers_and_entries_are_named_one_way():
    mods = _kernel_modules()
    assert {os.path.relpath(p, PKG_DIR) for p in mods} >= {
        os.path.join("rope", "kernels.py"), os.path.join("attention", "kernels.py"),
        os.path.join("lora", "kernels.py"), os.path.join("quant", "kernels.py")}
    bad, entries = [], []
    for path in mods:
        tree = _tree(path)
        public_fns = {n.name for n in tree.body
                      if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")}
        where = os.path.relpath(path, ROOT)
        for name in sorted(public_fns):
            if name in NOT_LAUNCHERS:
                continue
            if not name.endswith(("_fwd", "_bwd", "_triton")):
                bad.append(f"{where}: public {name!r} is neither a launcher (<op>_fwd/<op>_bwd) nor an "
                           f"entry (<op>_triton)")
        # the jit kernels themselves are private, and every public function is exported
        bad += [f"{where}: kernel {n.name!r} is public" for n in tree.body
                if isinstance(n, ast.FunctionDef) and _is_jit(n) and not n.name.startswith("_")]
        missing = public_fns - set(_all_names(tree))
        bad += [f"{where}: {name!r} is public but not in __all__" for name in sorted(missing)]
        entries += [n for n in public_fns if n.endswith("_triton")]
    assert not bad, "\n".join(bad)
    assert len(entries) == len(set(entries)), f"two entries of one op: {sorted(entries)}"


def test_shared_kernel_plumbing_lives_in_utils():
    bad = []
    for path in _library_files("wildactor_kernels", "model"):
        tree, where = _tree(path), os.path.relpath(path, ROOT)
        for n in ast.walk(tree):
            if isinstance(n, ast.FunctionDef) and path != UTILS and n.name.lstrip("_") in (
                    "dot_flags", "autotune_configs", "register_fake", "interpreter_active"):
                bad.append(f"{where}:{n.lineno} defines {n.name} again (it is in _utils.py)")
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and path != UTILS:
                fname = ast.unparse(n.func)
                if n.func.attr == "register_fake" or (n.func.attr == "register_kernel" and n.args
                                                      and ast.unparse(n.args[0]) == "'meta'"):
                    bad.append(f"{where}:{n.lineno} registers a fake/meta kernel by hand ({fname}); "
                               f"use _utils.register_fake")
                if fname in ("torch.library.register_fake", "torch.library.impl_abstract"):
                    bad.append(f"{where}:{n.lineno} uses {fname}; use _utils.register_fake")
            if isinstance(n, ast.FunctionDef):
                for d in n.decorator_list:
                    if "register_fake" in ast.unparse(d) or "impl_abstract" in ast.unparse(d):
                        bad.append(f"{where}:{n.lineno} decorates {n.name} with {ast.unparse(d)}")
    assert not bad, "\n".join(bad)


def _builds_with_autotune_configs(expr: ast.AST, module: ast.Module) -> bool:
    """Whether an autotune ``configs=`` expression goes through ``_utils.autotune_configs``:
    directly, through a module-level name, or through a module-level function that calls it."""
    if "autotune_configs" in _calls(expr):
        return True
    defs = {n.name: n for n in module.body if isinstance(n, ast.FunctionDef)}
    names = {n.id for n in ast.walk(expr) if isinstance(n, ast.Name)}
    for node in module.body:
        if isinstance(node, ast.Assign) and {t.id for t in node.targets if isinstance(t, ast.Name)} & names:
            if "autotune_configs" in _calls(node.value):
                return True
    return any(name in defs and "autotune_configs" in _calls(defs[name]) for name in names)


def test_every_autotune_goes_through_the_interpreter_rule():
    bad, seen = [], 0
    for path in _library_files("wildactor_kernels"):
        tree = _tree(path)
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef):
                continue
            for d in fn.decorator_list:
                if isinstance(d, ast.Call) and ast.unparse(d.func) == "triton.autotune":
                    seen += 1
                    configs = next((k.value for k in d.keywords if k.arg == "configs"),
                                   d.args[0] if d.args else None)
                    if configs is None or not _builds_with_autotune_configs(configs, tree):
                        bad.append(f"{os.path.relpath(path, ROOT)}:{fn.lineno} {fn.name}: configs do "
                                   f"not come from _utils.autotune_configs")
                    bench = next((k.value for k in d.keywords if k.arg == "do_bench"), None)
                    if bench is None or ast.unparse(bench) != "autotune_bench()":
                        bad.append(f"{os.path.relpath(path, ROOT)}:{fn.lineno} {fn.name}: no "
                                   f"do_bench=autotune_bench() (Triton 3.6 times even one config)")
    assert seen >= 5
    assert not bad, "\n".join(bad)


def _module_constants(path: str) -> dict[str, tuple[int, object]]:
    """Public capitalised module-level names bound to a literal: ``{name: (line, value)}``."""
    out = {}
    for n in _tree(path).body:
        targets, value = ([n.target], n.value) if isinstance(n, ast.AnnAssign) else (
            (n.targets, n.value) if isinstance(n, ast.Assign) else ((), None))
        for t in targets:
            if isinstance(t, ast.Name) and t.id.isupper() and not t.id.startswith("_") and value is not None:
                try:
                    out[t.id] = (n.lineno, ast.literal_eval(value))
                except ValueError:
                    out[t.id] = (n.lineno, None)
    return out


@pytest.mark.parametrize("name", ["REF_KINDS", "BACKENDS", "ROPE_MODES", "FP8_MAX", "LOG2E", "AMAX_EPS",
                                  "SUPPORTED_DTYPES", "HOPPER_HEAD_DIMS"])
def test_named_constant_defined_once(name):
    where = [f"{os.path.relpath(p, ROOT)}:{c[name][0]}" for p in _library_files("wildactor_kernels", "model")
             if name in (c := _module_constants(p))]
    assert len(where) == 1, f"{name} is defined {len(where)} times: {where}"


def test_no_literal_constant_copied_across_modules():
    """The same tuple (or float) bound to a public capitalised name in two modules is a copy of
    one constant: import it instead."""
    seen: dict[str, list[str]] = {}
    for path in _library_files("wildactor_kernels", "model"):
        for name, (line, value) in _module_constants(path).items():
            if isinstance(value, (tuple, float)) and value not in ((), 0.0, 1.0):
                seen.setdefault(repr(value), []).append(f"{os.path.relpath(path, ROOT)}:{line} {name}")
    copies = {v: w for v, w in seen.items() if len({x.split(":")[0] for x in w}) > 1}
    assert not copies, "constants defined twice:\n" + "\n".join(f"{v}: {w}" for v, w in copies.items())


def test_supported_dtypes_are_not_spelled_out_again():
    """The dtypes the kernels take are ``_utils.SUPPORTED_DTYPES``; a literal copy of that set
    elsewhere drifts the day one of them changes."""
    supported = {"torch.float16", "torch.bfloat16", "torch.float32"}
    bad = []
    for path in _library_files("wildactor_kernels"):
        if path == UTILS:
            continue
        for n in ast.walk(_tree(path)):
            literal = isinstance(n, (ast.Tuple, ast.List, ast.Set))
            if literal and {ast.unparse(e) for e in n.elts} == supported:
                bad.append(f"{os.path.relpath(path, ROOT)}:{n.lineno} {ast.unparse(n)}")
    assert not bad, "use _utils.SUPPORTED_DTYPES:\n" + "\n".join(bad)


def test_interpreter_runs_a_loop_with_a_runtime_bound_and_skips_timing():
    """The two interpreter rules of ``_utils``: a ``range`` over a runtime bound works (Triton 3.6
    with NumPy >= 2.4 needs ``_interpreter_compat``), and ``autotune_bench`` times nothing there."""
    import torch
    import triton
    import triton.language as tl

    from wildactor_kernels import _utils

    if not _utils.interpreter_active():
        pytest.skip("the interpreter rules apply under TRITON_INTERPRET=1 only")
    assert _utils.autotune_bench()(lambda: 1 / 0, quantiles=(0.5, 0.2, 0.8)) == [0.0, 0.0, 0.0]
    _utils._interpreter_compat()  # idempotent: a second call changes nothing

    @triton.autotune(configs=[triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 32})], key=["N"],
                     prune_configs_by={"early_config_prune": lambda configs, *a, **k: configs[:1]},
                     do_bench=_utils.autotune_bench())
    @triton.jit
    def _count(p_out, N, BLOCK: tl.constexpr):
        i_b = tl.program_id(0)
        n = N - i_b  # a runtime value, as the attention kernels' segment ends
        b_acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n, BLOCK):
            o_x = start + tl.arange(0, BLOCK)
            b_acc += tl.where(o_x < n, 1.0, 0.0)
        tl.store(p_out + i_b, tl.sum(b_acc))

    out = torch.full((3,), float("nan"))
    _count[(3,)](out, 37)
    assert out.tolist() == [37.0, 36.0, 35.0]
