"""The HTTP API (FastAPI): users, their pairs, the next pair to ask, scores and best-of-n under their latent,
and the onboarding page at `/`. `create_app` builds it around a `Personalization`; the OpenAPI page is `/docs`.

Every user endpoint needs the user's bearer token (401 without a valid token, 403 with another user's). A
service token, when the server has one, may score and generate for any user (an RL job's remote reward).
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import HTMLResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from .personalization import NoGenerationError, NoLatentError, Personalization
from .store import PairLimitError, hash_token


@dataclass
class Limits:
    """What one request, and one user, may hold (422 past a count or length, 413 past the body size)."""

    max_text_chars: int = field(default=4000, metadata={"help": "Characters per prompt, response or completion."})
    max_pairs_per_request: int = field(default=64, metadata={"help": "Pairs per POST /v1/users/{id}/pairs."})
    max_pairs_per_user: int = field(default=512, metadata={"help": "Pairs one user may store."})
    max_completions: int = field(default=64, metadata={"help": "Completions per score request."})
    max_score_requests: int = field(default=256, metadata={"help": "Requests per POST /v1/score_batch."})
    max_n: int = field(default=16, metadata={"help": "Candidates per POST /v1/generate."})
    max_body_bytes: int = field(default=1_000_000, metadata={"help": "Bytes per request body (413 past it)."})


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Pair(Body):
    prompt: str = ""
    chosen: str
    rejected: str


class PairsIn(Body):
    pairs: list[Pair]


class ChatMessage(Body):
    role: str
    content: str


class ScoreIn(Body):
    user_id: str
    prompt: str | list[ChatMessage] = ""
    completions: list[str]


class ScoreBatchIn(Body):
    requests: list[ScoreIn]


class GenerateIn(Body):
    user_id: str
    prompt: str
    n: Annotated[int, Field(ge=1)] = 8


# module level: FastAPI resolves the endpoints' (string) annotations in this module's namespace
bearer = HTTPBearer(auto_error=False, description="The token returned by POST /v1/users.")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


class BodyTooLarge:
    """ASGI middleware: 413 for a body over `max_bytes`, by its Content-Length or as it streams in."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            body = json.dumps({"detail": f"request body of {int(length)} bytes; the limit is {self.max_bytes}."})
            await send({"type": "http.response.start", "status": 413,
                        "headers": [(b"content-type", b"application/json")]})
            return await send({"type": "http.response.body", "body": body.encode()})
        received = 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise HTTPException(413, f"request body over the limit of {self.max_bytes} bytes.")
            return message

        await self.app(scope, counted_receive, send)


def create_app(service: Personalization, limits: Limits | None = None, service_token: str | None = None) -> FastAPI:
    """The API around `service` (its store holds the users)."""
    limits = limits or Limits()
    store = service.store
    service_hash = hash_token(service_token) if service_token else None
    app = FastAPI(
        title="vpl-trl personalization",
        summary="A VPL reward model r(x, z) serving each user from the pairs they label.",
        version="1",
    )
    app.add_middleware(BodyTooLarge, max_bytes=limits.max_body_bytes)

    def authorize(user_id: str, credentials: HTTPAuthorizationCredentials | None, service_may: bool = False) -> None:
        if credentials is None:
            raise HTTPException(401, "missing token: send `Authorization: Bearer TOKEN`.",
                                headers={"WWW-Authenticate": "Bearer"})
        token_hash = hash_token(credentials.credentials)
        if service_hash and hmac.compare_digest(token_hash, service_hash):
            if not service_may:
                raise HTTPException(403, "the service token may score and generate, not read or change users' data.")
            if store.version(user_id) is None:
                raise HTTPException(404, f"no user {user_id}.")
            return
        owner = store.user_for_token(credentials.credentials)
        if owner is None:
            raise HTTPException(401, "invalid token.", headers={"WWW-Authenticate": "Bearer"})
        if owner != user_id:
            raise HTTPException(403, f"this token does not give access to user {user_id}.")

    def check_text(text: str, what: str) -> None:
        if len(text) > limits.max_text_chars:
            raise HTTPException(422, f"{what} has {len(text)} characters; the limit is {limits.max_text_chars}.")

    def check_count(count: int, limit: int, what: str) -> None:
        if count > limit:
            raise HTTPException(422, f"{count} {what}; the limit is {limit}.")

    def prompt_value(request: ScoreIn) -> str | list[dict]:
        return request.prompt if isinstance(request.prompt, str) else [m.model_dump() for m in request.prompt]

    def check_score_request(request: ScoreIn, where: str = "") -> None:
        prompt = request.prompt if isinstance(request.prompt, str) else "".join(m.content for m in request.prompt)
        check_text(prompt, f"{where}prompt")
        check_count(len(request.completions), limits.max_completions, f"{where}completions")
        for i, completion in enumerate(request.completions):
            check_text(completion, f"{where}completion {i}")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def onboarding() -> str:
        return resources.files(__package__).joinpath("static/onboarding.html").read_text(encoding="utf-8")

    @app.get("/health", tags=["service"])
    def health() -> dict:
        return {"status": "ok", "users": store.count_users(), "latent_dim": service.prior().z.shape[-1],
                "query_pool": len(service.pool), "generation": service.best_of_n is not None}

    @app.post("/v1/users", status_code=201, tags=["users"])
    def create_user() -> dict:
        """A new user and their token (shown once: only its hash is kept)."""
        user_id, token = store.create_user()
        return {"user_id": user_id, "token": token}

    @app.get("/v1/users/{user_id}", tags=["users"])
    def profile(user_id: str, credentials: Credentials) -> dict:
        """The user's pair count, the posterior's spread (1 for the prior) and the preview: their best answer to the
        sample prompt beside the prior user's."""
        authorize(user_id, credentials)
        return service.profile(user_id)

    @app.delete("/v1/users/{user_id}", status_code=204, tags=["users"])
    def delete_user(user_id: str, credentials: Credentials) -> Response:
        """Delete the user, their pairs and their latent."""
        authorize(user_id, credentials)
        service.forget(user_id)
        return Response(status_code=204)

    @app.post("/v1/users/{user_id}/pairs", tags=["users"])
    def add_pairs(user_id: str, body: PairsIn, credentials: Credentials) -> dict:
        """Add pairs the user labelled; returns their total."""
        authorize(user_id, credentials)
        if not body.pairs:
            raise HTTPException(422, "no pairs given.")
        check_count(len(body.pairs), limits.max_pairs_per_request, "pairs in one request")
        for i, pair in enumerate(body.pairs):
            for name in ("prompt", "chosen", "rejected"):
                check_text(getattr(pair, name), f"pairs[{i}].{name}")
            if pair.chosen == pair.rejected:
                raise HTTPException(422, f"pairs[{i}]: chosen and rejected are the same text.")
        try:
            total = store.add_pairs(user_id, [p.model_dump() for p in body.pairs], limits.max_pairs_per_user)
        except PairLimitError as error:
            raise HTTPException(422, str(error)) from None
        return {"pairs": total}

    @app.get("/v1/users/{user_id}/pairs", tags=["users"])
    def list_pairs(user_id: str, credentials: Credentials) -> dict:
        """The user's pairs, in the order given (an export of their data)."""
        authorize(user_id, credentials)
        return {"pairs": store.pairs(user_id)[1]}

    @app.get("/v1/users/{user_id}/next_pair", tags=["users"])
    def next_pair(user_id: str, credentials: Credentials) -> dict:
        """The query-pool pair whose answer tells the most about the user (expected information gain about z)."""
        authorize(user_id, credentials)
        try:
            pair = service.next_pair(user_id)
        except NoLatentError as error:
            raise HTTPException(409, str(error)) from None
        if pair is None:
            raise HTTPException(404, "the user has answered every pair of the query pool.")
        return pair

    @app.post("/v1/score", tags=["rewards"])
    def score(body: ScoreIn, credentials: Credentials) -> dict:
        """r(prompt + completion, z_user) per completion (the prior user's z before any pair)."""
        authorize(body.user_id, credentials, service_may=True)
        check_score_request(body)
        return {"rewards": service.score([(body.user_id, prompt_value(body), body.completions)])[0]}

    @app.post("/v1/score_batch", tags=["rewards"])
    def score_batch(body: ScoreBatchIn, credentials: Credentials) -> dict:
        """Several `score` requests (users, prompts) in one call and one model batch."""
        check_count(len(body.requests), limits.max_score_requests, "requests")
        for i, request in enumerate(body.requests):
            authorize(request.user_id, credentials, service_may=True)
            check_score_request(request, f"requests[{i}].")
        check_count(sum(len(r.completions) for r in body.requests), limits.max_completions * 16, "completions in all")
        requests = [(r.user_id, prompt_value(r), r.completions) for r in body.requests]
        return {"rewards": service.score(requests)}

    @app.post("/v1/generate", tags=["rewards"])
    def generate(body: GenerateIn, credentials: Credentials) -> dict:
        """Best-of-n under the user's reward (a conditioned policy is conditioned on the user too)."""
        authorize(body.user_id, credentials, service_may=True)
        check_text(body.prompt, "prompt")
        check_count(body.n, limits.max_n, "candidates asked (n)")
        try:
            ranking = service.generate(body.user_id, body.prompt, body.n)
        except NoGenerationError as error:
            raise HTTPException(409, str(error)) from None
        return {"completion": ranking.best.text,
                "candidates": [{"text": c.text, "reward": c.reward} for c in ranking.candidates]}

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> Response:  # one line, no traceback to clients
        return Response(json.dumps({"detail": f"internal error: {type(error).__name__}"}), 500,
                        media_type="application/json")

    return app
