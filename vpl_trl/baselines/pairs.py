"""Labelled preference pairs as rows of an embedding matrix, and the Bradley-Terry fit the baselines share."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass
class PreferencePairs:
    """Pairs of responses by their rows in an embedding matrix: `chosen[i]` preferred to `rejected[i]` by user
    `user[i]` (an index into the users' list)."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    user: torch.Tensor

    def __post_init__(self):
        self.chosen, self.rejected, self.user = (torch.as_tensor(t, dtype=torch.long)
                                                 for t in (self.chosen, self.rejected, self.user))
        if not len(self.chosen) == len(self.rejected) == len(self.user):
            raise ValueError("chosen, rejected and user must have one entry per pair.")

    def __len__(self) -> int:
        return len(self.chosen)


def fit_bradley_terry(
    margin: Callable[[torch.Tensor], torch.Tensor],
    parameters: Iterable[torch.nn.Parameter],
    num_pairs: int,
    steps: int,
    batch_size: int = 256,
    learning_rate: float = 3e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
    desc: str | None = None,
) -> list[float]:
    """Minimize the Bradley-Terry loss -log sigmoid(margin(batch)) with AdamW over random batches of pair
    indices (`margin` maps a batch of indices to reward differences, chosen minus rejected); returns the
    loss of every step."""
    optimizer = torch.optim.AdamW(list(parameters), lr=learning_rate, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, learning_rate, total_steps=steps, pct_start=0.03)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in tqdm(range(steps), desc=desc, disable=desc is None):
        batch = torch.randint(num_pairs, (min(batch_size, num_pairs),), generator=generator)
        loss = -F.logsigmoid(margin(batch)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    return losses
