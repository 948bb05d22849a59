"""UKPConvArg1: real crowd workers' judgments of which of two Web arguments is more convincing, as users.

Source: the `UKPConvArg1-full-XML` folder of https://github.com/UKPLab/acl2016-convincing-arguments (CC-BY 4.0;
Habernal & Gurevych, "Which argument is more convincing? Analyzing and predicting convincingness of Web arguments
using bidirectional LSTM", ACL 2016; the arguments come from createdebate.com, CC-BY 3.0, and convinceme.net,
public domain). Each of its 32 XML files is one debate and stance: a `<list>` of `<annotatedArgumentPair>`s,
each with `<id>`, `<arg1>`/`<arg2>` (`<text>`, `<id>`, `<stance>`), `<debateMetaData><title>` and the
`<mTurkAssignments>` of about five workers (`<turkID>`, `<value>`: `a1`, `a2` or `equal`).

Every non-`equal` judgment becomes one row (`equal` ones are dropped): `prompt` ("Human: Which argument is more
convincing?\\nDebate: TITLE\\nStance: STANCE\\n\\nAssistant:", as `population.dialogue_prompt` writes prompts),
`chosen`/`rejected` (the argument texts, stripped, after a space), `user_id` (the worker's turkID), `pair_id`
(the XML pair id), `topic` (the file's stem), `chosen_id`/`rejected_id` (the arguments' ids), `others_majority`
(+1 when most of the pair's other workers with a non-`equal` judgment chose this row's `chosen`, -1 when most
chose its `rejected`, 0 on a tie or when no other worker judged it: the pooled reference a user-blind reward can
at best reach) and `others_count` (those other workers). Workers with at least `min_judgments` non-`equal`
judgments are users; the others still count in `others_majority`.

`build_ukp_conv_arg(xml_dir, output, config)` writes, as `population` does:

- `train.jsonl`: the training users' pairs.
- `test.jsonl`: the training users' held-out pairs, a seeded `test_fraction` of each user's own pairs (never
  among that user's training pairs; the same pair may be in train with another worker's label, as
  `others_majority` reports).
- `new_users.jsonl`: a seeded `new_user_fraction` of the users, whole, never in train or test: one row per test
  pair, each carrying the user's own `context` (`context_pairs` of their pairs in a seeded order: any prefix is a
  valid K-pair context). A new user's context and test pairs are disjoint, and no test pair shares an argument
  text with the context: pairs that do are left out, unless that would leave no test pair, in which case the
  user's test pairs are only pair-disjoint from the context (`test_disjoint` in `users.json` says which).
- `users.json`: the source and its attribution, the settings, the statistics, and every user's split and counts.

`write_sample(xml_dir, output)` cuts the excerpt shipped in `tests/data/ukp_conv_arg_sample`.

Full build (`python -m vpl_trl.data ukp-conv-arg --xml_dir UKPConvArg1-full-XML --output DIR`, the defaults:
`min_judgments` 50, `new_user_fraction` 0.2, `context_pairs` 16, `test_fraction` 0.2, seed 0): 16,927 pairs in
32 files, 84,445 judgments (19,105 `equal`, dropped) by 3,801 workers, of whom 173 are users (138 training, 35
new) with 40,546 judgments: 234.4 per user on average (median 109, from 50 to 3,339). Rows: train 27,135 (14,299
distinct pairs), test 6,781, new_users 5,454 (35 users x 16 context pairs; 616 pairs left out for sharing an
argument with the context; every new user's test pairs argument-disjoint from their context). The other workers'
majority agrees with the row's label on 78.0% (train), 77.5% (test) and 74.0% (new users) of the rows where it is
not a tie (a tie or no other worker: 11-12% of the rows). 26 s and 0.6 GB on a shared 2-core machine; the files
take 94 MB (62 MB of them `new_users.jsonl`, each row carrying its user's context).
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import statistics
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .format import PreferenceDataError, write_jsonl
from .population import dialogue_prompt

OUTPUT_FILES = ("train.jsonl", "test.jsonl", "new_users.jsonl", "users.json")
LABELS = ("a1", "a2")
EQUAL = "equal"
QUESTION = "Which argument is more convincing?"
SOURCE = {
    "dataset": "UKPConvArg1 (UKPConvArg1-full-XML)",
    "repository": "https://github.com/UKPLab/acl2016-convincing-arguments",
    "citation": "Ivan Habernal and Iryna Gurevych. Which argument is more convincing? Analyzing and predicting "
                "convincingness of Web arguments using bidirectional LSTM. ACL 2016.",
    "license": "CC-BY 4.0 (arguments from createdebate.com, CC-BY 3.0, and convinceme.net, public domain)",
}
EXPECTED = ("expected each <annotatedArgumentPair> to hold <id>, <arg1> and <arg2> with <text> and <stance>, "
            "<debateMetaData><title>, and <mTurkAssignments> whose <mTurkAssignment>s each have <turkID> and "
            "<value> (a1, a2 or equal)")


@dataclass
class UKPConvArgConfig:
    """Settings of `build_ukp_conv_arg`, and the options of `python -m vpl_trl.data ukp-conv-arg`."""

    min_judgments: int = field(
        default=50, metadata={"help": "Workers with at least this many non-`equal` judgments are users."}
    )
    new_user_fraction: float = field(
        default=0.2, metadata={"help": "Fraction of the users held out whole as new users (new_users.jsonl)."}
    )
    context_pairs: int = field(
        default=16, metadata={"help": "Each new user's own pairs carried as `context` (any prefix is valid)."}
    )
    test_fraction: float = field(
        default=0.2, metadata={"help": "Fraction of each training user's pairs held out (test.jsonl)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the new users, the held-out pairs and the contexts."})
    max_pairs_per_user: int | None = field(
        default=None, metadata={"help": "Keep at most this many (seeded) pairs of each user; unset: all."}
    )


@dataclass
class ArgumentPair:
    """One `<annotatedArgumentPair>`: its two arguments and the workers' non-`equal` judgments."""

    pair_id: str
    topic: str
    prompt: str
    texts: tuple[str, str]
    arg_ids: tuple[str, str]
    judgments: dict[str, str]  # worker -> "a1" or "a2"
    equal: list[str]  # workers who judged the arguments equal

    def counts(self) -> Counter:
        return Counter(self.judgments.values())


# ----- reading the XML ----------------------------------------------------------------------------------------


def _text(element: ET.Element, path: str, where: str) -> str:
    value = element.findtext(path)
    if value is None or not value.strip():
        tags = "".join(f"<{tag}>" for tag in path.split("/"))
        raise PreferenceDataError(f"{where}: missing or empty {tags}; {EXPECTED}.")
    return value.strip()


def parse_pair(element: ET.Element, topic: str, source: str | os.PathLike, number: int) -> ArgumentPair:
    """The `number`th `<annotatedArgumentPair>` of the file `source`, which errors name, with the pair's id."""
    pair_id = (element.findtext("id") or "").strip()
    if not pair_id:
        raise PreferenceDataError(f"{source}, pair #{number}: missing <id>; {EXPECTED}.")
    where = f"{source}, pair {pair_id}"
    texts = (_text(element, "arg1/text", where), _text(element, "arg2/text", where))
    arg1_id, arg2_id = ((element.findtext(f"{arg}/id") or "").strip() or f"{pair_id}:{arg}" for arg in ("arg1", "arg2"))
    prompt = dialogue_prompt(f"{QUESTION}\nDebate: {_text(element, 'debateMetaData/title', where)}\n"
                             f"Stance: {_text(element, 'arg1/stance', where)}")
    assignments = element.findall("mTurkAssignments/mTurkAssignment")
    if not assignments:
        raise PreferenceDataError(f"{where}: no <mTurkAssignments><mTurkAssignment>; {EXPECTED}.")
    judgments: dict[str, str] = {}
    equal: list[str] = []
    for number, assignment in enumerate(assignments, start=1):
        worker = _text(assignment, "turkID", f"{where}, assignment {number}")
        value = (assignment.findtext("value") or "").strip()
        if value not in (*LABELS, EQUAL):
            raise PreferenceDataError(
                f"{where}, assignment {number} (worker {worker}): <value> must be a1, a2 or equal, got {value!r}."
            )
        if worker in judgments or worker in equal:
            raise PreferenceDataError(f"{where}: worker {worker} judges the pair twice (expected one judgment each).")
        if value == EQUAL:
            equal.append(worker)
        else:
            judgments[worker] = value
    return ArgumentPair(pair_id, topic, prompt, texts, (arg1_id, arg2_id), judgments, equal)


def xml_files(xml_dir: str | os.PathLike) -> list[Path]:
    """The `*.xml` files of `xml_dir`, sorted by name."""
    folder = Path(xml_dir)
    if not folder.is_dir():
        raise PreferenceDataError(f"{folder}: no such folder (expected UKPConvArg1-full-XML with its .xml files).")
    files = sorted(folder.glob("*.xml"))
    if not files:
        raise PreferenceDataError(f"{folder}: no .xml files (expected the UKPConvArg1-full-XML files).")
    return files


def _parse_root(path: Path) -> ET.Element:
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as error:
        raise PreferenceDataError(
            f"{path}: not well-formed XML ({error}); expected a <list> of <annotatedArgumentPair> elements."
        ) from None
    if root.tag != "list" or root.find("annotatedArgumentPair") is None:
        raise PreferenceDataError(
            f"{path}: expected a <list> of <annotatedArgumentPair> elements, got <{root.tag}> without any."
        )
    return root


def read_pairs(xml_dir: str | os.PathLike) -> list[ArgumentPair]:
    """Every pair of every file, in file and document order; errors name the file and the pair."""
    pairs: list[ArgumentPair] = []
    seen: dict[str, Path] = {}
    for path in xml_files(xml_dir):
        for number, element in enumerate(_parse_root(path).findall("annotatedArgumentPair"), start=1):
            pair = parse_pair(element, path.stem, path, number)
            if pair.pair_id in seen:
                raise PreferenceDataError(
                    f"{path}, pair {pair.pair_id}: the pair id is also in {seen[pair.pair_id]} (expected unique ids)."
                )
            seen[pair.pair_id] = path
            pairs.append(pair)
    return pairs


# ----- rows, users and splits ---------------------------------------------------------------------------------


def judgment_row(pair: ArgumentPair, worker: str) -> dict[str, Any]:
    """One worker's judgment of `pair` in our format (see the module docstring)."""
    chosen = LABELS.index(pair.judgments[worker])
    rejected = 1 - chosen
    counts = pair.counts()
    agree = counts[LABELS[chosen]] - 1
    disagree = counts[LABELS[rejected]]
    return {
        "prompt": pair.prompt,
        "chosen": " " + pair.texts[chosen],
        "rejected": " " + pair.texts[rejected],
        "user_id": worker,
        "pair_id": pair.pair_id,
        "topic": pair.topic,
        "chosen_id": pair.arg_ids[chosen],
        "rejected_id": pair.arg_ids[rejected],
        "others_majority": (agree > disagree) - (agree < disagree),
        "others_count": agree + disagree,
    }


def _held_out_size(count: int, fraction: float) -> int:
    """round(count * fraction), at least one when fraction > 0 and count > 1, and never all of them."""
    size = round(count * fraction)
    if fraction > 0 and count > 1:
        size = max(size, 1)
    return min(size, count - 1) if count > 1 else 0


def _check_config(config: UKPConvArgConfig) -> None:
    for name in ("new_user_fraction", "test_fraction"):
        value = getattr(config, name)
        if not 0 <= value < 1:
            raise PreferenceDataError(f"--{name} must be in [0, 1), got {value}.")
    if config.min_judgments < 1 or config.context_pairs < 1:
        raise PreferenceDataError("--min_judgments and --context_pairs must be at least 1, "
                                  f"got {config.min_judgments} and {config.context_pairs}.")
    if config.max_pairs_per_user is not None and config.max_pairs_per_user < 1:
        raise PreferenceDataError(
            f"--max_pairs_per_user must be at least 1 (or unset), got {config.max_pairs_per_user}."
        )
    if config.new_user_fraction > 0:
        fewest = min(config.min_judgments, config.max_pairs_per_user or config.min_judgments)
        if fewest <= config.context_pairs:
            raise PreferenceDataError(
                f"a new user needs --context_pairs {config.context_pairs} context pairs and at least one test pair, "
                f"but may have only {fewest} (--min_judgments, --max_pairs_per_user); raise them or lower "
                "--context_pairs."
            )


def _context_split(pairs: list[ArgumentPair], k: int) -> tuple[list[ArgumentPair], list[ArgumentPair], int, str]:
    """(context, test, left out, disjointness) of a new user's pairs (already in their seeded order)."""
    context, rest = pairs[:k], pairs[k:]
    context_texts = {text for pair in context for text in pair.texts}
    disjoint = [pair for pair in rest if not context_texts.intersection(pair.texts)]
    if disjoint:
        return context, disjoint, len(rest) - len(disjoint), "arguments"
    return context, rest, 0, "pairs"


def build_ukp_conv_arg(xml_dir: str | os.PathLike, output: str | os.PathLike,
                       config: UKPConvArgConfig | None = None) -> dict[str, Any]:
    """Write UKPConvArg1 with its workers as users to `output` (see the module docstring); returns statistics."""
    config = config or UKPConvArgConfig()
    _check_config(config)
    files = xml_files(xml_dir)
    pairs = read_pairs(xml_dir)
    by_worker: dict[str, list[ArgumentPair]] = {}
    for pair in pairs:
        for worker in pair.judgments:
            by_worker.setdefault(worker, []).append(pair)
    users = sorted(worker for worker, judged in by_worker.items() if len(judged) >= config.min_judgments)
    if not users:
        most = max((len(judged) for judged in by_worker.values()), default=0)
        raise PreferenceDataError(
            f"{xml_dir}: no worker has --min_judgments {config.min_judgments} non-equal judgments (the most is "
            f"{most}); lower --min_judgments."
        )
    order = list(users)
    random.Random(f"ukp-new-users-{config.seed}").shuffle(order)
    new_users = set(order[:_held_out_size(len(users), config.new_user_fraction)])

    splits: dict[str, list[dict[str, Any]]] = {"train": [], "test": [], "new_users": []}
    entries: dict[str, dict[str, Any]] = {}
    for user in users:
        rng = random.Random(f"ukp-{config.seed}-{user}")
        judged = list(by_worker[user])
        if config.max_pairs_per_user is not None and len(judged) > config.max_pairs_per_user:
            keep = set(rng.sample(range(len(judged)), config.max_pairs_per_user))
            judged = [pair for i, pair in enumerate(judged) if i in keep]
        shuffled = list(judged)
        rng.shuffle(shuffled)
        entry: dict[str, Any] = {"split": "new" if user in new_users else "train", "judgments": len(by_worker[user]),
                                 "equal": 0, "pairs": len(judged)}
        if user in new_users:
            context, test, left_out, disjoint = _context_split(shuffled, config.context_pairs)
            context_rows = [{k: judgment_row(pair, user)[k] for k in ("prompt", "chosen", "rejected")}
                            for pair in context]
            test_ids = {pair.pair_id for pair in test}
            splits["new_users"] += [{**judgment_row(pair, user), "context": context_rows}
                                    for pair in judged if pair.pair_id in test_ids]
            entry.update(context=len(context), test=len(test), left_out=left_out, test_disjoint=disjoint)
        else:
            held_out = {pair.pair_id for pair in shuffled[:_held_out_size(len(judged), config.test_fraction)]}
            for pair in judged:
                splits["test" if pair.pair_id in held_out else "train"].append(judgment_row(pair, user))
            entry.update(train=len(judged) - len(held_out), test=len(held_out))
        entries[user] = entry
    for pair in pairs:
        for worker in pair.equal:
            if worker in entries:
                entries[worker]["equal"] += 1

    stats = summarize_build(pairs, by_worker, entries, splits, config)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        write_jsonl(rows, output / f"{split}.jsonl")
    users_json = {"source": {**SOURCE, "files": [path.name for path in files]}, "config": asdict(config),
                  "statistics": stats, "users": entries}
    (output / "users.json").write_text(json.dumps(users_json, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return stats


def _agreement(rows: Sequence[Mapping[str, Any]]) -> float:
    """Share of rows whose label the other workers' majority agrees with, among those where it is not a tie."""
    decided = [row["others_majority"] for row in rows if row["others_majority"] != 0]
    return round(sum(m > 0 for m in decided) / len(decided), 4) if decided else math.nan


def summarize_build(pairs: Sequence[ArgumentPair], by_worker: Mapping[str, list], entries: Mapping[str, dict],
                    splits: Mapping[str, list[dict]], config: UKPConvArgConfig) -> dict[str, Any]:
    """The statistics `build_ukp_conv_arg` returns and writes into `users.json`."""
    used = [entry["pairs"] for entry in entries.values()]
    new = [entry for entry in entries.values() if entry["split"] == "new"]
    return {
        "files": len({pair.topic for pair in pairs}),
        "pairs": len(pairs),
        "judgments": sum(len(pair.judgments) + len(pair.equal) for pair in pairs),
        "equal_dropped": sum(len(pair.equal) for pair in pairs),
        "workers": len(by_worker),
        "users": {"train": len(entries) - len(new), "new": len(new)},
        "user_judgments": sum(len(by_worker[user]) for user in entries),
        "pairs_per_user": {"mean": round(statistics.fmean(used), 2), "median": statistics.median(used),
                           "min": min(used), "max": max(used)},
        "rows": {split: len(rows) for split, rows in splits.items()},
        "distinct_pairs": {split: len({row["pair_id"] for row in rows}) for split, rows in splits.items()},
        "new_users": {"context_pairs": config.context_pairs, "left_out": sum(e["left_out"] for e in new),
                      "test_disjoint": dict(Counter(e["test_disjoint"] for e in new))},
        "others_majority_agreement": {split: _agreement(rows) for split, rows in splits.items()},
        "others_majority_tie_or_none": {
            split: round(sum(row["others_majority"] == 0 for row in rows) / len(rows), 4) if rows else math.nan
            for split, rows in splits.items()
        },
    }


def summarize(stats: Mapping[str, Any], output: str | os.PathLike) -> list[str]:
    """Human-readable lines for the statistics of `build_ukp_conv_arg`."""
    users, rows, per_user, new = stats["users"], stats["rows"], stats["pairs_per_user"], stats["new_users"]
    disjoint = ", ".join(f"{count} by {kind}" for kind, count in sorted(new["test_disjoint"].items())) or "none"
    agreement = stats["others_majority_agreement"]
    return [
        f"UKPConvArg1: {stats['pairs']} pairs in {stats['files']} files, {stats['judgments']} judgments "
        f"({stats['equal_dropped']} equal, dropped) by {stats['workers']} workers",
        f"users: {users['train']} training, {users['new']} new ({stats['user_judgments']} judgments; per user mean "
        f"{per_user['mean']}, median {per_user['median']}, {per_user['min']} to {per_user['max']})",
        f"rows: train {rows['train']}, test {rows['test']}, new_users {rows['new_users']} "
        f"({new['context_pairs']} context pairs each; {new['left_out']} pairs left out for sharing an argument "
        f"with the context; test disjoint from the context: {disjoint})",
        "other workers' majority agrees with the label: " + ", ".join(f"{split} {value:.1%}"
                                                                       for split, value in agreement.items()),
        f"wrote {', '.join(OUTPUT_FILES)} to {output}",
    ]


# ----- the shipped excerpt ------------------------------------------------------------------------------------

SAMPLE_FILES = (
    "christianity-or-atheism-_atheism.xml",
    "evolution-vs-creation_evolution.xml",
    "is-porn-wrong-_yes-porn-is-wrong.xml",
)
SAMPLE_DROPPED = ("originalHTML", "description", "reason")


def write_sample(xml_dir: str | os.PathLike, output: str | os.PathLike, files: Iterable[str] = SAMPLE_FILES,
                 pairs_per_file: int = 16, top_workers: int = 24,
                 dropped: Sequence[str] = SAMPLE_DROPPED) -> dict[str, int]:
    """An excerpt of `files` in `xml_dir`: of each file, the `pairs_per_file` pairs with the most non-equal
    judgments by the `top_workers` workers who judge most in those files (ties: document order), kept in
    document order with the elements `dropped` (bulky, unused by the builder) removed. Returns the pairs written
    per file. `tests/data/ukp_conv_arg_sample` is `write_sample(".../UKPConvArg1-full-XML", ...)`."""
    files = list(files)
    roots = {name: _parse_root(Path(xml_dir) / name) for name in files}
    counts: Counter = Counter()
    for name, root in roots.items():
        for number, element in enumerate(root.findall("annotatedArgumentPair"), start=1):
            counts.update(parse_pair(element, Path(name).stem, name, number).judgments.keys())
    top = {worker for worker, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:top_workers]}
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, root in roots.items():
        elements = root.findall("annotatedArgumentPair")
        scores = [len(top.intersection(parse_pair(e, name, name, n).judgments)) for n, e in enumerate(elements, 1)]
        keep = set(sorted(range(len(elements)), key=lambda i: (-scores[i], i))[:pairs_per_file])
        excerpt = ET.Element("list")
        for i in sorted(keep):
            element = copy.deepcopy(elements[i])
            for tag in dropped:
                for parent in element.iter():
                    for child in parent.findall(tag):
                        parent.remove(child)
            excerpt.append(element)
        ET.indent(excerpt, space="  ")
        ET.ElementTree(excerpt).write(output / name, encoding="utf-8", xml_declaration=True)
        written[name] = len(keep)
    return written
