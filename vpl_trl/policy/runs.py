"""Training a policy with one signal, and the record of the run: steps, where the time went, the on-policy reward.

A signal is the trainer that turns the personalized reward into updates: TRL's GRPO (`ConditionedGRPOTrainer`),
or rounds of reward-ranked candidates distilled by SFT (`BestOfNDistillationTrainer`) or paired for DPO
(`RewardRankedDPOTrainer`).
"""

from __future__ import annotations

import time
from dataclasses import fields
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase, Trainer, TrainingArguments

from .distillation import BestOfNDistillationConfig, BestOfNDistillationTrainer
from .ranked_dpo import RewardRankedDPOConfig, RewardRankedDPOTrainer
from .reward import PersonalizedRewardFunction
from .trainers import ConditionedGRPOTrainer, TimeBudgetCallback

SIGNALS = ("bon_sft", "dpo", "grpo")


def round_config(args: TrainingArguments, config_class: type[BestOfNDistillationConfig] | type[RewardRankedDPOConfig],
                 **overrides: Any):
    """A `BestOfNDistillationConfig` or `RewardRankedDPOConfig` with the same `TrainingArguments` as `args` (the
    best-of-n signals train with TRL's SFTTrainer or DPOTrainer), and `overrides` (those that are not None): the
    rounds' fields and the signal's own."""
    names = {f.name for f in fields(TrainingArguments) if f.init}
    values = {k: v for k, v in args.to_dict().items() if k in names}
    values["gradient_checkpointing"] = bool(values.get("gradient_checkpointing"))  # SFTConfig's default is True
    return config_class(**{**values, **{k: v for k, v in overrides.items() if v is not None}})


def train_policy(
    signal: str,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset,
    reward: PersonalizedRewardFunction,
    args: TrainingArguments,
    budget: float | None = None,
) -> tuple[Trainer, float]:
    """Train one LoRA policy with `signal` (`grpo`: `args` is a `GRPOConfig`; `bon_sft`: a
    `BestOfNDistillationConfig`; `dpo`: a `RewardRankedDPOConfig`, both holding their rounds' settings) for at most
    `budget` seconds, resuming from `args.resume_from_checkpoint` and saving the policy to `args.output_dir`. Returns
    the trainer and the wall time, the first round included."""
    if signal not in SIGNALS:
        raise ValueError(f"signal must be one of {SIGNALS}, got {signal!r}.")
    start = time.perf_counter()
    callbacks = [TimeBudgetCallback(budget, start)] if budget else None
    if signal == "grpo":
        trainer = ConditionedGRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=dataset,
                                         processing_class=tokenizer, callbacks=callbacks)
    else:
        trainer_class = RewardRankedDPOTrainer if signal == "dpo" else BestOfNDistillationTrainer
        trainer = trainer_class(model, args, dataset, reward, tokenizer, callbacks=callbacks,
                                deadline=start + budget if budget else None)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    elapsed = time.perf_counter() - start
    trainer.save_model(args.output_dir)
    return trainer, elapsed


def run_record(trainer: Trainer, seconds: float, output_dir: str) -> dict[str, Any]:
    """What a training run did: its steps and `seconds`, the seconds spent in generation, reward scoring and updates
    (in all and per step), and the on-policy reward of each user over training (`curve`; `rounds` too for the
    best-of-n signals)."""
    steps = trainer.state.global_step
    timings = dict(trainer.timings)
    timings["update"] = max(seconds - timings["generation"] - timings["scoring"], 0.0)
    record = {"steps": steps, "train_seconds": seconds, "adapter": output_dir, "seconds": timings,
              "seconds_per_step": {k: v / max(steps, 1) for k, v in timings.items()}}
    # the on-policy reward of each user over training (seconds: a round's start, or steps times the mean step time):
    # GRPO's logged batch means, or each best-of-n round's mean (an offline round's is the pool's, not the policy's)
    points = trainer.rounds if hasattr(trainer, "rounds") else trainer.state.log_history
    per_step = seconds / max(steps, 1)
    record["curve"] = [
        {"step": point.get("step", 0), "seconds": point.get("elapsed", point.get("step", 0) * per_step),
         **{k: v for k, v in point.items() if k.startswith("reward/")}}
        for point in points if any(k.startswith("reward/") for k in point) and not point.get("offline")
    ]
    if hasattr(trainer, "rounds"):
        record["rounds"] = trainer.rounds
    return record
