"""Masks built by the CLI on real layouts apply to the model transformers loads from the same folder.

For every layout with a transformers class: `ckptprobe masks BASE --kind safe` writes the mask
in checkpoint coordinates; the model is loaded with its Auto class (fused MoE experts, tied
embeddings, prefixes as transformers makes them), trained with AdamW and weight decay under
`mask_updates`, and saved back with `save_pretrained`, which undoes transformers' conversions.
The saved tensors are then compared with the base files, entry by entry, through the mask
file alone: an independent check of where every mask landed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from corpus import LAYOUTS

from ckptprobe.cli import main
from ckptprobe.io._safetensors import FLOAT_DTYPES
from ckptprobe.io.maskfile import read_masks
from ckptprobe.io.sources import open_source

TRAINABLE = [n for n in LAYOUTS if n != "deepseek_v3_fp8"]  # hand-built FP8: no transformers class to load it


def _loss(model, auto_class: str) -> torch.Tensor:
    ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    if auto_class == "AutoModel":  # BERT: no LM head
        return model(input_ids=ids).last_hidden_state.float().square().mean()
    return model(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize("name", TRAINABLE)
def test_cli_safe_mask_on_the_loaded_model(name, corpus, tmp_path, capsys):
    import transformers

    from ckptprobe.train import mask_updates

    layout = corpus[name]
    mask_path = tmp_path / "safe.safetensors"
    assert main(["masks", str(layout.base), "--kind", "safe", "--vectors", "freeze", "-o", str(mask_path)]) == 0
    capsys.readouterr()
    model = getattr(transformers, layout.auto_class).from_pretrained(layout.base, dtype=torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    handle = mask_updates(model, mask_path, opt)
    assert handle.frozen
    for _ in range(2):
        _loss(model, layout.auto_class).backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(tmp_path / "out")

    masks, base, out = read_masks(mask_path), open_source(str(layout.base)), open_source(str(tmp_path / "out"))
    moved = trainable = 0
    for n in masks.keys():
        if base.info(n).dtype not in FLOAT_DTYPES:  # a buffer (BERT's position_ids): never trained, not saved
            continue
        keep = masks.mask(n)
        a, b = base.get_array(n), out.get_array(n)
        assert a.dtype == b.dtype and a.shape == b.shape, n
        assert np.array_equal(a[~keep], b[~keep]), f"{name}: {n} changed outside its mask"
        if ".visual." not in f".{n}":  # a text-only batch gives the vision tower no gradient
            moved += int(np.count_nonzero(a[keep] != b[keep]))
            trainable += int(np.count_nonzero(keep))
    assert moved > 0.3 * trainable, name
