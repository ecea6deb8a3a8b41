"""SAE decode at inference: sparse decode (gather the k active decoder rows, `SAE.decode_sparse`) vs the dense
matmul of the full [tokens, d_sae] activation matrix (`SAE.decode`), over SAE widths, and the end-to-end
encode+decode with each. Both give the same reconstruction (checked). Median of repeated timings.

Usage: python bench/sae_decode.py -> bench/results/sae_decode-<cpu|gpu>.json
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
from common import parser, timeit, write_result  # noqa: E402

from featalign.sae import random_sae  # noqa: E402


@torch.no_grad()
def measure(d_in: int, w: int, k: int, tokens: int, repeats: int, dev: str) -> dict:
    """Decode and encode+decode of one SAE width, dense against sparse."""
    torch.manual_seed(0)
    sae = random_sae(d_in, w, "topk", k=k, noise=0.0).to(dev)
    x = torch.randn(tokens, d_in, device=dev)
    vals, idx = sae.encode_pre(x).topk(k, dim=-1)
    vals = vals.relu()
    dense = torch.zeros(tokens, w, device=dev).scatter(-1, idx, vals)
    same = torch.allclose(sae.decode(dense), sae.decode_sparse(idx, vals), atol=1e-3, rtol=1e-4)
    t_dense = timeit(lambda: sae.decode(dense), repeats)
    t_sparse = timeit(lambda: sae.decode_sparse(idx, vals), repeats)

    def e2e_sparse():
        v, i = sae.encode_pre(x).topk(k, dim=-1)
        return sae.decode_sparse(i, v.relu())

    row = {
        "d_sae": w,
        "decode_dense_ms": 1e3 * t_dense,
        "decode_sparse_ms": 1e3 * t_sparse,
        "decode_speedup": t_dense / t_sparse,
        "encode_decode_dense_ms": 1e3 * timeit(lambda: sae.decode(sae.encode(x)), repeats),
        "encode_decode_sparse_ms": 1e3 * timeit(e2e_sparse, repeats),
        "same_output": bool(same),
    }
    print(row, flush=True)
    return row


def main():
    ap = parser(__doc__)
    ap.add_argument("--d-in", type=int, default=None, help="default: 2304 on GPU (Gemma-2-2B), 512 on CPU")
    ap.add_argument("--widths", default=None)
    ap.add_argument("--k", type=int, default=50)
    ap.add_argument("--tokens", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=10)
    a = ap.parse_args()
    gpu = torch.cuda.is_available()
    dev = "cuda" if gpu else "cpu"
    d_in = a.d_in or (2304 if gpu else 512)
    tokens = a.tokens or (8192 if gpu else 1024)
    widths = [int(w) for w in (a.widths or ("4096,16384,65536,131072" if gpu else "2048,8192,32768")).split(",")]
    rows = [measure(d_in, w, a.k, tokens, a.repeats, dev) for w in widths]
    write_result("sae_decode", {"d_in": d_in, "k": a.k, "tokens": tokens, "rows": rows})


if __name__ == "__main__":
    main()
