"""The analyses find the paper's results on the shipped example family, with margins.

Margins are set well inside what the shipped files give (see `ckptprobe demo`), so they
hold for these files and would fail if an analysis or the family broke.
"""

import json

import pytest

from ckptprobe.cli import main
from ckptprobe.examples._findings import findings


@pytest.fixture(scope="module")
def found():
    return findings()


def test_rl_is_sparse_sft_is_dense(found):
    f = found["sparsity"]
    assert min(f.rl_runs.values()) > 0.5 and f.sft < 0.1


def test_rl_runs_agree_beyond_chance(found):
    f = found["jaccard"]
    assert f.rl > 2 * f.baseline


def test_rl_avoids_principal_and_prefers_low_weights(found):
    p, low = found["overlap_principal"], found["overlap_low"]
    assert max(p.rl_runs.values()) < 0.5 * p.baseline  # sub-random
    assert min(low.rl_runs.values()) > 2 * low.baseline  # super-random
    assert 0.6 * p.baseline < p.sft < 1.5 * p.baseline  # SFT close to chance on both
    assert 0.6 * low.baseline < low.sft < 1.5 * low.baseline


def test_rl_barely_moves_the_spectrum(found):
    nss, angle = found["nss"], found["max_angle"]
    assert max(nss.rl_runs.values()) * 20 < nss.sft
    assert max(angle.rl_runs.values()) * 20 < angle.sft and max(angle.rl_runs.values()) < 1.0


def test_scrambling_a_layer_moves_rl_updates_to_chance_there_only(found):
    # "The Path Not Taken" Fig. 6: the same function in other coordinates (layer 1) and RL from it with
    # rl-1's seed; at the same coordinates the update masks agree in layer 0 and fall to chance in layer 1.
    untouched, scrambled = found["scramble_layer0"], found["scramble_layer1"]
    assert untouched.rl > 2.5 * untouched.baseline  # shipped: 1.00 vs 0.34 (2.96x)
    assert untouched.detail["jaccard"] > 4 * untouched.detail["bernoulli"]  # 1.00 vs 0.20 (4.9x)
    assert scrambled.rl < 1.3 * scrambled.baseline  # 0.32 vs 0.28 (1.15x)
    assert scrambled.detail["jaccard"] < 1.3 * scrambled.detail["bernoulli"]  # 0.19 vs 0.16 (1.18x)
    assert "far above chance" in untouched.reading and "close to chance" in scrambled.reading
    assert scrambled.rl_runs["rl-2"] > 2 * scrambled.rl  # not seed noise: another seed, unscrambled, 0.90


def test_demo_json_and_plots(tmp_path, capsys):
    out = tmp_path / "demo.json"
    assert main(["demo", "-f", "json", "-o", str(out), "--plot", str(tmp_path / "fig" / "demo.png")]) == 0
    data = json.loads(out.read_text())
    assert {f["key"] for f in data["findings"]} >= {"sparsity", "jaccard", "overlap_principal", "overlap_low",
                                                   "nss", "max_angle", "drift", "scramble_layer0",
                                                   "scramble_layer1"}
    for f in data["findings"]:  # per run, the run's value; the other numbers of a reading are its detail
        assert set(f["rl_runs"]) <= {"rl-1", "rl-2", "rl-3", "rl-1-scrambled"}, f
        if f["key"].startswith("scramble_layer"):
            assert f["detail"]["jaccard"] > 0 and f["detail"]["bernoulli"] > 0
    figs = sorted(p.name for p in (tmp_path / "fig").iterdir())
    assert figs == ["demo-consensus-heatmaps.png", "demo-consensus-ratios.png", "demo-drift.png", "demo-jaccard.png",
                    "demo-principal.png", "demo-spectrum.png"]


def test_demo_path_prints_a_folder(capsys):
    assert main(["demo", "--path", "rl-1"]) == 0
    assert capsys.readouterr().out.strip().endswith("rl-1")
    assert main(["demo", "--path", "nope"]) == 2
    assert "rl-1" in capsys.readouterr().err


# -- the readings follow the numbers: each threshold, from both sides ----------------------------

def read(key, sft, rl, baseline, **detail):
    from ckptprobe.examples._findings import _finding

    return _finding(key, key, sft, rl, {}, baseline, **detail).reading


@pytest.mark.parametrize("rl, words", [(0.049, "avoid the principal"), (0.051, "at chance rate"),
                                       (0.199, "at chance rate"), (0.201, "prefer the principal")])
def test_overlap_reading_thresholds(rl, words):
    # baseline 0.1: avoid below 0.5x, prefer above 2x, at chance between
    assert words in read("overlap_principal", 0.1, rl, 0.1, mask="principal")


@pytest.mark.parametrize("sft, words", [(0.049, "avoids them"), (0.1, "at chance"), (0.3, "prefers them")])
def test_overlap_reading_of_sft(sft, words):
    assert f"{sft / 0.1:.2f}x, {words})" in read("overlap_low", sft, 0.1, 0.1, mask="low")


@pytest.mark.parametrize("rl, words", [(0.2 / 1.5 * 0.99, "change different weights"),
                                       (0.2 / 1.5 * 1.01, "as much as independent masks"),
                                       (0.2 * 1.49, "as much as independent masks"),
                                       (0.2 * 1.51, "change the same weights")])
def test_agreement_reading_thresholds(rl, words):
    assert words in read("jaccard", None, rl, 0.2)


@pytest.mark.parametrize("rl, words", [(1e-3 / 9.9, "RL moves the spectrum"), (1e-3 / 10.1, "RL barely moves"),
                                       (0.0, "RL does not move")])
def test_spectrum_reading_thresholds(rl, words):
    assert words in read("nss", 1e-3, rl, 0.0)


@pytest.mark.parametrize("rl, sft, words", [(4.9, 60, "RL keeps the top-8 singular subspaces"),
                                            (5.1, 60, "RL rotates the top-8"), (1, 4.9, "(SFT keeps them)")])
def test_angle_reading_thresholds(rl, sft, words):
    assert words in read("max_angle", sft, rl, 0.0, rank=8)


@pytest.mark.parametrize("series, words", [([1, 2, 3], "drifts steadily"), ([1, 3, 2], "does not drift steadily"),
                                           ([1, 1, 2], "does not drift steadily")])
def test_drift_reading_is_steady_only_when_monotone(series, words):
    assert words in read("drift", None, series[-1], None, series=series, surges=0)


def test_missing_numbers_are_not_read():
    assert "not measured" in read("nss", None, None, 0.0)


def test_shipped_readings_match_their_numbers(found):
    """The words printed for the shipped family are the ones its own numbers give."""
    from ckptprobe.examples._findings import verdict

    p, low = found["overlap_principal"], found["overlap_low"]
    assert verdict("overlap", p.rl / p.baseline) == "avoid" and "avoid the principal" in p.reading
    assert verdict("overlap", low.rl / low.baseline) == "prefer" and "prefer the low" in low.reading
    assert verdict("spectrum", found["nss"].sft / found["nss"].rl) == "barely moves"
    assert "barely moves" in found["nss"].reading and "RL keeps" in found["max_angle"].reading
    assert "drifts steadily" in found["drift"].reading
