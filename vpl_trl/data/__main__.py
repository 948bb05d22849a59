"""Dataset builders: `python -m vpl_trl.data {pets,uf-p2,uf-p4,hh-relabeled,population,ukp-conv-arg} --output DIR`.

Each command's flags are the fields of its dataclasses, parsed by `transformers.HfArgumentParser` as the recipes'
are (`--flag_name` or `--flag-name`); `population` takes every field of `PopulationConfig`, `ukp-conv-arg`
`--xml_dir` and every field of `UKPConvArgConfig`.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from argparse import Namespace
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from transformers import HfArgumentParser

from . import hh_rlhf, pets, population, ukp_conv_arg, ultrafeedback
from .format import PreferenceDataError
from .population import PopulationConfig
from .ukp_conv_arg import UKPConvArgConfig

SPLIT_FILES = ("train.jsonl", "test.jsonl")


@dataclass
class OutputArguments:
    output: str = field(metadata={"help": "Folder for the data set's files."})
    overwrite: bool = field(default=False, metadata={"help": "Replace existing files in --output."})


@dataclass
class PetsArguments:
    variant: Literal["full", "controversial"] = field(
        default="full", metadata={"help": "`controversial`: only the pairs the two users label differently."}
    )
    n_train_per_user: int = field(default=2000, metadata={"help": "Training pairs of each user."})
    n_test_per_user: int = field(default=200, metadata={"help": "Test pairs of each user."})
    seed: int = field(default=0, metadata={"help": "Seed of the pairs."})


@dataclass
class UltraFeedbackArguments:
    ultrafeedback: str = field(
        metadata={"help": "openbmb/UltraFeedback: hub id, JSONL/JSON/parquet file, folder of them or save_to_disk "
                          "folder."}
    )
    binarized: str = field(
        metadata={"help": "argilla/ultrafeedback-binarized-preferences-cleaned, in the same forms."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the labels, the split and the contexts."})
    num_context: str | None = field(
        default=None, metadata={"help": "Context pairs per example, K or a range LOW-HIGH; unset: 8 for uf-p2, 4 "
                                        "for uf-p4."}
    )
    num_duplicates: int | None = field(
        default=None, metadata={"help": "Copies of each training example with resampled contexts; unset: 8 for "
                                        "uf-p2, 4 for uf-p4."}
    )
    test_fraction: float = field(default=0.1, metadata={"help": "Fraction of pairs held out as test."})
    survey_size: int = field(default=100, metadata={"help": "Controversial pairs in each user's survey pool."})
    all_pairs: bool = field(default=False, metadata={"help": "Keep non-controversial pairs too."})
    streaming: bool = field(default=False, metadata={"help": "Stream hub datasets instead of downloading them."})


@dataclass
class HHRelabeledArguments:
    source: str = field(
        metadata={"help": "A relabeled HH JSONL(.gz) file, or a folder with helpful/, harmless/ (or both/) "
                          "subfolders."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the split."})
    test_fraction: float = field(
        default=0.1, metadata={"help": "Held out as test when the source has one split."}
    )


@dataclass
class PoolArguments:
    pool: str | None = field(
        default=None, metadata={"help": "Response pool; unset: the shipped data/population_pool.jsonl.gz."}
    )


@dataclass
class UKPSourceArguments:
    xml_dir: str = field(
        metadata={"help": "UKPConvArg1-full-XML (from github.com/UKPLab/acl2016-convincing-arguments): its .xml files."}
    )


def _pets(output: Path, args: PetsArguments) -> str:
    counts = pets.build_pets(output, variant=args.variant, n_train_per_user=args.n_train_per_user,
                             n_test_per_user=args.n_test_per_user, seed=args.seed)
    return f"Pets ({args.variant}): wrote {counts['train']} train and {counts['test']} test rows to {output}"


def _ultrafeedback(variant: str, output: Path, args: UltraFeedbackArguments) -> str:
    stats = ultrafeedback.build_ultrafeedback(variant, output=output, **dataclasses.asdict(args))
    return "\n".join(ultrafeedback.summarize(stats))


def _hh_relabeled(output: Path, args: HHRelabeledArguments) -> str:
    stats = hh_rlhf.build_hh_relabeled(args.source, output, seed=args.seed, test_fraction=args.test_fraction)
    return "\n".join(hh_rlhf.summarize(stats))


def _population(output: Path, pool: PoolArguments, config: PopulationConfig) -> str:
    stats = population.build_population(output, config, pool=pool.pool)
    return "\n".join(population.summarize(stats, output))


def _ukp_conv_arg(output: Path, source: UKPSourceArguments, config: UKPConvArgConfig) -> str:
    stats = ukp_conv_arg.build_ukp_conv_arg(source.xml_dir, output, config)
    return "\n".join(ukp_conv_arg.summarize(stats, output))


@dataclass(frozen=True)
class Command:
    """A builder: its help, the dataclasses of its flags after `OutputArguments`, the function that builds into
    `--output` from them (and returns what to print), and the files it refuses to overwrite."""

    help: str
    arguments: tuple[type, ...]
    build: Callable[..., str]
    files: tuple[str, ...] = SPLIT_FILES


def _ultrafeedback_command(variant: str) -> Command:
    config = ultrafeedback.VARIANTS[variant]
    return Command(f"UltraFeedback {config['name']} (users: {', '.join(config['users'])})",
                   (UltraFeedbackArguments,), functools.partial(_ultrafeedback, variant), ultrafeedback.OUTPUT_FILES)


COMMANDS = {
    "pets": Command("synthetic two-user Pets dataset (offline)", (PetsArguments,), _pets),
    "uf-p2": _ultrafeedback_command("p2"),
    "uf-p4": _ultrafeedback_command("p4"),
    "hh-relabeled": Command("relabeled HH-RLHF with helpful and harmless users", (HHRelabeledArguments,),
                            _hh_relabeled),
    "population": Command("simulated users with true weights over attributes of real LLM answers (offline, from "
                          "the shipped response pool)", (PoolArguments, PopulationConfig), _population,
                          population.OUTPUT_FILES),
    "ukp-conv-arg": Command("UKPConvArg1: crowd workers' judgments of which argument is more convincing, workers as "
                            "users, some held out whole as new users (--xml_dir UKPConvArg1-full-XML)",
                            (UKPSourceArguments, UKPConvArgConfig), _ukp_conv_arg, ukp_conv_arg.OUTPUT_FILES),
}


def make_parser() -> HfArgumentParser:
    parser = HfArgumentParser(prog="python -m vpl_trl.data", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=HfArgumentParser)
    for name, command in COMMANDS.items():
        commands.add_parser(name, help=command.help, dataclass_types=(OutputArguments, *command.arguments))
    return parser


def _as_dataclass(namespace: Namespace, dataclass_type: type):
    """`dataclass_type` from the parsed flags (its `__post_init__` checks them, as in `HfArgumentParser`)."""
    return dataclass_type(**{f.name: getattr(namespace, f.name) for f in dataclasses.fields(dataclass_type) if f.init})


def main(argv: list[str] | None = None) -> None:
    namespace = make_parser().parse_args(argv)
    command = COMMANDS[namespace.command]
    try:
        files = _as_dataclass(namespace, OutputArguments)
        arguments = [_as_dataclass(namespace, dataclass_type) for dataclass_type in command.arguments]
        output = Path(files.output)
        existing = [name for name in command.files if (output / name).exists()]
        if existing and not files.overwrite:
            raise SystemExit(f"error: {output} already holds {', '.join(existing)}; pass --overwrite to replace them.")
        print(command.build(output, *arguments))
    except PreferenceDataError as error:
        raise SystemExit(f"error: {error}") from error


if __name__ == "__main__":
    main(sys.argv[1:])
