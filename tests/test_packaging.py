"""The built wheel installs one import root, ``qllm_jax``, with models/ and scheduler/ inside it.

Why: the repo keeps ``models/`` and ``scheduler/`` at the top level and maps them into
``qllm_jax`` with setuptools ``package-dir``; an editable install or running from the checkout can
hide a broken mapping, so this builds the real wheel and imports it from a fresh venv.
"""

from __future__ import annotations

import json
import shutil
import site
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# What a wheel build needs: the build config, the readme it names, and the package folders.
SOURCES = ["pyproject.toml", "README.md", "qllm_jax", "models", "scheduler"]
PUBLIC_NAMES = ["load", "reference_forward"]
# Checkout folder -> where its modules live in the installed package.
PACKAGE_ROOTS = {
    "qllm_jax": "qllm_jax",
    "models": "qllm_jax/models",
    "scheduler": "qllm_jax/scheduler",
}


def _run(*cmd: str | Path, cwd: Path) -> str:
    proc = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _build_wheel(tmp: Path) -> Path:
    # Build from a copy so the checkout gets no build/ or *.egg-info, and so a file the wheel
    # needs but SOURCES forgets shows up here rather than only in CI.
    src = tmp / "src"
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    dist = tmp / "dist"
    # No build isolation: reuse this environment's setuptools, so the test works offline.
    pip_wheel = ["-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]
    _run(sys.executable, *pip_wheel, "-w", dist, src, cwd=tmp)
    (wheel,) = dist.glob("qllm_jax-*.whl")
    return wheel


def _install_in_fresh_venv(tmp: Path, wheel: Path) -> tuple[Path, Path]:
    """Install ``wheel`` alone into a new venv, then let that venv see this one's dependencies.

    ``venv --system-site-packages`` would expose the *base* interpreter's packages, not this
    (virtual) environment's, so a .pth file appends this environment's site-packages instead.
    It is written after the install so pip never sees this environment's qllm_jax (editable or
    not) and skips the wheel as "already satisfied". Plain path lines in a .pth are not scanned
    for further .pth files, so an editable install's import hook stays inactive in the new venv.
    """
    venv = tmp / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp)
    python = venv / "bin" / "python"
    pip_install = ["-m", "pip", "--python", python, "install", "--no-deps", "--no-index"]
    _run(sys.executable, *pip_install, wheel, cwd=tmp)
    get_purelib = "import sysconfig; print(sysconfig.get_path('purelib'))"
    purelib = Path(_run(python, "-c", get_purelib, cwd=tmp).strip())
    assert (purelib / "qllm_jax" / "__init__.py").is_file(), "wheel was not installed"
    deps = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (purelib / "zz_test_deps.pth").write_text("".join(f"{p}\n" for p in deps))
    return python, purelib


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(wheel, venv python, its purelib): the wheel built once and installed in a new venv."""
    tmp = tmp_path_factory.mktemp("wheel")
    wheel = _build_wheel(tmp)
    return (wheel, *_install_in_fresh_venv(tmp, wheel))


def test_wheel_installs_single_import_root(
    installed: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    wheel, python, purelib = installed
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"qllm_jax"}, tops
    # `packages` in pyproject.toml is an explicit list: a new subpackage must be added there.
    expected = {
        f"{dest}/{path.relative_to(REPO / folder).as_posix()}"
        for folder, dest in PACKAGE_ROOTS.items()
        for path in (REPO / folder).rglob("*.py")
    }
    missing = sorted(expected - set(names))
    assert not missing, f"modules missing from the wheel (add them to `packages`): {missing}"

    probe = textwrap.dedent(
        f"""
        import json, qllm_jax, qllm_jax.models, qllm_jax.scheduler
        mods = (qllm_jax, qllm_jax.models, qllm_jax.scheduler)
        print(json.dumps({{
            "files": [m.__file__ for m in mods],
            "missing": [n for n in {PUBLIC_NAMES!r} if not hasattr(qllm_jax, n)],
        }}))
        """
    )
    # -I: ignore PYTHONPATH and user site, and do not put the cwd on sys.path; cwd is outside
    # the checkout anyway.
    out = _run(python, "-I", "-c", probe, cwd=tmp_path)
    result = json.loads(out.strip().splitlines()[-1])
    for file in result["files"]:
        assert file is not None and Path(file).resolve().is_relative_to(purelib.resolve()), file
        assert not Path(file).resolve().is_relative_to(REPO), file
    assert result["missing"] == [], f"qllm_jax does not export {result['missing']}"


def test_console_script_runs_a_job(installed: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """``qllm-jax`` as the wheel installs it (its own entry-point script, outside the checkout)
    runs a small job on the built-in model and reports its status."""
    _, python, _ = installed
    script = python.parent / "qllm-jax"
    assert script.is_file(), "the wheel installs no qllm-jax script"
    line = {"custom_id": "a", "method": "POST", "url": "/v1/completions"}
    line["body"] = {"prompt": "Hello", "max_tokens": 3, "temperature": 0}
    (tmp_path / "in.jsonl").write_text(json.dumps(line) + "\n")
    run = [script, "job", "run", tmp_path / "in.jsonl", "--job-dir", tmp_path / "job"]
    run += ["--policy", "priority", "--kv-pages", "32", "--max-batch-size", "2"]
    run += ["--max-num-batched-tokens", "16", "--compilation-cache-dir", "none"]
    out = _run(*run, cwd=tmp_path)
    assert "completed, 1 completed, 0 failed, 1 total" in out, out
    status = json.loads(_run(script, "job", "status", tmp_path / "job", "--json", cwd=tmp_path))
    assert status["request_counts"] == {"total": 1, "completed": 1, "failed": 0}
    (result,) = (tmp_path / "job" / "output.jsonl").read_text().splitlines()
    assert json.loads(result)["response"]["body"]["usage"]["completion_tokens"] == 3
