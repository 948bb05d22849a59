"""Optimize a policy against a personalized (VPL) reward: one policy for every user, one per user, or a user-blind one.

    accelerate launch recipes/ppo_personalized.py --reward_model outputs/vpl-pets --user_contexts pets \
        --mode {conditioned,per_user,shared} --output_dir outputs/ppo-pets [--config recipe.yaml] [any GRPOConfig flag]

Writes the policy (`per_user`: one adapter per user in `DIR/adapters/`), `DIR/eval_results.json` (each user's reward
before and after, the cross-user matrix), `DIR/eval_matrix.png` and `DIR/eval_completions.jsonl`, and prints a
table. Every flag: `--help`; the modes, signals and outputs: `vpl_trl/scripts/ppo_personalized.py`.
"""

from vpl_trl.scripts.ppo_personalized import main

if __name__ == "__main__":
    main()
