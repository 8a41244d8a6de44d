"""The planner: what is a weight, matrices and k, pairing, prefixes, and the errors raised before any read."""

from __future__ import annotations

import json

import numpy as np
import pytest
from factory import run_error, save, tiny_weights

from ckptprobe.analysis.pairing import prefix_fix, renamed
from ckptprobe.analysis.plan import SkipCategory, Skipped, Want, plan_tensors, skip_summary
from ckptprobe.analysis.sparsity import sparsity
from ckptprobe.analysis.update import CompareMode
from ckptprobe.analysis.weights import read_matrix
from ckptprobe.cli import main
from ckptprobe.errors import NoMatchingTensorsError, TensorMismatchError, UsageError
from ckptprobe.io.sources import open_source
from ckptprobe.io.writer import write_safetensors


class Reads:
    """A source that counts data reads (headers are free): the planner must not read any."""

    def __init__(self, source):
        self.source, self.ref, self.reads = source, source.ref, 0

    def keys(self):
        return self.source.keys()

    def info(self, name):
        return self.source.info(name)

    def read(self, *args, **kwargs):
        self.reads += 1
        return self.source.read(*args, **kwargs)

    def get_array(self, name):
        self.reads += 1
        return self.source.get_array(name)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A checkpoint with every kind of tensor: matrices, a tiny router, norms, a scalar, an int64 buffer,
    a bool mask, a 3-D expert stack, a 3-D conv kernel, a zero-row matrix."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    t = {
        "model.layers.0.self_attn.q_proj.weight": ("BF16", rng.integers(0, 0x3F00, (32, 32), dtype=np.uint16)),
        "model.layers.0.mlp.gate.weight": ("F32", rng.standard_normal((4, 32)).astype(np.float32)),
        "model.layers.0.mlp.experts.gate_up_proj": ("F32", rng.standard_normal((3, 16, 8)).astype(np.float32)),
        "model.layers.0.input_layernorm.weight": ("F32", np.ones(32, np.float32)),
        "model.scale": ("F32", np.ones((), np.float32)),
        "embeddings.position_ids": ("I64", np.arange(32, dtype=np.int64)[None]),
        "model.attn_mask": ("BOOL", np.ones((4, 4), bool)),
        "vision.patch_conv.weight": ("F32", np.zeros((2, 3, 4), np.float32)),
        "model.empty.weight": ("F32", np.zeros((0, 8), np.float32)),
    }
    write_safetensors(root / "a.safetensors", t)
    return open_source(str(root / "a.safetensors"))


def test_what_is_a_weight(mixed):
    src = Reads(mixed)
    plan = plan_tensors(src, [src], Want.floating, compare=True)
    assert src.reads == 0
    assert {p.name for p in plan.tensors} == {n for n in mixed.keys() if mixed.info(n).dtype in ("BF16", "F32")}
    cats = {s.name: (s.category, s.kind) for s in plan.skipped}
    assert cats == {"embeddings.position_ids": (SkipCategory.not_weight, "int64 buffer"),
                    "model.attn_mask": (SkipCategory.not_weight, "bool buffer")}
    assert all(p.runs[0].mode == CompareMode.bitwise for p in plan.tensors)


def test_matrices_stacks_and_k(mixed):
    plan = plan_tensors(mixed, [mixed], Want.matrices, k=6, min_side=2)
    by = {p.name: p for p in plan.tensors}
    assert set(by) == {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.experts.gate_up_proj"}
    stack = by["model.layers.0.mlp.experts.gate_up_proj"]
    assert stack.stacked and stack.matrices == 3 and stack.matrix_shape == (16, 8) and stack.k == 6
    q = by["model.layers.0.self_attn.q_proj.weight"]
    assert not q.stacked and q.matrices == 1 and q.matrix_shape == (32, 32)
    cats = {s.name: s.category for s in plan.skipped}
    assert cats == {
        "model.layers.0.mlp.gate.weight": SkipCategory.small,  # a 4 x 32 router, k = 6
        "model.layers.0.input_layernorm.weight": SkipCategory.vector,
        "model.scale": SkipCategory.scalar,
        "embeddings.position_ids": SkipCategory.not_weight,  # never a matrix, though 2-D
        "model.attn_mask": SkipCategory.not_weight,
        "vision.patch_conv.weight": SkipCategory.not_matrix,
        "model.empty.weight": SkipCategory.small,
    }
    reasons = {s.name: s.reason for s in plan.skipped}
    assert reasons["model.layers.0.mlp.gate.weight"] == "shape (4, 32): smaller side 4 < k=6"
    # without k, a default per matrix shape; below min_side a matrix has no subspace
    plan = plan_tensors(mixed, [], Want.matrices, default_k=lambda shape: min(shape) // 4, min_side=2)
    assert {p.name: p.k for p in plan.tensors} == {"model.layers.0.self_attn.q_proj.weight": 8,
                                                   "model.layers.0.mlp.gate.weight": 1,
                                                   "model.layers.0.mlp.experts.gate_up_proj": 2}
    assert [s.reason for s in plan.skipped if s.name == "model.empty.weight"] == ["shape (0, 8): smaller side 0 < 2"]
    with pytest.raises(UsageError, match="k=0: the rank must be at least 1"):
        plan_tensors(mixed, [], Want.matrices, k=0)


def test_biases_are_vectors_never_matrices(tmp_path):
    """gpt-oss's per-expert bias stacks (E, 2I) and any other 2-D+ bias: skipped by the matrix analyses
    as biases, still planned as floating-point weights (sparsity, consensus, drift)."""
    rng = np.random.default_rng(1)
    stack = "model.layers.0.mlp.experts.gate_up_proj"
    biases = {stack + "_bias": (8, 32), "model.layers.0.mlp.experts.down_proj_bias": (8, 16),
              "model.layers.0.attn.qkv.bias": (3, 24), "model.layers.0.mlp.experts.up.bias": (8, 4, 6)}
    t = {n: ("F32", rng.standard_normal(shape).astype(np.float32)) for n, shape in biases.items()}
    t |= {stack: ("F32", rng.standard_normal((8, 16, 32)).astype(np.float32)),
          "model.layers.0.mlp.router.weight": ("F32", rng.standard_normal((8, 16)).astype(np.float32)),
          "model.layers.0.mlp.router.bias": ("F32", rng.standard_normal(8).astype(np.float32)),
          "model.layers.0.self_attn.q_bias_proj.weight": ("F32", rng.standard_normal((16, 16)).astype(np.float32))}
    write_safetensors(tmp_path / "a.safetensors", t)
    src = open_source(str(tmp_path / "a.safetensors"))
    plan = plan_tensors(src, [src], Want.matrices, k=2, min_side=2)
    assert {p.name for p in plan.tensors} == {stack, "model.layers.0.mlp.router.weight",
                                              "model.layers.0.self_attn.q_bias_proj.weight"}
    skips = {s.name: s for s in plan.skipped}
    assert {n for n, s in skips.items() if s.category == SkipCategory.bias} == set(biases)
    assert skips[stack + "_bias"].reason == "2-D bias (8, 32), a stack of vectors, not a matrix"
    assert skips["model.layers.0.mlp.router.bias"].category == SkipCategory.vector
    assert skip_summary(plan.skipped) == "skipped 5 tensors: 4 bias stacks (vectors), 1 1-D (norms, biases)"
    assert {p.name for p in plan_tensors(src, [src], Want.floating).tensors} == set(t)


def test_read_matrix_of_a_stack(mixed):
    whole = mixed.get_array("model.layers.0.mlp.experts.gate_up_proj")
    for e in range(3):
        np.testing.assert_array_equal(read_matrix(mixed, "model.layers.0.mlp.experts.gate_up_proj", e), whole[e])
    bits = mixed.get_array("model.layers.0.self_attn.q_proj.weight").astype(np.uint32) << 16
    np.testing.assert_array_equal(read_matrix(mixed, "model.layers.0.self_attn.q_proj.weight"), bits.view(np.float32))


def test_skip_summary():
    plan_skips = [("a", SkipCategory.vector, "1-D (norms, biases)")] * 56 + [("b", SkipCategory.not_weight, "int64 buffer")]
    skipped = [Skipped(n, "why", c, k) for n, c, k in plan_skips]
    assert skip_summary(skipped) == "skipped 57 tensors: 56 1-D (norms, biases), 1 int64 buffer"
    assert skip_summary(skipped[-1:]) == "skipped 1 tensor: 1 int64 buffer"
    assert skip_summary([]) is None


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    w = tiny_weights(0)
    a = save(root / "causal" / "model.safetensors", w)
    # the bare model (LlamaModel) of a ...ForCausalLM checkpoint: no `model.` prefix, no lm_head
    bare = save(root / "bare" / "model.safetensors", {n.removeprefix("model."): x for n, x in w.items()
                                                      if n != "lm_head.weight"})
    (root / "causal" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return a, bare


def test_checkpoints_without_a_common_name(pair, tmp_path):
    a, bare = map(str, pair)
    src, other = open_source(a), open_source(bare)
    with pytest.raises(TensorMismatchError, match="no tensor name in common: names differ by a prefix") as e:
        plan_tensors(src, [other])
    assert "--add-prefix model." in e.value.hint
    with pytest.raises(TensorMismatchError) as e:
        plan_tensors(other, [src])
    assert "--strip-prefix model." in e.value.hint
    # renaming fixes it: everything pairs but the head the bare model does not have
    fixed = plan_tensors(src, [renamed(other, add="model.")])
    assert len(fixed.tensors) == len(src.keys()) - 1 and [s.name for s in fixed.skipped] == ["lm_head.weight"]
    back = renamed(src, strip="model.")  # names without the prefix keep their name
    assert sorted(back.keys()) == sorted([*other.keys(), "lm_head.weight"])
    np.testing.assert_array_equal(back.get_array("norm.weight"), src.get_array("model.norm.weight"))
    # another architecture, said from config.json
    gpt2 = tmp_path / "gpt2"
    write_safetensors(gpt2 / "model.safetensors", {"h.0.attn.c_attn.weight": ("F32", np.zeros((4, 12), np.float32))})
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(TensorMismatchError, match=f"{a} and {gpt2} have no tensor name in common: "
                                                  "different architectures: llama vs gpt2"):
        sparsity(src, open_source(str(gpt2)))


# peft 0.x calls transformers' deprecated alias; a warning of theirs, not of ours
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_a_lora_adapter_given_as_a_checkpoint(tmp_path, capsys):
    # A real PEFT adapter folder (adapter_model.safetensors: base_model.model...lora_A.weight) names no base
    # tensor: the error says what it is and how to get a whole checkpoint from it.
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
    model.save_pretrained(tmp_path / "base")
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "adapter")
    base, adapter = str(tmp_path / "base"), str(tmp_path / "adapter")
    capsys.readouterr()  # transformers' progress bar
    run_error(capsys, ["sparsity", base, adapter], f"{adapter} is a LoRA adapter (lora_A/lora_B matrices), not a whole "
              "checkpoint", hint="merge_and_unload")


def test_cli_errors_for_unrelated_checkpoints_and_empty_filters(pair, capsys):
    a, bare = map(str, pair)
    run_error(capsys, ["sparsity", a, bare], f"{a} and {bare} have no tensor name in common", "prefix",
              hint="--add-prefix model.")
    run_error(capsys, ["sparsity", a, a, "--include", "*.layers.9.*"], "--include '*.layers.9.*' matches no tensor")
    # the hint's flag does what it says, in every command that compares checkpoints
    for cmd in (["sparsity", a, bare], ["consensus", a, bare, bare], ["drift", a, bare]):
        assert main([*cmd, "--add-prefix", "model.", "-f", "json"]) == 0, cmd
        out = json.loads(capsys.readouterr().out)
        assert {s["name"] for s in out["skipped"]} == {"lm_head.weight"}  # consensus: once per run
    assert main(["sparsity", bare, a, "--strip-prefix", "model.", "-f", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["total"]["changed"] == 0


def test_filters(pair):
    src = open_source(str(pair[0]))
    with pytest.raises(NoMatchingTensorsError, match="--include 'nope' matches no tensor"):
        plan_tensors(src, [src], include=["*.layers.0.*", "nope"])
    with pytest.raises(NoMatchingTensorsError, match="leave no tensor"):
        plan_tensors(src, [src], include=["*.layers.0.*"], exclude=["model.*"])
    plan = plan_tensors(src, [src], include=["*.layers.0.*"], exclude=["*norm*"])
    assert [p.name for p in plan.tensors] == [n for n in src.keys() if ".layers.0." in n and "norm" not in n]


def test_bitwise_needs_one_dtype_before_any_read(tmp_path):
    w = tiny_weights(0)
    a, b = Reads(open_source(str(save(tmp_path / "a.safetensors", w)))), \
        Reads(open_source(str(save(tmp_path / "b.safetensors", w, "F32"))))
    with pytest.raises(UsageError, match="bitwise comparison needs one dtype"):
        plan_tensors(a, [b], compare=True, mode=CompareMode.bitwise)
    assert plan_tensors(a, [b], compare=True).tensors[0].runs[0].mode == CompareMode.bf16
    assert a.reads == b.reads == 0


def test_partial_pairing_and_shapes(tmp_path):
    w = tiny_weights(0)
    base = open_source(str(save(tmp_path / "base.safetensors", w)))
    resized = dict(w, **{"model.embed_tokens.weight": np.zeros((64, 32), np.float32)})
    del resized["lm_head.weight"]
    other = open_source(str(save(tmp_path / "other.safetensors", resized)))
    strict = plan_tensors(base, [base, other])
    assert {s.name: s.category for s in strict.skipped} == {"model.embed_tokens.weight": SkipCategory.shape,
                                                            "lm_head.weight": SkipCategory.missing}
    loose = plan_tensors(base, [base, other], partial=True)
    by = {p.name: [r.index for r in p.runs] for p in loose.tensors}
    assert by["model.embed_tokens.weight"] == [0] and by["lm_head.weight"] == [0] and by["model.norm.weight"] == [0, 1]
    assert all(s.reason.endswith("run left out of this tensor") for s in loose.skipped)


def test_prefix_fix():
    a = ["model.layers.0.q.weight", "model.layers.0.k.weight", "model.norm.weight", "lm_head.weight"]
    b = ["layers.0.q.weight", "layers.0.k.weight", "norm.weight", "lm_head.weight"]
    assert prefix_fix(a, b) == ("add", "model.")
    assert prefix_fix(b, a) == ("strip", "model.")
    assert prefix_fix(a, ["h.0.attn.weight"]) is None


def test_mostly_disjoint_names_with_a_prefix_are_an_error(tmp_path):
    w = tiny_weights(0)
    a = open_source(str(save(tmp_path / "a.safetensors", w)))
    b = open_source(str(save(tmp_path / "b.safetensors", {("" if n == "lm_head.weight" else "base_model.") + n: x
                                                          for n, x in w.items()})))
    with pytest.raises(TensorMismatchError, match="only 1 of 21 tensor names in common: names differ by a prefix") as e:
        plan_tensors(a, [b])
    assert "--strip-prefix base_model." in e.value.hint
