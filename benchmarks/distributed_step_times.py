"""Time the optimizer steps of `recipes/train_reward.py`, under any launcher (plain python, DDP, DeepSpeed).

Runs the recipe's script (`vpl_trl.scripts.train_reward`) unchanged, with a callback that times every training step
on the main process, and prints one line `STEP_TIMES {"steps": [...seconds...], "world_size": N,
"per_device_train_batch_size": B}` when training ends:

    accelerate launch --config_file deepspeed_configs/zero3.yaml --num_processes 2 \\
        benchmarks/distributed_step_times.py --embedding_mode lora --max_steps 5 --per_device_train_batch_size 4 \\
        --max_length 64 --output_dir outputs/bench-zero3 --overwrite_output_dir --save_strategy no --report_to none

The first step (warm-up: DeepSpeed's first parameter fetches, allocator growth) is reported but should be left out
of averages. Results of a 2-core CPU machine are in `benchmarks/results/distributed_step_times.md`.
"""

from __future__ import annotations

import json
import sys
import time

from transformers import TrainerCallback

from vpl_trl.scripts import train_reward


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            report = {
                "steps": [round(t, 3) for t in self.times],
                "world_size": args.world_size,
                "per_device_train_batch_size": args.per_device_train_batch_size,
            }
            print("STEP_TIMES " + json.dumps(report), flush=True)


def main(argv: list[str]) -> None:
    class TimedTrainer(train_reward.VPLRewardTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(StepTimer())

    train_reward.VPLRewardTrainer = TimedTrainer
    train_reward.main(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
