"""Dataset builders: `python -m vpl_trl.data {pets,...} --output DIR`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _add_flag(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    """Register `--name_with_underscores` and `--name-with-dashes` as one option."""
    spellings = {f"--{name}", f"--{name.replace('_', '-')}"}
    parser.add_argument(*sorted(spellings), dest=name, **kwargs)


def _refuse_overwrite(output: Path, overwrite: bool) -> None:
    existing = [p.name for p in (output / "train.jsonl", output / "test.jsonl") if p.exists()]
    if existing and not overwrite:
        raise SystemExit(f"error: {output} already holds {', '.join(existing)}; pass --overwrite to replace them.")


def _pets(args: argparse.Namespace) -> None:
    from .pets import build_pets

    output = Path(args.output)
    _refuse_overwrite(output, args.overwrite)
    counts = build_pets(output, variant=args.variant, n_train_per_user=args.n_train_per_user,
                        n_test_per_user=args.n_test_per_user, seed=args.seed)
    print(f"Pets ({args.variant}): wrote {counts['train']} train and {counts['test']} test rows to {output}")


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
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])
