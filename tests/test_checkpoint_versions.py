"""Checkpoints from an older or newer minigpt: every checkpoint names the release that wrote it, and one this release
cannot use is refused in one line that names both releases and what to do, not as the user's typo; the run folder is
left as it was.

The checkpoints are copies of one tiny trained run, changed the way another release would have written them.
"""

import os
import re
import shutil
import subprocess
import sys
import tomllib

import pytest
import torch
from typer.testing import CliRunner

import checkpoint
import train
from cli.main import app, config_from
from conftest import REPO_ROOT, tiny_config
from errors import UserError

OURS = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]


@pytest.fixture(scope="module")
def trained_run(char_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("versions") / "run"
    train.train(tiny_config(char_data, run, train=dict(max_iters=1, eval_interval=1)))
    return run


def crafted(trained_run, tmp_path, version=None, writer=None, config=None, weights=None):
    """A copy of the run whose ckpt.pt another release could have written: its format `version`, the release that
    `writer` stamps (None: no stamp, as before releases were stamped), config keys {'section.key': value} added or
    changed, and `weights(dict)` changing its weights."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    state = torch.load(run / "ckpt.pt", map_location="cpu", weights_only=True)
    state.pop("minigpt_version")
    if writer is not None:
        state["minigpt_version"] = writer
    if version is not None:
        state["version"] = version
    for dotted, value in (config or {}).items():
        section, key = dotted.split(".")
        state["config"].setdefault(section, {})[key] = value
    if weights is not None:
        weights(state["model"])
    torch.save(state, run / "ckpt.pt")
    return run


def snapshot(folder) -> dict:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(run, *args) -> str:
    """Run `minigpt ARGS` on the run; assert it ends as one error line, exit code 2, the folder unchanged. The line."""
    before = snapshot(run)
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, (result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output and "did you mean" not in lines[0], lines[0]
    assert snapshot(run) == before
    return lines[0]


def test_every_checkpoint_names_the_minigpt_that_wrote_it(trained_run):
    assert checkpoint.minigpt_version() == OURS
    for name in ("ckpt.pt", "best.pt"):
        assert checkpoint.load_checkpoint(trained_run / name)["minigpt_version"] == OURS


def test_config_keys_of_a_newer_minigpt_are_its_settings_not_typos(trained_run, tmp_path, capsys):
    run = crafted(trained_run, tmp_path, writer="9.0.0", config={"train.future_key": 3, "eval.beams": 4})
    line = refused(run, "train", "--resume", run)
    assert f"{run / 'ckpt.pt'} was written by minigpt 9.0.0" in line
    assert f"config keys this minigpt ({OURS}) does not know (train.future_key, eval.beams)" in line
    assert line.endswith("resume it with minigpt 9.0.0, which wrote it")

    # a command that only looks at the run leaves them out, with a note; the user's own typo is still a typo
    cfg, _ = config_from(run, [], read_only=True)
    assert cfg.train.max_iters == 1
    note = capsys.readouterr().err.strip()
    assert note.startswith("note: ") and "minigpt 9.0.0" in note and note.endswith("train.future_key, eval.beams")
    with pytest.raises(UserError, match=r"unknown key 'train.max_iterz' \(did you mean 'train.max_iters'"):
        config_from(run, ["train.max_iterz=5"], read_only=True)

    # sampling reads only the model's settings: the run samples; inspect and bench leave the keys out too
    result = CliRunner().invoke(app, ["sample", str(run), "--max-new-tokens", "5", "--seed", "1"])
    assert result.exit_code == 0, (result.output, result.exception)
    result = CliRunner().invoke(app, ["inspect", str(run), "--json"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert "note: " in result.stderr and "train.future_key, eval.beams" in result.stderr


def test_a_typo_in_set_on_resume_still_gets_its_suggestion(trained_run, tmp_path):
    run = crafted(trained_run, tmp_path, writer=OURS)
    result = CliRunner().invoke(app, ["train", "--resume", str(run), "--set", "train.max_iterz=5"])
    assert result.exit_code == 2
    assert "unknown key 'train.max_iterz' (did you mean 'train.max_iters'" in result.stderr


def test_model_settings_of_a_newer_minigpt_are_refused_by_every_command(trained_run, tmp_path):
    run = crafted(trained_run, tmp_path, writer="9.0.0", config={"model.attn_sinks": 4, "log.future": True})
    for args in (["train", "--resume", run], ["inspect", run], ["sample", run]):
        line = refused(run, *args)
        assert "was written by minigpt 9.0.0" in line and f"this minigpt ({OURS}) does not know" in line, args
        assert "model.attn_sinks" in line or "(attn_sinks)" in line, args
    with pytest.raises(UserError, match=r"model settings this minigpt \(.*\) does not know \(model.attn_sinks\)"):
        config_from(run, [], read_only=True)  # the weights may depend on them: not left out


def test_a_value_a_newer_minigpt_accepts_is_its_setting_not_a_typo(trained_run, tmp_path):
    run = crafted(trained_run, tmp_path, writer="9.0.0", config={"model.pos_encoding": "xpos"})
    line = refused(run, "train", "--resume", run)
    assert f"holds a config this minigpt ({OURS}) cannot read (model.pos_encoding must be one of" in line
    assert line.endswith("it was written by minigpt 9.0.0: resume it with minigpt 9.0.0, which wrote it")
    line = refused(run, "sample", run)
    assert f"model config this minigpt ({OURS}) cannot build" in line and "minigpt 9.0.0" in line


@pytest.mark.parametrize("version, writer, expected", [
    (3, "9.0.0", "is a newer checkpoint (format 3, written by minigpt 9.0.0); this minigpt ({ours}) reads format 2: "
                 "upgrade minigpt, or use it with minigpt 9.0.0, which wrote it"),
    (1, None, "is an older checkpoint (format 1, written by an earlier minigpt (one that did not record its "
              "version)); this minigpt ({ours}) reads format 2: use it with the minigpt that wrote it, or train again "
              "with this one"),
], ids=["newer", "older"])
def test_a_checkpoint_in_another_format_names_both_releases(trained_run, tmp_path, version, writer, expected):
    run = crafted(trained_run, tmp_path, version=version, writer=writer)
    for args in (["train", "--resume", run], ["inspect", run], ["sample", run]):
        assert refused(run, *args) == f"error: {run / 'ckpt.pt'} {expected.format(ours=OURS)}", args


def _rename_head(weights):
    weights["lm_head.weight_v2"] = weights.pop("lm_head.weight")


def test_weights_another_minigpt_named_differently_are_one_line_not_a_runtime_error(trained_run, tmp_path):
    run = crafted(trained_run, tmp_path, writer="0.0.9", weights=_rename_head)
    path = run / "ckpt.pt"
    expected = (f"error: {path}'s weights do not fit the model its config describes (missing lm_head.weight; "
                f"unexpected lm_head.weight_v2); it was written by minigpt 0.0.9, use it with minigpt 0.0.9, which "
                "wrote it, or train again with this one")
    for args in (["sample", run], ["eval", run, "--max-examples", "2"]):
        assert refused(run, *args) == expected, args
    # as a user runs it: a process of its own
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "cli", "sample", str(run)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert (out.returncode, out.stdout, out.stderr) == (2, "", expected + "\n")


def test_a_config_edited_to_disagree_with_the_weights_names_the_shapes(trained_run, tmp_path):
    run = crafted(trained_run, tmp_path, writer=OURS, config={"model.n_embd": 48})
    line = refused(run, "sample", run)
    shapes = r"\(wte\.weight is (\d+)x32 where the model has \1x48, wpe\.weight is 16x32 where the model has 16x48, "
    assert re.search(shapes, line), line
    assert re.search(r"\(and \d+ more\)\); it was", line), line
    assert f"written by minigpt {OURS}, so it was changed since: use an unchanged copy" in line
