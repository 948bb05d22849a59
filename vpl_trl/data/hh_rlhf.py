"""Relabeled HH-RLHF: the `helpful` and the `harmless` user.

Source rows (JSONL, optionally gzip) hold `chosen` and `rejected` (whole `Human:`/`Assistant:`
dialogues), `prompt`, `responses`, `label` (the relabeled choice among `responses`),
`original_label`, `objective` (`helpful` or `harmless`: the labeller's objective, our `user_id`),
`data_subset` and `Index`. The source is one file, or a folder with `helpful/` and `harmless/`
subfolders (or only `both/`, their union; it is read only when neither of the others exists)
holding `train` and/or `test` files (`.jsonl` or `.jsonl.gz`), or such files directly.

Each row becomes `prompt` (the shared dialogue prefix, up to and including its last
`"\\n\\nAssistant:"`) and the `chosen`/`rejected` responses after it, so prompt + response gives the
dialogue back. Kept source fields: `data_subset`, `label`, `original_label` and `Index` (as
`source_index`). Rows with identical responses, or whose chosen response is not `responses[label]`,
are skipped and counted.

`controversial` (the two objectives prefer different responses) and `satisfied_users` are set
only for pairs (same prompt and responses) labelled under both objectives; elsewhere they are
`null`, not guessed. In the public test sample each pair carries one objective only, so they are
`null` throughout there. When the source has a single split, a seeded `test_fraction` of the pairs is
held out as test.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .format import PreferenceDataError, read_jsonl, write_jsonl
from .ultrafeedback import held_out_indices

OBJECTIVES = ("helpful", "harmless")
SPLITS = ("train", "test")
TURN = "\n\nAssistant:"
SUFFIXES = (".jsonl", ".jsonl.gz")

Row = dict[str, Any]


def find_source_files(source: str | os.PathLike) -> list[tuple[str | None, Path]]:
    """`(split, file)` for a file (split None) or a relabeled HH folder; see the module docstring."""
    source = Path(source)
    if source.is_file():
        return [(None, source)]
    if not source.is_dir():
        raise PreferenceDataError(f"{source}: no such file or folder.")
    folders = [source / name for name in OBJECTIVES if (source / name).is_dir()]
    if not folders:
        folders = [source / "both"] if (source / "both").is_dir() else [source]
    files = [(split, folder / f"{split}{suffix}") for folder in folders for split in SPLITS for suffix in SUFFIXES]
    files = [(split, file) for split, file in files if file.is_file()]
    if not files:
        raise PreferenceDataError(
            f"{source}: expected train/test .jsonl(.gz) files, in it or in helpful/, harmless/ or both/ subfolders."
        )
    return files


def split_dialogue(chosen: str, rejected: str, where: str) -> tuple[str, str, str]:
    """`(prompt, chosen response, rejected response)`: cut after the last `TURN` the dialogues share."""
    shared = os.path.commonprefix([chosen, rejected])
    cut = shared.rfind(TURN)
    if cut < 0:
        raise PreferenceDataError(
            f"{where}: `chosen` and `rejected` share no prefix ending in '\\n\\nAssistant:' "
            "(expected two Human:/Assistant: dialogues that differ in the last assistant turn)."
        )
    cut += len(TURN)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _text(row: Row, name: str, where: str) -> str:
    value = row.get(name)
    if not isinstance(value, str):
        got = "nothing" if value is None else type(value).__name__
        raise PreferenceDataError(f"{where}: field `{name}` must be a dialogue string, got {got}.")
    return value


def _labelled_response(row: Row, where: str) -> str | None:
    """`responses[label]`, when the row has both fields."""
    responses, label = row.get("responses"), row.get("label")
    if responses is None or label is None:
        return None
    if not isinstance(label, int) or isinstance(label, bool) or not isinstance(responses, list) \
            or not 0 <= label < len(responses):
        raise PreferenceDataError(f"{where}: `label` must index `responses` (got label {label!r}).")
    return responses[label]


def convert_row(row: Row, where: str, folder_objective: str | None) -> Row | str:
    """One source row in our format, or the reason to skip it."""
    objective = row.get("objective")
    if objective not in OBJECTIVES:
        raise PreferenceDataError(f"{where}: field `objective` must be one of {list(OBJECTIVES)}, got {objective!r}.")
    if folder_objective and objective != folder_objective:
        raise PreferenceDataError(f"{where}: objective {objective!r} in the {folder_objective}/ folder.")
    prompt, chosen, rejected = split_dialogue(_text(row, "chosen", where), _text(row, "rejected", where), where)
    if chosen.strip() == rejected.strip():
        return "with identical chosen and rejected responses"
    labelled = _labelled_response(row, where)
    if labelled is not None and labelled.strip() != chosen.strip():
        return "whose chosen response is not responses[label]"
    return {
        "prompt": prompt,
        "chosen": chosen,
        "rejected": rejected,
        "user_id": objective,
        "controversial": None,
        "satisfied_users": None,
        "data_subset": row.get("data_subset"),
        "label": row.get("label"),
        "original_label": row.get("original_label"),
        "source_index": row.get("Index"),
    }


def pair_key(row: Row) -> tuple[str, frozenset[str]]:
    return row["prompt"], frozenset((row["chosen"], row["rejected"]))


def mark_controversial(rows: Sequence[Row]) -> int:
    """Fill `controversial`/`satisfied_users` for pairs labelled under every objective (each with one
    label); returns how many rows got them."""
    chosen_by_pair: dict[tuple, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for row in rows:
        chosen_by_pair[pair_key(row)][row["user_id"]].add(row["chosen"])
    determined = 0
    for row in rows:
        labels = chosen_by_pair[pair_key(row)]
        if len(labels) == len(OBJECTIVES) and all(len(chosen) == 1 for chosen in labels.values()):
            row["controversial"] = len({next(iter(chosen)) for chosen in labels.values()}) > 1
            row["satisfied_users"] = [user for user in OBJECTIVES if labels[user] == {row["chosen"]}]
            determined += 1
    return determined


def split_by_pair(rows: Sequence[Row], test_fraction: float, seed: int) -> dict[str, list[Row]]:
    """Hold out a seeded fraction of the distinct pairs (all their rows) as test."""
    keys = list(dict.fromkeys(pair_key(row) for row in rows))
    test_keys = {keys[i] for i in held_out_indices(len(keys), test_fraction, f"hh-split-{seed}")}
    return {split: [row for row in rows if (pair_key(row) in test_keys) == (split == "test")] for split in SPLITS}


def load_relabeled(source: str | os.PathLike, skipped: Counter) -> tuple[list[tuple[str | None, Row]], list[Path]]:
    """`(split, row)` for every kept source row, and the files read."""
    files = find_source_files(source)
    rows = []
    for split, path in files:
        folder_objective = path.parent.name if path.parent.name in OBJECTIVES else None
        for number, raw in enumerate(read_jsonl(path), start=1):
            converted = convert_row(raw, f"{path}, row {number}", folder_objective)
            if isinstance(converted, str):
                skipped[converted] += 1
            else:
                rows.append((split, converted))
    return rows, [path for _, path in files]


def build_hh_relabeled(
    source: str | os.PathLike, output: str | os.PathLike, seed: int = 0, test_fraction: float = 0.1
) -> dict[str, Any]:
    """Write relabeled HH-RLHF as train.jsonl and test.jsonl to `output`; returns statistics."""
    skipped: Counter = Counter()
    loaded, files = load_relabeled(source, skipped)
    if not loaded:
        raise PreferenceDataError(f"{source}: no usable rows.")
    rows = [row for _, row in loaded]
    determined = mark_controversial(rows)
    given = {split for split, _ in loaded}
    if given == set(SPLITS):
        splits = {split: [row for s, row in loaded if s == split] for split in SPLITS}
    else:
        splits = split_by_pair(rows, test_fraction, seed)
    output = Path(output)
    for split, split_rows in splits.items():
        write_jsonl(split_rows, output / f"{split}.jsonl")
    return {
        "files": [str(path) for path in files],
        "rows": len(rows),
        "skipped": dict(sorted(skipped.items())),
        "held_out_by_seed": given != set(SPLITS),
        "test_fraction": test_fraction,
        "seed": seed,
        "controversial_determined": determined,
        "controversial": sum(bool(row["controversial"]) for row in rows),
        "rows_per_user": {split: dict(Counter(row["user_id"] for row in part)) for split, part in splits.items()},
        "output": str(output),
    }


def summarize(stats: dict[str, Any]) -> list[str]:
    """Human-readable lines for the statistics of `build_hh_relabeled`."""
    lines = [f"Relabeled HH-RLHF: {stats['rows']} rows kept from {len(stats['files'])} file(s)"]
    lines += [f"skipped {count} row{'s' if count != 1 else ''} {reason}" for reason, count in stats["skipped"].items()]
    if stats["held_out_by_seed"]:
        lines.append(f"one split in the source: held out {stats['test_fraction']:.0%} of the pairs as test "
                     f"(seed {stats['seed']})")
    if stats["controversial_determined"]:
        lines.append(f"controversial: {stats['controversial']} of the {stats['controversial_determined']} rows "
                     "whose pair both objectives labelled (null on the others)")
    else:
        lines.append("controversial: not determinable (no pair labelled under both objectives); left null")
    for split, counts in stats["rows_per_user"].items():
        per_user = ", ".join(f"{user} {counts.get(user, 0)}" for user in OBJECTIVES)
        lines.append(f"{split}: {sum(counts.values())} rows ({per_user})")
    lines.append(f"wrote train.jsonl, test.jsonl to {stats['output']}")
    return lines
