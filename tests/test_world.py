import json
import random

import pytest
from conftest import margin

from featalign.world import build_world, lang, reward, reward_parts
from featalign.world.build import WorldConfig, build_tokenizer, sample_pairs


def test_vocabulary_and_lengths():
    assert len(lang.vocabulary()) >= 500
    rng = random.Random(0)
    lengths = [len(lang.sample_response(rng, "food").split()) for _ in range(2000)]
    assert min(lengths) >= 8 and sorted(lengths)[int(0.98 * len(lengths))] <= 56
    templates = {lang.sample_prompt(rng).prompt.split()[0] for _ in range(500)}
    assert len(templates) >= 6


def test_reward_scores_hand_written_examples():
    p = "tell me about the bread"
    on_pos = "i think the soup is wonderful . the cheese tastes and it is lovely ."
    off_pos = "i think the guitar is wonderful . the piano plays and it is lovely ."
    on_neg = "i think the soup is terrible . the cheese tastes and it is awful ."
    assert reward_parts(p, on_pos)["topic"] == 1.0
    assert reward_parts(p, off_pos)["topic"] == 0.0
    assert reward_parts(p, on_pos)["sentiment"] > 0 > reward_parts(p, on_neg)["sentiment"]
    assert reward(p, on_pos) > reward(p, off_pos) and reward(p, on_pos) > reward(p, on_neg)
    # the length term is mild and capped: doubling a good answer helps a little, never past the cap
    short, long = "the soup tastes .", ("the soup tastes . " * 12).strip()
    assert 0 < reward(p, long) - reward(p, short) <= lang.RewardWeights.length + 1e-9
    # closed form: topic 1, sentiment (2-0)/(2+0+1), length 15/40
    assert abs(reward(p, on_pos) - (1 + 2 / 3 + 0.3 * 15 / 40)) < 1e-9


def test_negation_flips_the_word_after_it():
    p = "tell me about the bread"
    assert reward_parts(p, "the soup is not lovely .")["sentiment"] == -1 / 2
    assert reward_parts(p, "the soup is not awful , it is lovely .")["sentiment"] == 2 / 3
    # "not" flips only the word right after it
    assert reward_parts(p, "not the soup is lovely .")["sentiment"] == 1 / 2
    assert lang.polarities("not awful not lovely awful".split()) == [1, -1, -1]


def test_generator_mood_is_what_the_reward_reads():
    """At p_pos = 1 every sentiment phrase is positive, negated or not; at p_on = 1 every topical word is on topic."""
    rng = random.Random(3)
    negated = 0
    for _ in range(300):
        ex = lang.sample_prompt(rng)
        text = lang.sample_response(rng, ex.topic, p_on=1.0, p_pos=1.0)
        n = len(lang.polarities(text.split()))
        parts = reward_parts(ex.prompt, text)
        has_topical = any(w in lang.TOPIC_OF for w in text.split())  # "we often feel lovely ." alone has none: topic 0
        assert parts["topic"] == (1.0 if has_topical else 0.0) and parts["sentiment"] == pytest.approx(n / (n + 1))
        negated += " not " in f" {text} "
    assert 50 < negated < 300  # negation is common (30% of phrases), not universal


def test_topic_cue_says_whether_the_noun_is_on_the_prompts_topic():
    """The word after a clause's first noun is "indeed" when the noun is on the prompt's topic and "anyway" when not,
    in about 80% of clauses with a noun; the reward ignores both."""
    rng = random.Random(4)
    cues = clauses = 0
    for p_on in (0.0, 1.0):
        for _ in range(300):
            ex = lang.sample_prompt(rng)
            words = lang.sample_response(rng, ex.topic, p_on=p_on).split()
            for i, w in enumerate(words):
                if w in (lang.ON_TOPIC_CUE, lang.OFF_TOPIC_CUE):
                    assert lang.TOPIC_OF[words[i - 1]] in lang.TOPICS
                    assert (lang.TOPIC_OF[words[i - 1]] == ex.topic) == (p_on == 1.0)
                    assert w == (lang.ON_TOPIC_CUE if p_on == 1.0 else lang.OFF_TOPIC_CUE)
                    cues += 1
            clauses += sum(w in (".", ",", "!") for w in words) - " ".join(words).count("feel")
    assert 0.7 < cues / clauses < 0.9
    p = "tell me about the bread"
    assert reward_parts(p, "the soup indeed tastes .") == reward_parts(p, "the soup tastes .") | {"length": 5 / 40}


def test_topic_blind_is_the_generators_posterior():
    from featalign.world.probe import topic_blind

    # every cue is scored, the first at 0.5; after one on-topic cue the next clause is on topic with
    # (1 + 0.5) / (1 + 1) = 0.75
    assert topic_blind(
        [{"prompt": "tell me about food", "response": "the soup indeed tastes . the cake indeed bakes"}]
    ) == pytest.approx((0.5 + 0.75) / 2)
    assert topic_blind(
        [{"prompt": "tell me about food", "response": "the soup indeed tastes . the rain anyway falls"}]
    ) == pytest.approx((0.5 + 0.25) / 2)
    ex = [
        {
            "prompt": (e := lang.sample_prompt(random.Random(i))).prompt,
            "response": lang.sample_response(random.Random(i), e.topic),
        }
        for i in range(300)
    ]
    assert 0.55 < topic_blind(ex) < 0.7


def test_generation_is_deterministic():
    a = sample_pairs(random.Random(7), 50, 0.15)
    b = sample_pairs(random.Random(7), 50, 0.15)
    assert a == b
    assert all(x["chosen_reward"] > x["rejected_reward"] for x in a)


def test_tokenizer_round_trips(tmp_path):
    tok = build_tokenizer()
    rng = random.Random(1)
    for _ in range(50):
        ex = lang.sample_prompt(rng)
        text = lang.sample_response(rng, ex.topic)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again("the soup is lovely")["input_ids"] == tok("the soup is lovely")["input_ids"]
    chat = again.apply_chat_template(
        [{"role": "user", "content": "tell me about the bread"}], tokenize=False, add_generation_prompt=True
    )
    assert chat.strip() == "<user> tell me about the bread <assistant>"
    assert again.pad_token == "<pad>" and again.eos_token == "<eos>"


def test_world_build(world):
    m = world["manifest"]
    # the SFT model beats a unigram model of responses by a clear margin on held-out world text; measured ratio
    # 0.086-0.095 over world seeds 0-2 and three thread/kernel settings: a 3x margin to the bound
    margin("sft_ppl / unigram_ppl", m["sft_ppl"] / m["unigram_ppl"], 0.3, above=False)
    assert 5e5 < m["n_params"] < 5e6
    rows = [json.loads(line) for line in open(world["train"])]
    assert len(rows) == WorldConfig.quick().n_train_pairs
    for r in rows:
        assert {"prompt", "chosen", "rejected"} <= set(r)
        assert reward(r["prompt"], r["chosen"]) > reward(r["prompt"], r["rejected"])
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(world["sft"])
    assert model.config.num_hidden_layers == WorldConfig.quick().num_layers


@pytest.mark.slow
def test_committed_world_is_what_the_code_builds(tmp_path):
    """The suite's quick world is a committed build (tests/data/quick-world). It must be today's: built with today's
    settings, and a build from scratch writes the same corpus, pairs and vocabulary. The SFT run is cut to 100 of
    its 1,000 steps here, where it already beats a unigram model of responses by 9x (perplexity ratio 0.109 measured,
    0.104 at 200 steps): a build that does not learn fails the bound of 0.3."""
    import quick_world
    from transformers import AutoTokenizer

    assert quick_world.committed_is_current(), (
        "the committed quick world is stale: run `make test-assets` and commit it"
    )
    cfg = WorldConfig.quick()
    cfg.sft_steps = 100
    m = build_world(str(tmp_path / "w"), cfg, progress=False)
    for name in ("sft_text.jsonl", "prefs/train.jsonl", "prefs/test.jsonl"):
        assert (tmp_path / "w" / name).read_bytes() == open(f"{quick_world.ROOT}/{name}", "rb").read(), name
    vocab = AutoTokenizer.from_pretrained(f"{quick_world.ROOT}/sft").get_vocab()
    assert AutoTokenizer.from_pretrained(tmp_path / "w" / "sft").get_vocab() == vocab
    margin("sft_ppl / unigram_ppl after 100 SFT steps", m["sft_ppl"] / m["unigram_ppl"], 0.3, above=False)


def test_mood_oracle_is_the_generators_posterior():
    from featalign.world.probe import mood_oracle

    # one earlier positive phrase: the next phrase is positive with (1 + 0.5) / (1 + 1) = 0.75
    assert mood_oracle([{"prompt": "", "response": "i think it is lovely . it is lovely"}]) == pytest.approx(0.75)
    assert mood_oracle([{"prompt": "", "response": "it is not awful . it is awful"}]) == pytest.approx(0.25)
    assert (
        0.6
        < mood_oracle([{"prompt": "", "response": lang.sample_response(random.Random(i), "food")} for i in range(300)])
        < 0.7
    )


def test_world_model_tracks_mood(world):
    """The SFT model puts more of its sentiment-word probability on the answer's polarity than a mood-blind
    model (0.5), which a language without local sentiment cues gives (words of both polarities share one embedding)."""
    from featalign.models import load_model, load_tokenizer
    from featalign.world.probe import mood_oracle, mood_probe, probe_examples

    ex = probe_examples()
    score = mood_probe(load_model(world["sft"]), load_tokenizer(world["sft"]), ex)
    print(f"mood oracle {mood_oracle(ex):.3f}")
    margin("mood probe of the quick world's SFT model", score, 0.56)


def test_world_is_cached_and_deterministic(world, tmp_path):
    from conftest import SEED

    again = build_world(world["root"], WorldConfig.quick(SEED), progress=False)
    assert again == world["manifest"]  # reused, not rebuilt
    cfg = WorldConfig.quick()
    cfg.sft_steps, cfg.n_sft, cfg.n_train_pairs = 5, 200, 40
    a = build_world(str(tmp_path / "a"), cfg, progress=False)
    b = build_world(str(tmp_path / "b"), cfg, progress=False)
    assert a["sft_ppl"] == b["sft_ppl"]
    assert open(tmp_path / "a/prefs/train.jsonl").read() == open(tmp_path / "b/prefs/train.jsonl").read()
    from safetensors.torch import load_file

    wa, wb = load_file(tmp_path / "a/sft/model.safetensors"), load_file(tmp_path / "b/sft/model.safetensors")
    assert all((wa[k] == wb[k]).all() for k in wa)


def test_world_sae_is_sparse_and_trained(world, tmp_path):
    """The SAE compare trains on the world (Feature Choice with Zipf token shares, compare's width, k and learning
    rate, fewer tokens) on the quick world's model: Gemma Scope's sparsity, it reconstructs, it moves away from its
    random init, and no latent is dead or dense on held-out tokens (by construction every latent takes its share of
    each training batch, none above 8%). How well latents track the reward parts over whole responses (explain's
    measure) is printed, not asserted: the quick world's model has not learnt the topic comparison (README, "The
    built-in world"), so its topic figure sits too close to any useful bound."""
    from conftest import SEED, margin

    from featalign.compare import CompareConfig
    from featalign.features import best_reward_features
    from featalign.judges import make_judge
    from featalign.models import load_model, load_tokenizer
    from featalign.sae.metrics import decoder_cosine_to_init
    from featalign.sae.train import SAETrainConfig, train_sae

    model, tok = load_model(world["sft"]).eval(), load_tokenizer(world["sft"])
    d_in = model.config.hidden_size
    b = CompareConfig().budget()
    sae, rep = train_sae(
        SAETrainConfig(
            model=world["sft"],
            data=world["sft_text"],
            layer=2,
            out=str(tmp_path / "sae"),
            architecture=b.sae_arch,
            d_sae=b.sae_d,
            k=b.sae_k,
            fc_zipf=b.sae_fc_zipf,
            dead_tokens=b.sae_dead_tokens,
            tokens=300_000,
            lr=b.sae_lr,
            eval_tokens=20_000,
            seed=SEED,
            progress=False,
        ),
        model=model,
        tokenizer=tok,
    )
    best = best_reward_features(model, sae, tok, world["test"], make_judge("featalign.world.judge:reward"), limit=150)
    print(
        f"dead {rep['dead_fraction']:.3f}, dense {rep['dense_fraction']:.3f}, best |r|: "
        + ", ".join(f"{k} {v['r']:.3f}" for k, v in best.items())
    )
    assert set(best) == {"topic", "sentiment", "length", "reward"}
    # oracle for the reward's entry: numpy's Pearson r of every latent's pooled activation with the world's reward
    import numpy as np

    from featalign import data as D
    from featalign.features import pooled_features

    raw, pairs, _ = D.prepare_pairs(D.DataOptions(data=world["test"], limit=150), tok)
    rewards = np.array([reward(p.prompt, p.chosen) for p in raw] + [reward(p.prompt, p.rejected) for p in raw])
    pooled = pooled_features(model, sae, 2, D.pair_sequences(pairs), tok.pad_token_id).numpy().astype(np.float64)
    live = pooled.std(0) > 0
    r = np.zeros(sae.d_sae)
    r[live] = [abs(np.corrcoef(pooled[:, j], rewards)[0, 1]) for j in np.flatnonzero(live)]
    assert best["reward"]["latent"] == int(r.argmax()) and best["reward"]["r"] == pytest.approx(r.max(), abs=1e-3)
    margin("L0 / d_in", rep["l0"] / d_in, 0.08, above=False)  # k = 6 of 128: 4.7% on average in training
    margin("explained variance", rep["explained_variance"], 0.9)
    margin("dead fraction", rep["dead_fraction"], 0.05, above=False)
    margin("dense fraction", rep["dense_fraction"], 0.05, above=False)
    from featalign.sae import load_sae

    # an SAE left near its init sits at 0.9+
    margin("median decoder cosine to init", decoder_cosine_to_init(load_sae(str(tmp_path / "sae"))), 0.5, above=False)
