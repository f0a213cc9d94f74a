"""``MGRITStack``: a residual layer stack run layer-parallel, forward by MGRIT and backward by adjoint MGRIT.

    stack = MGRITStack(model.stages, MGRITConfig(levels=2, cf=4, iters=2), group, call=lambda m, h: m(h, comm))
    y = stack(x)            # every rank of ``group`` passes the same x and gets the same y
    loss(y).backward()      # parameter gradients of *all* layers arrive on every rank (summed over the group)

Forward. Layer k is the forward-Euler step h_{k+1} = h_k + dt * F_k(h_k) with F_k(h) = layer_k(h) - h (the
residual branch); dt = 1 gives back layer_k(h) exactly. Rank r of the group owns a contiguous slice of
layers; MGRIT (solver.py) computes all states, and the last rank's final state is broadcast.

Backward (adjoint MGRIT). With lambda_N = dL/dh_N, the adjoint ODE
    lambda_k = lambda_{k+1} + dt * J_k(h_k)^T lambda_{k+1}          (J_k = dF_k/dh)
runs from k = N to 0; each step is one vector-Jacobian product (``torch.autograd.grad`` of the step at the
stored forward state). It is solved by the same MGRIT on the reversed grid (coarse steps are the adjoints of
the forward coarse steps, linearised at the coarse points' states). A final rank-local sweep collects
dL/dtheta_k = dt * (dF_k/dtheta_k)^T lambda_{k+1} for the layers this rank owns; one all-reduce then gives
every rank the gradients of all layers (weights stay replicated, so any optimizer works unchanged), and
dL/dx is broadcast from the first rank.

One rank (or ``serial`` mode, the monitor's fallback): a plain loop over the layers under ordinary
autograd — exactly the serial model, bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from tpblocks.models.comm import Communicator, LocalComm
from tpblocks.models.layers import DecoderLayer
from tpblocks.models.tp_block import TPBlock

from .config import MGRITConfig
from .link import DistLink, Link
from .solver import Hierarchy, MGRITSolver, partition

LayerCall = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def _default_call(comm: Communicator) -> LayerCall:
    """Model stages (DecoderLayer, TPBlock) take the communicator; anything else is called as ``layer(h)``."""

    def call(layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return layer(h, comm) if isinstance(layer, (DecoderLayer, TPBlock)) else layer(h)

    return call


@dataclass(frozen=True)
class Topology:
    link: Link  # forward order: rank 0 holds the first layers
    adjoint_link: Link  # reversed order
    bounds: tuple[tuple[int, int], ...]  # (a_r, b_r) for every rank position
    pos: int  # this rank's position
    hierarchy: Hierarchy

    @property
    def owned(self) -> range:
        a, b = self.bounds[self.pos]
        return range(a, b)


class MGRITStack(nn.Module):
    """A stack of residual layers evaluated by (adjoint) MGRIT over the ranks of ``group``.

    ``call(layer, h)`` evaluates one layer (default: ``layer(h, comm)`` for the model's DecoderLayers and TP
    blocks, with ``comm`` or a ``LocalComm``; ``layer(h)`` for anything else, e.g. LaneLayers). ``link``
    replaces the torch.distributed link (tests). ``force_mgrit`` runs the MGRIT algorithm even on one rank (to
    study its convergence); otherwise one rank is the exact serial loop. Do not wrap layers that
    ``apply_layer_parallel`` has already patched (their forward would call back into the stack).
    Runtime knobs the error monitor turns: ``fwd_iters``, ``bwd_iters``, ``serial``.
    """

    def __init__(
        self,
        layers: Iterable[nn.Module],
        cfg: MGRITConfig,
        group: dist.ProcessGroup | None = None,
        *,
        call: LayerCall | None = None,
        link: Link | None = None,
        force_mgrit: bool = False,
        comm: Communicator | None = None,
    ):
        super().__init__()
        self.layers = layers if isinstance(layers, nn.ModuleList) else nn.ModuleList(list(layers))
        if len(self.layers) == 0:
            raise ValueError("MGRITStack needs at least one layer")
        if not isinstance(cfg, MGRITConfig):
            raise TypeError(f"cfg must be an MGRITConfig, got {type(cfg).__name__}; use MGRITConfig.from_dict")
        self.cfg = cfg
        self.group = group
        self._call = call or _default_call(comm if comm is not None else LocalComm())
        self._link = link
        self.force_mgrit = force_mgrit
        self.fwd_iters = cfg.iters
        self.bwd_iters = cfg.adjoint_iters
        self.serial = False
        self.last_stats: dict = {}
        self._topology: Topology | None = None
        # Parameters per layer, each counted once (a weight shared by two layers belongs to the first).
        seen: set[int] = set()
        self._layer_params: list[list[nn.Parameter]] = []
        for layer in self.layers:
            mine = [p for p in layer.parameters() if id(p) not in seen]
            seen.update(id(p) for p in mine)
            self._layer_params.append(mine)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    # ------------------------------------------------------------------ placement
    def topology(self) -> Topology:
        """Built at first use, so the process group may be initialised after the stack is constructed."""
        if self._topology is None:
            link = self._link
            if link is None:
                grouped = dist.is_available() and dist.is_initialized() and dist.get_world_size(self.group) > 1
                link = DistLink(self.group) if grouped else Link()
            bounds = tuple(partition(self.n_layers, link.world))
            a, b = bounds[link.rank]
            hierarchy = Hierarchy.build(a, b, self.cfg.cf, self.cfg.levels)
            self._topology = Topology(link, link.reversed(), bounds, link.rank, hierarchy)
        return self._topology

    @property
    def world(self) -> int:
        return self.topology().link.world

    def uses_mgrit(self) -> bool:
        if self.serial or (self.cfg.eval_serial and not torch.is_grad_enabled()):
            return False
        return self.world > 1 or self.force_mgrit

    # ------------------------------------------------------------------ the time step
    def phi(self, k: int, n: int, h: torch.Tensor) -> torch.Tensor:
        """n forward-Euler steps' worth of time with layer k: h + n*dt*(layer_k(h) - h) (a fine step for n=1)."""
        out = self._call(self.layers[k], h)
        step = n * self.cfg.dt
        return out if step == 1.0 else h + step * (out - h)

    def serial_forward(self, x: torch.Tensor) -> torch.Tensor:
        for k in range(self.n_layers):
            x = self.phi(k, 1, x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.uses_mgrit():
            self.last_stats = {"mode": "serial"}
            return self.serial_forward(x)
        params = [p for ps in self._layer_params for p in ps]
        return _MGRITFunction.apply(self, x, *params)

    # ------------------------------------------------------------------ forward MGRIT
    def _forward_solve(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        t = self.topology()
        hier, n = t.hierarchy, self.n_layers

        def step(a: int, b: int, h: torch.Tensor) -> torch.Tensor:
            return self.phi(a, b - a, h)

        solver = MGRITSolver(hier, step, t.link, self.cfg.relax, "forward")
        # Initial guess: the input everywhere (a residual stream changes little per layer). Only the first rank's
        # copy is the initial condition; the others' is a guess that the first exchange replaces.
        stats = solver.solve({p: x for p in hier.points[0]}, self.fwd_iters, self.cfg.tol)
        if hier.levels > 1:
            stats.jump = solver.final_sweep(step, replace_c=self.cfg.final_sweep == "serial")
        states = solver.u[0]
        y = t.link.broadcast(states[n] if hier.s1 == n else x, t.link.world - 1)
        self.last_stats = {"mode": "mgrit", "fwd_residuals": stats.residuals, "fwd_jump": stats.jump}
        return y, states

    # ------------------------------------------------------------------ adjoint MGRIT
    def _adjoint_solve(
        self, states: dict[int, torch.Tensor], gy: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        t = self.topology()
        n = self.n_layers
        hier = t.hierarchy.mirrored(n)
        keep = self.cfg.cache_graphs
        graphs: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

        def graph(k0: int, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
            if (k0, steps) in graphs:
                return graphs[(k0, steps)]
            with torch.enable_grad():
                h_in = states[k0].detach().requires_grad_(True)
                out = self.phi(k0, steps, h_in)
            if keep:
                graphs[(k0, steps)] = (h_in, out)
            return h_in, out

        def vjp(a: int, b: int, lam: torch.Tensor) -> torch.Tensor:
            # Adjoint point p is lambda_{n-p}; the step a -> b is the transpose of forward step (n-b) -> (n-a).
            h_in, out = graph(n - b, b - a)
            (g,) = torch.autograd.grad(out, h_in, lam, retain_graph=keep)
            return g

        solver = MGRITSolver(hier, vjp, t.adjoint_link, self.cfg.relax, "adjoint")
        stats = solver.solve({p: gy for p in hier.points[0]}, self.bwd_iters, self.cfg.tol)

        layer_grads: dict[int, tuple] = {}

        def vjp_with_params(a: int, b: int, lam: torch.Tensor) -> torch.Tensor:
            k = n - b
            h_in, out = graph(k, 1)
            graphs.pop((k, 1), None)
            params = [p for p in self._layer_params[k] if p.requires_grad]
            got = torch.autograd.grad(out, [h_in, *params], lam, allow_unused=True)
            layer_grads[k] = dict(zip(map(id, params), got[1:]))
            return got[0]

        stats.jump = solver.final_sweep(vjp_with_params, replace_c=self.cfg.final_sweep == "serial")
        graphs.clear()
        lam0 = solver.u[0][n] if t.pos == 0 else gy
        gx = t.link.broadcast(lam0, 0)
        grads = self._gather_param_grads(layer_grads, t)
        self.last_stats.update(
            bwd_residuals=stats.residuals,
            bwd_jump=stats.jump,
            grad_err_est=self.last_stats.get("fwd_jump", 0.0) + stats.jump,
        )
        return gx, grads

    def _gather_param_grads(self, layer_grads: dict[int, dict], t: Topology) -> list[torch.Tensor | None]:
        """Own layers' gradients, zeros elsewhere, summed over the group in one flat all-reduce."""
        params = [p for ps in self._layer_params for p in ps]
        flat_parts = []
        for k, ps in enumerate(self._layer_params):
            got = layer_grads.get(k, {})
            for p in ps:
                g = got.get(id(p))
                flat_parts.append((g if g is not None else torch.zeros_like(p)).reshape(-1))
        if not flat_parts:
            return []
        flat = torch.cat([f.to(params[0].dtype) for f in flat_parts])
        if t.link.world > 1:
            flat = t.link.allreduce_sum(flat)
        out: list[torch.Tensor | None] = []
        offset = 0
        for p in params:
            out.append(flat[offset : offset + p.numel()].view_as(p).to(p.dtype) if p.requires_grad else None)
            offset += p.numel()
        return out


class _MGRITFunction(torch.autograd.Function):
    """Autograd boundary: forward = MGRIT solve, backward = adjoint MGRIT solve + parameter gradients."""

    @staticmethod
    def forward(ctx, stack: MGRITStack, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        y, states = stack._forward_solve(x.detach())
        ctx.stack = stack
        ctx.states = states
        return y

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        stack: MGRITStack = ctx.stack
        gx, grads = stack._adjoint_solve(ctx.states, gy.contiguous())
        ctx.states = None
        return (None, gx, *grads)
