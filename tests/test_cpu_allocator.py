"""Large CPU tensors kept in the heap between training steps (`vpl_trl.cpu_allocator`)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES_PER_LOGITS = 3200 * 8192 * 4 // 4096
# a fresh process each: mallopt changes the allocator for the rest of the process that calls it
TRAINING_STEPS = """
import json, resource, torch
from vpl_trl.cpu_allocator import keep_large_allocations

kept = keep_large_allocations()
x, w = torch.randn(3200, 32), torch.randn(32, 8192, requires_grad=True)

def step():  # the logits of 3200 tokens over 8192 entries (100 MiB) and their gradients, freed at the step's end
    (x @ w).logsumexp(-1).mean().backward()
    w.grad = None

for _ in range(2):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    step()
print(json.dumps({"kept": kept, "faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4}))
"""


def training_steps(**env: str) -> dict:
    done = subprocess.run([sys.executable, "-c", TRAINING_STEPS], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env}, check=True, timeout=300)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_training_steps_reuse_the_heap_instead_of_faulting_in_new_pages():
    steps = training_steps()
    if platform.libc_ver()[0] != "glibc":
        assert steps["kept"] is False  # nothing to set without glibc's mallopt
        return
    # glibc's defaults map each of a step's five 100 MiB tensors afresh (about 5 x 25600 faults on 4 KiB pages)
    assert steps["kept"] is True and steps["faults"] < 2 * PAGES_PER_LOGITS


def test_keeping_the_heap_can_be_turned_off():
    assert training_steps(VPL_TRL_KEEP_HEAP="0")["kept"] is False
