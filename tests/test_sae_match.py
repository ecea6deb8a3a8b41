"""SAE Match: folding, exact recovery of permutations (dense and sparse solvers), transfer check, CLI."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import margin

from featalign.errors import ConfigError
from featalign.sae import SAE, SAEConfig
from featalign.sae import model as sae_model
from featalign.sae.match import fold, match_saes, summarize, transfer_eval


def random_sae(d_in=24, d_sae=64, arch="topk", seed=0) -> SAE:
    return sae_model.random_sae(d_in, d_sae, arch, k=8, seed=seed)


def permuted(sae: SAE, perm: torch.Tensor, scale: torch.Tensor | None = None) -> SAE:
    """B with latent j = A's latent perm[j]; ``scale`` c_j re-parametrises a JumpReLU latent without changing
    what it computes (pre-activation and threshold times c, decoder row divided by c)."""
    b = SAE(SAEConfig(**{**sae.cfg.__dict__}))
    c = torch.ones(sae.d_sae) if scale is None else scale
    with torch.no_grad():
        b.W_enc.copy_(sae.W_enc[:, perm] * c)
        b.b_enc.copy_(sae.b_enc[perm] * c)
        b.W_dec.copy_(sae.W_dec[perm] / c[:, None])
        b.b_dec.copy_(sae.b_dec)
        if sae.cfg.architecture == "jumprelu":
            b.threshold.copy_(sae.threshold[perm] * c)
    return b


def test_fold_keeps_reconstruction_and_sets_unit_threshold():
    sae = random_sae(arch="jumprelu")
    f = fold(sae)
    x = torch.randn(50, sae.d_in)
    pre = (x - sae.b_dec) @ f.W_enc + f.b_enc if sae.cfg.apply_b_dec_to_input else x @ f.W_enc + f.b_enc
    feats = pre * (pre > 1)
    assert torch.allclose(feats @ f.W_dec + f.b_dec, sae(x), atol=1e-5)
    t = random_sae(arch="topk")
    assert torch.equal(fold(t).W_dec, t.W_dec)


@pytest.mark.parametrize("arch", ["topk", "jumprelu", "relu"])
def test_permuted_copy_is_matched_back_exactly(arch):
    a = random_sae(arch=arch)
    perm = torch.randperm(a.d_sae, generator=torch.Generator().manual_seed(1))
    b = permuted(a, perm)
    m = match_saes(a, b)
    # latent perm[j] of A is latent j of B
    assert np.array_equal(m.perm[perm.numpy()], np.arange(a.d_sae))
    assert m.cost.max() < 1e-10 and summarize(m)["confident_fraction"] == 1.0


def test_jumprelu_rescaled_latents_match_only_after_folding():
    a = random_sae(arch="jumprelu", d_sae=96)
    perm = torch.randperm(a.d_sae, generator=torch.Generator().manual_seed(2))
    scale = torch.exp(torch.randn(a.d_sae, generator=torch.Generator().manual_seed(3)))
    b = permuted(a, perm, scale)
    x = torch.randn(40, a.d_in)
    assert torch.allclose(a(x), b(x), atol=1e-4)  # the same function, parametrised differently
    m = match_saes(a, b)
    assert np.array_equal(m.perm[perm.numpy()], np.arange(a.d_sae))
    assert m.cost.max() < 1e-10  # folded, the same latent has the same parameters
    raw = (a.W_dec[perm] - b.W_dec).pow(2).mean(1)  # unfolded, the scales keep them apart
    assert raw.max() > 1e-2


def test_sparse_solver_agrees_with_dense_on_noisy_copy():
    a = random_sae(d_in=32, d_sae=300)
    perm = torch.randperm(300, generator=torch.Generator().manual_seed(4))
    b = permuted(a, perm)
    with torch.no_grad():
        b.W_dec.add_(0.05 * torch.randn(b.W_dec.shape, generator=torch.Generator().manual_seed(5)))
    dense = match_saes(a, b)
    sparse = match_saes(a, b, dense_limit=0, candidates=2)
    assert sparse.info["solver"] == "sparse" and dense.info["solver"] == "dense"
    assert np.array_equal(sparse.perm, dense.perm) and np.array_equal(dense.perm[perm.numpy()], np.arange(300))


def test_rectangular_match_finds_the_shared_latents():
    a = random_sae(d_sae=48)
    extra = random_sae(d_sae=16, seed=9)
    b = SAE(SAEConfig(a.d_in, 64, "topk", k=8))
    with torch.no_grad():
        b.W_dec.copy_(torch.cat([a.W_dec, extra.W_dec]))
        b.W_enc.copy_(torch.cat([a.W_enc, extra.W_enc], 1))
    for m in (match_saes(a, b), match_saes(a, b, dense_limit=0, candidates=4)):
        assert np.array_equal(m.perm, np.arange(48))
    m = match_saes(b, a)
    assert (m.perm >= 0).sum() == 48 and np.array_equal(m.perm[:48], np.arange(48))


def test_different_input_sizes_are_refused():
    with pytest.raises(ConfigError, match="d_in"):
        match_saes(random_sae(d_in=8), random_sae(d_in=16))


def test_transfer_of_an_sae_onto_itself(world, world_sae):
    from featalign.data import read_documents
    from featalign.models import load_model, load_tokenizer
    from featalign.sae import load_sae

    sae = load_sae(world_sae["path"])
    model, tok = load_model(world["sft"]).eval(), load_tokenizer(world["sft"])
    m = match_saes(sae, sae)
    r = transfer_eval(sae, sae, m, model, tok, read_documents(world["sft_text"], tok)[:64], 2, 2, max_tokens=2000)
    assert r["transfer_explained_variance"] == pytest.approx(r["b_own_explained_variance"], abs=1e-6)
    assert r["coactivation_rate"] == pytest.approx(1.0)
    margin("co-activation by chance", r["coactivation_chance"], 0.5, above=False)  # k / d_sae = 0.125 for this TopK SAE


def test_cli_match_writes_report(world, world_sae, tmp_path):
    out = tmp_path / "m"
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "featalign",
            "sae",
            "match",
            world_sae["path"],
            world_sae["path"],
            "--out",
            str(out),
            "--model",
            world["sft"],
            "--data",
            world["sft_text"],
            "--max-tokens",
            "1000",
        ],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr
    rep = json.loads((out / "match.json").read_text())
    assert rep["perm"] == list(range(256)) and rep["confident_fraction"] == 1.0
    assert rep["transfer"]["coactivation_rate"] == pytest.approx(1.0) and (out / "match.png").exists()
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "featalign",
            "sae",
            "match",
            world_sae["path"],
            world_sae["path"],
            "--model",
            world["sft"],
        ],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 2 and "--model and --data" in p.stderr
