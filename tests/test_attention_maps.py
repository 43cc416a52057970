"""`minigpt attention`: head metrics against hand-built heads and a direct numpy computation, rollout, the captured
maps against the model's own reference attention (GPT and encoder-decoder, every mask), the self-contained page (no
network; decoded by its own script under node where node is installed), the command end to end, and every bad input
as one error line with exit code 2 and nothing written."""

import json
import math
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import attention_html
import attention_maps as am
from cli.main import app
from conftest import tiny_config
from encoder_decoder import EncoderDecoder
from model import GPT, GPTConfig


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def causal(T):
    return np.tri(T, dtype=bool)


def uniform(allowed):
    return allowed / allowed.sum(axis=1, keepdims=True)


def masks_of(**model):
    """The (T, T) mask a GPT with these settings attends with, read from its own attention_inputs."""
    cfg = GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_embd=8, **model)
    pos = torch.arange(8)
    from model import attention_inputs
    return am.allowed_keys(attention_inputs(cfg, pos, None, cfg.prefix_len, torch.ones(2)), 8, 8)


# ----------------------------------------------------------------------------------------------------
# metrics


def test_a_previous_token_head_scores_one_with_entropy_zero():
    T = 8
    w = np.zeros((T, T))
    w[0, 0] = 1.0
    w[np.arange(1, T), np.arange(T - 1)] = 1.0
    m = am.head_metrics(w, causal(T))
    assert m["previous_token"] == 1.0 and m["entropy"] == 0.0 and m["mean_distance"] == 1.0
    assert m["sink"] == pytest.approx(1 / 7)  # only query 1's previous token is the first
    assert m["induction"] is None and am.head_label(m) == "previous-token"


@pytest.mark.parametrize("model", [{}, {"attn_window": 3}, {"attn_mask": "prefix", "prefix_len": 4},
                                   {"attn_mask": "bidirectional"}, {"pos_encoding": "alibi", "attn_window": 5}],
                         ids=["causal", "window", "prefix", "bidirectional", "alibi-window"])
def test_a_uniform_head_has_normalised_entropy_one_under_every_mask(model):
    allowed = masks_of(**model)
    m = am.head_metrics(uniform(allowed), allowed)
    assert m["entropy"] == pytest.approx(1.0, abs=1e-12)
    assert am.head_label(m) == "broad"
    if "attn_window" in model:  # the window really cuts keys off, and they count as not seen, not as zero
        assert allowed.sum(axis=1).max() == model["attn_window"]


def test_an_induction_head_on_the_probe_scores_one():
    ids = am.induction_probe(vocab_size=50, length=16)
    n = 8
    assert ids[:n] == ids[n:] and len(set(ids[:n])) == n
    w = np.eye(16)
    w[np.arange(n, 16)] = 0.0
    w[np.arange(n, 16), np.arange(n, 16) - n + 1] = 1.0
    m = am.head_metrics(w, causal(16), period=n)
    assert m["induction"] == 1.0 and am.head_label(m) == "induction"
    assert am.head_metrics(np.eye(16), causal(16), period=n)["induction"] == 0.0


def test_metrics_agree_with_a_direct_computation():
    rng = np.random.default_rng(0)
    T, period = 6, 3
    allowed = masks_of(attn_window=3)[:T, :T]
    logits = np.where(allowed, rng.normal(size=(T, T)) * 2, -np.inf)
    w = np.exp(logits - logits.max(axis=1, keepdims=True))
    w /= w.sum(axis=1, keepdims=True)
    m = am.head_metrics(w, allowed, period=period)
    ent, dist, sink = [], [], []
    for t in range(T):
        seen = [s for s in range(T) if allowed[t, s]]
        if len(seen) < 2:
            continue
        ent.append(-sum(w[t, s] * math.log(w[t, s]) for s in seen) / math.log(len(seen)))
        dist.append(sum(w[t, s] * abs(t - s) for s in seen))
        sink.append(w[t, 0])
    assert m["entropy"] == pytest.approx(np.mean(ent), abs=1e-12)
    assert m["mean_distance"] == pytest.approx(np.mean(dist), abs=1e-12)
    assert m["sink"] == pytest.approx(np.mean(sink), abs=1e-12)
    assert m["previous_token"] == pytest.approx(np.mean([w[t, t - 1] for t in range(1, T)]), abs=1e-12)
    assert m["induction"] == pytest.approx(np.mean([w[t, t - period + 1] for t in range(period, T)]), abs=1e-12)
    assert 0 < m["entropy"] < 1


def test_rollout_rows_sum_to_one_and_follow_the_formula():
    rng = np.random.default_rng(1)
    L, H, T = 3, 2, 5
    w = rng.random((L, H, T, T)) * causal(T)
    w /= w.sum(axis=-1, keepdims=True)
    r = am.rollout(w)
    assert r.shape == (L, T, T)
    np.testing.assert_allclose(r.sum(axis=-1), 1.0, atol=1e-12)
    steps = [0.5 * w[i].mean(axis=0) + 0.5 * np.eye(T) for i in range(L)]
    np.testing.assert_allclose(r[-1], steps[2] @ steps[1] @ steps[0], atol=1e-12)
    assert np.all(r[-1][~causal(T)] == 0)  # nothing flows from the future
    np.testing.assert_allclose(am.aggregate(w, "max")[1], w[1].max(axis=0))


# ----------------------------------------------------------------------------------------------------
# capture: the model's own reference attention, every mask


@pytest.mark.parametrize("model", [
    dict(n_kv_head=1, pos_encoding="rope", attn_window=4, qk_norm=True),
    dict(pos_encoding="alibi", attn_mask="prefix", prefix_len=3, norm_placement="post"),
    dict(attn_mask="bidirectional", n_kv_head=2, n_head=4),
], ids=["gqa-rope-window", "alibi-prefix-postnorm", "bidirectional-gqa"])
def test_captured_maps_are_the_models_reference_maps_and_masked_keys_get_nothing(model):
    torch.manual_seed(0)
    cfg = GPTConfig(**{"vocab_size": 13, "block_size": 10, "n_layer": 2, "n_head": 2, "n_embd": 16, **model})
    gpt = GPT(cfg).eval()
    ids = [1, 5, 2, 7, 3, 3, 8, 0, 4]
    stack, hidden = am.capture_decoder(gpt, ids)
    expected = torch.stack([m[0] for m in gpt.attention_maps(torch.tensor([ids]))]).numpy()
    np.testing.assert_allclose(stack.weights, expected, atol=1e-6)
    assert np.all(stack.weights[..., ~stack.allowed] == 0)
    np.testing.assert_allclose(stack.weights.sum(-1), 1.0, atol=1e-5)
    lens = am.logit_lens(gpt, hidden, torch.arange(13))
    assert lens.shape == (3, len(ids), 13)
    logits = gpt(torch.tensor([ids]))[0][0, :, :13]
    np.testing.assert_allclose(lens[-1], torch.softmax(logits, -1).detach().numpy(), atol=1e-5)
    if cfg.n_kv_head:
        assert [stack.kv_group(h) for h in range(cfg.n_head)] == [h // (cfg.n_head // cfg.kv_heads)
                                                                for h in range(cfg.n_head)]


def test_encoder_decoder_stacks_match_its_decoder_and_cross_attention_reads_every_source_token():
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=13, block_size=8, n_layer=2, n_head=2, n_kv_head=1, n_embd=16, arch="encoder_decoder",
                    n_encoder_layer=3, source_block_size=6, attn_window=3)
    model = EncoderDecoder(cfg).eval()
    source, target = [3, 4, 5, 6, 7], [12, 1, 2, 9]
    (enc, dec, cross), hidden = am.capture_encoder_decoder(model, source, target)
    assert enc.weights.shape == (3, 2, 5, 5) and enc.allowed.all()
    assert dec.weights.shape == (2, 2, 4, 4) and not dec.allowed[3, 0]  # the window
    assert cross.weights.shape == (2, 2, 4, 5) and not cross.self_attention
    with torch.no_grad():
        memory = model.encode(torch.tensor([source]), reference=True)
        logits, maps = model.decode(torch.tensor([target]), model.cross_cache(memory), reference=True)
    np.testing.assert_allclose(cross.weights, torch.stack([m[0] for m in maps]).numpy(), atol=1e-6)
    lens = am.logit_lens(model, hidden, torch.arange(13))
    np.testing.assert_allclose(lens[-1], torch.softmax(logits[0, :, :13], -1).numpy(), atol=1e-5)
    m = am.head_metrics(cross.weights[0, 0], cross.allowed, self_attention=False)
    assert m["previous_token"] is None and m["mean_distance"] is None and 0 < m["entropy"] <= 1


def pairs_run(**model):
    """A LoadedRun as `minigpt sample` has it for a run trained on pairs: random weights, a char tokenizer over
    'abcde', the special tokens after it."""
    import sample
    from pairs import special_tokens
    from tokenization import CharTokenizer

    tok = CharTokenizer("abcde")
    special = special_tokens(tok.vocab_size)
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=tok.vocab_size + 4 + len(special.sentinels), block_size=10, n_layer=2, n_head=2,
                    n_embd=16, **model)
    net = (EncoderDecoder if cfg.arch == "encoder_decoder" else GPT)(cfg).eval()
    allowed = torch.zeros(cfg.vocab_size, dtype=torch.bool)
    allowed[:tok.vocab_size] = True
    allowed[special.eos] = True
    return sample.LoadedRun(net, tok, sample.inference_runtime(net, "cpu"), 0, special, allowed)


def test_an_encoder_decoder_run_is_seen_through_its_three_stacks_with_the_greedy_target():
    run = pairs_run(arch="encoder_decoder", source_block_size=6)
    a = am.analyse(run, "abca")
    enc, dec, cross = a.stacks
    assert a.seq.source == [0, 1, 2, 0] and enc.queries == enc.keys == [0, 1, 2, 0]
    assert dec.queries[0] == run.special.bos and a.labels(dec.queries)[0] == "<start>"
    assert cross.queries == dec.queries and cross.keys == enc.queries
    assert [h["stack"] for h in a.heads] == ["encoder"] * 4 + ["decoder"] * 4 + ["cross"] * 4
    assert a.lens.shape == (3, len(dec.queries), 6) and a.labels([a.vocab[-1]]) == ["<end>"]  # 5 letters and <end>
    given = am.analyse(run, "abca", target="ed")
    assert given.seq.ids == [run.special.bos, 4, 3]
    with pytest.raises(am.UserError, match="longer than the 6 the model can attend to at once"):
        am.analyse(run, "abcdeab")
    with pytest.raises(am.UserError, match="--target is 10 tokens, longer than the 9"):
        am.analyse(run, "ab", target="a" * 10)


def test_a_decoder_only_pairs_run_reads_source_sep_target_with_the_source_as_its_prefix():
    run = pairs_run(attn_mask="prefix")
    a = am.analyse(run, "abc", target="cb")
    (s,) = a.stacks
    assert a.labels(s.queries) == ["a", "b", "c", "<sep>", "c", "b"]
    assert s.prefix == 4 and s.allowed[0, 3] and not s.allowed[3, 4]  # source and <sep> see each other
    np.testing.assert_allclose(s.weights[..., ~s.allowed], 0)


# ----------------------------------------------------------------------------------------------------
# the page

NETWORK = re.compile(r"(?:src|href|action)\s*=|https?:|//[a-z0-9.-]+\.[a-z]{2,}/|url\(|@import|<link|<iframe|import\(",
                     re.IGNORECASE)

# Runs the page's own script against a small stand-in for the DOM, hovers query 3 of a picked head and prints what
# the page shows for it.
NODE_DRIVER = r"""
const fs = require("fs"), vm = require("vm");
const html = fs.readFileSync(process.argv[2], "utf8");
const script = html.match(/<script>([\s\S]*?)<\/script>/)[1];
const data = html.match(/<script type="application\/json" id="data">([\s\S]*?)<\/script>/)[1];
class El {
  constructor(tag) {
    this.tag = tag; this.children = []; this.style = {}; this.dataset = {}; this.on = {}; this.text = "";
    const set = new Set(); this.classList = { add: (...c) => c.forEach((x) => set.add(x)),
      remove: (...c) => c.forEach((x) => set.delete(x)), toggle: (c, on) => (on ? set.add(c) : set.delete(c)),
      contains: (c) => set.has(c) }; this.rows = []; }
  set innerHTML(v) { this.children = []; this.rows = []; }
  set textContent(v) { this.text = String(v); } get textContent() { return this.text; }
  appendChild(c) { this.children.push(c); return c; }
  addEventListener(k, f) { this.on[k] = f; }
  getContext() { return { createImageData: (w, h) => ({ data: new Uint8ClampedArray(4 * w * h) }),
                          putImageData: (img) => { this.image = img; } }; }
  insertRow() {
    const r = new El("tr");
    r.cells = []; r.insertCell = () => { const c = new El("td"); r.cells.push(c); return c; };
    this.rows.push(r); return r;
  }
  insertAdjacentText(where, text) { throw new Error(text); }
}
const els = {};
const document = { getElementById: (id) => (els[id] ??= new El(id)), createElement: (t) => new El(t),
                   querySelectorAll: () => els.thumbs.children.filter((c) => c.tag === "canvas"),
                   body: new El("body") };
document.getElementById("data").textContent = data;
const sandbox = { document, atob, Blob, Response, DecompressionStream, console, setTimeout };
vm.createContext(sandbox);
vm.runInContext(script + "\nglobalThis.__page = { state, stacks, selectHead, showQuery };", sandbox);
(function wait() {
  if (!els.layer || els.layer.children.length === 0) return setTimeout(wait, 5);
  const page = sandbox.__page;
  page.state.layer = 1; page.state.head = 1; page.selectHead();
  els.keys.children[3].on.mouseenter();
  const thumbs = els.thumbs.children.filter((c) => c.tag === "canvas").length;
  console.log(JSON.stringify({ top: els.top.rows.map((r) => r.cells.map((c) => c.text)), thumbs,
                               masked: els.keys.children.filter((c) => c.classList.contains("masked")).length,
                               scores: els.scores.text }));
})();
"""


def test_the_page_is_self_contained_and_shows_the_hovered_tokens_weights(tmp_path):
    rng = np.random.default_rng(2)
    L, H, T = 2, 3, 7
    allowed = causal(T)
    w = rng.random((L, H, T, T)) * allowed
    w /= w.sum(axis=-1, keepdims=True)
    stack = am.Stack("decoder", w.astype(np.float32), allowed, list(range(T)), list(range(T)), H)
    heads = [{"stack": "decoder", "layer": i, "head": h, "entropy": 0.5, "mean_distance": 1.0, "previous_token": 0.25,
              "sink": 0.1, "induction": None, "label": None} for i in range(L) for h in range(H)]
    labels = ["<a href='https://x.org'>", "</script>", " the", "\n", "é", "b", "c"]
    html = attention_html.render([stack], heads, lambda ids: [labels[i] for i in ids], title="run")
    assert not NETWORK.search(html.replace(json.dumps(labels[0])[1:-1], "")), NETWORK.search(html)
    assert html.count("</script>") == 2  # the label cannot end the data early
    path = tmp_path / "attention.html"
    path.write_text(html, encoding="utf-8")
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the page's script is not run")
    driver = tmp_path / "driver.js"
    driver.write_text(NODE_DRIVER)
    r = subprocess.run([node, str(driver), str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    assert shown["thumbs"] == L * H and shown["masked"] == T - 4
    keys = [int(row[0].split()[1]) for row in shown["top"]]
    values = [float(row[2]) for row in shown["top"]]
    expected = (np.rint(255 * np.sqrt(w[1, 1, 3, :4])) / 255) ** 2  # what the page stores: sqrt, 255 levels
    assert keys == list(np.argsort(-expected))  # every key the query sees, most attended first
    np.testing.assert_allclose(values, expected[keys], atol=5e-5)  # printed to 4 decimals
    np.testing.assert_allclose(values, w[1, 1, 3, keys], atol=0.004)  # the quantisation's error
    assert "previous-token 0.250" in shown["scores"]


def test_a_12_layer_12_head_page_at_256_tokens_stays_under_5_mb():
    """Noisy attention (random logits) is the hardest to compress; the budget holds for it too."""
    rng = np.random.default_rng(3)
    L, H, T = 12, 12, 256
    allowed = causal(T)
    logits = np.where(allowed, rng.normal(size=(L, H, T, T)).astype(np.float32), -np.inf)
    w = np.exp(logits - logits.max(axis=-1, keepdims=True))
    w /= w.sum(axis=-1, keepdims=True)
    stack = am.Stack("decoder", w, allowed, list(range(T)), list(range(T)), H)
    html = attention_html.render([stack], [], lambda ids: [f"t{i}" for i in ids])
    assert len(html.encode()) < 5_000_000


# ----------------------------------------------------------------------------------------------------
# the command


@pytest.fixture(scope="module")
def run_dir(char_data, tmp_path_factory):
    import train

    out = tmp_path_factory.mktemp("attention") / "run"
    train.train(tiny_config(char_data, out, model=dict(n_head=4, n_kv_head=2),
                            train=dict(max_iters=1, eval_interval=1, eval_iters=1), log=dict(interval=100)))
    return out


def test_the_command_writes_every_file_and_the_tables(run_dir, tmp_path):
    out = tmp_path / "maps"
    r = CliRunner().invoke(app, ["attention", str(run_dir), "--probe", "induction", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert {p.name for p in out.iterdir()} == {"attention.png", "attention.svg", "attention.html", "heads.json",
                                               "lens.png"}
    heads = json.loads((out / "heads.json").read_text())
    assert [(h["layer"], h["head"], h["kv_group"]) for h in heads] == [(i, h, h // 2) for i in range(2)
                                                                       for h in range(4)]
    for h in heads:
        assert {"layer", "head", "entropy", "mean_distance", "previous_token", "sink", "induction",
                "label"} <= set(h)
        assert 0 <= h["entropy"] <= 1 and h["induction"] is not None
    lines = r.stdout.splitlines()
    assert lines[0].split()[:5] == ["stack", "layer", "head", "kv", "entropy"] and len(lines) > 8
    assert any(line.startswith("logit lens") for line in lines)
    assert [line.split()[0] for line in lines if line.strip().startswith(("embed", "L0", "L1"))] == ["embed", "L0",
                                                                                                    "L1"]
    one = CliRunner().invoke(app, ["attention", str(run_dir), "--prompt", "ROMEO:", "--out", str(tmp_path / "one"),
                                   "--layer", "1", "--head", "3", "--checkpoint", "best", "--device", "cpu"])
    assert one.exit_code == 0, one.output
    rolled = CliRunner().invoke(app, ["attention", str(run_dir), "--prompt", "KING:", "--out", str(tmp_path / "r"),
                                      "--aggregate", "rollout"])
    assert rolled.exit_code == 0, rolled.output


BAD = {
    "no checkpoint": (["{empty}", "--prompt", "hi"], "no checkpoint"),
    "empty prompt": (["{run}", "--prompt", ""], "the prompt is empty"),
    "prompt and probe": (["{run}", "--prompt", "hi", "--probe", "induction"], "not --prompt and --probe"),
    "too long": (["{run}", "--prompt", "ROMEO: " * 3], "longer than the 16 the model can attend to at once"),
    "layer out of range": (["{run}", "--prompt", "hi", "--layer", "2"], "--layer 2 is out of range"),
    "head out of range": (["{run}", "--prompt", "hi", "--head", "-1"], "--head -1 is out of range"),
    "out is a file": (["{run}", "--prompt", "hi", "--out", "{file}"], "is a file, not a folder"),
    "bad aggregate": (["{run}", "--prompt", "hi", "--aggregate", "sum"], "--aggregate takes mean | max | rollout"),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(run_dir, tmp_path, case):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("x")
    args, expected = BAD[case]
    args = [a.format(run=run_dir, empty=tmp_path / "empty", file=tmp_path / "file") for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    before = sorted(p.name for p in run_dir.iterdir())
    r = CliRunner().invoke(app, ["attention", *args])
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], r.stderr
    assert r.stdout == "" and not (tmp_path / "out").exists() and (tmp_path / "file").read_text() == "x"
    assert sorted(p.name for p in run_dir.iterdir()) == before
