"""cli/config_loader.py: TOML + overrides -> frozen config dataclasses, one-line errors with suggestions, TOML writer."""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass, field
from typing import Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cli.config_loader as loader
from cli.config_loader import (
    ConfigError,
    build_config,
    config_to_dict,
    config_to_toml,
    format_choices,
    load_config,
    suggest,
)
from errors import UserError

Dtype = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass(frozen=True)
class ModelSec:
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = False
    init_from: str | None = None

    def __post_init__(self):
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")


@dataclass(frozen=True)
class OptimSec:
    lr: float = 6e-4
    weight_decay: float = 0.1
    warmup_iters: int = 100
    max_iters: int | None = None

    def __post_init__(self):
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass(frozen=True)
class RunSec:
    name: str = "run"
    dtype: Dtype = "auto"
    compile: bool = True
    out_dir: str = "out"


@dataclass(frozen=True)
class Config:
    model: ModelSec = field(default_factory=ModelSec)
    optim: OptimSec = field(default_factory=OptimSec)
    run: RunSec = field(default_factory=RunSec)

    def __post_init__(self):
        if self.optim.warmup_iters > 1000 and self.model.n_layer == 1:
            raise ValueError("warmup_iters > 1000 needs n_layer > 1")


def err(data=None, overrides=()) -> str:
    with pytest.raises(ConfigError) as e:
        build_config(Config, data or {}, overrides)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# --- building and coercion ---------------------------------------------------------------------------


def test_defaults_and_partial_sections():
    assert build_config(Config, {}) == Config()
    cfg = build_config(Config, {"optim": {"lr": 1e-3}})
    assert cfg.optim == OptimSec(lr=1e-3) and cfg.model == ModelSec() and cfg.run == RunSec()
    assert isinstance(ConfigError("x"), UserError)


def test_override_values_are_parsed_by_field_type():
    cfg = build_config(
        Config,
        {},
        [
            "optim.lr=1",
            "optim.weight_decay=6e-4",
            "optim.warmup_iters=1_000",
            "optim.max_iters=5000",
            "model.bias=YES",
            "run.compile=0",
            "run.name='my run'",
            'run.out_dir="x"',
            "run.dtype=bfloat16",
            " model.dropout = 0.25 ",
        ],
    )
    assert cfg.optim.lr == 1.0 and type(cfg.optim.lr) is float
    assert cfg.optim.weight_decay == 6e-4
    assert cfg.optim.warmup_iters == 1000 and type(cfg.optim.warmup_iters) is int
    assert cfg.optim.max_iters == 5000
    assert cfg.model.bias is True and cfg.run.compile is False
    assert cfg.run.name == "my run" and cfg.run.out_dir == "x"
    assert cfg.run.dtype == "bfloat16" and cfg.model.dropout == 0.25


@pytest.mark.parametrize("word, expected", [("true", True), ("False", False), ("1", True), ("no", False), ("Yes", True)])
def test_bool_words(word, expected):
    assert build_config(Config, {}, [f"run.compile={word}"]).run.compile is expected


def test_optional_none_and_quoted_none():
    cfg = build_config(Config, {"optim": {"max_iters": 10}, "model": {"init_from": "a"}}, ["optim.max_iters=none"])
    assert cfg.optim.max_iters is None
    assert build_config(Config, {}, ["model.init_from=NULL"]).model.init_from is None
    assert build_config(Config, {}, ['model.init_from="none"']).model.init_from == "none"
    assert build_config(Config, {"optim": {"max_iters": None}}).optim.max_iters is None  # from JSON
    assert "optim.max_iters expects an int or none, got 'lots'" in err(overrides=["optim.max_iters=lots"])


def test_later_override_wins_and_overrides_beat_data():
    cfg = build_config(Config, {"optim": {"lr": 0.5}}, ["optim.lr=0.1", "optim.lr=0.2"])
    assert cfg.optim.lr == 0.2


def test_toml_int_for_float_is_converted():
    cfg = build_config(Config, {"optim": {"lr": 1}})
    assert cfg.optim.lr == 1.0 and type(cfg.optim.lr) is float


def test_toml_type_errors():
    assert err({"optim": {"lr": "abc"}}) == "optim.lr expects a float, got 'abc' (str)"
    msg = err({"model": {"n_layer": True}})
    assert "model.n_layer expects an int, got True (bool)" in msg
    assert "model.n_layer expects an int, got 2.0 (float); write 2" in err({"model": {"n_layer": 2.0}})
    assert "optim.lr expects a float, got True (bool)" in err({"optim": {"lr": True}})
    assert "run.compile expects a bool (true/false), got 1 (int)" in err({"run": {"compile": 1}})
    assert "run.name expects a string, got 3 (int); put it in quotes" in err({"run": {"name": 3}})
    assert "model.n_layer expects an int, got None" in err({"model": {"n_layer": None}})


def test_override_type_errors():
    assert "model.n_layer expects an int, got '6.0'; write 6" in err(overrides=["model.n_layer=6.0"])
    assert "model.n_layer expects an int, got 'six'" in err(overrides=["model.n_layer=six"])
    assert "optim.lr expects a float, got 'fast'" in err(overrides=["optim.lr=fast"])
    assert "run.compile expects a bool (true/false), got 'maybe'" in err(overrides=["run.compile=maybe"])


def test_literal_choices_and_suggestion():
    msg = err(overrides=["run.dtype=bf16"])
    assert msg == "run.dtype must be one of auto, float32, bfloat16, float16; got 'bf16' (did you mean 'bfloat16'?)"
    assert "got 'fp8'" in err({"run": {"dtype": "fp8"}})
    assert "did you mean" not in err({"run": {"dtype": "fp8"}})


def test_unknown_key_and_section_suggestions():
    assert err({"optim": {"learning_rate": 1}}) == "unknown key 'optim.learning_rate' (did you mean 'optim.lr'?)"
    assert "unknown key 'optim.wieght_decay' (did you mean 'optim.weight_decay'?)" in err(overrides=["optim.wieght_decay=0"])
    # the key exists in another section
    assert "unknown key 'model.lr' (did you mean 'optim.lr'?)" in err({"model": {"lr": 1.0}})
    # nothing close: list the section's keys
    msg = err(overrides=["run.zzz=1"])
    assert msg == "unknown key 'run.zzz'; keys in [run] are: name, dtype, compile, out_dir"
    msg = err({"modle": {}})
    assert msg == "unknown section 'modle' (did you mean 'model'?); sections are: model, optim, run"
    assert "unknown section 'xyz'; sections are: model, optim, run" in err(overrides=["xyz.a=1"])
    msg = err({"lr": 0.1})  # a key outside any [section]
    assert "key 'lr' must be inside a [section] (did you mean 'optim.lr'?)" in msg
    assert "'model' must be a [model] table" in err({"model": 3})


@pytest.mark.parametrize("bad, detail", [("optim.lr", "no '='"), ("lr=1", "needs a section"), ("=1", "empty key"), (".lr=1", "empty")])
def test_override_syntax_errors(bad, detail):
    msg = err(overrides=[bad])
    assert repr(bad) in msg and "--set section.key=value" in msg and detail in msg
    assert "(did you mean 'optim.lr=1'?)" in err(overrides=["lr=1"])


def test_post_init_errors_become_config_errors():
    assert err(overrides=["model.n_embd=100"]) == "invalid [model]: n_embd (100) must be divisible by n_head (6)"
    assert err({"optim": {"lr": -1}}) == "invalid [optim]: lr must be > 0, got -1.0"
    msg = err({"optim": {"warmup_iters": 2000}, "model": {"n_layer": 1}})
    assert msg == "invalid config: warmup_iters > 1000 needs n_layer > 1"


@dataclass(frozen=True)
class Req:
    vocab_size: int
    depth: int = 2


@dataclass(frozen=True)
class Top:  # a required section, and a section whose top-level default differs from its class defaults
    req: Req
    opt: OptimSec = field(default_factory=lambda: OptimSec(lr=0.5))


def test_required_fields_and_top_level_defaults():
    cfg = build_config(Top, {"req": {"vocab_size": 7}}, ["opt.warmup_iters=3"])
    assert cfg == Top(Req(7), OptimSec(lr=0.5, warmup_iters=3))  # the top-level default is the base
    with pytest.raises(ConfigError, match=r"missing key 'req.vocab_size'"):
        build_config(Top, {"req": {"depth": 3}})
    with pytest.raises(ConfigError, match=r"missing section \[req\]"):
        build_config(Top, {})


def test_helpers():
    assert format_choices(["a", "b"]) == "a, b"
    assert suggest("learning_rate", ["lr", "beta1"]) == " (did you mean 'lr'?)"
    assert suggest("qqq", ["lr"]) == ""
    with pytest.raises(TypeError):
        build_config(Config, {}, "optim.lr=1")  # one string, not a list


# --- files -------------------------------------------------------------------------------------------


def test_load_config_reads_toml_and_overrides(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('[optim]\nlr = 3e-4\n\n[run]\ndtype = "float16"\n')
    cfg = load_config(Config, p, ["optim.warmup_iters=7"])
    assert cfg == Config(optim=OptimSec(lr=3e-4, warmup_iters=7), run=RunSec(dtype="float16"))


def test_toml_syntax_error_names_file_and_line(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[optim]\nlr = 1\nwarmup_iters = \n")
    with pytest.raises(ConfigError) as e:
        load_config(Config, p)
    msg = str(e.value)
    assert str(p) in msg and "line 3" in msg and "invalid TOML" in msg


def test_missing_file_lists_shipped_configs(tmp_path, monkeypatch):
    shipped = tmp_path / "config"
    shipped.mkdir()
    for name in ("debug.toml", "gpt2.toml"):
        (shipped / name).write_text("")
    monkeypatch.setattr(loader, "CONFIG_DIR", shipped)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        load_config(Config, "debg.toml")
    msg = str(e.value)
    assert msg.startswith("config file 'debg.toml' not found (did you mean 'config/debug.toml'?)")
    assert "the shipped configs are in config/: debug.toml, gpt2.toml" in msg
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(Config, shipped)


def test_not_utf8(tmp_path):
    p = tmp_path / "bin.toml"
    p.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(Config, p)


# --- writing and round trips -------------------------------------------------------------------------


def test_toml_text_round_trip():
    text = '[model]\nn_layer = 2\nn_head = 2\nn_embd = 8\n\n[optim]\nlr = 6e-4\nwarmup_iters = 1\n\n[run]\nname = "a \\"b\\"\\n"\n'
    cfg = build_config(Config, tomllib.loads(text))
    out = config_to_toml(cfg)
    assert "lr = 0.0006\n" in out and "dropout = 0.0\n" in out and "bias = false\n" in out
    assert "max_iters" not in out and "init_from" not in out  # None is left out
    assert build_config(Config, tomllib.loads(out)) == cfg
    assert cfg.run.name == 'a "b"\n'


def test_dict_keeps_none_and_round_trips_via_json():
    cfg = Config()
    d = config_to_dict(cfg)
    assert d["optim"]["max_iters"] is None and d["run"]["dtype"] == "auto"
    assert build_config(Config, json.loads(json.dumps(d))) == cfg


_finite_or_inf = st.floats(allow_nan=False, width=64)


@st.composite
def configs(draw):
    n_head = draw(st.integers(1, 16))
    model = ModelSec(
        n_layer=draw(st.integers(-(2**63), 2**63 - 1)),
        n_head=n_head,
        n_embd=n_head * draw(st.integers(0, 1000)),
        dropout=draw(_finite_or_inf),
        bias=draw(st.booleans()),
        init_from=draw(st.none() | st.text()),
    )
    optim = OptimSec(
        lr=draw(st.floats(min_value=0, exclude_min=True)),
        weight_decay=draw(_finite_or_inf),
        warmup_iters=draw(st.integers(0, 1000)),
        max_iters=draw(st.none() | st.integers(-(2**63), 2**63 - 1)),
    )
    run = RunSec(name=draw(st.text()), dtype=draw(st.sampled_from(["auto", "float32", "bfloat16", "float16"])), compile=draw(st.booleans()), out_dir=draw(st.text(max_size=3)))
    return Config(model=model, optim=optim, run=run)


@settings(max_examples=200, deadline=None)
@given(configs())
def test_property_round_trip(cfg):
    back = build_config(Config, tomllib.loads(config_to_toml(cfg)))
    assert back == cfg
    for sec in ("model", "optim"):
        for k, v in config_to_dict(back)[sec].items():
            assert type(v) is type(getattr(getattr(cfg, sec), k))
    assert build_config(Config, config_to_dict(cfg)) == cfg
    # every field also round-trips as a --set override when written the way the TOML writer writes it
    if not math.isinf(cfg.optim.weight_decay):
        assert build_config(Config, {}, [f"optim.weight_decay={cfg.optim.weight_decay!r}"]).optim.weight_decay == cfg.optim.weight_decay
