"""Training: the loop (trainer), AdamW (optim), cosine/WSD (schedulers), atomic checkpoints, metrics, backends.

``Trainer``, ``TrainingDiverged`` and ``run`` are loaded on first use, so the torch-free parts (metrics,
run_report) can be imported by ``launch/report.py`` without importing torch.
"""

from typing import Any

__all__ = ["Trainer", "TrainingDiverged", "run"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
