"""`minigpt positions` and position_plots.py: the plotted arrays are the textbook formulas (Vaswani 2017's sinusoids,
RoFormer's rotations, Press 2022's ALiBi), computed here independently of model.py."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import checkpoint
import position_plots as pp
import train
from cli.config_loader import config_to_dict, load_config
from cli.main import app
from conftest import REPO_ROOT
from model import GPTConfig

DEBUG = str(REPO_ROOT / "config" / "debug.toml")  # 2 heads, 32 wide, block 32
PNG = b"\x89PNG\r\n\x1a\n"


def invoke(*args):
    return CliRunner().invoke(app, ["positions", *map(str, args)])


def test_sinusoidal_table_is_vaswanis_formula():
    T, C = 50, 16
    table = pp.sinusoidal_table(T, C)
    p, i = np.arange(T)[:, None], np.arange(C // 2)[None, :]
    assert table.shape == (T, C)
    np.testing.assert_allclose(table[:, 0::2], np.sin(p / 10000 ** (2 * i / C)), atol=2e-5)
    np.testing.assert_allclose(table[:, 1::2], np.cos(p / 10000 ** (2 * i / C)), atol=2e-5)
    assert table[0, 0] == 0 and table[0, 1] == 1 and table[1, 0] == pytest.approx(np.sin(1.0))
    assert table[3, 2] == pytest.approx(np.sin(3 / 10000 ** (2 / 16)), abs=1e-6)  # PE(3, 2) = sin(3/10000^(2/16))


def test_cosine_similarity_of_a_known_table():
    sim = pp.cosine_similarity(np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0], [-1.0, 0.0]]))
    r = 1 / np.sqrt(2)
    np.testing.assert_allclose(sim, [[1, 0, r, -1], [0, 1, r, 0], [r, r, 1, -r], [-1, 0, -r, 1]], atol=1e-12)
    sinusoidal = pp.cosine_similarity(pp.sinusoidal_table(64, 32))
    np.testing.assert_allclose(np.diag(sinusoidal), 1, atol=1e-6)
    assert sinusoidal[10, 11] > sinusoidal[10, 20] > sinusoidal[10, 40]  # near positions look more alike


@pytest.mark.parametrize("hs, base", [(16, 10000.0), (8, 500000.0)])
def test_rope_scores_are_a_function_of_the_offset_alone_and_decay(hs, base):
    T = 128
    scores = pp.rope_offset_scores(hs, base, T)
    theta = base ** (-np.arange(0, hs, 2) / hs)  # RoFormer: θ_i = base^(-2i/hs)
    offset = np.arange(T)[:, None] - np.arange(T)[None, :]
    expected = (2 / hs) * np.cos(offset[..., None] * theta).sum(-1)
    np.testing.assert_allclose(scores, expected, atol=1e-4)
    np.testing.assert_allclose(scores[1:, 1:], scores[:-1, :-1], atol=1e-4)  # equal along every diagonal
    np.testing.assert_allclose(scores, scores.T, atol=1e-5)
    np.testing.assert_allclose(np.diag(scores), 1, atol=1e-5)
    by_offset = scores[:, 0]
    assert np.abs(by_offset[1:]).max() < 0.999  # only offset 0 scores 1
    assert by_offset[1:9].mean() > np.abs(by_offset[64:]).mean() + 0.25  # decays with distance
    if hs == 16:
        assert by_offset[1] == pytest.approx(np.cos(theta).mean(), abs=1e-5) and by_offset[1] == pytest.approx(
            0.9356, abs=1e-4)
    with pytest.raises(ValueError, match="even"):
        pp.rope_offset_scores(7, base, 4)


def test_alibi_biases_are_minus_slope_times_distance():
    T = 20
    biases = pp.alibi_biases(8, T)
    slopes = 2.0 ** (-8 * np.arange(1, 9) / 8)  # 2^(-8h/n), h = 1..n: 1/2, 1/4, ..., 1/256
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    assert biases.shape == (8, T, T)
    for h in range(8):
        np.testing.assert_allclose(biases[h][i >= j], (-slopes[h] * (i - j))[i >= j], rtol=1e-6)
        assert np.isneginf(biases[h][i < j]).all()  # causal: later keys are masked
    assert biases[0, 5, 2] == -1.5 and biases[7, 19, 0] == pytest.approx(-19 / 256)
    both_ways = pp.alibi_biases(8, T, bidirectional=True)
    np.testing.assert_allclose(both_ways, -slopes[:, None, None] * np.abs(i - j), rtol=1e-6)
    # 6 heads, not a power of two (Press 2022): the 4 slopes of n = 4, then every other slope of n = 8
    six = pp.alibi_biases(6, 3)
    np.testing.assert_allclose(-six[:, 1, 0], [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3], rtol=1e-6)


def test_arrays_follow_the_config_and_a_runs_learned_table():
    cfg = GPTConfig(block_size=24, n_head=4, n_embd=32, rope_theta=500000.0)
    data = pp.position_arrays(cfg, None)
    assert sorted(data.arrays) == ["alibi_biases", "rope_scores", "sinusoidal_similarity", "sinusoidal_table"]
    assert data.arrays["sinusoidal_table"].shape == (24, 32) and data.arrays["alibi_biases"].shape == (4, 24, 24)
    np.testing.assert_allclose(data.arrays["rope_scores"], pp.rope_offset_scores(8, 500000.0, 24))
    assert data.slopes == [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8]
    assert data.notes == ['learned_similarity: needs a trained run (pass its folder or .pt) with '
                          'model.pos_encoding = "learned"']

    table = torch.randn(24, 32)
    data = pp.position_arrays(cfg, {"model": {"wpe.weight": table}, "step": 7})
    t = table.double().numpy()
    expected = (t @ t.T) / np.outer(np.linalg.norm(t, axis=1), np.linalg.norm(t, axis=1))
    np.testing.assert_allclose(data.arrays["learned_similarity"], expected, atol=1e-6)
    assert data.steps == 7 and data.notes == []

    odd = pp.position_arrays(replace(cfg, n_head=2, n_embd=14, pos_encoding="alibi"), {"model": {}})
    assert "rope_scores" not in odd.arrays and "learned_similarity" not in odd.arrays
    assert odd.notes == ["rope_scores: skipped, rope rotates pairs of dimensions and the head size (7) is odd",
                         'learned_similarity: this run uses alibi positions; it needs a run trained with '
                         'model.pos_encoding = "learned"']


def save_run(folder, table, **model):
    folder.mkdir()
    changes = [f"model.{k}={v}" for k, v in model.items()]
    cfg = load_config(train.Config, DEBUG, ["model.vocab_size=65", *changes])
    weights = {} if table is None else {"wpe.weight": table}
    torch.save({"version": checkpoint.CHECKPOINT_VERSION, "model": weights, "config": config_to_dict(cfg), "step": 40},
               folder / "ckpt.pt")


def test_cli_writes_one_png_per_plot_and_a_line_for_each(tmp_path):
    out = tmp_path / "plots"
    result = invoke(DEBUG, "--set", "model.n_head=4", "--out", out)
    assert result.exit_code == 0, result.output
    names = ["sinusoidal_table", "sinusoidal_similarity", "rope_scores", "alibi_biases"]
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}.png" for n in names)
    assert all((out / f"{n}.png").read_bytes()[:8] == PNG for n in names)
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines[:4]] == [f"wrote {out / n}.png" for n in names]
    assert "head size 8, base 10000, 32 positions" in lines[2] and "4 heads" in lines[3]
    assert lines[4:] == ['note: learned_similarity: needs a trained run (pass its folder or .pt) with '
                         'model.pos_encoding = "learned"']

    run = tmp_path / "run"
    save_run(run, torch.randn(32, 32))
    result = invoke(run, "--out", tmp_path / "learned")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "learned" / "learned_similarity.png").read_bytes()[:8] == PNG
    assert f"wrote {tmp_path / 'learned' / 'learned_similarity.png'}: cosine similarity of the run's learned " \
           "position table, 32 x 32 positions" in result.stdout.splitlines()
    assert "note:" not in result.stdout


@pytest.mark.parametrize("case, expected", [
    ("out_is_a_file", "is a file"),
    ("out_under_a_file", "is a file, not a folder"),
    ("unknown_key", "n_haed"),
    ("bad_override", "n_head"),
    ("missing_config", "not found"),
    ("learned_run_without_table", "no wpe.weight"),
])
def test_bad_input_is_one_error_line_and_writes_nothing(case, expected, tmp_path):
    config, out, file = DEBUG, tmp_path / "plots", tmp_path / "taken.txt"
    file.write_text("mine")
    overrides = []
    if case == "out_is_a_file":
        out = file
    elif case == "out_under_a_file":
        out = file / "plots"
    elif case == "unknown_key":
        config = tmp_path / "typo.toml"
        config.write_text("[model]\nn_haed = 2\n")
    elif case == "bad_override":
        overrides = ["--set", "model.n_head=5"]  # 32 wide: not divisible
    elif case == "missing_config":
        config = tmp_path / "missing.toml"
    elif case == "learned_run_without_table":
        config = tmp_path / "run"
        save_run(config, None)
    before = sorted(tmp_path.rglob("*"))
    result = invoke(config, *overrides, "--out", out)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert result.stdout == "" and sorted(tmp_path.rglob("*")) == before and file.read_text() == "mine"
