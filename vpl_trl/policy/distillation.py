"""Conditioned best-of-n distillation (expert iteration) with TRL's `SFTTrainer`.

Each round, the policy samples `n` completions for each (user, prompt) row under that user's conditioning (their
pairs in the prompt, or their latent as a soft prompt); the user's personalized reward ranks them, and the best
`keep` so far become supervised examples, conditioned the same way. The policy is fine-tuned on them for
`epochs_per_round` epochs, then samples the next round. A round's candidates cost one generation and one scoring
pass each; the rewards of every round are kept (`BestOfNDistillationTrainer.rounds`) as the on-policy learning
curve.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from datasets import Dataset
from transformers import TrainerCallback
from trl.data_utils import is_conversational

from ..distributed import full_weights_for_generation
from ..generation import GenerationSettings, generate_candidates
from .trainers import LATENT_COLUMN, ConditionedSFTTrainer


@dataclass
class DistillationSettings:
    """Best-of-n distillation: each round takes one row (a draw of the user's conditioning) per (user, prompt),
    samples `n` candidates for it and distills the best `keep`; a new round every `epochs_per_round` epochs. With
    `shared_first_round`, the first round samples the untrained policy once per bare prompt (`n` x users
    candidates, which every user's rows of that prompt share) instead of once per user. With `replay`, the
    examples of a (user, prompt) are the best `keep` of every round so far, not of the last round only."""

    n: int = 16
    keep: int = 2
    epochs_per_round: int = 6
    shared_first_round: bool = True
    replay: bool = True
    generation: GenerationSettings = field(default_factory=GenerationSettings)


class _RoundSet(torch.utils.data.Dataset):
    """The SFT examples of the current round, replaced in place each round (the dataloader keeps this object)."""

    def __init__(self, data: Dataset, columns: Sequence[str]):
        self.columns = [c for c in columns if c in data.column_names]
        self.size = len(data)
        self.replace(data)

    def replace(self, data: Dataset) -> None:
        if len(data) != self.size:
            raise ValueError(f"a distillation round has {len(data)} examples, expected {self.size}.")
        self.data = data.select_columns(self.columns)

    @property
    def column_names(self) -> list[str]:
        return self.columns

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.data[index]


class _NextRound(TrainerCallback):
    def __init__(self, trainer: BestOfNDistillationTrainer):
        self.trainer, self.epochs = trainer, 0

    def on_epoch_begin(self, args, state, control, **kwargs):
        if self.epochs and self.epochs % self.trainer.settings.epochs_per_round == 0:
            self.trainer.next_round()
        self.epochs += 1


class BestOfNDistillationTrainer(ConditionedSFTTrainer):
    """[`ConditionedSFTTrainer`] on the best of `n` samples per (user, prompt), refreshed every round.

    Args:
        model: the policy (a PEFT model; latent-conditioned or not).
        args: an `SFTConfig`.
        prompt_dataset: rows with `prompt` (what the policy sees), `raw_prompt` (what the reward scores),
            `bare_prompt` (the prompt without conditioning, for the shared first round), `user_id` and, for latent
            conditioning, `user_latent` (`vpl_trl.policy.build_policy_dataset` makes them).
        reward_function: TRL's reward-function signature, `f(prompts, completions, user_id, raw_prompt) -> list`.
        settings: [`DistillationSettings`].
        deadline: a `time.perf_counter()` value past which no new round starts (a wall-time budget).
    """

    def __init__(
        self,
        model,
        args,
        prompt_dataset: Dataset,
        reward_function: Callable[..., list[float]],
        settings: DistillationSettings,
        processing_class,
        callbacks=None,
        deadline: float | None = None,
    ):
        self.prompt_rows, self.deadline, self._start = list(prompt_dataset), deadline, time.perf_counter()
        self.reward_function, self.settings = reward_function, settings
        self._groups = list(_group_rows(self.prompt_rows).values())
        self._best: dict[tuple[str, str], list[tuple[float, dict[str, Any]]]] = {}
        self.rounds: list[dict[str, Any]] = []
        self.timings = {"generation": 0.0, "scoring": 0.0}
        self._tokenizer, self._seed = processing_class, args.seed
        first = self._distill(model, None)  # before any engine wraps the model
        super().__init__(model=model, args=args, train_dataset=first, processing_class=processing_class,
                         callbacks=callbacks)
        self._set_signature_columns_if_needed()
        self.train_dataset = _RoundSet(self.train_dataset, self._signature_columns)
        self.add_callback(_NextRound(self))

    def next_round(self) -> None:
        """Sample, rank and select the next round's examples with the current policy; stop training instead when
        a round (as long as the last one) would end past the deadline."""
        if self.deadline is not None and time.perf_counter() + self.rounds[-1]["seconds"] > self.deadline:
            self.control.should_training_stop = True
            return
        data = self._distill(self.model_wrapped, self.accelerator)
        prepared = self._prepare_dataset(data, self.processing_class, self.args, False, None, "distillation")
        self.train_dataset.replace(prepared)

    def _distill(self, model, accelerator) -> Dataset:
        """One round: every process samples and scores its share of the rows; all get every selected example."""
        start = time.perf_counter()
        rng = random.Random(f"distillation-{self._seed}-{len(self.rounds)}")
        rows = [rng.choice(group) for group in self._groups]  # one draw of each user's conditioning per prompt
        state = PartialState()
        shared = self.settings.shared_first_round and not self.rounds
        if shared:  # one pool per bare prompt, from the policy before any training: the reference policy
            mine = [row for row in rows if _key(row) in _own_keys(rows, state)]
        else:
            mine = rows[state.process_index :: state.num_processes]
        with full_weights_for_generation(model, accelerator) as policy:
            candidates = self._sample(policy, mine, shared)
        generation_seconds = time.perf_counter() - start
        flat = [(row, text) for row, texts in zip(mine, candidates) for text in texts]
        rewards = self.reward_function(
            prompts=[row["prompt"] for row, _ in flat], completions=[text for _, text in flat],
            user_id=[row["user_id"] for row, _ in flat], raw_prompt=[row["raw_prompt"] for row, _ in flat],
        ) if flat else []
        selected, stats, begin = [], [], 0
        for row, texts in zip(mine, candidates):
            scored = list(zip(rewards[begin : begin + len(texts)], texts))
            begin += len(texts)
            best = sorted(scored, key=lambda pair: pair[0], reverse=True)[: self.settings.keep]
            selected += [(_group(row), reward, _example(row, text)) for reward, text in best]
            stats.append({"user_id": row["user_id"], "mean": sum(r for r, _ in scored) / len(scored),
                          "kept": sum(r for r, _ in best) / len(best)})
        selected, stats = gather_object(selected), gather_object(stats)
        for group, reward, example in selected:
            previous = self._best.get(group, []) if self.settings.replay else []
            self._best[group] = sorted([*previous, (reward, example)], key=lambda pair: pair[0], reverse=True)
            self._best[group] = self._best[group][: self.settings.keep]
        examples = [example for group in sorted(self._best) for _, example in self._best[group]]
        self.timings["generation"] += generation_seconds
        self.timings["scoring"] += time.perf_counter() - start - generation_seconds
        self._record_round(stats, generation_seconds, time.perf_counter() - start, start - self._start)
        return Dataset.from_list(examples)

    def _sample(self, policy, rows: list[dict[str, Any]], shared: bool) -> list[list[str]]:
        """Each row's candidates: sampled under its conditioning, or (`shared`) from one pool of `n` x users
        samples per bare prompt, which every user's rows of that prompt share."""
        if not rows:
            return []
        settings = GenerationSettings(**{**vars(self.settings.generation), "seed": None})
        description = f"Best-of-n round {len(self.rounds)}"
        if shared:
            keys = list(dict.fromkeys(_key(row) for row in rows))
            bare = {_key(row): row["bare_prompt"] for row in rows}
            per_prompt = self.settings.n * len({row["user_id"] for row in self.prompt_rows})
            pools = generate_candidates(policy, self._tokenizer, [bare[k] for k in keys], per_prompt, settings,
                                        progress=description)
            pool_of = dict(zip(keys, pools))
            candidates = [pool_of[_key(row)] for row in rows]
        else:
            latents = torch.tensor([r[LATENT_COLUMN] for r in rows]) if LATENT_COLUMN in rows[0] else None
            candidates = generate_candidates(policy, self._tokenizer, [r["prompt"] for r in rows], self.settings.n,
                                             settings, latents=latents, progress=description)
        return candidates

    def _record_round(self, stats: list[dict[str, Any]], generation_seconds: float, seconds: float,
                      elapsed: float) -> None:
        """The round's mean reward of the candidates and of the kept examples per user (the policy's on-policy
        reward when the round began, `elapsed` seconds into training)."""
        users = sorted({s["user_id"] for s in stats})
        record = {"round": len(self.rounds), "step": self.state.global_step if hasattr(self, "state") else 0,
                  "elapsed": elapsed, "generation_seconds": generation_seconds, "seconds": seconds}
        for user in users:
            mine = [s for s in stats if s["user_id"] == user]
            record[f"reward/{user}"] = sum(s["mean"] for s in mine) / len(mine)
            record[f"kept_reward/{user}"] = sum(s["kept"] for s in mine) / len(mine)
        self.rounds.append(record)
        if hasattr(self, "state"):
            self.log({k: v for k, v in record.items() if k not in ("round", "step", "elapsed")})


def _group_rows(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """The rows of each (user, prompt), in order of first appearance."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(_group(row), []).append(row)
    return groups


def _group(row: dict[str, Any]) -> tuple[str, str]:
    return str(row["user_id"]), _key(row)


def _key(row: dict[str, Any]) -> str:
    return str(row["raw_prompt"])


def _own_keys(rows: Sequence[dict[str, Any]], state: PartialState) -> set[str]:
    """The bare prompts whose shared pool this process samples."""
    keys = sorted({_key(row) for row in rows})
    return set(keys[state.process_index :: state.num_processes])


def _example(row: dict[str, Any], text: str) -> dict[str, Any]:
    """An SFT example in TRL's prompt-completion format (conversational when the prompt is)."""
    prompt = row["prompt"]
    completion = [{"role": "assistant", "content": text}] if is_conversational(row) else text
    example = {"prompt": prompt, "completion": completion}
    if LATENT_COLUMN in row:
        example[LATENT_COLUMN] = row[LATENT_COLUMN]
    return example
