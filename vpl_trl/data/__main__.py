"""Dataset builders: `python -m vpl_trl.data {pets,uf-p2,uf-p4,hh-relabeled,population} --output DIR`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .format import PreferenceDataError


def _add_flag(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    """Register `--name_with_underscores` and `--name-with-dashes` as one option."""
    spellings = {f"--{name}", f"--{name.replace('_', '-')}"}
    parser.add_argument(*sorted(spellings), dest=name, **kwargs)


def _refuse_overwrite(output: Path, overwrite: bool, names: tuple[str, ...] = ("train.jsonl", "test.jsonl")) -> None:
    existing = [name for name in names if (output / name).exists()]
    if existing and not overwrite:
        raise SystemExit(f"error: {output} already holds {', '.join(existing)}; pass --overwrite to replace them.")


def _pets(args: argparse.Namespace) -> None:
    from .pets import build_pets

    output = Path(args.output)
    _refuse_overwrite(output, args.overwrite)
    counts = build_pets(output, variant=args.variant, n_train_per_user=args.n_train_per_user,
                        n_test_per_user=args.n_test_per_user, seed=args.seed)
    print(f"Pets ({args.variant}): wrote {counts['train']} train and {counts['test']} test rows to {output}")


def _ultrafeedback(args: argparse.Namespace) -> None:
    from .ultrafeedback import OUTPUT_FILES, build_ultrafeedback, summarize

    output = Path(args.output)
    _refuse_overwrite(output, args.overwrite, OUTPUT_FILES)
    stats = build_ultrafeedback(
        args.variant, args.ultrafeedback, args.binarized, output, seed=args.seed, num_context=args.num_context,
        num_duplicates=args.num_duplicates, test_fraction=args.test_fraction, survey_size=args.survey_size,
        all_pairs=args.all_pairs, streaming=args.streaming,
    )
    print("\n".join(summarize(stats)))


def _hh_relabeled(args: argparse.Namespace) -> None:
    from .hh_rlhf import build_hh_relabeled, summarize

    output = Path(args.output)
    _refuse_overwrite(output, args.overwrite)
    stats = build_hh_relabeled(args.source, output, seed=args.seed, test_fraction=args.test_fraction)
    print("\n".join(summarize(stats)))


def _population(args: argparse.Namespace) -> None:
    from .population import OUTPUT_FILES, PopulationConfig, build_population, parse_attributes, parse_shared_weights, summarize

    output = Path(args.output)
    _refuse_overwrite(output, args.overwrite, OUTPUT_FILES)
    config = PopulationConfig(
        train_users=args.train_users, new_users=args.new_users, pairs_per_user=args.pairs_per_user,
        test_pairs_per_user=args.test_pairs_per_user, context_pairs=args.context_pairs,
        new_test_pairs=args.new_test_pairs, temperature=args.temperature, shared_scale=args.shared_scale,
        spread=args.spread, new_pair_fraction=args.new_pair_fraction, seed=args.seed,
        shared_weights=parse_shared_weights(args.shared_weights), attributes=parse_attributes(args.attributes),
    )
    stats = build_population(output, config, pool=args.pool)
    print("\n".join(summarize(stats, output)))


def _add_population(commands) -> None:
    from .population import PopulationConfig

    defaults = PopulationConfig()
    parser = commands.add_parser("population", help="simulated users with true weights over attributes of real "
                                                     "LLM answers (offline, from the shipped response pool)")
    _add_flag(parser, "output", required=True, help="folder for train/test/new_users.jsonl and users.json")
    _add_flag(parser, "pool", default=None, help="response pool (default: data/population_pool.jsonl.gz)")
    _add_flag(parser, "train_users", type=int, default=defaults.train_users)
    _add_flag(parser, "new_users", type=int, default=defaults.new_users, help="users never seen in training")
    _add_flag(parser, "pairs_per_user", type=int, default=defaults.pairs_per_user,
              help="training pairs of each training user")
    _add_flag(parser, "test_pairs_per_user", type=int, default=defaults.test_pairs_per_user,
              help="held-out pairs of each training user (test.jsonl)")
    _add_flag(parser, "context_pairs", type=int, default=defaults.context_pairs,
              help="labelled context pairs of each new user (the largest K)")
    _add_flag(parser, "new_test_pairs", type=int, default=defaults.new_test_pairs, help="test pairs of each new user")
    _add_flag(parser, "temperature", type=float, default=defaults.temperature,
              help="Bradley-Terry label noise: P(a > b) = sigmoid((u(a) - u(b)) / T)")
    _add_flag(parser, "shared_scale", type=float, default=defaults.shared_scale,
              help="norm of the component of the weights shared by all users")
    _add_flag(parser, "spread", type=float, default=defaults.spread,
              help="expected norm of each user's individual variation")
    _add_flag(parser, "attributes", default=None,
              help=f"comma-separated attributes users weigh (default {','.join(defaults.attributes)}; "
                   "also hedging, caution)")
    _add_flag(parser, "shared_weights", default=None,
              help="the shared component by attribute, e.g. 'specifics=1,hedging=-0.5' (default: drawn from seed)")
    _add_flag(parser, "new_pair_fraction", type=float, default=defaults.new_pair_fraction,
              help="fraction of each prompt's answer pairs reserved for new users")
    _add_flag(parser, "seed", type=int, default=defaults.seed)
    _add_flag(parser, "overwrite", action="store_true", help="replace existing files in --output")
    parser.set_defaults(func=_population)


def _add_ultrafeedback(commands, variant: str) -> None:
    from .ultrafeedback import VARIANTS

    config = VARIANTS[variant]
    users = ", ".join(config["users"])
    parser = commands.add_parser(f"uf-{variant}", help=f"UltraFeedback {config['name']} (users: {users})")
    _add_flag(parser, "ultrafeedback", required=True,
              help="openbmb/UltraFeedback: hub id, JSONL/JSON/parquet file, folder of them or save_to_disk folder")
    _add_flag(parser, "binarized", required=True,
              help="argilla/ultrafeedback-binarized-preferences-cleaned, in the same forms")
    _add_flag(parser, "output", required=True, help="folder for train.jsonl, test.jsonl and survey_pools.json")
    _add_flag(parser, "seed", type=int, default=0)
    _add_flag(parser, "num_context", default=str(config["num_context"]),
              help=f"context pairs per example, K or a range LOW-HIGH (default {config['num_context']})")
    _add_flag(parser, "num_duplicates", type=int, default=config["num_duplicates"],
              help=f"copies of each training example with resampled contexts (default {config['num_duplicates']})")
    _add_flag(parser, "test_fraction", type=float, default=0.1, help="fraction of pairs held out as test")
    _add_flag(parser, "survey_size", type=int, default=100, help="controversial pairs in each user's survey pool")
    _add_flag(parser, "all_pairs", action="store_true", help="keep non-controversial pairs too")
    _add_flag(parser, "streaming", action="store_true", help="stream hub datasets instead of downloading them")
    _add_flag(parser, "overwrite", action="store_true", help="replace existing files in --output")
    parser.set_defaults(func=_ultrafeedback, variant=variant)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vpl_trl.data", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    pets = commands.add_parser("pets", help="synthetic two-user Pets dataset (offline)")
    _add_flag(pets, "output", required=True, help="folder for train.jsonl and test.jsonl")
    _add_flag(pets, "variant", choices=("full", "controversial"), default="full")
    _add_flag(pets, "n_train_per_user", type=int, default=2000)
    _add_flag(pets, "n_test_per_user", type=int, default=200)
    _add_flag(pets, "seed", type=int, default=0)
    _add_flag(pets, "overwrite", action="store_true", help="replace existing files in --output")
    pets.set_defaults(func=_pets)

    for variant in ("p2", "p4"):
        _add_ultrafeedback(commands, variant)

    hh = commands.add_parser("hh-relabeled", help="relabeled HH-RLHF with helpful and harmless users")
    _add_flag(hh, "source", required=True,
              help="a relabeled HH JSONL(.gz) file, or a folder with helpful/, harmless/ (or both/) subfolders")
    _add_flag(hh, "output", required=True, help="folder for train.jsonl and test.jsonl")
    _add_flag(hh, "seed", type=int, default=0)
    _add_flag(hh, "test_fraction", type=float, default=0.1, help="held out as test when the source has one split")
    _add_flag(hh, "overwrite", action="store_true", help="replace existing files in --output")
    hh.set_defaults(func=_hh_relabeled)

    _add_population(commands)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except PreferenceDataError as error:
        raise SystemExit(f"error: {error}") from error


if __name__ == "__main__":
    main(sys.argv[1:])
