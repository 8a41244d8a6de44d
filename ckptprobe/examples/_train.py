"""The built-in example family: a tiny Llama-style model, its tasks, and how each checkpoint is trained.

Pretraining teaches 2-digit addition with the sum written in reverse, least
significant digit first ("47+85=231$"), which a small causal transformer can learn
digit by digit; it stops once the model, sampled at temperature 1, gets 95% right.
`sft` then learns a different task (subtraction) with plain cross-entropy; the
`rl-*` runs sharpen addition with GRPO (Shao et al. 2024, "DeepSeekMath") and a
+1/-1 exact-answer reward, from three seeds. Every run keeps fp32 master weights
and stores bf16, as post-training does at scale.

What the family shows (Zhu et al. 2025, "The Path Not Taken: RLVR Provably Learns
Off the Principals"): most of RL's small Adam steps stay below half a bf16 ULP and
vanish in storage, the weights that do change are much the same across seeds, and
they avoid the principal weights of the base; SFT changes nearly every weight and
rotates the top singular vectors. The RL learning rate is far below SFT's, as in
practice, but that is not the whole story: SFT run at only 10x the RL rate
(5e-6 for 200 steps) still changes 93% of the weights.

Everything runs on CPU in one thread from seeded generators, so the same torch
version on the same kind of CPU rebuilds the shipped files bit for bit.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

VOCAB = "0123456789+-=$"  # token id = index; "$" ends an answer
EOS = VOCAB.index("$")
PROMPT_LEN = 6  # "ab+cd="
ANSWER_LEN = 4  # three reversed digits, zero-padded, then "$"

# Model shape (also written to each config.json).
HIDDEN, LAYERS, HEADS, INTERMEDIATE = 128, 2, 4, 512
HEAD_DIM = HIDDEN // HEADS
RMS_EPS, ROPE_THETA = 1e-5, 10000.0

# The recipe. One thread: a kernel's split of its sums over threads changes the rounding,
# and one thread also runs well on a busy 2-core machine.
THREADS = 1
# Llama's init (std 0.02); weight decay on matrices only; accuracy checked on the bf16 model.
PRETRAIN = dict(seed=0, max_steps=1000, batch=256, lr=3e-3, warmup=50, init_std=0.02, eval_every=25, target=0.95)
SFT = dict(seed=1, steps=400, batch=64, lr=3e-4)  # enough to learn subtraction (~90% at temperature 1)
# A small RL learning rate, as in RLVR practice (1e-6 and below for LLMs whose weights are also ~0.02).
GRPO = dict(steps=200, prompts=32, group=8, lr=5e-7, save_every=50)
RL_SEEDS = {"rl-1": 11, "rl-2": 12, "rl-3": 13}  # each seed draws its own prompts and samples
ADAMW = dict(betas=(0.9, 0.95), weight_decay=0.0)  # for SFT and RL
# The geometry intervention ("The Path Not Taken", Sec. 4.3): the base with layer 1 scrambled
# (V/O rotations, head and MLP permutations; same function), then GRPO from it with rl-1's seed.
SCRAMBLE = dict(layers=(1,), seed=0)
SCRAMBLED_RUN = ("rl-1-scrambled", "rl-1")  # (name, the run whose seed and recipe it repeats)

Progress = Callable[[str], None]


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + RMS_EPS) * self.weight


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding, Llama's half-split layout. x (B, H, T, Dh), cos/sin (T, Dh)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.k_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.v_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.o_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, HEADS, HEAD_DIM).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)  # (B, H, T, Dh)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, Dh)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, HIDDEN))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj = nn.Linear(HIDDEN, INTERMEDIATE, bias=False)
        self.up_proj = nn.Linear(HIDDEN, INTERMEDIATE, bias=False)
        self.down_proj = nn.Linear(INTERMEDIATE, HIDDEN, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.input_layernorm = RMSNorm(HIDDEN)
        self.self_attn = Attention()
        self.post_attention_layernorm = RMSNorm(HIDDEN)
        self.mlp = MLP()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Body(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(len(VOCAB), HIDDEN)
        self.layers = nn.ModuleList(Layer() for _ in range(LAYERS))
        self.norm = RMSNorm(HIDDEN)


class TinyLlama(nn.Module):
    """Decoder-only transformer whose parameter names are Llama's (`model.layers.0.mlp.up_proj.weight`, ...)."""

    def __init__(self):
        super().__init__()
        self.model = Body()
        self.lm_head = nn.Linear(HIDDEN, len(VOCAB), bias=False)  # untied from embed_tokens

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) int64 -> next-token logits (B, T, V) float32."""
        T = tokens.shape[1]
        inv_freq = 1.0 / ROPE_THETA ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM)
        angles = torch.outer(torch.arange(T, dtype=torch.float32), inv_freq).repeat(1, 2)  # (T, Dh)
        cos, sin = angles.cos(), angles.sin()
        x = self.model.embed_tokens(tokens)  # (B, T, C)
        for layer in self.model.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.model.norm(x))


def config() -> dict:
    """The config.json written beside each checkpoint: a Hugging Face Llama config (transformers'
    `LlamaForCausalLM` computes the same logits), plus the torch version that trained it."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": HIDDEN, "num_attention_heads": HEADS, "num_key_value_heads": HEADS, "head_dim": HEAD_DIM,
        "num_hidden_layers": LAYERS, "intermediate_size": INTERMEDIATE, "vocab_size": len(VOCAB),
        "hidden_act": "silu", "rms_norm_eps": RMS_EPS, "rope_theta": ROPE_THETA,
        "max_position_embeddings": PROMPT_LEN + ANSWER_LEN, "tie_word_embeddings": False,
        "attention_bias": False, "mlp_bias": False, "torch_dtype": "bfloat16",
        "torch_version": torch.__version__,  # another version may round differently (see the tests)
    }


# --- tasks -------------------------------------------------------------------------------------

def _digits(x: torch.Tensor, n: int) -> torch.Tensor:
    """Non-negative ints (B,) -> their n decimal digits as token ids (B, n), most significant first."""
    powers = 10 ** torch.arange(n - 1, -1, -1)
    return x[:, None] // powers % 10


def make_problems(op: str, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n random problems "ab+cd=" (or "ab-cd=" with ab >= cd) -> prompts (n, 6) and answers (n, 4), int64 token ids.

    The answer is the result as three zero-padded digits in reverse, then "$": 47+85 -> "231$".
    """
    a, b = torch.randint(0, 100, (2, n), generator=gen)
    if op == "-":
        a, b = torch.maximum(a, b), torch.minimum(a, b)
    result = a + b if op == "+" else a - b
    op_col = torch.full((n, 1), VOCAB.index(op))
    prompts = torch.cat([_digits(a, 2), op_col, _digits(b, 2), torch.full((n, 1), VOCAB.index("="))], dim=1)
    answers = torch.cat([_digits(result, 3).flip(1), torch.full((n, 1), EOS)], dim=1)
    return prompts, answers


def decode(tokens: list[int]) -> str:
    """Token ids -> text, cut just after the first "$" (what follows it was never part of the answer)."""
    text = "".join(VOCAB[t] for t in tokens)
    end = text.find("$")
    return text if end < 0 else text[: end + 1]


def reward(completion: str, answer: str) -> float:
    """+1 if the completion is exactly the answer ("231$"), else -1: wrong digits, missing "$", stray symbols."""
    return 1.0 if completion == answer else -1.0


def group_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """GRPO advantages: rewards (P, G) float32 -> (r - group mean) / (group std + 1e-4), (P, G).

    A group whose samples all score the same carries no signal and gets zero advantage.
    """
    mean = rewards.mean(dim=1, keepdim=True)
    return (rewards - mean) / (rewards.std(dim=1, keepdim=True) + 1e-4)


# --- training ----------------------------------------------------------------------------------

def _answer_loss(model: TinyLlama, prompts: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens given the prompt (teacher forcing).

    The prompt's own tokens are random digits, so predicting them teaches nothing and is not scored.
    """
    tokens = torch.cat([prompts, answers], dim=1)  # (B, 10)
    logits = model(tokens[:, :-1])[:, PROMPT_LEN - 1 :]  # (B, 4, V): the positions that predict the answer
    return F.cross_entropy(logits.reshape(-1, len(VOCAB)), answers.reshape(-1))


@torch.no_grad()
def sample(model: TinyLlama, prompts: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Sample ANSWER_LEN tokens at temperature 1: prompts (B, 6) int64 -> completions (B, 4) int64."""
    tokens = prompts
    for _ in range(ANSWER_LEN):
        probs = torch.softmax(model(tokens)[:, -1], dim=-1)  # (B, V)
        tokens = torch.cat([tokens, torch.multinomial(probs, 1, generator=gen)], dim=1)
    return tokens[:, PROMPT_LEN:]


def accuracy(model: TinyLlama, op: str, n: int = 1024, seed: int = 1234) -> float:
    """Fraction of n fresh problems answered exactly when sampling at temperature 1."""
    gen = torch.Generator().manual_seed(seed)
    prompts, answers = make_problems(op, n, gen)
    completions = sample(model, prompts, gen)
    return sum(reward(decode(c), decode(a)) > 0 for c, a in zip(completions.tolist(), answers.tolist())) / n


def _bf16(model: TinyLlama) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}


def _from_bf16(state: dict[str, torch.Tensor]) -> TinyLlama:
    """fp32 master weights that start exactly at the stored bf16 values."""
    model = TinyLlama()
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model


def pretrain(progress: Progress, steps: int | None = None) -> TinyLlama:
    """Addition from scratch until good but not perfect: AdamW, linear warmup then constant lr.

    Every `eval_every` steps the bf16-rounded model (what ships) samples answers at
    temperature 1; training stops at the first check that reaches `target` accuracy.
    Stopping on accuracy rather than after a fixed step count keeps the base equally
    good whatever the exact path, since this task is learnt in a sudden jump.

    `steps` returns after that many steps whatever the accuracy: a prefix of the recipe,
    enough to check quickly that a machine trains it deterministically.
    """
    cfg = PRETRAIN
    gen = torch.Generator().manual_seed(cfg["seed"])
    model = TinyLlama()
    for p in model.parameters():  # explicit seeded init, independent of torch's global RNG
        if p.ndim == 2:
            nn.init.normal_(p, std=cfg["init_std"], generator=gen)
        else:
            nn.init.ones_(p)
    decay = [p for p in model.parameters() if p.ndim == 2]  # matrices decay; norm gains do not (as in nanoGPT)
    gains = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": gains, "weight_decay": 0.0}],
                            lr=cfg["lr"], betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg["warmup"]))
    for step in range(1, cfg["max_steps"] + 1):
        loss = _answer_loss(model, *make_problems("+", cfg["batch"], gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step == steps:
            return model
        if step % cfg["eval_every"] == 0:
            acc = accuracy(_from_bf16(_bf16(model)), "+")
            progress(f"base: step {step}, loss {loss.item():.3f}, accuracy at temperature 1 {acc:.3f}")
            if acc >= cfg["target"]:
                return model
    raise RuntimeError(f"pretraining did not reach {cfg['target']:.0%} accuracy in {cfg['max_steps']} steps")


def sft(base: dict[str, torch.Tensor], progress: Progress) -> TinyLlama:
    """Subtraction from the bf16 base, plain cross-entropy, constant lr."""
    cfg = SFT
    gen = torch.Generator().manual_seed(cfg["seed"])
    model = _from_bf16(base)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], **ADAMW)
    for step in range(1, cfg["steps"] + 1):
        loss = _answer_loss(model, *make_problems("-", cfg["batch"], gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0:
            progress(f"sft: step {step}/{cfg['steps']}, loss {loss.item():.3f}")
    return model


def grpo(base: dict[str, torch.Tensor], name: str, progress: Progress,
         seed: int | None = None) -> Iterator[tuple[int, TinyLlama]]:
    """GRPO on addition from the bf16 base; yields (step, model) every `save_every` steps.

    The prompts and samples come from `seed`, by default the run's own (`RL_SEEDS[name]`).

    One policy-gradient step per batch (fully on-policy, so the clipped ratio is 1 and
    drops out) and no KL term, as in most RLVR recipes since DAPO (Yu et al. 2025).
    """
    cfg = GRPO
    gen = torch.Generator().manual_seed(RL_SEEDS[name] if seed is None else seed)
    model = _from_bf16(base)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], **ADAMW)
    P, G = cfg["prompts"], cfg["group"]
    recent = []  # mean reward of each step since the last report
    for step in range(1, cfg["steps"] + 1):
        prompts, answers = make_problems("+", P, gen)
        prompts = prompts.repeat_interleave(G, dim=0)  # (P*G, 6), a group's samples side by side
        completions = sample(model, prompts, gen)  # (P*G, 4)
        texts = [decode(c) for c in completions.tolist()]
        truth = [decode(a) for a in answers.repeat_interleave(G, dim=0).tolist()]
        rewards = torch.tensor([reward(c, a) for c, a in zip(texts, truth)]).view(P, G)
        recent.append(rewards.mean().item())
        adv = group_advantages(rewards).view(-1, 1)  # (P*G, 1)
        # Score every sampled token up to and including the first "$"; later ones were never generated.
        lengths = torch.tensor([len(t) for t in texts])
        mask = (torch.arange(ANSWER_LEN) < lengths[:, None]).float()  # (P*G, 4)
        tokens = torch.cat([prompts, completions], dim=1)
        logits = model(tokens[:, :-1])[:, PROMPT_LEN - 1 :]  # (P*G, 4, V)
        logp = torch.log_softmax(logits, dim=-1).gather(-1, completions[..., None]).squeeze(-1)  # (P*G, 4)
        loss = -(adv * logp * mask).sum() / mask.sum()  # token-level mean, as in DAPO
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % cfg["save_every"] == 0:
            progress(f"{name}: step {step}/{cfg['steps']}, mean reward {sum(recent) / len(recent):+.3f}")
            recent = []
            yield step, model


def family(progress: Progress) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
    """Train the family in order, yielding (name, bf16 state dict) as each checkpoint is ready.

    A caller that stops iterating early skips the training of everything after.
    """
    base = _bf16(pretrain(progress))
    yield "base", base
    yield "sft", _bf16(sft(base, progress))
    for name in RL_SEEDS:
        for step, model in grpo(base, name, progress):
            final = step == GRPO["steps"]
            if name == "rl-1" or final:
                yield (name if final else f"{name}-step{step:03d}"), _bf16(model)
    scrambled = scramble(base)
    yield "base-scrambled", scrambled
    name, like = SCRAMBLED_RUN
    for step, model in grpo(scrambled, name, progress, seed=RL_SEEDS[like]):
        if step == GRPO["steps"]:
            yield name, _bf16(model)


def scramble(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The bf16 state with `SCRAMBLE` applied, exactly as `ckptprobe scramble` writes it."""
    from ckptprobe.analysis.scramble import Arch, Kind, Scramble

    plan = Scramble(Arch.from_config(config()), SCRAMBLE["layers"], SCRAMBLE["seed"], list(Kind))
    out = {}
    for k, v in state.items():
        bits = plan.apply_stored(k, v.view(torch.int16).numpy().view(np.uint16), "BF16")  # bf16 as uint16 bits
        out[k] = torch.from_numpy(np.ascontiguousarray(bits).view(np.int16)).view(torch.bfloat16)
    return out


def names() -> tuple[str, ...]:
    """The names `family` yields, in order (computed without training)."""
    steps = range(GRPO["save_every"], GRPO["steps"], GRPO["save_every"])
    return ("base", "sft", *(f"rl-1-step{s:03d}" for s in steps), *RL_SEEDS, "base-scrambled", SCRAMBLED_RUN[0])
