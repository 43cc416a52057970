"""Muon for the hidden matrices, AdamW for the rest, as one optimizer (`optim.name = "muon"`).

Muon (Jordan 2024; torch.optim.Muon) replaces each 2-D update by its nearest semi-orthogonal matrix (a few
Newton-Schulz iterations on the momentum), so every direction of a matrix moves alike. It suits the hidden
layers' matrices only: embeddings are lookups, not linear maps of a hidden state; the output layer and the
experts' router turn a hidden state into scores of single tokens (experts); norms and biases are vectors. AdamW
keeps those. Both live in one `MuonWithAdamW`, so the training loop, GradScaler and the checkpoint's
`get_optimizer_state_dict` / `set_optimizer_state_dict` see a single optimizer, its state keyed by parameter name.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch


def closure_loss(closure):
    """What torch's optimizers do with step()'s closure: evaluate it with gradients on and return its loss."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class BlockMuon(torch.optim.Muon):
    """torch's Muon, where a group may name `row_blocks` (row counts summing to each of its matrices' rows): each
    block of rows is orthogonalised (and its lr adjusted to its shape) as a matrix of its own.

    The fused q/k/v projection ((nh + 2·kvh)·hs × C) is three linear maps stacked for speed, not one: orthogonalised
    whole, the three would share one spectral budget (a large query gradient would shrink the keys' and values'
    update) and GQA's differently sized blocks would mix, so we orthogonalise q, k and v apart, as modded-nanogpt
    does. The momentum buffer stays one tensor per parameter (the checkpoint does not change).

    The step is torch's (`_single_tensor_muon`: the same momentum, weight decay, bfloat16 Newton-Schulz and lr
    adjustment, bit for bit), except that the Newton-Schulz iterations of all blocks of one shape (a tall block
    transposed, as torch does) run as one batch: on a small model they are most of Muon's time, and a batched
    product per iteration costs less than one small product per block (at nanoGPT's CPU shapes, on one core of a
    shared machine, Muon's step took ~27 ms one matrix at a time and ~23 ms batched). Our groups leave torch's
    adjust_lr_fn at its default, so the lr of a rows × cols block is scaled by √max(1, rows / cols), as there."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            by_shape = defaultdict(list)  # a wide shape -> the (weight block, update block) pairs of that shape
            for p in group["params"]:
                if p.grad is None:
                    continue
                buffer = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                buffer.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buffer, momentum) if group["nesterov"] else buffer
                p.mul_(1 - lr * group["weight_decay"])
                rows = group.get("row_blocks") or [p.shape[0]]
                for w, u in zip(p.detach().split(rows), update.split(rows)):
                    by_shape[min(w.shape), max(w.shape)].append((w, u))
            for blocks in by_shape.values():
                updates = torch.stack([u if u.shape[0] <= u.shape[1] else u.T for _, u in blocks])
                ortho = newton_schulz(updates, group["ns_coefficients"], group["ns_steps"], group["eps"])
                for (w, _), o in zip(blocks, ortho):
                    rows, cols = w.shape
                    w.add_(o if rows <= cols else o.T, alpha=-lr * math.sqrt(max(1, rows / cols)))
        return loss


def newton_schulz(updates: torch.Tensor, coefficients: tuple[float, float, float], steps: int,
                  eps: float) -> torch.Tensor:
    """torch's `_zeropower_via_newtonschulz` on a batch of wide matrices (B × rows × cols, rows <= cols): each
    scaled to a Frobenius norm of 1, then `steps` quintic iterations in bfloat16."""
    a, b, c = coefficients
    x = updates.bfloat16()
    x = x / x.norm(dim=(1, 2), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x


class MuonWithAdamW(torch.optim.Optimizer):
    """An AdamW and a Muon as one optimizer: its param_groups are theirs (AdamW's first), its state is theirs (one
    dict shared by both: the parameters are disjoint), step() steps both; state_dict() and load_state_dict() are
    torch's own over the union, so a checkpoint holds both optimizers' state under the usual keys."""

    def __init__(self, adamw: torch.optim.AdamW, muon: torch.optim.Muon):
        self.optimizers = (adamw, muon)
        groups = [group for optimizer in self.optimizers for group in optimizer.param_groups]
        super().__init__(groups, {})  # hooks and the rest of torch's Optimizer machinery
        self._share()

    def _share(self) -> None:
        """Point both optimizers at this one's groups (the same dicts: a new lr reaches them) and state."""
        state = self.state = defaultdict(dict, self.state)  # after load_state_dict: the loaded one
        start = 0
        for optimizer in self.optimizers:
            n = len(optimizer.param_groups)
            optimizer.param_groups = self.param_groups[start:start + n]
            optimizer.state = state
            start += n

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for optimizer in self.optimizers:
            optimizer.step()
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        # a group's lr_scale (train.py: muon_lr / lr) is the config's, not the checkpoint's: a resume may change
        # optim.muon_lr as it may change optim.lr; the other hyperparameters come back from the checkpoint
        scales = [group.get("lr_scale") for group in self.param_groups]
        super().load_state_dict(state_dict)  # new group dicts and state: hand them to both optimizers again
        for group, scale in zip(self.param_groups, scales):
            if scale is not None:
                group["lr_scale"] = scale
        self._share()
