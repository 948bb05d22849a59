"""Train and evaluate a personalized reward model (VPL) or a baseline.

The script behind `recipes/train_reward.py`:

    accelerate launch recipes/train_reward.py --model_type {vae,base,mean_and_variance,categorical} \
        --dataset {pets,pets_controversial,PATH} --output_dir DIR [--config recipe.yaml] [any VPLRewardConfig flag]

As TRL's `trl/scripts/reward.py`: `make_parser()` parses `ScriptArguments`, `VPLRewardConfig`, `trl.ModelConfig` and
`SelectionArguments` (every flag in both spellings, and a YAML `--config`), and `main(argv)` trains a
`VPLRewardTrainer` and saves it. With `--selection_fraction` above 0 it first chooses among `--selection_grid`'s
settings and the latent scales on pseudo-new users (`vpl_trl.selection`), writes `DIR/selection.json`, and trains
the final model on every user with the choice.
After training it evaluates on the test split, on the `new_users` split where the data set has one (users absent
from training, each with their own context) and on `--extra_eval_datasets`, writes `DIR/eval_results.json` and
prints a per-user accuracy table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import transformers
from transformers import set_seed
from trl import ModelConfig, TrlParser, get_peft_config, get_quantization_config

from .. import VPLRewardConfig, VPLRewardTrainer
from ..checkpoints import LOCK_NAME, CheckpointSaveError, OutputDirLock, checkpoint_folders, resolve_resume
from ..cpu_allocator import keep_large_allocations
from ..data.registry import load_named_dataset
from ..distributed import cpu_launch_defaults
from ..embedded_model import DEFAULT_MODEL, resolve_model_name_or_path
from ..evaluation.metrics import evaluate_reward_model, format_table
from ..logs import show_info_logs
from ..selection import SELECTION_FILE, SelectionArguments, SelectionResult, select_settings


@dataclass
class ScriptArguments:
    dataset: str = field(
        default="pets", metadata={"help": "pets, pets_controversial, a folder/file in our format, or a hub id."}
    )
    data_dir: str = field(default="data", metadata={"help": "Where built-in datasets are generated."})
    column_mapping: str | None = field(default=None, metadata={"help": "Rename columns: JSON or 'theirs=ours,...'."})
    extra_eval_datasets: list[str] = field(default_factory=list, metadata={"help": "More test sets to report."})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Allow writing into a non-empty output_dir."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training pairs."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N test pairs."})


def check_output_dir(output_dir: Path, overwrite: bool, resume: str | None) -> None:
    """Refuse to write over a previous run unless told to resume or overwrite."""
    entries = sorted(p.name for p in output_dir.iterdir() if p.name != LOCK_NAME) if output_dir.exists() else []
    if resume or overwrite or not entries:
        return
    hint = "--resume_from_checkpoint true to continue, or " if checkpoint_folders(output_dir) else ""
    raise SystemExit(
        f"error: output directory {output_dir} is not empty ({', '.join(entries[:5])}); "
        f"pass {hint}--overwrite_output_dir to write over it."
    )


def model_inputs(model_args: ModelConfig, args: VPLRewardConfig) -> dict:
    """The trainer's model arguments, as TRL's `scripts/reward.py` builds them: the backbone by name (loaded with
    `args.model_init_kwargs`), `get_quantization_config` and `get_peft_config`. `--embedding_mode lora` without
    `--use_peft` trains a LoRA adapter from the `--lora_*` flags, on all linear layers unless told otherwise."""
    dtype = model_args.dtype
    if (model_args.load_in_4bit or model_args.load_in_8bit) and dtype in (None, "auto", "float32"):
        # QLoRA: a bitsandbytes-quantized backbone computes in bf16, the dtype TRL trains its adapter in.
        dtype = "bfloat16"
    if args.embedding_mode == "lora" and not model_args.use_peft:
        target_modules = model_args.lora_target_modules or "all-linear"
        model_args = dataclasses.replace(model_args, use_peft=True, lora_target_modules=target_modules)
    model_args = dataclasses.replace(model_args, dtype=dtype)
    args.model_init_kwargs = {
        "revision": model_args.model_revision,
        "attn_implementation": model_args.attn_implementation,
        "dtype": dtype,
        **(args.model_init_kwargs or {}),
    }
    return {
        "model": model_args.model_name_or_path or DEFAULT_MODEL,
        "peft_config": get_peft_config(model_args),
        "quantization_config": get_quantization_config(model_args),
    }


def make_parser() -> TrlParser:
    parser = TrlParser((ScriptArguments, VPLRewardConfig, ModelConfig, SelectionArguments))
    parser.set_defaults(**cpu_launch_defaults())  # several processes on a machine without GPUs
    return parser


def main(argv: list[str] | None = None) -> dict:
    """Parse `argv` (default: the command line), train, save and evaluate; returns what `eval_results.json` holds."""
    show_info_logs()  # embedding throughput
    keep_large_allocations()  # on a CPU: a training step's large tensors are not page-faulted in again each step
    script_args, args, model_args, selection = make_parser().parse_args_and_config(args=argv)
    # One run at a time per output folder: the main process holds its lock until the run ends (or is killed).
    with OutputDirLock(args.output_dir) if args.process_index == 0 else contextlib.nullcontext():
        try:
            return train_and_evaluate(script_args, args, model_args, selection)
        except CheckpointSaveError as error:
            raise SystemExit(f"error: {error}") from error


def train_and_evaluate(script_args: ScriptArguments, args: VPLRewardConfig, model_args: ModelConfig,
                       selection: SelectionArguments | None = None) -> dict:
    output_dir = Path(args.output_dir)
    resume = resolve_resume(args.resume_from_checkpoint, output_dir)
    if args.process_index == 0:
        check_output_dir(output_dir, script_args.overwrite_output_dir, resume)
    else:  # progress comes from the main process
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()

    personalized = args.model_type == "vae"  # baselines train on data without users too
    with args.main_process_first(desc="loading the dataset"):  # the main process generates built-in datasets
        data = load_named_dataset(script_args.dataset, script_args.data_dir, script_args.column_mapping, personalized)
    train, test = data["train"], data.get("test")
    if script_args.max_train_samples:
        train = train.select(range(min(script_args.max_train_samples, len(train))))
    if test is not None and script_args.max_eval_samples:
        test = test.select(range(min(script_args.max_eval_samples, len(test))))

    with args.main_process_first(desc="converting the embedded model"):  # once, by the main process
        resolve_model_name_or_path(model_args.model_name_or_path or DEFAULT_MODEL)

    def make_trainer(trainer_args: VPLRewardConfig, train_dataset, eval_dataset=None) -> VPLRewardTrainer:
        set_seed(trainer_args.seed)  # the heads' and adapter's initialization: the same in every process and launch
        # Every process loads the model at the same time: under ZeRO-3, loading partitions it across them.
        return VPLRewardTrainer(**model_inputs(model_args, trainer_args), args=trainer_args,
                                train_dataset=train_dataset, eval_dataset=eval_dataset)

    chosen = None
    if selection is not None and selection.enabled:
        previous = output_dir / SELECTION_FILE
        if resume and previous.exists():  # the choice was made before the final model's checkpoints
            chosen = SelectionResult.read(previous)
        else:
            chosen = select_settings(args, selection, train, make_trainer, output_dir)
            if args.process_index == 0:
                chosen.write(previous)
        print(f"Selection on pseudo-new users: {chosen.reason}")
        args = dataclasses.replace(args, **chosen.settings)
    trainer = make_trainer(args, train, test)
    if chosen is not None:
        chosen.apply(trainer.accelerator.unwrap_model(trainer.model))
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(args.output_dir)

    results = {"model_type": args.model_type, "dataset": script_args.dataset}
    if chosen is not None:
        results["selection"] = {"settings": chosen.settings, "latent_scale": chosen.latent_scale,
                                "latent_fit_precision": chosen.latent_fit_precision, "reason": chosen.reason}
    test_sets = {script_args.dataset: test} if test is not None else {}
    if "new_users" in data:  # users absent from training, each with their own context
        test_sets[f"{script_args.dataset} (new users)"] = data["new_users"]
    for name in script_args.extra_eval_datasets:
        with args.main_process_first(desc=f"loading {name}"):
            extra = load_named_dataset(name, script_args.data_dir, script_args.column_mapping, personalized)
        test_sets[name] = extra["test"]
    by_test_set = {name: evaluate_reward_model(trainer, ds, name=f"test-{name}") for name, ds in test_sets.items()}
    if by_test_set:
        results.update(by_test_set[script_args.dataset] if script_args.dataset in by_test_set else {})
        results["by_test_set"] = by_test_set
        trainer.log({f"test/{name}/accuracy": m["accuracy"] for name, m in by_test_set.items()})
    if trainer.is_world_process_zero():
        (output_dir / "eval_results.json").write_text(json.dumps(results, indent=2))
        print(format_table({f"{args.model_type} on {name}": m for name, m in by_test_set.items()}))
    return results

