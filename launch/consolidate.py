"""Convert a training checkpoint's sharded state (dcp/) into one ``model.pt`` (the ``tpblocks.models.io`` format).

    python launch/consolidate.py outputs/2026-12-01/07-25-06_quickstart            # the run's latest checkpoint
    python launch/consolidate.py outputs/.../checkpoints/step_00000050 [more ...]   # named checkpoints
    python launch/consolidate.py RUN_DIR --hf exported/                             # + a Hugging Face directory

Whatever lane degree and world size wrote the checkpoint, the file holds the full fp32 model and loads with
``tpblocks.models.io.load_model`` (launch/generate.py, the HF export). It is written next to dcp/ and signed into
the checkpoint's manifest; the path is printed. launch/generate.py converts by itself when it needs to.
``--hf DIR`` also writes a ``transformers`` ``LlamaForCausalLM`` directory (Llama-family models only:
tpblocks.models.hf).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without `pip install -e .`

from tpblocks.train import checkpoint as ckpt_io  # noqa: E402


def checkpoint_of(path: Path) -> Path:
    """``path`` if it is a checkpoint directory, else the latest complete checkpoint of the run directory ``path``."""
    if (path / ckpt_io.TRAINER).is_file():
        return path
    latest = ckpt_io.latest_checkpoint(path)
    if latest is None:
        raise ValueError(f"{path} is neither a checkpoint directory (with trainer.pt) nor a run directory with one")
    return latest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", type=Path, help="run directories or checkpoint directories")
    p.add_argument("--hf", type=Path, help="also save the (one) model as a Hugging Face Llama directory here")
    args = p.parse_args(argv)
    if args.hf is not None and len(args.paths) != 1:
        p.error("--hf exports one model: give one run or checkpoint directory")
    try:
        for path in args.paths:
            model_file = ckpt_io.consolidate(checkpoint_of(path.expanduser()))
            print(model_file)
        if args.hf is not None:
            from tpblocks.models.hf import save_hf
            from tpblocks.models.io import load_model

            save_hf(load_model(model_file), str(args.hf))
            print(args.hf)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
