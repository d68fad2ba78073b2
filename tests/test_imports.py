"""Every module of ``ncode_jax`` and ``train`` imports alone, in an interpreter that has imported
no other module of the project: the import graph has no cycles (a cycle fails the import of the
module that enters it first) and no module relies on another having been imported before it.

One fresh interpreter imports the third-party packages the project imports at module level (the
costly part), then forks one child per project module; each child starts with no module of the
project loaded and imports just its one module.
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ncode_jax", "train")


def project_modules() -> list[str]:
    """Dotted names of every module and package of :data:`PACKAGES`, from the files."""
    names = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def third_party_imports(modules: list[str]) -> list[str]:
    """The modules outside the project (and the standard library) that the project's modules import
    when they are imported (module-level ``import`` statements), as written."""
    found = set()
    for module in modules:
        path = ROOT / Path(*module.split("."))
        path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                found.add(node.module)
    return sorted(name for name in found if name.split(".")[0] not in (*PACKAGES, *sys.stdlib_module_names))


def _import_each_alone(modules: list[str], preload: list[str], workers: int = 2) -> int:
    """In this (fresh) interpreter: import ``preload``, then fork a child per module, ``workers`` at a
    time, that imports that module alone. Prints each failure with its traceback; returns how many
    failed."""
    import importlib
    import traceback

    for name in preload:
        importlib.import_module(name)
    assert not [m for m in sys.modules if m.split(".")[0] in PACKAGES], "a project module was preloaded"

    running, failed = {}, 0
    pending = list(modules)
    while pending or running:
        while pending and len(running) < workers:
            module = pending.pop(0)
            pid = os.fork()
            if pid == 0:  # the child: import the one module, report, exit without cleanup
                try:
                    importlib.import_module(module)
                except BaseException:
                    print(f"--- import {module} alone failed:\n{traceback.format_exc()}", flush=True)
                    os._exit(1)
                os._exit(0)
            running[pid] = module
        pid, status = os.wait()
        module = running.pop(pid)
        if os.waitstatus_to_exitcode(status) != 0:
            failed += 1
            print(f"FAILED: import {module} (exit status {os.waitstatus_to_exitcode(status)})", flush=True)
    return failed


def test_every_module_imports_alone_in_a_fresh_interpreter():
    modules = project_modules()
    assert {"ncode_jax", "ncode_jax.solve", "train", "train.engine"} <= set(modules)
    preload = third_party_imports(modules)
    assert "jax" in preload and not [m for m in preload if m.split(".")[0] in PACKAGES]
    proc = subprocess.run([sys.executable, __file__, ",".join(preload), *modules], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == f"{len(modules)} modules imported alone", proc.stdout + proc.stderr


if __name__ == "__main__":
    sys.path[0] = str(ROOT)  # the project, not this folder of tests
    preload_arg, *module_args = sys.argv[1:]
    n_failed = _import_each_alone(module_args, preload_arg.split(","))
    if n_failed:
        sys.exit(f"{n_failed} of {len(module_args)} modules failed to import alone")
    print(f"{len(module_args)} modules imported alone")
