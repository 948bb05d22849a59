"""UltraFeedback P-2 and P-4: users who each care about one rated attribute.

Each pair of `argilla/ultrafeedback-binarized-preferences-cleaned` (`prompt`, and `chosen`/`rejected`
as [user, assistant] chats or strings) is joined to `openbmb/UltraFeedback` (`instruction`, and
`completions` with a `response` and `annotations.<attribute>.Rating`): the prompt must equal an
`instruction` and both responses must be among its completions (compared after stripping
whitespace). Pairs with an empty response, identical responses, no match or an `N/A` rating are
skipped and counted.

Every attribute is a user who prefers the response rated higher on it; a tie is broken by a coin
seeded from `seed` and the pair (the row says `tie: true`). P-4 has the four users; P-2 has
`helpfulness` and `honesty` and keeps only the pairs that neither of them rates as a tie. A pair is
`controversial` when its users disagree. Each pair yields one row per user, oriented by that user,
with `satisfied_users`: the users who agree with that orientation.

A seeded `test_fraction` of the pairs is held out as test. A survey of up to `survey_size`
controversial training pairs is drawn once (the same questions for every user); a user's pool is
the survey oriented by that user. A row's `context` is K pairs of its user's pool, never its own
pair, whose satisfied-user sets intersect in that user alone, so the context identifies the user.
Training rows are repeated `num_duplicates` times with resampled contexts, test rows get one.
Defaults: P-2 K=8 and 8 duplicates; P-4 K=4 (enough to tell four users apart, and each pair already
gives four rows) and 4 duplicates.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import random
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm
from transformers.utils import logging

from .context import parse_num_context
from .format import PreferenceDataError, iter_jsonl, write_jsonl

logger = logging.get_logger(__name__)

ATTRIBUTES = ("helpfulness", "honesty", "instruction_following", "truthfulness")
VARIANTS: dict[str, dict[str, Any]] = {
    "p2": {"name": "P-2", "users": ("helpfulness", "honesty"), "num_context": 8, "num_duplicates": 8,
           "drop_ties": True},
    "p4": {"name": "P-4", "users": ATTRIBUTES, "num_context": 4, "num_duplicates": 4, "drop_ties": False},
}
DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".json.gz", ".parquet")
MAX_CONTEXT_TRIES = 1000
MISSING = object()
SURVEY_FILE = "survey_pools.json"
OUTPUT_FILES = ("train.jsonl", "test.jsonl", SURVEY_FILE)

Row = dict[str, Any]


# --- Reading sources -----------------------------------------------------------------------------


def iter_source_rows(source: str | os.PathLike, streaming: bool = False) -> Iterator[tuple[str, Row]]:
    """Yield `(where, row)` from a JSONL/JSON/parquet file, a folder of them (recursively), a
    `save_to_disk` folder or a hub dataset id (its `train` split)."""
    path = Path(source)
    if path.is_file():
        yield from _iter_file(path)
    elif path.is_dir() and ((path / "state.json").exists() or (path / "dataset_dict.json").exists()):
        yield from _iter_rows(_load_saved(path), str(path))
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(DATA_SUFFIXES))
        if not files:
            raise PreferenceDataError(f"{path}: no {', '.join(DATA_SUFFIXES)} files in this folder.")
        for file in files:
            yield from _iter_file(file)
    elif _looks_like_path(str(source)):
        raise PreferenceDataError(f"{source}: no such file or folder.")
    else:
        yield from _iter_rows(_load_hub(str(source), streaming), str(source))


def _looks_like_path(source: str) -> bool:
    """Hub ids are `owner/name`; anything else that does not exist is a missing local path."""
    return source.startswith((".", "/", "~")) or source.count("/") != 1 or source.endswith(DATA_SUFFIXES)


def _iter_rows(rows: Iterable[Any], name: str) -> Iterator[tuple[str, Row]]:
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, Mapping):
            raise PreferenceDataError(f"{name}, row {number}: expected an object, got {type(row).__name__}.")
        yield f"{name}, row {number}", dict(row)


def _iter_file(path: Path) -> Iterator[tuple[str, Row]]:
    if path.name.endswith(".parquet"):
        import pyarrow.parquet as pq

        batches = pq.ParquetFile(path).iter_batches(batch_size=1024)
        yield from _iter_rows((row for batch in batches for row in batch.to_pylist()), str(path))
    elif path.name.endswith((".json", ".json.gz")) and _starts_with_array(path):
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rt", encoding="utf-8") as handle:
            try:
                rows = json.load(handle)
            except json.JSONDecodeError as error:
                raise PreferenceDataError(f"{path}: not valid JSON ({error.msg}, line {error.lineno}).") from None
        yield from _iter_rows(rows, str(path))
    else:
        yield from _iter_jsonl(path)


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Row]]:
    """Stream a JSONL(.gz) file, naming the line of any malformed row."""
    for number, row in iter_jsonl(path):
        yield f"{path}, line {number}", row


def _starts_with_array(path: Path) -> bool:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return handle.read(4096).lstrip().startswith("[")


def _load_saved(path: Path) -> Iterable[Any]:
    from datasets import DatasetDict, load_from_disk

    loaded = load_from_disk(str(path))
    if not isinstance(loaded, DatasetDict):
        return loaded
    if "train" in loaded:
        return loaded["train"]
    if len(loaded) == 1:
        return next(iter(loaded.values()))
    raise PreferenceDataError(f"{path}: expected a `train` split, found {list(loaded)}.")


def _load_hub(name: str, streaming: bool) -> Iterable[Any]:
    from datasets import load_dataset

    try:
        return load_dataset(name, split="train", streaming=streaming)
    except Exception as error:  # network, auth and missing-dataset errors all mean "cannot read it"
        raise PreferenceDataError(
            f"{name}: not a local file or folder, and loading it from the Hugging Face hub failed "
            f"({type(error).__name__}: {error})."
        ) from error


def _field(row: Mapping[str, Any], name: str, where: str, kind: type, expected: str) -> Any:
    if name not in row:
        raise PreferenceDataError(f"{where}: missing field `{name}` (expected {expected}).")
    if not isinstance(row[name], kind):
        raise PreferenceDataError(f"{where}: field `{name}` must be {expected}, got {type(row[name]).__name__}.")
    return row[name]


# --- Joining pairs to ratings --------------------------------------------------------------------


def parse_rating(value: Any, where: str) -> float | int | None:
    """A rating as a number, `None` for `N/A`; anything else is an error."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return value
    if isinstance(value, str):
        text = value.strip()
        if text.upper() == "N/A":
            return None
        try:
            number = float(text)
        except ValueError:
            number = math.nan
        if math.isfinite(number):
            return int(number) if number.is_integer() else number
    raise PreferenceDataError(f"{where}: rating {value!r} is not a number or 'N/A'.")


def raw_ratings(completion: Mapping[str, Any], attributes: Sequence[str]) -> dict[str, Any]:
    """Each attribute's unparsed `annotations.<attribute>.Rating` (MISSING when absent); also reads
    the flat layout without the `annotations` level (columnar files give that level as None)."""
    annotations = completion.get("annotations")
    annotations = completion if annotations is None else annotations
    if not isinstance(annotations, Mapping):
        return dict.fromkeys(attributes, MISSING)
    entries = {attribute: annotations.get(attribute) for attribute in attributes}
    return {a: e.get("Rating", MISSING) if isinstance(e, Mapping) else MISSING for a, e in entries.items()}


def parse_ratings(raw: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Parse the output of `raw_ratings`; a missing or malformed rating is an error naming `where`."""
    ratings = {}
    for attribute, value in raw.items():
        if value is MISSING:
            raise PreferenceDataError(
                f"{where}: missing `annotations.{attribute}.Rating` (expected a rating like '4' or 'N/A')."
            )
        ratings[attribute] = parse_rating(value, f"{where}, `annotations.{attribute}.Rating`")
    return ratings


def index_ultrafeedback(
    rows: Iterable[tuple[str, Row]], attributes: Sequence[str]
) -> dict[tuple[str, str], tuple[str, dict[str, Any]]]:
    """Map stripped `(instruction, response)` to `(where, raw ratings)`; the first occurrence wins.
    Ratings are parsed only for the completions that a pair uses."""
    index: dict[tuple[str, str], tuple[str, dict[str, Any]]] = {}
    for where, row in tqdm(rows, desc="indexing UltraFeedback", unit=" rows", disable=None):
        instruction = _field(row, "instruction", where, str, "a string")
        completions = _field(row, "completions", where, list, "a list of completions")
        for number, completion in enumerate(completions):
            place = f"{where}, completions[{number}]"
            if not isinstance(completion, Mapping) or not isinstance(completion.get("response"), str):
                raise PreferenceDataError(f"{place}: expected an object with a string `response`.")
            key = (instruction.strip(), completion["response"].strip())
            if key not in index:
                index[key] = (place, raw_ratings(completion, attributes))
    return index


def assistant_text(row: Mapping[str, Any], name: str, where: str) -> str:
    """The response in `row[name]`: a string, or the last assistant message of a chat."""
    value = row.get(name)
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        for message in reversed(value):
            if isinstance(message, Mapping) and message.get("role") == "assistant":
                if isinstance(message.get("content"), str):
                    return message["content"]
    raise PreferenceDataError(
        f"{where}: field `{name}` must be a string or a chat ending in "
        f"{{'role': 'assistant', 'content': ...}}, got {value!r:.80}."
    )


@dataclass(frozen=True)
class Pair:
    """A binarized pair (`responses` = its chosen, rejected) with each response's ratings."""

    pair_id: int
    prompt: str
    responses: tuple[str, str]
    ratings: tuple[dict[str, Any], dict[str, Any]]


def join_pairs(
    rows: Iterable[tuple[str, Row]],
    index: Mapping[tuple[str, str], tuple[str, dict[str, Any]]],
    skipped: Counter,
) -> list[Pair]:
    """Join binarized rows to their ratings; `pair_id` is the row's 0-based position. Skips are
    counted in `skipped` by reason."""
    pairs = []
    for pair_id, (where, row) in enumerate(tqdm(rows, desc="joining pairs", unit=" pairs", disable=None)):
        prompt = _field(row, "prompt", where, str, "the user prompt as a string")
        responses = (assistant_text(row, "chosen", where), assistant_text(row, "rejected", where))
        if not all(response.strip() for response in responses):
            skipped["with an empty response"] += 1
            continue
        if responses[0].strip() == responses[1].strip():
            skipped["with identical responses"] += 1
            continue
        matches = [index.get((prompt.strip(), response.strip())) for response in responses]
        if None in matches:
            skipped["with no UltraFeedback match"] += 1
            continue
        ratings = tuple(parse_ratings(raw, place) for place, raw in matches)
        if any(value is None for rating in ratings for value in rating.values()):
            skipped["with an N/A rating"] += 1
            continue
        pairs.append(Pair(pair_id, prompt, responses, ratings))
    return pairs


# --- Users and labels ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelledPair:
    """A pair with each user's preferred response (0 or 1) and the users who rated it a tie."""

    pair: Pair
    winners: dict[str, int]
    ties: frozenset[str]

    @property
    def controversial(self) -> bool:
        return len(set(self.winners.values())) > 1

    def satisfied_users(self, user: str) -> list[str]:
        return [other for other, winner in self.winners.items() if winner == self.winners[user]]

    def oriented(self, user: str) -> dict[str, str]:
        winner = self.winners[user]
        responses = self.pair.responses
        return {"prompt": self.pair.prompt, "chosen": responses[winner], "rejected": responses[1 - winner]}

    def row(self, user: str) -> Row:
        winner = self.winners[user]
        return {
            **self.oriented(user),
            "user_id": user,
            "controversial": self.controversial,
            "satisfied_users": self.satisfied_users(user),
            "tie": user in self.ties,
            "pair_id": self.pair.pair_id,
            "chosen_ratings": self.pair.ratings[winner],
            "rejected_ratings": self.pair.ratings[1 - winner],
        }


def label_pair(pair: Pair, users: Sequence[str], seed: int) -> LabelledPair:
    """Each user prefers the response rated higher on their attribute; ties go to a seeded coin."""
    winners, ties = {}, set()
    for user in users:
        first, second = (ratings[user] for ratings in pair.ratings)
        if first == second:
            ties.add(user)
            winners[user] = random.Random(f"uf-tie-{seed}-{pair.pair_id}-{user}").randrange(2)
        else:
            winners[user] = 0 if first > second else 1
    return LabelledPair(pair, winners, frozenset(ties))


def user_blind_accuracy(pairs: Sequence[LabelledPair]) -> float:
    """Accuracy over users' rows of the best predictor that ignores the user: per pair, the
    orientation most of its users share."""
    total = sum(len(pair.winners) for pair in pairs)
    if not total:
        return math.nan
    return sum(max(Counter(pair.winners.values()).values()) for pair in pairs) / total


# --- Splits, survey and contexts -----------------------------------------------------------------


def held_out_indices(count: int, fraction: float, seed: str) -> set[int]:
    """A seeded `fraction` of `range(count)` (at least one item when `fraction > 0` and `count > 1`)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"test_fraction must be in [0, 1), got {fraction}.")
    order = list(range(count))
    random.Random(seed).shuffle(order)
    size = round(count * fraction)
    if fraction > 0 and count > 1:
        size = max(size, 1)
    return set(order[:size])


def split_pairs(
    pairs: Sequence[LabelledPair], test_fraction: float, seed: int
) -> tuple[list[LabelledPair], list[LabelledPair]]:
    """Train and test pairs, each pair in exactly one of them, in their original order."""
    test = held_out_indices(len(pairs), test_fraction, f"uf-split-{seed}")
    return [p for i, p in enumerate(pairs) if i not in test], [p for i, p in enumerate(pairs) if i in test]


def draw_survey(train: Sequence[LabelledPair], size: int, seed: int) -> list[LabelledPair]:
    """Up to `size` controversial training pairs (seeded), in pair order; warns when fewer exist."""
    controversial = [pair for pair in train if pair.controversial]
    if len(controversial) < size:
        logger.warning(f"only {len(controversial)} controversial training pairs for a survey of {size}; "
                       "the survey pools hold all of them.")
    chosen = random.Random(f"uf-survey-{seed}").sample(controversial, min(size, len(controversial)))
    return sorted(chosen, key=lambda pair: pair.pair.pair_id)


def identifies(pairs: Iterable[LabelledPair], user: str) -> bool:
    """Whether the users satisfied by `user`'s side of every pair come down to `user` alone."""
    common = set.intersection(*(set(pair.satisfied_users(user)) for pair in pairs))
    return common == {user}


def sample_context(
    survey: Sequence[LabelledPair], user: str, pair_id: int, num_context: tuple[int, int], rng: random.Random
) -> list[dict[str, str]]:
    """K pairs of `user`'s survey pool, excluding `pair_id`, that identify the user (resampled up to
    MAX_CONTEXT_TRIES times)."""
    candidates = [pair for pair in survey if pair.pair.pair_id != pair_id]
    low, high = num_context
    if len(candidates) < high:
        raise PreferenceDataError(
            f"pair {pair_id}: the survey pool of user {user!r} has {len(candidates)} other pairs, fewer than "
            f"num_context={high}; lower --num_context or use more data."
        )
    if not identifies(candidates, user):
        raise PreferenceDataError(
            f"pair {pair_id}: no context can identify user {user!r}: another user agrees with it on every "
            "survey pair; use more data or a larger --survey_size."
        )
    for _ in range(MAX_CONTEXT_TRIES):
        picked = rng.sample(candidates, rng.randint(low, high))
        if identifies(picked, user):
            return [pair.oriented(user) for pair in picked]
    raise PreferenceDataError(
        f"pair {pair_id}: no {low}-{high} survey pairs identifying user {user!r} found in {MAX_CONTEXT_TRIES} "
        "draws; raise --num_context."
    )


def iter_examples(
    pairs: Sequence[LabelledPair],
    survey: Sequence[LabelledPair],
    num_context: tuple[int, int],
    duplicates: int,
    seed: int,
    split: str,
) -> Iterator[Row]:
    """One row per pair and user, the whole set repeated `duplicates` times, each with its own context."""
    with tqdm(total=len(pairs) * duplicates, desc=f"{split} contexts", unit=" pairs", disable=None) as progress:
        for copy in range(duplicates):
            for pair in pairs:
                for user in pair.winners:
                    rng = random.Random(f"uf-context-{seed}-{split}-{pair.pair.pair_id}-{user}-{copy}")
                    context = sample_context(survey, user, pair.pair.pair_id, num_context, rng)
                    yield {**pair.row(user), "context": context}
                progress.update()


# --- Building ------------------------------------------------------------------------------------


def _split_stats(pairs: Sequence[LabelledPair], users: Sequence[str], rows: int, copies: int) -> dict[str, Any]:
    return {
        "pairs": len(pairs),
        "rows": rows,
        "rows_per_user": {user: len(pairs) * copies for user in users},
        "controversial_fraction": (sum(p.controversial for p in pairs) / len(pairs)) if pairs else math.nan,
        "user_blind_accuracy": user_blind_accuracy(pairs),
    }


def _write_rows(rows: Iterable[Row], path: Path) -> int:
    """`write_jsonl` through a `.partial` file, so that a failed build leaves no truncated output."""
    partial = path.with_name(path.name + ".partial")
    try:
        count = write_jsonl(rows, partial)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(path)
    return count


def build_ultrafeedback(
    variant: str,
    ultrafeedback: str | os.PathLike,
    binarized: str | os.PathLike,
    output: str | os.PathLike,
    seed: int = 0,
    num_context: int | str | None = None,
    num_duplicates: int | None = None,
    test_fraction: float = 0.1,
    survey_size: int = 100,
    all_pairs: bool = False,
    streaming: bool = False,
) -> dict[str, Any]:
    """Build UltraFeedback `p2` or `p4` into `output` (train.jsonl, test.jsonl, survey_pools.json);
    returns statistics (see `summarize`)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown UltraFeedback variant {variant!r}: expected one of {list(VARIANTS)}.")
    config = VARIANTS[variant]
    users = config["users"]
    context_range = parse_num_context(config["num_context"] if num_context is None else num_context)
    duplicates = config["num_duplicates"] if num_duplicates is None else num_duplicates
    if duplicates < 1:
        raise ValueError(f"num_duplicates must be at least 1, got {duplicates}.")

    skipped: Counter = Counter()
    index = index_ultrafeedback(iter_source_rows(ultrafeedback, streaming), users)
    joined = join_pairs(iter_source_rows(binarized, streaming), index, skipped)
    read = len(joined) + sum(skipped.values())
    labelled = [label_pair(pair, users, seed) for pair in joined]
    if config["drop_ties"]:
        untied = [pair for pair in labelled if not pair.ties]
        skipped[f"tied on {' or '.join(users)}"] += len(labelled) - len(untied)
        labelled = untied
    train, test = split_pairs(labelled, test_fraction, seed)
    survey = draw_survey(train, survey_size, seed)
    if not all_pairs:
        train = [pair for pair in train if pair.controversial]
        test = [pair for pair in test if pair.controversial]
    if not train:
        raise PreferenceDataError(f"{binarized}: no training pairs left to build UltraFeedback {config['name']}.")

    output = Path(output)
    splits = {"train": (train, duplicates), "test": (test, 1)}
    stats: dict[str, Any] = {
        "variant": config["name"], "users": list(users), "read": read, "joined": len(joined), "kept": len(labelled),
        "skipped": dict(sorted(skipped.items())),
        "controversial_fraction": (sum(p.controversial for p in labelled) / len(labelled)) if labelled else math.nan,
        "survey_size": len(survey), "num_context": context_range, "num_duplicates": duplicates,
        "all_pairs": all_pairs, "output": str(output),
    }
    for split, (pairs, copies) in splits.items():
        rows = _write_rows(iter_examples(pairs, survey, context_range, copies, seed, split), output / f"{split}.jsonl")
        stats[split] = _split_stats(pairs, users, rows, copies)
    pools = {user: [{"pair_id": p.pair.pair_id, **p.oriented(user), "satisfied_users": p.satisfied_users(user)}
                    for p in survey] for user in users}
    (output / SURVEY_FILE).write_text(json.dumps(pools, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return stats


def summarize(stats: Mapping[str, Any]) -> list[str]:
    """Human-readable lines for the statistics of `build_ultrafeedback`."""
    low, high = stats["num_context"]
    lines = [f"UltraFeedback {stats['variant']} (users: {', '.join(stats['users'])}): {stats['read']} binarized "
             f"pairs read, {stats['joined']} joined to their ratings, {stats['kept']} kept"]
    lines += [f"skipped {count} pair{'s' if count != 1 else ''} {reason}" for reason, count in stats["skipped"].items()]
    lines.append(f"controversial pairs: {stats['controversial_fraction']:.1%} of the kept pairs")
    lines.append(f"survey: {stats['survey_size']} controversial training pairs per user, "
                 f"contexts of {low if low == high else f'{low}-{high}'} pairs")
    for split in ("train", "test"):
        part = stats[split]
        kind = "" if stats["all_pairs"] else "controversial "
        copies = f" x {stats['num_duplicates']} contexts" if split == "train" else ""
        per_user = ", ".join(f"{user} {count}" for user, count in part["rows_per_user"].items())
        plural = "s" if part["pairs"] != 1 else ""
        lines.append(f"{split}: {part['pairs']} {kind}pair{plural}{copies} -> {part['rows']} rows ({per_user}); "
                     f"controversial {part['controversial_fraction']:.1%}; "
                     f"best user-blind accuracy {part['user_blind_accuracy']:.3f}")
    lines.append(f"wrote {', '.join(OUTPUT_FILES)} to {stats['output']}")
    return lines
