"""Test-wide settings: offline hubs, offline wandb, Triton interpreter, deterministic seeds."""

import os
from pathlib import Path

# Must be set before any kernel module is imported (the @triton.jit decorator reads it).
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One data cache for the whole test session (and later local runs): the embedded corpus and its tokenizer are
# built once instead of in every test's temporary directory. Ignored by git.
os.environ.setdefault("TPBLOCKS_CACHE", str(Path(__file__).resolve().parents[1] / ".cache" / "test"))


import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


# Tests run tiny models: one thread avoids OpenMP overhead and oversubscription when several ranks share 2 cores.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_and_dtype():
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(previous)


@pytest.fixture
def shared_data() -> Path:
    """../shared/data (real FineWeb rows, the Llama-2 tokenizer, WikiText-2); skips when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is not present (it ships beside the repository, not inside it)")
    return SHARED_DATA
