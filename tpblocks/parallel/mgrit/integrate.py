"""Make a ``TransformerLM`` layer-parallel from the outside: ``apply_layer_parallel(model, cfg, group)``.

The model stays pure PyTorch and keeps its parameter names (checkpoints, ``to_hf`` and sharding code see the
same ``stages.{i}...`` keys). What changes is how its stages are *run*: the first layer of each MGRIT stack is
given an instance-level ``forward`` that runs the whole stack by MGRIT, and the other layers of the stack pass
their input through (the model's own loop still calls every stage). With a KV cache (decoding) the stack runs
serially, exactly as before. ``LayerParallel.remove()`` restores the class forwards.

  unit="stages"  one MGRIT stack over ``model.stages`` (Llama DecoderLayers; for TP-block models every TP
                 block and classic layer is one step: a block is a residual map h -> h + F(h) too)
  unit="lanes"   one stack per TP block over its lane layers (state x_lbsd); no delayed communication

Every rank of ``group`` holds all weights (replicated), feeds the same batch and gets identical gradients,
so the optimizer, checkpointing and data-parallel code around it need no change.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from tpblocks.models.kv_cache import KVCache

from .config import MGRITConfig
from .monitor import NONE, MGRITMonitor
from .stack import MGRITStack

log = logging.getLogger("tpblocks.parallel.mgrit")


class LayerParallel:
    """Handle returned by ``apply_layer_parallel``: the stacks, the error monitor, and the per-step hook.

    Training loop::

        lp = apply_layer_parallel(model, cfg.layer_parallel, group)
        for step, batch in ...:
            loss = loss_fn(model(batch.x), batch.y); loss.backward()
            if lp.should_check(step):
                lp.measure_grad_error(lambda: loss_fn(model(batch.x), batch.y))
            metrics.update(lp.step_end(step, loss.item()))   # logs, and may add iterations / go serial
            optimizer.step(); optimizer.zero_grad()
    """

    def __init__(self, model: nn.Module, cfg: MGRITConfig, group: dist.ProcessGroup | None, stacks: list):
        self.model = model
        self.cfg = cfg
        self.group = group
        self.stacks: list[MGRITStack] = stacks
        self.monitor = MGRITMonitor(cfg)
        self._patched: list[nn.Module] = []
        self._exact: float | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.stacks)

    @property
    def serial(self) -> bool:
        return self.monitor.state.serial

    def _sync(self) -> None:
        s = self.monitor.state
        for stack in self.stacks:
            stack.fwd_iters, stack.bwd_iters, stack.serial = s.fwd_iters, s.bwd_iters, s.serial

    def set_serial(self, serial: bool = True) -> None:
        self.monitor.state.serial = serial
        self._sync()

    def state_dict(self) -> dict:
        return {"monitor": self.monitor.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore the monitor's decisions (raised iterations, serial switch) and apply them to every stack."""
        self.monitor.load_state_dict(state["monitor"])
        self._sync()

    # ------------------------------------------------------------------ monitoring
    def should_check(self, step: int) -> bool:
        return self.enabled and not self.serial and self.cfg.check_every > 0 and step % self.cfg.check_every == 0

    def measure_grad_error(self, loss_closure: Callable[[], torch.Tensor]) -> float:
        """True relative gradient error of MGRIT against a serial pass on the same batch (all model parameters).

        ``loss_closure()`` must compute the loss from scratch; it runs twice (MGRIT, then serial) on every rank.
        Accumulated ``.grad`` values are left untouched. The result feeds the next ``step_end``.
        """
        params = [p for p in self.model.parameters() if p.requires_grad]
        was_serial = self.serial
        kept = [dict(stack.last_stats) for stack in self.stacks]  # the training step's figures, not these passes'
        self.set_serial(False)
        g_par = torch.autograd.grad(loss_closure(), params, allow_unused=True)
        self.set_serial(True)
        g_ser = torch.autograd.grad(loss_closure(), params, allow_unused=True)
        self.set_serial(was_serial)
        for stack, stats in zip(self.stacks, kept):
            stack.last_stats = stats
        diff2 = sum(float((a - b).double().square().sum()) for a, b in zip(g_par, g_ser) if a is not None)
        ref2 = sum(float(b.double().square().sum()) for b in g_ser if b is not None)
        self._exact = math.sqrt(diff2 / max(ref2, 1e-300))
        return self._exact

    def stats(self) -> dict[str, Any]:
        """Last step's solver figures over all stacks (worst case where there are several)."""
        mgrit = [s.last_stats for s in self.stacks if s.last_stats.get("mode") == "mgrit"]
        if not mgrit:
            return {}

        def worst(key: str) -> float:
            return max(float(st[key][-1]) if isinstance(st.get(key), list) else float(st.get(key, 0.0)) for st in mgrit)

        return {
            "fwd_residual": worst("fwd_residuals"),
            "bwd_residual": worst("bwd_residuals") if all("bwd_residuals" in st for st in mgrit) else float("nan"),
            "fwd_residuals": [r for st in mgrit[:1] for r in st.get("fwd_residuals", [])],
            "bwd_residuals": [r for st in mgrit[:1] for r in st.get("bwd_residuals", [])],
            "grad_err_est": worst("grad_err_est") if all("grad_err_est" in st for st in mgrit) else None,
        }

    def step_end(self, step: int, loss: float | None = None) -> dict[str, Any]:
        """Per optimizer step, after backward: log the solver figures, let the monitor decide, apply (all ranks
        agree: rank 0's decision is broadcast). Returns metrics for the trainer's logger (``lp/...`` keys)."""
        if not self.enabled:
            return {}
        st = self.stats()
        est = st.get("grad_err_est")
        exact, self._exact = self._exact, None
        s = self.monitor.state
        # Figures of the step that just ran (its iteration counts), then the decision for the next steps.
        metrics: dict[str, Any] = {"lp/serial": int(s.serial), "lp/fwd_iters": s.fwd_iters, "lp/bwd_iters": s.bwd_iters}
        if st:
            metrics.update({"lp/fwd_residual": st["fwd_residual"], "lp/bwd_residual": st["bwd_residual"]})
            if est is not None:
                metrics["lp/grad_err_est"] = est
        if exact is not None:
            metrics["lp/grad_err"] = exact
        action = self._agree(self.monitor.decide(step, loss, est, exact))
        why = {"grad_err_est": est, "grad_err": exact, "loss": loss}
        self.monitor.apply(step, action, {k: v for k, v in why.items() if v is not None})
        self._sync()
        metrics["lp/action"] = action
        self.monitor.record({"step": step, **metrics, "fwd_residuals": st.get("fwd_residuals", [])})
        return metrics

    def _agree(self, action: int) -> int:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(self.group) == 1:
            return action
        t = torch.tensor([action], dtype=torch.int64)
        if dist.get_backend(self.group) == "nccl":
            t = t.cuda()
        src = 0 if self.group is None else dist.get_global_rank(self.group, 0)
        dist.broadcast(t, src, group=self.group)
        return int(t.item()) if int(t.item()) in (0, 1, 2) else NONE

    # ------------------------------------------------------------------ install / remove
    def _install(self, layers: list[nn.Module], stack: MGRITStack, serial_call: Callable) -> None:
        first, rest = layers[0], layers[1:]

        def run_stack(x, *args, **kwargs):
            cache = kwargs.get("cache") or next((a for a in args if isinstance(a, KVCache)), None)
            if cache is not None or kwargs.get("lane_states") is not None:
                for layer in layers:  # decoding / analysis: the exact serial model
                    x = serial_call(layer, x, *args, **kwargs)
                return x
            return stack(x)

        def pass_through(x, *args, **kwargs):
            return x

        first.forward = run_stack
        for layer in rest:
            layer.forward = pass_through
        self._patched.extend(layers)

    def remove(self) -> None:
        """Give the model back its ordinary (serial) forward."""
        for layer in self._patched:
            layer.__dict__.pop("forward", None)
        self._patched.clear()
        self.stacks.clear()


def _class_forward(layer: nn.Module, *args, **kwargs):
    return type(layer).forward(layer, *args, **kwargs)


def apply_layer_parallel(
    model: nn.Module, mgrit_cfg: MGRITConfig | dict | None, group: dist.ProcessGroup | None = None
) -> LayerParallel:
    """Run ``model``'s layer stack(s) by MGRIT over the ranks of ``group`` (default: the whole world).

    ``mgrit_cfg`` is an ``MGRITConfig`` or the ``layer_parallel`` mapping of a training config. When it is
    disabled (or None) nothing is changed and the returned handle's ``step_end`` is a no-op.
    """
    cfg = mgrit_cfg if isinstance(mgrit_cfg, MGRITConfig) else MGRITConfig.from_dict(mgrit_cfg)
    lp = LayerParallel(model, cfg, group, [])
    if not cfg.enabled:
        return lp
    if not hasattr(model, "stages") or not hasattr(model, "comm"):
        raise TypeError(f"apply_layer_parallel needs a TransformerLM (with .stages and .comm), got {type(model)}")
    mcfg = getattr(model, "cfg", None)

    def stage_call(layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return _class_forward(layer, h, model.comm)  # model.comm read at call time: it may be replaced later

    if cfg.unit == "stages":
        layers = list(model.stages)
        lp.stacks.append(MGRITStack(layers, cfg, group, call=stage_call))
        lp._install(layers, lp.stacks[-1], _class_forward)
    else:
        if mcfg is None or mcfg.arch != "tp_blocks":
            raise ValueError("layer_parallel.unit='lanes' needs arch='tp_blocks'; use unit='stages' for Llama")
        if mcfg.delayed_sends:
            raise ValueError(
                "layer_parallel.unit='lanes' cannot run lanes with delayed communication (a reception adds a state "
                "from comm_length layers back, so a lane layer is no longer a one-step map); set "
                "model.delayed_comm=false or use unit='stages'"
            )
        for stage in model.stages:
            if hasattr(stage, "layers") and hasattr(stage, "prepare"):
                lane_layers = list(stage.layers)
                lp.stacks.append(MGRITStack(lane_layers, cfg, group, call=lambda m, h: _class_forward(m, h, None)))
                lp._install(lane_layers, lp.stacks[-1], _class_forward)
    world = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
    for stack in lp.stacks:
        if stack.n_layers < world:
            lp.remove()
            raise ValueError(
                f"a layer-parallel stack has {stack.n_layers} layers but the group has {world} ranks; every rank "
                f"needs at least one layer (use unit='stages', a deeper model, or fewer ranks)"
            )
    log.info(
        "layer-parallel MGRIT on %d rank(s): %d stack(s) of %s layers, levels=%d cf=%d iters=%d/%d relax=%s",
        world, len(lp.stacks), [s.n_layers for s in lp.stacks], cfg.levels, cfg.cf, cfg.iters,
        cfg.adjoint_iters, cfg.relax,
    )  # fmt: skip
    return lp
