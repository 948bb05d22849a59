"""The LM head of a reward-ranked DPO step on this CPU: TRL's fused head against the logits head that the policy
trainers use on a CPU (`vpl_trl.policy.lm_head`).

    python benchmarks/dpo_head.py [--steps 4] [--pairs 8] [--prompt_tokens 64] [--completion_tokens 48]
        [--results benchmarks/results/dpo_head.md]

A LoRA adapter on SmolLM2-135M-Instruct (rank 16, every linear layer), as the population policy trains: `--pairs`
chosen and `--pairs` rejected completions after `--prompt_tokens` of prompt, the completions from half of
`--completion_tokens` to all of it (the rest padding). Times, with each head, the reference pass (no gradient, as
each round's reference log-probabilities) and a training step's forward and backward, the fastest of `--steps`
after a warm-up step, and checks that both heads give the same log-probabilities.
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from trl.trainer.utils import add_fused_lm_head

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vpl_trl.cpu_allocator import keep_large_allocations  # noqa: E402
from vpl_trl.embedded_model import DEFAULT_MODEL  # noqa: E402
from vpl_trl.models.causal_lm import load_policy  # noqa: E402
from vpl_trl.policy.lm_head import add_logits_lm_head  # noqa: E402

HEADS = ("TRL's fused head", "logits head (vpl_trl.policy.lm_head)")


def batch(vocab: int, pairs: int, prompt_tokens: int, completion_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and labels: the prompt and the padding unlabelled (-100), as in DPO's concatenated batches."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2 * pairs, prompt_tokens + completion_tokens), generator=generator)
    labels = ids.clone()
    labels[:, :prompt_tokens] = -100
    lengths = torch.randint(completion_tokens // 2, completion_tokens + 1, (2 * pairs,), generator=generator)
    for row, length in enumerate(lengths.tolist()):
        labels[row, prompt_tokens + length :] = -100
    return ids, labels


def time_head(base, logits_head: bool, ids: torch.Tensor, labels: torch.Tensor, steps: int) -> dict[str, object]:
    model = copy.deepcopy(base)
    add_fused_lm_head(model)
    if logits_head:
        add_logits_lm_head(model)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    inner = model.get_base_model()
    times = {}
    for name, grad in (("reference pass", False), ("training step", True)):
        seconds = []
        for _ in range(steps + 1):
            start = time.perf_counter()
            with torch.set_grad_enabled(grad):
                output = inner(input_ids=ids, labels=labels, fused_lm_head=True)
                if grad:
                    output.loss.backward()
                    model.zero_grad(set_to_none=True)
            seconds.append(time.perf_counter() - start)
        times[name] = min(seconds[1:])
    return {"seconds": times, "log_probs": output.log_probs.detach().float()}


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--prompt_tokens", "--prompt-tokens", type=int, default=64)
    parser.add_argument("--completion_tokens", "--completion-tokens", type=int, default=48)
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "dpo_head.md")
    args = parser.parse_args(argv)
    keep_large_allocations()
    base, _ = load_policy(DEFAULT_MODEL, device="cpu")
    base.train()
    ids, labels = batch(base.config.vocab_size, args.pairs, args.prompt_tokens, args.completion_tokens)
    trl, ours = (time_head(base, logits_head, ids, labels, args.steps) for logits_head in (False, True))
    difference = float((trl["log_probs"] - ours["log_probs"]).abs().max())
    lines = [
        "# The LM head of a DPO step on this CPU", "",
        f"`python benchmarks/dpo_head.py --steps {args.steps} --pairs {args.pairs} --prompt_tokens "
        f"{args.prompt_tokens} --completion_tokens {args.completion_tokens}`; {platform.machine()}, "
        f"{torch.get_num_threads()} threads; {time.strftime('%Y-%m-%d')}. SmolLM2-135M-Instruct with a LoRA adapter "
        f"(rank 16, every linear layer); {2 * args.pairs} sequences of {args.prompt_tokens} prompt tokens and "
        f"{args.completion_tokens // 2} to {args.completion_tokens} completion tokens; the fastest of {args.steps} "
        f"after a warm-up. Largest difference in a token's log-probability between the heads: {difference:.1e}.", "",
        "| head | reference pass (s) | training step, forward and backward (s) |", "|---|---|---|",
    ]
    for name, result in zip(HEADS, (trl, ours)):
        seconds = result["seconds"]
        lines.append(f"| {name} | {seconds['reference pass']:.2f} | {seconds['training step']:.2f} |")
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return {"trl": trl["seconds"], "logits": ours["seconds"], "max_difference": difference}


if __name__ == "__main__":
    main()
