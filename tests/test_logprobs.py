"""The chunked log-prob path against the plain full-logits path (the oracle: log_softmax over the model's logits)."""

import copy
import logging

import pytest
import torch
from tiny import tiny_lm

import featalign.head as H
import featalign.logprobs as L
from featalign.fused import can_fuse, fused_loss
from featalign.logprobs import response_logps, response_terms, sample_logps_entropy, sequential_kl
from featalign.packing import packing_ok


def tiny(kind: str, vocab: int = 300, **kw):
    if kind == "gemma2":  # final logit soft-capping at a small cap, so the tanh bends the logits
        return tiny_lm("gemma2", vocab, final_logit_softcapping=2.0, **kw)
    return tiny_lm("llama", vocab, tie_word_embeddings=False, **kw)


def tiny_and_ref(kind: str):
    """A tiny model and a frozen reference a little away from it (so KL and log-ratios are not trivially 0)."""
    model = tiny(kind)
    ref = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, ref


def batch(vocab: int = 300, n: int = 6, t: int = 20):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (n, t), generator=g)
    att = torch.ones_like(ids)
    att[3, 15:] = 0  # right padding on two rows
    att[5, 11:] = 0
    resp = torch.zeros_like(ids)
    resp[:, 7:] = 1
    resp[1, 4:] = 1  # a row with a shorter prompt
    return ids, att, resp * att


def plain_terms(model, ref, ids, att, resp):
    logits = model(input_ids=ids, attention_mask=att).logits
    with torch.no_grad():
        ref_logits = ref(input_ids=ids, attention_mask=att).logits
    lp, length = response_logps(logits, ids, resp)
    return {
        "logps": lp,
        "length": length,
        "ref_logps": response_logps(ref_logits, ids, resp)[0],
        "kl": sequential_kl(logits, ref_logits, resp),
    }


def grads_of(model, terms):
    """Gradients of a loss mixing every term with distinct per-row weights (so no error can cancel out)."""
    model.zero_grad()
    w = torch.linspace(-1, 1, len(terms["logps"]))
    (0.1 * (w * terms["logps"]).sum() + ((w + 2) * terms["kl"]).sum()).backward()
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
@pytest.mark.parametrize("chunk", [0, 7])
def test_chunked_equals_full_logits_with_gradients(kind, chunk):
    model, ref = tiny_and_ref(kind)
    ids, att, resp = batch()
    got = response_terms(model, ids, att, resp, ref=ref, kl=True, chunk=chunk)
    want = plain_terms(model, ref, ids, att, resp)
    assert model._featalign_chunked  # the split path ran, not the fallback
    for k in want:  # log-probs are sums of ~13 terms of size ~6: 1e-5 is float32 rounding, not slack
        assert torch.allclose(got[k], want[k], atol=1e-5, rtol=1e-6), (k, (got[k] - want[k]).abs().max())
    g_got, g_want = grads_of(model, got), grads_of(model, want)
    assert g_got.keys() == g_want.keys()
    for k in g_want:
        assert torch.allclose(g_got[k], g_want[k], atol=1e-6, rtol=1e-4), k


def test_full_vocabulary_logits_are_never_saved_for_backward():
    vocab = 4000
    model = tiny("llama", vocab)
    ids, att, resp = batch(vocab, n=6, t=48)
    biggest = []

    def pack(x):
        biggest.append(x.numel())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        response_terms(model, ids, att, resp)["logps"].sum().backward()
    logits_numel = ids.numel() * vocab
    assert max(biggest) <= model.lm_head.weight.numel() < logits_numel  # the largest saved tensor is the head's weight


def test_a_head_that_does_not_reproduce_the_logits_falls_back(caplog):
    model = tiny("llama")
    model.config.final_logit_softcapping = 1.0  # the head would cap; Llama's forward does not
    ids, att, resp = batch()
    with caplog.at_level(logging.WARNING, logger="featalign.logprobs"):
        got = response_terms(model, ids, att, resp)
    assert "does not reproduce" in caplog.text and model._featalign_chunked is False
    with torch.no_grad():
        want, _ = response_logps(model(input_ids=ids, attention_mask=att).logits, ids, resp)
    assert torch.allclose(got["logps"], want, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_sample_logps_and_entropy(kind):
    model = tiny(kind)
    ids, att, resp = batch()
    lp, ent = sample_logps_entropy(model, ids, att, resp, chunk=5)
    with torch.no_grad():
        logp = model(input_ids=ids, attention_mask=att).logits[:, :-1].float().log_softmax(-1)
    m = resp[:, 1:].bool()
    want_lp = logp.gather(2, ids[:, 1:, None]).squeeze(2) * m
    want_ent = -(logp.exp() * logp).sum(-1) * m
    assert torch.allclose(lp, want_lp, atol=1e-5) and torch.allclose(ent, want_ent, atol=1e-5)
    assert (ent[m] > 0).all() and (ent[~m] == 0).all()


def test_lora_reference_is_the_base_model_with_the_adapter_off():
    pytest.importorskip("peft", reason="peft (test extra) is not installed")
    from peft import LoraConfig, get_peft_model

    base = tiny("llama")
    frozen = copy.deepcopy(base).requires_grad_(False)
    model = get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    ids, att, resp = batch()
    got = response_terms(model, ids, att, resp, kl=True, ref_adapter_off=True)
    want = plain_terms(model, frozen, ids, att, resp)
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-5), k
    assert (want["kl"] > 0).all()  # the adapter (random init) moved the policy: the KL is not trivially 0
    g_got, g_want = grads_of(model, got), grads_of(model, want)
    assert g_got and all("lora_" in k for k in g_got)
    for k in g_want:
        assert torch.allclose(g_got[k], g_want[k], atol=1e-6, rtol=1e-4), k


def test_every_method_loss_matches_the_full_logits_path(world, world_sae, tmp_path, monkeypatch):
    """The trainer's loss and gradients for each method, chunked (a few positions per chunk) vs full logits."""
    from featalign.losses import METHODS
    from featalign.train import TrainConfig
    from featalign.trainer import Trainer

    monkeypatch.setattr(L, "CHUNK_ELEMENTS", 3 * 1024)
    for method in METHODS:
        extra = {"sae": world_sae["path"], "layer": world_sae["layer"], "k": 20} if method == "fpo" else {}
        t = Trainer(
            TrainConfig(
                method=method,
                model=world["sft"],
                data=world["train"],
                out=str(tmp_path / method),
                batch_size=4,
                max_steps=1,
                limit=8,
                max_length=96,
                max_prompt_length=24,
                progress=False,
                tensorboard=False,
                **extra,
            )
        )
        assert t.packed is False  # --pack auto on a CPU model without flash attention: padded
        idx = list(range(4))
        results = {}
        for path in ("fused", "packed", "chunked", "full"):  # the default, one padding-free row, recompute, full logits
            monkeypatch.setattr(H, "splittable", (lambda m: True) if path != "full" else (lambda m: False))
            t.cfg.fused_head = path in ("fused", "packed")
            t.packed = path == "packed" and packing_ok(t.model)  # what --pack on gives (the check runs in __init__)
            b = t._device_batch(idx)
            b.pop("n_tokens"), b.pop("n_positions")
            t.model.zero_grad()
            if path in ("fused", "packed"):
                fw = t.batch_forward(t.model, b)[0]
                assert can_fuse(fw) and (fw.packing is not None) == (path == "packed")
            loss, metrics = t.loss(t.model, b)
            loss.backward()
            results[path] = (
                loss.detach(),
                metrics,
                {k: p.grad.clone() for k, p in t.model.named_parameters() if p.grad is not None},
            )
        l_full, m_full, g_full = results["full"]
        for path in ("fused", "packed", "chunked"):
            l1, m1, g1 = results[path]
            assert abs(l1 - l_full) < 1e-5, (method, path, l1, l_full)
            assert g1.keys() == g_full.keys(), (method, path)
            for k in g_full:
                assert torch.allclose(g1[k], g_full[k], atol=1e-6, rtol=1e-3), (method, path, k)
            for k in set(m_full) - {"rewards/accuracies"}:  # at the reference every reward is ~0: its sign is rounding
                assert torch.allclose(m1[k], m_full[k], atol=1e-5, rtol=1e-5), (method, path, k)


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
@pytest.mark.parametrize("chunk", [0, 4])
def test_fused_pair_loss_equals_the_plain_path(kind, chunk):
    """``fused.fused_loss`` (head gradients computed in forward, pair by pair) against autograd through the
    chunked terms: loss, row terms, and the gradients of the weights and of an extra per-pair input."""
    model, ref = tiny_and_ref(kind)
    ids, att, resp = batch()  # 3 pairs: rows 0-2 chosen, 3-5 rejected, of unequal lengths
    w = torch.tensor([0.3, -1.2, 2.0], requires_grad=True)

    def pair_loss(r, ex):  # nonlinear in every row term and in the extra, like the preference losses
        u = 0.1 * (r["logps"][0] - r["logps"][1]) - (r["kl"][1] - r["kl"][0]) * ex["w"] + 0.01 * r["ref_logps"].sum()
        return -torch.nn.functional.logsigmoid(u).sum() + (ex["w"] ** 2).sum()

    def grads():
        g = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        g["w"] = w.grad.clone()
        model.zero_grad(), w.grad.zero_()
        return g

    fw = L.forward(model, ids, att, resp, ref=ref, kl=True, chunk=chunk)
    plain = fw.terms()
    want = sum(pair_loss({k: v[[i, 3 + i]] for k, v in plain.items()}, {"w": w[i : i + 1]}) for i in range(3)) / 3
    (2.5 * want).backward()  # a scaled loss, as gradient accumulation gives: the fused backward must scale too
    g_want = grads()
    fw = L.forward(model, ids, att, resp, ref=ref, kl=True, chunk=chunk)
    assert can_fuse(fw) and not can_fuse(fw, budget=10)  # a budget below one pair's logits: the plain path
    got, rows = fused_loss(fw, pair_loss, {"w": w})
    (2.5 * got).backward()
    g_got = grads()
    assert abs(got.item() - want.item()) < 1e-5
    for k in ("logps", "ref_logps", "kl", "length"):
        assert torch.allclose(rows[k], plain[k].detach(), atol=1e-5), k
    assert g_got.keys() == g_want.keys()
    for k in g_want:
        assert torch.allclose(g_got[k], g_want[k], atol=1e-6, rtol=1e-4), (k, (g_got[k] - g_want[k]).abs().max())


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_packed_row_equals_the_padded_batch(kind):
    """``pack=True`` runs the batch as one row without padding: same terms and gradients as the padded batch."""
    model, ref = tiny_and_ref(kind)
    ids, att, resp = batch()
    assert packing_ok(model) and packing_ok(ref)
    fw = L.forward(model, ids, att, resp, ref=ref, kl=True, pack=True)
    assert fw.packing is not None and fw.packing.input_ids.shape == (1, int(att.sum()))
    got = fw.terms()
    want = L.forward(model, ids, att, resp, ref=ref, kl=True).terms()
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-5), (k, (got[k] - want[k]).abs().max())
    g_got, g_want = grads_of(model, got), grads_of(model, want)
    for k in g_want:
        assert torch.allclose(g_got[k], g_want[k], atol=1e-6, rtol=1e-4), k
    h = torch.randn(1, int(att.sum()), 3)
    assert torch.equal(fw.packing.unpack(h)[att.bool()], h[0]) and (fw.packing.unpack(h)[~att.bool()] == 0).all()


def test_a_model_that_cannot_pack_keeps_the_padded_batch(caplog):
    model = tiny("llama")
    real = model.forward

    def ignores_position_ids(
        *a, position_ids=None, logits_to_keep=0, **kw
    ):  # a model whose attention does not read them
        return real(*a, logits_to_keep=logits_to_keep, **kw)

    model.forward = ignores_position_ids
    ids, att, resp = batch()
    with caplog.at_level(logging.WARNING, logger="featalign.logprobs"):
        fw = L.forward(model, ids, att, resp, pack=True)
    assert fw.packing is None and "batches stay padded" in caplog.text
    want = L.forward(model, ids, att, resp).terms()
    assert torch.allclose(fw.terms()["logps"], want["logps"], atol=1e-6)
