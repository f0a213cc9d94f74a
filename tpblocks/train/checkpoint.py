"""Atomic training checkpoints: ``<run_dir>/checkpoints/step_XXXXXXXX/`` + a ``latest`` pointer.

Layout of one checkpoint (the run-directory contract):
  model.pt      exactly ``tpblocks.models.io.model_payload`` (loadable by ``tpblocks.models.io.load_model``)
  trainer.pt    {"format", "version", "step", "optimizer" (DDP: the full state; DeepSpeed: None),
                 "scheduler", "rng": [per-rank torch/numpy/python states], "loader": [per-rank loader states],
                 "world_size", "tokens_seen", "elapsed_s"}
  optimizer_lane{g}.pt  parallel.lane > 1 only: the optimizer state of lane rank g (of dp replica 0; the other
                replicas hold equal states); trainer.pt then has "optimizer": None and "lane": the degree
  deepspeed/    DeepSpeed backend only: the engine's own (ZeRO-partitioned) optimizer files

  manifest.json {"format": "tpblocks-checkpoint", "step", "files": {relative path: {"sha256", "bytes"}}} of every
                other file, written last (tpblocks/integrity.py)

Integrity: a checkpoint is trusted only when every file its manifest lists has its size and sha256. With
``train.resume=auto`` a damaged newest checkpoint (truncated, emptied, a file missing, bytes flipped) is reported
and the previous intact one is used; an explicitly named damaged checkpoint is refused with the reason.

Atomicity: everything is written into ``checkpoints/.tmp_step_XXXXXXXX`` and renamed to its final name only
when complete (``os.replace`` of a directory is atomic on POSIX), then ``latest`` is rewritten through a temp
file. A run killed at any moment leaves either the previous checkpoint or the new one, never half of one;
stale ``.tmp_*`` directories are ignored and cleaned on the next save.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from tpblocks.integrity import checksum_listing, find_damage
from tpblocks.models.io import read_torch_file

FORMAT, VERSION = "tpblocks-trainer", 1
_PREFIX = "step_"
MANIFEST = "manifest.json"


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
    write_manifest(tmp_dir(run_dir, step), step)
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


def write_manifest(tmp: Path, step: int) -> None:
    """Checksums of every file of the assembled checkpoint (all ranks' files are in ``tmp`` by now). Also for a
    tool that edits a published checkpoint on purpose: re-sign it, or resuming from it is refused."""
    names = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
    names = [n for n in names if n != MANIFEST]  # re-signing: the old manifest is not part of the checkpoint
    manifest = {"format": "tpblocks-checkpoint", "step": step, "files": checksum_listing(tmp, names)}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def checkpoint_damage(ckpt: str | os.PathLike) -> str | None:
    """None when ``ckpt`` is intact, else why it cannot be trusted. A checkpoint written before manifests existed
    is only checked for its two files (reading them then reports any damage)."""
    ckpt = Path(ckpt)
    for name in ("trainer.pt", "model.pt"):
        if not (ckpt / name).is_file():
            return f"{name} is missing"
    manifest = ckpt / MANIFEST
    if not manifest.is_file():
        return None
    try:
        listing = json.loads(manifest.read_text())["files"]
        assert isinstance(listing, dict)
    except (ValueError, KeyError, TypeError, AssertionError):
        return f"{MANIFEST} is unreadable"
    return find_damage(ckpt, listing)


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


def _candidates(run_dir: Path) -> list[Path]:
    """Published checkpoint directories, newest first (a damaged one too: it may have lost its trainer.pt)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX)]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX) :]), reverse=True)


def newest_intact(run_dir: str | os.PathLike, warn: Callable[[str], None] = print) -> Path | None:
    """The newest checkpoint of ``run_dir`` that passes ``checkpoint_damage``; each damaged newer one is reported
    through ``warn``. None when there is none at all; ValueError when every one is damaged."""
    candidates = _candidates(Path(run_dir))
    for ckpt in candidates:
        damage = checkpoint_damage(ckpt)
        if damage is None:
            return ckpt
        warn(f"warning: checkpoint {ckpt} is damaged ({damage}); falling back to the previous one")
    if candidates:
        raise ValueError(
            f"every checkpoint under {checkpoint_root(run_dir)} is damaged; train.resume=none starts afresh "
            f"(overwriting them), or restore a copy"
        )
    return None


def resolve_resume(resume: str, run_dir: str | os.PathLike, warn: Callable[[str], None] = print) -> Path | None:
    """``train.resume``: 'auto' -> newest intact checkpoint of run_dir (None when there is none; damaged newer
    ones reported through ``warn`` and skipped), 'none' -> None, otherwise a checkpoint directory (refused when
    damaged) or a run directory, whose newest intact checkpoint is taken."""
    if resume == "none":
        return None
    if resume == "auto":
        return newest_intact(run_dir, warn)
    path = Path(resume)
    if path.is_dir() and any((path / name).exists() for name in ("trainer.pt", "model.pt", MANIFEST)):
        damage = checkpoint_damage(path)
        if damage is not None:
            raise ValueError(
                f"train.resume={resume!r} is damaged ({damage}); name another checkpoint of "
                f"{path.parent} or use train.resume=auto (takes the newest intact one)"
            )
        return path
    found = newest_intact(path, warn) if path.is_dir() else None
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
    return read_torch_file(path)


def load_trainer_state(ckpt: Path) -> dict:
    state = read_torch_file(ckpt / "trainer.pt")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{ckpt / 'trainer.pt'} is not a tpblocks trainer checkpoint (format={found!r})")
    if state.get("version", 0) > VERSION:
        raise ValueError(f"{ckpt} was written by a newer tpblocks (trainer format {state['version']} > {VERSION})")
    return state


def load_model_state(ckpt: Path) -> dict:
    """The ``model`` state dict of ``ckpt/model.pt`` (model_payload format)."""
    payload = read_torch_file(ckpt / "model.pt")
    if not isinstance(payload, dict) or payload.get("format") != "tpblocks-model":
        raise ValueError(f"{ckpt / 'model.pt'} is not a tpblocks model file")
    return payload
