"""`python -m vpl_trl.serve`: the API through FastAPI's test client, the store across a restart, tokens and limits,
the remote reward, many concurrent users on a real server, and two Pets users who label oppositely."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from vpl_trl import VPLRewardConfig, VPLRewardTrainer
from vpl_trl.data.pets import PROMPT, sentences
from vpl_trl.serve import RemoteReward, RemoteRewardError
from vpl_trl.serve.__main__ import ServeArguments, build_service, parse_args
from vpl_trl.serve.app import Limits, create_app
from vpl_trl.serve.process import running_server

SERVICE_TOKEN = "service-token-for-tests"


def serve_args(reward_model: str, policy: str, db, **overrides) -> ServeArguments:
    return ServeArguments(reward_model=reward_model, policy=policy, db=str(db), max_new_tokens=6, num_samples=16,
                          **overrides)


@pytest.fixture(scope="module")
def service(tiny_reward_model, tiny_backbone, tmp_path_factory):
    return build_service(serve_args(tiny_reward_model, tiny_backbone, tmp_path_factory.mktemp("db") / "users.sqlite"))


@pytest.fixture(scope="module")
def client(service) -> TestClient:
    return TestClient(create_app(service, service_token=SERVICE_TOKEN))


def new_user(client) -> tuple[str, dict[str, str]]:
    response = client.post("/v1/users")
    assert response.status_code == 201
    user = response.json()
    return user["user_id"], {"Authorization": f"Bearer {user['token']}"}


def pets_pairs(split: str, winner: str, loser: str, k: int) -> list[dict]:
    """k Pets pairs of two kinds of answer (`winner` chosen), with distinct sentences."""
    return [{"prompt": PROMPT, "chosen": " " + a, "rejected": " " + b}
            for a, b in zip(sentences(winner, split)[::3][:k], sentences(loser, split)[1::3][:k])]


def answer(client, user_id, headers) -> dict:
    """Ask the user the next pair and answer it with the first response."""
    pair = client.get(f"/v1/users/{user_id}/next_pair", headers=headers).json()
    chosen = {"prompt": pair["prompt"], "chosen": pair["a"], "rejected": pair["b"]}
    assert client.post(f"/v1/users/{user_id}/pairs", json={"pairs": [chosen]}, headers=headers).status_code == 200
    return chosen


# ----- the API --------------------------------------------------------------------------------------------------


def test_health_docs_and_onboarding_page(client, service):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["query_pool"] == len(service.pool) > 0 and health["generation"]
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/users", "/v1/users/{user_id}/pairs", "/v1/users/{user_id}/next_pair", "/v1/score", "/v1/generate",
            "/health"} <= set(paths)
    assert "swagger" in client.get("/docs").text.lower()
    page = client.get("/")
    assert page.status_code == 200 and 'id="answer-a"' in page.text and "/next_pair" in page.text


def test_a_user_labels_pairs_and_is_scored_under_their_latent(client, service):
    user_id, headers = new_user(client)
    profile = client.get(f"/v1/users/{user_id}", headers=headers).json()
    assert profile["pairs"] == 0 and profile["posterior"]["spread"] == pytest.approx(1.0)  # the prior
    completions = [" " + sentences("dog", "test")[0], " " + sentences("cat", "test")[0]]
    body = {"user_id": user_id, "prompt": PROMPT, "completions": completions}
    prior = client.post("/v1/score", json=body, headers=headers).json()["rewards"]
    assert prior == pytest.approx(service.scorer.score([PROMPT] * 2, completions))  # no pairs: the prior user

    pair = client.get(f"/v1/users/{user_id}/next_pair", headers=headers).json()
    assert set(pair) == {"prompt", "a", "b", "information_gain"} and pair["a"] != pair["b"]
    assert pair == client.get(f"/v1/users/{user_id}/next_pair", headers=headers).json()  # same state, same pair
    pool = {(p["prompt"], frozenset((p["chosen"], p["rejected"]))) for p in service.pool}
    assert (pair["prompt"], frozenset((pair["a"], pair["b"]))) in pool
    given = [{"prompt": pair["prompt"], "chosen": pair["b"], "rejected": pair["a"]}]
    assert client.post(f"/v1/users/{user_id}/pairs", json={"pairs": given}, headers=headers).json() == {"pairs": 1}
    asked_next = client.get(f"/v1/users/{user_id}/next_pair", headers=headers).json()
    assert {asked_next["a"], asked_next["b"]} != {pair["a"], pair["b"]}  # an answered pair is not asked again
    given += pets_pairs("train", "dog", "cat", 3)
    assert client.post(f"/v1/users/{user_id}/pairs", json={"pairs": given[1:]}, headers=headers).json() == {"pairs": 4}
    assert client.get(f"/v1/users/{user_id}/pairs", headers=headers).json() == {"pairs": given}

    rewards = client.post("/v1/score", json=body, headers=headers).json()["rewards"]
    z = service.scorer.user_latent(given)  # what PersonalizedRewardScorer infers from the same pairs
    assert rewards == pytest.approx(service.scorer.score([PROMPT] * 2, completions, z), abs=1e-5)
    assert rewards != pytest.approx(prior, abs=1e-4)
    profile = client.get(f"/v1/users/{user_id}", headers=headers).json()
    assert profile["pairs"] == 4 and len(profile["posterior"]["std"]) == 8
    assert profile["preview"]["prompt"] == PROMPT and {"personalized", "generic"} <= set(profile["preview"])


def test_generate_is_best_of_n_under_the_users_reward(client):
    user_id, headers = new_user(client)
    client.post(f"/v1/users/{user_id}/pairs", json={"pairs": pets_pairs("train", "cat", "dog", 4)}, headers=headers)
    result = client.post("/v1/generate", json={"user_id": user_id, "prompt": PROMPT, "n": 3}, headers=headers).json()
    rewards = [c["reward"] for c in result["candidates"]]
    assert len(rewards) == 3 and rewards == sorted(rewards, reverse=True)
    assert result["completion"] == result["candidates"][0]["text"]
    texts = [c["text"] for c in result["candidates"]]
    scored = client.post("/v1/score", json={"user_id": user_id, "prompt": PROMPT, "completions": texts},
                         headers=headers).json()["rewards"]
    assert scored == pytest.approx(rewards, abs=1e-4)  # the same reward, the same z


def test_next_pair_runs_out_with_a_small_query_pool(tiny_reward_model, tmp_path):
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps(p) + "\n" for p in pets_pairs("test", "bird", "rabbit", 3)))
    service = build_service(serve_args(tiny_reward_model, "none", tmp_path / "db.sqlite", query_pool=str(pool)))
    client = TestClient(create_app(service))
    assert client.get("/health").json()["generation"] is False
    user_id, headers = new_user(client)
    asked = [answer(client, user_id, headers) for _ in range(3)]
    assert len({(p["chosen"], p["rejected"]) for p in asked}) == 3
    done = client.get(f"/v1/users/{user_id}/next_pair", headers=headers)
    assert done.status_code == 404 and "every pair" in done.json()["detail"]
    response = client.post("/v1/generate", json={"user_id": user_id, "prompt": "x", "n": 1}, headers=headers)
    assert response.status_code == 409 and "without a policy" in response.json()["detail"]


def test_a_bradley_terry_model_scores_everyone_alike_and_asks_nothing(tiny_base_reward_model, tmp_path):
    client = TestClient(create_app(build_service(serve_args(tiny_base_reward_model, "none", tmp_path / "db.sqlite"))))
    (alice, alice_headers), (bob, bob_headers) = new_user(client), new_user(client)
    client.post(f"/v1/users/{alice}/pairs", json={"pairs": pets_pairs("train", "dog", "cat", 2)}, headers=alice_headers)
    body = {"prompt": PROMPT, "completions": [p["chosen"] for p in pets_pairs("test", "dog", "cat", 2)]}
    rewards = [client.post("/v1/score", json={**body, "user_id": user}, headers=headers).json()["rewards"]
               for user, headers in ((alice, alice_headers), (bob, bob_headers))]
    assert rewards[0] == pytest.approx(rewards[1], abs=1e-6) and len(rewards[0]) == 2
    refused = client.get(f"/v1/users/{alice}/next_pair", headers=alice_headers)
    assert refused.status_code == 409 and "without a user latent" in refused.json()["detail"]
    assert client.get(f"/v1/users/{alice}", headers=alice_headers).json()["posterior"]["spread"] is None


def test_cli_flags_in_both_spellings_and_from_yaml(tmp_path):
    args, limits = parse_args(["--reward_model", "m", "--query-pool", "p.jsonl", "--max-pairs-per-user", "7"])
    assert (args.reward_model, args.query_pool, limits.max_pairs_per_user) == ("m", "p.jsonl", 7)
    assert (args.host, args.port) == ("127.0.0.1", 8000)  # loopback by default
    config = tmp_path / "serve.yaml"
    config.write_text("reward_model: m2\nquery_pool: q.jsonl\nport: 9001\nmax_text_chars: 100\n")
    args, limits = parse_args(["--config", str(config), "--port", "9002"])
    assert (args.reward_model, args.query_pool, args.port, limits.max_text_chars) == ("m2", "q.jsonl", 9002, 100)


def test_cli_bad_input_is_a_one_line_error(tiny_reward_model, tmp_path, capsys):
    from vpl_trl.serve.__main__ import main

    base = ["--policy", "none", "--db", str(tmp_path / "d.sqlite")]
    assert main(["--reward_model", str(tmp_path / "missing"), *base]) == 2
    assert capsys.readouterr().err.startswith("error: reward model")
    assert main(["--reward_model", tiny_reward_model, "--sample_prompt", "Not in the pool", *base]) == 2
    assert "error: the sample prompt 'Not in the pool' is not a prompt of the query pool" in capsys.readouterr().err
    (tmp_path / "pool.jsonl").write_text('{"prompt": "p", "chosen": "a"}\n')
    assert main(["--reward_model", tiny_reward_model, "--query_pool", str(tmp_path / "pool.jsonl"), *base]) == 2
    assert "pool.jsonl" in capsys.readouterr().err


# ----- the store: restart, hashed tokens ------------------------------------------------------------------------


def test_restart_keeps_users_pairs_and_latents(tiny_reward_model, tmp_path):
    db = tmp_path / "users.sqlite"
    first = build_service(serve_args(tiny_reward_model, "none", db))
    client = TestClient(create_app(first))
    user_id, headers = new_user(client)
    pairs = pets_pairs("train", "dog", "cat", 5)
    client.post(f"/v1/users/{user_id}/pairs", json={"pairs": pairs}, headers=headers)
    completions = [p["chosen"] for p in pets_pairs("test", "dog", "cat", 3)]
    body = {"user_id": user_id, "prompt": PROMPT, "completions": completions}
    before = client.post("/v1/score", json=body, headers=headers).json()["rewards"]
    assert first.latent_computations == 1

    second = build_service(serve_args(tiny_reward_model, "none", db))  # a new process: new model, empty caches
    client = TestClient(create_app(second))
    assert client.get(f"/v1/users/{user_id}/pairs", headers=headers).json() == {"pairs": pairs}  # token still valid
    assert client.post("/v1/score", json=body, headers=headers).json()["rewards"] == before  # identical rewards
    assert second.latent_computations == 0  # z came from the store
    torch.testing.assert_close(second.latent(user_id).z, first.latent(user_id).z, rtol=0, atol=0)

    client.post(f"/v1/users/{user_id}/pairs", json={"pairs": pets_pairs("train", "bird", "rabbit", 1)},
                headers=headers)
    after = client.post("/v1/score", json=body, headers=headers).json()["rewards"]
    assert second.latent_computations == 1 and after != before  # new pairs: z recomputed


def test_tokens_are_stored_hashed(client, service):
    user_id, headers = new_user(client)
    token = headers["Authorization"].removeprefix("Bearer ")
    with sqlite3.connect(service.store.path) as db:
        rows = db.execute("SELECT * FROM users WHERE user_id = ?", (user_id,)).fetchall()
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert token not in json.dumps(rows)
    assert hashlib.sha256(token.encode()).hexdigest() in rows[0]


def test_users_texts_stay_out_of_the_disk_embedding_cache(client, service):
    from vpl_trl.embeddings import default_embedding_cache_dir, embedding_key, text_key
    from vpl_trl.text import render_text

    user_id, headers = new_user(client)
    private = {"prompt": PROMPT, "chosen": " My private answer.", "rejected": " Another private answer."}
    client.post(f"/v1/users/{user_id}/pairs", json={"pairs": [private]}, headers=headers)
    assert client.get(f"/v1/users/{user_id}/next_pair", headers=headers).status_code == 200
    assert client.post("/v1/generate", json={"user_id": user_id, "prompt": PROMPT, "n": 1},
                       headers=headers).status_code == 200
    model = service.model
    folder = default_embedding_cache_dir(model, embedding_key(model.config), service.scorer.max_length)
    on_disk = {key for keys in folder.glob("*.json") for key in json.loads(keys.read_text())}
    key = lambda pair, side: text_key(render_text(service.scorer.tokenizer, pair["prompt"], pair[side]))  # noqa: E731
    assert key(service.pool[0], "chosen") in on_disk  # the pool is cached on disk (quick restarts)
    assert not {key(private, "chosen"), key(private, "rejected")} & on_disk


# ----- access and limits ----------------------------------------------------------------------------------------


def user_requests(user_id: str) -> list[tuple[str, str, dict | None]]:
    body = {"user_id": user_id, "prompt": PROMPT, "completions": [" a"]}
    return [
        ("GET", f"/v1/users/{user_id}", None),
        ("POST", f"/v1/users/{user_id}/pairs", {"pairs": pets_pairs("train", "dog", "cat", 1)}),
        ("GET", f"/v1/users/{user_id}/pairs", None),
        ("GET", f"/v1/users/{user_id}/next_pair", None),
        ("POST", "/v1/score", body),
        ("POST", "/v1/score_batch", {"requests": [body]}),
        ("POST", "/v1/generate", {"user_id": user_id, "prompt": PROMPT, "n": 1}),
        ("DELETE", f"/v1/users/{user_id}", None),
    ]


def test_access_needs_the_users_own_token(client, service):
    alice, alice_headers = new_user(client)
    _, bob_headers = new_user(client)
    for method, path, body in user_requests(alice):
        anonymous = client.request(method, path, json=body)
        assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"] == "Bearer", path
        forged = client.request(method, path, json=body, headers={"Authorization": "Bearer not-a-token"})
        assert forged.status_code == 401, path
        other = client.request(method, path, json=body, headers=bob_headers)
        assert other.status_code == 403 and alice in other.json()["detail"], path
    assert client.get(f"/v1/users/{alice}/pairs", headers=alice_headers).json() == {"pairs": []}  # nothing got in
    # the service token scores and generates for anyone, and reads or changes nothing
    service_headers = {"Authorization": f"Bearer {SERVICE_TOKEN}"}
    for method, path, body in user_requests(alice):
        expected = 200 if path in ("/v1/score", "/v1/score_batch", "/v1/generate") else 403
        assert client.request(method, path, json=body, headers=service_headers).status_code == expected, path
    # a deleted user is gone, token and pairs
    assert client.delete(f"/v1/users/{alice}", headers=alice_headers).status_code == 204
    assert client.get(f"/v1/users/{alice}/pairs", headers=alice_headers).status_code == 401
    assert service.store.count_pairs(alice) == 0 and alice not in service._latents


@pytest.fixture(scope="module")
def small_limits_client(service) -> TestClient:
    limits = Limits(max_text_chars=80, max_pairs_per_request=3, max_pairs_per_user=5, max_completions=4,
                    max_score_requests=2, max_n=2, max_body_bytes=3000)
    return TestClient(create_app(service, limits))


@pytest.mark.parametrize(
    "case, status, message",
    [
        ("long text", 422, "pairs[0].chosen has 81 characters; the limit is 80"),
        ("many pairs", 422, "4 pairs in one request; the limit is 3"),
        ("user full", 422, "would pass the limit of 5"),
        ("same text", 422, "chosen and rejected are the same text"),
        ("no pairs", 422, "no pairs given"),
        ("many completions", 422, "5 completions; the limit is 4"),
        ("long completion", 422, "completion 1 has 81 characters"),
        ("many requests", 422, "3 requests; the limit is 2"),
        ("large n", 422, "3 candidates asked (n); the limit is 2"),
        ("large body", 413, "the limit is 3000"),
        ("large streamed body", 413, "over the limit of 3000 bytes"),
        ("malformed json", 422, "JSON decode error"),
        ("unknown field", 422, "Extra inputs are not permitted"),
        ("wrong type", 422, "Input should be a valid list"),
    ],
)
def test_limits_and_bad_input_are_refused_with_a_message(small_limits_client, case, status, message):
    client = small_limits_client
    user_id, headers = new_user(client)
    pairs = f"/v1/users/{user_id}/pairs"
    pair = {"prompt": "p", "chosen": "c", "rejected": "r"}
    score = {"user_id": user_id, "prompt": "p", "completions": ["a"]}
    if case == "user full":
        assert client.post(pairs, json={"pairs": [pair] * 3}, headers=headers).json() == {"pairs": 3}
    request = {
        "long text": ("POST", pairs, {"pairs": [{**pair, "chosen": "x" * 81}]}),
        "many pairs": ("POST", pairs, {"pairs": [pair] * 4}),
        "user full": ("POST", pairs, {"pairs": [pair] * 3}),
        "same text": ("POST", pairs, {"pairs": [{**pair, "rejected": "c"}]}),
        "no pairs": ("POST", pairs, {"pairs": []}),
        "many completions": ("POST", "/v1/score", {**score, "completions": ["a"] * 5}),
        "long completion": ("POST", "/v1/score", {**score, "completions": ["a", "y" * 81]}),
        "many requests": ("POST", "/v1/score_batch", {"requests": [score] * 3}),
        "large n": ("POST", "/v1/generate", {"user_id": user_id, "prompt": "p", "n": 3}),
        "large body": ("POST", pairs, {"pairs": [{**pair, "chosen": "z" * 4000}]}),
        "large streamed body": ("POST", pairs, iter([b'{"pairs": [{"chosen": "', b"z" * 4000, b'"}]}'])),
        "malformed json": ("POST", pairs, b'{"pairs": [{"chosen": "a",'),
        "unknown field": ("POST", pairs, {"pairs": [{**pair, "label": 1}]}),
        "wrong type": ("POST", "/v1/score", {**score, "completions": "a"}),
    }[case]
    method, path, body = request
    if isinstance(body, dict):
        kwargs = {"json": body, "headers": headers}
    else:  # raw bytes, or chunks sent without a Content-Length
        kwargs = {"content": body, "headers": {**headers, "Content-Type": "application/json"}}
    response = client.request(method, path, **kwargs)
    assert response.status_code == status
    assert message in json.dumps(response.json()["detail"])
    assert client.get(pairs, headers=headers).json()["pairs"] == ([pair] * 3 if case == "user full" else [])


# ----- the remote reward ----------------------------------------------------------------------------------------


class CountingClient(TestClient):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.posts = 0

    def post(self, *args, **kwargs):
        self.posts += 1
        return super().post(*args, **kwargs)


def test_remote_reward_scores_each_row_under_its_user_in_batched_calls(client, service):
    alice, alice_headers = new_user(client)
    bob, bob_headers = new_user(client)
    client.post(f"/v1/users/{alice}/pairs", json={"pairs": pets_pairs("train", "dog", "cat", 4)}, headers=alice_headers)
    client.post(f"/v1/users/{bob}/pairs", json={"pairs": pets_pairs("train", "cat", "dog", 4)}, headers=bob_headers)
    dogs, cats = [p["chosen"] for p in pets_pairs("test", "dog", "cat", 3)], [
        p["rejected"] for p in pets_pairs("test", "dog", "cat", 3)]
    prompts = [PROMPT, PROMPT, "Human: Tell me about pets.\n\nAssistant:"] * 2
    completions = [[{"role": "assistant", "content": t}] for t in dogs + cats]  # TRL's conversational completions
    users = [alice, bob, alice, bob, alice, bob]

    def expected(user, headers, rows):
        return [client.post("/v1/score", json={"user_id": user, "prompt": prompts[r],
                                               "completions": [completions[r][0]["content"].strip()]},
                            headers=headers).json()["rewards"][0] for r in rows]

    truth = dict(zip([0, 2, 4], expected(alice, alice_headers, [0, 2, 4]))) | dict(
        zip([1, 3, 5], expected(bob, bob_headers, [1, 3, 5])))
    counting = CountingClient(create_app(service, service_token=SERVICE_TOKEN))
    reward = RemoteReward("http://testserver", SERVICE_TOKEN, client=counting)
    logged = {}
    rewards = reward(prompts, completions, user_id=users, log_metric=logged.__setitem__, trainer_state=None)
    assert rewards == pytest.approx([truth[r] for r in range(6)], abs=1e-3)  # batched with other texts: padding
    assert counting.posts == 1  # one call for both users and both prompts
    assert logged[f"reward/{alice}"] == pytest.approx(sum(rewards[r] for r in (0, 2, 4)) / 3)
    assert reward.__name__ == "remote_vpl_reward"

    per_user = RemoteReward("http://testserver", {alice: alice_headers["Authorization"][7:],
                                                  bob: bob_headers["Authorization"][7:]},
                            client=counting, completions_per_request=2)
    counting.posts = 0
    assert per_user(prompts, completions, user_id=users) == pytest.approx(rewards, abs=1e-3)
    assert counting.posts == 4  # a call per token, 2 completions at most each
    with pytest.raises(RemoteRewardError, match="HTTP 403"):
        RemoteReward("http://testserver", alice_headers["Authorization"][7:], client=counting)(
            prompts, completions, user_id=users)
    with pytest.raises(ValueError, match="user_id"):
        reward(prompts, completions)


def test_grpo_trainer_accepts_the_remote_reward(client, service, tiny_backbone, tmp_path):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    user_id, headers = new_user(client)
    client.post(f"/v1/users/{user_id}/pairs", json={"pairs": pets_pairs("train", "dog", "cat", 2)}, headers=headers)
    reward = RemoteReward("http://testserver", SERVICE_TOKEN,
                          client=TestClient(create_app(service, service_token=SERVICE_TOKEN)))
    data = Dataset.from_list([{"prompt": PROMPT, "user_id": user_id}] * 4)
    args = GRPOConfig(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=4, report_to="none", use_cpu=True, save_strategy="no", logging_steps=1)
    trainer = GRPOTrainer(model=tiny_backbone, reward_funcs=reward, args=args, train_dataset=data)
    trainer.train()
    logged = trainer.state.log_history[0]
    assert "rewards/remote_vpl_reward/mean" in logged and logged["rewards/remote_vpl_reward/mean"] != 0


# ----- many users on a real server ------------------------------------------------------------------------------


@pytest.mark.slow
def test_fifty_concurrent_users_lose_no_pair(tiny_reward_model, tmp_path):
    users, pairs_each = 50, 16
    db = tmp_path / "users.sqlite"
    with running_server(["--reward_model", tiny_reward_model, "--policy", "none", "--db", str(db)],
                        log=tmp_path / "server.log") as url:
        start = threading.Barrier(users, timeout=60)
        deadline = time.monotonic() + 120

        def simulated_user(number: int) -> tuple[str, list[dict], list[int], int]:
            with httpx.Client(base_url=url, timeout=60) as http:
                user = http.post("/v1/users").json()
                headers = {"Authorization": f"Bearer {user['token']}"}
                start.wait()  # every user posts at once
                given, totals = [], []
                for i in range(pairs_each):
                    assert time.monotonic() < deadline, "the load test ran out of time"
                    pair = {"prompt": f"user {number} question {i}", "chosen": f"yes {i}", "rejected": f"no {i}"}
                    totals.append(http.post(f"/v1/users/{user['user_id']}/pairs", json={"pairs": [pair]},
                                            headers=headers).json()["pairs"])
                    given.append(pair)
                stored = http.get(f"/v1/users/{user['user_id']}/pairs", headers=headers).json()["pairs"]
                assert stored == given
                scored = http.post("/v1/score", json={"user_id": user["user_id"], "prompt": "q", "completions": ["a"]},
                                   headers=headers)
                return user["user_id"], stored, totals, scored.status_code

        with ThreadPoolExecutor(max_workers=users) as pool:
            results = list(pool.map(simulated_user, range(users)))
    assert all(totals == list(range(1, pairs_each + 1)) for _, _, totals, _ in results)
    assert all(status == 200 for *_, status in results)
    with sqlite3.connect(db) as store:  # after the server stopped: everything reached the file
        assert store.execute("SELECT COUNT(*) FROM pairs").fetchone()[0] == users * pairs_each
        assert store.execute("SELECT COUNT(DISTINCT user_id) FROM pairs").fetchone()[0] == users
        assert store.execute("SELECT COUNT(*) FROM latents").fetchone()[0] == users


# ----- Pets: users who label oppositely -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pets_reward_model(tiny_backbone, pets_data, tmp_path_factory) -> str:
    """A tiny VPL model trained long enough on Pets to tell its two users apart, once per session (the browser test
    uses it too)."""
    folder = tmp_path_factory.getbasetemp() / "serve-pets-vae"
    if not (folder / "model" / "config.json").exists():
        args = VPLRewardConfig(
            output_dir=str(folder / "run"), model_type="vae", latent_dim=8, hidden_dim=64, num_train_epochs=15,
            per_device_train_batch_size=16, learning_rate=1e-2, report_to="none", save_strategy="no",
            pooling="mean", num_context="4", disable_tqdm=True, embedding_mode="frozen",
        )
        trainer = VPLRewardTrainer(model=tiny_backbone, args=args, train_dataset=pets_data["train"])
        trainer.train()
        trainer.save_model(str(folder / "model"))
    return str(folder / "model")


def test_pets_users_labelling_oppositely_get_opposite_preferences(pets_reward_model, tmp_path):
    service = build_service(serve_args(pets_reward_model, "none", tmp_path / "users.sqlite"))
    client = TestClient(create_app(service))
    labelled = pets_pairs("train", "dog", "cat", 8)  # controversial: the helpful user prefers dogs, harmless cats
    flipped = [{**p, "chosen": p["rejected"], "rejected": p["chosen"]} for p in labelled]
    unlabelled = [{"prompt": PROMPT, "chosen": " " + dog, "rejected": " " + cat}  # answers of pairs nobody labelled
                  for dog, cat in zip(sentences("dog", "train")[1::3][:8], sentences("cat", "train")[2::3][:8])]
    held_out = pets_pairs("test", "dog", "cat", 6)  # answers never seen in training
    margins = {}
    for name, pairs in (("dog lover", labelled), ("cat lover", flipped)):
        user_id, headers = new_user(client)
        client.post(f"/v1/users/{user_id}/pairs", json={"pairs": pairs}, headers=headers)
        completions = [t for p in unlabelled + held_out for t in (p["chosen"], p["rejected"])]
        rewards = client.post("/v1/score", json={"user_id": user_id, "prompt": PROMPT, "completions": completions},
                              headers=headers).json()["rewards"]
        margins[name] = [dog - cat for dog, cat in zip(rewards[::2], rewards[1::2])]  # r(dog) - r(cat)
    dog_lover, cat_lover = margins["dog lover"], margins["cat lover"]
    assert sum(dog_lover[:8]) > 0 > sum(cat_lover[:8]), margins  # opposite preferences on average
    assert all(m > 0 for m in dog_lover[:8]) and sum(m < 0 for m in cat_lover[:8]) >= 6, margins  # and pair by pair
    # on answers never seen in training the tiny model (a random backbone) does not flip every pair, but each user's
    # labels move every pair their way
    assert all(dog > cat for dog, cat in zip(dog_lover, cat_lover)), margins
