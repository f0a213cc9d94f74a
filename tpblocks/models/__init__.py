"""The model zoo: pure PyTorch, no distributed imports. See ``model.py`` for the overall structure."""

from .comm import Communicator, LocalComm, SyncCounter
from .config import ModelConfig
from .flavors import FLAVORS, get_flavor
from .kv_cache import KVCache
from .model import TransformerLM, build_model
from .sizing import count_parameters, solve_hidden_size, total_parameters, training_flops_per_token

__all__ = [
    "FLAVORS",
    "Communicator",
    "KVCache",
    "LocalComm",
    "ModelConfig",
    "SyncCounter",
    "TransformerLM",
    "build_model",
    "count_parameters",
    "get_flavor",
    "solve_hidden_size",
    "total_parameters",
    "training_flops_per_token",
]
