"""Training: the loop (trainer), AdamW (optim), cosine/WSD (schedulers), atomic checkpoints, metrics, backends."""

from .trainer import Trainer, TrainingDiverged, run

__all__ = ["Trainer", "TrainingDiverged", "run"]
