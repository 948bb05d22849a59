"""Rounds of on-policy candidates ranked by each user's personalized reward: the data of best-of-n distillation
(`vpl_trl.policy.distillation`) and of reward-ranked DPO (`vpl_trl.policy.ranked_dpo`).

Each round, the policy samples `n` completions for each (user, prompt) row under that user's conditioning (their
pairs in the prompt, or their latent as a soft prompt), and the user's reward ranks them. A trainer turns each row's
ranked candidates into its examples (the best to imitate, or best-against-worst pairs), trains on them for
`epochs_per_round` epochs, then samples the next round with the updated policy. A round's candidates cost one
generation and one scoring pass each; every round's rewards are kept (`rounds`) as the on-policy learning curve,
and, with `candidates_file`, every scored candidate is written out. Under a wall-time budget (`deadline`), a new
round starts only if one as long as the last (its candidates and its updates) ends in time, and `max_rounds` caps
their number; `score_final_round` samples and scores the trained policy once more, not to train on.

Each checkpoint also holds the rounds' state (`best_of_n_rounds.json`: the current round's examples, the kept
examples, the learning curve), so that a run resumed from it (`args.resume_from_checkpoint`, then
`train(resume_from_checkpoint=...)`) trains on the same round instead of sampling a new one.

With `offline_pool` (a shared pool of candidate answers, such as `data/population_pool.jsonl.gz`), the first round
generates nothing: each (user, prompt) row's candidates are the pool's answers to its prompt, ranked by the user's
reward like any round's; the online rounds follow. Where several users rank the same candidates (the pool, a
shared first round, online rounds with `share_online_candidates`), each user's ranking is also compared with the
other users' of the prompt (`shared_rankings`), for the trainers that pair what sets a user apart
(`contrast_pairs`) or what the prompt's users prefer together (`consensus_pairs`).

The rounds' settings are fields of the trainers' configs (`BestOfNRoundsConfig`: `RewardRankedDPOConfig`,
`BestOfNDistillationConfig`); `BestOfNRoundsArguments`, the part of them that the policy recipe exposes as flags,
is one of the recipe's argument dataclasses.
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
from accelerate.utils import broadcast_object_list, gather_object
from datasets import Dataset
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl.data_utils import is_conversational

from ..data.population import dialogue_prompt, load_pool
from ..distributed import full_weights_for_generation
from ..inference.generation import GenerationSettings, generate_candidates
from ..text import is_chat, join_response
from .trainers import LATENT_COLUMN

ROUNDS_STATE = "best_of_n_rounds.json"
Group = tuple[str, str]  # (user, prompt)
Ranked = list[tuple[float, str]]  # a row's candidates with their rewards, best first


@dataclass
class BestOfNRoundsArguments:
    """The rounds of reward-ranked candidates, as the policy recipe's flags (`--bon_n` or `--bon-n`, ...) and as
    fields of the trainers' configs (`BestOfNRoundsConfig`). Each round takes one row (a draw of the user's
    conditioning) per (user, prompt), samples `bon_n` candidates for it and keeps `bon_keep` examples; a new round
    every `bon_epochs_per_round` epochs."""

    bon_n: int = field(default=16, metadata={"help": "Candidates per user and prompt each round (bon_sft and dpo)."})
    bon_keep: int = field(
        default=2, metadata={"help": "Examples kept per user and prompt each round: the best candidates to distill "
                                     "(bon_sft), or best-against-worst pairs (dpo)."}
    )
    bon_epochs_per_round: int = field(
        default=6, metadata={"help": "Epochs on a round's examples before new candidates (bon_sft and dpo)."}
    )
    candidates_file: str | None = field(
        default=None, metadata={"help": "A JSONL file that receives every scored candidate of every round (bon_sft "
                                        "and dpo; the recipe's default: `output_dir/round_candidates.jsonl`)."}
    )
    contrast_pairs: int = field(
        default=0, metadata={"help": "dpo: of the `bon_keep` pairs per user and prompt, how many are contrast pairs "
                                     "in a round whose candidates several users score (the offline pool, a shared "
                                     "first round, share_online_candidates): of the user's upper half, the "
                                     "candidate they prefer most relative to the prompt's other users, against the "
                                     "candidate of their lower half that the others prefer most relative to them. "
                                     "They carry what sets a user apart; the other pairs, best against worst, what "
                                     "everyone prefers."}
    )
    consensus_pairs: int = field(
        default=0, metadata={"help": "dpo: of the best-against-worst pairs (those that are not contrast pairs), how "
                                     "many rank the candidates by the mean standardized reward of the prompt's "
                                     "users, not by the user's own, in a round whose candidates several users "
                                     "score: what the users of a prompt prefer together, the same pair for each "
                                     "of them (under their own conditioning), rather than each user's estimate "
                                     "of it."}
    )
    offline_contrast_pairs: int | None = field(
        default=None, metadata={"help": "dpo: `contrast_pairs` in the offline round (`offline_pool`) alone; default: "
                                        "contrast_pairs. With more consensus pairs offline and more contrast pairs "
                                        "online, the pool's varied answers teach what everyone prefers and the "
                                        "policy's own samples what sets each user apart."}
    )
    offline_consensus_pairs: int | None = field(
        default=None, metadata={"help": "dpo: `consensus_pairs` in the offline round alone; default: "
                                        "consensus_pairs."}
    )
    share_online_candidates: bool = field(
        default=False, metadata={"help": "Online rounds: each user of a prompt also ranks the candidates sampled for "
                                         "the round's other users of that prompt (each under their own "
                                         "conditioning), so that the contrast and consensus pairs apply to online "
                                         "rounds too and each user's pairs come from more candidates. `bon_n` "
                                         "may then be below what `bon_keep` needs from one user's samples, as long "
                                         "as the users of each prompt sample enough together."}
    )
    offline_pool: str | None = field(
        default=None, metadata={"help": "A pool of candidate answers (JSONL, may be gzipped; rows with `prompt` and "
                                        "`response`, e.g. data/population_pool.jsonl.gz): the first round ranks the "
                                        "pool's answers to each training prompt under each user's reward instead of "
                                        "sampling the policy (no generation); the online rounds follow."}
    )
    max_rounds: int | None = field(
        default=None, metadata={"help": "Stop training after this many rounds (each trained on for "
                                        "`bon_epochs_per_round` epochs); default: as many as the epochs, steps and "
                                        "time allow."}
    )
    score_final_round: bool = field(
        default=False, metadata={"help": "After training, sample and score one more round with the trained policy "
                                         "(not trained on): the learning curve and the candidates file end with "
                                         "the policy's own candidates."}
    )

    kept = ("examples", 1)  # what a round keeps per user and prompt, and the candidates each one takes

    def pair_mix(self, offline: bool) -> tuple[int, int]:
        """A round's (contrast_pairs, consensus_pairs): the offline round's own where they are set."""
        if not offline:
            return self.contrast_pairs, self.consensus_pairs
        contrast, consensus = self.offline_contrast_pairs, self.offline_consensus_pairs
        return (self.contrast_pairs if contrast is None else contrast,
                self.consensus_pairs if consensus is None else consensus)

    def __post_init__(self):
        self.check_rounds(self)
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:  # a trainer config's own checks (TrainingArguments)
            parent()

    @classmethod
    def check_rounds(cls, rounds: BestOfNRoundsArguments) -> None:
        """Raise a `ValueError` saying what is wrong when `cls`' trainer cannot run these rounds (the recipe checks
        its flags so, before loading any model)."""
        for name in ("bon_n", "bon_keep", "bon_epochs_per_round"):
            if getattr(rounds, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(rounds, name)}.")
        what, candidates = cls.kept
        # shared online candidates: a row ranks every user's samples of its prompt, bon_n x its users
        needed = candidates if rounds.share_online_candidates else candidates * rounds.bon_keep
        if rounds.bon_n < needed:
            raise ValueError(f"bon_keep={rounds.bon_keep} {what} per prompt need at least {needed} candidates; got "
                             f"bon_n={rounds.bon_n}.")
        for prefix, (contrast, consensus) in (("", rounds.pair_mix(False)), ("offline_", rounds.pair_mix(True))):
            if not 0 <= contrast <= rounds.bon_keep:
                raise ValueError(f"{prefix}contrast_pairs must be between 0 and bon_keep={rounds.bon_keep}, got "
                                 f"{contrast}.")
            if not 0 <= consensus <= rounds.bon_keep - contrast:
                raise ValueError(f"{prefix}consensus_pairs must be between 0 and bon_keep - {prefix}contrast_pairs="
                                 f"{rounds.bon_keep - contrast}, got {consensus}.")
        if rounds.max_rounds is not None and rounds.max_rounds < 1:
            raise ValueError(f"max_rounds must be at least 1, got {rounds.max_rounds}.")
        if rounds.offline_pool and not Path(rounds.offline_pool).is_file():
            raise ValueError(f"offline_pool {rounds.offline_pool}: no such file.")


@dataclass
class BestOfNRoundsConfig(BestOfNRoundsArguments):
    """[`BestOfNRoundsArguments`] and how the rounds sample: the fields that a trainer config (`SFTConfig`,
    `DPOConfig`) adds for its rounds (`BestOfNDistillationConfig`, `RewardRankedDPOConfig`). With
    `shared_first_round`, the first round samples the untrained policy once per bare prompt (`bon_n` x users
    candidates, which every user's rows of that prompt share) instead of once per user. With `replay`, the examples
    of a (user, prompt) are the best `bon_keep` of every round so far, not of the last round only."""

    max_completion_length: int = field(default=48, metadata={"help": "Maximum tokens per sampled candidate."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature of the candidates."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold of the candidates."})
    generation_batch_size: int = field(default=16, metadata={"help": "Sequences per batch in generation."})
    shared_first_round: bool = field(
        default=True, metadata={"help": "Sample the first round once per bare prompt, shared by every user."}
    )
    replay: bool = field(
        default=False, metadata={"help": "Keep the best examples of every round so far, not of the last one only."}
    )

    def __post_init__(self):
        if self.max_completion_length < 1 or self.generation_batch_size < 1:
            raise ValueError("max_completion_length and generation_batch_size must be at least 1, got "
                             f"{self.max_completion_length} and {self.generation_batch_size}.")
        super().__post_init__()

    @property
    def generation(self) -> GenerationSettings:
        """The candidates' sampling settings (no reseeding: each round draws new samples)."""
        return GenerationSettings(self.max_completion_length, self.temperature, self.top_p,
                                  self.generation_batch_size, seed=None)


class RoundDataset(torch.utils.data.Dataset):
    """The examples of the current round, replaced in place each round (the dataloader keeps this object)."""

    def __init__(self, data: Dataset, columns: Sequence[str]):
        self.columns = [c for c in columns if c in data.column_names]
        self.size = len(data)
        self.replace(data)

    def replace(self, data: Dataset) -> None:
        if len(data) != self.size:
            raise ValueError(f"a round has {len(data)} examples, expected {self.size} (as in the first round): every "
                             "round keeps `bon_keep` examples per user and prompt, and this one's candidates allowed "
                             "fewer (shared online candidates from too few samples: raise `bon_n`).")
        self.data = data.select_columns(self.columns)

    @property
    def column_names(self) -> list[str]:
        return self.columns

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.data[index]


class _NextRound(TrainerCallback):
    """A new round every `bon_epochs_per_round` epochs (`epochs`: the epochs begun so far), unless the current
    round began at this epoch already (a run resumed within it)."""

    def __init__(self, trainer: BestOfNRounds, epochs: int = 0):
        self.trainer, self.epochs = trainer, epochs

    def on_epoch_end(self, args, state, control, **kwargs):
        # stop here rather than at the next epoch's start, where the trainer would take one more step first
        if self.epochs % self.trainer.args.bon_epochs_per_round == 0 and self.trainer.rounds_are_over():
            control.should_training_stop = True

    def on_epoch_begin(self, args, state, control, **kwargs):
        epoch = self.epochs
        if epoch and epoch % self.trainer.args.bon_epochs_per_round == 0 and epoch != self.trainer.round_epoch:
            self.trainer.next_round()
            self.trainer.round_epoch = epoch
        self.epochs += 1


class BestOfNRounds:
    """Mixin for a TRL trainer that trains on rounds of reward-ranked on-policy candidates. A subclass implements
    `_select` (a row's ranked candidates -> its examples) and `_prepare_round` (a round's examples -> the trainer's
    tokenized dataset), and may adjust the trainer after its `__init__` (`_after_trainer_init`).

    Args:
        model: the policy (a PEFT model; latent-conditioned or not).
        args: the trainer's config: a TRL config with the rounds' fields ([`BestOfNRoundsConfig`]).
        prompt_dataset: rows with `prompt` (what the policy sees), `raw_prompt` (what the reward scores),
            `bare_prompt` (the prompt without conditioning, for the shared first round), `user_id` and, for latent
            conditioning, `user_latent` (`vpl_trl.policy.build_policy_dataset` makes them).
        reward_function: TRL's reward-function signature, `f(prompts, completions, user_id, raw_prompt) -> list`.
        deadline: a `time.perf_counter()` value past which no new round starts (a wall-time budget).
    """

    def __init__(
        self,
        model,
        args,
        prompt_dataset: Dataset,
        reward_function: Callable[..., list[float]],
        processing_class,
        callbacks=None,
        deadline: float | None = None,
    ):
        if not isinstance(args, BestOfNRoundsConfig):
            raise TypeError(f"{type(self).__name__} takes a config with the rounds' fields ({self._config_name()}), "
                            f"got {type(args).__name__}.")
        first = self._start_rounds(model, prompt_dataset, reward_function, processing_class, args, deadline)
        super().__init__(model=model, args=args, train_dataset=first, processing_class=processing_class,
                         callbacks=callbacks)
        self._after_trainer_init()
        self._install_rounds()

    @classmethod
    def _config_name(cls) -> str:
        return "a BestOfNRoundsConfig"

    def _after_trainer_init(self) -> None:
        """Adjust the trainer and its first round's prepared examples after the TRL trainer's `__init__`."""

    def _start_rounds(self, model, prompt_dataset: Dataset, reward_function: Callable[..., list[float]],
                      processing_class, args, deadline: float | None) -> Dataset:
        """The first round's examples: sampled from the untrained policy (or ranked from `args.offline_pool`), or
        those of the round that `args.resume_from_checkpoint` was saved in."""
        self.prompt_rows, self.deadline, self._start = list(prompt_dataset), deadline, time.perf_counter()
        self.reward_function, self.args = reward_function, args  # `args`: set again, the same, by the Trainer
        self._groups = list(_group_rows(self.prompt_rows).values())
        self._best: dict[Group, list[tuple[float, dict[str, Any]]]] = {}
        self.rounds: list[dict[str, Any]] = []
        self.timings = {"generation": 0.0, "scoring": 0.0}
        self.round_epoch = 0  # the epoch at which the current round began
        self._tokenizer, self._seed, self._pool = processing_class, args.seed, None
        self._resumed = _read_rounds_state(args.resume_from_checkpoint) if args.resume_from_checkpoint else None
        if self._resumed is not None:
            state = self._resumed
            self.rounds, self.timings, self.round_epoch = state["rounds"], state["timings"], state["round_epoch"]
            self._best = {(user, prompt): [tuple(item) for item in items] for user, prompt, items in state["best"]}
            self._round_examples = state["examples"]
            return Dataset.from_list(state["examples"])
        if args.candidates_file and PartialState().is_main_process:
            Path(args.candidates_file).parent.mkdir(parents=True, exist_ok=True)
            Path(args.candidates_file).write_text("")
        self._pool = candidate_pool(args.offline_pool) if args.offline_pool else None
        return self._new_round(model, None)  # before any engine wraps the model

    def _install_rounds(self) -> None:
        """Serve the rounds' examples through one dataset object (a resumed run: the checkpoint's prepared
        examples), and start a new round every `bon_epochs_per_round` epochs."""
        self._set_signature_columns_if_needed()
        data, epochs = self.train_dataset, 0
        if self._resumed is not None:
            data = Dataset.from_list(self._resumed["prepared"])
            # a checkpoint saved within an epoch resumes at that epoch's start (its steps done are skipped)
            epochs = self._resumed["epochs_begun"] - (0 if self._resumed["epoch_complete"] else 1)
        self.train_dataset = RoundDataset(data, self._signature_columns)
        self._rounds_callback = _NextRound(self, epochs)
        self.add_callback(self._rounds_callback)

    def train(self, *args, **kwargs):
        output = super().train(*args, **kwargs)
        if self.args.score_final_round:
            self._new_round(self.model_wrapped, self.accelerator, final=True)
        return output

    def next_round(self) -> None:
        """Sample, rank and select the next round's examples with the current policy; stop training instead after
        `max_rounds` rounds, or when a round as long as the last one (its candidates and its training) would end
        past the deadline."""
        if self.rounds_are_over():
            self.control.should_training_stop = True
            return
        data = self._new_round(self.model_wrapped, self.accelerator)
        self.train_dataset.replace(self._prepare_round(data))

    def _last_round_seconds(self) -> float:
        """The last round's wall time so far: its candidates and its updates (at least its candidates' time: a
        resumed run counts from its own start)."""
        last = self.rounds[-1]
        return max(time.perf_counter() - self._start - last["elapsed"], last["seconds"])

    def rounds_are_over(self) -> bool:
        """Whether no new round starts: `max_rounds` are done, or one as long as the last would end past the
        deadline (the main process decides, for every process)."""
        trained = [record for record in self.rounds if not record.get("final")]
        over = [(self.args.max_rounds is not None and len(trained) >= self.args.max_rounds)
                or (self.deadline is not None and time.perf_counter() + self._last_round_seconds() > self.deadline)]
        if PartialState().num_processes > 1:
            broadcast_object_list(over)
        return over[0]

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

    def _select(self, row: dict[str, Any], ranked: Ranked, shared: SharedRanking | None = None
                ) -> list[tuple[float, dict[str, Any]]]:
        """A row's examples with their scores (what `replay` ranks them by). `shared`, with `contrast_pairs` or
        `consensus_pairs` where the row's candidates are shared: how the round's other users of its prompt rank
        them ([`shared_rankings`])."""
        raise NotImplementedError

    def _prepare_round(self, data: Dataset) -> Dataset:
        raise NotImplementedError

    def _new_round(self, model, accelerator, final: bool = False) -> Dataset:
        """One round: every process samples (or, the offline round, takes from the pool) and scores its share of
        the rows; all get every selected example (`final`: a round after training, scored but not trained on)."""
        start = time.perf_counter()
        rng = random.Random(f"distillation-{self._seed}-{len(self.rounds)}")
        rows = [rng.choice(group) for group in self._groups]  # one draw of each user's conditioning per prompt
        state = PartialState()
        offline = self._offline_round()
        shared = self.args.shared_first_round and not self.rounds and not offline
        if shared:  # one pool per bare prompt, from the policy before any training: the reference policy
            mine = [row for row in rows if _key(row) in _own_keys(rows, state)]
        else:
            mine = rows[state.process_index :: state.num_processes]
        if offline:
            candidates = [self._pool_candidates(row) for row in mine]
        else:
            with full_weights_for_generation(model, accelerator) as policy:
                candidates = self._sample(policy, mine, shared)
        own = candidates
        across = self.args.share_online_candidates and not (offline or shared)
        if across:
            candidates = _with_other_users_candidates(mine, candidates)
        generation_seconds = time.perf_counter() - start
        flat = [(row, text) for row, texts in zip(mine, candidates) for text in texts]
        rewards = self.reward_function(
            prompts=[row["prompt"] for row, _ in flat], completions=[text for _, text in flat],
            user_id=[row["user_id"] for row, _ in flat], raw_prompt=[row["raw_prompt"] for row, _ in flat],
        ) if flat else []
        ranked_rows, begin = [], 0
        for row, texts in zip(mine, candidates):
            ranked = sorted(zip(rewards[begin : begin + len(texts)], texts), key=lambda pair: pair[0], reverse=True)
            ranked_rows.append((row, ranked))
            begin += len(texts)
        compare = sum(self.args.pair_mix(offline)) > 0 and (offline or shared or across)
        rankings = shared_rankings(ranked_rows) if compare else {}
        selected, stats, scored, keep = [], [], [], self.args.bon_keep
        for (row, ranked), texts in zip(ranked_rows, own):
            examples = self._select(row, ranked, rankings.get(_group(row)))
            selected += [(_group(row), score, example) for score, example in examples]
            sampled_for_it = set(texts)
            sampled = [reward for reward, text in ranked if text in sampled_for_it]  # the learning curve: its own
            stats.append({"user_id": row["user_id"], "mean": sum(sampled) / len(sampled),
                          "kept": sum(r for r, _ in ranked[: keep]) / min(keep, len(ranked))})
            if self.args.candidates_file:
                scored += [{"round": len(self.rounds), "user_id": row["user_id"], "prompt": row["raw_prompt"],
                            "completion": text, "reward": reward, **({"final": True} if final else {})}
                           for reward, text in ranked]
        selected, stats = gather_object(selected), gather_object(stats)
        this_round: dict[Group, list[tuple[float, dict[str, Any]]]] = {}
        for group, score, example in selected:
            this_round.setdefault(group, []).append((score, example))
        for group, examples in this_round.items():
            previous = self._best.get(group, []) if self.args.replay else []
            ranked = sorted([*previous, *examples], key=lambda pair: pair[0], reverse=True)
            self._best[group] = ranked[:keep]
        examples = [example for group in sorted(self._best) for _, example in self._best[group]]
        self.timings["generation"] += generation_seconds
        self.timings["scoring"] += time.perf_counter() - start - generation_seconds
        self._write_candidates(gather_object(scored) if self.args.candidates_file else [])
        self._record_round(stats, generation_seconds, time.perf_counter() - start, start - self._start, offline,
                           final)
        self._round_examples = examples
        return Dataset.from_list(examples)

    def _offline_round(self) -> bool:
        """Whether the round being built is the offline one: the pool's answers, before any other round."""
        return self._pool is not None and not self.rounds

    def _pool_candidates(self, row: dict[str, Any]) -> list[str]:
        """The offline round's candidates of a row: the pool's answers to its prompt, cut to `max_completion_length`
        tokens as the policy's own samples are, as completions of the prompt the policy sees (a plain-text
        `...Assistant:` prompt gets the leading space its answers have in data)."""
        answers = self._pool.get(pool_key(row["raw_prompt"]))
        if answers is None:
            raise ValueError(f"offline_pool {self.args.offline_pool} has no answers to the training prompt "
                             f"{str(row['raw_prompt'])[:80]!r}: train on the pool's prompts (or drop offline_pool).")
        if len(answers) < self._min_candidates():
            raise ValueError(f"offline_pool {self.args.offline_pool} has {len(answers)} answer(s) to "
                             f"{str(row['raw_prompt'])[:80]!r}; {self._min_candidates()} are needed per prompt.")
        return [join_response(row["prompt"], self._cut(answer)) for answer in answers]

    def _cut(self, answer: str) -> str:
        """`answer`'s first `max_completion_length` tokens."""
        ids = self._tokenizer(answer, add_special_tokens=False)["input_ids"]
        limit = self.args.max_completion_length
        return answer if len(ids) <= limit else self._tokenizer.decode(ids[:limit]).rstrip()

    def _min_candidates(self) -> int:
        """The fewest candidates a row needs for its `bon_keep` examples."""
        return self.args.bon_keep

    def _sample(self, policy, rows: list[dict[str, Any]], shared: bool) -> list[list[str]]:
        """Each row's candidates: sampled under its conditioning, or (`shared`) from one pool of `bon_n` x users
        samples per bare prompt, which every user's rows of that prompt share."""
        if not rows:
            return []
        settings = self.args.generation
        description = f"Best-of-n round {len(self.rounds)}"
        if shared:
            keys = list(dict.fromkeys(_key(row) for row in rows))
            bare = {_key(row): row["bare_prompt"] for row in rows}
            per_prompt = self.args.bon_n * len({row["user_id"] for row in self.prompt_rows})
            pools = generate_candidates(policy, self._tokenizer, [bare[k] for k in keys], per_prompt, settings,
                                        progress=description)
            pool_of = dict(zip(keys, pools))
            candidates = [pool_of[_key(row)] for row in rows]
        else:
            latents = torch.tensor([r[LATENT_COLUMN] for r in rows]) if LATENT_COLUMN in rows[0] else None
            candidates = generate_candidates(policy, self._tokenizer, [r["prompt"] for r in rows], self.args.bon_n,
                                             settings, latents=latents, progress=description)
        return candidates

    def _write_candidates(self, scored: list[dict[str, Any]]) -> None:
        if scored and PartialState().is_main_process:
            with open(self.args.candidates_file, "a", encoding="utf-8") as handle:
                for record in scored:
                    handle.write(json.dumps(record, default=str) + "\n")

    def _record_round(self, stats: list[dict[str, Any]], generation_seconds: float, seconds: float,
                      elapsed: float, offline: bool = False, final: bool = False) -> None:
        """The round's mean reward of the candidates and of the best `bon_keep` per user (the policy's on-policy
        reward when the round began, `elapsed` seconds into training; `offline`: the pool's, not the policy's;
        `final`: after training, not trained on)."""
        users = sorted({s["user_id"] for s in stats})
        record = {"round": len(self.rounds), "step": self.state.global_step if hasattr(self, "state") else 0,
                  "elapsed": elapsed, "generation_seconds": generation_seconds, "seconds": seconds}
        if offline:
            record["offline"] = True
        if final:
            record["final"] = True
        for user in users:
            mine = [s for s in stats if s["user_id"] == user]
            record[f"reward/{user}"] = sum(s["mean"] for s in mine) / len(mine)
            record[f"kept_reward/{user}"] = sum(s["kept"] for s in mine) / len(mine)
        self.rounds.append(record)
        if hasattr(self, "state"):
            self.log({k: v for k, v in record.items() if k not in ("round", "step", "elapsed", "offline", "final")})


@dataclass
class SharedRanking:
    """How the users of a prompt rank the candidates that they all scored, seen from one of them: per candidate,
    `others_minus_own`, the other users' mean standardized reward minus this user's (high: the others like it and
    this user does not; 0: everyone rates it alike), and `consensus`, every user's mean standardized reward, this
    one's included (rewards standardized over a row's candidates, so that users whose rewards have different scales
    count alike)."""

    others_minus_own: dict[str, float]
    consensus: dict[str, float]


def shared_rankings(ranked_rows: Sequence[tuple[dict[str, Any], Ranked]]) -> dict[Group, SharedRanking]:
    """For each (user, prompt) of a round whose candidates several users scored (the pool's, or a shared first
    round's), its [`SharedRanking`]; none for a prompt that one user alone scored. Every process gets every user's
    scores."""
    standardized = []
    for row, ranked in ranked_rows:
        rewards = torch.tensor([reward for reward, _ in ranked], dtype=torch.float64)
        spread = float(rewards.std()) if len(ranked) > 1 else 0.0
        values = ((rewards - rewards.mean()) / spread if spread > 0 else torch.zeros_like(rewards)).tolist()
        standardized.append((_group(row), {text: value for (_, text), value in zip(ranked, values)}))
    by_prompt: dict[str, dict[str, dict[str, float]]] = {}
    for (user, prompt), values in gather_object(standardized):
        by_prompt.setdefault(prompt, {})[user] = values
    result: dict[Group, SharedRanking] = {}
    for prompt, users in by_prompt.items():
        if len(users) < 2:
            continue
        for user, mine in users.items():
            ranking = result[(user, prompt)] = SharedRanking({}, {})
            for text, value in mine.items():
                theirs = [values[text] for other, values in users.items() if other != user and text in values]
                if theirs:
                    ranking.others_minus_own[text] = sum(theirs) / len(theirs) - value
                ranking.consensus[text] = (sum(theirs) + value) / (len(theirs) + 1)
    return result


def _with_other_users_candidates(rows: Sequence[dict[str, Any]], candidates: Sequence[list[str]]) -> list[list[str]]:
    """Each row's candidates, then those sampled for the round's other rows of its prompt, every process's (each
    text once)."""
    by_prompt: dict[str, list[str]] = {}
    for key, texts in gather_object([(_key(row), list(texts)) for row, texts in zip(rows, candidates)]):
        by_prompt.setdefault(key, []).extend(texts)
    return [list(dict.fromkeys([*texts, *by_prompt[_key(row)]])) for row, texts in zip(rows, candidates)]


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


def pool_key(prompt: Any) -> str:
    """The text a pool's prompt and a training prompt share: a chat prompt's last user message, a `Human: ...
    Assistant:` dialogue prompt's request (as `vpl_trl.data.population` writes it), or the prompt itself."""
    if is_chat(prompt):
        return next((m["content"] for m in reversed(prompt) if m.get("role") == "user"), "").strip()
    return str(prompt).strip()


def candidate_pool(path: str | os.PathLike) -> dict[str, list[str]]:
    """A shared pool of candidate answers (`vpl_trl.data.population.load_pool`'s format: JSONL rows with `prompt`
    and `response`) as {prompt: its distinct answers}, each prompt reachable as written and as the dialogue
    prompt the population data sets make of it."""
    pool: dict[str, list[str]] = {}
    for row in load_pool(path):
        answers = pool.setdefault(pool_key(row["prompt"]), [])
        if row["response"] not in answers:
            answers.append(row["response"])
    for prompt in list(pool):
        pool.setdefault(pool_key(dialogue_prompt(prompt)), pool[prompt])
    return pool
