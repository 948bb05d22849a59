"""Personalization over HTTP: a user store, an API and onboarding page (`python -m vpl_trl.serve`), and a remote
reward for RL jobs (`RemoteReward`). The server needs the `serve` extra (`pip install vpl-trl[serve]`)."""

from .remote_reward import RemoteReward, RemoteRewardError
from .store import UserStore

__all__ = ["RemoteReward", "RemoteRewardError", "UserStore", "create_app"]


def __getattr__(name: str):
    if name == "create_app":  # FastAPI only where the server runs: an RL job needs RemoteReward alone
        from .app import create_app

        return create_app
    raise AttributeError(name)
