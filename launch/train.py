"""Train a model: ``python launch/train.py [+experiment=NAME] [key=value ...]``, or under torchrun.

A thin Hydra entry point; the work is ``tpblocks.train.run(cfg)``. A bad configuration exits with status 2 and
one line naming the field, not a stack trace.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without `pip install -e .`

from tpblocks.config import register_hydra_defaults  # noqa: E402

register_hydra_defaults()  # the dataclass defaults, under conf/config.yaml's first defaults entry


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from tpblocks.train import run
    from tpblocks.train.faults import RankStalled

    try:
        summary = run(cfg)
    except ValueError as err:  # configuration and data errors are the user's to fix: say what, not where
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except RankStalled as err:  # another rank's fault, named in the message: no stack trace of this one
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    if summary["status"] != "completed":
        sys.exit(1)


if __name__ == "__main__":
    main()
