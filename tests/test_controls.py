"""Feature controls (ablate, preserve, suppress) and select-features: the arithmetic, then training with each."""

import json
import math

import pytest
import torch
from quick_world import train_config
from tiny import tiny_lm

from featalign.controls import Controls, ablation, ablation_basis, named_features
from featalign.errors import ConfigError
from featalign.sae import random_sae


def test_features_are_named_by_index_or_by_the_files_featalign_writes(tmp_path):
    assert named_features("17, 3,17") == [3, 17]
    files = {
        "select.json": {"features": [5, 2]},
        "explain.json": {"up": [{"feature": 7}], "down": [{"feature": 1}]},
        "attribution.json": {"top": [{"feature": 9}, {"feature": 4}]},
    }
    for name, content in files.items():
        (tmp_path / name).write_text(json.dumps(content))
    assert named_features(str(tmp_path / "select.json")) == [2, 5]
    assert named_features(str(tmp_path / "explain.json")) == [1, 7]
    assert named_features(str(tmp_path / "attribution.json"), d_sae=10) == [4, 9]
    with pytest.raises(ConfigError, match=r"feature\(s\) \[12\] are not in the SAE's 0..9"):
        named_features("3,12", d_sae=10)
    with pytest.raises(ConfigError, match="name features by comma-separated indices or by a features file"):
        named_features("three")


def test_ablation_removes_the_named_directions_and_only_them():
    """The layer's output becomes h - Q Q^T h, Q an orthonormal basis of the named decoder rows: no component left
    along any of them, and every component orthogonal to them (h - Q Q^T h itself) untouched."""
    model = tiny_lm(vocab=40, seed=0).eval()
    sae = random_sae(32, 16, "topk", k=4, seed=1)
    q = ablation_basis(sae, [2, 5, 11])
    assert torch.allclose(q.T @ q, torch.eye(3), atol=1e-5)
    ids = torch.randint(0, 40, (2, 6))

    def captured(ablate: bool) -> torch.Tensor:
        box = {}
        with ablation([model], 0, q if ablate else None), torch.no_grad():
            # registered after the ablation hook, so it sees what the next layer receives
            handle = model.model.layers[0].register_forward_hook(
                lambda m, i, o: box.__setitem__("h", o[0] if isinstance(o, tuple) else o)
            )
            model(input_ids=ids)
            handle.remove()
        return box["h"]

    plain, out = captured(False), captured(True)
    assert (plain @ sae.W_dec[[2, 5, 11]].T).abs().max() > 1e-3
    assert (out @ sae.W_dec[[2, 5, 11]].T).abs().max() < 1e-5
    assert torch.allclose(out, plain - (plain @ q) @ q.T, atol=1e-5)
    assert not torch.equal(captured(False), out)  # the hook is gone once the context closes


def test_preserve_and_suppress_penalties_by_hand():
    pooled = torch.tensor(
        [[1.0, 2.0, 0.0, 4.0], [0.0, 1.0, 3.0, 1.0]], requires_grad=True
    )  # one pair: chosen, rejected
    cache = {"chosen_named_val": torch.tensor([[1.5, 3.0]]), "rejected_named_val": torch.tensor([[0.0, 2.0]])}
    c = Controls(preserve=[1, 3], suppress=[0, 2], preserve_weight=2.0, suppress_weight=0.5)
    loss, m = c.terms(pooled, cache)
    mse = ((2.0 - 1.5) ** 2 + (4.0 - 3.0) ** 2 + (1.0 - 0.0) ** 2 + (1.0 - 2.0) ** 2) / 4
    act = ((1.0 + 0.0) + (0.0 + 3.0)) / 2
    assert m["controls/preserve_mse"].item() == pytest.approx(mse) and m["controls/suppressed_activation"].item() == act
    assert loss.item() == pytest.approx(2.0 * mse + 0.5 * act)
    loss.backward()  # d/d pooled: preserve 2 * 2 (p - r) / 4 on the preserved columns, suppress 0.5 / 2 on the others
    torch.testing.assert_close(pooled.grad, torch.tensor([[0.25, 0.5, 0.25, 1.0], [0.25, 1.0, 0.25, -1.0]]))


@pytest.mark.parametrize("control", ["ablate", "preserve", "suppress"])
def test_training_with_each_control(world, world_sae, tmp_path, control):
    """DPO on the world with one control on two features: the run trains, logs the control's metric, and its cache
    holds what the control needs (the reference's values of preserved features; a reference run under ablation)."""
    from featalign.reference import ReferenceCache
    from featalign.train import TrainConfig, run_train

    kw = {f"{control}_features": "3,17", "sae": world_sae["path"], "layer": 2}
    cfg = train_config(world, tmp_path, "dpo", out=str(tmp_path / control), max_steps=2, limit=16, log_every=1, **kw)
    s = run_train(cfg)
    assert s["steps"] == 2 and torch.isfinite(torch.tensor(s["final"]["loss"]))
    cache = ReferenceCache(str(tmp_path / control / "ref_cache"))
    settings = cache.manifest["settings"]
    if control == "preserve":
        assert cache.tensors["chosen_named_val"].shape == (16, 2) and settings["named"] == [3, 17]
        assert "controls/preserve_mse" in s["final"]
    if control == "suppress":
        # step 1 runs before any update, so the policy is the reference: DPO's part is log 2 exactly and the rest is
        # the weight (1) times the suppressed features' pooled activation
        with open(tmp_path / control / "metrics.jsonl") as f:
            first = json.loads(f.readline())
        act = first["controls/suppressed_activation"]
        assert act > 0 and first["loss"] == pytest.approx(math.log(2) + act, rel=1e-4)
    if control == "ablate":
        assert settings["ablate"] == [3, 17]
        plain = run_train(TrainConfig(**{**cfg.__dict__, "ablate_features": "", "out": str(tmp_path / "plain")}))
        ref_plain = ReferenceCache(str(tmp_path / "plain" / "ref_cache")).tensors["chosen_logps"]
        assert not torch.allclose(cache.tensors["chosen_logps"], ref_plain)  # the reference ran ablated too
        assert plain["steps"] == 2


def test_controls_need_an_sae():
    from featalign.train import TrainConfig

    with pytest.raises(ConfigError, match="feature controls name SAE features: give the SAE"):
        TrainConfig(method="dpo", model="m", data="d", suppress_features="1").validate()


def test_select_features_ranks_by_the_paired_t(world, world_sae, tmp_path):
    """The t of each listed feature is the paired t of chosen - rejected pooled activation (numpy as the oracle), the
    list runs from the largest |t| down, and the file it writes names features as the controls read them."""
    import numpy as np

    from featalign import data as D
    from featalign.features import pooled_features
    from featalign.models import load_model, load_tokenizer
    from featalign.sae import load_sae
    from featalign.select_features import SelectFeaturesConfig, run_select_features

    res = run_select_features(
        SelectFeaturesConfig(
            model=world["sft"], sae=world_sae["path"], data=world["test"], limit=60, top=5, out=str(tmp_path / "sel")
        )
    )
    tok, model = load_tokenizer(world["sft"]), load_model(world["sft"]).eval()
    _, pairs, _ = D.prepare_pairs(D.DataOptions(data=world["test"], limit=60), tok)
    pooled = pooled_features(model, load_sae(world_sae["path"]), 2, D.pair_sequences(pairs), tok.pad_token_id).numpy()
    diff = pooled[:60].astype(np.float64) - pooled[60:]
    t = diff.mean(0) / (diff.std(0, ddof=1) / np.sqrt(60))
    t = np.nan_to_num(t)
    assert res["features"] == [r["feature"] for r in res["rows"]] and len(res["rows"]) == 5
    for r in res["rows"]:
        assert r["t"] == pytest.approx(t[r["feature"]], rel=1e-3)
        assert r["fires_on_chosen"] == pytest.approx((pooled[:60, r["feature"]] > 0).mean())
    assert abs(res["rows"][0]["t"]) == pytest.approx(np.abs(t).max(), rel=1e-3)
    assert named_features(str(tmp_path / "sel" / "features.json")) == sorted(res["features"])
