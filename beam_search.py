"""Beam search, top to bottom: the Decoder a model is wrapped in, the Hypothesis it returns, and the search.

Hugging Face's convention: at each step the top 2*beams (row, token) continuations by total log-probability are
considered; those ending in the end token become finished hypotheses, scored logprob / length ** length_penalty,
and up to `beams` others stay live. Unlike Hugging Face, the search stops early only when no live row can still
beat the finished ones, so stopping early never changes the answer.

The model sits behind `Decoder`, so this file knows nothing of KV caches or encoders: the caller wraps its model
in start / step / reorder, and every step decodes all the live rows in one call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch


class Decoder(Protocol):
    """A model decoding `rows` continuations of one source at once, with whatever caches it keeps."""

    def start(self, rows: int) -> torch.Tensor:
        """Prefill; the logits (rows, V) of the first new token, all rows identical."""
        ...

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (rows, 1) long: each row's newest token -> logits (rows, V) of the next."""
        ...

    def reorder(self, rows: torch.Tensor) -> None:
        """rows (rows,) long: row i now continues what row rows[i] held (caches are index_selected)."""
        ...


@dataclass
class Hypothesis:
    tokens: list[int]  # generated ids, without the end token
    logprob: float  # total log-probability of the tokens, the end token included when finished
    score: float  # logprob / length ** length_penalty (length = generated tokens, end token included)
    finished: bool  # ended with the end token (else it hit max_new_tokens)


def beam_search(decoder: Decoder, beams: int, max_new_tokens: int, eos: int,
                length_penalty: float = 1.0) -> list[Hypothesis]:
    """The `beams` best hypotheses, best first."""
    if beams < 1:
        raise ValueError(f"beams must be >= 1, got {beams}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")

    def score(logprob: float, length: int) -> float:
        return logprob / length**length_penalty

    def best_possible(live: Hypothesis, length: int) -> float:
        """The highest score any continuation of a live hypothesis of `length` tokens can reach."""
        # Log-probabilities only fall: the final logprob is <= live.logprob <= 0, and the final length is in
        # [length + 1, max_new_tokens]. A score <= 0 is highest where length ** length_penalty is largest: the
        # longest length when the penalty is > 0, the shortest when it is < 0 (when it is 0 the length is moot).
        return score(live.logprob, max_new_tokens if length_penalty > 0 else length + 1)

    # Rows of the decoder past len(live) are padding: they repeat a live row, and their logits are never read.
    # At the start every row holds the same source, so only row 0 is live (else one token would be chosen `beams`
    # times over).
    live = [Hypothesis([], 0.0, 0.0, False)]
    done: list[Hypothesis] = []  # finished hypotheses, then at max_new_tokens the unfinished ones
    logits = decoder.start(beams)
    for length in range(1, max_new_tokens + 1):
        logprobs = torch.log_softmax(logits[:len(live)].float(), dim=-1)  # (live, V)
        logprobs = logprobs.masked_fill(logprobs.isnan(), -math.inf)  # a row of only -inf logits gives NaN
        # Any of the best 2*beams continuations is among its own row's best 2*beams tokens, so only those leave
        # the device. A stable sort breaks ties toward the lower token id, as argmax does (beams=1 is greedy).
        k = min(2 * beams, logprobs.size(-1))
        row_logprobs, row_tokens = logprobs.sort(dim=-1, descending=True, stable=True)
        row_logprobs, row_tokens = row_logprobs[:, :k].double().cpu(), row_tokens[:, :k].cpu()  # (live, k)
        totals = torch.tensor([h.logprob for h in live], dtype=torch.float64)[:, None] + row_logprobs  # (live, k)
        order = totals.flatten().sort(descending=True, stable=True).indices[:2 * beams].tolist()
        # A -inf continuation is impossible (a masked token): taken only when nothing possible is left at all.
        take_impossible = not done and totals.max().item() == -math.inf
        next_live: list[Hypothesis] = []
        rows: list[int] = []  # the row each next live hypothesis continues
        for rank, i in enumerate(order):
            row, col = divmod(i, k)
            total, token = totals[row, col].item(), row_tokens[row, col].item()
            if total == -math.inf and not take_impossible:
                break  # sorted: the rest are impossible too
            if token == eos:
                # Hugging Face's rule: an end token ranked below the top `beams` is dropped. With beams=1 only the
                # argmax can finish a hypothesis, as in greedy decoding.
                if rank < beams:
                    done.append(Hypothesis(live[row].tokens, total, score(total, length), True))
            elif len(next_live) < beams:
                next_live.append(Hypothesis(live[row].tokens + [token], total, score(total, length), False))
                rows.append(row)
        done = sorted(done, key=lambda h: h.score, reverse=True)[:beams]  # stable: earlier ones win ties
        live = next_live
        if length == max_new_tokens:
            done += live  # unfinished, scored at their full length
            break
        if not live:
            break
        if len(done) == beams and max(best_possible(h, length) for h in live) <= done[-1].score:
            break  # no live hypothesis can beat the worst of the best finished ones

        # One batched step: every decoder row follows its hypothesis (padding repeats the first), then takes its
        # newest token.
        padding = beams - len(live)
        rows += [rows[0]] * padding
        newest = [h.tokens[-1] for h in live] + [live[0].tokens[-1]] * padding
        decoder.reorder(torch.tensor(rows, dtype=torch.long, device=logits.device))
        logits = decoder.step(torch.tensor(newest, dtype=torch.long, device=logits.device)[:, None])  # (beams, V)
    return sorted(done, key=lambda h: h.score, reverse=True)[:beams]
