"""Serve personalization over HTTP.

    python -m vpl_trl.serve --reward_model DIR [--policy DIR|none] [--db PATH] [--host 127.0.0.1 --port 8000]
                            [--query_pool FILE] [--service_token_file FILE] [--config serve.yaml]

Users, their pairs and their latents persist in SQLite (`--db`, default `$VPL_TRL_CACHE/serve/users.sqlite`);
the onboarding page is at `/`, the OpenAPI page at `/docs`. `--policy` generates for `/v1/generate` (default: the
embedded SmolLM2; a conditioned policy is conditioned on each user; `none`: no generation). Every `Limits` field is
a flag too (`--max_pairs_per_user`, ...).
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers.utils import logging
from trl import TrlParser

from ..data.format import PreferenceDataError, load_preference_file
from ..data.pets import generate_split
from ..embedded_model import DEFAULT_MODEL, cache_dir
from ..inference.sample import SampleArguments, UsageError, build_best_of_n, quiet_transformers
from ..inference.scoring import PersonalizedRewardScorer
from ..logs import show_info_logs
from ..policy.conditioned_policy import PolicyError
from .app import Limits, create_app
from .personalization import Personalization
from .store import UserStore

logger = logging.get_logger("vpl_trl.serve")  # not __name__: run with -m, that is __main__


@dataclass
class ServeArguments:
    reward_model: str | None = field(
        default=None, metadata={"help": "Folder of a saved VPL reward model (default: the one a conditioned "
                                        "--policy was trained with)."}
    )
    policy: str = field(default=DEFAULT_MODEL, metadata={"help": "The policy of /v1/generate (hub id or folder, or a "
                                                                "conditioned policy); `none`: no generation."})
    db: str | None = field(default=None, metadata={"help": "The SQLite user store (default: "
                                                           "$VPL_TRL_CACHE/serve/users.sqlite)."})
    host: str = field(default="127.0.0.1", metadata={"help": "Address to bind (loopback by default)."})
    port: int = field(default=8000, metadata={"help": "Port to bind."})
    query_pool: str | None = field(
        default=None, metadata={"help": "JSONL pairs {prompt, chosen, rejected} to ask (default: Pets test pairs)."}
    )
    query_pool_size: int = field(default=512, metadata={"help": "Pairs of the pool kept (the first ones)."})
    sample_prompt: str | None = field(
        default=None, metadata={"help": "The onboarding preview's prompt (default: the pool's most common prompt)."}
    )
    service_token_file: str | None = field(
        default=None, metadata={"help": "A file holding a token that may score and generate for any user."}
    )
    num_samples: int = field(default=64, metadata={"help": "Posterior samples per information-gain estimate."})
    max_new_tokens: int = field(default=64, metadata={"help": "Maximum tokens per generated candidate."})
    temperature: float = field(default=0.8, metadata={"help": "Sampling temperature (0: greedy)."})
    batch_size: int = field(default=16, metadata={"help": "Texts embedded, or sequences generated, per batch."})
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, ... (default: cuda when available)."})


def default_pool() -> list[dict]:
    """Pets test pairs (answers never seen in training), both users' and both variants' kinds."""
    return [{k: row[k] for k in ("prompt", "chosen", "rejected")} for row in generate_split("test", 48, seed=0)]


def read_pool(path: str | None, size: int) -> list[dict]:
    if path is None:
        return default_pool()[:size]
    rows = load_preference_file(path, require_user=False).to_list()[:size]
    for number, row in enumerate(rows, start=1):
        if not all(isinstance(row.get(k) or "", str) for k in ("prompt", "chosen", "rejected")):
            raise PreferenceDataError(f"{path}, row {number}: the query pool needs text prompts and responses.")
    return [{"prompt": row.get("prompt") or "", "chosen": row["chosen"], "rejected": row["rejected"]} for row in rows]


def build_service(args: ServeArguments) -> Personalization:
    """The store, the pool, the reward model and (unless `--policy none`) the policy, built as `vpl_trl.sample` does."""
    pool = read_pool(args.query_pool, args.query_pool_size)
    store = UserStore(args.db or cache_dir() / "serve" / "users.sqlite")
    best_of_n = None
    if args.policy.lower() == "none":
        if not args.reward_model:
            raise UsageError("--reward_model is required with --policy none.")
        scorer = PersonalizedRewardScorer.from_pretrained(args.reward_model, args.device, batch_size=args.batch_size)
    else:
        sample_args = SampleArguments(reward_model=args.reward_model, policy=args.policy,
                                      max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                      batch_size=args.batch_size, device=args.device)
        notes = io.StringIO()
        with contextlib.redirect_stderr(notes):
            best_of_n, _ = build_best_of_n(sample_args)
        for note in notes.getvalue().splitlines():  # not the one about a command-line user context: a server has none
            if "--user_context" not in note:
                logger.warning(note.removeprefix("note: "))
        scorer = best_of_n.scorer
    return Personalization(scorer, store, pool, best_of_n, args.sample_prompt, args.num_samples)


def parse_args(argv: list[str] | None = None) -> tuple[ServeArguments, Limits]:
    """Flags in either spelling (`--query_pool`, `--query-pool`), or a YAML file of them (`--config`)."""
    args, limits = TrlParser((ServeArguments, Limits)).parse_args_and_config(args=argv)
    return args, limits


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    args, limits = parse_args(argv)
    show_info_logs()
    try:
        if not ipaddress.ip_address(args.host if args.host != "localhost" else "127.0.0.1").is_loopback:
            logger.warning(f"binding to {args.host}: the API is reachable from other machines (use TLS in front).")
    except ValueError:
        logger.warning(f"binding to {args.host}: not a loopback address.")
    try:
        service_token = Path(args.service_token_file).read_text().strip() if args.service_token_file else None
        with quiet_transformers():
            service = build_service(args)
    except (UsageError, ValueError, PolicyError, OSError) as error:  # PreferenceDataError, RewardModelError too
        print(f"error: {error}", file=sys.stderr)
        return 2
    logger.info(f"users in {service.store.path}; {len(service.pool)} pairs to ask; http://{args.host}:{args.port}/")
    uvicorn.run(create_app(service, limits, service_token), host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
