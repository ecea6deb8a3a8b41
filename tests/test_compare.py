import json
import math

import pytest
from conftest import SEED

from featalign.compare import CompareConfig, frontier, verdict


def _run(method, seed, kl, reward, n=100, sd=0.1):
    """A synthetic finished run: ``n`` per-prompt rewards of mean ``reward`` and sample sd ``sd``."""
    half = [reward - sd * math.sqrt((n - 1) / n), reward + sd * math.sqrt((n - 1) / n)]
    return {"method": method, "seed": seed, "kl_to_ref": kl, "gt_reward": reward, "rewards_per_prompt": half * (n // 2)}


def test_frontier_interpolates_at_matched_kl_and_names_the_best_only_outside_the_noise():
    # A: reward = 1 + 0.1 KL on both seeds; B: 0.5 above A at KL 1-3 on one seed, 0.5 + 0.01 on the other
    runs = [_run("a", s, kl, 1 + 0.1 * kl) for s in (0, 1) for kl in (1.0, 3.0)]
    runs += [_run("b", 0, 1.0, 1.6), _run("b", 0, 3.0, 1.8), _run("b", 1, 1.0, 1.11), _run("b", 1, 3.0, 1.31)]
    fr = frontier(runs, levels=[2.0, 5.0])
    at2 = fr["levels"][0]["methods"]
    assert at2["a"]["mean"] == pytest.approx(1.2) and at2["a"]["sd"] == pytest.approx(0.0, abs=1e-12)
    # B at KL 2: seeds 1.7 and 1.21 -> mean 1.455, sd |1.7 - 1.21| / sqrt(2)
    assert at2["b"]["mean"] == pytest.approx(1.455) and at2["b"]["sd"] == pytest.approx(0.49 / math.sqrt(2))
    # SE = sqrt((sd^2 + prompt SE^2) / n): prompt SE here is 0.1 / sqrt(100)
    assert at2["a"]["se"] == pytest.approx(math.sqrt(0.01**2 / 2))
    assert at2["b"]["se"] == pytest.approx(math.sqrt(((0.49 / math.sqrt(2)) ** 2 + 0.01**2) / 2))
    # B leads by 0.255 but its seeds disagree: 2 SE = 0.49 > 0.255, so the level is inside the noise
    assert fr["levels"][0]["best"] is None and fr["levels"][0]["inside_noise"] == ["b", "a"]
    assert verdict(fr["levels"][0]).startswith("inside the noise")
    assert fr["levels"][1]["methods"] == {}  # KL 5 lies beyond every run: no extrapolation

    # same lead with agreeing seeds: outside the noise, B named
    runs = [_run("a", s, kl, 1 + 0.1 * kl) for s in (0, 1) for kl in (1.0, 3.0)]
    runs += [_run("b", s, kl, 1.5 + 0.1 * kl) for s in (0, 1) for kl in (1.0, 3.0)]
    row = frontier(runs, levels=[2.0])["levels"][0]
    assert row["best"] == "b" and verdict(row) == "**b**"
    runs = [{**r, "method": {"a": "dpo", "b": "fpo"}[r["method"]]} for r in runs]
    d = frontier(runs, levels=[2.0])["levels"][0]["minus_dpo"]["fpo"]
    assert (
        d["diff"] == pytest.approx(0.5)
        and d["se"] == pytest.approx(math.sqrt(2 * 0.01**2 / 2))
        and not d["within_noise"]
    )


def test_default_levels_lie_where_two_methods_can_be_compared():
    from featalign.compare import default_levels

    # A spans KL 0.5-5 (over its seeds), B 1-2: the levels fill 1-2, not 0.5-5 where B has one level at most
    per = {"a": {0: [(0.5,), (2.5,)], 1: [(1.5,), (5.0,)]}, "b": {0: [(1.0,), (2.0,)]}}
    assert default_levels(per, 4) == pytest.approx([1.125, 1.375, 1.625, 1.875], abs=0.01)  # 3 significant digits
    # no overlap, or one method: the whole span
    assert default_levels({"a": {0: [(0.5,), (1.0,)]}, "b": {0: [(2.0,), (3.0,)]}}, 5) == pytest.approx(
        [0.75, 1.25, 1.75, 2.25, 2.75]
    )
    assert default_levels({"a": {0: [(1.0,), (3.0,)]}}, 2) == pytest.approx([1.5, 2.5])
    assert default_levels({}, 3) == []


def test_tiers_and_grid_override():
    from featalign.errors import ConfigError

    q, d, f = CompareConfig(quick=True).budget(), CompareConfig().budget(), CompareConfig(full=True).budget()
    assert q.seeds == 1 and all(len(v) == 2 for v in q.grid.values())
    assert d.seeds >= 2 and all(len(v) == 3 for v in d.grid.values()) and {"dpo", "fpo"} <= set(d.grid)
    assert len(f.grid) == 8 and all(len(v) == 5 for v in f.grid.values())
    # every tier's grid is sorted from the loosest to the tightest knob setting of the full grid
    for m, vals in d.grid.items():
        assert vals == sorted(vals) and set(vals) <= set(f.grid[m])
    assert CompareConfig(grid="fpo=1,4").budget().grid["fpo"] == [1.0, 4.0]
    with pytest.raises(ConfigError, match="grid"):
        CompareConfig(grid="nope=1").budget()
    with pytest.raises(ConfigError, match="methods\\[1\\]: 'vibes' is not one of"):
        CompareConfig.from_dict({"methods": "dpo,vibes"})
    # a real model gets its own budget (small lr and batch, the sentiment preset's four methods, one knob value)
    r = CompareConfig(model="m.gguf", data="pairs.jsonl").budget()
    assert r.lr == 1e-4 and r.steps == 12 and r.batch_size == 8 and set(r.grid) == {"dpo", "simpo", "tdpo2", "fpo"}
    assert r.grid["dpo"] == [0.1] and r.grid["fpo"] == [0.5] and r.grid["simpo"] == [2.0]  # the published defaults
    assert CompareConfig(preset="sentiment", lr=1e-6).budget().lr == 1e-6
    # FPO's world grid sits below its real-model grid (the world SAE's feature term binds harder)
    rf = CompareConfig(model="m.gguf", data="pairs.jsonl", full=True).budget().grid["fpo"]
    assert rf == [2.0, 10.0, 50.0] and d.grid["fpo"] == [0.01, 0.03, 0.1]
    full = CompareConfig(preset="sentiment", full=True).budget()
    assert full.seeds == 3 and full.steps == 12 and full.simpo_lr == full.lr / 2 and len(full.grid) == 4
    assert CompareConfig(preset="sentiment", full=True, simpo_lr=1e-6).budget().simpo_lr == 1e-6
    # the arithmetic preset has its own tiers: DPO against FPO, short answers, prompts long enough for four shots
    a, af = CompareConfig(preset="arithmetic").budget(), CompareConfig(preset="arithmetic", full=True).budget()
    assert set(a.grid) == {"dpo", "fpo"} and a.max_new_tokens == 8 and a.max_prompt_length >= 56
    assert af.seeds == 3 and all(len(v) == 3 for v in af.grid.values()) and af.grid["fpo"] == [3e-4, 3e-3, 3e-2]
    assert a.lr < CompareConfig(preset="sentiment").budget().lr  # Gemma collapses at SmolLM2's learning rate
    with pytest.raises(ConfigError, match="preset"):
        CompareConfig(preset="vibes").validate()


def test_report_cells_show_the_seed_sd_or_one_seed_prompt_se():
    from featalign.compare.report import format_cell

    assert format_cell({"mean": 0.5, "sd": 0.1, "n": 2}) == "0.500 ± 0.100"
    assert format_cell({"mean": 0.5, "sd": 0.0, "n": 1}, 3, {"mean": 0.04, "sd": 0.0, "n": 1}) == "0.500 ± 0.040 SE"
    assert format_cell({"mean": 0.5, "sd": 0.0, "n": 1}) == "0.500" and format_cell(None) == "-"


def test_compare_on_a_user_model_needs_data_and_a_judge():
    from featalign.compare import user_source
    from featalign.errors import ConfigError

    with pytest.raises(ConfigError, match="--model and --data"):
        user_source(CompareConfig(model="some/model"))
    with pytest.raises(ConfigError, match="needs a judge"):
        user_source(CompareConfig(model="some/model", data="pairs.jsonl"))


@pytest.mark.slow
def test_quick_sweep_writes_frontiers_and_reuses_finished_runs(world, tmp_path):
    from featalign.compare import run_compare

    out = tmp_path / "report"
    # in this process (the subprocess path is the SmolLM2 compare test's)
    cfg = CompareConfig(
        out=str(out),
        world=world["root"],
        world_seed=SEED,
        quick=True,
        steps=20,
        n_prompts=32,
        sae_tokens=60_000,
        sae_d=256,
        isolate_runs=False,
    )
    res = run_compare(cfg)
    assert res["source"]["info"]["world"] == world["manifest"]  # the session's world, reused, not rebuilt
    grid = res["budget"]["grid"]
    trained = [r for r in res["runs"] if r["method"] != "sft"]
    assert sorted((r["method"], r["value"]) for r in trained) == sorted(
        (m, v) for m, vals in grid.items() for v in vals
    )
    assert not any(r["reused"] for r in res["runs"])
    for r in trained:
        assert {"gt_reward", "kl_to_ref", "feature_mse", "win_rate_vs_sft"} <= set(r), r["method"]
        assert r["reference_model_loaded"] is False  # DPO and FPO read the offline cache
    sft = [r for r in res["runs"] if r["method"] == "sft"][0]
    assert sft["kl_to_ref"] == pytest.approx(0.0, abs=1e-5)
    report = (out / "report.md").read_text()
    assert "## Ground-truth reward at matched KL" in report and "| dpo |" in report and "| fpo |" in report
    assert (out / "frontier.png").stat().st_size > 5000 and (out / "curves.png").stat().st_size > 5000
    saved = json.loads((out / "results.json").read_text())
    assert saved["frontier"]["methods"] == ["dpo", "fpo"] and saved["frontier"]["levels"]

    # a restarted sweep reuses every finished run; a run whose eval was lost (killed sweep) is redone alone
    lost = trained[0]["run_dir"]
    import os

    os.remove(os.path.join(lost, "eval.json"))
    again = run_compare(cfg)
    redone = [r["run_dir"] for r in again["runs"] if not r["reused"]]
    assert redone == [lost]
    first = {r["run_dir"]: r["gt_reward"] for r in trained}
    assert all(r["gt_reward"] == first[r["run_dir"]] for r in again["runs"] if r["method"] != "sft" and r["reused"])


def test_report_names_the_starting_model_as_given_not_by_this_machines_cache_path(monkeypatch, tmp_path):
    from featalign.compare.report import _model_name

    monkeypatch.setenv("FEATALIGN_CACHE", str(tmp_path))
    conv = str(tmp_path / "gguf" / "SmolLM2-135M-Instruct.Q4_1-fb79cc876cfd")
    assert _model_name({"sft": conv, "info": {"model": None}}) == "SmolLM2-135M-Instruct.Q4_1-fb79cc876cfd"
    assert _model_name({"sft": conv, "info": {"model": "packaged:smollm2"}}) == "packaged:smollm2"
    assert _model_name({"sft": "data/world/sft", "info": {}}) == "data/world/sft"
