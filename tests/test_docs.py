"""The documentation: the site builds with warnings as errors, the API reference covers every public
name, the guides' Python blocks run as written, and every `python -m train.…` / `benchmarks.…`
command in the README and the guides names a real script with options it accepts."""

import importlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
USER_DOCS = [ROOT / "README.md", ROOT / "benchmarks" / "README.md",
             ROOT / "benchmarks" / "results" / "README.md", *sorted(DOCS.rglob("*.md"))]

# Guides whose Python blocks run in the default suite (seconds); the others run under -m slow.
FAST_GUIDES = ["getting-started.md"]
SLOW_GUIDES = ["adjoints.md", "training.md", "custom-networks.md", "regularisation.md",
               "inception_weights.md"]
# What a guide's reader brings: the Inception page uses the weights file and images the reader has.
PRELUDES = {"inception_weights.md": """
import numpy as np
from ncode_jax.metrics.inception import random_inception_params, save_inception_params

DTYPE_PROMOTION = "standard"  # optax and flax mix dtypes (conftest)
save_inception_params(random_inception_params(), "inception_fid.npz")  # stands in for the converted file
rng = np.random.default_rng(0)
real_images, generated_images = (rng.uniform(size=(8, 28, 28, 1)).astype(np.float32) for _ in range(2))
"""}


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


# References that lead nowhere for a user: notes outside the repository, the project's issue
# numbers, paths of the development machines.
INTERNAL = [r"DESIGN\.md", r"\bfacts? \d", r"[Ii]ssue \d", r"/work/", r"shared notes"]


def run_python(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)


def test_site_builds_with_warnings_as_errors(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "WARNING" not in out.stderr, out.stderr[-3000:]
    assert (tmp_path / "site" / "api" / "core" / "index.html").is_file()
    for page in (tmp_path / "site").rglob("*.html"):  # the API pages carry the docstrings
        for pattern in INTERNAL:
            assert not re.search(pattern, page.read_text()), f"{page.relative_to(tmp_path)}: {pattern}"


def test_api_reference_covers_every_public_name():
    pages = "\n".join(p.read_text() for p in (DOCS / "api").glob("*.md"))
    documented = set(re.findall(r"^::: ([\w.]+)", pages, flags=re.M))
    missing = []
    for package in ["ncode_jax", "ncode_jax.models", "ncode_jax.data", "ncode_jax.metrics"]:
        for name in importlib.import_module(package).__all__:
            if not any(d == f"{package}.{name}" or (d.startswith(f"{package}.") and d.endswith(f".{name}"))
                       for d in documented):
                missing.append(f"{package}.{name}")
    assert not missing, f"add to docs/api/*.md: {missing}"


def test_every_guide_with_code_is_run():
    with_code = {p.name for p in DOCS.glob("*.md") if python_blocks(p)}
    assert with_code == set(FAST_GUIDES) | set(SLOW_GUIDES), "list the guide in FAST_GUIDES or SLOW_GUIDES"


@pytest.mark.parametrize("guide", [*FAST_GUIDES,
                                   *(pytest.param(g, marks=pytest.mark.slow) for g in SLOW_GUIDES)])
def test_guide_python_blocks_run(guide, tmp_path):
    """A guide's blocks run in order in one fresh interpreter, as a reader pasting them would."""
    out = run_python(PRELUDES.get(guide, "") + "\n".join(python_blocks(DOCS / guide)), tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]


def test_no_references_outside_the_repository():
    for path in USER_DOCS:
        text = path.read_text()
        for pattern in INTERNAL:
            assert not re.search(pattern, text), f"{path.relative_to(ROOT)}: {pattern}"


# --- commands --------------------------------------------------------------------------------------


def commands() -> list[tuple[str, str]]:
    """(file, command) for every `python -m train.…` or `python -m benchmarks.…` in the docs."""
    found = []
    for path in USER_DOCS:
        text = path.read_text()
        chunks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
        chunks = [c.replace("\\\n", " ") for c in chunks]
        chunks += re.findall(r"`([^`\n]*python -m [^`\n]*)`", re.sub(r"```.*?```", "", text, flags=re.S))
        for chunk in chunks:
            for line in chunk.splitlines():
                for part in line.split("&&"):
                    m = re.search(r"python -m ((?:train|benchmarks)\.\w+.*)", part.split("  #")[0])
                    if m:
                        found.append((str(path.relative_to(ROOT)), m.group(1).strip()))
    return found


class _Parsed(Exception):
    pass


def test_docs_commands_exist():
    cmds = commands()
    assert any(c.startswith("train.classify") for _, c in cmds)
    assert any(c.startswith("benchmarks.") for _, c in cmds)


def test_train_commands_parse(monkeypatch):
    """Each training command's options are accepted and its configs validate (nothing runs)."""
    from train import autoencode_eval, engine, parallel, robustness

    def stop(*args, **kwargs):
        raise _Parsed

    monkeypatch.setattr(engine, "run_configs", stop)
    monkeypatch.setattr(autoencode_eval, "run", stop)
    monkeypatch.setattr(robustness, "run", stop)
    monkeypatch.setattr(parallel, "initialize_from_args", lambda args: None)
    monkeypatch.setattr(parallel, "ensure_cpu_devices", lambda n: None)
    for where, cmd in commands():
        if not cmd.startswith("train."):
            continue
        module, *argv = shlex.split(cmd)
        with pytest.raises(_Parsed):
            try:
                importlib.import_module(module).main(argv)
            except SystemExit as e:
                pytest.fail(f"{where}: `python -m {cmd}` exits with {e.code}")
            pytest.fail(f"{where}: `python -m {cmd}` was refused (see its error line above)")


def test_benchmark_commands_name_real_flags():
    common = (ROOT / "benchmarks" / "common.py").read_text()
    for where, cmd in commands():
        if not cmd.startswith("benchmarks."):
            continue
        module, *argv = shlex.split(cmd)
        source = (ROOT / (module.replace(".", "/") + ".py")).read_text()
        for flag in (a for a in argv if a.startswith("--")):
            assert f'"{flag}"' in source or f'"{flag}"' in common, f"{where}: {module} has no {flag}"


def test_readme_links_resolve():
    """Relative links of the Markdown files outside the site (the site build checks its own)."""
    for path in USER_DOCS[:3]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
            if not re.match(r"[a-z]+://", target):
                assert (path.parent / target).exists(), f"{path.relative_to(ROOT)}: {target}"
