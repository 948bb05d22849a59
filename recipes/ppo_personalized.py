"""Optimize a policy against a personalized (VPL) reward: one policy for every user, one per user, or a user-blind one.

    accelerate launch recipes/ppo_personalized.py --reward_model outputs/vpl-pets --user_contexts pets \
        --mode {conditioned,per_user,shared} --output_dir outputs/ppo-pets [--config recipe.yaml] [any GRPOConfig flag]

Each user's latent `z` comes from their context pairs (`--num_context` pairs drawn from their labelled pairs in a
dataset folder, or a JSON mapping user -> context file) through the reward model's encoder, once per user. Every
completion is scored under the latent of the user it was written for.

- `conditioned`: one LoRA policy for every user, a new one included, given only their pairs. `--conditioning`:
  `latent` (default: `z` of a fresh draw of the user's pairs becomes `--latent_tokens` soft-prompt vectors, a
  small module trained with the adapter) or `text` (`--preamble_pairs` of the user's pairs in a system message).
  `--signal`: `dpo` (default: rounds of `--bon_n` candidates per user and prompt sampled under the user's
  conditioning and ranked by their reward; TRL's `DPOTrainer` on `--bon_keep` best-against-worst pairs per user
  and prompt, against the policy as each round began, for `--bon_epochs_per_round` epochs), `bon_sft` (TRL's
  `SFTTrainer` on the best `--bon_keep` of the same rounds: best-of-n distillation) or `grpo` (TRL's
  `GRPOTrainer`). Saved to `output_dir` with
  `vpl_policy.json`, which `python -m vpl_trl.sample --policy DIR --user-context FILE` reads. Every scored
  candidate of the bon_sft and dpo rounds goes to `--candidates_file` (default `output_dir/round_candidates.jsonl`).
- `shared`: one user-blind LoRA policy on the bare prompts, trained against every user's reward (default signal
  `bon_sft`); with a `base` (Bradley-Terry) reward model, the standard RLHF policy that personalization is
  measured against. Saved like a conditioned policy (conditioning `none`).
- `per_user`: one LoRA adapter per user, trained on the bare prompts against that user's reward (default signal
  `grpo`), saved to `output_dir/adapters/<user>`.

`--max_train_seconds` caps each mode's training wall time (per_user: split equally among the users), counted
from each launch. Checkpoints (`--save_strategy steps --save_steps N`) hold the policy, its soft-prompt module and
the best-of-n rounds' state; `--resume_from_checkpoint DIR` (or `true`: the newest in `output_dir`, per user for
`per_user`) continues from one.

Before and after training, the policy for each user answers held-out prompts (`--eval_prompts`; a conditioned
policy sees pairs drawn from the user's test split, which no training prompt showed, as a new user's would be)
and every user's reward scores the answers: `output_dir/eval_results.json` (with each user's margin over the
other users' policies and its 95% bootstrap interval, and the seconds spent in generation, scoring and updates),
a printed table, `output_dir/eval_matrix.png` and every scored completion in `output_dir/eval_completions.jsonl`.
Under DeepSpeed (ZeRO-2 or ZeRO-3) every process takes part in generation and evaluation.
"""

from __future__ import annotations

import contextlib
import copy
import json
import random
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from transformers import AutoTokenizer, TrainingArguments
from trl import DPOConfig, GRPOConfig, ModelConfig, SFTConfig, TrlParser, get_peft_config

from vpl_trl.checkpoints import CheckpointSaveError, OutputDirLock, resolve_resume
from vpl_trl.data.format import PreferenceDataError
from vpl_trl.distributed import (
    configure_torch_extensions_dir,
    cpu_launch_defaults,
    full_weights_for_generation,
    replicated_loading,
)
from vpl_trl.embedded_model import DEFAULT_MODEL, resolve_model_name_or_path
from vpl_trl.inference.generation import GenerationSettings
from vpl_trl.inference.scoring import PersonalizedRewardScorer
from vpl_trl.logs import show_info_logs
from vpl_trl.policy import (
    BestOfNDistillationTrainer,
    ConditionedGRPOTrainer,
    PersonalizedRewardFunction,
    PolicyConditioning,
    RewardRankedDPOTrainer,
    RoundSettings,
    TimeBudgetCallback,
    build_policy,
    build_policy_dataset,
    draw_context,
    format_results,
    generate_for_user,
    load_prompt_list,
    load_user_pairs,
    mean_rewards,
    resolve_data_source,
    score_completions,
    summarize,
    write_policy_config,
    write_results,
)

MODES = ("conditioned", "per_user", "shared")
SIGNALS = ("bon_sft", "dpo", "grpo")
DEFAULT_SIGNAL = {"conditioned": "dpo", "per_user": "grpo", "shared": "bon_sft"}


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
    mode: str = field(default="conditioned",
                      metadata={"help": "conditioned, per_user or shared.", "choices": list(MODES)})
    conditioning: str = field(
        default="latent", metadata={"help": "How the conditioned policy is told its user: `latent` (z as a soft "
                                            "prompt) or `text` (pairs in the prompt).", "choices": ["latent", "text"]}
    )
    signal: str | None = field(
        default=None, metadata={"help": "Training signal: `bon_sft` (best-of-n distillation), `dpo` (DPO on "
                                        "reward-ranked pairs) or `grpo`; default: dpo for conditioned, bon_sft "
                                        "for shared, grpo for per_user.", "choices": list(SIGNALS)}
    )
    users: list[str] | None = field(default=None, metadata={"help": "Only these users (default: all)."})
    num_context: int = field(default=8, metadata={"help": "Context pairs per user that define their latent z."})
    preamble_pairs: int = field(default=2, metadata={"help": "Pairs shown in a text-conditioned policy's prompt."})
    latent_tokens: int = field(default=4, metadata={"help": "Soft-prompt vectors of a latent-conditioned policy."})
    rows_per_user: int = field(default=64, metadata={"help": "Training prompts per user (prompts cycled), each "
                                                             "with its own draw of the user's pairs."})
    bon_n: int = field(default=16, metadata={"help": "bon_sft and dpo: candidates per user and prompt."})
    bon_keep: int = field(default=2, metadata={"help": "bon_sft: best candidates distilled per user and prompt; "
                                                       "dpo: best-against-worst pairs per user and prompt."})
    bon_epochs_per_round: int = field(default=6, metadata={"help": "bon_sft and dpo: epochs before new candidates."})
    bon_learning_rate: float | None = field(
        default=None, metadata={"help": "bon_sft: the SFT learning rate (default: --learning_rate)."}
    )
    dpo_learning_rate: float = field(
        default=2e-4, metadata={"help": "dpo: the learning rate of the adapter and the soft prompt (at 5e-4 without "
                                        "the NLL term, the soft prompt collapsed on Pets)."}
    )
    dpo_beta: float = field(default=0.1, metadata={"help": "dpo: DPO's beta (the strength of the KL bound to the "
                                                           "policy as each round began)."})
    dpo_sft_weight: float = field(
        default=1.0, metadata={"help": "dpo: weight of the chosen answers' negative log-likelihood added to DPO's "
                                       "loss (RPO, as in iterative RPO, Pang et al. 2024): it keeps the chosen "
                                       "answers likely instead of letting both answers' likelihood fall; 0: plain "
                                       "DPO."}
    )
    candidates_file: str | None = field(
        default=None, metadata={"help": "bon_sft and dpo: a JSONL file that receives every scored candidate of every "
                                        "round (default: `output_dir/round_candidates.jsonl`)."}
    )
    max_train_seconds: float | None = field(
        default=None, metadata={"help": "Training wall-time budget of the mode (per_user: split among users)."}
    )
    eval_samples: int = field(default=4, metadata={"help": "Completions per held-out prompt and user."})
    max_eval_prompts: int = field(default=8, metadata={"help": "Held-out prompts evaluated."})
    eval_batch_size: int = field(default=16, metadata={"help": "Sequences per batch in generation (evaluation "
                                                               "and bon_sft candidates)."})
    data_dir: str = field(default="data", metadata={"help": "Where `pets` is generated."})


@dataclass
class PersonalizedGRPOConfig(GRPOConfig):
    r"""
    [`~trl.GRPOConfig`] with defaults for short LoRA runs against a personalized reward: PPO-style updates
    (`num_iterations=2` passes per generated batch, clipping `epsilon=0.2`), a KL penalty to the reference
    policy (`beta=0.04`; with LoRA the reference is the base model, adapter disabled), 4 generations per
    prompt, short completions, no activation checkpointing and bf16 only on a bf16-capable GPU. Its
    `TrainingArguments` also drive the SFT of best-of-n distillation.
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
        configure_torch_extensions_dir()  # before TrainingArguments' set-up, where DeepSpeed builds its ops
        super().__post_init__()


Matrix = dict[str, dict[str, float]]


def lora_config(model_args: ModelConfig):
    """The policy's LoRA adapter from the model flags (always LoRA: one adapter per policy)."""
    model_args.use_peft = True
    return get_peft_config(model_args)


def round_config(args: TrainingArguments, config_class: type[SFTConfig] | type[DPOConfig], **overrides):
    """An `SFTConfig` or `DPOConfig` with the same `TrainingArguments` (the best-of-n signals train with TRL's
    SFTTrainer or DPOTrainer), and `overrides`."""
    names = {f.name for f in fields(TrainingArguments) if f.init}
    values = {k: v for k, v in args.to_dict().items() if k in names}
    values["gradient_checkpointing"] = bool(values.get("gradient_checkpointing"))  # SFTConfig's default is True
    return config_class(**{**values, **{k: v for k, v in overrides.items() if v is not None}})


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


def held_out_contexts(
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
    conditioning_for: Callable[[str], tuple[list[Any], torch.Tensor | None]],
    samples: int,
    settings: GenerationSettings,
    stage: str,
) -> tuple[Matrix, list[dict[str, Any]]]:
    """Rows of the cross-user matrix for `users`, and every scored completion (tagged with `stage` and the user
    the policy served). Users whose policy inputs coincide share one generation; the generations are shared out
    among the processes, which must all call this together."""
    jobs: dict[str, tuple[list[Any], torch.Tensor | None]] = {}
    key_of = {}
    for user in users:
        prompts, latent = conditioning_for(user)
        key = json.dumps([prompts, None if latent is None else latent.tolist()], sort_keys=True, default=str)
        key_of[user] = key
        jobs.setdefault(key, (prompts, latent))
    state = PartialState()
    mine = {}
    for key in list(jobs)[state.process_index :: state.num_processes]:
        prompts, latent = jobs[key]
        completions = generate_for_user(model, tokenizer, eval_prompts, prompts, samples, settings, latent)
        mine[key] = score_completions(scorer, completions, latents)
    scored = {key: records for part in gather_object([mine]) for key, records in part.items()}
    rows: Matrix = {user: mean_rewards(scored[key_of[user]]) for user in users}
    records = [{"stage": stage, "policy_for": user, **record} for user in users for record in scored[key_of[user]]]
    return rows, records


def train_policy(
    model, tokenizer, dataset, reward: PersonalizedRewardFunction, args: GRPOConfig, script_args: ScriptArguments,
    signal: str, settings: GenerationSettings, budget: float | None,
):
    """Train one LoRA policy with `signal`; returns the trainer (policy saved to `args.output_dir`) and the wall
    time, the first best-of-n round included."""
    start = time.perf_counter()
    callbacks = [TimeBudgetCallback(budget, start)] if budget else None
    if signal == "grpo":
        trainer = ConditionedGRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=dataset,
                                         processing_class=tokenizer, callbacks=callbacks)
    else:
        rounds = RoundSettings(script_args.bon_n, script_args.bon_keep, script_args.bon_epochs_per_round,
                               replay=signal == "bon_sft", generation=settings,
                               candidates_file=script_args.candidates_file
                               or str(Path(args.output_dir) / "round_candidates.jsonl"))
        deadline = start + budget if budget else None
        if signal == "dpo":
            sft = script_args.dpo_sft_weight
            dpo_args = round_config(args, DPOConfig, learning_rate=script_args.dpo_learning_rate,
                                    beta=script_args.dpo_beta, loss_type=["sigmoid", "sft"] if sft else ["sigmoid"],
                                    loss_weights=[1.0, sft] if sft else None)
            trainer = RewardRankedDPOTrainer(model, dpo_args, dataset, reward, rounds, tokenizer, callbacks=callbacks,
                                             deadline=deadline)
        else:
            sft_args = round_config(args, SFTConfig, learning_rate=script_args.bon_learning_rate)
            trainer = BestOfNDistillationTrainer(model, sft_args, dataset, reward, rounds, tokenizer,
                                                 callbacks=callbacks, deadline=deadline)
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    elapsed = time.perf_counter() - start
    trainer.save_model(args.output_dir)
    return trainer, elapsed


def run_record(trainer, seconds: float, output_dir: str) -> dict[str, Any]:
    steps = trainer.state.global_step
    timings = dict(trainer.timings)
    timings["update"] = max(seconds - timings["generation"] - timings["scoring"], 0.0)
    record = {"steps": steps, "train_seconds": seconds, "adapter": output_dir, "seconds": timings,
              "seconds_per_step": {k: v / max(steps, 1) for k, v in timings.items()}}
    # the on-policy reward of each user over training (seconds: a round's start, or steps times the mean step time):
    # GRPO's logged batch means, or each best-of-n round's mean
    points = trainer.rounds if hasattr(trainer, "rounds") else trainer.state.log_history
    per_step = seconds / max(steps, 1)
    record["curve"] = [
        {"step": point.get("step", 0), "seconds": point.get("elapsed", point.get("step", 0) * per_step),
         **{k: v for k, v in point.items() if k.startswith("reward/")}}
        for point in points if any(k.startswith("reward/") for k in point)
    ]
    if hasattr(trainer, "rounds"):
        record["rounds"] = trainer.rounds
    return record


def main(argv: list[str] | None = None) -> dict[str, Any]:
    wall_start = time.perf_counter()
    show_info_logs()  # embedding throughput
    parser = TrlParser((ScriptArguments, PersonalizedGRPOConfig, ModelConfig))
    parser.set_defaults(**cpu_launch_defaults())  # several processes on a machine without GPUs
    script_args, args, model_args = parser.parse_args_and_config(args=argv)
    # One run at a time per output folder: the main process holds its lock until the run ends (or is killed).
    with OutputDirLock(args.output_dir) if args.process_index == 0 else contextlib.nullcontext():
        try:
            return train_and_evaluate(script_args, args, model_args, wall_start)
        except CheckpointSaveError as error:
            raise SystemExit(f"error: {error}") from error


def train_and_evaluate(script_args: ScriptArguments, args: PersonalizedGRPOConfig, model_args: ModelConfig,
                       wall_start: float) -> dict[str, Any]:
    output_dir = Path(args.output_dir)
    conditioned = script_args.mode == "conditioned"
    resume = args.resume_from_checkpoint
    if script_args.mode != "per_user":  # one run: its checkpoint, found before any model is loaded
        args.resume_from_checkpoint = resolve_resume(resume, output_dir)
    elif resume and str(resume).lower() not in ("true", "last"):
        raise SystemExit("error: --mode per_user resumes each user's run from the newest checkpoint in its own folder: "
                         "pass --resume_from_checkpoint true.")
    signal = script_args.signal or DEFAULT_SIGNAL[script_args.mode]
    conditioning = PolicyConditioning(script_args.conditioning if conditioned else "none",
                                      script_args.preamble_pairs, script_args.latent_tokens)
    is_main = args.process_index == 0

    with replicated_loading():  # a frozen reward model: whole on every process, also under ZeRO-3
        scorer = PersonalizedRewardScorer.from_pretrained(script_args.reward_model, device=args.device)
    if conditioned and not scorer.uses_latent:
        raise SystemExit(
            f"error: {script_args.reward_model} is a `{scorer.model.config.reward_type}` reward model, with no user "
            "latent: every user gets the same reward, so a conditioned policy has nothing to learn. Train a `vae` "
            "reward model (recipes/train_reward.py --model_type vae), or use --mode per_user."
        )
    latent_dim = scorer.model.config.latent_dim if scorer.uses_latent else 0
    source = resolve_data_source(script_args.user_contexts, script_args.data_dir)
    pairs = select_users(load_user_pairs(source), script_args.users)
    rng = random.Random(args.seed)
    contexts = {user: draw_context(user_pairs, script_args.num_context, rng) for user, user_pairs in pairs.items()}
    latents = {user: scorer.user_latent(context, user_id=user) for user, context in contexts.items()}
    train_prompts, eval_prompts, held_out = load_prompts(script_args, source)

    policy_path = resolve_model_name_or_path(model_args.model_name_or_path or DEFAULT_MODEL)
    tokenizer = AutoTokenizer.from_pretrained(policy_path)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    chat = bool(getattr(tokenizer, "chat_template", None))

    eval_contexts, contexts_held_out = {}, False
    if conditioned:
        eval_contexts, contexts_held_out = held_out_contexts(source, pairs, script_args.num_context, rng)

    def conditioning_for(user: str) -> tuple[list[Any], torch.Tensor | None]:
        context = eval_contexts.get(user) or contexts[user]
        prompts = [conditioning.prompt(p, context, chat) for p in eval_prompts]
        return prompts, scorer.user_latent(context) if conditioning.uses_latent else None

    settings = GenerationSettings(
        args.max_completion_length, args.temperature, args.top_p, script_args.eval_batch_size, args.seed
    )
    eval_kwargs = {"scorer": scorer, "latents": latents, "eval_prompts": eval_prompts,
                   "conditioning_for": conditioning_for, "samples": script_args.eval_samples, "settings": settings}
    users = list(pairs)
    reward = PersonalizedRewardFunction(scorer, latents)
    lora = lora_config(model_args)

    def policy_dataset(user_pairs: Mapping[str, list]):
        return build_policy_dataset(train_prompts, user_pairs, conditioning, chat, script_args.rows_per_user,
                                    script_args.num_context, args.seed, user_latent=scorer.user_latent)

    budget = script_args.max_train_seconds
    policy = build_policy(policy_path, tokenizer, conditioning, latent_dim, lora)
    with full_weights_for_generation(policy):  # untrained: the base model (LoRA starts at zero)
        before, completions = evaluate(policy, tokenizer, users=users, stage="before", **eval_kwargs)

    after: Matrix = {}
    runs = {}
    training = [("all", users, args)] if script_args.mode != "per_user" else [
        (user, [user], _with_output_dir(args, output_dir / "adapters" / user)) for user in users
    ]
    for name, run_users, run_args in training:
        if policy is None:
            policy = build_policy(policy_path, tokenizer, conditioning, latent_dim, lora)
        dataset = policy_dataset({user: pairs[user] for user in run_users})
        if script_args.mode == "per_user":  # each user's run: its folder's newest checkpoint, or afresh without one
            run_args.resume_from_checkpoint = resolve_resume(resume, run_args.output_dir, required=False)
        run_budget = budget / len(training) if budget else None
        trainer, seconds = train_policy(policy, tokenizer, dataset, reward, run_args, script_args, signal, settings,
                                        run_budget)
        runs[name] = run_record(trainer, seconds, run_args.output_dir)
        if is_main and script_args.mode != "per_user":
            write_policy_config(run_args.output_dir, conditioning, latent_dim, script_args.reward_model, policy_path,
                                signal=signal)
        with full_weights_for_generation(trainer.model_wrapped, trainer.accelerator) as model:
            row, records = evaluate(model, tokenizer, users=run_users, stage="after",
                                    **eval_kwargs)
        after.update(row)
        completions += records
        policy = None
        del trainer

    if not is_main:
        return {}
    results = summarize(
        before, after, completions, mode=script_args.mode, signal=signal, conditioning=conditioning.to_dict(),
        policy=policy_path, reward_model=script_args.reward_model, eval_prompts=len(eval_prompts),
        eval_samples_per_prompt=script_args.eval_samples, eval_prompts_held_out=held_out, runs=runs,
        train_seconds=sum(run["train_seconds"] for run in runs.values()),
        wall_seconds=time.perf_counter() - wall_start,
        **({"eval_contexts_held_out": contexts_held_out} if conditioned else {}),
    )
    paths = write_results(results, output_dir, completions)
    (output_dir / "users.json").write_text(json.dumps(
        {"mode": script_args.mode, "conditioning": conditioning.to_dict(), "contexts": contexts,
         "eval_contexts": eval_contexts}, indent=2
    ))
    print(format_results(results))
    print(f"Wrote {paths['json']}, {paths['png']} and {paths['completions']}")
    return results


def _with_output_dir(args, folder: Path):
    user_args = copy.deepcopy(args)
    user_args.output_dir = str(folder)
    return user_args


if __name__ == "__main__":
    main(sys.argv[1:])
