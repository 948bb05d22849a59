"""A personalized reward on a `python -m vpl_trl.serve` server, as a TRL reward function (for an RL job elsewhere).

```python
>>> from vpl_trl.serve import RemoteReward
>>> reward = RemoteReward("http://127.0.0.1:8000", token=SERVICE_TOKEN)  # or one user's token
>>> trainer = GRPOTrainer(model=..., reward_funcs=reward, train_dataset=dataset_with_a_user_id_column, ...)
```
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import httpx

from ..text import completion_text


class RemoteRewardError(RuntimeError):
    """The server refused a request, or could not be reached."""


class RemoteReward:
    """`reward_func(prompts, completions, user_id=None, raw_prompt=None, **kwargs) -> list[float]` for TRL trainers.

    Each completion is scored under its row's user (the dataset's `user_id` column, which TRL passes as a keyword
    argument; `user_id` given here for rows without one), after its bare prompt when a `raw_prompt` column exists.
    A call's rows are grouped by user and prompt into `POST /v1/score_batch` requests of at most
    `completions_per_request` completions. `token` is a service token (any user), one user's token, or a mapping
    from user to token. Connection errors and 5xx answers are retried `retries` times.
    """

    __name__ = "remote_vpl_reward"

    def __init__(
        self,
        url: str,
        token: str | Mapping[str, str],
        user_id: str | None = None,
        timeout: float = 120.0,
        completions_per_request: int = 512,
        retries: int = 2,
        client: httpx.Client | None = None,
    ):
        self.url, self.token, self.user_id = url.rstrip("/"), token, user_id
        self.completions_per_request, self.retries = completions_per_request, retries
        self.client = client or httpx.Client(timeout=timeout)

    def __call__(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        user_id: Sequence[str] | None = None,
        raw_prompt: Sequence[Any] | None = None,
        log_metric: Callable[[str, float], None] | None = None,
        **kwargs,
    ) -> list[float]:
        users = list(user_id) if user_id is not None else [self.user_id] * len(completions)
        if None in users:
            raise ValueError("rows without a user: give the dataset a `user_id` column, or RemoteReward(user_id=...).")
        prompts = list(raw_prompt or prompts)
        texts = [completion_text(c).strip() for c in completions]
        groups: dict[tuple[str, str], list[int]] = {}  # (user, prompt) -> rows, in order of appearance
        for row, (user, prompt) in enumerate(zip(users, prompts)):
            groups.setdefault((user, json.dumps(prompt)), []).append(row)
        rewards: list[float] = [0.0] * len(texts)
        for token, batch in self._requests(groups):
            body = {"requests": [
                {"user_id": user, "prompt": json.loads(prompt), "completions": [texts[r] for r in rows]}
                for (user, prompt), rows in batch
            ]}
            answer = self._post("/v1/score_batch", body, token)
            for (_, rows), values in zip(batch, answer["rewards"]):
                for row, value in zip(rows, values):
                    rewards[row] = value
        if log_metric is not None:
            for user in dict.fromkeys(users):
                values = [r for u, r in zip(users, rewards) if u == user]
                log_metric(f"reward/{user}", sum(values) / len(values))
        return rewards

    def _token(self, user: str) -> str:
        if isinstance(self.token, str):
            return self.token
        if user not in self.token:
            raise RemoteRewardError(f"no token for user {user!r}.")
        return self.token[user]

    def _requests(self, groups: dict[tuple[str, str], list[int]]):
        """(token, groups) batches, each under `completions_per_request` completions (a larger group is split)."""
        by_token: dict[str, list] = {}
        for (user, prompt), rows in groups.items():
            for begin in range(0, len(rows), self.completions_per_request):
                by_token.setdefault(self._token(user), []).append(
                    ((user, prompt), rows[begin : begin + self.completions_per_request])
                )
        for token, items in by_token.items():
            batch, size = [], 0
            for item in items:
                if batch and size + len(item[1]) > self.completions_per_request:
                    yield token, batch
                    batch, size = [], 0
                batch.append(item)
                size += len(item[1])
            if batch:
                yield token, batch

    def _post(self, path: str, body: dict, token: str) -> dict:
        for attempt in range(self.retries + 1):
            try:
                response = self.client.post(self.url + path, json=body, headers={"Authorization": f"Bearer {token}"})
            except httpx.TransportError as error:
                if attempt == self.retries:
                    raise RemoteRewardError(f"{self.url}{path}: {error}") from error
            else:
                if response.status_code < 500 or attempt == self.retries:
                    break
            time.sleep(0.5 * 2**attempt)
        if response.status_code != 200:
            try:
                detail = response.json().get("detail")
            except ValueError:
                detail = response.text
            raise RemoteRewardError(f"{self.url}{path}: HTTP {response.status_code}: {detail}")
        return response.json()
