"""Iterative DPO on pairs ranked by each user's personalized reward, with TRL's `DPOTrainer`.

Each round (`vpl_trl.policy.best_of_n_rounds`), the policy samples `bon_n` completions for each (user, prompt) row
under that user's conditioning, and the user's reward ranks them; the best against the worst (then the second best
against the second worst, up to `bon_keep` pairs) become preference pairs, conditioned the same way. The reference is
the policy as the round begins (its log-probabilities computed once per round, TRL's `precompute_ref_log_probs`, by
TRL's `compute_ref_log_probs`), as in iterative DPO (Xu et al. 2023; Pang et al. 2024): each round improves on the
last one, within DPO's KL bound to it. A latent-conditioned policy's soft prompt is then part of the reference too,
not only of the policy. With `offline_pool`, the first round's pairs are ranked from a shared pool of answers
instead of sampled: DPO on them needs no generation. Where several users rank the same candidates (the pool, a
shared first round), `contrast_pairs` of each user's pairs set what they prefer more than the other users do
against what the others prefer more than they do: best-against-worst pairs mostly teach what every user prefers,
which a user-blind policy learns as well. `consensus_pairs` of them rank the candidates by the prompt's users
together: what they all prefer, learnt from the same pair for each of them, as a user-blind policy learns it, not
from each user's noisier estimate.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import PartialState
from datasets import Dataset
from trl import DPOConfig

from ..checkpoints import FaultTolerantCheckpoints
from ..distributed import full_weights_for_generation
from .best_of_n_rounds import BestOfNRounds, BestOfNRoundsConfig, Ranked, SharedRanking, as_completion, with_latent
from .trainers import ConditionedDPOTrainer, LatentPromptArguments


@dataclass
class RewardRankedDPOConfig(BestOfNRoundsConfig, LatentPromptArguments, DPOConfig):
    r"""
    [`~trl.DPOConfig`] for [`RewardRankedDPOTrainer`], with the rounds' fields ([`BestOfNRoundsConfig`]): `bon_n`
    candidates per user and prompt each round, `bon_keep` best-against-worst pairs kept of them, a new round every
    `bon_epochs_per_round` epochs, how the candidates are sampled, `candidates_file`, `offline_pool` (a first
    round ranked from a pool of answers, without generation) and `contrast_pairs` (of the `bon_keep` pairs, those
    that set the user apart from the other users of the prompt, where they rank the same candidates), and the
    soft prompt's `latent_prompt_lr_ratio` ([`LatentPromptArguments`]). The reference log-probabilities are
    precomputed, once per round, under the policy as the round begins (`precompute_ref_log_probs`, which must stay
    True).
    """

    kept = ("pairs", 2)

    precompute_ref_log_probs: bool = field(
        default=True, metadata={"help": "The reference log-probabilities of each round's pairs, computed once as the "
                                        "round begins (required: the reference is the policy at that point)."}
    )

    def __post_init__(self):
        if not self.precompute_ref_log_probs:
            raise ValueError("precompute_ref_log_probs must be True: reward-ranked DPO's reference is the policy as "
                             "each round begins, whose log-probabilities are computed then, not kept as a model.")
        super().__post_init__()


class RewardRankedDPOTrainer(FaultTolerantCheckpoints, BestOfNRounds, ConditionedDPOTrainer):
    """[`ConditionedDPOTrainer`] on best-against-worst pairs of `bon_n` samples per (user, prompt), refreshed every
    round, against the policy as the round began. Its arguments are [`BestOfNRounds`]' (`args`: a
    [`RewardRankedDPOConfig`])."""

    @classmethod
    def _config_name(cls) -> str:
        return "a RewardRankedDPOConfig"

    def _min_candidates(self) -> int:
        return 2 * self.args.bon_keep

    def _after_trainer_init(self) -> None:
        self._drop_reference_adapter()

    def _drop_reference_adapter(self) -> None:
        """TRL copies a PEFT policy's adapter into a frozen `ref` adapter, its reference for a policy that starts
        from a trained adapter. This trainer's reference is the policy as each round begins (the soft prompt
        included, which the copy would not hold), through each round's precomputed log-probabilities: the copy is
        dropped, so that it takes no memory and is not saved with the policy."""
        if "ref" in getattr(self.model, "peft_config", {}):
            self.model.delete_adapter("ref")
            self.model.set_adapter("default")

    def _select(self, row: dict[str, Any], ranked: Ranked, shared: SharedRanking | None = None
                ) -> list[tuple[float, dict[str, Any]]]:
        """`bon_keep` pairs (as many as the row's candidates allow), scored by their reward gap under this user: the
        i-th best candidate against the i-th worst. With `shared` (shared candidates), the first `consensus_pairs`
        of them rank the candidates by the prompt's users' consensus instead (ties: by this user's reward), and the
        last `contrast_pairs` are contrast pairs: the i-th of the upper half that this user prefers most relative to
        the other users against the i-th of the lower half that the others prefer most relative to this user
        (ties: the higher, and the lower, reward)."""
        keep = min(self.args.bon_keep, len(ranked) // 2)  # fewer candidates: shared ones across too few users
        contrast, consensus = self.args.pair_mix(self._offline_round())  # the offline round may have its own
        contrast = min(contrast, keep) if shared else 0
        consensus = min(consensus, keep - contrast) if shared else 0
        chosen_rejected = []
        if consensus:
            agreed = sorted(ranked, key=lambda c: (shared.consensus.get(c[1], 0.0), c[0]), reverse=True)
            chosen_rejected += [(agreed[i], agreed[-1 - i]) for i in range(consensus)]
        chosen_rejected += [(ranked[i], ranked[-1 - i]) for i in range(keep - contrast - consensus)]
        if contrast:
            half, gap = len(ranked) // 2, shared.others_minus_own
            mine_most = sorted(ranked[:half], key=lambda c: (gap.get(c[1], 0.0), -c[0]))
            theirs_most = sorted(ranked[half:], key=lambda c: (gap.get(c[1], 0.0), -c[0]), reverse=True)
            chosen_rejected += list(zip(mine_most, theirs_most))[:contrast]
        pairs = []
        for (high, chosen), (low, rejected) in chosen_rejected:
            example = {"prompt": row["prompt"], "chosen": as_completion(row, chosen),
                       "rejected": as_completion(row, rejected)}
            pairs.append((high - low, with_latent(row, example)))
        return pairs

    def _prepare_round(self, data: Dataset) -> Dataset:
        prepared = self._prepare_dataset(data, self.processing_class, self.args, "ranked pairs")
        size = self.args.precompute_ref_batch_size or self.args.per_device_train_batch_size
        return self._reference_logps(prepared, size, self.model_wrapped, self.accelerator)

    def _precompute_ref_logps(self, dataset: Dataset, name: str, batch_size: int) -> Dataset:
        """TRL's hook for the reference log-probabilities of a dataset (the first round's pairs, as TRL's
        `__init__` ends): under the policy as it is, before any training. A resumed run reads its round's from the
        checkpoint instead (`BestOfNRounds._install_rounds`)."""
        if self._resumed is not None and name == "train":
            return dataset
        return self._reference_logps(dataset, batch_size, self.model, None)

    @torch.no_grad()
    def _reference_logps(self, dataset: Dataset, batch_size: int, model, accelerator) -> Dataset:
        """`dataset` with `ref_chosen_logps` and `ref_rejected_logps` under the policy as it is now (`model`, whole on
        every process: prepared by `accelerator`, or not yet), from TRL's `compute_ref_log_probs`. TRL's own
        precomputation (`_precompute_ref_logps`) cannot serve the later rounds: it would wrap the policy in a second
        DeepSpeed engine mid-training. Every process computes them all (the same numbers), so none waits for
        another."""
        chosen, rejected = [], []
        with full_weights_for_generation(model, accelerator) as policy, self._policy_as_reference(policy):
            # where the weights are: under DeepSpeed the model reaches the accelerator only as training starts
            device = next(policy.parameters()).device
            was_training = policy.training
            policy.eval()
            for start in range(0, len(dataset), batch_size):
                batch = self.data_collator([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
                batch = {key: value.to(device) for key, value in batch.items()}
                chosen_logps, rejected_logps = self.compute_ref_log_probs(policy, batch)
                chosen += chosen_logps.float().cpu().tolist()
                rejected += rejected_logps.float().cpu().tolist()
            policy.train(was_training)
        PartialState().wait_for_everyone()
        dataset = dataset.remove_columns([c for c in ("ref_chosen_logps", "ref_rejected_logps")
                                          if c in dataset.column_names])
        return dataset.add_column("ref_chosen_logps", chosen).add_column("ref_rejected_logps", rejected)

    @contextlib.contextmanager
    def _policy_as_reference(self, policy):
        """TRL's `compute_ref_log_probs` runs a PEFT policy without a `ref_model` with its adapter switched (to a
        `ref` copy, or off: the base model). Here the reference is the policy itself as the round begins, adapter
        and soft prompt as they are: it is named the reference model for the pass, so TRL runs it unchanged."""
        self.ref_model = policy
        try:
            yield
        finally:
            self.ref_model = None
