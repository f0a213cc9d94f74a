"""Generate text from a trained model (KV-cache decode), in one process or over a lane group.

    python launch/generate.py checkpoint=outputs/.../run prompt="Once upon a time" max_new_tokens=64 \
        temperature=0.8 top_k=50 seed=0
    torchrun --nproc_per_node=2 launch/generate.py checkpoint=... prompt="..."     # lanes split over 2 ranks
    python launch/generate.py checkpoint=... prompt="..." compile=true dtype=bf16 batch=4

Arguments (key=value):
  checkpoint      a run directory (uses checkpoints/latest), a checkpoint directory (its sharded dcp/ state is
                  converted once into model.pt there), a model.pt file (tpblocks.models.io format), or a
                  Laneformer directory (config.json + safetensors)
  prompt          text (needs a tokenizer), or prompt_ids=[1,2,3] as token ids
  tokenizer       sentencepiece .model; default: data.tokenizer_path from the run's config.yaml, else the
                  tokenizer the trainer cached for that data config. Without one, only token ids are printed
  max_new_tokens  (32) temperature (0 = greedy) top_k (none) seed (0) eos (stop at the tokenizer's EOS: true)
  compile         (false) compiled decode step (tpblocks.infer.engine; CUDA graphs on a GPU)
  dtype           (fp32) decode weights: fp32, bf16 or fp16
  batch           (1) sequences decoded together, each from the prompt (differ when sampling)
  vocab_parallel  (false) over a lane group, split the output head by vocabulary rows
Tokens are streamed as they come (rank 0, first sequence); the decode speed is printed at the end.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

from tpblocks.typed import check_fields, require  # noqa: E402 - after the path set-up above


class UsageError(ValueError):
    pass


@dataclass(frozen=True, kw_only=True)
class GenerateArgs:
    """The command line, typed (tpblocks.typed: ``top_k=2.5``, ``eos=maybe``, ``max_new_tokens=2.7`` are refused)."""

    checkpoint: str | None = None
    prompt: str | None = None
    prompt_ids: Any = None  # a token id or a flat list of them (checked below)
    tokenizer: str | None = None
    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int | None = None
    seed: int = 0
    eos: bool = True
    compile: bool = False
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    batch: int = 1
    vocab_parallel: bool = False

    def __post_init__(self) -> None:
        check_fields(self)
        require(self.batch >= 1, f"batch={self.batch} must be >= 1")
        require(self.max_new_tokens >= 0, f"max_new_tokens={self.max_new_tokens} must be >= 0")
        require(self.temperature >= 0, f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        require(self.top_k is None or self.top_k >= 1, f"top_k={self.top_k} must be >= 1 or null (no cut)")
        ids = self.prompt_ids if isinstance(self.prompt_ids, list) else [self.prompt_ids]
        require(
            self.prompt_ids is None or all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids),
            f"prompt_ids={self.prompt_ids!r} must be a token id or a flat list of them, e.g. prompt_ids=[1,2,3]",
        )


DEFAULTS = {f.name: f.default for f in dataclasses.fields(GenerateArgs)}


def parse_args(argv: list[str]) -> dict:
    args = dict(DEFAULTS)
    for item in argv:
        key, sep, value = item.partition("=")
        key = key.lstrip("+-")
        if not sep or key not in DEFAULTS:
            raise UsageError(f"bad argument {item!r}: expected key=value with key in {', '.join(DEFAULTS)}")
        if key in ("prompt", "checkpoint", "tokenizer"):
            args[key] = value.strip("'\"")  # text stays text (a prompt like "1: yes" is not YAML)
        else:
            try:
                args[key] = yaml.safe_load(value)
            except yaml.YAMLError:
                raise UsageError(f"cannot parse {key}={value!r}") from None
    if args["checkpoint"] is None:
        raise UsageError("checkpoint=<run dir | checkpoint dir | model.pt> is required")
    if (args["prompt"] is None) == (args["prompt_ids"] is None):
        raise UsageError('give exactly one of prompt="text" or prompt_ids=[...]')
    try:
        return dataclasses.asdict(GenerateArgs(**args))
    except ValueError as err:
        raise UsageError(str(err)) from None


def resolve_checkpoint(path: str | Path) -> tuple[Path, Path | None]:
    """(model file, run directory or None) for a run dir, a checkpoint dir or a model file. A training checkpoint
    holds sharded state (dcp/): it is converted once into its model.pt (tpblocks.train.checkpoint.consolidate)."""
    from tpblocks.models.laneformer import is_laneformer_dir

    path = Path(path).expanduser()
    if is_laneformer_dir(path):  # Kog's format: config.json + safetensors (tokenizer=... names its tokenizer)
        return path, None
    if path.is_file():
        run = path.parent.parent.parent if path.parent.parent.name == "checkpoints" else None
        return path, run
    run = path.parent.parent if path.parent.name == "checkpoints" else None
    latest = path / "checkpoints" / "latest"
    if latest.is_file():
        path, run = path / "checkpoints" / latest.read_text().strip(), path
    if (path / "model.pt").is_file():
        return path / "model.pt", run
    if (path / "dcp").is_dir():
        from tpblocks.train.checkpoint import model_file

        try:
            return model_file(path), run
        except ValueError as err:  # damaged or foreign: the reason, not a traceback
            raise UsageError(str(err)) from None
    if latest.is_file():
        raise UsageError(f"{latest} names {path.name}, which holds neither model.pt nor dcp/ (interrupted save?)")
    raise UsageError(f"no model at {path}: expected a run directory, a checkpoint directory or a model.pt file")


def find_tokenizer(explicit: str | None, run_dir: Path | None) -> Path | None:
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise UsageError(f"tokenizer={explicit} does not exist; give a sentencepiece .model file")
        return path
    config = run_dir / "config.yaml" if run_dir is not None else None
    if config is None or not config.is_file():
        return None
    data = (yaml.safe_load(config.read_text()) or {}).get("data") or {}
    for key in ("tokenizer_path", "tokenizer"):
        value = data.get(key)
        if isinstance(value, str) and Path(value).expanduser().is_file():
            return Path(value).expanduser()
    if run_dir is not None and (run_dir / "tokenizer.model").is_file():
        return run_dir / "tokenizer.model"
    return _trained_tokenizer(data) if data else None


def _trained_tokenizer(data: dict) -> Path | None:
    """The tokenizer the trainer trained and cached for this data config (data.tokenizer_path: null), if present."""
    try:
        from tpblocks.data import DataConfig
        from tpblocks.data.prepare import tokenizer_cache_path

        path = tokenizer_cache_path(DataConfig.from_dict(data))
    except Exception:  # best effort: an old or foreign config just means "no tokenizer found"
        return None
    return path if path.is_file() else None


def main(argv: list[str]) -> int:
    try:
        args = parse_args(argv)
        model_path, run_dir = resolve_checkpoint(args["checkpoint"])
        tok_path = find_tokenizer(args["tokenizer"], run_dir)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import sentencepiece as spm

    from tpblocks.models.io import load_model
    from tpblocks.parallel import MeshComm, ParallelDims, destroy_distributed, init_distributed, shard_model

    sp = spm.SentencePieceProcessor(model_file=str(tok_path)) if tok_path else None
    if args["prompt"] is not None:
        if sp is None:
            print("error: prompt= needs a tokenizer (tokenizer=PATH, or data.tokenizer_path in the run's config.yaml);"
                  " or pass prompt_ids=[...]", file=sys.stderr)  # fmt: skip
            return 2
        prompt_ids = ([sp.bos_id()] if sp.bos_id() >= 0 else []) + sp.encode(args["prompt"])
    else:
        prompt_ids = args["prompt_ids"] if isinstance(args["prompt_ids"], list) else [args["prompt_ids"]]
    eos_id = sp.eos_id() if sp is not None and args["eos"] and sp.eos_id() >= 0 else None

    rank, world = init_distributed()
    try:
        model = load_model(model_path).eval()
        if sp is not None and sp.vocab_size() > model.cfg.vocab_size:
            raise ValueError(
                f"tokenizer {tok_path} has {sp.vocab_size()} pieces but the model's vocab_size is "
                f"{model.cfg.vocab_size}; give the tokenizer the model was trained with"
            )
        if world > 1:
            mesh = ParallelDims(dp=1, lane=world, world_size=world).build_mesh("cpu")
            model = shard_model(model, MeshComm(mesh), vocab_parallel_head=bool(args["vocab_parallel"]))
        out, speed = _decode(model, prompt_ids, args, eos_id, stream=_streamer(sp, prompt_ids) if rank == 0 else None)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        destroy_distributed()
    if rank == 0:
        print(f"\nmodel: {model_path} (arch={model.cfg.arch}, recipe={model.cfg.recipe}, ranks={world})")
        print(f"prompt ids: {prompt_ids}")
        print(f"generated ids: {out[0]}" if len(out) == 1 else "generated ids:\n" + "\n".join(map(str, out)))
        if sp is not None:
            print(f"text: {sp.decode(prompt_ids + out[0])}")
            print(f"generated: {sp.decode(out[0])}")
        print(speed)
    return 0


def _streamer(sp, prompt_ids: list[int]):
    """Print the first sequence's new text as each token arrives (token ids without a tokenizer)."""
    ids: list[int] = []
    shown = [""]

    def stream(tokens_b) -> None:
        ids.append(int(tokens_b[0]))
        if sp is None:
            print(ids[-1], end=" ", flush=True)
            return
        text = sp.decode(ids)
        print(text[len(shown[0]) :], end="", flush=True)
        shown[0] = text

    return stream


def _decode(model, prompt_ids: list[int], args: dict, eos_id: int | None, stream) -> tuple[list[list[int]], str]:
    """New token ids per sequence (cut after EOS) and a line with the measured decode speed."""
    import time

    import torch

    from tpblocks.infer import DecodeEngine

    batch, n = args["batch"], args["max_new_tokens"]
    engine = DecodeEngine(model, batch=batch, max_seq_len=len(prompt_ids) + max(n, 1), dtype=args["dtype"],
                          compile=bool(args["compile"]))  # fmt: skip
    stamps: list[float] = []
    t0 = time.perf_counter()
    out = engine.generate(
        torch.tensor([prompt_ids] * batch), n, temperature=float(args["temperature"]), top_k=args["top_k"],
        seed=args["seed"], eos_id=eos_id, on_token=lambda t: (stamps.append(time.perf_counter()), stream and stream(t)),
    )  # fmt: skip
    rows = [row.tolist() for row in out]
    if eos_id is not None:
        rows = [r[: r.index(eos_id) + 1] if eos_id in r else r for r in rows]
    if len(stamps) < 3:
        return rows, f"prefill + first token {((stamps or [t0])[0] - t0) * 1e3:.0f} ms"
    # The first decode step compiles (compile=true): the speed is measured over the steps after it.
    per_token = (stamps[-1] - stamps[1]) / (len(stamps) - 2)
    mode = "compiled" if args["compile"] else "eager"
    return rows, (f"prefill + first token {(stamps[0] - t0) * 1e3:.0f} ms (includes compiling); decode {mode} "
                  f"{args['dtype']}: {per_token * 1e3:.2f} ms/step, {1 / per_token:.1f} tok/s per sequence, "
                  f"{batch / per_token:.1f} tok/s for batch {batch}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
