import json
import random

import pytest

from featalign import data as D
from featalign.errors import ConfigError, DataError


def _write(tmp_path, rows, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(p)


def test_prompt_chosen_rejected(tmp_path):
    path = _write(tmp_path, [{"prompt": "hi", "chosen": "good", "rejected": "bad"}])
    (pair,) = D.load_pairs(path)
    assert (pair.prompt, pair.chosen, pair.rejected) == ("hi", "good", "bad")
    assert pair.source.endswith(":1")


def test_chat_messages(tmp_path):
    conv = [{"role": "user", "content": "hi"}]
    path = _write(
        tmp_path,
        [
            {
                "chosen": conv + [{"role": "assistant", "content": "good"}],
                "rejected": conv + [{"role": "assistant", "content": "bad"}],
            }
        ],
    )
    (pair,) = D.load_pairs(path)
    assert pair.prompt == conv and (pair.chosen, pair.rejected) == ("good", "bad")


def test_anthropic_hh_becomes_turns_and_keeps_its_text(tmp_path):
    base = "\n\nHuman: how are you?\n\nAssistant: fine\n\nHuman: and now?\n\nAssistant:"
    path = _write(tmp_path, [{"chosen": base + " great", "rejected": base + " awful"}])
    (pair,) = D.load_pairs(path)
    assert pair.prompt == [
        {"role": "user", "content": "how are you?"},
        {"role": "assistant", "content": "fine"},
        {"role": "user", "content": "and now?"},
    ]
    assert pair.raw_prompt + pair.chosen == base + " great" and pair.raw_prompt + pair.rejected == base + " awful"


@pytest.mark.parametrize(
    "row, match",
    [
        ('{"prompt": "a", "chosen": ', r"d\.jsonl:2: invalid JSON"),
        ({"prompt": "a", "rejected": "b"}, r"d\.jsonl:2: field 'chosen': is missing"),
        ({"prompt": "", "chosen": "x", "rejected": "b"}, r"d\.jsonl:2: field 'prompt': is empty"),
        ({"prompt": "a", "chosen": 3, "rejected": "b"}, r"field 'chosen': expected a string, got int"),
        ({"chosen": "x", "rejected": "b"}, r"field 'prompt': is missing"),
        ([1, 2], r"d\.jsonl:2: a record must be an object"),
    ],
)
def test_bad_records_name_file_line_field(tmp_path, row, match):
    path = _write(tmp_path, [{"prompt": "ok", "chosen": "x", "rejected": "y"}, row])
    with pytest.raises(DataError, match=match):
        D.load_pairs(path)


def test_identical_pairs_are_dropped_and_counted(tmp_path):
    path = _write(
        tmp_path,
        [
            {"prompt": "p", "chosen": "same", "rejected": "same"},
            {"prompt": "p", "chosen": "a", "rejected": "b"},
            {"prompt": "p", "chosen": "c", "rejected": "d"},
        ],
    )
    stats = D.DataStats()
    pairs = D.load_pairs(path, stats=stats)
    assert (
        len(pairs) == 2 and stats.dropped == {"identical": 1} and stats.first_dropped["identical"].endswith("d.jsonl:1")
    )
    with pytest.raises(DataError, match=r"d\.jsonl:1: chosen equals rejected \(dropped as identical"):
        D.load_pairs(path, strict=True)


@pytest.fixture(scope="module")
def tok():
    """The world's word-level tokenizer with its chat template (built, not trained: no world needed)."""
    from featalign.world.build import build_tokenizer

    return D.prepare_tokenizer(build_tokenizer())


def test_a_path_that_can_only_be_local_is_missing_and_an_owner_name_goes_to_the_hub(tmp_path, monkeypatch):
    for path in ("/nope/pairs.jsonl", "./pairs", "data/sub/pairs", "pairs.parquet"):
        with pytest.raises(DataError, match="no such file"):
            list(D.read_records(path))
    asked = []

    class FakeDatasets:  # the hub, offline: what `datasets` is asked for is what matters here
        @staticmethod
        def load_dataset(name, split):
            asked.append((name, split))
            return [{"prompt": "p", "chosen": "a", "rejected": "b"}]

    import featalign.data.records as R

    monkeypatch.setattr(R, "_datasets", lambda path: FakeDatasets)
    assert list(D.read_records("Anthropic/hh-rlhf", split="test")) == [
        (1, {"prompt": "p", "chosen": "a", "rejected": "b"})
    ]
    assert asked == [("Anthropic/hh-rlhf", "test")]


def test_a_chat_template_that_refuses_a_role_is_one_line(tok):
    """Gemma's templates raise on a system turn; that is a ConfigError naming the roles, not a jinja traceback."""
    import copy

    strict = copy.deepcopy(tok)
    strict.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "{{ m['content'] }} {% endfor %}"
    )
    r = D.renderer(strict)
    with pytest.raises(ConfigError, match="refuses a conversation of roles system/user: no system role"):
        r.prompt_ids([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}])


def test_tokenise_masks_and_length_policy(tok):
    pair = D.PreferencePair("tell me about the bread", "the soup is lovely .", "it is a terrible cake . " * 10, "x:1")
    stats = D.DataStats()
    assert D.tokenize_pairs([pair], tok, max_length=20, max_prompt_length=4, stats=stats) == []  # the answer cannot fit
    assert stats.dropped == {"over_length": 1} and stats.prompt_truncated == 1
    stats = D.DataStats()
    (tp,) = D.tokenize_pairs([pair], tok, max_length=20, max_prompt_length=4, stats=stats, truncate_responses=True)
    assert len(tp.prompt_ids) == 4 and tp.prompt_ids[-1] == tok.convert_tokens_to_ids("<assistant>")
    assert len(tp.prompt_ids) + len(tp.rejected_ids) == 20
    assert stats.prompt_truncated == 1 and stats.response_truncated == 1 and tp.record is pair
    batch = D.collate_pairs([tp], tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 2
    assert batch["response_mask"][0].sum().item() == len(tp.chosen_ids)
    assert batch["response_mask"][0, :4].sum().item() == 0
    assert batch["attention_mask"][0].sum().item() == 4 + len(tp.chosen_ids)
    with pytest.raises(ConfigError, match="max_prompt_length"):
        D.tokenize_pairs([pair], tok, max_length=8, max_prompt_length=8)


def test_prompt_budget_defaults_to_half_of_max_length(tok):
    """No default may break a valid flag: max_length 192 alone is fine (the prompt budget follows it)."""
    assert D.prompt_limit(192, None) == 96 and D.prompt_limit(192, 100) == 100
    pair = D.PreferencePair("tell me about the bread " * 40, "the soup is lovely .", "it is a terrible cake .", "x:1")
    (tp,) = D.tokenize_pairs([pair], tok, max_length=192)
    assert len(tp.prompt_ids) == 96


def _zero_width_tokenizer(tok):
    """A tokenizer whose normaliser deletes U+200B, so an answer of only that character has no tokens."""
    import copy

    from tokenizers import normalizers

    t = copy.deepcopy(tok)
    t.backend_tokenizer.normalizer = normalizers.Replace("\u200b", "")
    return t


def test_response_that_tokenises_to_nothing_is_dropped(tok):
    t = _zero_width_tokenizer(tok)
    pairs = [D.PreferencePair("hi", "\u200b", "b", "f.jsonl:3"), D.PreferencePair("hi", "a", "b", "f.jsonl:4")]
    stats = D.DataStats()
    kept = D.tokenize_pairs(pairs, t, stats=stats)
    assert [k.record.source for k in kept] == ["f.jsonl:4"] and kept[0].index == 0 and stats.dropped == {"no_tokens": 1}
    with pytest.raises(DataError, match=r"f\.jsonl:3: field 'chosen': tokenises to nothing"):
        D.tokenize_pairs(pairs, t, strict=True)


def test_tokenizer_without_pad_token_uses_eos(world):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(world["sft"])
    tok.pad_token = None
    assert D.prepare_tokenizer(tok).pad_token == tok.eos_token
    tok.eos_token = None
    tok.pad_token = None
    with pytest.raises(ConfigError, match="neither a pad token nor an eos token"):
        D.prepare_tokenizer(tok)


def test_fuzz_records_load_or_raise_data_error():
    """Random records either become pairs or raise featalign's DataError, never anything else."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    scalar = st.one_of(st.none(), st.integers(), st.floats(allow_nan=True), st.text(max_size=12), st.booleans())
    message = st.fixed_dictionaries(
        {}, optional={"role": st.one_of(st.sampled_from(["user", "assistant", "system"]), scalar), "content": scalar}
    )
    value = st.one_of(scalar, st.lists(st.one_of(message, scalar), max_size=3))
    record = st.one_of(
        scalar,
        st.lists(scalar, max_size=2),
        st.dictionaries(st.sampled_from(["prompt", "chosen", "rejected", "other"]), value, max_size=4),
    )

    @settings(max_examples=400, deadline=None)
    @given(record)
    def check(rec):
        try:
            pair = D.to_pair(rec, "fuzz.jsonl", 1)
        except DataError as e:
            assert str(e).startswith("fuzz.jsonl:1: ")
            return
        except D.Drop as d:
            assert d.reason in D.REASONS
            return
        assert isinstance(pair.chosen, str) and pair.chosen.strip()
        assert isinstance(pair.rejected, str) and pair.rejected.strip()

    check()


U = lambda text: {"role": "user", "content": text}  # noqa: E731
A = lambda text: {"role": "assistant", "content": text}  # noqa: E731
SYS = {"role": "system", "content": "be brief"}


@pytest.mark.parametrize(
    "record, prompt, chosen",
    [
        # UltraFeedback-binarized: a prompt string and conversations that repeat the user turn
        ({"prompt": "hi", "chosen": [U("hi"), A("good")], "rejected": [U("hi"), A("bad")]}, [U("hi")], "good"),
        # ... with a system message: the conversation is used, not the bare prompt string
        (
            {"prompt": "hi", "chosen": [SYS, U("hi"), A("good")], "rejected": [SYS, U("hi"), A("bad")]},
            [SYS, U("hi")],
            "good",
        ),
        # TRL's conversational format: the prompt as messages, the answers alone
        ({"prompt": [SYS, U("hi")], "chosen": [A("good")], "rejected": [A("bad")]}, [SYS, U("hi")], "good"),
        # multi-turn with no prompt field
        (
            {"chosen": [U("a"), A("b"), U("c"), A("good")], "rejected": [U("a"), A("b"), U("c"), A("bad")]},
            [U("a"), A("b"), U("c")],
            "good",
        ),
    ],
)
def test_conversation_formats(tmp_path, record, prompt, chosen):
    (pair,) = D.load_pairs(_write(tmp_path, [record]))
    assert pair.prompt == prompt and pair.chosen == chosen and pair.rejected == "bad"


@pytest.mark.parametrize(
    "record",
    [
        {
            "chosen": [U("a"), A("x"), U("c"), A("good")],
            "rejected": [U("a"), A("y"), U("c"), A("bad")],
        },  # histories differ
        {"prompt": "other", "chosen": [U("hi"), A("good")], "rejected": [U("hi"), A("bad")]},  # prompt disagrees
        {"prompt": [U("other")], "chosen": [U("hi"), A("good")], "rejected": [U("hi"), A("bad")]},
        {"chosen": "\n\nHuman: a\n\nAssistant: good", "rejected": "\n\nHuman: b\n\nAssistant: bad"},  # HH
    ],
)
def test_mispaired_records_are_dropped_never_reassembled(tmp_path, record):
    ok = {"prompt": "p", "chosen": "a", "rejected": "b"}
    stats = D.DataStats()
    pairs = D.load_pairs(_write(tmp_path, [ok, record, ok]), stats=stats)
    assert (
        len(pairs) == 2
        and stats.dropped == {"prompt_mismatch": 1}
        and stats.first_dropped["prompt_mismatch"].endswith(":2")
    )


def _hh_file(tmp_path, n=2000, per_defect=10, seed=0):
    """An HH-style file of world sentences, with ``per_defect`` records of each defect (0.5% each at the defaults)."""
    from featalign.world import lang

    rng = random.Random(seed)

    def say():
        ex = lang.sample_prompt(rng)
        return ex.prompt, lang.sample_response(rng, ex.topic)

    kinds = ["empty_response", "prompt_mismatch", "identical", "no_tokens", "over_length", "malformed_dialogue"]
    defect = dict(zip(rng.sample(range(n), per_defect * len(kinds)), [k for k in kinds for _ in range(per_defect)]))
    rows = []
    for i in range(n):
        history = "".join(f"\n\nHuman: {q}\n\nAssistant: {a}" for q, a in (say() for _ in range(rng.randint(0, 2))))
        q, good = say()
        bad = say()[1]
        prompt = history + f"\n\nHuman: {q}\n\nAssistant:"
        chosen, rejected = prompt + " " + good, prompt + " " + bad
        kind = defect.get(i)
        if kind == "empty_response":
            chosen = prompt
        elif kind == "prompt_mismatch":
            rejected = f"\n\nHuman: {say()[0]}\n\nAssistant: {bad}" + rejected[len(prompt) :]
        elif kind == "identical":
            rejected = chosen
        elif kind == "no_tokens":
            chosen = prompt + " \u200b"
        elif kind == "over_length":
            chosen = prompt + " " + " ".join(say()[1] for _ in range(12))
        elif kind == "malformed_dialogue":
            chosen, rejected = "Assistant: hello" + chosen, "Assistant: hello" + rejected
        rows.append({"chosen": chosen, "rejected": rejected})
    return _write(tmp_path, rows, "hh.jsonl"), rows, defect


@pytest.mark.parametrize("template", [True, False])
def test_hh_file_with_every_defect_loads_with_exact_counts(tmp_path, tok, template):
    """0.5% broken records of each kind: each counted under its reason, every kept pair its own dialogue exactly."""
    path, rows, defect = _hh_file(tmp_path)
    t = _zero_width_tokenizer(tok)
    if not template:
        t.chat_template = None
    opts = D.DataOptions(data=path, max_length=160)
    pairs, tokenized, stats = D.prepare_pairs(opts, t)
    want = {k: list(defect.values()).count(k) for k in set(defect.values())}
    assert stats.dropped == want and stats.records == len(rows) and stats.kept == len(rows) - sum(want.values())
    assert len(pairs) == len(tokenized) == stats.kept and [x.index for x in tokenized] == list(range(stats.kept))
    seen = set()
    for p, x in zip(pairs, tokenized):
        line = int(p.source.rsplit(":", 1)[1])
        assert line - 1 not in defect
        rec = rows[line - 1]
        assert p.raw_prompt + p.chosen == rec["chosen"] and p.raw_prompt + p.rejected == rec["rejected"]
        seen.add(line)
        full = D.renderer(t).prompt_ids(p.prompt, p.raw_prompt)
        assert x.prompt_ids == full[-len(x.prompt_ids) :]  # the prompt, left-truncated when it had to be
    assert len(seen) == stats.kept
    assert stats.rendering.startswith("chat template" if template else "raw text")
    summary = stats.summary()
    assert summary["dropped"] == want and summary["kept"] == stats.kept and any("dropped" in n for n in stats.notes)


def test_hh_rendering_with_and_without_a_chat_template(tok):
    base = (
        "\n\nHuman: tell me about the bread\n\nAssistant: the soup is lovely .\n\nHuman: and the cake ?\n\nAssistant:"
    )
    (pair,) = [D.to_pair({"chosen": base + " it is a sweet cake .", "rejected": base + " it is awful ."}, "x", 1)]
    (with_t,) = D.tokenize_pairs([pair], tok)
    # the conversation, turn by turn, through the template; the answer ends with the template's end-of-turn
    assert (
        tok.decode(with_t.prompt_ids)
        == "<user> tell me about the bread <assistant> the soup is lovely . <eos> <user> and the cake ? <assistant>"
    )
    assert tok.decode(with_t.chosen_ids) == "it is a sweet cake . <eos>"
    import copy

    raw = copy.deepcopy(tok)
    raw.chat_template = None
    (no_t,) = D.tokenize_pairs([pair], raw)
    assert no_t.prompt_ids == raw(base)["input_ids"]  # the dialogue text itself (unknown markers and all)


def test_too_many_drops_fail_with_the_counts(tmp_path):
    rows = [{"prompt": "p", "chosen": "same", "rejected": "same"}] * 3 + [
        {"prompt": "p", "chosen": "a", "rejected": "b"}
    ]
    with pytest.raises(
        DataError, match=r"more than half of the records cannot be used \(3 of 4 dropped: \{'identical': 3\}\)"
    ):
        D.prepare_pairs(
            D.DataOptions(data=_write(tmp_path, rows)),
            D.prepare_tokenizer(__import__("featalign.world.build", fromlist=["x"]).build_tokenizer()),
        )


def test_file_formats_and_splits(tmp_path, tok):
    datasets = pytest.importorskip("datasets", reason="datasets (test extra, via trl) is not installed")
    rows = [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(5)]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:2])})
    dd.save_to_disk(str(tmp_path / "saved"))
    for path, split, n in (
        (tmp_path / "d.json", "train", 5),
        (tmp_path / "d.parquet", "train", 5),
        (tmp_path / "saved", "train", 5),
        (tmp_path / "saved", "test", 2),
    ):
        pairs = D.load_pairs(str(path), split=split)
        assert [p.prompt for p in pairs] == [f"p{i}" for i in range(n)], (path, split)
    with pytest.raises(DataError, match=r"has no split 'valid'; it has \['test', 'train'\]"):
        D.load_pairs(str(tmp_path / "saved"), split="valid")
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="not one written by `datasets`"):
        D.load_pairs(str(tmp_path / "plain"))


def test_documents_from_every_format(tmp_path, tok):
    """`sae train --data` takes what `train` takes: a preference file gives prompt + chosen and prompt + rejected."""
    conv = [U("tell me about the bread")]
    path = _write(
        tmp_path,
        [
            {"text": "the soup is lovely ."},
            {"messages": conv + [A("the cake is sweet .")]},
            {"prompt": "tell me about the bread", "response": "the soup tastes ."},
            {"chosen": conv + [A("lovely .")], "rejected": conv + [A("awful .")]},
            {
                "chosen": "\n\nHuman: tell me about the bread\n\nAssistant: it is lovely .",
                "rejected": "\n\nHuman: tell me about the bread\n\nAssistant: it is awful .",
            },
            {"chosen": conv + [A("same")], "rejected": conv + [A("same")]},  # dropped, counted
        ],
    )
    stats = D.DataStats()
    docs = D.read_documents(path, tok, stats=stats)
    text = [tok.decode(d) for d in docs]
    assert len(docs) == 7 and stats.dropped == {"identical": 1}
    assert text[3] == "<user> tell me about the bread <assistant> lovely . <eos>"
    assert text[6] == "<user> tell me about the bread <assistant> it is awful . <eos>"
    with pytest.raises(DataError, match=r"needs 'text', 'messages'"):
        D.read_documents(_write(tmp_path, [{"other": 1}], "o.jsonl"), tok)


def test_held_out_split_is_by_prompt_seeded_and_stable(tmp_path):
    """Every record of a prompt lands on one side; the same seed gives the same split after reordering; records that
    cannot be pairs stay in train (where training counts them)."""
    rows = [{"prompt": f"q{i % 40}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(200)]
    rows.append({"prompt": "broken", "chosen": "", "rejected": "x"})
    src = tmp_path / "all.jsonl"
    D.write_jsonl(str(src), rows)
    train, test = D.split_by_prompt(str(src), str(tmp_path / "a"), 0.25, seed=3)
    tr = [json.loads(line) for line in open(train)]
    te = [json.loads(line) for line in open(test)]
    assert len(tr) + len(te) == len(rows) and {"prompt": "broken", "chosen": "", "rejected": "x"} in tr
    assert not {r["prompt"] for r in tr} & {r["prompt"] for r in te}
    assert 0 < len({r["prompt"] for r in te}) < 40
    D.write_jsonl(str(src), rows[::-1])
    _, test2 = D.split_by_prompt(str(src), str(tmp_path / "b"), 0.25, seed=3)
    assert {r["prompt"] for r in map(json.loads, open(test2))} == {r["prompt"] for r in te}
    _, test3 = D.split_by_prompt(str(src), str(tmp_path / "c"), 0.25, seed=4)
    assert {r["prompt"] for r in map(json.loads, open(test3))} != {r["prompt"] for r in te}
