"""Rounds of on-policy candidates ranked by each user's personalized reward: the data of best-of-n distillation
(`vpl_trl.policy.distillation`) and of reward-ranked DPO (`vpl_trl.policy.ranked_dpo`).

Each round, the policy samples `n` completions for each (user, prompt) row under that user's conditioning (their
pairs in the prompt, or their latent as a soft prompt), and the user's reward ranks them. A trainer turns each row's
ranked candidates into its examples (the best to imitate, or best-against-worst pairs), trains on them for
`epochs_per_round` epochs, then samples the next round with the updated policy. A round's candidates cost one
generation and one scoring pass each; every round's rewards are kept (`rounds`) as the on-policy learning curve,
and, with `candidates_file`, every scored candidate is written out.

Each checkpoint also holds the rounds' state (`best_of_n_rounds.json`: the current round's examples, the kept
examples, the learning curve), so that a run resumed from it (`args.resume_from_checkpoint`, then
`train(resume_from_checkpoint=...)`) trains on the same round instead of sampling a new one.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from datasets import Dataset
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl.data_utils import is_conversational

from ..distributed import full_weights_for_generation
from ..inference.generation import GenerationSettings, generate_candidates
from .trainers import LATENT_COLUMN

ROUNDS_STATE = "best_of_n_rounds.json"
Group = tuple[str, str]  # (user, prompt)
Ranked = list[tuple[float, str]]  # a row's candidates with their rewards, best first


@dataclass
class RoundSettings:
    """Rounds of reward-ranked candidates: each round takes one row (a draw of the user's conditioning) per (user,
    prompt), samples `n` candidates for it and keeps `keep` examples (the best `keep` candidates to distill, or
    `keep` best-against-worst pairs); a new round every `epochs_per_round` epochs. With `shared_first_round`, the
    first round samples the untrained policy once per bare prompt (`n` x users candidates, which every user's rows
    of that prompt share) instead of once per user. With `replay`, the examples of a (user, prompt) are the best
    `keep` of every round so far, not of the last round only. `candidates_file`: a JSONL file that receives every
    scored candidate of every round (main process)."""

    n: int = 16
    keep: int = 2
    epochs_per_round: int = 6
    shared_first_round: bool = True
    replay: bool = True
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    candidates_file: str | None = None


class RoundDataset(torch.utils.data.Dataset):
    """The examples of the current round, replaced in place each round (the dataloader keeps this object)."""

    def __init__(self, data: Dataset, columns: Sequence[str]):
        self.columns = [c for c in columns if c in data.column_names]
        self.size = len(data)
        self.replace(data)

    def replace(self, data: Dataset) -> None:
        if len(data) != self.size:
            raise ValueError(f"a round has {len(data)} examples, expected {self.size} (as in the first round).")
        self.data = data.select_columns(self.columns)

    @property
    def column_names(self) -> list[str]:
        return self.columns

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.data[index]


class _NextRound(TrainerCallback):
    """A new round every `epochs_per_round` epochs (`epochs`: the epochs begun so far), unless the current round
    began at this epoch already (a run resumed within it)."""

    def __init__(self, trainer: BestOfNRounds, epochs: int = 0):
        self.trainer, self.epochs = trainer, epochs

    def on_epoch_begin(self, args, state, control, **kwargs):
        epoch = self.epochs
        if epoch and epoch % self.trainer.settings.epochs_per_round == 0 and epoch != self.trainer.round_epoch:
            self.trainer.next_round()
            self.trainer.round_epoch = epoch
        self.epochs += 1


class BestOfNRounds:
    """Mixin for a TRL trainer that trains on rounds of reward-ranked on-policy candidates. A subclass implements
    `_select` (a row's ranked candidates -> its examples) and `_prepare_round` (a round's examples -> the trainer's
    tokenized dataset), and may adjust the trainer around its `__init__` (`_before_trainer_init`,
    `_after_trainer_init`).

    Args:
        model: the policy (a PEFT model; latent-conditioned or not).
        args: the TRL trainer's config (`SFTConfig`, `DPOConfig`).
        prompt_dataset: rows with `prompt` (what the policy sees), `raw_prompt` (what the reward scores),
            `bare_prompt` (the prompt without conditioning, for the shared first round), `user_id` and, for latent
            conditioning, `user_latent` (`vpl_trl.policy.build_policy_dataset` makes them).
        reward_function: TRL's reward-function signature, `f(prompts, completions, user_id, raw_prompt) -> list`.
        settings: [`RoundSettings`].
        deadline: a `time.perf_counter()` value past which no new round starts (a wall-time budget).
    """

    def __init__(
        self,
        model,
        args,
        prompt_dataset: Dataset,
        reward_function: Callable[..., list[float]],
        settings: RoundSettings,
        processing_class,
        callbacks=None,
        deadline: float | None = None,
    ):
        first = self._start_rounds(model, prompt_dataset, reward_function, settings, processing_class, args, deadline)
        self._before_trainer_init(args)
        super().__init__(model=model, args=args, train_dataset=first, processing_class=processing_class,
                         callbacks=callbacks)
        self._after_trainer_init()
        self._install_rounds()

    def _before_trainer_init(self, args) -> None:
        """Adjust `args` before the TRL trainer's `__init__` (the first round is sampled by then)."""

    def _after_trainer_init(self) -> None:
        """Adjust the trainer and its first round's prepared examples after the TRL trainer's `__init__`."""

    def _start_rounds(self, model, prompt_dataset: Dataset, reward_function: Callable[..., list[float]],
                      settings: RoundSettings, processing_class, args, deadline: float | None) -> Dataset:
        """The first round's examples: sampled from the untrained policy, or those of the round that
        `args.resume_from_checkpoint` was saved in."""
        self.prompt_rows, self.deadline, self._start = list(prompt_dataset), deadline, time.perf_counter()
        self.reward_function, self.settings = reward_function, settings
        self._groups = list(_group_rows(self.prompt_rows).values())
        self._best: dict[Group, list[tuple[float, dict[str, Any]]]] = {}
        self.rounds: list[dict[str, Any]] = []
        self.timings = {"generation": 0.0, "scoring": 0.0}
        self.round_epoch = 0  # the epoch at which the current round began
        self._tokenizer, self._seed = processing_class, args.seed
        self._resumed = _read_rounds_state(args.resume_from_checkpoint) if args.resume_from_checkpoint else None
        if self._resumed is not None:
            state = self._resumed
            self.rounds, self.timings, self.round_epoch = state["rounds"], state["timings"], state["round_epoch"]
            self._best = {(user, prompt): [tuple(item) for item in items] for user, prompt, items in state["best"]}
            self._round_examples = state["examples"]
            return Dataset.from_list(state["examples"])
        if settings.candidates_file and PartialState().is_main_process:
            Path(settings.candidates_file).parent.mkdir(parents=True, exist_ok=True)
            Path(settings.candidates_file).write_text("")
        return self._new_round(model, None)  # before any engine wraps the model

    def _install_rounds(self) -> None:
        """Serve the rounds' examples through one dataset object (a resumed run: the checkpoint's prepared
        examples), and start a new round every `epochs_per_round` epochs."""
        self._set_signature_columns_if_needed()
        data, epochs = self.train_dataset, 0
        if self._resumed is not None:
            data = Dataset.from_list(self._resumed["prepared"])
            # a checkpoint saved within an epoch resumes at that epoch's start (its steps done are skipped)
            epochs = self._resumed["epochs_begun"] - (0 if self._resumed["epoch_complete"] else 1)
        self.train_dataset = RoundDataset(data, self._signature_columns)
        self._rounds_callback = _NextRound(self, epochs)
        self.add_callback(self._rounds_callback)

    def next_round(self) -> None:
        """Sample, rank and select the next round's examples with the current policy; stop training instead when
        a round (as long as the last one) would end past the deadline."""
        if self.deadline is not None and time.perf_counter() + self.rounds[-1]["seconds"] > self.deadline:
            self.control.should_training_stop = True
            return
        data = self._new_round(self.model_wrapped, self.accelerator)
        self.train_dataset.replace(self._prepare_round(data))

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if not self.args.should_save:
            return
        folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        epochs_begun = self._rounds_callback.epochs
        state = {
            "rounds": self.rounds, "timings": self.timings, "round_epoch": self.round_epoch,
            "epochs_begun": epochs_begun, "epoch_complete": abs((self.state.epoch or 0) - epochs_begun) < 1e-6,
            "best": [[user, prompt, items] for (user, prompt), items in self._best.items()],
            "examples": self._round_examples, "prepared": self.train_dataset.data.to_list(),
        }
        (folder / ROUNDS_STATE).write_text(json.dumps(state, default=str))

    def _select(self, row: dict[str, Any], ranked: Ranked) -> list[tuple[float, dict[str, Any]]]:
        """A row's examples with their scores (what `replay` ranks them by)."""
        raise NotImplementedError

    def _prepare_round(self, data: Dataset) -> Dataset:
        raise NotImplementedError

    def _new_round(self, model, accelerator) -> Dataset:
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
        selected, stats, scored, begin = [], [], [], 0
        for row, texts in zip(mine, candidates):
            ranked = sorted(zip(rewards[begin : begin + len(texts)], texts), key=lambda pair: pair[0], reverse=True)
            begin += len(texts)
            examples = self._select(row, ranked)
            selected += [(_group(row), score, example) for score, example in examples]
            stats.append({"user_id": row["user_id"], "mean": sum(r for r, _ in ranked) / len(ranked),
                          "kept": sum(r for r, _ in ranked[: self.settings.keep]) / min(self.settings.keep,
                                                                                        len(ranked))})
            if self.settings.candidates_file:
                scored += [{"round": len(self.rounds), "user_id": row["user_id"], "prompt": row["raw_prompt"],
                            "completion": text, "reward": reward} for reward, text in ranked]
        selected, stats = gather_object(selected), gather_object(stats)
        this_round: dict[Group, list[tuple[float, dict[str, Any]]]] = {}
        for group, score, example in selected:
            this_round.setdefault(group, []).append((score, example))
        for group, examples in this_round.items():
            previous = self._best.get(group, []) if self.settings.replay else []
            ranked = sorted([*previous, *examples], key=lambda pair: pair[0], reverse=True)
            self._best[group] = ranked[: self.settings.keep]
        examples = [example for group in sorted(self._best) for _, example in self._best[group]]
        self.timings["generation"] += generation_seconds
        self.timings["scoring"] += time.perf_counter() - start - generation_seconds
        self._write_candidates(gather_object(scored) if self.settings.candidates_file else [])
        self._record_round(stats, generation_seconds, time.perf_counter() - start, start - self._start)
        self._round_examples = examples
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

    def _write_candidates(self, scored: list[dict[str, Any]]) -> None:
        if scored and PartialState().is_main_process:
            with open(self.settings.candidates_file, "a", encoding="utf-8") as handle:
                for record in scored:
                    handle.write(json.dumps(record, default=str) + "\n")

    def _record_round(self, stats: list[dict[str, Any]], generation_seconds: float, seconds: float,
                      elapsed: float) -> None:
        """The round's mean reward of the candidates and of the best `keep` per user (the policy's on-policy
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


def _read_rounds_state(checkpoint: str | os.PathLike) -> dict[str, Any]:
    path = Path(checkpoint) / ROUNDS_STATE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no best-of-n rounds state; was {checkpoint} saved by a best-of-n trainer?")
    return json.loads(path.read_text(encoding="utf-8"))


def _group_rows(rows: Sequence[dict[str, Any]]) -> dict[Group, list[dict[str, Any]]]:
    """The rows of each (user, prompt), in order of first appearance."""
    groups: dict[Group, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(_group(row), []).append(row)
    return groups


def _group(row: dict[str, Any]) -> Group:
    return str(row["user_id"]), _key(row)


def _key(row: dict[str, Any]) -> str:
    return str(row["raw_prompt"])


def _own_keys(rows: Sequence[dict[str, Any]], state: PartialState) -> set[str]:
    """The bare prompts whose shared pool this process samples."""
    keys = sorted({_key(row) for row in rows})
    return set(keys[state.process_index :: state.num_processes])


def as_completion(row: dict[str, Any], text: str) -> Any:
    """A completion in the format of the row's prompt (an assistant message when the prompt is conversational)."""
    return [{"role": "assistant", "content": text}] if is_conversational(row) else text


def with_latent(row: dict[str, Any], example: dict[str, Any]) -> dict[str, Any]:
    """`example` with the row's user latent, for a latent-conditioned policy."""
    if LATENT_COLUMN in row:
        example[LATENT_COLUMN] = row[LATENT_COLUMN]
    return example
