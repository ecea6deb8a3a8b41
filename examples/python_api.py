"""featalign from Python: an SAE on the built-in world's model, the offline reference cache, FPO trained from it,
and the trained policy evaluated and explained. Every step is the function behind a command, taking that command's
config dataclass.

    python examples/python_api.py [WORLD_FOLDER] [OUT_FOLDER] [STEPS]
"""

import sys

from featalign import (
    CacheConfig,
    EvalConfig,
    ExplainConfig,
    SAETrainConfig,
    TrainConfig,
    WorldConfig,
    build_world,
    evaluate_policy,
    run_cache,
    run_explain,
    run_train,
    train_sae,
    world_paths,
)


def main(world: str = "data/world-quick", out: str = "runs/api", steps: int = 40) -> dict:
    build_world(world, WorldConfig.quick())  # reused when it is already built with these settings
    w = world_paths(world)

    # an SAE on layer 2 of the world's SFT model
    _, sae_report = train_sae(
        SAETrainConfig(model=w["sft"], data=w["sft_text"], layer=2, out=f"{out}/sae", d_sae=256, k=8, tokens=60_000)
    )

    # the reference's log-probs and top-k SAE activations, computed once
    run_cache(CacheConfig(model=w["sft"], data=w["train"], sae=f"{out}/sae", out=f"{out}/cache", k=20))

    # FPO, reading only the cache: no reference model in memory
    summary = run_train(
        TrainConfig(
            method="fpo",
            model=w["sft"],
            data=w["train"],
            sae=f"{out}/sae",
            cache=f"{out}/cache",
            k=20,
            lr=1e-4,
            batch_size=16,
            max_steps=steps,
            out=f"{out}/fpo",
            progress=False,
            tensorboard=False,
        )
    )

    # the trained policy against the reference: accuracy, judged reward, win rate, KL
    scores = evaluate_policy(
        EvalConfig(
            model=f"{out}/fpo/final",
            ref_model=w["sft"],
            data=w["test"],
            reward_fn="featalign.world.judge:reward",
            n_prompts=32,
            progress=False,
        )
    )

    # which SAE features the training moved
    moved = run_explain(
        ExplainConfig(
            policy=f"{out}/fpo/final",
            reference=w["sft"],
            sae=f"{out}/sae",
            data=w["test"],
            limit=100,
            out=f"{out}/explain",
        )
    )

    print(
        f"SAE explained variance {sae_report['explained_variance']:.3f}; FPO {summary['steps']} steps, "
        f"{summary['tokens_per_second']:.0f} tokens/s; reward {scores['reward']:.3f} (SFT "
        f"{scores['reference']['reward']:.3f}), win rate {scores['win_rate']:.2f}, KL {scores['kl_to_ref']:.2f}; "
        f"most raised feature {moved['up'][0]['feature'] if moved['up'] else None}"
    )
    return {"sae": sae_report, "train": summary, "eval": scores, "explain": moved}


if __name__ == "__main__":
    main(*sys.argv[1:3], *[int(a) for a in sys.argv[3:4]])
