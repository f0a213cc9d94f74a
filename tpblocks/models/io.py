"""Self-describing model files: the config travels with the weights, so any tool can rebuild the model.

Format (``torch.save`` of a dict of plain types and tensors, read with ``weights_only=True``):
``{"format": "tpblocks-model", "version": 1, "model_config": {...}, "model": state_dict}``. Training checkpoints
hold sharded state (``dcp/``); ``launch/consolidate.py`` writes this file from it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from tpblocks.integrity import find_damage

from .config import ModelConfig
from .model import TransformerLM

FORMAT, VERSION = "tpblocks-model", 1


def model_payload(model: TransformerLM) -> dict:
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {"format": FORMAT, "version": VERSION, "model_config": model.cfg.to_dict(), "model": state}


def save_model(model: TransformerLM, path: str | os.PathLike) -> None:
    """Atomic write (temp file + rename): a crash never leaves a half-written model file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(model_payload(model), tmp)
    os.replace(tmp, path)


def config_from_payload(payload: dict) -> ModelConfig:
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"not a tpblocks model file (format={found!r})")
    if payload.get("version", 0) > VERSION:
        raise ValueError(f"model file version {payload['version']} is newer than this tpblocks ({VERSION})")
    return ModelConfig(**payload["model_config"])


def read_torch_file(path: Path, map_location: str | torch.device = "cpu"):
    """``torch.load(weights_only=True)`` whose failure on a damaged or foreign file is one ValueError naming it."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # EOFError, UnpicklingError, RuntimeError (zip), ...: all mean "unreadable"
        raise ValueError(f"cannot read {path}: {type(err).__name__}: {err} (truncated or not a torch file)") from err


def _check_against_manifest(path: Path) -> None:
    """A model.pt inside a training checkpoint is listed, with its sha256, in the checkpoint's manifest.json."""
    manifest = path.parent / "manifest.json"
    if not manifest.is_file():
        return
    try:
        entry = json.loads(manifest.read_text())["files"][path.name]
    except (ValueError, KeyError, TypeError):
        return  # not a checkpoint manifest listing this file
    damage = find_damage(path.parent, {path.name: entry})
    if damage is not None:
        raise ValueError(f"{path} is damaged: {damage}; use another checkpoint of {path.parent.parent}")


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> TransformerLM:
    """Rebuild a model from a file written by ``save_model`` (or a checkpoint directory holding model.pt, or a
    Laneformer directory: ``laneformer.py``). A damaged, truncated or foreign file is one ValueError naming it."""
    path = Path(path)
    from .laneformer import is_laneformer_dir, load_laneformer

    if path.is_dir() and is_laneformer_dir(path):
        return load_laneformer(path).to(map_location)
    if path.is_dir():
        if not (path / "model.pt").exists() and (path / "dcp").is_dir():
            raise FileNotFoundError(f"{path} holds sharded training state only (dcp/); convert it first: "
                                    f"python launch/consolidate.py {path}")  # fmt: skip
        path = path / "model.pt"
    if not path.exists():
        raise FileNotFoundError(f"no model file at {path}")
    _check_against_manifest(path)
    payload = read_torch_file(path, map_location)
    try:
        model = TransformerLM(config_from_payload(payload))
        model.load_state_dict(payload["model"])
    except (ValueError, KeyError, TypeError, RuntimeError) as err:
        raise ValueError(f"{path} is not a loadable tpblocks model file: {err}") from err
    return model
