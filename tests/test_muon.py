"""optim.name = "muon": Muon (torch's) for the blocks' matrices, AdamW for the rest, as one optimizer: which
parameter goes where, q/k/v orthogonalised apart, it learns, resumes exactly, 2 DDP processes == 1, and one-line
refusals."""

import copy
from dataclasses import replace

import pytest
import torch

import checkpoint
import train
from conftest import read_metrics, tiny_config
from encoder_decoder import EncoderDecoder
from model import GPT, GPTConfig

CPU = torch.device("cpu")
MUON = train.OptimConfig(name="muon", lr=3e-3, muon_lr=0.02)


def split(model, optim=MUON):
    """Names of the parameters the optimizer gives Muon, and those it gives AdamW (each list as often as held)."""
    opt = train.configure_optimizer(model, optim, CPU)
    adamw, muon = opt.optimizers
    names = {id(p): n for n, p in model.named_parameters()}
    return ([names[id(p)] for g in muon.param_groups for p in g["params"]],
            [names[id(p)] for g in adamw.param_groups for p in g["params"]], opt)


@pytest.mark.parametrize("kw", [
    dict(),
    dict(n_kv_head=1, mlp="swiglu", tie_embeddings=False, qk_norm=True, pos_encoding="rope", bias=False),
    dict(n_experts=2, experts_per_token=1),
], ids=["gpt2", "llama-like-untied", "experts"])
def test_muon_takes_exactly_the_blocks_matrices_and_adamw_the_rest(kw):
    model = GPT(GPTConfig(vocab_size=10, block_size=8, n_layer=2, n_head=2, n_embd=8, **kw))
    muon, adamw, opt = split(model)
    all_names = [n for n, _ in model.named_parameters()]  # the tied lm_head is wte: listed once
    assert sorted(muon + adamw) == sorted(all_names)  # each parameter once
    want = [n for n, p in model.named_parameters()
            if n.startswith("blocks.") and p.dim() == 2 and "router" not in n]
    assert sorted(muon) == sorted(want) and want
    assert not any(n.startswith(("wte", "wpe", "lm_head", "ln_f")) or "router" in n for n in muon)
    # the fused q/k/v is orthogonalised per block: q (nh·hs rows), k and v (kvh·hs rows each)
    cfg = model.config
    fused = [g for g in opt.optimizers[1].param_groups if g["row_blocks"]]
    assert len(fused) == 1 and fused[0]["row_blocks"] == [cfg.n_head * cfg.head_size, *[cfg.kv_heads * cfg.head_size] * 2]
    assert fused[0]["params"] == [b.attn.c_attn.weight for b in model.blocks]
    # the same schedule: Muon's groups carry muon_lr / lr, AdamW's none
    assert all(g["lr_scale"] == MUON.muon_lr / MUON.lr for g in opt.optimizers[1].param_groups)
    assert all("lr_scale" not in g for g in opt.optimizers[0].param_groups)


def test_encoder_decoder_muon_takes_both_stacks_matrices_and_splits_cross_kv():
    model = EncoderDecoder(GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=2, n_embd=8,
                                     arch="encoder_decoder"))
    muon, adamw, opt = split(model)
    assert sorted(muon + adamw) == sorted(n for n, _ in model.named_parameters())
    assert sorted(muon) == sorted(n for n, p in model.named_parameters()
                                  if n.startswith(("blocks.", "encoder.")) and p.dim() == 2)
    assert any("cross.c_kv" in n for n in muon) and any(n.startswith("encoder.") for n in muon)
    blocks = sorted(tuple(g["row_blocks"]) for g in opt.optimizers[1].param_groups)
    assert blocks == [(), (8, 8), (8, 8, 8)]  # whole; cross-attention k, v; self-attention q, k, v
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():  # a step with any gradient: every parameter moves, whichever optimizer has it
        p.grad = torch.randn_like(p)
    opt.step()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_fused_qkv_is_orthogonalised_per_block():
    """One step of the fused (nh + 2·kvh)·hs x C matrix == torch's Muon stepping q, k and v as matrices of their
    own; orthogonalising the fused matrix whole would give another update."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=4, n_kv_head=2, n_embd=32))
    opt = train.configure_optimizer(model, MUON, CPU)
    w = model.blocks[0].attn.c_attn.weight
    before = w.detach().clone()
    x = torch.randint(0, 10, (2, 8))
    model(x, x)[1].backward()
    grad = w.grad.clone()
    for g in opt.param_groups:
        g["lr"] = MUON.lr * g.get("lr_scale", 1.0)
    opt.step()
    group = next(g for g in opt.optimizers[1].param_groups if g["row_blocks"])

    def torch_muon(weight, gradient):
        p = torch.nn.Parameter(weight.clone())
        p.grad = gradient.clone()
        torch.optim.Muon([p], lr=group["lr"], weight_decay=group["weight_decay"], momentum=MUON.muon_momentum).step()
        return p.detach()

    rows = [32, 16, 16]  # q: nh·hs, k and v: kvh·hs
    want = torch.cat([torch_muon(wb, gb) for wb, gb in zip(before.split(rows), grad.split(rows))])
    assert torch.equal(w.detach(), want)
    assert not torch.allclose(w.detach(), torch_muon(before, grad), atol=1e-4)  # not as one matrix
    assert opt.state[w]["momentum_buffer"].shape == w.shape  # one buffer per parameter: the checkpoint's keys
    assert all(any(p is q for q in model.parameters()) for p in opt.state)  # no view left behind


def test_batched_step_is_torchs_muon_on_each_block_bit_for_bit():
    """BlockMuon orthogonalises all blocks of one shape as one batch: two steps (momentum included) of every
    matrix (square, tall, wide, and q/k/v blocks of two sizes) == torch's Muon stepping each block as a parameter
    of its own."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=10, block_size=8, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, mlp="swiglu"))
    opt = train.configure_optimizer(model, MUON, CPU)
    muon = opt.optimizers[1]
    for g in opt.param_groups:
        g["lr"] = MUON.lr * g.get("lr_scale", 1.0)
    blocks = [(p, rows or [p.shape[0]], g) for g in muon.param_groups for p in g["params"]
              for rows in [g["row_blocks"]]]
    theirs = [[torch.nn.Parameter(b.detach().clone()) for b in p.split(rows)] for p, rows, _ in blocks]
    reference = [torch.optim.Muon(ps, lr=g["lr"], weight_decay=g["weight_decay"], momentum=MUON.muon_momentum)
                 for ps, (_, _, g) in zip(theirs, blocks)]
    for step in range(2):
        x = torch.randint(0, 10, (2, 8), generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        model(x, x)[1].backward()
        for ps, (p, rows, _) in zip(theirs, blocks):
            for q, grad in zip(ps, p.grad.split(rows)):
                q.grad = grad.clone()
        opt.step()
        for r in reference:
            r.step()
    assert {tuple(b.shape) for ps in theirs for b in ps} == {(32, 32), (16, 32), (128, 32), (32, 128)}
    for ps, (p, _, _) in zip(theirs, blocks):
        assert torch.equal(p.detach(), torch.cat([q.detach() for q in ps]))


def test_a_tiny_model_overfits_one_batch_with_muon():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=20, block_size=16, n_layer=2, n_head=2, n_embd=32))
    opt = train.configure_optimizer(model, MUON, CPU)
    x, y = torch.randint(0, 20, (4, 16)), torch.randint(0, 20, (4, 16))
    for g in opt.param_groups:
        g["lr"] = MUON.lr * g.get("lr_scale", 1.0)
    for _ in range(60):
        loss = model(x, y)[1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert loss.item() < 0.3  # log(20) = 3.0 at the start; AdamW (lr 3e-3 for all) is at 0.29 after 60 steps


def test_resume_is_exact_with_muon(char_data, tmp_path):
    """N steps straight == N/2 steps, a checkpoint, a resume, N/2 steps: loss by loss, weight by weight; the
    checkpoint holds Muon's momentum buffers under the parameters' names beside AdamW's moments."""
    def cfg(out, max_iters):
        return tiny_config(char_data, out, model=dict(n_kv_head=1), train=dict(max_iters=max_iters, eval_interval=3),
                           optim=dict(name="muon", lr_decay_iters=8))

    train.train(cfg(tmp_path / "straight", 8))
    train.train(cfg(tmp_path / "split", 4))
    ckpt = checkpoint.load_checkpoint(tmp_path / "split")
    state = ckpt["optimizer"]["state"]
    assert set(state["blocks.0.attn.c_attn.weight"]) == {"momentum_buffer"}
    assert set(state["wte.weight"]) == {"step", "exp_avg", "exp_avg_sq"}
    train.train(cfg(tmp_path / "split", 8), checkpoint=ckpt)

    def losses(run):
        return [(r["step"], r["loss"], r["lr"]) for r in read_metrics(tmp_path / run) if "loss" in r]

    assert losses("split") == losses("straight")
    assert losses("straight")[-1][1] < losses("straight")[0][1] - 0.3  # and it learns
    a, b = (checkpoint.load_checkpoint(tmp_path / run)["model"] for run in ("straight", "split"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("first,then", [("adamw", "muon"), ("muon", "adamw")])
def test_resuming_with_the_other_optimizer_is_one_line(char_data, tmp_path, first, then):
    from errors import UserError

    def cfg(name, max_iters):
        return tiny_config(char_data, tmp_path / "run", train=dict(max_iters=max_iters, eval_interval=2),
                           optim=dict(name=name))

    train.train(cfg(first, 2))
    with pytest.raises(UserError, match=f'trained with optim.name = "{first}"'):
        train.train(cfg(then, 4), checkpoint=checkpoint.load_checkpoint(tmp_path / "run"))
    assert checkpoint.load_checkpoint(tmp_path / "run")["step"] == 2


def test_muon_follows_the_schedule_scaled_to_muon_lr(char_data, tmp_path, monkeypatch):
    """train_step sets every group's lr from lr_at: AdamW's to it, Muon's to it x muon_lr / lr; and Muon's matrices
    shrink by the same lr x weight_decay per step as AdamW's."""
    made = []
    configure = train.configure_optimizer
    monkeypatch.setattr(train, "configure_optimizer", lambda *a: made.append(configure(*a)) or made[-1])
    cfg = tiny_config(char_data, tmp_path / "run", optim=dict(name="muon", muon_lr=0.05, warmup_iters=4),
                      train=dict(max_iters=2, eval_interval=2))
    train.train(cfg)
    adamw, muon = made[0].optimizers
    lr = train.lr_at(1, cfg.optim, 2)  # the last step's, still in warmup
    assert {g["lr"] for g in adamw.param_groups} == {lr}
    assert all(g["lr"] == pytest.approx(lr * 0.05 / cfg.optim.lr) for g in muon.param_groups)
    assert all(g["lr"] * g["weight_decay"] == pytest.approx(lr * cfg.optim.weight_decay) for g in muon.param_groups)


def test_a_resume_takes_muon_lr_from_the_config_and_the_rest_from_the_checkpoint():
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    from checkpoint import FULL_STATE

    model = GPT(GPTConfig(vocab_size=10, block_size=8, n_layer=1, n_head=2, n_embd=8))
    saved = get_optimizer_state_dict(model, train.configure_optimizer(model, MUON, CPU), options=FULL_STATE)
    resumed = train.configure_optimizer(model, replace(MUON, muon_lr=0.04, muon_momentum=0.9), CPU)
    set_optimizer_state_dict(model, resumed, copy.deepcopy(saved), options=FULL_STATE)
    muon = resumed.optimizers[1].param_groups
    assert all(g["lr_scale"] == 0.04 / MUON.lr and g["momentum"] == MUON.muon_momentum for g in muon)
    assert resumed.optimizers[1].param_groups[0] is resumed.param_groups[2]  # still one set of groups


@pytest.mark.parametrize("kw,message", [
    (dict(muon_lr=0.0), "muon_lr must be in (0, 1]"),
    (dict(muon_lr=float("nan")), "muon_lr must be in (0, 1]"),
    (dict(muon_momentum=1.0), "muon_momentum must be in [0, 1)"),
    (dict(muon_momentum=-0.1), "muon_momentum must be in [0, 1)"),
])
def test_bad_muon_settings_are_one_line_errors(kw, message):
    with pytest.raises(ValueError) as e:
        train.OptimConfig(**kw)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_an_unknown_optimizer_name_is_one_line_naming_the_choices():
    from cli.config_loader import ConfigError, build_config

    with pytest.raises(ConfigError) as e:
        build_config(train.Config, {}, ["optim.name=muom"])
    assert "\n" not in str(e.value) and "adamw" in str(e.value) and "muon" in str(e.value)
    assert build_config(train.Config, {}, ["optim.name=muon"]).optim.name == "muon"


def test_muon_on_a_torch_without_it_is_one_line(monkeypatch):
    monkeypatch.delattr(torch.optim, "Muon")
    with pytest.raises(ValueError) as e:
        train.OptimConfig(name="muon")
    assert "torch >= 2.9" in str(e.value) and "\n" not in str(e.value)
    train.OptimConfig()  # adamw needs no Muon


# ----------------------------------------------------------------------------------------------------
# Under torchrun (gloo, 2 CPU processes), with test_distributed.py's launcher: DDP trains like one process,
# FSDP is refused in one line.


def muon_weights_after(loss_factor: float) -> dict:
    """The weights after 8 Muon steps (the schedule of the runs below) on fixed random batches."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=32))
    optim = train.OptimConfig(name="muon", lr=1e-3, warmup_iters=2, lr_decay_iters=8)
    opt = train.configure_optimizer(model, optim, CPU)
    data = torch.Generator().manual_seed(1)
    for step in range(8):
        x, y = torch.randint(0, 65, (8, 32), generator=data), torch.randint(0, 65, (8, 32), generator=data)
        for group in opt.param_groups:
            group["lr"] = train.lr_at(step, optim, 8) * group.get("lr_scale", 1.0)
        opt.zero_grad(set_to_none=True)
        (model(x, y)[1] * loss_factor).backward()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_muon_turns_last_bit_gradient_differences_into_visible_weight_differences():
    """Why 2 processes match 1 with Muon to 1e-2, not AdamW's 1e-6: Newton-Schulz (in bfloat16, as torch runs it)
    blows a gradient's smallest directions up to the size of its largest, so gradients that differ in their last
    bits (a 1e-7 relative change here; float32 sums in another order under DDP) move the weights apart by ~1e-3
    within 8 steps. A real error (other batches, half the batch) moves them by ~5e-2."""
    a, b = muon_weights_after(1.0), muon_weights_after(1.0 + 1e-7)
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    assert 1e-5 < diff < 5e-3, diff
    assert muon_weights_after(1.0)["blocks.0.attn.c_attn.weight"].equal(a["blocks.0.attn.c_attn.weight"])


def test_two_ddp_processes_train_like_one_with_muon(char_data, tmp_path):
    from test_distributed import max_diffs, train_ok

    muon = {"optim.name": "muon", "model.n_kv_head": 1}
    one = train_ok(1, char_data, tmp_path / "one", tmp_path, **muon)
    two = train_ok(2, char_data, tmp_path / "two", tmp_path, **muon, **{"run.distributed": "ddp"})
    diffs = max_diffs(two, one)  # seen: losses 1.4e-5, weights 2.2e-3 (the test above says why not 1e-6)
    assert max(diffs["loss"], diffs["train_loss"], diffs["val_loss"]) < 1e-4 and diffs["weights"] < 1e-2, diffs


def test_muon_under_fsdp_is_a_one_line_error(char_data, tmp_path):
    from test_distributed import launch, train_args

    r = launch(2, *train_args(char_data, tmp_path / "fsdp", **{"optim.name": "muon", "run.distributed": "fsdp"}),
               cwd=tmp_path, timeout=90)
    assert r.returncode != 0
    errors = [line for line in (r.stdout + r.stderr).splitlines() if line.startswith("error: ")]
    assert errors and all(line == errors[0] for line in errors), r.stdout[-2000:] + r.stderr[-3000:]
    assert 'optim.name = "muon"' in errors[0] and 'run.distributed = "ddp"' in errors[0], errors[0]
    assert not (tmp_path / "fsdp" / "ckpt.pt").exists()
