"""Rank faults: a stalled rank is named instead of hanging the job; workers never outlive their launcher.

A rank that dies makes its peers' next collective fail at once (gloo: "connection closed"). A rank that *stalls*
(SIGSTOP, a hung file system, a deadlock) is only noticed when a peer's collective reaches
``trainer.dist_timeout_s`` (default 10 min). To say which rank it was, every rank posts a heartbeat (its phase,
step and the time) to the process group's key-value store, which lives in the torchrun agent; the ranks whose
collective timed out read everyone's heartbeat and name the ones that are frozen or behind (``RankStalled``).

Workers started by torchrun ask the kernel to SIGKILL them when their parent (the torchrun agent) dies, so a
``kill -9`` of torchrun leaves no orphaned worker spinning on a collective.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time
from datetime import timedelta

import torch.distributed as dist

_KEY = "tpblocks/heartbeat/{}"
_PR_SET_PDEATHSIG = 1


class RankStalled(RuntimeError):
    """A collective timed out because another rank stopped making progress."""


def die_with_parent() -> None:
    """Under torchrun: SIGKILL this worker when the agent that started it dies (Linux; a no-op elsewhere)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the agent died before prctl took effect
        os._exit(1)


def _store():
    try:
        return dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):
        return None


class Heartbeat:
    """A daemon thread that posts ``"phase step time"`` of this rank to the store every ``interval_s``. The main
    thread only sets ``phase``/``step`` (no I/O on the training path). A frozen process stops beating (its time
    goes stale); a rank that is alive but stuck keeps beating with an older step."""

    def __init__(self, interval_s: float = 2.0) -> None:
        self.interval_s = interval_s
        self.phase, self.step = "setup", 0
        self._stop = threading.Event()
        self._store = _store() if dist.is_available() and dist.is_initialized() else None
        self._thread = threading.Thread(target=self._run, name="tpblocks-heartbeat", daemon=True)
        if self._store is not None and dist.get_world_size() > 1:
            self._key = _KEY.format(dist.get_rank())
            self._thread.start()

    def update(self, phase: str, step: int) -> None:
        self.phase, self.step = phase, step

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._store.set(self._key, f"{self.phase} {self.step} {time.time():.3f}")
            except Exception:  # noqa: BLE001 - the store went away (job ending): stop beating
                return
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        self._stop.set()

    def diagnose(self, timeout_s: float) -> RankStalled:
        """The ``RankStalled`` for a timed-out collective: which ranks are frozen or behind, and where they were."""
        world, me, store = dist.get_world_size(), dist.get_rank(), self._store
        beats: dict[int, tuple[str, int, float] | None] = {}
        if store is not None:
            store.set_timeout(timedelta(seconds=5))  # the store must not hang too if its host is the stalled rank
        for rank in range(world):
            try:
                phase, step, at = store.get(_KEY.format(rank)).decode().split()
                beats[rank] = (phase, int(step), float(at))
            except Exception:  # noqa: BLE001 - no heartbeat or no store: that rank is unaccounted for
                beats[rank] = None
        now = time.time()
        front = max((b[1] for b in beats.values() if b is not None), default=0)
        stale = 3 * self.interval_s + 1
        bad = [r for r, b in beats.items() if b is None or b[1] < front or now - b[2] > stale]
        detail = "; ".join(
            f"rank {r}: " + ("no heartbeat" if beats[r] is None else
                             f"{beats[r][0]} at step {beats[r][1]}, last heartbeat {now - beats[r][2]:.0f} s ago")
            for r in (bad or range(world))
        )  # fmt: skip
        who = f"rank(s) {bad} stalled" if bad else "no rank looks frozen or behind"
        return RankStalled(
            f"rank {me}: a collective timed out after trainer.dist_timeout_s={timeout_s:g} s: {who} ({detail}). "
            f"Check that process (stopped? hung I/O?) and resume with train.resume=auto; raise "
            f"trainer.dist_timeout_s if steps or checkpoints legitimately take longer"
        )


def is_timeout(err: BaseException) -> bool:
    """Whether ``err`` is a collective that timed out (gloo and nccl both say so in the message)."""
    text = str(err).lower()
    return dist.is_available() and dist.is_initialized() and ("timed out" in text or "timeout" in text)
