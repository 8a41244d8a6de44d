"""Coarse exports of an element mask, for trainers that only freeze whole tensors, rows or modules.

An element mask says which entries may train; most trainers take something coarser:

- axolotl `unfrozen_parameters`: regexes over parameter names (matched from the start,
  dots literal), each optionally with a `[start:end]` row range on dim 0;
- Spectrum's YAML: the same `unfrozen_parameters:` list, whole tensors, grouped by module
  type in comments, as Spectrum's scanner writes it;
- PEFT `target_modules` x `layers_to_transform`: adapters on the chosen module types in the
  chosen layers (a LoRA update may change every entry of a targeted matrix); never on an MoE's
  experts or routers, which PEFT cannot adapt as their names say (see `_peft`).

Choosing a coarse selection is a knapsack: each unit (a block of rows, a tensor, a
module-type x layer cell) costs its size and is worth its trainable entries, with at most
`budget` of all parameters unfrozen. Units are taken greedily by density (trainable
entries / size, densest first, ties by name order) while they fit, which is optimal for
the fractional problem and keeps the unfrozen-but-frozen-in-the-mask entries low for the
coverage bought. Coverage says what the coarse form loses: the fraction of the mask's
trainable entries it keeps trainable, and how many entries it unfreezes that the mask freezes.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass

import numpy as np

from ckptprobe.analysis.choices import Target
from ckptprobe.errors import UsageError
from ckptprobe.io._safetensors import FLOAT_DTYPES
from ckptprobe.io.maskfile import MaskFile
from ckptprobe.io.names import LAYER, TOWERS, parse_name

ROW_BLOCKS = 64  # axolotl: each matrix is cut into at most this many row blocks (fewer, longer ranges)
MIN_BLOCK = 1 << 16  # axolotl: and none of fewer entries (the 6,400 small experts of a MoE: a line each, not 32),
# unless the budget is so small that such blocks would not fit in it: then 1/ROW_BLOCKS of the budget


@dataclass(frozen=True)
class Coverage:
    """What a coarse selection keeps of an element mask; counts are entries."""

    params: int  # all entries the mask file covers
    trainable: int  # entries the mask trains
    unfrozen: int  # entries the coarse form unfreezes
    kept: int  # trainable entries inside the unfrozen ones
    budget: float

    @property
    def kept_fraction(self) -> float | None:
        return self.kept / self.trainable if self.trainable else None

    @property
    def extra(self) -> int:
        """Entries unfrozen that the mask freezes."""
        return self.unfrozen - self.kept

    def to_dict(self) -> dict:
        return {**asdict(self), "unfrozen_fraction": self.unfrozen / self.params if self.params else None,
                "kept_fraction": self.kept_fraction, "extra": self.extra}


@dataclass(frozen=True)
class CoarseExport:
    """A coarse selection: `text` is the file to hand to the trainer, `units` what was chosen."""

    target: Target
    text: str
    units: tuple[str, ...]
    coverage: Coverage

    def to_dict(self) -> dict:
        return {"target": self.target.value, "units": list(self.units), "coverage": self.coverage.to_dict()}


@dataclass(frozen=True)
class _Unit:
    key: tuple  # sort key after density: name order
    size: int
    trainable: int
    label: object


def _greedy(units: list[_Unit], capacity: int) -> list[_Unit]:
    """Densest units first while they fit in `capacity` entries; empty-valued units are never taken."""
    chosen, used = [], 0
    for u in sorted(units, key=lambda u: (-u.trainable / max(u.size, 1), u.key)):  # a (n, 0) tensor: size 0
        if u.trainable and used + u.size <= capacity:
            chosen.append(u)
            used += u.size
    return chosen


def _row_ranges(rows: list[int]) -> list[tuple[int, int]]:
    """Sorted row indices -> maximal [start, stop) runs."""
    runs = []
    for r in rows:
        if runs and runs[-1][1] == r:
            runs[-1][1] = r + 1
        else:
            runs.append([r, r + 1])
    return [tuple(x) for x in runs]


def coarse_export(masks: MaskFile, target: Target, budget: float) -> CoarseExport:
    """The coarse selection for `target` that best covers `masks` with at most `budget` of its entries unfrozen.

    Names are the mask file's (checkpoint) tensor names, which are the parameter names for
    models loaded as stored; integer tensors (buffers) are never selected.
    """
    if not 0 < budget <= 1:
        raise UsageError(f"--budget {budget} is outside (0, 1]", hint="a fraction of all parameters, e.g. 0.25")
    names = [n for n in masks.keys()
             if (masks.tensors[n].get("fingerprint") or "F32:").split(":")[0] in FLOAT_DTYPES]
    sizes = {n: int(np.prod(masks.shape(n), dtype=np.int64)) for n in names}
    total, trainable = sum(sizes.values()), sum(masks.count(n) for n in names)
    capacity = int(budget * total)
    if target == Target.axolotl:
        chosen, text = _axolotl(masks, names, capacity)
    elif target == Target.spectrum:
        chosen, text = _spectrum(masks, names, sizes, capacity)
    else:
        chosen, text = _peft(masks, names, sizes, capacity)
    if not chosen:  # an empty list reads as "freeze nothing" to some trainers: never write one
        raise UsageError(f"nothing trainable fits in --budget {budget} ({capacity:,} of {total:,} entries) "
                         f"as {target.value} units", hint="raise --budget")
    coverage = Coverage(total, trainable, sum(u.size for u in chosen), sum(u.trainable for u in chosen), budget)
    return CoarseExport(target, text, tuple(str(u.label) for u in chosen), coverage)


def _axolotl(masks: MaskFile, names: list[str], capacity: int):
    units, least = [], max(1, min(MIN_BLOCK, capacity // ROW_BLOCKS))  # entries a block holds at least
    for order, n in enumerate(names):
        shape = masks.shape(n)
        if len(shape) < 2 or shape[0] < 2:
            units.append(_Unit((order, 0), max(1, int(np.prod(shape))), masks.count(n), (n, None)))
            continue
        per_row = masks.mask(n).reshape(shape[0], -1).sum(axis=1)  # (rows,)
        width = int(np.prod(shape[1:]))
        step = max(-(-shape[0] // ROW_BLOCKS), -(-least // max(width, 1)))  # a (64, 0) matrix has no width
        for start in range(0, shape[0], step):
            stop = min(start + step, shape[0])
            units.append(_Unit((order, start), (stop - start) * width, int(per_row[start:stop].sum()), (n, (start, stop))))
    chosen = _greedy(units, capacity)
    rows: dict[str, list[int]] = {}
    whole = []
    for u in chosen:
        n, span = u.label
        if span is None:
            whole.append(n)
        else:
            rows.setdefault(n, []).extend(range(*span))
    lines = []
    for n in names:
        if n in whole:
            lines.append(f"^{n}$")
        elif n in rows:
            runs = _row_ranges(sorted(rows[n]))
            full = runs == [(0, masks.shape(n)[0])]
            lines += [f"^{n}$" if full else f"^{n}$[{a}:{b}]" for a, b in runs]
    text = "unfrozen_parameters:\n" + "".join(f"- {line}\n" for line in lines)
    return chosen, text


def _spectrum(masks: MaskFile, names: list[str], sizes: dict, capacity: int):
    units = [_Unit((i,), max(1, sizes[n]), masks.count(n), n) for i, n in enumerate(names)]
    chosen = _greedy(units, capacity)
    picked = {u.label for u in chosen}
    groups: dict[str, list[str]] = {}
    for n in names:  # by module type, as Spectrum groups its layers
        if n in picked:
            groups.setdefault(parse_name(n).module, []).append(n)
    text = "unfrozen_parameters:\n" + "".join(
        f"# {module} layers\n" + "".join(f"- ^{n}$\n" for n in ns) for module, ns in groups.items())
    return chosen, text


def _leaf(name: str) -> str:
    """The module a PEFT target_modules entry names: `q_proj` of `model.layers.0.self_attn.q_proj.weight`."""
    parts = name.split(".")
    return parts[-2] if len(parts) >= 2 and parts[-1] in ("weight", "bias") else parts[-1]


def _peft_layer(module: str) -> int | None:
    """The layer index PEFT's `layers_to_transform` reads in a module's name (its default pattern: the first
    `.name.N.`), or None."""
    m = re.match(r".*?\.[^.]*\.(\d+)\.", module)
    return int(m[1]) if m else None


def _peft(masks: MaskFile, names: list[str], sizes: dict, capacity: int):
    """Cells (module name x layer) of the layers' matrices, without the MoE experts and routers.

    On transformers 5 an MoE layer's experts are fused 3-D parameters and its router a module of its own:
    neither is an nn.Linear that `target_modules` can wrap (PEFT refuses `GptOssTopKRouter`). And PEFT 0.21
    moves the v4 expert names of the families it converts (Mixtral's `w1`/`w3`/`w2`/`gate`, Qwen3-MoE's and
    DeepSeek-V3's `gate_proj`/`up_proj`/`down_proj`/`gate`) to `target_parameters` on the fused stacks: in
    every MoE layer whatever `layers_to_transform` says, gate and up only together, and then no longer the
    dense layers' or shared experts' modules of those names. Which families it converts is PEFT's table,
    not the checkpoint's (Qwen3-MoE yes, Qwen2-MoE no), so a name an expert's or router's module ends in is
    never a target, in any module: experts are not PEFT units (axolotl and Spectrum name their tensors).
    """
    # Adapters wrap modules: a module's `.weight`, never a bare parameter (Mamba's A_log, DBRX's experts.mlp.w1).
    weights = [n for n in names if n.endswith(".weight")]
    # the names experts' and routers' modules end in: never targets, in any module (above)
    moe = {_leaf(n) for n in names if (p := parse_name(n)).module == "router" or p.expert is not None or p.stacked}
    cells: dict[tuple[str, int], list[int]] = {}  # (module, layer) -> [size, trainable]
    for n in weights:
        layer = parse_name(n).layer
        if len(masks.shape(n)) != 2 or layer is None or _leaf(n) in moe:  # adapters go on the layers' matrices
            continue
        cell = cells.setdefault((_leaf(n), layer), [0, 0])
        cell[0] += sizes[n]
        cell[1] += masks.count(n)
    modules = sorted({m for m, _ in cells})
    layers = sorted({layer for _, layer in cells})

    def density(key, axis):
        size = sum(s for k, (s, t) in cells.items() if k[axis] == key)
        return sum(t for k, (s, t) in cells.items() if k[axis] == key) / size if size else 0.0

    # PEFT matches target_modules by the last name component and the layer by the first `.name.N.`, so
    # the modules of those names and numbers in a vision tower would be adapted too. Then the export
    # is one regular expression (PEFT matches it against whole module names) that keeps out the towers.
    # But on the MoE families it converts PEFT reads a regular expression as the bare names it matches,
    # in every layer and tower. So with experts in the checkpoint the export is a list, of the module types
    # it states exactly: PEFT finds each of their modules in its cell's layer, and those in no cell (a
    # tower's) outside every cell's layer.
    cell_of = {n[:-len(".weight")]: (_leaf(n), parse_name(n).layer) for n in weights}
    if moe:
        loose = {c[0] for k, c in cell_of.items()
                 if (_peft_layer(k) != c[1] if c in cells else _peft_layer(k) in layers)}
        modules = [m for m in modules if m not in loose]

    # The grid is a product: rank module types and layers by density, try every (k modules, j layers).
    modules.sort(key=lambda m: -density(m, 0))
    layers.sort(key=lambda layer: -density(layer, 1))
    best = ([], [], 0, 0)
    for k in range(1, len(modules) + 1):
        for j in range(1, len(layers) + 1):
            picked = [cells[m, layer] for m in modules[:k] for layer in layers[:j] if (m, layer) in cells]
            size, value = sum(c[0] for c in picked), sum(c[1] for c in picked)
            if size <= capacity and (value, -size) > (best[2], -best[3]):
                best = (modules[:k], layers[:j], value, size)
    chosen_modules, chosen_layers = sorted(best[0]), sorted(best[1])
    chosen = [_Unit((m, layer), cells[m, layer][0], cells[m, layer][1], f"{m}@{layer}")
              for m in chosen_modules for layer in chosen_layers if (m, layer) in cells]
    picked = {u.key for u in chosen}
    wanted = {k for k, c in cell_of.items() if c in picked}
    peft = {k for k, c in cell_of.items() if c[0] in chosen_modules and _peft_layer(k) in chosen_layers}
    config = {"target_modules": chosen_modules, "layers_to_transform": chosen_layers}
    if peft != wanted:
        config = {"target_modules": peft_regex(wanted)}
    return chosen, json.dumps(config, indent=2) + "\n"


def peft_regex(modules: set[str]) -> str:
    """A PEFT `target_modules` regular expression for these language-model modules (names from a layer on:
    `layers.3.self_attn.v_proj`), behind any prefix the model adds (`model.language_model.`), never inside a
    tower (`names.TOWERS`). Modules that differ only in their layer share one alternative."""
    layers: dict[tuple[str, str], list[int]] = {}  # (container, rest of the name) -> layer numbers
    for k in modules:
        m = LAYER.search(k)
        layers.setdefault((m[0].strip(".").split(".")[0], k[m.end():]), []).append(int(m[1]))
    alternatives = [rf"{re.escape(c)}\.(?:{'|'.join(map(str, sorted(ns)))})\.{re.escape(rest)}"
                    for (c, rest), ns in sorted(layers.items())]
    towers = "|".join(map(re.escape, TOWERS))
    return rf"(?!(?:.*\.)?(?:{towers})\.)(?:.*\.)?(?:{'|'.join(alternatives)})"
