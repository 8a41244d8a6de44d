"""GradientGate: the DGG rule replayed on recorded gradient energies against a plain-Python reference."""

from __future__ import annotations

import logging
import math
import random

import numpy as np
import pytest
import torch
from torch import nn

from ckptprobe.errors import UsageError
from ckptprobe.train import GradientGate


def reference_decisions(calls, window, tau):
    """DGG written out independently: lists only, mean and population std by hand."""
    prev, incs, out = None, [], []
    for g, k in calls:
        dg = None if prev is None else g - prev
        z = None
        if dg is not None and len(incs) >= window:
            last = incs[-window:]
            mu = sum(last) / window
            sigma = math.sqrt(sum((x - mu) ** 2 for x in last) / window)
            z = (dg - mu) / (sigma + 1e-8)
        refuse = k > 1 and z is not None and z > tau
        if not refuse:
            prev = g
            if dg is not None:
                incs.append(dg)
        out.append((not refuse, z))
    return out


def test_hand_worked_sequence():
    """window 3, tau 1: every z below worked out on paper (pstd of [1, 2, 1] is sqrt(2/9))."""
    gate = GradientGate(torch.zeros(1), window=3, tau=1.0)
    calls = [(1.0, 1), (2.0, 2), (4.0, 3), (5.0, 4),  # fills the window with increments 1, 2, 1
             (20.0, 2),  # dg 15: z = (15 - 4/3) / sqrt(2/9) = 28.99 -> refused, stats kept
             (21.0, 1),  # new batch, dg 16, z = 31.11 but k = 1 -> allowed; window [2, 1, 16]
             (22.0, 2),  # dg 1: mu 19/3, pstd 6.848 -> z = -0.779 -> allowed; window [1, 16, 1]
             (30.0, 3),  # dg 8: mu 6, pstd sqrt(50) -> z = 0.283 -> allowed; window [16, 1, 8]
             (60.0, 4)]  # dg 30: mu 25/3, pstd 6.128 -> z = 3.536 -> refused
    decisions = [gate.observe(g, k) for g, k in calls]
    assert decisions == [True, True, True, True, False, True, True, True, False]
    zs = [h.z for h in gate.history]
    assert zs[:4] == [None] * 4
    assert zs[4:] == pytest.approx([28.991, 31.113, -0.779, 0.283, 3.536], abs=1e-3)
    assert [h.dg for h in gate.history] == [None, 1.0, 2.0, 1.0, 15.0, 16.0, 1.0, 8.0, 30.0]
    assert "tau" in gate.history[4].reason and gate.history[4].to_dict()["allowed"] is False


def recorded_run(seed=0, batches=30, K=4, surge_batch=20):
    """Gradient energies of a reuse loop: slow drift plus noise, with an lm_head surge on one batch's reuses."""
    rng = random.Random(seed)
    energies = {}
    for b in range(batches):
        for k in range(1, K + 1):
            g = 100.0 + 0.5 * b + rng.gauss(0.0, 1.0) + 0.8 * (k - 1)
            if b == surge_batch and k >= 3:
                g += 50.0 * (k - 2)  # the surge: reuses 3 and 4 of batch 20
            energies[b, k] = g
    return energies


@pytest.mark.parametrize("window,tau", [(5, 0.5), (20, 0.5), (8, 0.1), (8, 2.0)])
def test_replay_matches_reference(window, tau):
    energies, K = recorded_run(), 4
    gate = GradientGate(torch.zeros(1), window=window, tau=tau)
    calls = []
    for b in range(30):
        for k in range(1, K + 1):  # the training loop: stop reusing a batch at the first refusal
            calls.append((energies[b, k], k))
            if not gate.observe(energies[b, k], k):
                break
    ref = reference_decisions(calls, window, tau)
    assert [h.allowed for h in gate.history] == [a for a, _ in ref]
    for h, (_, z) in zip(gate.history, ref, strict=True):
        assert (h.z is None) == (z is None) and (z is None or h.z == pytest.approx(z, rel=1e-9, abs=1e-9))
    surge = [h for h, (g, _) in zip(gate.history, calls, strict=True) if g == energies[20, 3]]
    assert len(surge) == 1 and not surge[0].allowed  # the known surge is gated
    assert not any(h.allowed is False and h.reuse_index == 1 for h in gate.history)


class Head(nn.Module):
    def __init__(self, vocab=7, dim=5, tied=False):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.body = nn.Linear(dim, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        return self.lm_head(torch.tanh(self.body(self.embed(ids))))  # (B, T, V)


def loss(model, ids):
    return nn.functional.cross_entropy(model(ids).float().reshape(-1, 7), ids.reshape(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_allow_measures_frobenius_energy(dtype):
    torch.manual_seed(0)
    model = Head().to(dtype)
    gate = GradientGate(model.lm_head.weight, window=2)
    loss(model, torch.randint(0, 7, (3, 4))).backward()
    assert gate.allow(reuse_index=1)
    ref = float(np.sum(model.lm_head.weight.grad.float().numpy().astype(np.float64) ** 2))
    assert gate.history[0].g == pytest.approx(ref, rel=1e-6)


def test_refusal_clears_grads_and_logs(caplog):
    torch.manual_seed(0)
    model = Head()
    gate = GradientGate(model.lm_head.weight, window=2, tau=0.5, params=model.parameters())
    for g in (1.0, 2.0, 3.0):  # increments 1, 1: std 0, so any larger increment is a surge
        gate.observe(g, 1)
    ids = torch.randint(0, 7, (3, 4))
    (100.0 * loss(model, ids)).backward()
    with caplog.at_level(logging.INFO, logger="ckptprobe.train"):
        assert not gate.allow(reuse_index=2)
    assert all(p.grad is None for p in model.parameters())
    assert "reuse 2" in caplog.text and "tau" in caplog.text

    only_head = GradientGate(model.lm_head.weight, window=2)
    for g in (1.0, 2.0, 3.0):
        only_head.observe(g, 1)
    (100.0 * loss(model, ids)).backward()
    assert not only_head.allow(reuse_index=2)
    # the default clears the watched parameter only
    assert model.lm_head.weight.grad is None and model.body.weight.grad is not None


def test_tied_embedding_measures_the_sum_of_both_uses():
    torch.manual_seed(0)
    tied = Head(tied=True)
    ids = torch.randint(0, 7, (3, 4))
    gate = GradientGate(tied.lm_head.weight, window=2)
    loss(tied, ids).backward()
    gate.allow(reuse_index=1)
    # Same weights untied: the two uses' gradients separately, then summed.
    untied = Head()
    untied.load_state_dict({k: v for k, v in tied.state_dict().items()}, strict=False)
    untied.lm_head.weight.data.copy_(tied.embed.weight.data)
    loss(untied, ids).backward()
    both = untied.embed.weight.grad + untied.lm_head.weight.grad
    assert gate.history[0].g == pytest.approx(float(both.double().pow(2).sum()), rel=1e-5)
    assert gate.history[0].g != pytest.approx(float(untied.lm_head.weight.grad.double().pow(2).sum()), rel=1e-3)


def test_non_finite_energy_refused_and_ignored():
    gate = GradientGate(torch.zeros(1), window=2)
    assert gate.observe(1.0, 1)
    assert not gate.observe(float("inf"), 1)
    assert gate.observe(2.0, 2) and gate.history[-1].dg == 1.0


def test_usage_errors():
    with pytest.raises(UsageError):
        GradientGate(torch.zeros(1), window=1)
    gate = GradientGate(nn.Parameter(torch.zeros(2)))
    with pytest.raises(UsageError, match="no gradient"):
        gate.allow(1)
    with pytest.raises(UsageError):
        gate.observe(1.0, 0)
