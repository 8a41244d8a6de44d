"""Dynamic gradient gating (DGG): stop reusing a rollout batch when the lm_head gradient surges.

"When to Stop Reusing" (Sec. 5, App. C and G.2): degradation under batch reuse comes with a
surge of the lm_head gradient, whose norm lower-bounds the policy divergence. DGG watches
the gradient energy g_t = ||grad||_F^2 and its increment dg_t = g_t - g_{t-1}, z-scores the
increment against the previous W increments, and refuses the update (zeroing gradients
before the optimizer sees them, so Adam's moments stay clean) when z_t > tau on a reuse.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch

from ckptprobe.errors import UsageError

logger = logging.getLogger("ckptprobe.train")


@dataclass(frozen=True)
class GateStep:
    """One call of the gate. `dg`/`z` are None before there is a previous step / a full window."""

    g: float  # ||grad||_F^2 of the watched parameter
    dg: float | None  # g minus g of the last allowed step
    z: float | None  # (dg - mean) / (std + 1e-8) over the previous `window` increments
    reuse_index: int
    allowed: bool
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


class GradientGate:
    """The DGG rule on one watched parameter (normally `model.lm_head.weight`).

    param: the watched tensor; its `.grad` after backward is what is measured.
    window: W, the number of previous increments in the running mean and std (at least 2).
    tau: the z-score threshold; the paper recommends 0.1 to 0.5 with K = 4 reuses.
    params: the parameters whose gradients are cleared (`.grad = None`, as
        `optimizer.zero_grad()` does) when an update is refused. Default: the watched
        parameter only; pass `model.parameters()` so a refused batch leaves no stale
        gradient to be added to the next batch's, or call `optimizer.zero_grad()` yourself.

    Rule, per call t with reuse index k (1 for the first pass over a batch):
      g_t = ||grad||_F^2, dg_t = g_t - g_prev (g_prev: the last allowed step),
      z_t = (dg_t - mu_t) / (sigma_t + 1e-8), mu_t and sigma_t the mean and population std
      (ddof 0) of the previous W increments, the current one excluded;
      refuse iff k > 1, the window is full and z_t > tau.
    Statistics (g_prev and the window) advance only on allowed steps. One addition to the
    paper's rule: a non-finite g_t is always refused and never enters the statistics.

    Tied embeddings: when lm_head shares the embedding matrix, its `.grad` is the sum of the
    gradients of both uses (output projection and input lookup), and g_t measures that sum,
    not the head's part alone; the statistics adapt to it, but thresholds tuned on an untied
    model may not transfer.
    """

    def __init__(self, param: torch.Tensor, window: int = 20, tau: float = 0.5, *,
                 params: Iterable[torch.Tensor] | None = None):
        if window < 2:
            raise UsageError(f"window={window}: need at least 2 increments for a standard deviation")
        self.param, self.window, self.tau = param, window, tau
        self.params = [param] if params is None else list(params)
        self.history: list[GateStep] = []
        self._g_prev: float | None = None
        self._increments: deque[float] = deque(maxlen=window)

    def observe(self, g: float, reuse_index: int) -> bool:
        """Apply the rule to a gradient energy `g` at reuse index `reuse_index` (1-based); True = step."""
        if reuse_index < 1:
            raise UsageError(f"reuse_index={reuse_index}: the first pass over a batch is 1")
        dg = None if self._g_prev is None else g - self._g_prev
        z = None
        if dg is not None and len(self._increments) == self.window:
            mu, sigma = statistics.fmean(self._increments), statistics.pstdev(self._increments)
            z = (dg - mu) / (sigma + 1e-8)
        if not math.isfinite(g):
            allowed, reason = False, f"non-finite gradient energy g={g}"
        elif reuse_index > 1 and z is not None and z > self.tau:
            allowed, reason = False, f"z={z:.3f} > tau={self.tau} (g={g:.4g}, dg={dg:.4g})"
        else:
            allowed = True
            reason = ("first pass over the batch" if reuse_index == 1 else
                      "window not full yet" if z is None else f"z={z:.3f} <= tau={self.tau}")
            self._g_prev = g
            if dg is not None:
                self._increments.append(dg)
        self.history.append(GateStep(g, dg, z, reuse_index, allowed, reason))
        return allowed

    def allow(self, reuse_index: int) -> bool:
        """Measure the watched gradient and apply the rule; on refusal clear `params`' grads and log why.

        Call after backward and before `optimizer.step()`; one `.item()` sync per call.
        """
        grad = self.param.grad
        if grad is None:
            raise UsageError("the watched parameter has no gradient", hint="call allow() after loss.backward()")
        # Reduce in fp32 (bf16 accumulation would make the increments noise), square in float64.
        g = torch.linalg.vector_norm(grad, dtype=torch.float32).item() ** 2
        allowed = self.observe(g, reuse_index)
        if not allowed:
            for p in self.params:
                p.grad = None
            logger.info("gradient gate refused the update at reuse %d: %s", reuse_index, self.history[-1].reason)
        return allowed
