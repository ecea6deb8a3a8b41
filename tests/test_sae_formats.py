"""sparsify's SAE folders (single and multi-layer): read, written, and checked against sparsify's own code."""

import json
import os

import pytest
import torch

from featalign.errors import ConfigError
from featalign.sae import SAE, SAEConfig, load_sae


def random_topk(d_in=16, d_sae=48, k=6, centre=True, seed=0, layer=None):
    g = torch.Generator().manual_seed(seed)
    sae = SAE(SAEConfig(d_in, d_sae, "topk", k=k, apply_b_dec_to_input=centre, layer=layer))
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return sae


def _sparsify_encode_decode(theirs, x):
    top_acts, top_idx, _ = theirs.encode(x)
    return top_acts, top_idx, theirs.decode(top_acts, top_idx)


@pytest.mark.parametrize("centre", [True, False])
def test_sparsify_reads_what_featalign_writes_and_back(centre, tmp_path):
    sparsify = pytest.importorskip("sparsify", reason="eai-sparsify (test extra) is not installed")
    ours = random_topk(centre=centre)
    path = ours.save(str(tmp_path / "sp"), format="sparsify")
    theirs = sparsify.SparseCoder.load_from_disk(path)
    x = torch.randn(64, 16)
    acts, idx, x_hat = _sparsify_encode_decode(theirs, x)
    dense = torch.zeros(64, 48).scatter(-1, idx, acts)
    f = ours.encode(x)
    assert (f > 0).sum() > 64  # not a vacuous comparison of zeros
    assert torch.allclose(dense, f, atol=1e-5)
    assert torch.allclose(x_hat, ours.decode(f), atol=1e-5)
    # and back: featalign reads what sparsify saves
    theirs.save_to_disk(tmp_path / "saved-by-sparsify")
    again = load_sae(str(tmp_path / "saved-by-sparsify"))
    assert again.cfg.architecture == "topk" and again.cfg.k == 6
    assert torch.allclose(again.encode(x), f, atol=1e-5)
    assert torch.allclose(again.forward(x), ours.forward(x), atol=1e-5)


def test_sparsify_multi_layer_folder(tmp_path):
    sparsify = pytest.importorskip("sparsify", reason="eai-sparsify (test extra) is not installed")
    root = tmp_path / "run"
    for layer in (2, 5):
        random_topk(seed=layer).save(str(root / f"layers.{layer}"), format="sparsify")
    theirs = sparsify.SparseCoder.load_many(str(root), local=True)
    assert sorted(theirs) == ["layers.2", "layers.5"]
    x = torch.randn(20, 16)
    sae = load_sae(str(root), layer=5)
    assert sae.cfg.layer == 5
    acts, idx, x_hat = _sparsify_encode_decode(theirs["layers.5"], x)
    assert torch.allclose(sae.forward(x), x_hat, atol=1e-5)


def test_sparsify_format_without_sparsify(tmp_path):
    """The layout by hand (so this runs without sparsify): ``relu((x - b_dec) @ encoder.weight.T + encoder.bias)``,
    top k, decoded by ``W_dec`` rows plus ``b_dec``; the layer comes from the ``layers.N`` folder name."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(1)
    enc_w, enc_b, w_dec, b_dec = (torch.randn(s, generator=g) for s in [(40, 12), (40,), (40, 12), (12,)])
    folder = tmp_path / "multi" / "layers.3"
    os.makedirs(folder)
    save_file(
        {"encoder.weight": enc_w, "encoder.bias": enc_b, "W_dec": w_dec, "b_dec": b_dec},
        str(folder / "sae.safetensors"),
    )
    json.dump(
        {"activation": "topk", "num_latents": 40, "k": 4, "d_in": 12, "transcode": False},
        open(folder / "cfg.json", "w"),
    )
    sae = load_sae(str(tmp_path / "multi"), layer=3)
    x = torch.randn(9, 12, generator=g)
    pre = torch.relu((x - b_dec) @ enc_w.T + enc_b)
    vals, idx = pre.topk(4, dim=-1)
    expect = torch.zeros_like(pre).scatter(-1, idx, vals)
    assert torch.allclose(sae.encode(x), expect, atol=1e-5)
    assert torch.allclose(sae.forward(x), expect @ w_dec + b_dec, atol=1e-4)
    assert load_sae(str(folder)).cfg.layer == 3  # the single folder names its layer too
    # written back in sparsify's layout, it reads the same
    again = load_sae(sae.save(str(tmp_path / "again"), format="sparsify"))
    assert torch.allclose(again.forward(x), sae.forward(x), atol=1e-5)


def test_sparsify_errors_name_the_file(tmp_path, world):
    from safetensors.torch import save_file

    from featalign.models import load_model
    from featalign.sae import check_fits

    root = tmp_path / "multi"
    path = random_topk(layer=1).save(str(root / "layers.1"), format="sparsify")
    with pytest.raises(ConfigError, match=r"holds SAEs for layers \[1\]; pass --layer"):
        load_sae(str(root))
    with pytest.raises(ConfigError, match=r"no SAE for layer 7; it holds layers \[1\]"):
        load_sae(str(root), layer=7)
    with pytest.raises(ConfigError, match="not an SAE folder"):
        load_sae(str(tmp_path))
    with pytest.raises(ConfigError, match="SAE d_in=16 does not match the model's hidden size 128"):
        check_fits(load_sae(str(root), layer=1), load_model(world["sft"]), 1)
    cfg = json.load(open(os.path.join(path, "cfg.json")))
    json.dump({**cfg, "transcode": True}, open(os.path.join(path, "cfg.json"), "w"))
    with pytest.raises(ConfigError, match=r"cfg.json: transcode=True: a transcoder"):
        load_sae(path)
    json.dump({**cfg, "d_in": 20}, open(os.path.join(path, "cfg.json"), "w"))
    with pytest.raises(ConfigError, match=r"cfg.json: d_in=20 but sae.safetensors holds 16-dim inputs"):
        load_sae(path)
    json.dump(cfg, open(os.path.join(path, "cfg.json"), "w"))
    save_file(
        {
            "encoder.weight": torch.zeros(48, 16),
            "encoder.bias": torch.zeros(48),
            "W_dec": torch.zeros(48, 15),
            "b_dec": torch.zeros(16),
        },
        os.path.join(path, "sae.safetensors"),
    )
    with pytest.raises(ConfigError, match=r"sae.safetensors: tensor 'W_dec' has shape \(48, 15\), expected \(48, 16\)"):
        load_sae(path)
    save_file({"encoder.weight": torch.zeros(48, 16)}, os.path.join(path, "sae.safetensors"))
    with pytest.raises(ConfigError, match=r"sae.safetensors: missing tensor 'encoder.bias'"):
        load_sae(path)
    relu = SAE(SAEConfig(16, 48, "relu", k=None))
    with pytest.raises(ConfigError, match="sparsify's format holds TopK SAEs only"):
        relu.save(str(tmp_path / "relu"), format="sparsify")
    assert not os.path.exists(tmp_path / "relu")
