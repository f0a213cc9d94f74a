#!/usr/bin/env python3
"""Set up ``.venv`` (once) and run the main job or the tests, on a machine with nothing but Python 3.10+.

    python3 launch/quickstart.py train [key=value ...]     # install if needed, then launch/train.py
    python3 launch/quickstart.py test [pytest args ...]    # install if needed, then python -m pytest -q

The install order is what keeps a CPU machine on the CPU wheel: torch first, pinned to the version in
constraints.txt (installed the other way round, DeepSpeed pulls a multi-GB CUDA build), then the project with its
extras under constraints.txt, so nothing replaces that torch. A stamp in the venv holds a hash of what the
install read (pyproject.toml, constraints.txt, these steps); while it matches, the install is skipped. Another
venv: ``TPBLOCKS_VENV=/path``. Only the standard library is used here: this runs before anything is installed.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXTRAS = "hf,dev"
STAMP = ".tpblocks-install"
MIN_PYTHON = (3, 10)
COMMANDS = {  # what runs after the set-up, with the venv's python
    "train": ["launch/train.py"],
    "test": ["-m", "pytest", "-q"],
}


def torch_pin(repo: Path = REPO) -> str:
    """The ``torch==X`` line of constraints.txt: the one place the CPU torch version is written."""
    for line in (repo / "constraints.txt").read_text().splitlines():
        spec = line.split("#", 1)[0].strip()
        if spec.replace(" ", "").startswith("torch=="):
            return spec.replace(" ", "")
    raise SystemExit(f"error: {repo / 'constraints.txt'} has no 'torch==VERSION' line to install torch from")


def install_steps(python: str, repo: Path = REPO) -> list[list[str]]:
    """The pip commands, in order (torch first; then the project under the constraints)."""
    pip = [python, "-m", "pip", "install"]
    return [
        [*pip, "--upgrade", "pip"],
        [*pip, torch_pin(repo)],
        [*pip, "-c", str(repo / "constraints.txt"), "-e", f"{repo}[{EXTRAS}]"],
    ]


def stamp_text(repo: Path = REPO) -> str:
    """Hash of everything the install depends on; a different value means the venv is out of date."""
    h = hashlib.sha256()
    for name in ("pyproject.toml", "constraints.txt"):
        h.update((repo / name).read_bytes())
    h.update(repr(install_steps("python", Path("."))).encode())
    return h.hexdigest()


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def is_current(venv: Path, repo: Path = REPO) -> bool:
    stamp = venv / STAMP
    return venv_python(venv).is_file() and stamp.is_file() and stamp.read_text().strip() == stamp_text(repo)


def _run(cmd: list[str], why: str) -> None:
    print("+ " + " ".join(cmd), flush=True)
    if subprocess.run(cmd).returncode != 0:
        raise SystemExit(f"error: {why} failed (command above); fix it and run this again: nothing is skipped")


def ensure_venv(venv: Path, repo: Path = REPO) -> Path:
    """The venv's python, after creating and installing it when the stamp says it is not current."""
    if is_current(venv, repo):
        print(f"using {venv} (installed; delete {venv / STAMP} to reinstall)", flush=True)
        return venv_python(venv)
    if not venv_python(venv).is_file():
        why = "creating the venv (on Debian/Ubuntu: apt-get install python3-venv)"
        _run([sys.executable, "-m", "venv", str(venv)], why)
    python = str(venv_python(venv))
    (venv / STAMP).unlink(missing_ok=True)  # a half-done install must not look complete
    for cmd in install_steps(python, repo):
        _run(cmd, "installing")
    subprocess.run([python, "-m", "pip", "check"])  # informative only: lm-eval's optional pins are not ours to fix
    (venv / STAMP).write_text(stamp_text(repo) + "\n")
    return Path(python)


def main(argv: list[str]) -> int:
    if len(argv) < 1 or argv[0] not in COMMANDS:
        print(f"usage: python3 launch/quickstart.py {{{'|'.join(COMMANDS)}}} [arguments for it ...]", file=sys.stderr)
        return 2
    if sys.version_info < MIN_PYTHON:
        print(f"error: Python {'.'.join(map(str, MIN_PYTHON))}+ is needed; this is {sys.version.split()[0]}",
              file=sys.stderr)  # fmt: skip
        return 2
    venv = Path(os.environ.get("TPBLOCKS_VENV", REPO / ".venv")).expanduser()
    python = ensure_venv(venv)
    cmd = [str(python), *COMMANDS[argv[0]], *argv[1:]]
    print("+ " + " ".join(cmd), flush=True)
    os.chdir(REPO)
    return subprocess.run(cmd).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
