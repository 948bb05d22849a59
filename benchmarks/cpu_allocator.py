"""A training step of the embedded policy on this CPU, with glibc's defaults and with large allocations kept in
the heap (`vpl_trl.cpu_allocator`, what the recipes do on a CPU).

    python benchmarks/cpu_allocator.py [--steps 4] [--batch 16] [--tokens 200]
        [--results benchmarks/results/cpu_allocator.md]

Each setting runs in its own process: a LoRA adapter on SmolLM2-135M-Instruct (rank 16, every linear layer), a
forward and backward pass on `--batch` sequences of `--tokens` tokens and an AdamW step, as a reward-ranked DPO
step of the population policy (8 pairs) does. Reports the wall time, the CPU time in user space and in the kernel,
and the minor page faults per step, after one warm-up step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEP = """
import json, resource, sys, time, torch
from peft import LoraConfig, get_peft_model
from vpl_trl.cpu_allocator import keep_large_allocations
from vpl_trl.embedded_model import DEFAULT_MODEL
from vpl_trl.models.causal_lm import load_policy

kept = keep_large_allocations()
steps, batch, tokens = (int(a) for a in sys.argv[1:4])
model, _ = load_policy(DEFAULT_MODEL, device="cpu")
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
ids = torch.randint(0, model.config.vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(0))

def step():
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()

step()
start, usage = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
for _ in range(steps):
    step()
end, after = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"kept_heap": kept, "seconds_per_step": (end - start) / steps,
                  "user_seconds_per_step": (after.ru_utime - usage.ru_utime) / steps,
                  "kernel_seconds_per_step": (after.ru_stime - usage.ru_stime) / steps,
                  "page_faults_per_step": (after.ru_minflt - usage.ru_minflt) / steps}))
"""


def run_setting(keep: bool, steps: int, batch: int, tokens: int) -> dict:
    env = {**os.environ, "VPL_TRL_KEEP_HEAP": "1" if keep else "0"}
    done = subprocess.run([sys.executable, "-c", STEP, str(steps), str(batch), str(tokens)], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--results", default="benchmarks/results/cpu_allocator.md")
    args = parser.parse_args(argv)
    rows = {name: run_setting(keep, args.steps, args.batch, args.tokens)
            for name, keep in (("glibc defaults", False), ("large allocations kept", True))}
    lines = [
        "# A training step on this CPU: glibc's defaults against large allocations kept in the heap", "",
        f"`python benchmarks/cpu_allocator.py --steps {args.steps} --batch {args.batch} --tokens {args.tokens}`; "
        f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.libc_ver()[0]} {platform.libc_ver()[1]}; "
        f"{time.strftime('%Y-%m-%d')}. A LoRA step of SmolLM2-135M-Instruct on {args.batch} x {args.tokens} "
        "tokens (forward, backward, AdamW), per step after a warm-up step.", "",
        "| allocator | seconds per step | user CPU s | kernel CPU s | minor page faults |", "|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        lines.append(f"| {name} | {row['seconds_per_step']:.2f} | {row['user_seconds_per_step']:.2f} | "
                     f"{row['kernel_seconds_per_step']:.2f} | {row['page_faults_per_step']:.0f} |")
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text("\n".join(lines) + "\n")
    print(results.read_text())
    return rows


if __name__ == "__main__":
    main()
