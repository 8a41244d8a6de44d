"""Cross-run consensus: do independent RL runs from one base change the same weights?

"The Path Not Taken" (Sec. 2.2, Fig. 2, 3, 8) compares the update masks M^(r) of
several RL runs from one base: their pairwise Jaccard overlap is far above what
independent runs of the same densities would give, and the consensus ratio
`C_ij = (1/R) sum_r M_ij^(r)` forms row and column stripes. The statistics are in
`consensus_stats`, the result types in `consensus_results`, the streaming count of
the masks in `mask_scan`; this module plans and runs a comparison.
"""

from __future__ import annotations

from typing import Callable, Sequence

from ckptprobe.analysis.consensus_results import ConsensusResult, GroupConsensus, TensorConsensus
from ckptprobe.analysis.mask_scan import scan
from ckptprobe.analysis.pairing import check_layer, layers_of
from ckptprobe.analysis.plan import Want, plan_tensors
from ckptprobe.analysis.update import DEFAULT_ATOL, DEFAULT_ETA, CompareMode
from ckptprobe.errors import UsageError
from ckptprobe.io.sources import TensorSource

__all__ = ["ConsensusResult", "GroupConsensus", "TensorConsensus", "consensus"]


def consensus(base: TensorSource, runs: Sequence[TensorSource], mode: CompareMode | None = None,
              eta: float = DEFAULT_ETA, atol: float = DEFAULT_ATOL, include: Sequence[str] = (),
              exclude: Sequence[str] = (), layer: int | None = None,
              progress: Callable[[int], None] | None = None, workers: int | None = None) -> ConsensusResult:
    """Compare the update masks of R >= 2 `runs` of one `base`, weight by weight.

    `mode=None` compares bitwise where a run shares the base's dtype and after rounding
    to bf16 where it does not. A run that lacks a tensor (or holds another shape) is left
    out of that tensor only. Matrices of `layer` (if given) keep their row/column ratio
    profiles and block-averaged consensus heatmaps. Raises UsageError for fewer than two
    runs or a layer that does not exist.
    """
    if len(runs) < 2:
        raise UsageError(f"consensus needs at least two runs, got {len(runs)}",
                         hint="give the base and two or more fine-tunes of it: ckptprobe consensus BASE RUN1 RUN2 ...")
    if layer is not None:
        check_layer(layer, layers_of(base, include, exclude))
    plan = plan_tensors(base, runs, Want.floating, include, exclude, compare=True, mode=mode, partial=True)
    profiles = [p.name for p in plan.tensors if layer is not None and p.layer == layer]
    tensors = tuple(scan(plan.tensors, len(runs), eta, atol, profiles, progress, workers))
    return ConsensusResult(base.ref, tuple(r.ref for r in runs), mode.value if mode else "auto", eta, atol,
                           layer, tensors, plan.skipped)
