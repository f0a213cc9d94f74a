"""Convert a training checkpoint's sharded state (dcp/) into one ``model.pt`` (the ``tpblocks.models.io`` format).

    python launch/consolidate.py outputs/2026-12-01/07-25-06_quickstart            # the run's latest checkpoint
    python launch/consolidate.py outputs/.../checkpoints/step_00000050 [more ...]   # named checkpoints

Whatever lane degree and world size wrote the checkpoint, the file holds the full fp32 model and loads with
``tpblocks.models.io.load_model`` (launch/generate.py, the HF export). It is written next to dcp/ and signed into
the checkpoint's manifest; the path is printed. launch/generate.py converts by itself when it needs to.
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
    args = p.parse_args(argv)
    try:
        for path in args.paths:
            print(ckpt_io.consolidate(checkpoint_of(path.expanduser())))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
