"""Built-in tasks (tasks.py): deterministic generation, correct targets, disjoint splits, a length split longer
than train, and the Shakespeare tasks' pure functions on small hand-written texts."""

import re

import pytest

import tasks
from errors import UserError

GENERATED = ("copy", "reverse", "sort", "add")


def quiet(_msg: str) -> None:
    pass


@pytest.fixture(scope="module", params=GENERATED)
def generated(request):
    return request.param, tasks.generate(request.param, 500, 7, quiet)


def test_generated_split_sizes_and_disjointness(generated):
    name, splits = generated
    assert list(splits) == ["train", "val", "length"]
    assert [len(splits[s]) for s in splits] == [500, tasks.MIN_EVAL_PAIRS, tasks.MIN_EVAL_PAIRS]
    sources = {s: [src for src, _ in pairs] for s, pairs in splits.items()}
    for split, srcs in sources.items():
        assert len(set(srcs)) == len(srcs), f"{name} {split} repeats an input"
    assert not set(sources["train"]) & set(sources["val"])


def test_length_split_inputs_are_longer_than_any_train_input(generated):
    name, splits = generated
    size = (lambda s: max(map(len, s.split("+")))) if name == "add" else len  # operand digits, or letters
    longest_train = max(size(s) for s, _ in splits["train"] + splits["val"])
    shortest_length = min(size(s) for s, _ in splits["length"])
    assert shortest_length > longest_train
    assert (longest_train, shortest_length) == ((3, 4) if name == "add" else (10, 11))


def test_targets_are_the_task(generated):
    name, splits = generated
    for split, pairs in splits.items():
        for source, target in pairs:
            if name == "add":
                a, b = re.fullmatch(r"(\d+)\+(\d+)", source).groups()
                assert a == str(int(a)) and b == str(int(b))  # no leading zeros
                assert target[::-1] == str(int(a) + int(b))  # the sum, least-significant digit first
            else:
                assert re.fullmatch(r"[a-z]+", source)
                assert target == {"copy": source, "reverse": source[::-1], "sort": "".join(sorted(source))}[name]


def test_add_operands_cover_every_digit_count():
    splits = tasks.generate("add", 2000, 1, quiet)
    digits = {len(x) for s, _ in splits["train"] for x in s.split("+")}
    assert digits == {1, 2, 3}
    assert {len(x) for s, _ in splits["length"] for x in s.split("+")} == {4, 5}
    assert tasks.add_target("57+8") == "56" and tasks.add_target("999+1") == "0001" and tasks.add_target("0+0") == "0"


def test_same_seed_same_pairs_other_seed_other_pairs():
    assert tasks.generate("reverse", 300, 5, quiet) == tasks.generate("reverse", 300, 5, quiet)
    assert tasks.generate("reverse", 300, 5, quiet)["train"] != tasks.generate("reverse", 300, 6, quiet)["train"]
    # a larger --examples extends the train split; val and length are drawn by their own generators
    small, large = tasks.generate("add", 300, 5, quiet), tasks.generate("add", 3000, 5, quiet)
    assert large["train"][:300] == small["train"] and len(large["val"]) == 300


def test_default_examples_and_eval_sizes():
    splits = tasks.generate("copy", None, 1, quiet)
    assert [len(p) for p in splits.values()] == [tasks.DEFAULT_EXAMPLES, tasks.DEFAULT_EXAMPLES // 10, tasks.DEFAULT_EXAMPLES // 10]


@pytest.mark.parametrize("call, match", [
    (lambda: tasks.generate("x", 10, 1, quiet), "unknown task 'x'; choose one of: copy, reverse, sort, add, speaker, modernize"),
    (lambda: tasks.generate("copy", 0, 1, quiet), "--examples must be a positive integer"),
    (lambda: tasks.generate("add", 10, 1, quiet, input_path="x.txt"), "task:add is generated: drop --input"),
    (lambda: tasks.generate("add", 10**6, 1, quiet), r"--examples can be at most 454,546"),
])
def test_bad_requests(call, match):
    with pytest.raises(UserError, match=match.replace("(", r"\(")):
        call()


# ----------------------------------------------------------------------------- modernize


@pytest.mark.parametrize("line, modern", [
    ("Thou art a villain.", "You are a villain."),
    ("THOU ART MAD", "YOU ARE MAD"),
    ("And you art welcome", "And you are welcome"),
    ("the art of war", "the art of war"),  # "art" alone is the noun
    ("Art thou Romeo?", "Art you Romeo?"),  # "art" before its subject is kept
    ("Wherefore art thou Romeo?", "Why art you Romeo?"),
    ("Deny thy father and refuse thy name;", "Deny your father and refuse your name;"),
    ("'Tis nobler, 'twas ever so", "It is nobler, it was ever so"),
    ("Nay, he hath it, and doth keep it ere night", "No, he has it, and does keep it before night"),
    ("Dost thou know? Hast thou seen thine?", "Do you know? Have you seen yours?"),
    ("Ye shalt and wilt, oft", "You shall and will, often"),
    ("here there where thyself", "here there where thyself"),  # word boundaries: no partial words
    ("thou'rt mad", "thou'rt mad"),  # contractions are left alone
])
def test_modernize_line(line, modern):
    assert tasks.modernize_line(line) == modern


def test_modernize_keeps_only_changed_distinct_lines():
    text = "ROMEO:\nThou art here.\nNothing old here.\n\nThou art here.\nI thank thee\n"
    assert tasks.modernize_pairs(text) == [("Thou art here.", "You are here."), ("I thank thee", "I thank you")]


def test_modernize_baseline():
    splits = {"train": [], "val": [("thou", "you"), ("Thou art here", "You are here")]}
    b = tasks.baseline("modernize", splits)
    assert b["exact_match"] == 0.0 and b["split"] == "val"
    # "thou"/"you" share "ou": 2*2/7; "Thou art here"/"You are here" share "ou ar" and " here": 2*10/25
    assert b["difflib_ratio"] == round((4 / 7 + 20 / 25) / 2, 4)
    assert tasks.baseline("copy", splits) is None


# ----------------------------------------------------------------------------- speaker


def test_speaker_pairs_on_a_small_text():
    text = (
        "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
        "All:\nSpeak, speak.\n\n"
        "TITUS:\n\n"  # a name with no speech
        "JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?\nDeny thy father and refuse thy name;\n\n"
        "HAMLET:\n" + "word " * 50 + "\n\n"  # longer than 200 characters: dropped
        "Senators, &C:\nWell, well.\nMarch on, my fellows:\nto the gates\n\n"
        "ROMEO:\nSpeak, speak.\n"  # a repeated speech keeps its first speaker
    )
    assert tasks.speaker_pairs(text) == [
        ("Before we proceed any further, hear me speak.", "First Citizen"),
        ("Speak, speak.", "All"),
        ("O Romeo, Romeo! wherefore art thou Romeo?\nDeny thy father and refuse thy name;", "JULIET"),
        ("Well, well.\nMarch on, my fellows:\nto the gates", "Senators, &C"),
    ]


def test_corpus_split_is_seeded_and_capped():
    pairs = [(f"s{i}", f"t{i}") for i in range(100)]
    a = tasks.split_corpus_pairs(pairs, "speaker", None, 1, quiet)
    assert len(a["val"]) == 10 and len(a["train"]) == 90 and sorted(a["train"] + a["val"]) == sorted(pairs)
    assert a == tasks.split_corpus_pairs(pairs, "speaker", None, 1, quiet)
    assert a != tasks.split_corpus_pairs(pairs, "speaker", None, 2, quiet)
    msgs = []
    capped = tasks.split_corpus_pairs(pairs, "speaker", 20, 1, msgs.append)
    assert capped["train"] == a["train"][:20] and capped["val"] == a["val"] and not msgs
    tasks.split_corpus_pairs(pairs, "speaker", 500, 1, msgs.append)
    assert "keeps them all" in msgs[0]


# ----------------------------------------------------------------------------- on the real corpus


@pytest.fixture(scope="module")
def corpus(shakespeare_path):
    if shakespeare_path is None:
        pytest.skip("the shared tiny-Shakespeare corpus is not present")
    return shakespeare_path


@pytest.mark.parametrize("name", ["speaker", "modernize"])
def test_shakespeare_tasks(corpus, name, tmp_path):
    splits = tasks.generate(name, None, 3, quiet, input_path=corpus, data_root=tmp_path)
    assert list(splits) == ["train", "val"] and len(splits["train"]) > 3000
    assert len(splits["val"]) == round((len(splits["train"]) + len(splits["val"])) * 0.1)
    assert not {s for s, _ in splits["train"]} & {s for s, _ in splits["val"]}
    assert splits == tasks.generate(name, None, 3, quiet, input_path=corpus, data_root=tmp_path)
    assert len(tasks.generate(name, 100, 3, quiet, input_path=corpus, data_root=tmp_path)["train"]) == 100
    if name == "speaker":
        assert all(len(s) <= 200 and t and ":" not in t for s, t in splits["train"])
    else:
        assert all(tasks.modernize_line(s) == t != s for s, t in splits["train"])
        b = tasks.baseline(name, splits)
        assert b["exact_match"] == 0.0 and 0.8 < b["difflib_ratio"] < 1.0
    assert not (tmp_path / "shakespeare").exists()  # --input is read in place, never copied to the cache
