"""Sparse GRPO with TRL: train the example base only inside its `safe` mask, then check the result.

    ckptprobe masks $(ckptprobe demo --path base) --kind safe --vectors freeze -o safe.safetensors
    python examples/sparse_grpo_trl.py safe.safetensors sparse-grpo/      # CPU, well under a minute

The shipped example base is a tiny `LlamaForCausalLM` that adds 2-digit numbers and writes the
sum reversed ("47+85=" -> "231$"). This script gives it a character-level tokenizer (built
with `tokenizers`), runs a few steps of TRL's `GRPOTrainer` with an exact-answer reward and
`MaskCallback`, saves the result in bf16 (as the base is stored) and compares it with the
base, entry by entry: entries outside the mask must not have changed at all. Then run

    ckptprobe sparsity $(ckptprobe demo --path base) sparse-grpo/

to see how much of the model moved.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from trl import GRPOConfig, GRPOTrainer

from ckptprobe import examples, open_source, read_masks
from ckptprobe.examples._train import VOCAB, make_problems
from ckptprobe.train import MaskCallback


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character of "0123456789+-=$", ids as the model was trained with; "$" ends an answer."""
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(VOCAB)}, unk_token="$"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="$", pad_token="$", padding_side="left")


def problems(n: int, seed: int) -> Dataset:
    """n addition prompts ("47+85=") with their answers ("231"), as TRL reads a dataset."""
    prompts, answers = make_problems("+", n, torch.Generator().manual_seed(seed))
    text = lambda rows: ["".join(VOCAB[t] for t in row) for row in rows.tolist()]  # noqa: E731
    return Dataset.from_dict({"prompt": text(prompts), "answer": [a.rstrip("$") for a in text(answers)]})


def exact_answer(completions: list[str], answer: list[str], **kwargs) -> list[float]:
    """+1 for exactly the answer (the "$" that ends it is the eos token, stripped by TRL), else -1."""
    return [1.0 if c.split("$")[0] == a else -1.0 for c, a in zip(completions, answer)]


def train(mask: Path, out: Path, steps: int = 3) -> None:
    base = examples.path("base")
    tokenizer = char_tokenizer()
    # fp32 weights that start exactly at the stored bf16 values (masters, as post-training keeps them)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model.generation_config.eos_token_id = model.generation_config.pad_token_id = tokenizer.eos_token_id
    config = GRPOConfig(
        output_dir=str(out / "trainer"), max_steps=steps, learning_rate=1e-3, weight_decay=0.1,
        per_device_train_batch_size=16, num_generations=8, max_completion_length=4, temperature=1.0,
        beta=0.0, use_cpu=True, bf16=False, report_to="none", save_strategy="no", logging_steps=1,
        seed=0, data_seed=0, disable_tqdm=True,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=exact_answer, args=config, train_dataset=problems(256, 0),
                          processing_class=tokenizer, callbacks=[MaskCallback(mask)])
    trainer.train()
    model.to(torch.bfloat16).save_pretrained(out)


def changes(mask: Path, out: Path) -> tuple[int, int, int]:
    """(entries changed inside the mask, trainable entries, entries changed outside it), from the files."""
    masks, base, ft = read_masks(mask), open_source(str(examples.path("base"))), open_source(str(out))
    inside = trainable = outside = 0
    for name in masks.keys():
        keep, changed = masks.mask(name), base.get_array(name) != ft.get_array(name)
        inside, trainable = inside + int(changed[keep].sum()), trainable + int(keep.sum())
        outside += int(changed[~keep].sum())
    return inside, trainable, outside


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mask", type=Path, help="mask file of the example base (ckptprobe masks ... --kind safe)")
    parser.add_argument("out", type=Path, help="folder for the trained checkpoint")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    train(args.mask, args.out, args.steps)
    inside, trainable, outside = changes(args.mask, args.out)
    print(f"changed inside the mask: {inside:,} of {trainable:,} trainable entries; outside the mask: {outside:,}")
    if outside:
        raise SystemExit("entries outside the mask changed")


if __name__ == "__main__":
    main()
