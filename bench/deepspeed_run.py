"""DPO on the quick world through ``accelerate launch`` with DeepSpeed ZeRO-2 on one GPU, against the same run in one
plain process: the loss curves must agree (ZeRO-2 partitions optimizer state and gradients, not the math) and the
saved model must load as a plain one. GPU only: accelerate hands DeepSpeed to GPU processes alone.

Usage: python bench/deepspeed_run.py [--steps 8]  -> bench/results/deepspeed-gpu.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import parser, quick_world, scratch, write_result  # noqa: E402


def losses(out: str) -> list[float]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", default=None, help="accepted for bench/gpu.sh; results go where write_result puts them")
    a = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("DeepSpeed runs only on GPU processes under accelerate: no CUDA device here")
    work = scratch("deepspeed-")
    w = quick_world()
    ds_cfg = {
        "train_micro_batch_size_per_gpu": a.batch_size,  # featalign prepares no dataloader: "auto" cannot be filled
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 2},
        "bf16": {"enabled": True},
        "gradient_clipping": 1.0,
    }
    with open(os.path.join(work, "ds.json"), "w") as f:
        json.dump(ds_cfg, f)
    with open(os.path.join(work, "accelerate.yaml"), "w") as f:
        f.write(
            "compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\nnum_processes: 1\nnum_machines: 1\n"
            f"mixed_precision: bf16\ndeepspeed_config:\n  deepspeed_config_file: {work}/ds.json\n"
        )
    train = ["-m", "featalign", "train", "--method", "dpo", "--model", w["sft"], "--data", w["train"]]
    train += ["--max-steps", str(a.steps), "--batch-size", str(a.batch_size), "--lr", "1e-4", "--log-every", "1"]
    train += ["--max-length", "96", "--max-prompt-length", "24", "--no-progress", "--no-tensorboard"]
    res: dict = {"steps": a.steps, "batch_size": a.batch_size, "deepspeed_config": ds_cfg}
    for name, launcher in (
        ("one process", [sys.executable]),
        ("deepspeed zero-2", [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                              os.path.join(work, "accelerate.yaml")]),
    ):  # fmt: skip
        out = os.path.join(work, name.replace(" ", "_"))
        t = time.time()
        p = subprocess.run([*launcher, *train, "--out", out], capture_output=True, text=True)
        r = {"rc": p.returncode, "wall_s": round(time.time() - t, 1)}
        if p.returncode:
            r["error"] = (p.stderr or p.stdout)[-2000:]
        else:
            with open(os.path.join(out, "summary.json")) as f:
                s = json.load(f)
            r.update(losses=losses(out), distributed=s["distributed"], peak_memory_mb=s["peak_memory_mb"])
            from featalign.models import load_model

            r["final_loads"] = load_model(os.path.join(out, "final")) is not None
        res[name] = r
        print(name, json.dumps(r)[:400], flush=True)
    one, ds = res["one process"], res["deepspeed zero-2"]
    if "losses" in one and "losses" in ds:
        res["max_loss_difference"] = max(abs(x - y) for x, y in zip(one["losses"], ds["losses"]))
    write_result("deepspeed", res)


if __name__ == "__main__":
    main()
