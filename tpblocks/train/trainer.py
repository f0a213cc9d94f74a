"""The training loop: typed config -> data -> model -> backend -> steps, eval, checkpoints, metrics.

``run(cfg)`` is what ``launch/train.py`` calls (also importable from tests and notebooks). One optimizer update
("step") consumes ``train.tokens_per_step`` tokens: ``accum`` micro-batches of ``micro_batch x seq_len`` tokens
on each of ``world`` ranks. Rank r reads its own share of the deterministic token stream (TokenLoader), so
one rank with accumulation 2 and two ranks with accumulation 1 see the same tokens per step and give the same
losses up to float re-association (tests/test_train_distributed.py).

Parallel layouts (``tpblocks.parallel.ParallelDims``, applied by ``tpblocks.parallel.parallelize`` after every rank
built the same full model from the seed): ``parallel.lane=G`` shards the model over G ranks and data-parallelises
the rest (DDP-style all-reduce, or FSDP2 with ``trainer=fsdp``); all G lane ranks of a replica read the same batch.
Checkpoints are sharded through
torch.distributed.checkpoint under the full model's tensor names (tpblocks/train/sharded_state.py): each rank
writes its shard, and a run resumes under any lane degree and world size. ``layer_parallel.enabled=true`` runs
the layer stack by MGRIT over all ranks (tpblocks.parallel.mgrit): every rank reads the same batch, gradients are
already identical, ``lp/*`` metrics go to metrics.jsonl.

Divergence: a non-finite (rank-averaged) loss or gradient norm stops the run *before* the update, with a message
naming the step; the last good checkpoint is left untouched and summary.json says ``"status": "diverged"``.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tpblocks.config import RunConfig
from tpblocks.models import build_model, total_parameters
from tpblocks.parallel import ParallelDims
from tpblocks.parallel.parallelize import Parallelized, parallel_dims, parallelize

from . import checkpoint as ckpt_io
from . import sharded_state
from .cpu_allocator import retain_freed_memory
from .distributed import (
    DistEnv,
    NonFiniteGradNorm,
    all_reduce_sum,
    autocast,
    autocast_dtype,
    barrier,
    broadcast_object,
    build_backend,
    compute_loss,
    dist_env,
    gather_objects,
)
from .faults import Heartbeat, die_with_parent, is_timeout
from .metrics import MetricsWriter, init_wandb, write_json
from .optim import apply_resumed_hyperparameters, build_optimizer
from .schedulers import build_scheduler, load_scheduler_state


class TrainingDiverged(RuntimeError):
    """Loss or gradient norm became NaN/inf."""


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (1 << 32))
    random.seed(seed)


def _say(env: DistEnv, message: str) -> None:
    if env.is_main:
        print(message, file=sys.stderr, flush=True)


class Trainer:
    """One run. Construct on every rank, then ``fit()``; returns the summary dict (the same on every rank)."""

    def __init__(self, cfg: RunConfig, config_yaml: str = ""):
        self.cfg = cfg
        self.config_yaml = config_yaml
        self.start_time = time.time()
        self.step = 0
        self.tokens_seen = 0
        self.prior_elapsed = 0.0
        self.last_train_loss: float | None = None
        self.last_eval_loss: float | None = None
        self.dims: ParallelDims | None = None
        self.par: Parallelized | None = None  # the placed model (tpblocks.parallel.parallelize)
        self.eval_rounds = 0  # held-out forwards per evaluation on every rank (the most any rank has)
        self.pending_save: tuple[Any, int] | None = None  # (Future, step) of an async checkpoint not yet published
        self.save_group = None  # process group of the async checkpoint writes (apart from the training ones)

    # ------------------------------------------------------------------ setup
    def _setup_run_dir(self) -> None:
        env = self.env
        mine = Path(self.cfg.run_dir).resolve()
        run_dir = Path(broadcast_object(str(mine)))  # rank 0's: each rank's Hydra stamps its own ${now:}
        self.run_dir = run_dir
        if mine != run_dir and mine.is_dir() and not any(mine.iterdir()):
            mine.rmdir()  # the empty dated directory Hydra made for this rank a second after rank 0's
        if env.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(self.config_yaml)
            write_json(run_dir / "model_config.json", self.cfg.model.to_dict())
        barrier()
        _say(env, f"run dir: {run_dir}")

    def _setup_data(self) -> None:
        from tpblocks.data import TokenLoader, heldout_batches, prepare_data

        cfg, env = self.cfg, self.env
        self.dims = dims = parallel_dims(cfg, env.world, env.device.type)
        data_rank, data_world = dims.data_rank(env.rank), dims.data_world  # all lane ranks of a replica: one batch
        # Local rank 0 of each node prepares (tokenizer training, shard writing) into the cache; the other ranks
        # wait for its files (prepare_data polls up to data.prepare_timeout_s, longer than a barrier's timeout).
        prepared = prepare_data(cfg.data, rank=env.local_rank, world=env.world)
        barrier()
        self.prepared = prepared
        if prepared.vocab_size > cfg.model.vocab_size:
            raise ValueError(
                f"the tokenizer has {prepared.vocab_size} tokens but the model's vocab_size is "
                f"{cfg.model.vocab_size}; set model.overrides.vocab_size={prepared.vocab_size} (or larger)"
            )
        self.loader = TokenLoader.from_prepared(
            prepared,
            cfg.seq_len,
            cfg.train.micro_batch,
            data_rank,
            data_world,
            cfg.data.seed,
            shuffle=cfg.data.shuffle,
        )
        self.heldout = []
        if cfg.train.eval_every:
            self.heldout = heldout_batches(
                prepared, cfg.seq_len, cfg.train.eval_batch, cfg.train.eval_tokens, data_rank, data_world
            )
            counts = gather_objects(len(self.heldout))
            # A forward may be collective over dp (FSDP2 gathers each stage): every rank runs as many as the most.
            self.eval_rounds = max(counts)
            if sum(counts) == 0:
                raise ValueError(
                    "the held-out set is empty (data.heldout_tokens=0?); set data.heldout_tokens > 0 or "
                    "train.eval_every=0 to train without evaluation"
                )

    def _setup_model(self) -> None:
        cfg, env, dims = self.cfg, self.env, self.dims
        self.accum = cfg.train.grad_accumulation(cfg.seq_len, dims.data_world)
        seed_everything(cfg.seed)  # identical init on every rank (DDP also broadcasts rank 0's weights)
        self.par = par = parallelize(build_model(cfg.model).to(env.device), dims, cfg, env.device)
        self.model = par.module
        self.optimizer = build_optimizer(self.model, cfg.optim)  # after placement: it holds this rank's shards
        self.scheduler = build_scheduler(self.optimizer, cfg.scheduler, cfg.train.max_steps)
        self.backend = build_backend(par, self.optimizer, cfg, env, self.accum)
        _say(
            env,
            f"model {cfg.flavor} ({cfg.model.arch}): {total_parameters(cfg.model):,} parameters | "
            f"data ranks {dims.data_world} x micro_batch {cfg.train.micro_batch} x seq_len {cfg.seq_len} "
            f"x accum {self.accum} = "
            f"{cfg.train.tokens_per_step:,} tokens/step | backend {cfg.trainer.backend} on {env.device}"
            + (" | CPU allocator retains freed memory" if self.cpu_memory_retained else ""),
        )
        for note in par.notes:
            _say(env, note)

    def _maybe_resume(self) -> None:
        cfg, env = self.cfg, self.env
        # Every rank resolves (a bad train.resume then fails on every rank with the same message, not only on 0).
        path = ckpt_io.resolve_resume(cfg.train.resume, self.run_dir, warn=lambda m: _say(env, m))
        path = broadcast_object(str(path) if path is not None else None)  # rank 0's choice wins if they differ
        self.resumed_from = None
        if path is None:
            return
        path = Path(path)
        state = ckpt_io.load_trainer_state(path)
        self.backend.check_resume(state, path)
        _check_same_model(state["model_config"], cfg.model, path)
        optimizer = self.backend.checkpointed_optimizer
        shards = path / ckpt_io.SHARDS
        sharded_state.load(self.model, optimizer, state["optimizer_groups"], self.par.mesh, shards)
        self.backend.load_extra(path)
        if (state["lane"], state["world_size"]) != (self.dims.lane, env.world):
            _say(env, f"resume: parallel.lane {state['lane']} -> {self.dims.lane}, world size "
                      f"{state['world_size']} -> {env.world} (resharded)")  # fmt: skip
        horizon = load_scheduler_state(self.scheduler, state["scheduler"], cfg.train.max_steps)
        if horizon != cfg.train.max_steps:
            _say(env, f"resume: train.max_steps {horizon} -> {cfg.train.max_steps} (WSD decay moved to the new end)")
        for change in apply_resumed_hyperparameters(self.optimizer, self.scheduler, cfg.optim):
            _say(env, f"resume: {change} (takes effect from step {int(state['step']) + 1})")
        self.loader.load_state_dict(state["loader"][0])  # the global cursor, the same on every rank
        if env.rank < len(state["rng"]):
            ckpt_io.set_rng_state(state["rng"][env.rank])
        self.step = int(state["step"])
        self.tokens_seen = int(state["tokens_seen"])
        self.prior_elapsed = float(state["elapsed_s"])
        self.last_train_loss = state.get("train_loss")
        self.last_eval_loss = state.get("eval_loss")
        note = self.par.load_extra_state(state.get("layer_parallel"))
        if note is not None:
            _say(env, f"resume from {path}: {note}")
        self.resumed_from = path
        _say(env, f"resumed from {path} (step {self.step})")

    # ------------------------------------------------------------------ pieces of a step
    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean held-out loss over all ranks' batches (token-weighted)."""
        self.model.eval()
        total, count = 0.0, 0.0
        for inputs, targets in self.heldout:
            logits = self._logits(inputs)
            targets = targets.to(self.env.device)
            total += float(compute_loss(logits, targets)) * targets.numel()
            count += targets.numel()
        for _ in range(self.eval_rounds - len(self.heldout)):  # this rank's share is smaller: keep pace, count none
            self._logits(torch.zeros(1, self.cfg.seq_len, dtype=torch.long))
        self.model.train()
        total, count = all_reduce_sum([total, count], self.env.device)
        return total / count

    def _logits(self, inputs_bs: torch.Tensor) -> torch.Tensor:
        with autocast(autocast_dtype(self.cfg.train, self.env.device), self.env.device):
            return self.model(inputs_bs.to(self.env.device))

    def save_checkpoint(self) -> None:
        """Every rank writes its shard into a temp directory, rank 0 the trainer state; published (renamed) when
        the writes are done: now, or with ``train.async_checkpoint`` at the next save or the end of the run."""
        env, cfg = self.env, self.cfg
        self.publish_pending()
        if env.is_main:
            ckpt_io.prepare_tmp(self.run_dir, self.step)
        barrier()
        tmp = ckpt_io.tmp_dir(self.run_dir, self.step)
        self.backend.save_extra(tmp)
        rngs = gather_objects(ckpt_io.rng_state())
        optimizer = self.backend.checkpointed_optimizer
        asynchronous = cfg.train.async_checkpoint
        if asynchronous and env.distributed and self.save_group is None:
            import torch.distributed as dist

            self.save_group = dist.new_group(backend="gloo")  # the write thread's collectives stay off the step's
        future = sharded_state.save(
            self.model, optimizer, self.par.mesh, tmp / ckpt_io.SHARDS, self.save_group, asynchronous
        )
        if env.is_main:
            state = {
                "step": self.step,
                "model_config": cfg.model.to_dict(),
                "backend": cfg.trainer.backend,
                "lane": self.dims.lane,
                "optimizer_groups": sharded_state.optimizer_groups(optimizer),
                "scheduler": self.scheduler.state_dict(),
                "rng": rngs,
                "loader": [self.loader.state_dict()],  # one global cursor (tpblocks/data/loader.py)
                "world_size": env.world,
                "tokens_seen": self.tokens_seen,
                "elapsed_s": self.elapsed(),
                "train_loss": self.last_train_loss,
                "eval_loss": self.last_eval_loss,
                "layer_parallel": self.par.extra_state(),  # MGRIT monitor decisions
            }
            ckpt_io.write_trainer_state(tmp, state)
        self.pending_save = (future, self.step)
        if future is None:
            self.publish_pending()

    def publish_pending(self) -> None:
        """Wait for this rank's part of the last save, then (every rank's part written) rank 0 publishes it."""
        if self.pending_save is None:
            return
        future, step = self.pending_save
        self.pending_save = None
        if future is not None:
            future.result()
        barrier()  # every rank's shard (and DeepSpeed files) are in the temp directory
        if self.env.is_main:
            ckpt_io.publish(self.run_dir, step, self.cfg.train.keep_checkpoints)
        barrier()

    def elapsed(self) -> float:
        return self.prior_elapsed + time.time() - self.start_time

    def train_step(self) -> dict:
        """One optimizer update. Raises TrainingDiverged before touching the weights on NaN/inf."""
        cfg, env = self.cfg, self.env
        t0 = time.time()
        losses = []
        for j in range(self.accum):
            inputs, targets = self.loader.next_batch()
            inputs, targets = inputs.to(env.device), targets.to(env.device)
            losses.append(self.backend.forward_backward(inputs, targets, last=j == self.accum - 1))
        local = float(torch.stack(losses).float().mean())
        (loss_sum,) = all_reduce_sum([local], env.device)
        train_loss = loss_sum / env.world
        step = self.step + 1
        if not math.isfinite(train_loss):
            raise TrainingDiverged(f"train loss is {train_loss} at step {step}")
        lp_metrics = self.par.step_end(step, train_loss, lambda: compute_loss(self._logits(inputs), targets))
        lr = self.scheduler.get_last_lr()[0]  # the lr this update uses
        try:
            grad_norm = self.backend.update()
        except NonFiniteGradNorm as err:
            raise TrainingDiverged(f"{err} at step {step} (loss {train_loss:.4f})") from err
        except RuntimeError as err:  # e.g. lr=1e300: the step size does not fit the parameters' dtype
            if "overflow" not in str(err):
                raise
            raise TrainingDiverged(f"the optimizer update overflowed at step {step} (lr {lr:g}): {err}") from err
        self.scheduler.step()
        self.step = step
        self.tokens_seen += cfg.train.tokens_per_step
        self.last_train_loss = train_loss
        dt = time.time() - t0
        return {
            "step": step,
            "lr": lr,
            "train_loss": train_loss,
            "tokens": self.tokens_seen,
            "tokens_per_s": cfg.train.tokens_per_step / max(dt, 1e-9),
            "elapsed_s": round(self.elapsed(), 3),
            "grad_norm": grad_norm,
            **lp_metrics,
        }

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        cfg = self.cfg
        die_with_parent()
        self.env = env = dist_env(cfg.trainer.device, cfg.trainer.dist_timeout_s)
        self.heartbeat = beat = Heartbeat()
        on_cpu = env.device.type == "cpu"
        self.cpu_memory_retained = on_cpu and cfg.trainer.cpu_allocator == "retain" and retain_freed_memory()
        self.run_dir = Path(cfg.run_dir).resolve()
        status, error = "failed", None
        writer, wandb_run, bar = None, None, None
        try:
            self._setup_run_dir()
            self._setup_data()
            self._setup_model()
            self._maybe_resume()
            if env.is_main:
                wandb_run = init_wandb(cfg.wandb, self.run_dir, _config_dict(self.config_yaml))
                writer = MetricsWriter(self.run_dir, self.step if self.resumed_from else None, wandb_run)
            bar = _progress(env, cfg, self.step)
            train = cfg.train
            while self.step < train.max_steps:
                beat.update("train", self.step + 1)
                record = self.train_step()
                step = record["step"]
                if train.eval_every and (step == 1 or step % train.eval_every == 0 or step == train.max_steps):
                    beat.update("eval", step)
                    record["eval_loss"] = self.last_eval_loss = self.evaluate()
                if writer is not None and (step % train.log_every == 0 or "eval_loss" in record):
                    writer.log(record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{record['train_loss']:.3f}", lr=f"{record['lr']:.2e}", refresh=False)
                if (train.checkpoint_every and step % train.checkpoint_every == 0) or step == train.max_steps:
                    beat.update("checkpoint", step)
                    self.save_checkpoint()
            self.publish_pending()
            status = "completed"
        except TrainingDiverged as err:
            status, error = "diverged", f"{err}; stopped without updating the weights"
            self.publish_pending()  # an async save of a good step still becomes a checkpoint
            last = ckpt_io.latest_checkpoint(self.run_dir)
            error += f"; last good checkpoint: {last}" if last else "; no checkpoint had been written yet"
            _say(env, f"DIVERGED: {error}")
        except BaseException as err:  # summary.json is written on any failure, then the error propagates
            if is_timeout(err):  # a peer stalled: say which one rather than only "timed out"
                stalled = beat.diagnose(cfg.trainer.dist_timeout_s)
                error = str(stalled)
                raise stalled from err
            error = f"{type(err).__name__}: {err}"
            raise
        finally:
            beat.stop()
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()
            summary = self._summary(status, error)
            if env.is_main and self.run_dir.is_dir():
                write_json(self.run_dir / "summary.json", summary)
            if wandb_run is not None:
                wandb_run.summary.update({k: v for k, v in summary.items() if v is not None})
                wandb_run.finish(exit_code=0 if status == "completed" else 1)
            _say(
                env,
                f"{status}: step {self.step}, train loss {_fmt(self.last_train_loss)}, eval loss "
                f"{_fmt(self.last_eval_loss)}, {summary['wall_s']:.1f} s | run dir: {self.run_dir}",
            )
            _shutdown(getattr(self, "backend", None), clean=status == "completed")
        if env.is_main:
            self._end_of_run(status)
        return summary

    def _end_of_run(self, status: str) -> None:
        """Rank 0, after teardown (no peer waits on it): the loss curve, and after a completed run a greedy sample
        from the final checkpoint and the command that goes on from it. Nothing here may fail a finished run, so
        a problem is reported in one line, not raised."""
        from .run_report import generate_command, greedy_sample, plot_run

        env, train = self.env, self.cfg.train
        try:
            _say(env, f"loss curve: {plot_run(self.run_dir)}")
        except Exception as err:  # a missing plot is worth a line, not a failed run
            _say(env, f"loss curve not written: {type(err).__name__}: {err}")
        latest = ckpt_io.latest_checkpoint(self.run_dir)
        if status != "completed" or not train.sample_tokens or latest is None:
            return
        try:
            model = ckpt_io.model_file(latest)  # dcp/ -> model.pt, so generate also reads it
            text, n = greedy_sample(model, self.prepared.tokenizer_path, train.sample_prompt, train.sample_tokens)
        except Exception as err:
            _say(env, f"sample not generated: {type(err).__name__}: {err}")
            return
        # repr: one line, and a young model's favourite output (newlines, spaces) stays visible
        _say(env, f"greedy sample ({n} tokens after {train.sample_prompt!r}): {text!r}")
        _say(env, f"more: {generate_command(self.run_dir, train.sample_prompt, n)}")

    def _summary(self, status: str, error: str | None) -> dict:
        m = self.cfg.model
        return {
            "status": status,
            "step": self.step,
            "final_train_loss": self.last_train_loss,
            "final_eval_loss": self.last_eval_loss,
            "params": total_parameters(m),
            "tokens_seen": self.tokens_seen,
            "arch": m.arch,
            "recipe": m.recipe if m.arch == "tp_blocks" else None,
            "lane_count": m.lane_count if m.arch == "tp_blocks" else 1,
            "flavor": self.cfg.flavor,
            "experiment": self.cfg.name,
            "error": error,
            "wall_s": round(time.time() - self.start_time, 3),
            "world_size": self.env.world,
            "backend": self.cfg.trainer.backend,
            "seed": self.cfg.seed,
            "parallel": {"dp": self.dims.dp, "lane": self.dims.lane} if self.dims else None,
            "layer_parallel": self.cfg.layer_parallel.enabled,
        }


def _check_same_model(saved: dict | None, model: Any, path: Path) -> None:
    """The checkpoint's weights fit only the architecture that wrote them: name what differs instead of letting
    ``load_state_dict`` fail with a list of tensor names."""
    if not isinstance(saved, dict):
        return
    mine = {k: v for k, v in model.to_dict().items() if k != "extra"}
    differ = [f"{k}={saved.get(k)!r} (now {v!r})" for k, v in mine.items() if k in saved and saved[k] != v]
    if differ:
        raise ValueError(
            f"checkpoint {path} holds another model: {', '.join(differ)}; the architecture cannot change on "
            f"resume: restore those model settings, or train.resume=none (or another run_dir) to start afresh"
        )


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _progress(env: DistEnv, cfg: RunConfig, start: int):
    if not (env.is_main and cfg.train.progress):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=cfg.train.max_steps, initial=start, desc=cfg.name, unit="step", dynamic_ncols=True)


def _config_dict(config_yaml: str) -> dict:
    if not config_yaml:
        return {}
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.create(config_yaml))


def _shutdown(backend: Any, clean: bool) -> None:
    """Tear down in order: the backend's engine, then (after a run that ended normally on every rank, so no
    rank is left waiting) a barrier, so no rank destroys its process group while a peer still talks to it."""
    import torch.distributed as dist

    close = getattr(backend, "close", None)
    if close is not None:
        close()
    if dist.is_available() and dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()


def run(cfg: Any) -> dict:
    """Train from a composed Hydra config (DictConfig or dict). Validates everything first (ValueError naming
    the field), then trains; returns the summary dict written to ``<run_dir>/summary.json``."""
    from omegaconf import DictConfig, OmegaConf

    run_cfg = RunConfig.from_dictconfig(cfg)
    config_yaml = OmegaConf.to_yaml(cfg, resolve=True) if isinstance(cfg, DictConfig) else json.dumps(cfg, indent=2)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return Trainer(run_cfg, config_yaml).fit()
