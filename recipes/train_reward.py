"""Train and evaluate a personalized reward model (VPL) or a baseline.

    accelerate launch recipes/train_reward.py --model_type {vae,base,mean_and_variance,categorical} \
        --dataset {pets,pets_controversial,PATH} --output_dir DIR [--config recipe.yaml] [any VPLRewardConfig flag]

Writes the model and `DIR/eval_results.json`, and prints a per-user accuracy table. Every flag: `--help`; the
script: `vpl_trl/scripts/train_reward.py`.
"""

import vpl_trl  # noqa: F401  (first, before transformers and trl: it imports peft without bitsandbytes)

# isort: split
from vpl_trl.scripts.train_reward import main

if __name__ == "__main__":
    main()
