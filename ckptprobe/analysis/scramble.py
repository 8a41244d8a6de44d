"""Function-preserving scrambles of a transformer's weights: rotate each value/output head pair,
permute attention heads, permute MLP neurons.

"The Path Not Taken" (Sec. 4.3, App. C.3) changes a base's *geometry* without changing
its *function* to test whether the geometry decides where RL updates land. In one layer:

- V/O rotation: a head's value vector v (head_dim) enters the model only through its
  slice of W_o, so `v -> R v` with `W_o[:, head] -> W_o[:, head] R^T` (R orthogonal)
  leaves the output unchanged. With grouped-query attention one value head is read by
  every query head of its group: one R per key-value head, applied to W_v's rows (and
  bias) of that head and to the W_o columns of every query head in the group.
- Head permutation: key-value heads are permuted with their query groups, and query
  heads within each group, consistently in W_q, W_k, W_v (rows, biases) and W_o
  (columns). RoPE and the q/k norms of Qwen3-style models act on each head alike (the
  norm weight has head_dim entries shared by all heads), so they commute with it.
- MLP permutation: neuron j's gate/up rows and its down column move together; the
  elementwise act(gate) * up does not care about their order.

Everything is drawn from `numpy.random.default_rng([seed, layer, kind])`, so a layer's
scramble depends only on the seed, its index and its kind, not on which other layers
or kinds are scrambled with it. Permutations move entries and are exact in any dtype
(a bf16 tensor is permuted as its uint16 bits); rotations are computed in float64 and
rounded once to the stored dtype (bf16 correctly rounded), so a rotated bf16 checkpoint
equals its base's function up to that rounding.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np

from ckptprobe.analysis.bf16 import bf16_bits_to_float32, float64_to_bf16_bits
from ckptprobe.errors import CheckpointNotFoundError, InvalidCheckpointError, UsageError
from ckptprobe.io.names import parse_name

# model_type values whose attention and MLP are the plain ones these scrambles preserve:
# RoPE on q and k only, query head i reads key-value head i // (heads / kv_heads), a gated
# elementwise MLP, optional q/k/v and MLP biases, optional per-head_dim q/k norms.
ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "phi3")
RECORD_KEY = "ckptprobe.scramble"  # safetensors metadata key holding the record (JSON)
RECORD_FILE = "scramble.json"  # beside config.json


class Kind(str, Enum):
    rotate_vo = "rotate-vo"
    permute_heads = "permute-heads"
    permute_mlp = "permute-mlp"


_STREAM = {Kind.rotate_vo: 0, Kind.permute_heads: 1, Kind.permute_mlp: 2}
# Tensors of a layer that no scramble changes (norm gains; o/down biases live in the model's width).
_INVARIANT = ("input_layernorm", "post_attention_layernorm", "rotary_emb")


@dataclass(frozen=True)
class Arch:
    """What the scrambles need to know of a model, from its config.json."""

    model_type: str
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int

    @classmethod
    def from_config(cls, config: Mapping, what: str = "config.json") -> "Arch":
        """Raises InvalidCheckpointError (one line, naming `what`) for a model these scrambles do not support."""
        model_type = config.get("model_type")
        if model_type not in ARCHITECTURES:
            raise InvalidCheckpointError(
                f"{what}: model_type {model_type!r} is not one scramble knows to preserve exactly "
                f"(supported: {', '.join(ARCHITECTURES)})")

        def positive(key, default=None):
            value = config.get(key, default)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InvalidCheckpointError(f"{what}: {key} is {value!r}, expected a positive integer")
            return value

        heads = positive("num_attention_heads")
        kv_heads = positive("num_key_value_heads", heads)
        if heads % kv_heads:
            raise InvalidCheckpointError(
                f"{what}: {heads} attention heads do not split into {kv_heads} key-value groups")
        # Mistral-style configs may hold "head_dim": null, meaning hidden_size / heads.
        head_dim = positive("head_dim") if config.get("head_dim") is not None else positive("hidden_size") // heads
        return cls(model_type, positive("num_hidden_layers"), heads, kv_heads, head_dim, positive("intermediate_size"))

    @property
    def group(self) -> int:
        """Query heads per key-value head."""
        return self.heads // self.kv_heads


@dataclass(frozen=True)
class LayerScramble:
    """One layer's transformation. Permutations give, for each new position, the old index there.

    `rotations` (kv_heads, head_dim, head_dim) float64, orthogonal, indexed by old key-value head;
    `kv_perm` (kv_heads,), `q_perm` (heads,), `mlp_perm` (intermediate,) int64; None = not applied.
    The rotation is applied first, then the permutations.
    """

    layer: int
    rotations: np.ndarray | None = None
    kv_perm: np.ndarray | None = None
    q_perm: np.ndarray | None = None
    mlp_perm: np.ndarray | None = None


def haar_orthogonal(n: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly random (Haar) n x n orthogonal matrix, float64: QR of a Gaussian matrix with
    the signs of R's diagonal moved into Q (Mezzadri 2007), which makes the law exactly Haar."""
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.where(np.diag(r) < 0, -1.0, 1.0)


def layer_scramble(arch: Arch, layer: int, seed: int, kinds: Iterable[Kind]) -> LayerScramble:
    """Draw layer `layer`'s scramble of the given kinds from `seed`."""
    kinds = set(kinds)

    def rng(kind):
        return np.random.default_rng([seed, layer, _STREAM[kind]])

    rotations = kv_perm = q_perm = mlp_perm = None
    if Kind.rotate_vo in kinds:
        g = rng(Kind.rotate_vo)
        rotations = np.stack([haar_orthogonal(arch.head_dim, g) for _ in range(arch.kv_heads)])
    if Kind.permute_heads in kinds:
        g = rng(Kind.permute_heads)
        kv_perm = g.permutation(arch.kv_heads)
        G = arch.group
        # New group s holds old group kv_perm[s], its query heads in a fresh order of their own.
        q_perm = np.concatenate([kv_perm[s] * G + g.permutation(G) for s in range(arch.kv_heads)])
    if Kind.permute_mlp in kinds:
        mlp_perm = rng(Kind.permute_mlp).permutation(arch.intermediate)
    return LayerScramble(layer, rotations, kv_perm, q_perm, mlp_perm)


def _head_rows(perm: np.ndarray, head_dim: int) -> np.ndarray:
    """Head permutation (n,) -> the matching permutation of the n * head_dim rows."""
    return (perm[:, None] * head_dim + np.arange(head_dim)).ravel()


def _rotate_rows(x: np.ndarray, rotations: np.ndarray) -> np.ndarray:
    """W_v (kv*D, in) or b_v (kv*D,), float64 -> each head's rows multiplied by its R: (R_g @ x_g)."""
    kv, D, _ = rotations.shape
    heads = x.reshape(kv, D, -1)  # (kv, D, in)
    return np.einsum("gab,gbc->gac", rotations, heads).reshape(x.shape)


def _rotate_cols(x: np.ndarray, rotations: np.ndarray, group: int) -> np.ndarray:
    """W_o (out, H*D) float64 -> each query head's columns times R^T of the key-value head it reads."""
    kv, D, _ = rotations.shape
    per_head = np.repeat(rotations, group, axis=0)  # (H, D, D): query head h reads kv head h // group
    cols = x.reshape(x.shape[0], kv * group, D)  # (out, H, D)
    return np.einsum("ohd,hed->ohe", cols, per_head).reshape(x.shape)


class Scramble:
    """A scramble of some layers of one model: which tensors change, and how.

    `apply(name, x)` is the pure function: a tensor of the base -> the same tensor in the
    scrambled model. Permutations work on any dtype; rotations need floats (pass float64).
    """

    def __init__(self, arch: Arch, layers: Iterable[int], seed: int, kinds: Iterable[Kind]):
        self.arch, self.seed = arch, int(seed)
        wanted = set(kinds)
        self.kinds = tuple(k for k in Kind if k in wanted)
        self.layers = tuple(sorted(set(layers)))
        if not self.kinds:
            raise UsageError("nothing to do: choose at least one of --rotate-vo, --permute-heads, --permute-mlp")
        bad = [i for i in self.layers if not 0 <= i < arch.layers]
        if bad or not self.layers:
            raise UsageError(f"layer {bad[0] if bad else '(none)'} does not exist; "
                             f"valid layers: 0..{arch.layers - 1}")
        self._plans = {i: layer_scramble(arch, i, seed, self.kinds) for i in self.layers}

    def plan(self, layer: int) -> LayerScramble | None:
        return self._plans.get(layer)

    def rotates(self, name: str) -> bool:
        """Whether `apply` rotates this tensor (then it needs floating-point values)."""
        p = parse_name(name)
        return (p.layer in self._plans and self._plans[p.layer].rotations is not None
                and p.module in ("v", "o", "qkv") and not (p.module == "o" and name.endswith(".bias")))

    def changes(self, name: str, shape: tuple[int, ...]) -> bool:
        """Whether `apply` may change this tensor; raises InvalidCheckpointError for a tensor of a
        scrambled layer that it does not know how to transform (or whose shape does not fit the config)."""
        p = parse_name(name)
        plan = self._plans.get(p.layer)
        if plan is None:
            return False
        module, bias = p.module, name.endswith(".bias")
        a, D = self.arch, self.arch.head_dim
        if module == "norm":
            last = name.split(".")[-2]
            if last in ("q_norm", "k_norm") and shape != (D,):
                raise InvalidCheckpointError(
                    f"{name}: shape {shape}, not one ({D},) gain shared by every head; permuting heads "
                    "would not commute with it")
            return False
        if any(part in name for part in _INVARIANT) or (bias and module in ("o", "down")):
            return False
        rows = {"q": a.heads * D, "k": a.kv_heads * D, "v": a.kv_heads * D, "qkv": (a.heads + 2 * a.kv_heads) * D,
                "gate": a.intermediate, "up": a.intermediate, "gate_up": 2 * a.intermediate}
        if module in rows:
            ok = shape[:1] == (rows[module],) and len(shape) == (1 if bias else 2)
            expected = f"({rows[module]},{'' if bias else ' in'})"
        elif module in ("o", "down"):
            cols = a.heads * D if module == "o" else a.intermediate
            ok, expected = len(shape) == 2 and shape[1] == cols, f"(out, {cols})"
        else:
            raise InvalidCheckpointError(
                f"{name}: scramble does not know how this tensor transforms; refusing rather than writing "
                "a model that computes something else")
        if not ok:
            raise InvalidCheckpointError(f"{name}: shape {shape} does not fit config.json (expected {expected})")
        moves = {"q": plan.q_perm is not None, "k": plan.kv_perm is not None,
                 "v": plan.kv_perm is not None or plan.rotations is not None,
                 "o": plan.q_perm is not None or plan.rotations is not None,
                 "gate": plan.mlp_perm is not None, "up": plan.mlp_perm is not None,
                 "gate_up": plan.mlp_perm is not None, "down": plan.mlp_perm is not None}
        moves["qkv"] = moves["q"] or moves["v"]
        return moves[module]

    def apply(self, name: str, x: np.ndarray) -> np.ndarray:
        """A tensor of the base (weights (out, in) as nn.Linear stores them, or biases) -> the scrambled one.

        Returns `x` itself when the tensor does not change. Rotated tensors (see `rotates`) must be
        float64; permuted-only ones may be any dtype, storage arrays included.
        """
        if not self.changes(name, tuple(x.shape)):
            return x
        p, plan = parse_name(name), self._plans[parse_name(name).layer]
        a, D = self.arch, self.arch.head_dim
        if p.module == "qkv":  # Phi-3: rows are [q | k | v]
            q, k = a.heads * D, a.kv_heads * D
            return np.concatenate([self._attn("q", plan, x[:q]), self._attn("k", plan, x[q:q + k]),
                                   self._attn("v", plan, x[q + k:])])
        if p.module in ("q", "k", "v", "o"):
            return self._attn(p.module, plan, x)
        perm = plan.mlp_perm
        if p.module == "gate_up":  # Phi-3: rows are [gate | up]
            perm = np.concatenate([perm, perm + a.intermediate])
        return x[:, perm] if p.module == "down" else x[perm]

    def _attn(self, module: str, plan: LayerScramble, x: np.ndarray) -> np.ndarray:
        D, R = self.arch.head_dim, plan.rotations
        if R is not None and module in ("v", "o"):
            if x.dtype != np.float64:
                raise TypeError(f"rotations need float64 values, got {x.dtype}")
            x = _rotate_rows(x, R) if module == "v" else _rotate_cols(x, R, self.arch.group)
        if module in ("k", "v") and plan.kv_perm is not None:
            x = x[_head_rows(plan.kv_perm, D)]
        elif module == "q" and plan.q_perm is not None:
            x = x[_head_rows(plan.q_perm, D)]
        elif module == "o" and plan.q_perm is not None:
            x = x[:, _head_rows(plan.q_perm, D)]
        return x

    def check(self, name: str, info) -> None:
        """Raise now (one line) what `apply_stored` would raise for this tensor (a TensorInfo), from the header."""
        self.changes(name, tuple(info.shape))
        if self.rotates(name) and info.dtype not in ("BF16", "F16", "F32", "F64"):
            raise InvalidCheckpointError(
                f"{name}: cannot rotate a {info.dtype} tensor exactly (only F32, F64, F16, BF16)")

    def apply_stored(self, name: str, raw: np.ndarray, dtype: str) -> np.ndarray:
        """The same on a storage array of safetensors dtype `dtype` (BF16 as uint16 bits), returning one
        in the same dtype: permuted as is, rotated in float64 and rounded once (bf16 to nearest even)."""
        if not self.rotates(name):
            return self.apply(name, raw)
        if dtype not in ("BF16", "F16", "F32", "F64"):
            raise InvalidCheckpointError(f"{name}: cannot rotate a {dtype} tensor exactly (only F32, F64, F16, BF16)")
        x = bf16_bits_to_float32(raw).astype(np.float64) if dtype == "BF16" else raw.astype(np.float64)
        y = self.apply(name, x)
        if dtype == "BF16":
            return float64_to_bf16_bits(y)
        return y.astype({"F16": np.float16, "F32": np.float32, "F64": np.float64}[dtype])

    def record(self, base: str) -> dict:
        """What was applied, for the metadata and scramble.json: enough to draw the same scramble again."""
        moved = {}
        for i, plan in self._plans.items():
            entry = {}
            if plan.q_perm is not None:
                entry["query_heads_moved"] = int(np.count_nonzero(plan.q_perm != np.arange(len(plan.q_perm))))
            if plan.mlp_perm is not None:
                entry["mlp_neurons_moved"] = int(np.count_nonzero(plan.mlp_perm != np.arange(len(plan.mlp_perm))))
            moved[str(i)] = entry
        return {"scrambled": True, "base": base, "seed": self.seed, "layers": list(self.layers),
                "kinds": [k.value for k in self.kinds], "model_type": self.arch.model_type, "moved": moved}


def read_config(folder: Path) -> dict:
    """A checkpoint folder's config.json as a dict; one-line errors for a missing or malformed one."""
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointNotFoundError(f"{path}: not found; scramble reads the model's shape from it",
                                      hint="point BASE at a local model folder (download Hub models first)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InvalidCheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise InvalidCheckpointError(f"{path}: not a JSON object")
    return config


def scramble_checkpoint(base: str | os.PathLike, out: str | os.PathLike, seed: int,
                        layers: Iterable[int] | None = None, kinds: Iterable[Kind] | None = None,
                        base_ref: str | None = None, progress: Callable[[str], None] | None = None
                        ) -> tuple[Scramble, list[str]]:
    """Write the scramble of the local checkpoint folder `base` into the new folder `out`.

    `layers` default to all, `kinds` to all three. The record (see `Scramble.record`, with
    `base_ref`, default `str(base)`, as the base, and the base's own record under "base_record" if
    it was scrambled before) goes into every shard's metadata under RECORD_KEY and into
    `out/scramble.json`. Returns the scramble and the changed tensors' names.
    """
    from ckptprobe.io.rewrite import rewrite_folder

    folder = Path(base)
    if folder.is_file():  # a checkpoint file: its folder holds the config and every other file to copy
        raise UsageError(f"{base}: a file; scramble rewrites a whole model folder (config.json, shards, tokenizer)",
                         hint=f"give its folder: {folder.parent}")
    arch = Arch.from_config(read_config(folder), str(folder / "config.json"))
    plan = Scramble(arch, range(arch.layers) if layers is None else layers, seed,
                    list(Kind) if kinds is None else kinds)
    record = plan.record(str(base) if base_ref is None else base_ref)
    previous = folder / RECORD_FILE
    if previous.is_file():  # scrambling a scrambled checkpoint: keep what was done before
        try:
            record["base_record"] = json.loads(previous.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InvalidCheckpointError(f"{previous}: not valid JSON ({e})") from None
    from ckptprobe.analysis.plan import require_tensors
    from ckptprobe.io.sources import open_folder

    source = open_folder(folder)
    require_tensors([source])
    for name in source.keys():  # refuse before writing anything
        plan.check(name, source.info(name))
    changed = rewrite_folder(folder, out, lambda name, info, raw: plan.apply_stored(name, raw, info.dtype),
                             {RECORD_KEY: json.dumps(record, sort_keys=True)},
                             {RECORD_FILE: json.dumps(record, indent=2, sort_keys=True) + "\n"}, progress)
    return plan, changed
