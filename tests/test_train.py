import json
import os

import pytest
import torch
from conftest import margin
from quick_world import train_config as cfg_for

from featalign.errors import ConfigError, TrainingDivergedError
from featalign.train import TrainConfig, run_train
from featalign.trainer import Trainer


@pytest.mark.parametrize("method", ["dpo", "ipo", "simpo", "dpo_ln", "tdpo1", "tdpo2", "trdpo", "fpo"])
def test_every_method_trains(world, world_sae, tmp_path, method):
    """Four steps of each method on one batch of 8 pairs: every weight tensor moves, and the batch's loss falls."""
    extra = {"sae": world_sae["path"], "layer": world_sae["layer"], "k": 20} if method == "fpo" else {}
    t = Trainer(cfg_for(world, tmp_path, method, tensorboard=(method == "dpo"), limit=8, **extra))
    assert t.steps_per_epoch == 1
    first = t._device_batch(t._epoch_batches(0)[0])
    for key in ("n_tokens", "n_positions"):
        first.pop(key)

    def first_loss() -> float:
        with torch.no_grad():
            return t.loss(t.model, first)[0].item()

    before_loss = first_loss()
    before = {k: v.clone() for k, v in t.acc.unwrap_model(t.model).state_dict().items()}
    s = t.train()
    after = t.acc.unwrap_model(t.model).state_dict()
    assert [
        k for k in before if torch.equal(before[k], after[k]) and before[k].is_floating_point() and "rotary" not in k
    ] == []
    margin(f"{method}: the batch's loss after 4 steps / before", first_loss() / before_loss, 1.0, above=False)
    assert s["steps"] == 4 and s["peak_memory_mb"] > 0
    assert s["reference_model_loaded"] == (method in ("tdpo1", "tdpo2", "trdpo"))
    recs = [json.loads(line) for line in open(tmp_path / method / "metrics.jsonl")]
    assert [r["step"] for r in recs] == [2, 4]
    for key in (
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
    ):
        assert all(torch.isfinite(torch.tensor(r[key])) for r in recs), key
    if method.startswith("tdpo"):
        assert recs[-1]["kl/chosen"] > 0  # the policy left the reference
    if method == "fpo":
        assert recs[-1]["fpo/feature_mse_chosen"] > 0  # the policy's features left the reference's
    if method == "dpo":
        assert os.listdir(tmp_path / "dpo" / "tb")
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / method / "final")


def test_released_fpo_trains_from_a_cache_of_dense_sums(world, world_sae, tmp_path):
    """--fpo-variant released: the cache stores the reference's unnormalised final-norm feature sums (dense), training
    reads them, and its rewards add D; a cache of the paper's variant is refused, naming the setting."""
    from featalign.errors import CacheMismatchError
    from featalign.reference import ReferenceCache

    kw = dict(sae=world_sae["path"], layer=2, k=20, limit=16, max_steps=2)
    s = run_train(cfg_for(world, tmp_path, "fpo", fpo_variant="released", **kw))
    cache = ReferenceCache(str(tmp_path / "fpo" / "ref_cache"))
    assert cache.has_features and cache.tensors["chosen_feat_sum"].shape == (16, 256)
    assert s["final"]["fpo/feature_mse_chosen"] > 0 and not s["reference_model_loaded"]
    run_train(cfg_for(world, tmp_path / "paper", "fpo", **kw))
    with pytest.raises(CacheMismatchError, match="setting 'fpo_variant' was paper at build time, now released"):
        run_train(
            cfg_for(
                world,
                tmp_path / "mixed",
                "fpo",
                fpo_variant="released",
                cache=str(tmp_path / "paper" / "fpo" / "ref_cache"),
                **kw,
            )
        )


def test_fpo_with_a_cache_never_loads_the_reference(world, world_sae, tmp_path, monkeypatch):
    from featalign import cli

    cache = str(tmp_path / "cache")
    assert (
        cli.main(
            [
                "cache",
                "--model",
                world["sft"],
                "--data",
                world["train"],
                "--sae",
                world_sae["path"],
                "--layer",
                "2",
                "--out",
                cache,
                "--k",
                "20",
                "--max-length",
                "96",
                "--max-prompt-length",
                "24",
            ]
        )
        == 0
    )
    import featalign.trainer as T

    loads = []
    real = T.load_model
    monkeypatch.setattr(T, "load_model", lambda path, *a, **k: loads.append(path) or real(path, *a, **k))
    cfg = cfg_for(world, tmp_path, "fpo", sae=world_sae["path"], layer=2, k=20, cache=cache, limit=None, max_steps=2)
    s = run_train(cfg)
    assert loads == [world["sft"]]  # the policy only
    assert not s["reference_model_loaded"]


def test_trdpo_reference_updates(world, tmp_path):
    cfg = cfg_for(world, tmp_path, "trdpo", max_steps=2, trdpo_tau=2, trdpo_alpha=0.5)
    t = Trainer(cfg)
    ref0 = {k: v.clone() for k, v in t.ref_model.state_dict().items()}
    t.train()
    pol = t.acc.unwrap_model(t.model).state_dict()
    ref = t.ref_model.state_dict()
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.allclose(ref[name], 0.5 * pol[name] + 0.5 * ref0[name], atol=1e-6)
    assert not torch.allclose(ref[name], ref0[name])


class _Stop(Exception):
    pass


def _killed_at_first_save_then_resumed(cfg, monkeypatch, at_save=lambda t: None) -> tuple[int, dict]:
    """Train ``cfg`` until its first checkpoint is written (``at_save`` sees the trainer then), die, resume in a new
    Trainer and train to the end; returns the step the resume started from and the final weights."""
    real_save = Trainer.save_checkpoint

    def save_then_die(self):
        at_save(self)
        real_save(self)
        raise _Stop

    monkeypatch.setattr(Trainer, "save_checkpoint", save_then_die)
    with pytest.raises(_Stop):
        Trainer(cfg).train()
    monkeypatch.setattr(Trainer, "save_checkpoint", real_save)
    resumed = Trainer(cfg)
    assert resumed.load_checkpoint()
    step = resumed.step
    resumed.train()
    return step, resumed.acc.unwrap_model(resumed.model).state_dict()


def _assert_same_weights(want: dict, got: dict) -> None:
    for k in want:
        assert torch.allclose(want[k], got[k], atol=1e-6), k


def test_resume_reaches_the_same_weights(world, tmp_path, monkeypatch):
    full = Trainer(cfg_for(world, tmp_path / "a", "tdpo2", max_steps=6, grad_accum=2, batch_size=4))
    full.train()
    want = full.acc.unwrap_model(full.model).state_dict()

    cfg = cfg_for(world, tmp_path / "b", "tdpo2", max_steps=6, grad_accum=2, batch_size=4, save_every=3)
    step, got = _killed_at_first_save_then_resumed(cfg, monkeypatch)
    assert step == 3
    _assert_same_weights(want, got)
    hist = [json.loads(line)["step"] for line in open(tmp_path / "b" / "tdpo2" / "metrics.jsonl")]
    assert hist == [2, 4, 6]


@pytest.mark.parametrize("method", ["dpo", "fpo"])
def test_optimizer_in_backward_reaches_adamws_weights(world, world_sae, tmp_path, monkeypatch, method):
    """AdamW stepped per weight inside backward is AdamW: the same weights after 4 steps (no clip in either), also
    across a kill and resume; and no weight holds a gradient once backward returns."""
    kw = dict(max_grad_norm=0.0, max_steps=4, weight_decay=0.01)
    kw |= {"sae": world_sae["path"], "layer": 2} if method == "fpo" else {}
    plain = Trainer(cfg_for(world, tmp_path / "plain", method, **kw))
    plain.train()
    want = plain.acc.unwrap_model(plain.model).state_dict()

    cfg = cfg_for(world, tmp_path / "ib", method, optim_in_backward=True, save_every=2, **kw)

    def no_gradient_left(t):
        assert all(p.grad is None for p in t.model.parameters())

    step, got = _killed_at_first_save_then_resumed(cfg, monkeypatch, no_gradient_left)
    assert step == 2
    _assert_same_weights(want, got)


def test_optimizer_in_backward_refuses_accumulation(world, tmp_path):
    with pytest.raises(ConfigError, match="cannot accumulate grad_accum"):
        cfg_for(world, tmp_path, "dpo", optim_in_backward=True, grad_accum=2).validate()


def test_nan_loss_stops_with_step_and_batch(world, tmp_path, monkeypatch):
    import featalign.trainer as T

    def nan_loss(method, terms, **kw):
        return terms["policy_chosen_logps"].sum() * float("nan"), {}

    monkeypatch.setattr(T, "compute_loss", nan_loss)
    with pytest.raises(TrainingDivergedError, match=r"loss is nan at step 1 on the data's kept pairs \["):
        run_train(cfg_for(world, tmp_path, "simpo"))


def test_config_validation():
    from featalign.errors import ConfigError

    with pytest.raises(ConfigError, match="method: 'ppo' is not one of"):
        TrainConfig(method="ppo", model="m", data="d").validate()
    with pytest.raises(ConfigError, match="FPO needs an SAE"):
        TrainConfig(method="fpo", model="m", data="d").validate()
    with pytest.raises(ConfigError, match="max_steps: must be -1"):
        TrainConfig(method="dpo", model="m", data="d", max_steps=0).validate()


LAUNCH_ARGS = [
    "--lr",
    "1e-4",
    "--max-steps",
    "4",
    "--log-every",
    "1",
    "--no-progress",
    "--no-tensorboard",
    "--max-length",
    "96",
    "--max-prompt-length",
    "32",
    "--limit",
    "200",
]


@pytest.fixture(scope="module")
def one_process(world, tmp_path_factory):
    """method -> the metrics of one process x 8 pairs, run once per module: the baseline the multi-process runs
    match."""
    import subprocess
    import sys

    done: dict[str, tuple] = {}

    def run(method: str) -> tuple:
        if method not in done:
            out = tmp_path_factory.mktemp(f"one-{method}")
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "featalign",
                    "train",
                    "--method",
                    method,
                    "--model",
                    world["sft"],
                    "--data",
                    world["train"],
                    *LAUNCH_ARGS,
                    "--batch-size",
                    "8",
                    "--out",
                    str(out),
                ],
                check=True,
                capture_output=True,
                env=dict(os.environ, OMP_NUM_THREADS="1"),
            )
            done[method] = (out, [json.loads(line) for line in open(out / "metrics.jsonl")])
        return done[method]

    return run


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(world, tmp_path, one_process):
    """DDP over gloo with 2 CPU processes x 4 pairs gives the loss curve of 1 process x 8 pairs."""
    import shutil
    import subprocess
    import sys

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(
        [
            torchrun,
            "--nproc_per_node",
            "2",
            "--master_port",
            "29533",
            "-m",
            "featalign",
            "train",
            "--method",
            "tdpo2",
            "--model",
            world["sft"],
            "--data",
            world["train"],
            *LAUNCH_ARGS,
            "--batch-size",
            "4",
            "--out",
            str(tmp_path / "two"),
        ],
        check=True,
        capture_output=True,
        env=env,
    )
    _, one = one_process("tdpo2")
    two = [json.loads(line) for line in open(tmp_path / "two" / "metrics.jsonl")]
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    assert one[-1]["loss"] != pytest.approx(one[0]["loss"], abs=1e-4)  # it trained
    for a, b in zip(one, two):
        for key in ("loss", "rewards/margins", "kl/chosen"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a["step"], key)


FSDP_CONFIG = """distributed_type: FSDP
num_processes: 2
num_machines: 1
mixed_precision: 'no'
main_process_port: {port}
fsdp_config:
  fsdp_version: {version}
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_state_dict_type: FULL_STATE_DICT
  fsdp_sync_module_states: false
  fsdp_cpu_ram_efficient_loading: false
"""


@pytest.mark.slow
@pytest.mark.parametrize("version,method,port", [(2, "dpo", 29541), (1, "tdpo2", 29542)])
def test_fsdp_on_two_gloo_processes_matches_one_process(world, tmp_path, one_process, version, method, port):
    """`accelerate launch` with an FSDP config on 2 CPU processes x 4 pairs gives the loss curve of 1 process x 8
    pairs, and its final/ is a plain save_pretrained model with the 1-process weights.

    dpo reads the offline cache; tdpo2's live reference is an unsharded copy in every process. The sharded policy
    takes full logits (logprobs' chunked head reads the weight outside the forward), the 1-process run the
    chunked path, so the equality also checks that fallback."""
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    config = tmp_path / "fsdp.yaml"
    config.write_text(FSDP_CONFIG.format(port=port, version=version))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(config),
            "-m",
            "featalign",
            "train",
            "--method",
            method,
            "--model",
            world["sft"],
            "--data",
            world["train"],
            *LAUNCH_ARGS,
            "--batch-size",
            "4",
            "--out",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    one_dir, one = one_process(method)
    summary = json.load(open(tmp_path / "two" / "summary.json"))
    assert summary["distributed"] == {"type": "FSDP", "processes": 2, "fsdp_version": version}  # sharded, not DDP
    two = [json.loads(line) for line in open(tmp_path / "two" / "metrics.jsonl")]
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    assert one[-1]["loss"] != pytest.approx(one[0]["loss"], abs=1e-4)  # it trained
    keys = ("loss", "rewards/margins") + (("kl/chosen",) if method == "tdpo2" else ())
    # float32 sums in another order (full logits vs the chunked head, 2 half-batches): measured <= 1.1e-6
    margin(
        f"fsdp{version} {method} max |curve difference|",
        max(abs(a[k] - b[k]) for a, b in zip(one, two) for k in keys),
        1e-5,
        above=False,
    )
    base, w1, w2 = (
        AutoModelForCausalLM.from_pretrained(p).state_dict()
        for p in (world["sft"], one_dir / "final", tmp_path / "two" / "final")
    )
    assert sorted(w2) == sorted(base)

    def dist(a, b):
        return sum((a[k] - b[k]).pow(2).sum() for k in base).sqrt().item()

    # the gathered weights are the trained ones (not a shard, not the start): measured 4e-5 of the distance the
    # training moved them; 1e-3 leaves 25x for other CPUs' rounding, and a rank-0 shard or the start would be ~1
    margin(f"fsdp{version} final vs 1-process final, relative", dist(w2, w1) / dist(w1, base), 1e-3, above=False)


@pytest.mark.skipif(torch.cuda.is_available(), reason="FSDP1 broadcasts from a GPU where there is one")
@pytest.mark.parametrize(
    "env, refused",
    [
        ({"FSDP_SYNC_MODULE_STATES": "true"}, "fsdp_sync_module_states"),  # what `accelerate config` writes for FSDP1
        (
            {"FSDP_CPU_RAM_EFFICIENT_LOADING": "1"},
            "fsdp_cpu_ram_efficient_loading",
        ),  # which turns sync_module_states on
        ({"FSDP_SYNC_MODULE_STATES": "true", "FSDP_VERSION": "2"}, None),  # FSDP2 has no broadcast step
        ({"FSDP_SYNC_MODULE_STATES": "false", "FSDP_CPU_RAM_EFFICIENT_LOADING": "false"}, None),
    ],
)
def test_fsdp1_on_cpu_that_needs_a_gpu_is_a_config_error(world, tmp_path, monkeypatch, env, refused):
    """Checked from the launcher's settings before accelerate is asked, whatever accelerate's own error would say."""
    from featalign.distributed import check_fsdp_on_cpu
    from featalign.errors import ConfigError

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    if refused:
        with pytest.raises(ConfigError, match=f"cannot use {refused}"):
            check_fsdp_on_cpu()
        with pytest.raises(ConfigError, match="fsdp_sync_module_states: false"):
            Trainer(cfg_for(world, tmp_path, "dpo"))
    else:
        check_fsdp_on_cpu()


def test_lora_with_gradient_checkpointing_saves_a_merged_model(world, world_sae, tmp_path):
    pytest.importorskip("peft", reason="peft (test extra) is not installed")
    from transformers import AutoModelForCausalLM

    cfg = cfg_for(
        world,
        tmp_path,
        "fpo",
        sae=world_sae["path"],
        layer=2,
        k=20,
        lora_r=4,
        gradient_checkpointing=True,
        lr=1e-3,
        max_steps=3,
    )
    run_train(cfg)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "fpo" / "final").state_dict()
    base = AutoModelForCausalLM.from_pretrained(world["sft"]).state_dict()
    assert sorted(merged) == sorted(base)  # a plain model, no adapter keys
    assert max((merged[k] - base[k]).abs().max().item() for k in base) > 0
    assert torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])  # LoRA leaves embeddings


def test_length_grouping_pads_less_and_is_a_seeded_permutation():
    from featalign.data.batching import group_by_length

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(10, 300, (203,), generator=g).tolist()
    order = torch.randperm(203, generator=g).tolist()

    def grouped(seed):
        return group_by_length(order, lengths, 8, torch.Generator().manual_seed(seed), window=4)

    out = grouped(1)
    assert sorted(out) == list(range(203)) and out == grouped(1) and out != grouped(2)
    assert out[200:] == order[200:]  # the partial batch an epoch drops is the random one

    def padded(o):
        return sum(
            8 * max(lengths[i] for i in o[s : s + 8]) - sum(lengths[i] for i in o[s : s + 8]) for s in range(0, 200, 8)
        )

    # random batches of lengths uniform on 10..300 pad ~45% of positions, sorted windows of 32 under 10%
    assert padded(out) < 0.3 * padded(order)
    window_of = {i: k // 32 for k, i in enumerate(order)}
    assert all(len({window_of[i] for i in out[s : s + 8]}) == 1 for s in range(0, 200, 8))  # batches from one window


def test_lora_live_reference_is_the_adapter_off_policy(world, tmp_path, monkeypatch):
    """TDPO-2 + LoRA loads one model, and its losses equal a run with a separately loaded reference."""
    pytest.importorskip("peft", reason="peft (test extra) is not installed")
    import featalign.trainer as T

    loads = []
    real = T.load_model
    monkeypatch.setattr(T, "load_model", lambda path, *a, **k: loads.append(path) or real(path, *a, **k))
    kw = dict(lora_r=4, lr=1e-2, max_steps=2, log_every=1, limit=32, batch_size=4)
    one = run_train(cfg_for(world, tmp_path / "one", "tdpo2", **kw))
    assert loads == [world["sft"]] and not one["reference_model_loaded"]
    # the same folder under another name: the trainer loads it as a separate reference model
    two = run_train(cfg_for(world, tmp_path / "two", "tdpo2", ref_model=os.path.join(world["sft"], "."), **kw))
    assert two["reference_model_loaded"]
    a = [json.loads(line) for line in open(tmp_path / "one" / "tdpo2" / "metrics.jsonl")]
    b = [json.loads(line) for line in open(tmp_path / "two" / "tdpo2" / "metrics.jsonl")]
    assert a[1]["kl/chosen"] > 0  # the adapter moved the policy after one step at lr 1e-2
    for x, y in zip(a, b):
        for key in ("loss", "kl/chosen", "rewards/margins"):
            assert x[key] == pytest.approx(y[key], abs=1e-5), key


def test_offline_cache_is_built_from_the_policy_without_a_second_load(world, tmp_path, monkeypatch):
    import featalign.trainer as T

    loads = []
    real = T.load_model
    monkeypatch.setattr(T, "load_model", lambda path, *a, **k: loads.append(path) or real(path, *a, **k))
    s = run_train(cfg_for(world, tmp_path, "dpo", max_steps=1, limit=16))
    assert loads == [world["sft"]] and not s["reference_model_loaded"]
    assert os.path.exists(tmp_path / "dpo" / "ref_cache" / "manifest.json")


def test_trdpo_lora_update_mixes_the_base_and_keeps_the_policy(world, tmp_path):
    pytest.importorskip("peft", reason="peft (test extra) is not installed")
    t = Trainer(cfg_for(world, tmp_path, "trdpo", lora_r=4, trdpo_alpha=0.25, max_steps=1))
    assert t.ref_model is None and t.ref_adapter_off
    peft_model = t.acc.unwrap_model(t.model)
    layer = peft_model.get_base_model().model.layers[0].mlp.up_proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    w0, delta = layer.get_base_layer().weight.clone(), layer.get_delta_weight("default").clone()
    ids = torch.tensor([[1, 5, 7, 9, 11]])
    with torch.no_grad():
        before = peft_model(input_ids=ids).logits
    t._update_reference()
    with torch.no_grad():
        after = peft_model(input_ids=ids).logits
    assert torch.allclose(
        layer.get_base_layer().weight, w0 + 0.25 * delta, atol=1e-6
    )  # reference = 0.25 policy + 0.75 old
    assert torch.allclose(before, after, atol=1e-5)  # the policy itself did not move


def test_pack_setting_is_checked_and_yaml_booleans_map_to_on_off():
    from featalign.errors import ConfigError
    from featalign.train import TrainConfig

    for given, want in ((True, "on"), (False, "off"), ("auto", "auto")):
        cfg = TrainConfig(method="dpo", model="m", data="d", pack=given)
        cfg.validate()
        assert cfg.pack == want
    with pytest.raises(ConfigError, match="pack: 'yes' is not one of auto, on, off"):
        TrainConfig(method="dpo", model="m", data="d", pack="yes").validate()
