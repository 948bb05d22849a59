"""Personalized best-of-n from the command line.

    python -m vpl_trl.sample --reward_model DIR --user_context FILE --prompt TEXT [--n 8] [--json]
    python -m vpl_trl.sample --reward-model DIR --prompts prompts.jsonl --policy MODEL ...
    python -m vpl_trl.sample --policy CONDITIONED_POLICY_DIR --user-context FILE --prompt TEXT [--n 1]
        [--latent_guidance_scale 2]

A conditioned policy (saved by recipes/ppo_personalized.py --mode conditioned) is itself conditioned on the user,
as it was trained: shown their pairs, or given their latent z from the reward model it was trained with (the
default --reward_model); with --n 1 its own sample is returned. A latent-conditioned policy can be guided by the
user's latent (`--latent_guidance_scale` above 1): each token is pushed away from what the policy writes for a
user it knows nothing about, at twice the generation's cost.

The user's context pairs (JSON list or JSONL of `{prompt?, chosen, rejected}`) are encoded into `z` once;
n candidates per prompt are sampled from the policy (default: the embedded SmolLM2 instruct model) and
ranked by r(x, z). Without `--user_context` the prior mean user is used. Bad input exits with code 2.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser
from transformers.utils import logging as transformers_logging

from ..data.format import PreferenceDataError
from ..data.user_files import load_user_context, read_prompts
from ..embedded_model import DEFAULT_MODEL
from ..logs import show_info_logs
from ..models.causal_lm import load_policy
from ..policy.conditioned_policy import (
    PolicyError,
    check_reward_fits,
    load_conditioned_policy,
    policy_reward_model,
    read_policy_config,
)
from .best_of_n import PersonalizedBestOfN, Ranking
from .generation import GenerationSettings
from .scoring import PersonalizedRewardScorer, RewardModelError


@dataclass
class SampleArguments:
    reward_model: str | None = field(
        default=None, metadata={"help": "Folder of a saved VPL reward model (default: the one a conditioned "
                                        "--policy was trained with)."}
    )
    user_context: str | None = field(
        default=None, metadata={"help": "The user's labelled pairs: JSON list or JSONL of {prompt?, chosen, rejected}."}
    )
    prompt: str | None = field(default=None, metadata={"help": "One prompt."})
    prompts: str | None = field(
        default=None, metadata={"help": "A file of prompts: one per line, or JSONL with `prompt`."}
    )
    n: int = field(default=8, metadata={"help": "Candidates per prompt."})
    policy: str = field(default=DEFAULT_MODEL, metadata={"help": "The policy LLM (hub id or folder), or a conditioned "
                                                                "policy saved by recipes/ppo_personalized.py."})
    max_new_tokens: int = field(default=64, metadata={"help": "Maximum tokens per candidate."})
    temperature: float = field(default=0.8, metadata={"help": "Sampling temperature (0: greedy)."})
    top_p: float = field(default=0.95, metadata={"help": "Nucleus sampling threshold."})
    batch_size: int = field(default=8, metadata={"help": "Sequences generated (and scored) per batch."})
    seed: int = field(default=0, metadata={"help": "Random seed of sampling."})
    latent_guidance_scale: float = field(
        default=1.0, metadata={"help": "For a latent-conditioned --policy: how far each token is pushed from what "
                                       "the policy writes for the null latent z = 0 (1: not at all)."}
    )
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, ... (default: cuda when available)."})
    json: bool = field(default=False, metadata={"help": "Print one JSON object per prompt instead of text."})


class UsageError(Exception):
    """Bad input: reported as one line on stderr, exit code 2."""


def collect_prompts(args: SampleArguments) -> list[Any]:
    if (args.prompt is None) == (args.prompts is None):
        raise UsageError("give exactly one of --prompt TEXT or --prompts FILE.")
    return [args.prompt] if args.prompt is not None else read_prompts(args.prompts)


def format_ranking(ranking: Ranking) -> str:
    """The best response, then every candidate with its reward, best first."""
    def indent(text: str) -> str:
        return text.replace("\n", "\n" + " " * 14)

    lines = [
        f"Prompt: {ranking.prompt}",
        f"Best (reward {ranking.best.reward:+.4f}): {indent(ranking.best.text)}",
        "Candidates:",
    ]
    lines += [f"  {i:>2}. {c.reward:+.4f}  {indent(c.text)}" for i, c in enumerate(ranking.candidates, start=1)]
    return "\n".join(lines)


def build_best_of_n(args: SampleArguments) -> tuple[PersonalizedBestOfN, list[dict] | None]:
    """Load the user context, the reward model and the policy (in that order: cheap checks first)."""
    if args.n < 1:
        raise UsageError(f"--n must be at least 1, got {args.n}.")
    if args.latent_guidance_scale < 0:
        raise UsageError(f"--latent_guidance_scale must be at least 0 (1: no guidance), got "
                         f"{args.latent_guidance_scale}.")
    context = load_user_context(args.user_context) if args.user_context else None
    policy_config = read_policy_config(args.policy) if Path(args.policy).is_dir() else None
    kind = policy_config["conditioning"]["kind"] if policy_config else None
    if args.latent_guidance_scale != 1 and kind != "latent":
        what = f"a {kind!r}-conditioned policy" if kind else "not a conditioned policy (no vpl_policy.json)"
        raise UsageError(f"--latent_guidance_scale guides a latent-conditioned policy; {args.policy} is {what}. "
                         "Leave the scale at 1.")
    reward_model = args.reward_model or (policy_reward_model(args.policy, policy_config) if policy_config else None)
    if not reward_model:
        raise UsageError("--reward_model is required (the policy is not a conditioned policy that records one).")
    scorer = PersonalizedRewardScorer.from_pretrained(reward_model, device=args.device, batch_size=args.batch_size)
    if not scorer.uses_latent:
        print(f"note: {args.reward_model} is a {scorer.model.config.reward_type!r} reward model without a user latent; "
              "every user gets the same ranking.", file=sys.stderr)
    elif context is None:
        print("note: no --user_context given: ranking for the prior mean user (z = prior mean).", file=sys.stderr)
    conditioning = None
    try:
        if policy_config is not None:
            check_reward_fits(policy_config, scorer.model.config.latent_dim if scorer.uses_latent else 0,
                              f"policy {args.policy} with reward model {reward_model}")
            policy, tokenizer, conditioning, _ = load_conditioned_policy(args.policy, device=args.device)
        else:
            policy, tokenizer = load_policy(args.policy, device=args.device)
    except OSError as error:
        raise UsageError(f"policy {args.policy} cannot be loaded: {' '.join(str(error).split())}") from error
    settings = GenerationSettings(args.max_new_tokens, args.temperature, args.top_p, args.batch_size, args.seed,
                                  args.latent_guidance_scale)
    return PersonalizedBestOfN(policy, tokenizer, scorer, settings, conditioning), context


def run(args: SampleArguments) -> list[Ranking]:
    prompts = collect_prompts(args)
    best_of_n, context = build_best_of_n(args)
    start = time.perf_counter()
    rankings = best_of_n.rank_many(prompts, context=context, n=args.n)
    elapsed = time.perf_counter() - start
    for ranking in rankings:
        print(json.dumps(ranking.to_dict(), ensure_ascii=False) if args.json else format_ranking(ranking) + "\n")
    print(f"{len(prompts) * args.n} candidates generated and scored in {elapsed:.1f} s", file=sys.stderr)
    return rankings


def main(argv: list[str] | None = None) -> int:
    parser = HfArgumentParser(SampleArguments)
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    show_info_logs()  # embedding throughput, on stderr: stdout holds the rankings
    try:
        with quiet_transformers():
            run(args)
    except (UsageError, PreferenceDataError, RewardModelError, PolicyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


@contextlib.contextmanager
def quiet_transformers():
    """Keep the terminal for results: no weight-loading progress bars or loading notices."""
    verbosity, bars = transformers_logging.get_verbosity(), transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)
        if bars:
            transformers_logging.enable_progress_bar()
