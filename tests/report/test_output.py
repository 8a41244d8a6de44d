"""report/output and report/labels: numbers shown whole, tables that widen rather than cut, JSON without NaN,
one rule for a checkpoint's short name."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
from rich.console import Console

from ckptprobe.report.labels import label, labels
from ckptprobe.report.output import Format, emit, fmt_num, show, table, to_csv, to_json


@pytest.mark.parametrize("x, text", [
    (0.99999, "0.99999"), (1 - 1e-9, "0.999999999"), (1e-9, "1e-09"), (9.225e-05, "9.225e-05"), (1.0, "1"),
    (0.0, "0"), (0.123456, "0.1235"), (1234567, "1,234,567"), (None, "-"), (math.nan, "-"), ([4, 8], "4x8"),
])
def test_fmt_num(x, text):
    assert fmt_num(x) == text


ROWS = [{"name": "model.layers.10.self_attn.q_proj.weight", "numel": 16_777_216, "sparsity": 9.225e-05},
        {"name": "model.layers.10.self_attn.k_proj.weight", "numel": 4_194_304, "sparsity": 0.99999}]


def render(width: int) -> str:
    buf = io.StringIO()
    show(table("T", ROWS), Console(file=buf, width=width, force_terminal=False, color_system=None))
    return buf.getvalue()


@pytest.mark.parametrize("width", [30, 60, 200])
def test_numbers_are_never_cut_and_names_wrap(width):
    text = render(width)
    assert "…" not in text
    for needle in ("16,777,216", "4,194,304", "9.225e-05", "0.99999"):
        assert needle in text, (width, text)
    joined = "".join(line.split("│")[1].strip() for line in text.splitlines() if line.startswith("│"))
    assert "model.layers.10.self_attn.q_proj.weight" in joined  # wrapped, never shortened
    if width == 200:  # room enough: one line per row
        assert sum(line.startswith("│") for line in text.splitlines()) == 2


def test_json_has_no_nan_and_csv_flattens_lists():
    data = json.loads(to_json({"a": math.nan, "b": [1.0, math.inf], "c": {1: -math.inf}}))
    assert data == {"a": None, "b": [1.0, None], "c": {"1": None}}
    assert to_csv([{"shape": [2, 3], "x": 1}, {"shape": [4], "y": 2}]) == 'shape,x,y\n"[2, 3]",1,\n[4],,2\n'


def test_json_lays_out_records_one_per_line_and_keeps_every_value():
    rng = np.random.default_rng(0)
    values = rng.standard_normal((50, 4))
    values[rng.random(values.shape) < 0.2] = np.nan
    values[3, 1], values[7, 2] = np.inf, -np.inf
    records = [{"name": f"t{i}", "v": row.tolist(), "shape": [i, 2], "sub": {"x": float(row[0])}}
               for i, row in enumerate(values)]
    data = {"command": "c", "tensors": records, "groups": {"layer": records[:3], "none": []}, "total": {"n": 1e308}}
    text = to_json(data)
    # the reference: NaN/inf -> None element by element, with the standard library
    finite = [[None if not math.isfinite(x) else x for x in row.tolist()] for row in values]
    subs = [None if not math.isfinite(r[0]) else r[0] for r in values.tolist()]
    expect = [{"name": f"t{i}", "v": finite[i], "shape": [i, 2], "sub": {"x": subs[i]}} for i in range(50)]
    assert json.loads(text) == {"command": "c", "tensors": expect, "groups": {"layer": expect[:3], "none": []},
                                "total": {"n": 1e308}}
    lines = text.splitlines()
    assert lines[0] == "{" and lines[-1] == "}" and '  "command": "c",' in lines
    assert sum(line.lstrip().startswith('{"name": ') for line in lines) == 50 + 3  # a record is one line
    assert "NaN" not in text and "Infinity" not in text


def test_emit_writes_the_chosen_format(tmp_path, capsys):
    rows = [{"module": "q", "changed": 3}]
    emit(Format.csv, {"rows": rows}, rows, [table("T", rows)], None)
    assert capsys.readouterr().out == "module,changed\nq,3\n"
    emit(Format.json, {"rows": rows}, rows, [table("T", rows)], tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text()) == {"rows": rows}
    emit(Format.table, {}, rows, [table("T", ROWS)], tmp_path / "t.txt")
    assert "model.layers.10.self_attn.q_proj.weight" in (tmp_path / "t.txt").read_text()  # a file has no width cap


@pytest.mark.parametrize("ref, short", [
    ("runs/rl-1/", "rl-1"), ("ckpts/base.safetensors", "base"), ("ckpts/sft/model.safetensors", "sft"),
    ("ckpts/sft/model.safetensors.index.json", "sft"), ("org/model@v2", "model@v2"), ("/", "/"),
])
def test_label(ref, short):
    assert label(ref) == short


def test_labels_fall_back_to_references_when_short_names_collide():
    assert labels(["a/rl", "b/rl/"]) == ["a/rl", "b/rl/"]
    assert labels(["a/rl-1", "a/rl-2"]) == ["rl-1", "rl-2"]


@pytest.mark.parametrize("shape", [(1000, 300), (257, 3), (3, 5000), (513, 1025), (10, 10)])
@pytest.mark.parametrize("kind", ["bool", "float", "nan"])
def test_block_average_is_the_mean_of_each_block(shape, kind):
    from ckptprobe.report.figures import block_average

    rng = np.random.default_rng(0)
    m = rng.random(shape) < 0.3 if kind == "bool" else rng.standard_normal(shape)
    if kind == "nan":
        m[rng.random(shape) < 0.2] = np.nan
        m[:4, :4] = np.nan  # a block of NaN only (where blocks are 4 or fewer a side): NaN
    b = max(1, -(-max(shape) // 256))
    got = block_average(m)
    assert got.shape == (-(-shape[0] // b), -(-shape[1] // b))
    # another way: pad with NaN to whole blocks, then the mean of each block's non-NaN entries
    padded = np.full((got.shape[0] * b, got.shape[1] * b), np.nan)
    padded[:shape[0], :shape[1]] = m
    blocks = padded.reshape(got.shape[0], b, got.shape[1], b)
    count = (~np.isnan(blocks)).sum(axis=(1, 3))
    with np.errstate(invalid="ignore"):
        want = np.nansum(blocks, axis=(1, 3)) / count
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, equal_nan=True)  # sums in another order
    assert np.isnan(got).any() == (kind == "nan" and b <= 4)


def test_block_average_of_a_big_mask_makes_no_float_copy_of_it():
    """A principal mask of an embedding (151936 x 1536) took 6.4 GB through float64 copies."""
    import tracemalloc

    from ckptprobe.report.figures import block_average

    m = np.random.default_rng(1).random((40_000, 600)) < 0.05  # 24 MB of bool; a float64 copy is 192 MB
    tracemalloc.start()
    try:
        block_average(m)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < m.nbytes / 4, peak


@pytest.mark.parametrize("rows, columns, title, caption", [
    ([{"module": "q", "numel": 1234, "sparsity": 0.5}, {"module": "down_proj", "numel": None, "sparsity": 1 / 3}],
     ["module", "numel", "sparsity"], "By module", "total: 3 entries\nsecond line of the caption, longer than the table"),
    ([{"name": "model.layers.0.mlp.experts.17.down_proj.weight", "shape": (512, 128), "changed": 10 ** 9}],
     ["name", "shape", "changed"], "A title much longer than the table it stands over, by far", None),
    ([], ["module", "numel"], "Empty", None),
    ([{"run": "rl-1", "x": float("nan"), "y": -1e-9}], ["run", "x", "y"], "", "caption [bold]not markup[/]"),
])
def test_plain_tables_are_what_rich_draws_off_a_terminal(rows, columns, title, caption):
    """Off a terminal a table is drawn without rich (~1 ms a row there): the very same text, rich as reference."""
    t = table(title, rows, columns, caption)
    buf = io.StringIO()
    Console(file=buf, width=100_000, soft_wrap=True, markup=False).print(t.rich(), crop=False)
    assert t.text() == buf.getvalue()
