"""The recipes' scripts, as TRL's `trl/scripts/`: each module offers `make_parser()` and `main(argv)`.

- `train_reward`: train and evaluate a personalized reward model (`recipes/train_reward.py`).
- `ppo_personalized`: optimize a policy against it (`recipes/ppo_personalized.py`).
"""
