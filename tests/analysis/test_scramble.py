"""Scrambles preserve the function: logits of real transformers models before and after agree.

Each tiny model (Llama with multi-head attention, Qwen2 with grouped-query attention and
q/k/v biases, Qwen3 with q/k norms, Phi-3 with fused qkv_proj and gate_up_proj) is built
from a config, saved by transformers in shards, scrambled through the CLI, loaded back by
transformers, and run on the same tokens. Tolerances:

- fp32, permutations only: 1e-5 absolute on logits of size ~1 (not bitwise, since a
  permutation reorders the sums inside the matmuls);
- fp32, with rotations: 1e-5 (the rotated weights are rounded once to fp32);
- bf16: 3e-2 (rotated weights rounded to bf16, relative error 2^-9 each, through
  2 scrambled layers, plus bf16 compute); a scramble that rotates W_v but not W_o moves
  the logits by more than 0.1 (checked), so the tolerance has power.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from ckptprobe.analysis.bf16 import float64_to_bf16_bits
from ckptprobe.analysis.scramble import RECORD_FILE, RECORD_KEY, Arch, Kind, Scramble, haar_orthogonal
from ckptprobe.cli import main

transformers = pytest.importorskip("transformers")

COMMON = dict(vocab_size=40, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              max_position_embeddings=32, tie_word_embeddings=False)
MODELS = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", dict(num_key_value_heads=4)),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict(num_key_value_heads=2)),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3Config", dict(num_key_value_heads=2, head_dim=16)),
    "phi3": ("Phi3ForCausalLM", "Phi3Config", dict(num_key_value_heads=2, pad_token_id=0, eos_token_id=1,
                                                   bos_token_id=1)),
}
# A seed whose head permutations move the key-value heads in both scrambled layers of every model
# here (with 2 key-value heads, a random permutation is the identity half of the time).
SEED, LAYERS = 0, "1-2"


def _model(kind: str):
    cls, cfg_cls, extra = MODELS[kind]
    torch.manual_seed(0)
    model = getattr(transformers, cls)(getattr(transformers, cfg_cls)(**COMMON, **extra))
    with torch.no_grad():  # biases and norm gains start at 0 and 1: give them values that matter
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)
    return model.eval()


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits.float()


TOKENS = torch.randint(0, 40, (3, 16), generator=torch.Generator().manual_seed(0))


@dataclass
class Built:
    model: torch.nn.Module  # fp32
    folder: Path  # the model in bf16, saved by transformers in shards with an index
    out: Path  # that folder scrambled by the CLI (layers 1-2, all kinds)
    bf16: torch.nn.Module  # the bf16 model, and the scrambled one loaded back by transformers
    scrambled: torch.nn.Module


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Built]:
    root = tmp_path_factory.mktemp("scramble")
    out = {}
    for kind in MODELS:
        model = _model(kind)
        bf16 = _model(kind).to(torch.bfloat16)
        folder, scrambled = root / kind, root / f"{kind}-scrambled"
        bf16.save_pretrained(folder, max_shard_size="40KB")  # several shards, with an index
        assert main(["scramble", str(folder), "-o", str(scrambled), "--layers", LAYERS, "--seed", str(SEED)]) == 0
        loaded = getattr(transformers, MODELS[kind][0]).from_pretrained(scrambled, dtype=torch.bfloat16).eval()
        out[kind] = Built(model, folder, scrambled, bf16, loaded)
    return out


def _apply(model, plan: Scramble, only: str = "") -> torch.nn.Module:
    """A copy of the fp32 model with `plan` applied in float64 to its tensors (those containing `only`)."""
    state = {k: v.double().numpy() for k, v in model.state_dict().items()}
    other = type(model)(model.config).eval()
    other.load_state_dict({k: torch.from_numpy(plan.apply(k, v) if only in k else v).float()
                           for k, v in state.items()})
    return other


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("kinds", [[Kind.permute_heads, Kind.permute_mlp], list(Kind)])
def test_fp32_logits_agree(built, kind, kinds):
    model = built[kind].model
    plan = Scramble(Arch.from_config(model.config.to_dict()), [1, 2], SEED, kinds)
    a, b = _logits(model, TOKENS), _logits(_apply(model, plan), TOKENS)
    assert a.abs().max() > 0.5  # logits of size ~1, so the tolerance is relative too
    assert (a - b).abs().max() <= 1e-5


@pytest.mark.parametrize("kind", MODELS)
def test_bf16_checkpoint_logits_agree(built, kind):
    a, b = _logits(built[kind].bf16, TOKENS), _logits(built[kind].scrambled, TOKENS)
    assert a.abs().max() > 0.5
    assert (a - b).abs().max() <= 3e-2


def _state(folder: Path) -> tuple[dict, dict]:
    """All tensors of a checkpoint folder by name, and each file's tensor names and metadata."""
    tensors, files = {}, {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            files[path.name] = (list(f.keys()), f.metadata())
            tensors |= {k: f.get_tensor(k) for k in f.keys()}
    return tensors, files


@pytest.mark.parametrize("kind", MODELS)
def test_scrambled_layers_change_and_nothing_else_does(built, kind):
    folder, out = built[kind].folder, built[kind].out
    base, base_files = _state(folder)
    new, new_files = _state(out)
    # Same shards, same names in each, same dtypes and shapes; base metadata kept, record added.
    assert {f: names for f, (names, _) in new_files.items()} == {f: names for f, (names, _) in base_files.items()}
    for f, (_, meta) in new_files.items():
        assert meta["format"] == "pt" and json.loads(meta[RECORD_KEY])["seed"] == SEED
    plan = Scramble(Arch.from_config(built[kind].model.config.to_dict()), [1, 2], SEED, list(Kind))
    assert all(not np.array_equal(plan.plan(i).kv_perm, np.arange(len(plan.plan(i).kv_perm))) for i in (1, 2))
    for name in base:
        assert new[name].dtype == base[name].dtype and new[name].shape == base[name].shape
        layer = next((int(p) for p in name.split(".") if p.isdigit()), None)
        same = torch.equal(new[name].view(torch.int16), base[name].view(torch.int16))
        if layer in (1, 2) and name.endswith(("proj.weight", "q_proj.bias", "k_proj.bias", "v_proj.bias")):
            assert not same, name
        else:  # other layers, embeddings, norms (q/k norms included), o/down biases
            assert same, name
    record = json.loads((out / RECORD_FILE).read_text())
    assert record["scrambled"] and record["layers"] == [1, 2] and record["seed"] == SEED
    assert record["kinds"] == ["rotate-vo", "permute-heads", "permute-mlp"]
    assert (out / "config.json").read_bytes() == (folder / "config.json").read_bytes()
    assert (out / "model.safetensors.index.json").read_bytes() == (folder / "model.safetensors.index.json").read_bytes()


def test_an_inconsistent_scramble_changes_the_logits(built):
    """The tolerances have power: rotating W_v without W_o (or permuting q without o) breaks the function."""
    model = built["qwen2"].model
    arch = Arch.from_config(model.config.to_dict())
    for kinds, only in (([Kind.rotate_vo], "v_proj"), ([Kind.permute_heads], "q_proj")):
        broken = _apply(model, Scramble(arch, [1], SEED, kinds), only)
        assert (_logits(model, TOKENS) - _logits(broken, TOKENS)).abs().max() > 0.1


def test_a_layer_scramble_depends_on_seed_layer_and_kind_only():
    arch = Arch("llama", 4, 8, 2, 16, 64)
    w = np.random.default_rng(0).standard_normal((64, 128))
    one = Scramble(arch, [2], 5, [Kind.permute_mlp]).apply("model.layers.2.mlp.up_proj.weight", w)
    more = Scramble(arch, [0, 2, 3], 5, list(Kind)).apply("model.layers.2.mlp.up_proj.weight", w)
    other_seed = Scramble(arch, [2], 6, [Kind.permute_mlp]).apply("model.layers.2.mlp.up_proj.weight", w)
    assert np.array_equal(one, more) and not np.array_equal(one, other_seed)
    assert np.array_equal(np.sort(one, axis=0), np.sort(w, axis=0))  # a permutation of rows


def test_gqa_rotation_and_permutation_against_a_hand_built_attention_output():
    """V/O with grouped-query attention in numpy: per query head, o_h = W_o[:, h] @ v_{h // group};
    the model's output sum_h o_h must be unchanged, for any head mixing of v."""
    arch = Arch("llama", 1, 8, 2, 4, 8)
    rng = np.random.default_rng(1)
    Wv, Wo, bv = rng.standard_normal((2 * 4, 16)), rng.standard_normal((16, 8 * 4)), rng.standard_normal(8)
    x, attn = rng.standard_normal(16), rng.random((8, 2))  # per query head, some weights over 2 positions

    def out(Wv, Wo, bv, x):
        v = (Wv @ x + bv).reshape(2, 4)  # (kv heads, D); both positions see the same x here
        return sum(Wo[:, h * 4:(h + 1) * 4] @ (attn[h].sum() * v[h // 4]) for h in range(8))

    plan = Scramble(arch, [0], 9, list(Kind))
    names = {n: f"model.layers.0.self_attn.{n}" for n in ("v_proj.weight", "o_proj.weight", "v_proj.bias")}
    new = [plan.apply(names[n], a) for n, a in (("v_proj.weight", Wv), ("o_proj.weight", Wo), ("v_proj.bias", bv))]
    lp = plan.plan(0)
    # Permuted heads carry their attention weights: new query head i is old head q_perm[i].
    attn_new = attn[lp.q_perm]
    v_new = (new[0] @ x + new[2]).reshape(2, 4)
    got = sum(new[1][:, h * 4:(h + 1) * 4] @ (attn_new[h].sum() * v_new[h // 4]) for h in range(8))
    np.testing.assert_allclose(got, out(Wv, Wo, bv, x), rtol=1e-12, atol=1e-12)
    assert not np.allclose(new[0], Wv) and not np.allclose(new[1], Wo)
    assert all(lp.q_perm[s * 4:(s + 1) * 4].min() // 4 == lp.kv_perm[s] for s in range(2))  # groups move whole


def test_haar_orthogonal_is_orthogonal():
    r = haar_orthogonal(32, np.random.default_rng(0))
    np.testing.assert_allclose(r @ r.T, np.eye(32), atol=1e-13)


def _bf16_nearest(x: float) -> int:
    """Reference: the bf16 bits nearest to x (ties to even), by exact rational arithmetic."""
    f32 = np.float32(x)
    lo = int(np.array([f32], np.float32).view(np.uint32)[0] >> 16)  # truncation of the float32 (toward zero)
    candidates = [lo - 1, lo, lo + 1, lo + 2]
    value = lambda b: Fraction(float(np.array([b << 16], np.uint32).view(np.float32)[0]))  # noqa: E731
    best = min(candidates, key=lambda b: (abs(value(b) - Fraction(x)), b & 1))
    return best


def test_float64_to_bf16_is_correctly_rounded():
    rng = np.random.default_rng(0)
    base = rng.standard_normal(2000) * 10.0 ** rng.integers(-6, 6, 2000)
    bits = float64_to_bf16_bits(base.astype(np.float32).astype(np.float64)).astype(np.int64)
    grid = (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    ulp = np.abs(np.nextafter(grid.astype(np.float32), np.float32(np.inf)).astype(np.float64) - grid) * 2 ** 16
    # Exact ties, and values just past a tie by less than a float32 ULP: rounding through float32 gets
    # those wrong (the first rounding lands on the tie, the second goes to even).
    ties = grid + ulp / 2
    cases = np.concatenate([base, ties, ties + ulp * 2.0 ** -20, ties - ulp * 2.0 ** -20, -ties])
    got = float64_to_bf16_bits(cases)
    assert [int(g) for g in got] == [_bf16_nearest(float(abs(c))) | (0x8000 if c < 0 else 0) for c in cases]
    through_float32 = (cases.astype(np.float32).view(np.uint32) + 0x7FFF
                       + ((cases.astype(np.float32).view(np.uint32) >> 16) & 1)) >> 16
    assert (through_float32.astype(np.uint16) != got).any()  # the trap is really in the cases
