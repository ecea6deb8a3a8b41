import json
import shutil

import pytest
import torch

from featalign.data import load_pairs, tokenize_pairs
from featalign.errors import CacheMismatchError
from featalign.models import load_model, load_tokenizer, response_logps
from featalign.reference import CacheSettings, ReferenceCache, build_cache, expected_manifest


@pytest.fixture
def setup(world, tmp_path):
    tok = load_tokenizer(world["sft"])
    data = str(tmp_path / "train.jsonl")
    with open(world["train"]) as src, open(data, "w") as dst:
        dst.writelines(src.readlines()[:40])
    pairs = tokenize_pairs(load_pairs(data), tok, 96, 24)
    return tok, pairs, data


def test_cache_holds_reference_logps(world, setup, tmp_path):
    tok, pairs, data = setup
    model = load_model(world["sft"]).eval()
    settings = CacheSettings(max_length=96, max_prompt_length=24)
    man = expected_manifest(world["sft"], data, None, settings)
    build_cache(model, tok, pairs, str(tmp_path / "c"), man, batch_size=7, shard_size=16, progress=False)
    cache = ReferenceCache(str(tmp_path / "c"), man, n_pairs=len(pairs))
    from featalign.data import collate_pairs

    b = collate_pairs(pairs[20:23], tok.pad_token_id)
    with torch.no_grad():
        lp, ln = response_logps(
            model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
            b["input_ids"],
            b["response_mask"],
        )
    c = cache.batch(b["index"])
    assert torch.allclose(c["chosen_logps"], lp[:3], atol=1e-4) and torch.allclose(c["rejected_len"], ln[3:])


def test_stale_cache_is_refused_naming_the_part(world, setup, tmp_path, world_sae):
    tok, pairs, data = setup
    model = load_model(world["sft"]).eval()
    settings = CacheSettings(layer=2, k=10, max_length=96, max_prompt_length=24)
    man = expected_manifest(world["sft"], data, world_sae["path"], settings)
    from featalign.sae import load_sae

    out = str(tmp_path / "c")
    build_cache(model, tok, pairs, out, man, load_sae(world_sae["path"]), 2, 10, progress=False)
    ReferenceCache(out, man)
    with open(data, "a") as f:
        f.write(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(CacheMismatchError, match="the data file changed"):
        ReferenceCache(out, expected_manifest(world["sft"], data, world_sae["path"], settings))
    bad = dict(man, settings=dict(man["settings"], k=20))
    with pytest.raises(CacheMismatchError, match="setting 'k' was 10 at build time, now 20"):
        ReferenceCache(out, bad)
    other = str(tmp_path / "other_model")
    shutil.copytree(world["sft"], other)
    m2 = load_model(other)
    with torch.no_grad():
        next(m2.parameters()).add_(1.0)
    m2.save_pretrained(other)
    with pytest.raises(CacheMismatchError, match="the reference model's weights changed"):
        ReferenceCache(
            out, expected_manifest(other, world["train"], world_sae["path"], settings) | {"data": man["data"]}
        )
    other_sae = str(tmp_path / "other_sae")
    sae2 = load_sae(world_sae["path"])
    with torch.no_grad():
        sae2.b_enc.add_(0.1)
    sae2.save(other_sae)
    with pytest.raises(CacheMismatchError, match="the SAE changed"):
        ReferenceCache(out, expected_manifest(world["sft"], data, other_sae, settings) | {"data": man["data"]})
    plain = str(tmp_path / "plain")  # built without an SAE, then asked for FPO's features
    build_cache(model, tok, pairs, plain, expected_manifest(world["sft"], data, None, settings), progress=False)
    with pytest.raises(CacheMismatchError, match="built without an SAE, so it holds no SAE features"):
        ReferenceCache(plain, man)
    cache = ReferenceCache(out, man)
    assert cache.has_features and cache.tensors["chosen_feat_idx"].shape == (len(pairs), 10)
    vals = cache.tensors["chosen_feat_val"]
    assert (vals[:, :-1] >= vals[:, 1:]).all()  # top-k sorted, descending


def test_unfinished_build_resumes_without_redoing_shards(world, setup, tmp_path, monkeypatch):
    tok, pairs, data = setup
    model = load_model(world["sft"]).eval()
    man = expected_manifest(world["sft"], data, None, CacheSettings(max_length=96, max_prompt_length=24))
    out = tmp_path / "c"
    build_cache(model, tok, pairs, str(out), man, batch_size=8, shard_size=8, progress=False)
    (out / "shard-00002.safetensors").unlink()
    m = json.loads((out / "manifest.json").read_text())
    m["complete"] = False
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(CacheMismatchError, match="did not finish"):
        ReferenceCache(str(out), man)
    calls = []
    real_forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: calls.append(1) or real_forward(*a, **k))
    build_cache(model, tok, pairs, str(out), man, batch_size=8, shard_size=8, progress=False)
    assert len(calls) == 1  # only the missing shard (8 pairs, one batch) was recomputed
    assert ReferenceCache(str(out), man).n == len(pairs)
