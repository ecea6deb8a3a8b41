import json

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
    path = _write(tmp_path, [{"chosen": conv + [{"role": "assistant", "content": "good"}],
                              "rejected": conv + [{"role": "assistant", "content": "bad"}]}])
    (pair,) = D.load_pairs(path)
    assert pair.prompt == conv and (pair.chosen, pair.rejected) == ("good", "bad")


def test_anthropic_hh(tmp_path):
    base = "\n\nHuman: how are you?\n\nAssistant: fine\n\nHuman: and now?\n\nAssistant:"
    path = _write(tmp_path, [{"chosen": base + " great", "rejected": base + " awful"}])
    (pair,) = D.load_pairs(path)
    assert pair.prompt == base and pair.chosen == " great" and pair.rejected == " awful"


@pytest.mark.parametrize("row, match", [
    ('{"prompt": "a", "chosen": ', r"d\.jsonl:2: invalid JSON"),
    ({"prompt": "a", "rejected": "b"}, r"d\.jsonl:2: field 'chosen': is missing"),
    ({"prompt": "", "chosen": "x", "rejected": "b"}, r"d\.jsonl:2: field 'prompt': is empty"),
    ({"prompt": "a", "chosen": 3, "rejected": "b"}, r"field 'chosen': expected a string, got int"),
    ({"chosen": "x", "rejected": "b"}, r"field 'prompt': is missing"),
    ([1, 2], r"d\.jsonl:2: a record must be an object"),
])
def test_bad_records_name_file_line_field(tmp_path, row, match):
    path = _write(tmp_path, [{"prompt": "ok", "chosen": "x", "rejected": "y"}, row])
    with pytest.raises(DataError, match=match):
        D.load_pairs(path)


def test_identical_pairs_are_dropped_and_counted(tmp_path):
    path = _write(tmp_path, [{"prompt": "p", "chosen": "same", "rejected": "same"}, {"prompt": "p", "chosen": "a", "rejected": "b"}])
    stats = D.DataStats()
    pairs = D.load_pairs(path, stats=stats)
    assert len(pairs) == 1 and stats.identical == 1 and "chosen equals rejected" in stats.notes[0]


def test_tokenise_masks_and_truncation(world):
    from featalign.models import load_tokenizer

    tok = load_tokenizer(world["sft"])
    pair = D.PreferencePair("tell me about the bread", "the soup is lovely .", "it is a terrible cake . " * 10, "x:1")
    stats = D.DataStats()
    (tp,) = D.tokenize_pairs([pair], tok, max_length=20, max_prompt_length=4, stats=stats)
    assert len(tp.prompt_ids) == 4 and tp.prompt_ids[-1] == tok.convert_tokens_to_ids("<assistant>")
    assert len(tp.prompt_ids) + len(tp.rejected_ids) == 20
    assert stats.prompt_truncated == 1 and stats.response_truncated == 1
    batch = D.collate_pairs([tp], tok.pad_token_id)
    assert batch["input_ids"].shape[0] == 2
    assert batch["response_mask"][0].sum().item() == len(tp.chosen_ids)
    assert batch["response_mask"][0, :4].sum().item() == 0
    assert batch["attention_mask"][0].sum().item() == 4 + len(tp.chosen_ids)
    with pytest.raises(ConfigError, match="max_prompt_length"):
        D.tokenize_pairs([pair], tok, max_length=8, max_prompt_length=8)


def test_response_that_tokenises_to_nothing(world):
    from featalign.models import load_tokenizer

    tok = load_tokenizer(world["sft"])
    tok.eos_token = None  # a response of only spaces then has no tokens at all
    with pytest.raises(DataError, match=r"f\.jsonl:3: field 'chosen': tokenises to nothing"):
        D.tokenize_pairs([D.PreferencePair("hi", "   ", "b", "f.jsonl:3")], tok)


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
    message = st.fixed_dictionaries({}, optional={"role": st.one_of(st.sampled_from(["user", "assistant", "system"]), scalar),
                                                  "content": scalar})
    value = st.one_of(scalar, st.lists(st.one_of(message, scalar), max_size=3))
    record = st.one_of(scalar, st.lists(scalar, max_size=2),
                       st.dictionaries(st.sampled_from(["prompt", "chosen", "rejected", "other"]), value, max_size=4))

    @settings(max_examples=400, deadline=None)
    @given(record)
    def check(rec):
        try:
            pair = D.to_pair(rec, "fuzz.jsonl", 1)
        except DataError as e:
            assert str(e).startswith("fuzz.jsonl:1: ")
            return
        assert isinstance(pair.chosen, str) and pair.chosen.strip()
        assert isinstance(pair.rejected, str) and pair.rejected.strip()

    check()
