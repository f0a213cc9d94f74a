"""launch/quickstart.py (the README's two commands): install order, the stamp that skips a complete install,
no stamp after a failed one; and plain ``pytest`` from the repository root (pyproject's pythonpath)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("quickstart", REPO / "launch" / "quickstart.py")
qs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(qs)


@pytest.fixture
def repo(tmp_path) -> Path:
    """A checkout with only what the install reads."""
    for name in ("pyproject.toml", "constraints.txt"):
        shutil.copy(REPO / name, tmp_path / name)
    return tmp_path


def _fake_pip(monkeypatch, fail_on: str | None = None) -> list[list[str]]:
    """Record the commands instead of running them; ``python -m venv`` makes the venv's python file."""
    calls: list[list[str]] = []

    def fake_run(cmd, *args, **kwargs):
        calls.append(list(cmd))
        if cmd[1:3] == ["-m", "venv"]:
            qs.venv_python(Path(cmd[3])).parent.mkdir(parents=True)
            qs.venv_python(Path(cmd[3])).write_text("")
        return SimpleNamespace(returncode=1 if fail_on and fail_on in cmd else 0)

    monkeypatch.setattr(qs.subprocess, "run", fake_run)
    return calls


def test_torch_is_installed_first_at_the_constraints_pin(repo):
    (repo / "constraints.txt").write_text("# pins\ntorch == 2.13.0  # the CPU wheel\nnumpy<3\n")
    steps = qs.install_steps("py", repo)
    assert steps[1] == ["py", "-m", "pip", "install", "torch==2.13.0"]
    assert steps[2] == ["py", "-m", "pip", "install", "-c", str(repo / "constraints.txt"), "-e", f"{repo}[hf,dev]"]
    (repo / "constraints.txt").write_text("numpy<3\n")
    with pytest.raises(SystemExit, match="no 'torch==VERSION' line"):
        qs.install_steps("py", repo)


def test_install_writes_a_stamp_and_is_skipped_while_it_matches(repo, tmp_path, monkeypatch):
    venv = tmp_path / "venv"
    calls = _fake_pip(monkeypatch)
    python = qs.ensure_venv(venv, repo)
    assert python == qs.venv_python(venv)
    torch_at = next(i for i, c in enumerate(calls) if "torch==2.13.0" in c)
    project_at = next(i for i, c in enumerate(calls) if "-e" in c)
    assert calls[0][1:3] == ["-m", "venv"] and torch_at < project_at and calls[-1][-1] == "check"
    assert qs.is_current(venv, repo)

    calls.clear()
    qs.ensure_venv(venv, repo)
    assert calls == []  # complete: nothing reinstalled

    (repo / "pyproject.toml").write_text((repo / "pyproject.toml").read_text() + "\n# changed\n")
    assert not qs.is_current(venv, repo)
    qs.ensure_venv(venv, repo)
    assert any("torch==2.13.0" in c for c in calls) and not any(c[1:3] == ["-m", "venv"] for c in calls)


def test_a_failed_install_leaves_no_stamp(repo, tmp_path, monkeypatch):
    venv = tmp_path / "venv"
    _fake_pip(monkeypatch, fail_on="torch==2.13.0")
    with pytest.raises(SystemExit, match="installing failed"):
        qs.ensure_venv(venv, repo)
    assert not (venv / qs.STAMP).exists() and not qs.is_current(venv, repo)


def test_unknown_command_is_a_usage_error(capsys):
    assert qs.main(["deploy"]) == 2 and "usage: python3 launch/quickstart.py {train|test}" in capsys.readouterr().err


def test_plain_pytest_collects_from_the_repository_root():
    pytest_bin = Path(sys.executable).parent / "pytest"
    if not pytest_bin.is_file():
        pytest.skip(f"no pytest script next to {sys.executable}")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # only pyproject's pythonpath may help
    proc = subprocess.run(
        [str(pytest_bin), "-q", "-p", "no:cacheprovider", "--collect-only", "tests/test_benchmark_train_step.py"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]  # it imports benchmarks/
