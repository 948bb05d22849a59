"""Optimize a policy against a personalized (VPL) reward: one policy for every user, one per user, or a user-blind one.

The script behind `recipes/ppo_personalized.py`, as TRL's scripts: `make_parser()` parses `ScriptArguments`,
`BestOfNRoundsArguments` (the rounds of `bon_sft` and `dpo`, fields of their trainers' configs),
`PersonalizedGRPOConfig` and `trl.ModelConfig`, and `main(argv)` runs.

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
  `vpl_policy.json` and a copy of the reward model (`output_dir/reward_model`), which
  `python -m vpl_trl.sample --policy DIR --user-context FILE` reads wherever DIR is moved. Every scored
  candidate of the bon_sft and dpo rounds goes to `--candidates_file` (default `output_dir/round_candidates.jsonl`).
  `--offline_pool FILE` (a pool of answers per prompt, e.g. `data/population_pool.jsonl.gz`): the first round
  ranks the pool's answers to each training prompt under each user's reward, with no generation.
- `shared`: one user-blind LoRA policy on the bare prompts, trained against every user's reward (default signal
  `bon_sft`); with a `base` (Bradley-Terry) reward model, the standard RLHF policy that personalization is
  measured against. Saved like a conditioned policy (conditioning `none`).
- `per_user`: one LoRA adapter per user, trained on the bare prompts against that user's reward (default signal
  `grpo`), saved to `output_dir/adapters/<user>`.

`--max_train_seconds` caps each mode's training wall time (per_user: split equally among the users), counted
from each launch; a new round of `bon_sft` or `dpo` starts only if one as long as the last fits whole, and
`--max_rounds` caps their number. `--init_adapter DIR` starts the adapter from a saved policy's (e.g. a user-blind
one, for a personalization stage on top of it); `--score_final_round true` scores the trained policy's samples
once more, so that the learning curve ends after the last update. Checkpoints (`--save_strategy steps
--save_steps N`) hold the policy, its soft-prompt module and the best-of-n rounds' state;
`--resume_from_checkpoint DIR` (or `true`: the newest in `output_dir`, per user for `per_user`) continues from one.

Before and after training, the policy for each user answers held-out prompts (`--eval_prompts`; a conditioned
policy sees pairs drawn from the user's test split, which no training prompt showed, as a new user's would be)
and every user's reward scores the answers: `output_dir/eval_results.json` (with each user's margin over the
other users' policies and its 95% bootstrap interval, and the seconds spent in generation, scoring and updates),
a printed table, `output_dir/eval_matrix.png` and every scored completion in `output_dir/eval_completions.jsonl`.
Under DeepSpeed (ZeRO-2 or ZeRO-3) every process takes part in generation and evaluation. `--eval_samples 0`
skips the evaluation (a benchmark that evaluates the saved policy itself): `eval_results.json` then holds the
training runs only.
"""

from __future__ import annotations

import contextlib
import copy
import json
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, TrainingArguments, set_seed
from trl import GRPOConfig, ModelConfig, TrlParser, get_peft_config

from ..checkpoints import CheckpointSaveError, OutputDirLock, resolve_resume
from ..cpu_allocator import keep_large_allocations
from ..distributed import (
    configure_torch_extensions_dir,
    cpu_launch_defaults,
    full_weights_for_generation,
    replicated_loading,
)
from ..embedded_model import DEFAULT_MODEL, resolve_model_name_or_path
from ..inference.generation import GenerationSettings
from ..inference.scoring import PersonalizedRewardScorer
from ..logs import show_info_logs
from ..policy import (
    SIGNALS,
    BestOfNDistillationConfig,
    BestOfNRoundsArguments,
    LatentPromptArguments,
    PersonalizedRewardFunction,
    PolicyConditioning,
    PolicyError,
    PolicyEvaluation,
    RewardRankedDPOConfig,
    build_policy,
    build_policy_dataset,
    draw_context,
    format_results,
    held_out_contexts,
    load_prompt_list,
    load_user_pairs,
    resolve_data_source,
    round_config,
    run_record,
    summarize,
    train_policy,
    write_policy_config,
    write_results,
)

MODES = ("conditioned", "per_user", "shared")
DEFAULT_SIGNAL = {"conditioned": "dpo", "per_user": "grpo", "shared": "bon_sft"}
ROUND_CONFIGS = {"dpo": RewardRankedDPOConfig, "bon_sft": BestOfNDistillationConfig}


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
    rows_per_user: int = field(default=64, metadata={"help": "Training prompts per user (prompts cycled, each user "
                                                             "starting where the last one stopped), each with its "
                                                             "own draw of the user's pairs."})
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
    max_train_seconds: float | None = field(
        default=None, metadata={"help": "Training wall-time budget of the mode (per_user: split among users)."}
    )
    eval_samples: int = field(
        default=4, metadata={"help": "Completions per held-out prompt and user; 0: no evaluation before or after "
                                     "training (eval_results.json then holds the training runs only)."}
    )
    max_eval_prompts: int = field(default=8, metadata={"help": "Held-out prompts evaluated."})
    eval_batch_size: int = field(default=16, metadata={"help": "Sequences per batch in generation (evaluation "
                                                               "and bon_sft candidates)."})
    init_adapter: str | None = field(
        default=None, metadata={"help": "Start the policy's LoRA adapter from a saved one (same LoRA settings), "
                                        "such as a user-blind policy trained for a few rounds (`--max_rounds`); "
                                        "a latent-conditioned policy's soft-prompt module starts fresh."}
    )
    data_dir: str = field(default="data", metadata={"help": "Where `pets` is generated."})


@dataclass
class PersonalizedGRPOConfig(LatentPromptArguments, GRPOConfig):
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


def make_parser() -> TrlParser:
    parser = TrlParser((ScriptArguments, BestOfNRoundsArguments, PersonalizedGRPOConfig, ModelConfig))
    parser.set_defaults(**cpu_launch_defaults())  # several processes on a machine without GPUs
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse `argv` (default: the command line), train and evaluate; returns what `eval_results.json` holds (on the
    main process; `{}` on the others)."""
    wall_start = time.perf_counter()
    show_info_logs()  # embedding throughput
    keep_large_allocations()  # on a CPU: a training step's large tensors are not page-faulted in again each step
    script_args, rounds, args, model_args = make_parser().parse_args_and_config(args=argv)
    # One run at a time per output folder: the main process holds its lock until the run ends (or is killed).
    with OutputDirLock(args.output_dir) if args.process_index == 0 else contextlib.nullcontext():
        try:
            return train_and_evaluate(script_args, rounds, args, model_args, wall_start)
        except (CheckpointSaveError, PolicyError) as error:
            raise SystemExit(f"error: {error}") from error


def train_and_evaluate(script_args: ScriptArguments, rounds: BestOfNRoundsArguments, args: PersonalizedGRPOConfig,
                       model_args: ModelConfig, wall_start: float) -> dict[str, Any]:
    output_dir = Path(args.output_dir)
    mode, conditioned = script_args.mode, script_args.mode == "conditioned"
    resume = args.resume_from_checkpoint
    if mode != "per_user":  # one run: its checkpoint, found before any model is loaded
        args.resume_from_checkpoint = resolve_resume(resume, output_dir)
    elif resume and str(resume).lower() not in ("true", "last"):
        raise SystemExit("error: --mode per_user resumes each user's run from the newest checkpoint in its own folder: "
                         "pass --resume_from_checkpoint true.")
    if script_args.eval_samples < 0:
        raise SystemExit(f"error: --eval_samples {script_args.eval_samples}: expected 0 (no evaluation) or more "
                         "completions per held-out prompt and user.")
    signal = script_args.signal or DEFAULT_SIGNAL[mode]
    if signal in ROUND_CONFIGS:  # the rounds' flags, checked before any model loads
        try:
            ROUND_CONFIGS[signal].check_rounds(rounds)
        except ValueError as error:
            raise SystemExit(f"error: --signal {signal}: {error}") from error
    if script_args.init_adapter and not (Path(script_args.init_adapter) / "adapter_config.json").is_file():
        raise SystemExit(f"error: --init_adapter {script_args.init_adapter}: no adapter_config.json there; give the "
                         "folder of a saved policy.")
    conditioning = PolicyConditioning(script_args.conditioning if conditioned else "none",
                                      script_args.preamble_pairs, script_args.latent_tokens)

    with replicated_loading():  # a frozen reward model: whole on every process, also under ZeRO-3
        scorer = PersonalizedRewardScorer.from_pretrained(script_args.reward_model, device=args.device)
    if conditioned and not scorer.uses_latent:
        raise SystemExit(
            f"error: {script_args.reward_model} is a `{scorer.model.config.reward_type}` reward model, with no user "
            "latent: every user gets the same reward, so a conditioned policy has nothing to learn. Train a `vae` "
            "reward model (recipes/train_reward.py --model_type vae), or use --mode per_user."
        )
    latent_dim = scorer.model.config.latent_dim if scorer.uses_latent else 0

    # The users: their pairs, the draw of them that gives each user's z, and the pairs they are evaluated with.
    source = resolve_data_source(script_args.user_contexts, script_args.data_dir)
    pairs = select_users(load_user_pairs(source), script_args.users)
    users = list(pairs)
    rng = random.Random(args.seed)
    contexts = {user: draw_context(user_pairs, script_args.num_context, rng) for user, user_pairs in pairs.items()}
    latents = {user: scorer.user_latent(context, user_id=user) for user, context in contexts.items()}
    eval_contexts = held_out_contexts(source, users, script_args.num_context, rng) if conditioned else {}
    train_prompts, eval_prompts, held_out = load_prompts(script_args, source)

    base_model = model_args.model_name_or_path or DEFAULT_MODEL  # recorded as given: a hub id travels
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_name_or_path(base_model))
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    chat = bool(getattr(tokenizer, "chat_template", None))
    settings = GenerationSettings(
        args.max_completion_length, args.temperature, args.top_p, script_args.eval_batch_size, args.seed
    )
    evaluate = PolicyEvaluation(scorer, latents, eval_prompts, eval_contexts or contexts, conditioning, chat,
                                script_args.eval_samples, settings)
    reward = PersonalizedRewardFunction(scorer, latents)
    lora = lora_config(model_args)

    def new_policy():
        # the adapter's and soft prompt's initialization follow the run's seed, not the process's RNG history
        set_seed(args.seed)
        return build_policy(base_model, tokenizer, conditioning, latent_dim, lora, script_args.init_adapter)

    policy = new_policy()
    evaluating = script_args.eval_samples > 0
    before, completions = {}, []
    if evaluating:
        with full_weights_for_generation(policy):  # untrained: the base model, or the adapter it starts from
            before, completions = evaluate(policy, tokenizer, users, "before")

    after, runs = {}, {}
    training = [("all", users, args)] if mode != "per_user" else [
        (user, [user], _with_output_dir(args, output_dir / "adapters" / user)) for user in users
    ]
    budget = script_args.max_train_seconds / len(training) if script_args.max_train_seconds else None
    for name, run_users, run_args in training:
        if mode == "per_user":  # each user's run: its folder's newest checkpoint, or afresh without one
            run_args.resume_from_checkpoint = resolve_resume(resume, run_args.output_dir, required=False)
        # made before the policy loads: under ZeRO-3 the newest TrainingArguments decides how models load (sharded)
        trainer_args = signal_args(signal, run_args, script_args, rounds)
        if policy is None:
            policy = new_policy()
        dataset = build_policy_dataset(train_prompts, {user: pairs[user] for user in run_users}, conditioning, chat,
                                       script_args.rows_per_user, script_args.num_context, args.seed,
                                       user_latent=scorer.user_latent)
        trainer, seconds = train_policy(signal, policy, tokenizer, dataset, reward, trainer_args, budget)
        runs[name] = run_record(trainer, seconds, run_args.output_dir)
        if args.process_index == 0 and mode != "per_user":
            write_policy_config(run_args.output_dir, conditioning, latent_dim, script_args.reward_model, base_model,
                                signal=signal)
        if evaluating:
            with full_weights_for_generation(trainer.model_wrapped, trainer.accelerator) as model:
                row, records = evaluate(model, tokenizer, run_users, "after")
            after.update(row)
            completions += records
        policy = None
        del trainer

    if args.process_index != 0:
        return {}
    record = dict(
        mode=mode, signal=signal, conditioning=conditioning.to_dict(), policy=base_model,
        reward_model=script_args.reward_model, eval_prompts=len(eval_prompts) if evaluating else 0,
        eval_samples_per_prompt=script_args.eval_samples, eval_prompts_held_out=held_out, runs=runs,
        train_seconds=sum(run["train_seconds"] for run in runs.values()),
        wall_seconds=time.perf_counter() - wall_start,
        **({"eval_contexts_held_out": bool(eval_contexts)} if conditioned else {}),
    )
    results = summarize(before, after, completions, **record) if evaluating else {**record, "users": users}
    paths = write_results(results, output_dir, completions)
    (output_dir / "users.json").write_text(json.dumps(
        {"mode": mode, "conditioning": conditioning.to_dict(), "contexts": contexts, "eval_contexts": eval_contexts},
        indent=2,
    ))
    if evaluating:
        print(format_results(results))
        print(f"Wrote {paths['json']}, {paths['png']} and {paths['completions']}")
    else:
        print(f"Wrote {paths['json']} (the training runs; --eval_samples 0: no evaluation)")
    return results


def select_users(pairs: Mapping[str, list], users: Sequence[str] | None) -> dict[str, list]:
    """`--users` of the data's users (default: all, sorted)."""
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


def lora_config(model_args: ModelConfig):
    """The policy's LoRA adapter from the model flags (always LoRA: one adapter per policy)."""
    model_args.use_peft = True
    return get_peft_config(model_args)


def signal_args(signal: str, args: PersonalizedGRPOConfig, script_args: ScriptArguments,
                rounds: BestOfNRoundsArguments) -> TrainingArguments:
    """The arguments of the signal's trainer: `args` for GRPO; for reward-ranked DPO and best-of-n distillation a
    `RewardRankedDPOConfig` or `BestOfNDistillationConfig` with the same `TrainingArguments`, the `rounds`, their
    candidates sampled as GRPO's (`--max_completion_length`, `--temperature`, `--top_p`) and written to
    `--candidates_file` (default: `output_dir/round_candidates.jsonl`), and the signal's flags."""
    if signal == "grpo":
        return args
    candidates_file = rounds.candidates_file or str(Path(args.output_dir) / "round_candidates.jsonl")
    round_fields = {**asdict(rounds), "candidates_file": candidates_file, "max_completion_length":
                    args.max_completion_length, "temperature": args.temperature, "top_p": args.top_p,
                    "generation_batch_size": script_args.eval_batch_size,
                    "latent_prompt_lr_ratio": args.latent_prompt_lr_ratio}
    if signal == "dpo":
        sft = script_args.dpo_sft_weight  # RPO: the chosen answers' NLL added to DPO's loss
        return round_config(args, RewardRankedDPOConfig, **round_fields, learning_rate=script_args.dpo_learning_rate,
                            beta=script_args.dpo_beta, loss_type=["sigmoid", "sft"] if sft else ["sigmoid"],
                            loss_weights=[1.0, sft] if sft else None)
    return round_config(args, BestOfNDistillationConfig, **round_fields, learning_rate=script_args.bon_learning_rate)


def _with_output_dir(args: PersonalizedGRPOConfig, folder: Path) -> PersonalizedGRPOConfig:
    user_args = copy.deepcopy(args)
    user_args.output_dir = str(folder)
    return user_args
