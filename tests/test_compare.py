import json

import pytest


@pytest.mark.slow
def test_quick_compare_writes_the_report(world, tmp_path):
    from featalign.compare import CompareConfig, compare

    out = tmp_path / "report"
    res = compare(CompareConfig(out=str(out), world=world["root"], quick=True, steps=25, n_prompts=48, sae_tokens=60_000))
    methods = ["sft", "dpo", "ipo", "simpo", "dpo_ln", "tdpo1", "tdpo2", "trdpo", "fpo"]
    assert list(res["summary"]) == methods
    report = (out / "report.md").read_text()
    for m in methods:
        assert f"| {m} |" in report
    saved = json.loads((out / "results.json").read_text())
    for m in methods:
        row = saved["summary"][m]
        for key in ("pref_accuracy", "gt_reward", "entropy", "kl_to_ref", "feature_mse"):
            assert key in row, (m, key)
    assert saved["summary"]["sft"]["kl_to_ref"]["mean"] == pytest.approx(0.0, abs=1e-5)
    assert all(saved["runs"][m][0]["reference_model_loaded"] == (m in ("tdpo1", "tdpo2", "trdpo")) for m in methods[1:])
    assert (out / "curves.png").stat().st_size > 5000 and (out / "frontier.png").stat().st_size > 5000
    assert "inside the noise" in report or "outside the noise" in report
