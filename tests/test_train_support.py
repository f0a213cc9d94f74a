"""Shared helpers of the trainer tests: a tiny local corpus, Hydra composition, launching runs.

Every trainer test trains on a ~250 kB corpus cut from Python's own ``pydoc_data.topics`` (always installed, no
network), tokenised with a 384-piece BPE trained on it once per session, with a Burger small enough that a step
costs milliseconds. Runs go through the real entry point (``launch/train.py``) or ``tpblocks.train.run``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
LAUNCH = REPO / "launch" / "train.py"


def write_tiny_corpus(path: Path, max_bytes: int = 250_000) -> Path:
    """A jsonl of real English technical prose (pydoc topics), deterministic."""
    from pydoc_data.topics import topics

    written = 0
    with path.open("w") as f:
        for key in sorted(topics):
            text = topics[key].strip()
            if not text:
                continue
            f.write(json.dumps({"text": text}) + "\n")
            written += len(text)
            if written > max_bytes:
                break
    return path


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict:
    """Corpus file + a data cache shared by every test of the session (the tokenizer is trained once)."""
    root = tmp_path_factory.mktemp("train_data")
    corpus = write_tiny_corpus(root / "corpus.jsonl")
    return {"path": str(corpus), "cache": str(root / "cache")}


@pytest.fixture
def one_thread():
    """One intra-op thread, as each torchrun rank has: a 74k-parameter model gains nothing from a second one,
    which only spins against the other processes of a shared machine."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_overrides(tiny_data: dict, run_dir: Path, **extra) -> list[str]:
    """Hydra overrides for a run of a few seconds: tiny Burger, 32-token context, 512-token steps."""
    values = {
        "data": "local",
        "data.path": tiny_data["path"],
        "data.cache_dir": tiny_data["cache"],
        "data.vocab_size": 384,
        "data.heldout_tokens": 4096,
        "data.seq_len": 32,
        "model": "debug_burger",
        "+model.overrides.hidden_size": 32,
        "+model.overrides.lane_depth": 2,
        "+model.overrides.tp_block_repetition": 1,
        "+model.overrides.lane_n_heads": 2,
        "+model.overrides.n_heads": 2,
        "+model.overrides.n_kv_heads": 1,
        "optim.lr": 3e-3,
        "train.max_steps": 8,
        "train.tokens_per_step": 512,
        "train.micro_batch": 8,
        "train.eval_every": 4,
        "train.eval_tokens": 2048,
        "train.eval_batch": 16,
        "train.checkpoint_every": 4,
        "train.progress": False,
        "wandb.mode": "disabled",
        "run_dir": str(run_dir),
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def compose(overrides: list[str]):
    """The Hydra config that ``launch/train.py`` would see with these overrides."""
    from tpblocks.config import compose as compose_config

    return compose_config(overrides)


def child_env(threads: int = 1) -> dict:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        WANDB_MODE="disabled",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    return env


def launch_cmd(overrides: list[str], nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [sys.executable, str(LAUNCH), *overrides]
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        str(LAUNCH), *overrides,
    ]  # fmt: skip


def launch(overrides: list[str], nproc: int = 1, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the real entry point (under torchrun when nproc > 1); returns the completed process."""
    return subprocess.run(
        launch_cmd(overrides, nproc), cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=timeout
    )


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]


def read_summary(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def eval_curve(records: list[dict]) -> list[float]:
    return [r["eval_loss"] for r in records if "eval_loss" in r]
