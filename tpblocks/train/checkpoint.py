"""Atomic training checkpoints: ``<run_dir>/checkpoints/step_XXXXXXXX/`` + a ``latest`` pointer.

Layout of one checkpoint (the run-directory contract):
  dcp/          model + optimizer state through torch.distributed.checkpoint, keyed by the FULL model's tensor
                names (tpblocks/train/sharded_state.py): every rank writes its own shard, and the checkpoint loads
                under any lane degree and world size
  trainer.pt    {"format", "version", "step", "model_config", "backend", "optimizer_groups" (AdamW's param-group
                hyperparameters; DeepSpeed: None), "scheduler", "rng": [per-rank torch/numpy/python states],
                "loader": [the global loader cursor], "world_size", "lane", "tokens_seen", "elapsed_s", ...}: plain
                types and tensors only, read with ``weights_only=True``
  deepspeed/    DeepSpeed backend only: the engine's own (ZeRO-partitioned) optimizer files
  manifest.json {"format": "tpblocks-checkpoint", "step", "files": {relative path: {"sha256", "bytes"}}} of every
                other file, written last (tpblocks/integrity.py)
  model.pt      not written by training: ``consolidate`` (or ``model_file``) converts dcp/ into the single-file
                ``tpblocks.models.io`` format that ``load_model``, launch/generate.py and the HF export read, and
                adds it to the manifest. The end-of-run greedy sample does this for the final checkpoint.

Integrity: a checkpoint is trusted only when every file its manifest lists has its size and sha256. With
``train.resume=auto`` a damaged newest checkpoint (truncated, emptied, a file missing, bytes flipped) is reported
and the previous intact one is used; an explicitly named damaged checkpoint is refused with the reason.

Atomicity: everything is written into ``checkpoints/.tmp_step_XXXXXXXX`` and renamed to its final name only
when complete (``os.replace`` of a directory is atomic on POSIX), then ``latest`` is rewritten through a temp
file. A run killed at any moment leaves either the previous checkpoint or the new one, never half of one;
stale ``.tmp_*`` directories are ignored and cleaned on the next save. With ``train.async_checkpoint`` the
rename waits until every rank's background write has finished.
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

FORMAT, VERSION = "tpblocks-trainer", 2  # 2: dcp/ replaced model.pt + optimizer_lane{g}.pt
_PREFIX = "step_"
MANIFEST = "manifest.json"
TRAINER, SHARDS, MODEL_FILE = "trainer.pt", "dcp", "model.pt"
REQUIRED = (TRAINER, f"{SHARDS}/.metadata")  # what a published checkpoint has whatever its manifest says


def checkpoint_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"{_PREFIX}{step:08d}"


def tmp_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """Where the checkpoint of ``step`` is assembled before it is published."""
    return checkpoint_root(run_dir) / f".tmp_{step_dir_name(step)}"


def rng_state() -> dict:
    """This process's random states (torch CPU [+ CUDA], numpy, python)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (name, keys.tolist(), pos, has_gauss, cached)  # plain ints: loadable with weights_only=True
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
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


def write_trainer_state(tmp: Path, trainer_state: dict) -> None:
    """Write trainer.pt into the temp directory (rank 0; dcp/ is written by every rank)."""
    torch.save({"format": FORMAT, "version": VERSION, **trainer_state}, tmp / TRAINER)


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
    _write_manifest(tmp, step, checksum_listing(tmp, names))


def _write_manifest(ckpt: Path, step: int, listing: dict) -> None:
    manifest = {"format": "tpblocks-checkpoint", "step": step, "files": listing}
    scratch = ckpt / (MANIFEST + ".tmp")
    scratch.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(scratch, ckpt / MANIFEST)  # a published checkpoint gaining model.pt is never left unsigned


def _manifest_listing(ckpt: Path) -> dict | None:
    """The manifest's ``files``: None when there is no manifest, {} when it is unreadable."""
    manifest = ckpt / MANIFEST
    if not manifest.is_file():
        return None
    try:
        listing = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return {}
    return listing if isinstance(listing, dict) else {}


def checkpoint_damage(ckpt: str | os.PathLike) -> str | None:
    """None when ``ckpt`` is intact, else why it cannot be trusted. Without a manifest only the required files are
    checked (reading them then reports any damage)."""
    ckpt = Path(ckpt)
    if (ckpt / MODEL_FILE).is_file() and not (ckpt / SHARDS).exists():
        return f"it has the layout before sharded checkpoints (no {SHARDS}/): not resumable; its model.pt loads"
    for name in REQUIRED:
        if not (ckpt / name).is_file():
            return f"{name} is missing"
    listing = _manifest_listing(ckpt)
    if listing is None:
        return None
    if not listing:
        return f"{MANIFEST} is unreadable"
    # model.pt is derived (consolidate) and never read on resume; load_model checks it against the manifest itself
    return find_damage(ckpt, {k: v for k, v in listing.items() if k != MODEL_FILE})


def complete_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Published checkpoint directories, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and (p / TRAINER).exists()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX) :]))


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint: the one ``latest`` names if it exists, else the highest step found."""
    root = checkpoint_root(run_dir)
    pointer = root / "latest"
    if pointer.exists():
        named = root / pointer.read_text().strip()
        if all((named / name).exists() for name in REQUIRED):
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
    if path.is_dir() and any((path / name).exists() for name in (*REQUIRED, MANIFEST)):
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


def load_trainer_state(ckpt: Path) -> dict:
    state = read_torch_file(ckpt / TRAINER)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{ckpt / TRAINER} is not a tpblocks trainer checkpoint (format={found!r})")
    if state.get("version", 0) > VERSION:
        raise ValueError(f"{ckpt} was written by a newer tpblocks (trainer format {state['version']} > {VERSION})")
    if state.get("version", 0) < VERSION:
        raise ValueError(
            f"{ckpt} was written by an older tpblocks (trainer format {state.get('version')}: full model.pt + "
            f"per-lane optimizer files); it cannot be resumed, but its model.pt loads with load_model: start a new "
            f"run from it"
        )
    return state


def consolidate(ckpt: str | os.PathLike) -> Path:
    """Convert ``ckpt``'s dcp/ into a single ``ckpt/model.pt`` (``tpblocks.models.io`` format, fp32, any layout
    wrote it) and sign it into the manifest. One process, the full model in memory. Returns the file."""
    from tpblocks.models.config import ModelConfig
    from tpblocks.models.io import save_model
    from tpblocks.models.model import TransformerLM

    from .sharded_state import load_full_model_state

    ckpt = Path(ckpt)
    damage = checkpoint_damage(ckpt)
    if damage is not None:
        raise ValueError(f"checkpoint {ckpt} is damaged ({damage}); convert another checkpoint of {ckpt.parent}")
    state = load_trainer_state(ckpt)
    model = TransformerLM(ModelConfig(**state["model_config"]))
    try:
        model.load_state_dict(load_full_model_state(ckpt / SHARDS))
    except RuntimeError as err:  # names the first tensors that differ instead of a traceback of torch's
        raise ValueError(f"{ckpt / SHARDS} does not fit its own model_config: {str(err)[:500]}") from err
    out = ckpt / MODEL_FILE
    save_model(model, out)
    listing = _manifest_listing(ckpt)
    if listing is not None:
        _write_manifest(ckpt, int(state["step"]), {**listing, **checksum_listing(ckpt, [MODEL_FILE])})
    return out


def model_file(ckpt: str | os.PathLike) -> Path:
    """``ckpt/model.pt``, converted from dcp/ first when the checkpoint has none yet (``consolidate``)."""
    path = Path(ckpt) / MODEL_FILE
    return path if path.is_file() else consolidate(ckpt)
