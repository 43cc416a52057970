"""Built-in sequence-to-sequence tasks for `minigpt prepare task:NAME`: each turns (examples, seed) into the
same (source, target) text pairs every time, split into train, val and, for the generated tasks, `length`.

Generated (no data needed): copy, reverse, sort (lowercase letters) and add (decimal addition). Their train
and val inputs are 1-10 letters or 1-3 digit operands; the `length` split holds longer inputs (11-20 letters,
4-5 digit operands) that no train pair has, to test length generalisation.
From the tiny-Shakespeare corpus (read as `minigpt prepare shakespeare` reads it): speaker and modernize.

numpy-free and torch-free: the standard library's `random` is enough, and its string seeding is stable across
Python processes and versions (it hashes the string with SHA-512), so a seed names one dataset everywhere.
"""

import difflib
import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import sources
from errors import Log, UserError
from sources import DATA_ROOT

DEFAULT_EXAMPLES = 10_000  # train pairs of a generated task: enough for a small model to learn copy or add
MIN_EVAL_PAIRS = 200  # val and length pairs of a generated task: max(this, examples // 10), so accuracy on a
# small run is still measured on enough pairs to tell 90% from 95%
CORPUS_VAL_FRACTION = 0.1  # the Shakespeare tasks' share of pairs kept for val
MAX_SPEECH_CHARS = 200  # speaker: longer speeches would dominate a small model's context
SHORT, LONG = (1, 10), (11, 20)  # letters per string: train/val, length split
SHORT_DIGITS, LONG_DIGITS = (1, 3), (4, 5)  # digits per operand of add: train/val, length split
MAX_DRAWS_PER_PAIR = 50  # rejection sampling gives up when the input space is nearly exhausted

Pairs = list[tuple[str, str]]


@dataclass(frozen=True)
class Task:
    name: str
    description: str  # one line, printed by prepare and stored in meta.json
    corpus: bool  # read from tiny-Shakespeare (train/val only) rather than generated (train/val/length)


TASKS = {t.name: t for t in (
    Task("copy", "copy a string of 1-10 lowercase letters (length split: 11-20 letters)", False),
    Task("reverse", "reverse a string of 1-10 lowercase letters (length split: 11-20 letters)", False),
    Task("sort", "sort the letters of a string of 1-10 lowercase letters (length split: 11-20 letters)", False),
    Task("add", "a+b with 1-3 digit operands -> the sum written least-significant digit first, e.g. 57+8 -> 56 "
                "(length split: 4-5 digit operands)", False),
    Task("speaker", f"a tiny-Shakespeare speech of at most {MAX_SPEECH_CHARS} characters -> its speaker's name", True),
    Task("modernize", "a tiny-Shakespeare line -> the same line with archaic forms modernized "
                      "(thou art -> you are, hath -> has, 'tis -> it is, ...)", True),
)}
TASK_NAMES = tuple(TASKS)


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; choose one of: {', '.join(TASK_NAMES)}")
    return TASKS[name]


# ---------------------------------------------------------------------------------------------
# Generated tasks
# ---------------------------------------------------------------------------------------------


def _letters(rng: random.Random, lengths: tuple[int, int]) -> str:
    return "".join(rng.choices(string.ascii_lowercase, k=rng.randint(*lengths)))


def _operand(rng: random.Random, digits: tuple[int, int]) -> int:
    # The digit count is drawn first, so short operands are as common as long ones (uniform over numbers
    # would make 90% of 1-3 digit operands 3 digits long).
    d = rng.randint(*digits)
    return rng.randint(0 if d == 1 else 10 ** (d - 1), 10 ** d - 1)


def add_target(source: str) -> str:
    """The sum of "a+b", written least-significant digit first: the order in which a carry is computed, so a
    left-to-right decoder can emit each digit once it has seen the digits it depends on."""
    a, b = source.split("+")
    return str(int(a) + int(b))[::-1]


def _n_operands(digits: tuple[int, int]) -> int:
    lo, hi = digits
    return 10 ** hi - (10 ** (lo - 1) if lo > 1 else 0)


N_SHORT_STRINGS = sum(26 ** k for k in range(SHORT[0], SHORT[1] + 1))

# name -> (draw a source from the rng, long or not; the source's target; how many distinct train/val sources exist)
GENERATORS: dict[str, tuple[Callable[[random.Random, bool], str], Callable[[str], str], int]] = {
    "copy": (lambda rng, long: _letters(rng, LONG if long else SHORT), lambda s: s, N_SHORT_STRINGS),
    "reverse": (lambda rng, long: _letters(rng, LONG if long else SHORT), lambda s: s[::-1], N_SHORT_STRINGS),
    "sort": (lambda rng, long: _letters(rng, LONG if long else SHORT), lambda s: "".join(sorted(s)), N_SHORT_STRINGS),
    "add": (lambda rng, long: f"{_operand(rng, LONG_DIGITS if long else SHORT_DIGITS)}+"
                              f"{_operand(rng, LONG_DIGITS if long else SHORT_DIGITS)}", add_target,
            _n_operands(SHORT_DIGITS) ** 2),
}


def _distinct_sources(rng: random.Random, draw: Callable[[random.Random], str], n: int, exclude: set[str],
                      what: str) -> list[str]:
    """n distinct sources not in `exclude`, by rejection: val never repeats a train input, and no input
    appears twice in a split. Where the space is small (the 26 one-letter strings, the 100 sums of two digits),
    train takes them all and val draws from the rest of the distribution."""
    found: dict[str, None] = {}  # insertion-ordered: the order of the draws
    for _ in range(MAX_DRAWS_PER_PAIR * n + 1000):
        if len(found) == n:
            break
        s = draw(rng)
        if s not in exclude and s not in found:
            found[s] = None
    else:
        raise UserError(f"could only find {len(found):,} distinct {what} inputs of the {n:,} needed; pass a smaller --examples")
    return list(found)


def _n_eval(examples: int) -> int:
    return max(MIN_EVAL_PAIRS, examples // 10)


def generate_task(name: str, examples: int, seed: int) -> dict[str, Pairs]:
    """train (`examples` pairs), val and length (max(MIN_EVAL_PAIRS, examples // 10) each) of a generated task.

    Each split has its own generator seeded by (task, seed, split), so a larger --examples keeps the smaller
    one's train pairs as its prefix.
    """
    draw, target, space = GENERATORS[name]
    n_eval = _n_eval(examples)
    if examples + n_eval > space // 2:  # past half the space, drawing distinct inputs by rejection slows to minutes
        most = space // 2 * 10 // 11
        while most + 1 + _n_eval(most + 1) <= space // 2:
            most += 1
        raise UserError(f"task:{name} has {space:,} distinct train/val inputs, so --examples can be at most {most:,} "
                        "(train and val together may use half of them); pass a smaller --examples")
    rng = {split: random.Random(f"minigpt task {name} seed {seed} split {split}") for split in ("train", "val", "length")}
    train = _distinct_sources(rng["train"], lambda r: draw(r, False), examples, set(), f"task:{name} train")
    val = _distinct_sources(rng["val"], lambda r: draw(r, False), n_eval, set(train), f"task:{name} val")
    length = _distinct_sources(rng["length"], lambda r: draw(r, True), n_eval, set(), f"task:{name} length")
    return {split: [(s, target(s)) for s in sources] for split, sources in (("train", train), ("val", val), ("length", length))}


# ---------------------------------------------------------------------------------------------
# Tasks from tiny-Shakespeare
# ---------------------------------------------------------------------------------------------

# A speaker line: a capitalised name and a colon alone on the line, after a blank line ("First Citizen:",
# "KING RICHARD III:", "Senators, &C:"). Colons also end verse lines ("March on, my fellows:"), but those sit
# inside a speech, never right after a blank line.
_SPEAKER = re.compile(r"[A-Z][^:\n]*:")


def speaker_pairs(text: str, max_chars: int = MAX_SPEECH_CHARS) -> Pairs:
    """(speech, speaker) for each speech of at most max_chars characters; a speech is the lines after a
    "NAME:" line up to the next blank line, newlines kept. A repeated speech keeps its first speaker, so one
    source never has two targets and never lands in both train and val."""
    out: dict[str, str] = {}
    for block in re.split(r"\n[ \t]*\n", text):
        first, _, speech = block.strip("\n").partition("\n")
        if _SPEAKER.fullmatch(first) and speech.strip() and len(speech) <= max_chars:
            out.setdefault(speech, first[:-1])
    return list(out.items())


_ARCHAIC = {
    "thou": "you", "thee": "you", "ye": "you", "thy": "your", "thine": "yours", "hath": "has", "doth": "does",
    "dost": "do", "hast": "have", "wilt": "will", "shalt": "shall", "wherefore": "why", "ere": "before",
    "oft": "often", "nay": "no", "'tis": "it is", "'twas": "it was",
}
# "art" is a verb only after its subject ("thou art" -> "you are"); alone it is usually the noun, and in
# "art thou" modernizing would need reordering, so both are left as they are.
_THOU_ART = re.compile(r"\b(thou|you)(\s+)(art)\b", re.IGNORECASE)
# \b cannot start a match at an apostrophe (no word boundary between a space and "'"), hence the lookbehind.
# A word joined to an apostrophe is a contraction ("thou'rt", "o'er") that a plain swap would garble: left alone.
_WORD = re.compile(r"(?<![\w'])('tis|'twas)\b(?!')|(?<!')\b(" + "|".join(w for w in _ARCHAIC if w[0] != "'") + r")\b(?!')",
                   re.IGNORECASE)


def _same_case(original: str, modern: str) -> str:
    """modern in original's case: THOU -> YOU, Thou -> You, thou -> you ('Tis -> It is)."""
    letters = [c for c in original if c.isalpha()]
    if len(letters) > 1 and all(c.isupper() for c in letters):
        return modern.upper()
    if letters and letters[0].isupper():
        return modern[0].upper() + modern[1:]
    return modern


def modernize_line(line: str) -> str:
    line = _THOU_ART.sub(lambda m: _same_case(m[1], "you") + m[2] + _same_case(m[3], "are"), line)
    return _WORD.sub(lambda m: _same_case(m[0], _ARCHAIC[m[0].lower()]), line)


def modernize_pairs(text: str) -> Pairs:
    """(line, modernized line) for each distinct non-blank line that the replacements change."""
    out: dict[str, str] = {}
    for line in text.split("\n"):
        modern = modernize_line(line)
        if modern != line and line.strip():
            out.setdefault(line, modern)
    return list(out.items())


def split_corpus_pairs(pairs: Pairs, name: str, examples: int | None, seed: int, log: Log) -> dict[str, Pairs]:
    """Shuffled with the seed, 10% val, the rest train, capped at `examples` train pairs (val keeps its size,
    so runs with different caps are measured on the same pairs)."""
    shuffled = list(pairs)
    random.Random(f"minigpt task {name} seed {seed}").shuffle(shuffled)
    n_val = max(1, round(len(shuffled) * CORPUS_VAL_FRACTION))
    train, val = shuffled[n_val:], shuffled[:n_val]
    if examples is not None:
        if examples > len(train):
            log(f"note: task:{name} has {len(train):,} train pairs; --examples {examples:,} keeps them all")
        train = train[:examples]
    return {"train": train, "val": val}


# ---------------------------------------------------------------------------------------------
# The entry points prepare uses
# ---------------------------------------------------------------------------------------------


def generate(name: str, examples: int | None, seed: int, log: Log, input_path=None,
             data_root: Path = DATA_ROOT) -> dict[str, Pairs]:
    """The (source, target) text pairs of task `name` per split: train, val, and length for generated tasks.

    examples: train pairs (None = DEFAULT_EXAMPLES for generated tasks, all for the Shakespeare ones).
    input_path / data_root: where the Shakespeare tasks find the corpus, as `minigpt prepare shakespeare`.
    """
    task = get_task(name)
    if examples is not None and (not isinstance(examples, int) or isinstance(examples, bool) or examples < 1):
        raise UserError(f"--examples must be a positive integer (train pairs), got {examples!r}; e.g. {DEFAULT_EXAMPLES}")
    if not task.corpus:
        if input_path is not None:
            raise UserError(f"--input only applies to 'shakespeare' and task:speaker / task:modernize; task:{name} "
                            "is generated: drop --input")
        return generate_task(name, DEFAULT_EXAMPLES if examples is None else examples, seed)
    text = sources.shakespeare_file(input_path, Path(data_root), log).read_text(encoding="utf-8")
    pairs = speaker_pairs(text) if name == "speaker" else modernize_pairs(text)
    return split_corpus_pairs(pairs, name, examples, seed, log)


def baseline(name: str, splits: dict[str, Pairs]) -> dict | None:
    """modernize: the scores of predicting every val source unchanged, the floor a model must beat (its
    exact match is 0 by construction: only changed lines are kept). None for the other tasks."""
    if name != "modernize":
        return None
    val = splits["val"]
    exact = sum(s == t for s, t in val) / len(val)
    ratio = sum(difflib.SequenceMatcher(None, s, t, autojunk=False).ratio() for s, t in val) / len(val)
    return {"split": "val", "prediction": "the source unchanged", "exact_match": exact, "difflib_ratio": round(ratio, 4),
            "what": "difflib's ratio, 2 x matching chars / total chars, mean over pairs; not chrF"}
