"""Atomic training checkpoints: ``<run_dir>/checkpoints/step_XXXXXXXX/`` + a ``latest`` pointer.

Layout of one checkpoint (the run-directory contract):
  model.pt      exactly ``tpblocks.models.io.model_payload`` (loadable by ``tpblocks.models.io.load_model``)
  trainer.pt    {"format", "version", "step", "optimizer" (DDP: the full state; DeepSpeed: None),
                 "scheduler", "rng": [per-rank torch/numpy/python states], "loader": [per-rank loader states],
                 "world_size", "tokens_seen", "elapsed_s"}
  optimizer_lane{g}.pt  parallel.lane > 1 only: the optimizer state of lane rank g (of dp replica 0; the other
                replicas hold equal states); trainer.pt then has "optimizer": None and "lane": the degree
  deepspeed/    DeepSpeed backend only: the engine's own (ZeRO-partitioned) optimizer files

Atomicity: everything is written into ``checkpoints/.tmp_step_XXXXXXXX`` and renamed to its final name only
when complete (``os.replace`` of a directory is atomic on POSIX), then ``latest`` is rewritten through a temp
file. A run killed at any moment leaves either the previous checkpoint or the new one, never half of one;
stale ``.tmp_*`` directories are ignored and cleaned on the next save.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

FORMAT, VERSION = "tpblocks-trainer", 1
_PREFIX = "step_"


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"{_PREFIX}{step:08d}"


def tmp_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """Where the checkpoint of ``step`` is assembled before it is published."""
    return checkpoint_root(run_dir) / f".tmp_{step_dir_name(step)}"


def rng_state() -> dict:
    """This process's random states (torch CPU [+ CUDA], numpy, python)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def prepare_tmp(run_dir: str | os.PathLike, step: int) -> Path:
    """Fresh temp directory for ``step`` (rank 0 only, before any rank writes into it)."""
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp_*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = tmp_dir(run_dir, step)
    tmp.mkdir(parents=True)
    return tmp


def write_files(tmp: Path, model_payload: dict, trainer_state: dict) -> None:
    """Write model.pt and trainer.pt into the temp directory (rank 0)."""
    torch.save(model_payload, tmp / "model.pt")
    torch.save({"format": FORMAT, "version": VERSION, **trainer_state}, tmp / "trainer.pt")


def publish(run_dir: str | os.PathLike, step: int, keep: int) -> Path:
    """Rename the temp directory to its final name, point ``latest`` at it, delete all but ``keep`` newest."""
    root = checkpoint_root(run_dir)
    final = root / step_dir_name(step)
    if final.exists():  # a resumed run re-reaching a saved step: replace it with the identical new one
        shutil.rmtree(final)
    os.replace(tmp_dir(run_dir, step), final)
    pointer = root / "latest.tmp"
    pointer.write_text(final.name + "\n")
    os.replace(pointer, root / "latest")
    for old in complete_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Published checkpoint directories, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and (p / "trainer.pt").exists()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX) :]))


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint: the one ``latest`` names if it exists, else the highest step found."""
    root = checkpoint_root(run_dir)
    pointer = root / "latest"
    if pointer.exists():
        named = root / pointer.read_text().strip()
        if (named / "trainer.pt").exists() and (named / "model.pt").exists():
            return named
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_resume(resume: str, run_dir: str | os.PathLike) -> Path | None:
    """``train.resume``: 'auto' -> latest complete checkpoint of run_dir (None when there is none),
    'none' -> None, otherwise a checkpoint directory (or a run dir, whose latest is taken)."""
    if resume == "none":
        return None
    if resume == "auto":
        return latest_checkpoint(run_dir)
    path = Path(resume)
    if (path / "trainer.pt").exists():
        return path
    found = latest_checkpoint(path) if path.is_dir() else None
    if found is None:
        raise ValueError(
            f"train.resume={resume!r} is neither a checkpoint directory (with trainer.pt) nor a run directory "
            f"holding checkpoints/; use train.resume=auto, train.resume=none or a path under <run_dir>/checkpoints/"
        )
    return found


def _lane_optimizer_path(ckpt: Path, lane_rank: int) -> Path:
    return Path(ckpt) / f"optimizer_lane{lane_rank}.pt"


def save_lane_optimizer(tmp: Path, lane_rank: int, state: dict) -> None:
    """The optimizer state of one lane rank (its shards' moments), written by that rank."""
    torch.save(state, _lane_optimizer_path(tmp, lane_rank))


def load_lane_optimizer(ckpt: Path, lane_rank: int) -> dict:
    path = _lane_optimizer_path(ckpt, lane_rank)
    if not path.exists():
        raise ValueError(f"{path} is missing: {ckpt} was not written by a lane-parallel run with this lane degree")
    return torch.load(path, map_location="cpu", weights_only=False)


def load_trainer_state(ckpt: Path) -> dict:
    state = torch.load(ckpt / "trainer.pt", map_location="cpu", weights_only=False)
    if state.get("format") != FORMAT:
        raise ValueError(f"{ckpt / 'trainer.pt'} is not a tpblocks trainer checkpoint (format={state.get('format')!r})")
    if state.get("version", 0) > VERSION:
        raise ValueError(f"{ckpt} was written by a newer tpblocks (trainer format {state['version']} > {VERSION})")
    return state


def load_model_state(ckpt: Path) -> dict:
    """The ``model`` state dict of ``ckpt/model.pt`` (model_payload format)."""
    payload = torch.load(ckpt / "model.pt", map_location="cpu", weights_only=False)
    if payload.get("format") != "tpblocks-model":
        raise ValueError(f"{ckpt / 'model.pt'} is not a tpblocks model file")
    return payload
