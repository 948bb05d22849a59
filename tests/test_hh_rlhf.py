"""Relabeled HH-RLHF loader, on a small fixture and on the real test-split sample."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest

from vpl_trl.data import read_jsonl, write_jsonl
from vpl_trl.data.__main__ import main
from vpl_trl.data.hh_rlhf import build_hh_relabeled

# 300 rows of the public relabeled test split, with both of its pairs with identical responses (see tests/data).
REAL_SAMPLE = Path(__file__).resolve().parent / "data" / "relabeled_hh_rlhf"


def hh_row(n: int, objective: str, label: int, responses: tuple[str, str] | None = None, **extra) -> dict:
    """A row in the public relabeled schema: `chosen` is the dialogue ending in responses[label]."""
    prompt = f"Human: Question {n}?\n\nAssistant: Which one?\n\nHuman: Number {n}."
    responses = responses or (f"Careful answer {n}.", f"Bold answer {n}.")
    dialogue = [f"{prompt}\n\nAssistant: {response}" for response in responses]
    return {"chosen": dialogue[label], "rejected": dialogue[1 - label], "Index": n, "data_subset": "harmless",
            "prompt": prompt, "responses": list(responses), "original_label": 0, "objective": objective,
            "label": label, **extra}


def write_gz(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """helpful/ and harmless/ with train and test files; pair 0 is labelled by both objectives
    differently, pair 1 the same way; both/ repeats them and must be ignored."""
    root = tmp_path / "relabeled"
    helpful_train = [hh_row(0, "helpful", 1), hh_row(1, "helpful", 0)]
    helpful_train += [hh_row(n, "helpful", n % 2) for n in range(10, 16)]
    harmless_train = [hh_row(0, "harmless", 0), hh_row(1, "harmless", 0)]
    harmless_train += [hh_row(n, "harmless", 0) for n in range(20, 24)]
    write_gz(helpful_train, root / "helpful" / "train.jsonl.gz")
    identical = hh_row(31, "helpful", 0, ("Same.", "Same."))
    write_gz([hh_row(30, "helpful", 1), identical], root / "helpful" / "test.jsonl.gz")
    write_jsonl(harmless_train, root / "harmless" / "train.jsonl")
    mislabelled = hh_row(41, "harmless", 1)
    mislabelled["label"] = 0
    write_gz([hh_row(40, "harmless", 1), mislabelled], root / "harmless" / "test.jsonl.gz")
    write_gz(helpful_train + harmless_train, root / "both" / "train.jsonl.gz")
    return root


def test_folder_rows_users_and_controversy(folder, tmp_path, capsys):
    main(["hh-relabeled", "--source", str(folder), "--output", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert "skipped 1 row with identical chosen and rejected responses" in out
    assert "skipped 1 row whose chosen response is not responses[label]" in out
    assert "train: 14 rows (helpful 8, harmless 6)" in out and "test: 2 rows (helpful 1, harmless 1)" in out
    train = read_jsonl(tmp_path / "out" / "train.jsonl")
    test = read_jsonl(tmp_path / "out" / "test.jsonl")
    assert [row["source_index"] for row in test] == [30, 40]
    for row in train + test:
        n = row["source_index"]
        source = hh_row(n, row["user_id"], row["label"])
        assert row["prompt"].endswith("\n\nAssistant:") and row["prompt"] + row["chosen"] == source["chosen"]
        assert row["prompt"] + row["rejected"] == source["rejected"]
        assert row["chosen"] == " " + source["responses"][row["label"]]
        assert (row["data_subset"], row["original_label"]) == ("harmless", 0)
        if n == 0:
            assert row["controversial"] is True and row["satisfied_users"] == [row["user_id"]]
        elif n == 1:
            assert row["controversial"] is False and row["satisfied_users"] == ["helpful", "harmless"]
        else:
            assert row["controversial"] is None and row["satisfied_users"] is None
    assert "controversial: 2 of the 4 rows whose pair both objectives labelled" in out


def test_single_file_is_split_by_pair_and_seed(folder, tmp_path):
    source = folder / "both" / "train.jsonl.gz"
    outputs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        stats = build_hh_relabeled(source, tmp_path / name, seed=seed, test_fraction=0.3)
        assert stats["held_out_by_seed"]
        outputs[name] = [(tmp_path / name / f"{split}.jsonl").read_bytes() for split in ("train", "test")]
    assert outputs["a"] == outputs["b"] and outputs["a"] != outputs["c"]
    train, test = (read_jsonl(tmp_path / "a" / f"{split}.jsonl") for split in ("train", "test"))
    pairs = [{(row["prompt"], frozenset((row["chosen"], row["rejected"]))) for row in rows} for rows in (train, test)]
    assert not pairs[0] & pairs[1]
    assert len(pairs[1]) == round(0.3 * 12) and len(train) + len(test) == 14


def test_refuses_to_overwrite_and_reports_bad_rows(folder, tmp_path):
    args = ["hh-relabeled", "--source", str(folder), "--output", str(tmp_path / "out")]
    main(args)
    with pytest.raises(SystemExit, match="pass --overwrite"):
        main(args)
    main(args + ["--overwrite"])
    bad = hh_row(5, "helpful", 0)
    del bad["objective"]
    write_jsonl([hh_row(4, "helpful", 0), bad], tmp_path / "bad.jsonl")
    with pytest.raises(SystemExit, match=r"bad.jsonl, row 2: field `objective` must be one of"):
        main(["hh-relabeled", "--source", str(tmp_path / "bad.jsonl"), "--output", str(tmp_path / "bad")])
    write_jsonl([hh_row(4, "helpful", 0, chosen="Human: hi\n\nHuman: again")], tmp_path / "bad.jsonl")
    with pytest.raises(SystemExit, match=r"row 1: `chosen` and `rejected` share no prefix ending in"):
        main(["hh-relabeled", "--source", str(tmp_path / "bad.jsonl"), "--output", str(tmp_path / "bad")])
    write_gz([hh_row(4, "harmless", 0)], tmp_path / "mixed" / "helpful" / "test.jsonl.gz")
    with pytest.raises(SystemExit, match="objective 'harmless' in the helpful/ folder"):
        main(["hh-relabeled", "--source", str(tmp_path / "mixed"), "--output", str(tmp_path / "bad")])


def test_real_relabeled_sample(tmp_path, capsys):
    raw = [
        row for objective in ("helpful", "harmless") for row in read_jsonl(REAL_SAMPLE / objective / "test.jsonl.gz")
    ]
    assert Counter(row["objective"] for row in raw) == {"helpful": 150, "harmless": 150}
    usable = Counter(row["objective"] for row in raw if row["chosen"] != row["rejected"])
    main(["hh-relabeled", "--source", str(REAL_SAMPLE), "--output", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert "skipped 2 rows with identical chosen and rejected responses" in out
    assert "no pair labelled under both objectives" in out  # each pair of the public sample has one objective
    rows = {split: read_jsonl(tmp_path / "out" / f"{split}.jsonl") for split in ("train", "test")}
    assert Counter(row["user_id"] for split in rows.values() for row in split) == usable
    assert len(rows["test"]) == round(0.1 * sum(usable.values()))
    sources = {(row["objective"], row["Index"]): row for row in raw}
    for row in rows["train"] + rows["test"]:
        source = sources[row["user_id"], row["source_index"]]
        assert row["prompt"].endswith("\n\nAssistant:")
        assert (row["prompt"] + row["chosen"], row["prompt"] + row["rejected"]) == (
            source["chosen"], source["rejected"]
        )
        assert row["chosen"] == " " + source["responses"][row["label"]]
        assert row["controversial"] is None and row["satisfied_users"] is None
