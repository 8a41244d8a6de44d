"""Probabilistic conflict resolution (PCR) between a plasticity and a stability gradient.

"On the Plasticity and Stability for Post-Training LLMs" (Sec. 4) splits the GRPO gradient
into a plasticity part (the reward term) and a stability part (the KL term). Where they
conflict (negative dot product) the plasticity gradient is projected away from the
stability gradient, but only partly: by alpha = lambda_sta / (lambda_pla + lambda_sta),
lambda = 1/variance, so the less noisy gradient wins. alpha -> 1 is PCGrad's hard
projection, alpha -> 0 leaves g_pla alone. The paper applies it to MLP weights only (its
"hybrid"), where the conflict concentrates (Fig. 1(c)), and sums the two elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from ckptprobe.errors import TensorMismatchError, UsageError
from ckptprobe.io.names import parse_name


def _alpha(var_pla: float, var_sta: float) -> float:
    var_pla, var_sta = float(var_pla), float(var_sta)
    if var_pla < 0 or var_sta < 0 or var_pla + var_sta == 0:
        raise UsageError(f"variances must be >= 0 and not both 0, got var_pla={var_pla}, var_sta={var_sta}")
    # lambda_sta / (lambda_pla + lambda_sta) with lambda = 1/var, written so a zero variance is allowed.
    return var_pla / (var_pla + var_sta)


def pcr_combine(g_pla: torch.Tensor, g_sta: torch.Tensor, var_pla: float, var_sta: float) -> torch.Tensor:
    """The plasticity gradient after PCR's soft projection (the stability gradient is NOT added).

    g_pla, g_sta: gradients of one parameter, same shape, any float dtype.
    var_pla, var_sta: their variances (scalars, e.g. from `gradient_variance`).
    Returns g_pla - alpha * (g_pla . g_sta / ||g_sta||^2) * g_sta when g_pla . g_sta < 0, else
    g_pla unchanged; shape and dtype of g_pla. Dot products and the update are computed in
    fp32, without a host sync (the branch is a clamp).
    """
    if g_pla.shape != g_sta.shape:
        raise TensorMismatchError(f"gradient shapes differ: {tuple(g_pla.shape)} vs {tuple(g_sta.shape)}")
    alpha = _alpha(var_pla, var_sta)
    p, s = g_pla.float().reshape(-1), g_sta.float().reshape(-1)  # (n,)
    dot, s_sq = torch.dot(p, s), torch.dot(s, s)
    # min(dot, 0): no conflict -> coefficient 0 -> g_pla exactly; s_sq == 0 implies dot == 0.
    coef = alpha * dot.clamp(max=0) / s_sq.clamp(min=torch.finfo(torch.float32).tiny)
    return torch.addcmul(p, s, coef, value=-1).view_as(g_pla).to(g_pla.dtype)  # p - coef * s


def _is_mlp(name: str) -> bool:
    return parse_name(name).group == "mlp"


def apply_pcr(model: torch.nn.Module, grads_pla: Mapping[str, torch.Tensor], grads_sta: Mapping[str, torch.Tensor],
              var_pla: float | Mapping[str, float], var_sta: float | Mapping[str, float],
              select: Callable[[str], bool] = _is_mlp) -> None:
    """Write PCR-combined gradients into `.grad` of `model`'s parameters.

    grads_pla, grads_sta: {parameter name: gradient} from two backward passes (plasticity
        loss, stability loss), named as in `model.named_parameters()`.
    var_pla, var_sta: a variance for all parameters, or {name: variance} per parameter.
    select: which parameters get the projection; default: group "mlp" of `parse_name`
        (gate/up/down projections, MoE experts and routers), the paper's hybrid.
    Selected: `.grad = pcr_combine(g_pla, g_sta, ...) + g_sta`; others: `.grad = g_pla + g_sta`;
    a parameter in only one dict gets that gradient (`.grad` may then share its memory);
    a parameter in neither keeps its `.grad`. `.grad` is replaced, not accumulated into.
    """
    params = dict(model.named_parameters())
    unknown = sorted((set(grads_pla) | set(grads_sta)) - params.keys())
    if unknown:
        raise UsageError(f"gradients given for {len(unknown)} name(s) the model does not have, e.g. {unknown[0]!r}")
    for name, p in params.items():
        gp, gs = grads_pla.get(name), grads_sta.get(name)
        for g in (gp, gs):
            if g is not None and g.shape != p.shape:
                raise TensorMismatchError(f"{name}: gradient shape {tuple(g.shape)} != parameter {tuple(p.shape)}")
        if gp is None or gs is None:
            if gp is not None or gs is not None:
                p.grad = (gs if gp is None else gp).detach().to(p.dtype)
            continue
        if select(name):
            vp = var_pla[name] if isinstance(var_pla, Mapping) else var_pla
            vs = var_sta[name] if isinstance(var_sta, Mapping) else var_sta
            gp = pcr_combine(gp, gs, vp, vs)
        p.grad = (gp.detach() + gs.detach()).to(p.dtype)


def gradient_variance(per_group: torch.Tensor) -> float:
    """Variance of a mean gradient, estimated from the G group gradients it averages.

    per_group: (G, ...) float, G >= 2, e.g. each GRPO prompt group's gradient of one
        parameter (the batch gradient is their mean).
    Returns the per-coordinate unbiased sample variance across groups, averaged over
    coordinates and divided by G: the variance sigma^2 of the batch-mean gradient under the
    isotropic Gaussian model g ~ N(mu, sigma^2 I) that PCR's precisions lambda = 1/sigma^2
    assume. Only ratios of the two variances enter alpha, so compare like with like (same
    parameter, same G). Computed in fp32.
    """
    if per_group.dim() < 1 or per_group.shape[0] < 2:
        raise UsageError(f"need at least 2 group gradients stacked on dim 0, got shape {tuple(per_group.shape)}")
    x = per_group.float().reshape(per_group.shape[0], -1)  # (G, D)
    return x.var(dim=0, correction=1).mean().item() / x.shape[0]


def gradient_conflict(grads_a: Mapping[str, torch.Tensor], grads_b: Mapping[str, torch.Tensor]) -> dict:
    """Cosine similarity of two gradient sets per transformer layer (the paper's Fig. 1(c)).

    grads_a, grads_b: {parameter name: gradient}, the same names and shapes.
    Returns {layer index (int): cosine} for names `parse_name` places in a layer, and
    {name: cosine} for the rest (embeddings, lm_head, final norm), in first-seen order;
    the cosine is over all of a layer's gradients concatenated, in fp32; NaN when either
    side is all zero. Negative values mean conflict.
    """
    if grads_a.keys() != grads_b.keys():
        diff = sorted(set(grads_a) ^ set(grads_b))
        raise TensorMismatchError(f"the gradient sets name different parameters, e.g. {diff[0]!r}")
    sums: dict = {}  # key -> [a.b, a.a, b.b] as 0-d fp32 tensors
    for name, a in grads_a.items():
        b = grads_b[name]
        if a.shape != b.shape:
            raise TensorMismatchError(f"{name}: gradient shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
        layer = parse_name(name).layer
        a, b = a.float().reshape(-1), b.float().reshape(-1)
        acc = sums.setdefault(name if layer is None else layer, [0.0, 0.0, 0.0])
        acc[0], acc[1], acc[2] = acc[0] + torch.dot(a, b), acc[1] + torch.dot(a, a), acc[2] + torch.dot(b, b)
    out = {}
    for key, (ab, aa, bb) in sums.items():
        denom = float(aa) * float(bb)
        out[key] = float(ab) / denom ** 0.5 if denom > 0 else float("nan")
    return out
