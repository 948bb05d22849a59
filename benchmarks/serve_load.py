"""Load on `python -m vpl_trl.serve`, on loopback: latency of `score` (8 completions) and `next_pair`, pairs stored
per second, for 1, 10 and 50 concurrent users; and the time a new user's z takes from 8 pairs.

    python benchmarks/serve_load.py --reward_model /tmp/serve-vae --output benchmarks/results/serve.md

The server runs in a child process on 127.0.0.1 (a free port); each simulated user is a thread with its own HTTP
connection. Every phase is bounded: `--requests` requests per user and kind, `--max_seconds` per phase.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from vpl_trl.data.pets import KINDS, PROMPT, sentences
from vpl_trl.serve.process import running_server

ANSWERS = [" " + s for kind in KINDS for s in sentences(kind, "test")]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


class Phase:
    """One concurrency level's run: users in threads, each request timed, stopping at `deadline`."""

    def __init__(self, url: str, users: int, requests: int, max_seconds: float):
        self.url, self.users, self.requests = url, users, requests
        self.deadline = time.monotonic() + max_seconds
        self.latencies: dict[str, list[float]] = {"score": [], "next_pair": []}
        self.pairs_stored, self.lock = 0, threading.Lock()

    def timed(self, kind: str, call) -> httpx.Response:
        start = time.perf_counter()
        response = call()
        elapsed = time.perf_counter() - start
        response.raise_for_status()
        with self.lock:
            self.latencies[kind].append(elapsed)
        return response

    def run(self) -> dict:
        with httpx.Client(base_url=self.url, timeout=300) as http:
            accounts = [http.post("/v1/users").json() for _ in range(self.users)]
        barrier = threading.Barrier(self.users)
        starts, ends = [], []

        def user(number: int) -> None:
            account = accounts[number]
            headers = {"Authorization": f"Bearer {account['token']}"}
            with httpx.Client(base_url=self.url, timeout=300, headers=headers) as http:
                barrier.wait()
                starts.append(time.perf_counter())
                for i in range(16):  # store 16 pairs, one request each
                    if time.monotonic() > self.deadline:
                        break
                    chosen, rejected = ANSWERS[(number + i) % 80], ANSWERS[(number + 3 * i + 1) % 80]
                    pair = {"prompt": PROMPT, "chosen": chosen, "rejected": rejected}
                    if pair["chosen"] != pair["rejected"]:
                        http.post(f"/v1/users/{account['user_id']}/pairs", json={"pairs": [pair]}).raise_for_status()
                        with self.lock:
                            self.pairs_stored += 1
                ends.append(time.perf_counter())
                barrier.wait()
                for i in range(self.requests):
                    if time.monotonic() > self.deadline:
                        break
                    completions = [ANSWERS[(number * 7 + i * 8 + j) % 80] for j in range(8)]
                    self.timed("score", lambda: http.post("/v1/score", json={
                        "user_id": account["user_id"], "prompt": PROMPT, "completions": completions}))
                    self.timed("next_pair", lambda: http.get(f"/v1/users/{account['user_id']}/next_pair"))

        with ThreadPoolExecutor(max_workers=self.users) as pool:
            list(pool.map(user, range(self.users)))
        row = {"users": self.users, "pairs_per_second": self.pairs_stored / (max(ends) - min(starts))}
        for kind, values in self.latencies.items():
            row[kind] = {"n": len(values), "p50": percentile(values, 50), "p95": percentile(values, 95)}
        return row


def new_user_latent_seconds(url: str, trials: int) -> list[float]:
    """A new user posts 8 pairs of texts the server has never seen; the first score after them infers z (16 texts
    embedded, the encoder run) and scores one completion."""
    times = []
    with httpx.Client(base_url=url, timeout=300) as http:
        for trial in range(trials):
            account = http.post("/v1/users").json()
            headers = {"Authorization": f"Bearer {account['token']}"}
            pairs = [{"prompt": PROMPT, "chosen": f"{ANSWERS[i]} (trial {trial}, pair {i})",
                      "rejected": f"{ANSWERS[40 + i]} (trial {trial}, pair {i})"} for i in range(8)]
            added = http.post(f"/v1/users/{account['user_id']}/pairs", json={"pairs": pairs}, headers=headers)
            added.raise_for_status()
            start = time.perf_counter()
            http.post("/v1/score", json={"user_id": account["user_id"], "prompt": PROMPT, "completions": [ANSWERS[0]]},
                      headers=headers).raise_for_status()
            times.append(time.perf_counter() - start)
    return times


def score_only_seconds(url: str, trials: int) -> list[float]:
    """One completion scored for a user whose z is cached: what the first score above costs besides z."""
    with httpx.Client(base_url=url, timeout=300) as http:
        account = http.post("/v1/users").json()
        headers = {"Authorization": f"Bearer {account['token']}"}
        times = []
        for _ in range(trials):
            start = time.perf_counter()
            http.post("/v1/score", json={"user_id": account["user_id"], "prompt": PROMPT, "completions": [ANSWERS[0]]},
                      headers=headers).raise_for_status()
            times.append(time.perf_counter() - start)
    return times


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{os.cpu_count()} CPU cores ({cpu}), no GPU, {platform.system()}"


def model_description(path: str) -> str:
    config = json.loads((Path(path) / "config.json").read_text())
    return (f"`{path}`: {config.get('reward_type', config.get('model_type'))} reward, backbone "
            f"{config.get('backbone_name_or_path')}, embedding mode {config.get('embedding_mode')}, "
            f"latent dim {config.get('latent_dim')}")


def report(rows: list[dict], latent: list[float], score_only: list[float], health: dict, args) -> str:
    ms = lambda seconds: f"{1000 * seconds:.0f}"  # noqa: E731
    lines = [
        "# Serving load (`benchmarks/serve_load.py`)",
        "",
        f"- Machine: {machine()}; the server and the simulated users share it. Load average (1 min) at the start and"
        f" the end of the run: {args.load[0]:.1f} and {args.load[1]:.1f} (the run itself keeps 1 to 2 busy; more: other"
        " jobs used the cores too).",
        f"- Model: {model_description(args.reward_model)}{'; ' + args.model_note if args.model_note else ''}.",
        "- Server: `python -m vpl_trl.serve --policy none` on 127.0.0.1 (uvicorn, one process; model calls serialized"
        " by one lock, store writes by SQLite in WAL mode);"
        f" default query pool ({health['query_pool']} Pets test pairs).",
        f"- Each user: 16 pairs posted one per request, then {args.requests} x (`POST /v1/score` with 8 completions,"
        " `GET /v1/users/{id}/next_pair`); users start together. Latency is per request, seen by the client.",
        "",
        f"Run: `python benchmarks/serve_load.py --reward_model {args.reward_model} --users "
        f"{' '.join(map(str, args.users))} --requests {args.requests}`.",
        "",
        "| concurrent users | score p50 (ms) | score p95 (ms) | next_pair p50 (ms) | next_pair p95 (ms) "
        "| pairs stored/s | requests timed |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(f"| {row['users']} | {ms(row['score']['p50'])} | {ms(row['score']['p95'])} | "
                     f"{ms(row['next_pair']['p50'])} | {ms(row['next_pair']['p95'])} | {row['pairs_per_second']:.0f} | "
                     f"{row['score']['n'] + row['next_pair']['n']} |")
    lines += [
        "",
        f"**A new user's z from 8 pairs** (texts the server has never seen: 16 embedded, the encoder run, z stored), as"
        f" the first `score` after the pairs: median {ms(statistics.median(latent))} ms, max {ms(max(latent))} ms over"
        f" {len(latent)} users (goal: under 1 s). The same score with z cached: median"
        f" {ms(statistics.median(score_only))} ms.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reward_model", required=True)
    parser.add_argument("--model_note", default="", help="how the model was trained, for the report")
    parser.add_argument("--output", default="benchmarks/results/serve.md")
    parser.add_argument("--users", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--requests", type=int, default=4, help="score and next_pair requests per user and level")
    parser.add_argument("--max_seconds", type=float, default=300, help="time limit of each concurrency level")
    parser.add_argument("--latent_trials", type=int, default=5)
    args = parser.parse_args(argv)
    args.load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as folder:
        server = ["--reward_model", args.reward_model, "--policy", "none", "--db", f"{folder}/users.sqlite"]
        with running_server(server, log=f"{folder}/server.log", timeout=600) as url:
            score_only_seconds(url, 2)  # warm-up
            health = httpx.get(url + "/health").json()
            rows = []
            for users in args.users:
                rows.append(Phase(url, users, args.requests, args.max_seconds).run())
                print(json.dumps(rows[-1]), flush=True)
            latent = new_user_latent_seconds(url, args.latent_trials)
            score_only = score_only_seconds(url, args.latent_trials)
    args.load.append(os.getloadavg()[0])
    text = report(rows, latent, score_only, health, args)
    Path(args.output).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
