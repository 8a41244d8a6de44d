"""PCR soft projection, its helpers and the layer-wise conflict diagnostic, against numpy references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ckptprobe.errors import TensorMismatchError, UsageError
from ckptprobe.train import apply_pcr, gradient_conflict, gradient_variance, pcr_combine


def ref_pcr(gp: np.ndarray, gs: np.ndarray, var_pla: float, var_sta: float) -> np.ndarray:
    """The paper's formula in float64: lambda = 1/var, alpha = lambda_sta / (lambda_pla + lambda_sta)."""
    gp, gs = gp.astype(np.float64), gs.astype(np.float64)
    dot = float(np.sum(gp * gs))
    if dot >= 0:
        return gp
    lam_pla, lam_sta = 1 / var_pla, 1 / var_sta
    alpha = lam_sta / (lam_pla + lam_sta)
    return gp - alpha * dot / float(np.sum(gs * gs)) * gs


def conflicting_pair(shape=(6, 5), seed=0):
    gen = torch.Generator().manual_seed(seed)
    gs = torch.randn(shape, generator=gen)
    gp = torch.randn(shape, generator=gen) - 0.8 * gs  # pushed against gs
    assert float((gp * gs).sum()) < 0
    return gp, gs


@pytest.mark.parametrize("var_pla,var_sta", [(1.0, 1.0), (0.2, 3.0), (5.0, 0.5), (1e-3, 1e3)])
def test_matches_numpy_reference(var_pla, var_sta):
    gp, gs = conflicting_pair()
    out = pcr_combine(gp, gs, var_pla, var_sta)
    assert out.shape == gp.shape and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), ref_pcr(gp.numpy(), gs.numpy(), var_pla, var_sta), rtol=1e-5, atol=1e-6)


def test_pcgrad_limit_is_orthogonal_to_g_sta():
    gp, gs = conflicting_pair()
    hard = pcr_combine(gp, gs, 1.0, 0.0)  # var_sta -> 0: alpha = 1, PCGrad
    pcgrad = gp.double() - (gp.double() * gs.double()).sum() / gs.double().pow(2).sum() * gs.double()
    np.testing.assert_allclose(hard.numpy(), pcgrad.numpy(), rtol=1e-5, atol=1e-6)
    assert abs(float((hard.double() * gs.double()).sum())) < 1e-5 * float(gp.norm() * gs.norm())
    near = pcr_combine(gp, gs, 1.0, 1e-9)
    np.testing.assert_allclose(near.numpy(), hard.numpy(), rtol=1e-6, atol=1e-6)


def test_plain_limit_leaves_g_pla():
    gp, gs = conflicting_pair()
    assert torch.equal(pcr_combine(gp, gs, 0.0, 1.0), gp)  # var_pla -> 0: alpha = 0
    np.testing.assert_allclose(pcr_combine(gp, gs, 1e-9, 1.0).numpy(), gp.numpy(), rtol=1e-6, atol=1e-7)


def test_non_conflicting_pairs_untouched():
    gp, gs = conflicting_pair()
    gp = gp + 3.0 * gs  # now aligned
    assert float((gp * gs).sum()) > 0
    assert torch.equal(pcr_combine(gp, gs, 1.0, 0.0), gp)
    assert torch.equal(pcr_combine(gp, torch.zeros_like(gs), 1.0, 1.0), gp)  # zero g_sta: nothing to project on
    orth = torch.tensor([1.0, 0.0])
    assert torch.equal(pcr_combine(orth, torch.tensor([0.0, 2.0]), 1.0, 0.0), orth)


# Entries of magnitude 0 or >= 2^-20: pcr_combine works in float32, where |g_sta|^2 of entries
# below ~1e-19 underflows to 0 and no projection is possible (hypothesis found 1 vs -2.4e-29).
magnitude = st.one_of(st.just(0.0), st.floats(2.0 ** -20, 10, width=32))
finite = st.builds(lambda m, neg: -m if neg else m, magnitude, st.booleans())


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(finite, finite), min_size=2, max_size=12), st.floats(0.0, 1.0))
def test_conflict_shrinks_by_one_minus_alpha(pairs, alpha):
    """Invariant: after projection g.g_sta = (1 - alpha) * min(g_pla.g_sta, 0) + max(g_pla.g_sta, 0)."""
    gp = torch.tensor([a for a, _ in pairs])
    gs = torch.tensor([b for _, b in pairs])
    out = pcr_combine(gp, gs, alpha, 1.0 - alpha)  # var_pla / (var_pla + var_sta) = alpha
    dot = float(np.dot(gp.numpy().astype(np.float64), gs.numpy().astype(np.float64)))
    expected = (1 - alpha) * min(dot, 0.0) + max(dot, 0.0)
    scale = float(gp.norm() * gs.norm()) + 1e-30
    assert float(np.dot(out.numpy().astype(np.float64), gs.numpy().astype(np.float64))) == pytest.approx(
        expected, abs=1e-5 * scale)


def test_bf16_in_bf16_out():
    gp, gs = conflicting_pair()
    out = pcr_combine(gp.bfloat16(), gs.bfloat16(), 1.0, 1.0)
    assert out.dtype == torch.bfloat16
    ref = ref_pcr(gp.bfloat16().float().numpy(), gs.bfloat16().float().numpy(), 1.0, 1.0)
    np.testing.assert_allclose(out.float().numpy(), ref, rtol=2 ** -7, atol=2 ** -7)  # one bf16 ULP


def test_bad_inputs_refused():
    gp, gs = conflicting_pair()
    with pytest.raises(UsageError):
        pcr_combine(gp, gs, 0.0, 0.0)
    with pytest.raises(UsageError):
        pcr_combine(gp, gs, -1.0, 1.0)
    with pytest.raises(TensorMismatchError):
        pcr_combine(gp, gs.T, 1.0, 1.0)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({
            "self_attn": nn.ModuleDict({"q_proj": nn.Linear(4, 4, bias=False)}),
            "mlp": nn.ModuleDict({"up_proj": nn.Linear(4, 6, bias=False), "down_proj": nn.Linear(6, 4, bias=False)}),
        }) for _ in range(2))
        self.lm_head = nn.Linear(4, 5, bias=False)


def grad_sets(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    pla, sta = {}, {}
    for n, p in model.named_parameters():
        sta[n] = torch.randn(p.shape, generator=gen)
        pla[n] = torch.randn(p.shape, generator=gen) - 0.9 * sta[n]  # every pair conflicts
    return pla, sta


def test_apply_pcr_projects_mlp_only():
    model = Block()
    pla, sta = grad_sets(model)
    var_pla = {n: 0.5 + i for i, n in enumerate(pla)}
    apply_pcr(model, pla, sta, var_pla, 2.0)
    for n, p in model.named_parameters():
        if ".mlp." in n:
            want = ref_pcr(pla[n].numpy(), sta[n].numpy(), var_pla[n], 2.0) + sta[n].numpy()
        else:
            want = pla[n].numpy() + sta[n].numpy()
        np.testing.assert_allclose(p.grad.numpy(), want, rtol=1e-5, atol=1e-6, err_msg=n)


def test_apply_pcr_select_and_partial_sets():
    model = Block()
    pla, sta = grad_sets(model)
    del sta["lm_head.weight"]
    apply_pcr(model, pla, sta, 1.0, 0.0, select=lambda n: n.endswith("q_proj.weight"))
    q = "layers.0.self_attn.q_proj.weight"
    pcgrad = ref_pcr(pla[q].numpy(), sta[q].numpy(), 1.0, 1e-300)
    np.testing.assert_allclose(model.get_parameter(q).grad.numpy(), pcgrad + sta[q].numpy(), rtol=1e-5, atol=1e-6)
    assert torch.equal(model.lm_head.weight.grad, pla["lm_head.weight"])
    with pytest.raises(UsageError, match="nope"):
        apply_pcr(model, {"nope": torch.zeros(1)}, {}, 1.0, 1.0)
    with pytest.raises(TensorMismatchError, match="lm_head"):
        apply_pcr(model, {"lm_head.weight": torch.zeros(2)}, {}, 1.0, 1.0)


def test_gradient_variance_matches_numpy():
    gen = torch.Generator().manual_seed(0)
    per_group = torch.randn(8, 3, 5, generator=gen) * torch.linspace(0.1, 2.0, 5)
    want = np.var(per_group.numpy().astype(np.float64), axis=0, ddof=1).mean() / 8
    assert gradient_variance(per_group) == pytest.approx(want, rel=1e-5)
    assert gradient_variance(per_group.bfloat16()) == pytest.approx(want, rel=1e-2)
    with pytest.raises(UsageError):
        gradient_variance(per_group[:1])


def test_gradient_conflict_layerwise_cosine():
    model = Block()
    a, b = grad_sets(model)
    b["layers.1.mlp.up_proj.weight"] = torch.zeros(6, 4)
    got = gradient_conflict(a, b)
    assert list(got) == [0, 1, "lm_head.weight"]
    for layer in (0, 1):
        names = [n for n in a if n.startswith(f"layers.{layer}.")]
        va = np.concatenate([a[n].numpy().ravel() for n in names]).astype(np.float64)
        vb = np.concatenate([b[n].numpy().ravel() for n in names]).astype(np.float64)
        assert got[layer] == pytest.approx(va @ vb / np.linalg.norm(va) / np.linalg.norm(vb), rel=1e-5)
        assert got[layer] < 0  # built to conflict
    zero = gradient_conflict({"lm_head.weight": torch.zeros(3)}, {"lm_head.weight": torch.ones(3)})
    assert math.isnan(zero["lm_head.weight"])
    with pytest.raises(TensorMismatchError):
        gradient_conflict(a, {n: g for n, g in b.items() if n != "lm_head.weight"})
