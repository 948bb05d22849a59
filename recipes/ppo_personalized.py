"""Optimize a policy against a personalized (VPL) reward with TRL's GRPO (PPO's clipped surrogate, several
passes per generated batch with `--num_iterations`, KL to the reference with `--beta`).

    accelerate launch recipes/ppo_personalized.py --reward_model outputs/vpl-pets --user_contexts pets \
        --mode {conditioned,per_user} --output_dir outputs/ppo-pets [--config recipe.yaml] [any GRPOConfig flag]

Each user's latent `z` comes from their context pairs (`--num_context` pairs drawn from their labelled pairs in a
dataset folder, or a JSON mapping user -> context file). Every completion is scored under the latent of the user
its prompt belongs to.

- `conditioned`: one LoRA policy for every user; its prompt starts with a preamble listing the user's choices,
  so it serves a new user given only their pairs. The adapter is saved to `output_dir`.
- `per_user`: one LoRA adapter per user, trained on the bare prompts against that user's reward, saved to
  `output_dir/adapters/<user>`.

Before and after training, the policy for each user answers held-out prompts (`--eval_prompts`; a conditioned
policy sees a preamble drawn from the user's test-split pairs, which no training prompt showed, as a new user's
would be) and every user's reward scores the answers: `output_dir/eval_results.json`, a printed table,
`output_dir/eval_matrix.png` and every scored completion in `output_dir/eval_completions.jsonl`.
"""

from __future__ import annotations

import copy
import json
import random
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from trl import GRPOConfig, GRPOTrainer, ModelConfig, TrlParser, get_peft_config

from vpl_trl.data.format import PreferenceDataError
from vpl_trl.distributed import cpu_launch_defaults
from vpl_trl.embedded_model import DEFAULT_MODEL, resolve_model_name_or_path
from vpl_trl.generation import GenerationSettings, PersonalizedRewardScorer, load_policy
from vpl_trl.policy import (
    PersonalizedRewardFunction,
    build_policy_dataset,
    draw_context,
    format_results,
    generate_for_user,
    load_prompt_list,
    load_user_pairs,
    mean_rewards,
    policy_prompt,
    resolve_data_source,
    score_completions,
    summarize,
    write_results,
)

MODES = ("conditioned", "per_user")


@dataclass
class ScriptArguments:
    reward_model: str = field(metadata={"help": "Folder of a saved VPL reward model."})
    user_contexts: str = field(
        default="pets",
        metadata={"help": "Users' labelled pairs: a dataset folder in our format (or `pets`), or a JSON mapping "
                          "user -> context file (or list of pairs)."},
    )
    prompts: str | None = field(
        default=None, metadata={"help": "Training prompts: a file (lines or JSONL) or a dataset folder (its train "
                                        "split); default: the prompts of --user_contexts when it is a dataset."}
    )
    eval_prompts: str | None = field(
        default=None, metadata={"help": "Held-out prompts (file or dataset folder, its test split); default: the "
                                        "test split of the prompts' dataset, else the training prompts."}
    )
    mode: str = field(default="conditioned", metadata={"help": "conditioned or per_user.", "choices": list(MODES)})
    users: list[str] | None = field(default=None, metadata={"help": "Only these users (default: all)."})
    num_context: int = field(default=8, metadata={"help": "Context pairs per user that define their latent z."})
    preamble_pairs: int = field(default=4, metadata={"help": "Pairs shown in a conditioned policy's prompt."})
    rows_per_user: int = field(default=64, metadata={"help": "Training prompts per user (prompts cycled)."})
    eval_samples: int = field(default=4, metadata={"help": "Completions per held-out prompt and user."})
    max_eval_prompts: int = field(default=8, metadata={"help": "Held-out prompts evaluated."})
    eval_batch_size: int = field(default=8, metadata={"help": "Sequences per batch in evaluation."})
    data_dir: str = field(default="data", metadata={"help": "Where `pets` is generated."})


@dataclass
class PersonalizedGRPOConfig(GRPOConfig):
    r"""
    [`~trl.GRPOConfig`] with defaults for short LoRA runs against a personalized reward: PPO-style updates
    (`num_iterations=2` passes per generated batch, clipping `epsilon=0.2`), a KL penalty to the reference
    policy (`beta=0.04`; with LoRA the reference is the base model, adapter disabled), 4 generations per
    prompt, short completions, no activation checkpointing and bf16 only on a bf16-capable GPU.
    """

    learning_rate: float = field(default=5e-5, metadata={"help": "The initial learning rate for AdamW."})
    beta: float = field(default=0.04, metadata={"help": "KL coefficient (to the reference policy)."})
    num_iterations: int = field(default=2, metadata={"help": "Optimization passes per generated batch (PPO epochs)."})
    num_generations: int | None = field(default=4, metadata={"help": "Completions per prompt (the GRPO group)."})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "Completions per device and step."})
    max_completion_length: int | None = field(default=48, metadata={"help": "Maximum tokens per completion."})
    activation_checkpointing: bool | None = field(default=False, metadata={"help": "Checkpoint activations."})
    gradient_checkpointing: bool | None = field(default=None, metadata={"help": "Alias of activation_checkpointing."})
    bf16: bool | None = field(default=None, metadata={"help": "bf16; defaults to True only on a bf16-capable GPU."})
    logging_steps: float = field(default=1, metadata={"help": "Log every N steps."})

    def __post_init__(self):
        if self.bf16 is None:
            self.bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported()) and not self.fp16
        super().__post_init__()


Matrix = dict[str, dict[str, float]]


def lora_config(model_args: ModelConfig):
    """The policy's LoRA adapter from the model flags (always LoRA: one adapter per policy)."""
    model_args.use_peft = True
    return get_peft_config(model_args)


def select_users(pairs: Mapping[str, list], users: Sequence[str] | None) -> dict[str, list]:
    if not users:
        return dict(sorted(pairs.items()))
    unknown = [u for u in users if u not in pairs]
    if unknown:
        raise SystemExit(f"error: unknown user(s) {unknown}; the data has {sorted(pairs)}.")
    return {u: pairs[u] for u in users}


def load_prompts(script_args: ScriptArguments, source: Path) -> tuple[list[Any], list[Any], bool]:
    """Training prompts, held-out prompts, and whether the held-out prompts are distinct from training's."""
    prompt_source = resolve_data_source(script_args.prompts, script_args.data_dir) if script_args.prompts else source
    train = load_prompt_list(prompt_source, "train")
    if script_args.eval_prompts:
        held_out = load_prompt_list(resolve_data_source(script_args.eval_prompts, script_args.data_dir), "test")
    else:
        held_out = load_prompt_list(prompt_source, "test") if prompt_source.is_dir() else []
    if not train:
        raise SystemExit(f"error: {prompt_source}: no training prompts.")
    distinct = bool(held_out) and not any(p in train for p in held_out)
    return train, (held_out or train)[: script_args.max_eval_prompts], distinct


def held_out_preambles(
    source: Path, pairs: Mapping[str, list], k: int, rng: random.Random
) -> tuple[dict[str, list], bool]:
    """Contexts that a conditioned policy is evaluated with: drawn from each user's test-split pairs, which no
    training prompt showed (as for a new user), when the data has them for every user; else none."""
    if not source.is_dir():
        return {}, False
    try:
        test_pairs = load_user_pairs(source, "test")
    except PreferenceDataError:
        return {}, False
    if not all(test_pairs.get(user) for user in pairs):
        return {}, False
    return {user: draw_context(test_pairs[user], k, rng) for user in pairs}, True


def evaluate(
    model,
    tokenizer,
    scorer: PersonalizedRewardScorer,
    latents: Mapping[str, torch.Tensor],
    users: Sequence[str],
    eval_prompts: Sequence[Any],
    prompts_for: Callable[[str], list[Any]],
    samples: int,
    settings: GenerationSettings,
    stage: str,
) -> tuple[Matrix, list[dict[str, Any]]]:
    """Rows of the cross-user matrix for `users`, and every scored completion (tagged with `stage` and the user
    the policy served); users whose policy prompts coincide share one generation."""
    rows: Matrix = {}
    records: list[dict[str, Any]] = []
    by_prompts: dict[str, list[dict[str, Any]]] = {}
    for user in users:
        policy_prompts = prompts_for(user)
        key = json.dumps(policy_prompts, sort_keys=True, default=str)
        if key not in by_prompts:
            completions = generate_for_user(model, tokenizer, eval_prompts, policy_prompts, samples, settings)
            by_prompts[key] = score_completions(scorer, completions, latents)
        rows[user] = mean_rewards(by_prompts[key])
        records += [{"stage": stage, "policy_for": user, **record} for record in by_prompts[key]]
    return rows, records


def train_policy(
    policy_path: str, dataset, reward: PersonalizedRewardFunction, args: GRPOConfig, model_args: ModelConfig
) -> tuple[GRPOTrainer, float]:
    """Train one LoRA policy with GRPO; returns the trainer (adapter saved to `args.output_dir`) and seconds."""
    trainer = GRPOTrainer(
        model=policy_path, reward_funcs=reward, args=args, train_dataset=dataset, peft_config=lora_config(model_args)
    )
    start = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - start
    trainer.save_model(args.output_dir)
    return trainer, elapsed


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = TrlParser((ScriptArguments, PersonalizedGRPOConfig, ModelConfig))
    parser.set_defaults(**cpu_launch_defaults())  # several processes on a machine without GPUs
    script_args, args, model_args = parser.parse_args_and_config(args=argv)
    output_dir = Path(args.output_dir)
    conditioned = script_args.mode == "conditioned"
    is_main = args.process_index == 0

    scorer = PersonalizedRewardScorer.from_pretrained(script_args.reward_model, device=args.device)
    source = resolve_data_source(script_args.user_contexts, script_args.data_dir)
    pairs = select_users(load_user_pairs(source), script_args.users)
    rng = random.Random(args.seed)
    contexts = {user: draw_context(user_pairs, script_args.num_context, rng) for user, user_pairs in pairs.items()}
    latents = {user: scorer.user_latent(context, user_id=user) for user, context in contexts.items()}
    train_prompts, eval_prompts, held_out = load_prompts(script_args, source)

    policy_path = resolve_model_name_or_path(model_args.model_name_or_path or DEFAULT_MODEL)
    base_policy, tokenizer = load_policy(policy_path, device=args.device)
    chat = bool(getattr(tokenizer, "chat_template", None))

    preambles, preambles_held_out = {}, False
    if conditioned:
        preambles, preambles_held_out = held_out_preambles(source, pairs, script_args.num_context, rng)

    def prompts_for(user: str) -> list[Any]:
        context = (preambles.get(user) or contexts[user]) if conditioned else None
        return [policy_prompt(p, context, chat, script_args.preamble_pairs) for p in eval_prompts]

    settings = GenerationSettings(
        args.max_completion_length, args.temperature, args.top_p, script_args.eval_batch_size, args.seed
    )
    eval_kwargs = {"scorer": scorer, "latents": latents, "eval_prompts": eval_prompts, "prompts_for": prompts_for,
                   "samples": script_args.eval_samples, "settings": settings}
    users = list(pairs)
    before: Matrix = {}
    completions: list[dict[str, Any]] = []
    if is_main:
        before, completions = evaluate(base_policy, tokenizer, users=users, stage="before", **eval_kwargs)
    del base_policy

    reward = PersonalizedRewardFunction(scorer, latents)
    after: Matrix = {}
    runs = {}
    if conditioned:
        dataset = build_policy_dataset(train_prompts, pairs, True, chat, script_args.rows_per_user,
                                       script_args.preamble_pairs, args.seed)
        trainer, seconds = train_policy(policy_path, dataset, reward, args, model_args)
        runs["all"] = {"steps": trainer.state.global_step, "train_seconds": seconds, "adapter": str(output_dir)}
        if is_main:
            after, records = evaluate(trainer.model, tokenizer, users=users, stage="after", **eval_kwargs)
            completions += records
    else:
        for user in users:
            user_args = copy.deepcopy(args)
            user_args.output_dir = str(output_dir / "adapters" / user)
            dataset = build_policy_dataset(train_prompts, {user: pairs[user]}, False, chat, script_args.rows_per_user,
                                           seed=args.seed)
            trainer, seconds = train_policy(policy_path, dataset, reward, user_args, model_args)
            runs[user] = {"steps": trainer.state.global_step, "train_seconds": seconds, "adapter": user_args.output_dir}
            if is_main:
                row, records = evaluate(trainer.model, tokenizer, users=[user], stage="after", **eval_kwargs)
                after.update(row)
                completions += records
            del trainer

    if not is_main:
        return {}
    results = summarize(
        before, after, mode=script_args.mode, policy=policy_path, reward_model=script_args.reward_model,
        eval_prompts=len(eval_prompts), eval_samples_per_prompt=script_args.eval_samples,
        eval_prompts_held_out=held_out, runs=runs,
        **({"eval_preambles_held_out": preambles_held_out} if conditioned else {}),
    )
    paths = write_results(results, output_dir, completions)
    (output_dir / "users.json").write_text(json.dumps(
        {"mode": script_args.mode, "preamble_pairs": script_args.preamble_pairs, "contexts": contexts,
         "eval_preambles": preambles}, indent=2
    ))
    print(format_results(results))
    print(f"Wrote {paths['json']}, {paths['png']} and {paths['completions']}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
