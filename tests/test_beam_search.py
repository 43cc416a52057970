"""beam_search.py: exact against exhaustive search, beats greedy where it should, equals greedy at beams=1 where
the scores allow it, batched steps, reorder, exact early stopping, masked tokens."""

import math

import pytest
import torch

from beam_search import Hypothesis, beam_search

EOS = 2  # not 0 or V-1, so nothing leans on the end token's place in the vocabulary


def random_table(vocab=4, seed=0, masked=False):
    """Logits as a fixed function of the prefix: a random row seeded by the prefix (ints hash the same every run).
    `masked`: one token of each row (the end token too, at times) is -inf."""
    def logits_of(prefix: tuple[int, ...]) -> torch.Tensor:
        g = torch.Generator().manual_seed(hash((seed, *prefix)) % 2**62)
        logits = 2 * torch.randn(vocab, generator=g)
        if masked:
            logits[torch.randint(vocab, (), generator=g)] = -math.inf
        return logits
    return logits_of


def table_of(rows: dict[tuple[int, ...], list[float]], vocab: int, default: list[float]):
    """Logits from probabilities given by hand per prefix (0 -> -inf); prefixes not listed get `default`."""
    def logits_of(prefix):
        probs = torch.tensor(rows.get(prefix, default), dtype=torch.float32)
        assert probs.numel() == vocab
        return probs.log()
    return logits_of


class FakeDecoder:
    """Holds each row's prefix and derives its logits from it, so a wrong reorder gives wrong logits. Counts
    steps and records every batch size it is given."""

    def __init__(self, logits_of, dtype=torch.float32):
        self.logits_of, self.dtype = logits_of, dtype
        self.prefixes: list[tuple[int, ...]] = []
        self.steps = 0
        self.row_counts: list[int] = []

    def start(self, rows):
        assert not self.prefixes, "start is called once"
        self.prefixes = [()] * rows
        self.row_counts.append(rows)
        return self.logits()

    def step(self, tokens):
        assert tokens.dtype == torch.long and tokens.shape == (len(self.prefixes), 1)
        self.prefixes = [p + (t,) for p, t in zip(self.prefixes, tokens[:, 0].tolist())]
        self.steps += 1
        self.row_counts.append(tokens.size(0))
        return self.logits()

    def reorder(self, rows):
        assert rows.dtype == torch.long and rows.shape == (len(self.prefixes),)
        assert 0 <= rows.min() and rows.max() < len(self.prefixes)
        self.prefixes = [self.prefixes[r] for r in rows.tolist()]

    def logits(self):
        return torch.stack([self.logits_of(p) for p in self.prefixes]).to(self.dtype)  # (rows, V)


def score(logprob, length, length_penalty):
    return logprob / length**length_penalty


def exhaustive(logits_of, max_len, length_penalty):
    """Every possible hypothesis, best first: those ending in EOS, and those of max_len tokens without it."""
    out = []

    def walk(prefix, logprob):
        logprobs = torch.log_softmax(logits_of(prefix).float(), dim=-1).tolist()
        for token, lp in enumerate(logprobs):
            total = logprob + lp
            if total == -math.inf:
                continue
            if token == EOS:
                out.append(Hypothesis(list(prefix), total, score(total, len(prefix) + 1, length_penalty), True))
            elif len(prefix) + 1 == max_len:
                out.append(Hypothesis([*prefix, token], total, score(total, max_len, length_penalty), False))
            else:
                walk((*prefix, token), total)

    walk((), 0.0)
    return sorted(out, key=lambda h: h.score, reverse=True)


def logprob_of(logits_of, h: Hypothesis) -> float:
    """The hypothesis's log-probability recomputed from the table: a wrong reorder would have scored it elsewhere."""
    sequence = h.tokens + [EOS] if h.finished else h.tokens
    return sum(torch.log_softmax(logits_of(tuple(sequence[:i])).float(), dim=-1)[t].item()
               for i, t in enumerate(sequence))


def greedy(decoder, max_new_tokens):
    """A plain greedy loop: argmax each step until EOS."""
    logits, tokens = decoder.start(1), []
    while True:
        token = logits[0].argmax().item()
        if token == EOS:
            return tokens, True
        tokens.append(token)
        if len(tokens) == max_new_tokens:
            return tokens, False
        logits = decoder.step(torch.tensor([[token]]))


def same(found: list[Hypothesis], expected: list[Hypothesis]):
    assert [(h.tokens, h.finished) for h in found] == [(h.tokens, h.finished) for h in expected]
    for f, e in zip(found, expected):
        assert f.logprob == pytest.approx(e.logprob, rel=1e-6, abs=1e-9)
        assert f.score == pytest.approx(e.score, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0, -0.5])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("masked", [False, True])
def test_a_wide_enough_beam_is_exhaustive_search(length_penalty, seed, masked):
    vocab, max_len = 4, 4
    beams = vocab**max_len  # every prefix stays live and every continuation is considered: exact
    logits_of = random_table(vocab, seed, masked)
    decoder = FakeDecoder(logits_of)
    found = beam_search(decoder, beams, max_len, EOS, length_penalty)
    expected = exhaustive(logits_of, max_len, length_penalty)
    assert len(expected) < beams  # so all of them come back, in the same order
    same(found, expected)
    for h in found:
        assert h.logprob == pytest.approx(logprob_of(logits_of, h), rel=1e-6)
    assert decoder.steps == max_len - 1  # fewer than `beams` can ever finish: it runs to the end
    assert set(decoder.row_counts) == {beams}


@pytest.mark.parametrize("length_penalty", [0.0, 1.0])
def test_two_beams_find_what_greedy_misses(length_penalty):
    a, b = 0, 1
    # Greedy takes a (0.6), then ends: 0.6 * 0.4 = 0.24. Through b (0.4) it ends with 0.4 * 0.9 = 0.36.
    logits_of = table_of({(): [0.6, 0.4, 0.0], (a,): [0.3, 0.3, 0.4], (b,): [0.05, 0.05, 0.9]},
                         vocab=3, default=[0.4, 0.4, 0.2])
    assert greedy(FakeDecoder(logits_of), 2) == ([a], True)
    [one] = beam_search(FakeDecoder(logits_of), 1, 2, EOS, length_penalty)
    assert (one.tokens, one.finished) == ([a], True)
    assert one.logprob == pytest.approx(math.log(0.24))
    best, second = beam_search(FakeDecoder(logits_of), 2, 2, EOS, length_penalty)
    assert (best.tokens, best.finished) == ([b], True)
    assert best.logprob == pytest.approx(math.log(0.36))
    assert best.score == pytest.approx(math.log(0.36) / 2**length_penalty)
    assert (second.tokens, second.finished) == ([a], True)


@pytest.mark.parametrize("length_penalty", [0.0, -0.5])
@pytest.mark.parametrize("seed", range(20))
def test_one_beam_is_greedy(length_penalty, seed):
    logits_of = random_table(vocab=4, seed=seed, masked=seed % 2 == 1)
    tokens, finished = greedy(FakeDecoder(logits_of), 6)
    decoder = FakeDecoder(logits_of)
    [h] = beam_search(decoder, 1, 6, EOS, length_penalty)
    assert (h.tokens, h.finished) == (tokens, finished)
    assert h.logprob == pytest.approx(logprob_of(logits_of, h), rel=1e-6)
    assert decoder.steps == len(tokens) - (not finished)  # stopped where greedy stops
    assert set(decoder.row_counts) == {1}


@pytest.mark.parametrize("seed", range(20))
def test_one_beam_with_a_positive_length_penalty_is_greedy_or_better(seed):
    # With length_penalty > 0 a longer continuation can outscore greedy's end, and the exact stop keeps the
    # runner-up alive to find it; greedy's own hypothesis is always a candidate, so it can only do better.
    logits_of = random_table(vocab=4, seed=seed)
    tokens, finished = greedy(FakeDecoder(logits_of), 6)
    greedy_hypothesis = Hypothesis(tokens, 0.0, 0.0, finished)
    greedy_score = score(logprob_of(logits_of, greedy_hypothesis), len(tokens) + finished, 1.0)
    [h] = beam_search(FakeDecoder(logits_of), 1, 6, EOS, 1.0)
    assert h.score >= greedy_score - 1e-9
    assert h.score == pytest.approx(score(logprob_of(logits_of, h), len(h.tokens) + h.finished, 1.0))


def test_one_beam_leaves_greedy_when_a_longer_hypothesis_scores_better():
    a = 0
    # Greedy ends at once: log 0.5 / 1 = -0.69. [a] ends with log(0.4 * 0.99) / 2 = -0.46, better per token.
    logits_of = table_of({(): [0.4, 0.1, 0.5], (a,): [0.005, 0.005, 0.99]}, vocab=3, default=[0.1, 0.1, 0.8])
    assert greedy(FakeDecoder(logits_of), 4) == ([], True)
    [h] = beam_search(FakeDecoder(logits_of), 1, 4, EOS, length_penalty=1.0)
    assert (h.tokens, h.finished) == ([a], True)
    [h] = beam_search(FakeDecoder(logits_of), 1, 4, EOS, length_penalty=0.0)
    assert (h.tokens, h.finished) == ([], True)  # without the length penalty, greedy's end cannot be beaten


@pytest.mark.parametrize("beams", [1, 2, 3, 5])
def test_one_batched_step_per_token_and_never_more_than_beams_rows(beams):
    logits_of = random_table(vocab=4, seed=7)
    decoder = FakeDecoder(logits_of)
    found = beam_search(decoder, beams, 5, EOS, length_penalty=1.0)
    assert set(decoder.row_counts) == {beams}  # the decoder always holds `beams` rows, padding included
    longest = max(len(h.tokens) + h.finished for h in found)
    # start gives the first token's logits, each step one more token's for every row at once
    assert longest - 1 <= decoder.steps <= 5 - 1
    assert 1 <= len(found) <= beams
    assert [h.score for h in found] == sorted((h.score for h in found), reverse=True)
    for h in found:
        assert h.logprob == pytest.approx(logprob_of(logits_of, h), rel=1e-6)


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0, -0.5])
def test_stops_once_every_row_has_ended(length_penalty):
    # Step 1: any token but EOS; step 2: only EOS. Nothing is live after it, whatever max_new_tokens says.
    logits_of = table_of({(): [0.5, 0.3, 0.0, 0.2]}, vocab=4, default=[0.0, 0.0, 1.0, 0.0])
    decoder = FakeDecoder(logits_of)
    found = beam_search(decoder, 3, 50, EOS, length_penalty)
    assert decoder.steps == 1
    assert [h.tokens for h in found] == [[0], [1], [3]]
    assert all(h.finished for h in found)


@pytest.mark.parametrize("length_penalty, steps", [(0.0, 1), (-0.5, 1), (1.0, 2)])
def test_stops_as_soon_as_no_live_row_can_win(length_penalty, steps):
    # Step 1: three tokens alike, EOS masked; after that EOS has all but e^-20 of each other token's mass. After
    # two tokens the two beams have finished with logprob log(1/3) (score -0.55 at length_penalty 1) and the live
    # rows hold about log(1/3) - 20. With no length penalty they cannot win: stop. With length_penalty 1 they could
    # still reach -21.1 / 50 = -0.42 in 50 tokens, so one more step; after it, at most -41.1 / 50 = -0.82: stop.
    near_zero = math.exp(-20)
    logits_of = table_of({(): [1, 1, 0, 1]}, vocab=4, default=[near_zero, near_zero, 1.0, near_zero])
    decoder = FakeDecoder(logits_of)
    found = beam_search(decoder, 2, 50, EOS, length_penalty)
    assert decoder.steps == steps
    assert [(len(h.tokens), h.finished) for h in found] == [(1, True), (1, True)]


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0, -0.5])
@pytest.mark.parametrize("seed", range(5))
def test_early_stopping_is_exact(length_penalty, seed):
    # Each prefix allows EOS and one other token, so one row is live and up to 2 continuations exist: 3 beams are
    # exact, and enough hypotheses finish (one per step) for the search to stop early.
    max_len, free = 12, random_table(vocab=4, seed=seed)

    def chain(prefix):
        logits = free(prefix)
        keep = torch.tensor([EOS, hash((seed, *prefix)) % 3 + (hash((seed, *prefix)) % 3 >= EOS)])
        return torch.full_like(logits, -math.inf).index_copy(0, keep, logits[keep])

    decoder = FakeDecoder(chain)
    found = beam_search(decoder, 3, max_len, EOS, length_penalty)
    same(found, exhaustive(chain, max_len, length_penalty)[:3])
    if length_penalty <= 0:
        assert decoder.steps < max_len - 1  # it did stop early


def test_masked_tokens_are_never_chosen():
    # Only token 3 and EOS are possible: every hypothesis is a run of 3s, however many beams ask for more.
    logits_of = table_of({}, vocab=4, default=[0.0, 0.0, 0.5, 0.5])
    found = beam_search(FakeDecoder(logits_of), 4, 3, EOS, length_penalty=0.0)
    assert [(h.tokens, h.finished) for h in found] == [([], True), ([3], True), ([3, 3], True), ([3, 3, 3], False)]
    assert all(h.logprob > -math.inf for h in found)


def test_a_model_with_nothing_possible_still_gets_an_answer():
    decoder = FakeDecoder(lambda prefix: torch.full((4,), -math.inf))
    found = beam_search(decoder, 2, 3, EOS)
    assert found and all(h.score == -math.inf for h in found)


def test_bfloat16_logits_are_scored_in_float32():
    logits_of = random_table(vocab=4, seed=3)

    def rounded(prefix):
        return logits_of(prefix).bfloat16().float()

    found = beam_search(FakeDecoder(logits_of, dtype=torch.bfloat16), 3, 4, EOS)
    same(found, beam_search(FakeDecoder(rounded), 3, 4, EOS))


@pytest.mark.parametrize("beams, max_new_tokens, message", [(0, 5, "beams must be >= 1"),
                                                            (2, 0, "max_new_tokens must be >= 1")])
def test_rejects_bad_arguments(beams, max_new_tokens, message):
    with pytest.raises(ValueError, match=message):
        beam_search(FakeDecoder(random_table()), beams, max_new_tokens, EOS)
