"""What VPL costs over a plain Bradley-Terry reward model, on this machine.

    python benchmarks/throughput.py [--model HuggingFaceTB/SmolLM2-135M-Instruct] [--batch_size 8] [--steps 10] \
        [--results benchmarks/results/throughput.md]

On the same backbone and the same batches of Pets pairs:

- the training step time of `VPLRewardTrainer` (VPL, and its own Bradley-Terry `base`) against TRL's
  `RewardTrainer`, in `lora` mode (a LoRA adapter on the backbone, the same adapter settings on both) and in
  `frozen` mode (TRL: a sequence-classification model whose backbone is frozen, only the score head trains;
  VPL: the heads train on embeddings cached once);
- the time to infer a new user's `z` from 8 labelled pairs (embedding the 16 texts and encoding them, and
  from cached embeddings);
- candidates scored per second (tokens -> embedding -> reward) and from cached embeddings;
- the peak resident memory of each measurement (each runs in its own process: `resource.getrusage`).

Timings are medians over steps after warm-up; the context embeddings are cached before timing starts.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

ROOT = Path(__file__).resolve().parents[1]
TRAINING_PHASES = {
    # name: (trainer, embedding mode, reward type)
    "trl-lora": ("trl", "lora", "base"),
    "vpl-lora": ("vpl", "lora", "vae"),
    "vpl-base-lora": ("vpl", "lora", "base"),
    "trl-frozen": ("trl", "frozen", "base"),
    "vpl-frozen": ("vpl", "frozen", "vae"),
    "vpl-base-frozen": ("vpl", "frozen", "base"),
}
INFERENCE_PHASE = "inference"
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": "all-linear"}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def pets_pairs(n: int):
    from vpl_trl.data.registry import load_named_dataset

    data = load_named_dataset("pets", ROOT / "data")
    return data["train"].select(range(n))


class StepTimer(TrainerCallback):
    """Wall time between consecutive optimizer steps (data loading, forward, backward and update)."""

    def __init__(self):
        self.times: list[float] = []
        self._last: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.times.append(now - self._last)
        self._last = now


def common_args(batch_size: int, steps: int) -> dict:
    return dict(
        per_device_train_batch_size=batch_size, max_steps=steps, learning_rate=1e-4, bf16=False,
        gradient_checkpointing=False, max_length=512, report_to="none", save_strategy="no", logging_steps=10_000,
        disable_tqdm=True,
    )


def build_trl_trainer(model_name: str, mode: str, dataset, batch_size: int, steps: int, output_dir: str):
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    from vpl_trl.embedded_model import resolve_model_name_or_path

    path = resolve_model_name_or_path(model_name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tokenizer.pad_token_id
    peft_config = None
    if mode == "lora":
        peft_config = LoraConfig(task_type="SEQ_CLS", **LORA)
    else:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name.startswith("score."))
    args = RewardConfig(output_dir=output_dir, **common_args(batch_size, steps))
    return RewardTrainer(model=model, args=args, train_dataset=dataset.select_columns(["prompt", "chosen", "rejected"]),
                         processing_class=tokenizer, peft_config=peft_config)


def build_vpl_trainer(
    model_name: str, mode: str, reward_type: str, dataset, batch_size: int, steps: int, output_dir: str
):
    from vpl_trl import VPLRewardConfig, VPLRewardModel, VPLRewardTrainer

    lora = {"peft_config": {"peft_type": "LORA", **LORA}} if mode == "lora" else {}
    model = VPLRewardModel.from_backbone(model_name, reward_type=reward_type, latent_dim=512, hidden_dim=512,
                                         embedding_mode=mode, pooling="last", **lora)
    args = VPLRewardConfig(output_dir=output_dir, model_type=reward_type, embedding_mode=mode, num_context="8",
                           **common_args(batch_size, steps))
    return VPLRewardTrainer(model=model, args=args, train_dataset=dataset)


def measure_training(phase: str, model_name: str, batch_size: int, steps: int, warmup: int) -> dict:
    trainer_kind, mode, reward_type = TRAINING_PHASES[phase]
    dataset = pets_pairs(batch_size * (steps + warmup))
    with tempfile.TemporaryDirectory() as output_dir:
        if trainer_kind == "trl":
            trainer = build_trl_trainer(model_name, mode, dataset, batch_size, steps + warmup, output_dir)
        else:
            trainer = build_vpl_trainer(model_name, mode, reward_type, dataset, batch_size, steps + warmup, output_dir)
        prepared = trainer.train_dataset
        tokens = None
        if "chosen_ids" in prepared.column_names:
            lengths = [len(ids) for column in ("chosen_ids", "rejected_ids") for ids in prepared[column]]
            tokens = statistics.mean(lengths)
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        rss_before = peak_rss_mb()
        timer = StepTimer()
        trainer.add_callback(timer)
        trainer.train()
    times = timer.times[warmup:]
    return {
        "phase": phase, "trainer": trainer_kind, "mode": mode, "reward_type": reward_type,
        "step_s": statistics.median(times), "step_s_min": min(times), "step_s_max": max(times), "steps": len(times),
        "pairs_per_step": batch_size, "mean_tokens": tokens, "trainable_parameters": trainable,
        "peak_rss_mb_before_training": rss_before, "peak_rss_mb": peak_rss_mb(),
    }


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def measure_inference(model_name: str, batch_size: int, repeats: int) -> dict:
    """Inferring z from 8 pairs and scoring candidates, with an untrained VPL model (the compute is the same)."""
    from transformers import AutoTokenizer

    from vpl_trl import VPLRewardModel
    from vpl_trl.embedded_model import resolve_model_name_or_path
    from vpl_trl.embeddings import _tokenize
    from vpl_trl.text import render_text

    model = VPLRewardModel.from_backbone(model_name, reward_type="vae", latent_dim=512, hidden_dim=512).eval()
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_name_or_path(model_name))
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    pairs = pets_pairs(max(8, batch_size)).to_list()
    context = pairs[:8]
    context_texts = [render_text(tokenizer, p["prompt"], p[side]) for side in ("chosen", "rejected") for p in context]
    candidate_texts = [render_text(tokenizer, p["prompt"], p["chosen"]) for p in pairs[:batch_size]]

    def embed(texts):
        encoded = _tokenize(tokenizer, texts, max_length=512)
        return model.embed(encoded["input_ids"], encoded["attention_mask"], use_adapter=False)

    def infer_z_from_texts():
        vectors = embed(context_texts)
        return model.latent_from_posterior(*model.encode_context(vectors[None, :8], vectors[None, 8:]))

    context_vectors = embed(context_texts)

    def infer_z_from_embeddings():
        return model.latent_from_posterior(*model.encode_context(context_vectors[None, :8], context_vectors[None, 8:]))

    z = infer_z_from_embeddings()
    encoded = _tokenize(tokenizer, candidate_texts, max_length=512)
    candidate_vectors = embed(candidate_texts)
    large = candidate_vectors.repeat(max(1, 4096 // len(candidate_vectors)), 1)

    def score_from_tokens():
        return model(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"], latent=z).logits

    def score_from_embeddings():
        return model(embeddings=large, latent=z).logits

    rss_after_load = peak_rss_mb()
    result = {
        "phase": INFERENCE_PHASE,
        "infer_z_from_texts_s": _median_time(infer_z_from_texts, repeats),
        "infer_z_from_embeddings_s": _median_time(infer_z_from_embeddings, repeats),
        "candidates_per_s_from_tokens": len(candidate_texts) / _median_time(score_from_tokens, repeats),
        "candidates_per_s_from_embeddings": len(large) / _median_time(score_from_embeddings, repeats),
        "candidate_batch": len(candidate_texts),
        "candidate_mean_tokens": float(encoded["attention_mask"].sum(-1).float().mean()),
        "context_mean_tokens": float(_tokenize(tokenizer, context_texts, 512)["attention_mask"].sum(-1).float().mean()),
        "peak_rss_mb_after_load": rss_after_load,
        "peak_rss_mb": peak_rss_mb(),
    }
    return result


def run_phase_in_subprocess(phase: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--phase", phase, "--model", args.model, "--batch_size", str(args.batch_size),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--repeats", str(args.repeats),
               "--threads", str(args.threads)]
    print(f"=== {phase}", flush=True)
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"phase {phase} failed:\n{completed.stderr[-4000:]}")
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    print(json.dumps(result), flush=True)
    return result


def render(results: dict[str, dict], args: argparse.Namespace) -> str:
    lines = [
        "# Throughput: VPLRewardTrainer against TRL's RewardTrainer",
        "",
        f"Command: `python benchmarks/throughput.py --model {args.model} --batch_size {args.batch_size} "
        f"--steps {args.steps} --warmup {args.warmup} --threads {args.threads}`  ",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, {args.threads} torch thread(s) per measurement "
        f"(CPU only), torch {torch.__version__}; "
        f"load average (1 min) {os.getloadavg()[0]:.1f} at the end. The cores were shared with other work, which "
        "slows steps unevenly: the minimum step time is the least disturbed figure.",
        "",
        f"## Training step ({args.batch_size} preference pairs per step, Pets, median of {args.steps} steps after "
        f"{args.warmup} warm-up steps)",
        "",
        "| trainer | mode | reward | step time (s), median [min-max] | × TRL, same mode (median / min) | "
        "tokens / sequence | "
        "trainable parameters | peak RSS (MB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for phase, (trainer, mode, reward_type) in TRAINING_PHASES.items():
        r = results[phase]
        reference = results[f"trl-{mode}"]
        tokens = "-" if r["mean_tokens"] is None else f"{r['mean_tokens']:.1f}"
        label = {"trl": "TRL `RewardTrainer`", "vpl": "`VPLRewardTrainer`"}[trainer]
        reward = {"base": "Bradley-Terry", "vae": "VPL (K = 8)"}[reward_type]
        lines.append(
            f"| {label} | {mode} | {reward} | {r['step_s']:.3f} [{r['step_s_min']:.3f}-{r['step_s_max']:.3f}] | "
            f"{r['step_s'] / reference['step_s']:.2f} / {r['step_s_min'] / reference['step_s_min']:.2f} | {tokens} | "
            f"{r['trainable_parameters']:,} | {r['peak_rss_mb']:.0f} |"
        )
    lines += [
        "",
        "In `frozen` mode VPL's batches are rows of the cached embedding table, so its step never runs the backbone "
        "(tokens / sequence: -); TRL's frozen step still runs the backbone forward on every sequence.",
        "",
    ]
    inference = results[INFERENCE_PHASE]
    lines += [
        "## A new user, and scoring",
        "",
        "| measurement | value |",
        "|---|---|",
        f"| infer z from 8 labelled pairs: embed 16 texts ({inference['context_mean_tokens']:.0f} tokens each) "
        "+ encode "
        f"| {1000 * inference['infer_z_from_texts_s']:.1f} ms |",
        "| infer z from 8 pairs' cached embeddings (encoder only) | "
        f"{1000 * inference['infer_z_from_embeddings_s']:.2f} ms |",
        f"| candidates scored per second, tokens -> embedding -> reward (batches of {inference['candidate_batch']}, "
        f"{inference['candidate_mean_tokens']:.0f} tokens) | {inference['candidates_per_s_from_tokens']:.1f} |",
        f"| candidates scored per second from cached embeddings (decoder only) | "
        f"{inference['candidates_per_s_from_embeddings']:,.0f} |",
        f"| peak RSS: after loading the model / after the measurements | "
        f"{inference['peak_rss_mb_after_load']:.0f} / {inference['peak_rss_mb']:.0f} MB |",
        "",
        "Peak RSS is each measurement's own process (`resource.getrusage`, `ru_maxrss`): Python, torch, the fp32 "
        "backbone and the run's data together.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--batch_size", "--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--threads", type=int, default=1,
        help="torch threads per measurement; 1 by default, as more threads on cores shared with other work spin "
             "and wait, and make timings erratic.",
    )
    parser.add_argument("--results", help="Markdown file for the tables (default: print only).")
    parser.add_argument("--raw", help="JSON file for the raw measurements.")
    parser.add_argument("--phase", choices=[*TRAINING_PHASES, INFERENCE_PHASE], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.phase:  # one measurement, in this process: print its result as the last line
        torch.set_num_threads(args.threads)
        if args.phase == INFERENCE_PHASE:
            result = measure_inference(args.model, args.batch_size * 4, args.repeats)
        else:
            result = measure_training(args.phase, args.model, args.batch_size, args.steps, args.warmup)
        print(json.dumps(result))
        return

    results = {phase: run_phase_in_subprocess(phase, args) for phase in [*TRAINING_PHASES, INFERENCE_PHASE]}
    report = render(results, args)
    print(report)
    for path, text in ((args.results, report), (args.raw, json.dumps(results, indent=2))):
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)


if __name__ == "__main__":
    main()
