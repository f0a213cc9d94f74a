"""Self-describing model files: the config travels with the weights, so any tool can rebuild the model.

Format (``torch.save`` of a dict): ``{"format": "tpblocks-model", "version": 1, "model_config": {...},
"model": state_dict}``. Training checkpoints embed the same dict as their ``model.pt``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

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
    if payload.get("format") != FORMAT:
        raise ValueError(f"not a tpblocks model file (format={payload.get('format')!r})")
    if payload.get("version", 0) > VERSION:
        raise ValueError(f"model file version {payload['version']} is newer than this tpblocks ({VERSION})")
    return ModelConfig(**payload["model_config"])


def load_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> TransformerLM:
    """Rebuild a model from a file written by ``save_model`` (or a checkpoint directory holding model.pt)."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    if not path.exists():
        raise FileNotFoundError(f"no model file at {path}")
    payload = torch.load(path, map_location=map_location, weights_only=False)
    model = TransformerLM(config_from_payload(payload))
    model.load_state_dict(payload["model"])
    return model
