"""FPO's feature discrepancy D, the paper's and the released code's, against D written out step by step."""

import pytest
import torch
from tiny import tiny_lm

from featalign.feature_terms import capture, fpo_discrepancy, reference_features
from featalign.losses import feature_mse
from featalign.sae import random_sae


@pytest.fixture(scope="module")
def batch():
    """Two pairs (chosen rows first) of different prompt and answer lengths, right-padded to 9 tokens; a policy and a
    reference a little apart; a ReLU SAE (dense activations, so every feature counts) reading the 32-dim stream."""
    policy = tiny_lm(vocab=50, seed=0).eval()
    reference = tiny_lm(vocab=50, seed=0).eval()
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    ids = torch.randint(1, 50, (4, 9), generator=torch.Generator().manual_seed(2))
    att = torch.tensor([[1] * 9, [1] * 6 + [0] * 3, [1] * 7 + [0] * 2, [1] * 5 + [0] * 4])
    resp = torch.tensor(
        [
            [0, 0, 0, 1, 1, 1, 1, 1, 1],
            [0, 0, 1, 1, 1, 1, 0, 0, 0],
            [0, 0, 0, 1, 1, 1, 1, 0, 0],
            [0, 0, 1, 1, 1, 0, 0, 0, 0],
        ]
    )
    sae = random_sae(32, 12, "relu", seed=3, noise=0.3)
    return policy, reference, ids, att, resp, sae


def released_oracle(policy, reference, ids, att, resp, sae, k):
    """The released code's D: the SAE on hidden_states[-1], labels shifted one to the left, feature maps masked to the
    positions whose label is an answer token and averaged over the whole padded length, the policy's top-k, the
    reference's values gathered from its full vector, the mean squared difference over the k."""

    def pooled(model):
        hs = model(input_ids=ids, attention_mask=att, output_hidden_states=True).hidden_states[-1]
        mask = resp[:, 1:].float()
        fm = sae.encode(hs)[:, :-1] * mask[..., None]
        return fm.mean(dim=1)

    with torch.no_grad():
        c_pol, c_ref = pooled(policy), pooled(reference)
    top = c_pol.topk(k, dim=-1).indices
    return ((c_ref.gather(1, top) - c_pol.gather(1, top)) ** 2).mean(-1)


def featalign_d(policy, reference, ids, att, resp, sae, k, variant, layer=0):
    with torch.no_grad(), capture(reference, layer, variant) as box:
        reference(input_ids=ids, attention_mask=att)
    rows = reference_features(sae, box["h"], resp, k, variant)
    cache = {
        f"{side}_{name}": v[sl]
        for name, v in rows.items()
        for side, sl in (("chosen", slice(0, 2)), ("rejected", slice(2, 4)))
    }
    with torch.no_grad(), capture(policy, layer, variant) as box:
        policy(input_ids=ids, attention_mask=att)
    d = fpo_discrepancy(sae, box["h"], resp, cache, k, "union", variant)
    return torch.cat([d["feat_mse_chosen"], d["feat_mse_rejected"]])


def test_released_variant_is_the_released_code(batch):
    want = released_oracle(*batch, k=3)
    got = featalign_d(*batch, k=3, variant="released")
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-9) and (want > 0).all()


def test_each_difference_of_the_released_code_moves_d(batch):
    """The paper's D, then each of the released code's four differences alone, by hand on the same tensors."""
    policy, reference, ids, att, resp, sae = batch
    k = 3

    def states(model, final: bool):
        out = model(input_ids=ids, attention_mask=att, output_hidden_states=True)
        return out.hidden_states[-1] if final else out.hidden_states[1]  # [1]: decoder layer 0's own output

    def pooled(model, final=False, predicting=False, padded=False):
        with torch.no_grad():
            f = sae.encode(states(model, final))
        mask = resp[:, 1:] if predicting else resp
        f = f[:, :-1] if predicting else f
        total = (f * mask[..., None]).sum(1)
        return total / (f.shape[1] if padded else mask.sum(1, keepdim=True).clamp(min=1))

    def d(final=False, predicting=False, padded=False, full_reference=False, topk_from="union"):
        c_pol = pooled(policy, final, predicting, padded)
        c_ref = pooled(reference, final, predicting, padded)
        n_kept = c_ref.shape[1] if full_reference else k
        vals, idx = c_ref.topk(n_kept, dim=-1)
        return feature_mse(c_pol, idx, vals, k, "policy" if full_reference else topk_from)

    paper = d()
    assert torch.allclose(featalign_d(*batch, k=3, variant="paper"), paper, rtol=1e-5)  # featalign's paper variant
    for name, changed in {
        "(a) the reference's full vector, the policy's top-k": d(full_reference=True),
        "(b) divided by the padded length": d(padded=True),
        "(c) the positions that predict the answer": d(predicting=True),
        "(d) the final-norm hidden state": d(final=True),
    }.items():
        assert not torch.allclose(changed, paper, rtol=1e-3), name
    everything = d(final=True, predicting=True, padded=True, full_reference=True)
    assert torch.allclose(everything, released_oracle(*batch, k=3), rtol=1e-5)
    # (b) on this batch: the padded length 8 against 3-6 answer tokens shrinks every pooled value, so D shrinks
    assert (d(padded=True) < paper).all()
