"""UKPConvArg1 builder, on the excerpt shipped in tests/data/ukp_conv_arg_sample (no model: fast)."""

from __future__ import annotations

import json
import re
import shutil
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import pytest

from vpl_trl.data import PreferenceDataError, load_preference_splits, read_jsonl
from vpl_trl.data.__main__ import main
from vpl_trl.data.population import has_true_weights
from vpl_trl.data.ukp_conv_arg import OUTPUT_FILES, UKPConvArgConfig, build_ukp_conv_arg, read_pairs

# 48 pairs (16 from each of 3 files), cut by `write_sample` (see its ATTRIBUTION.md).
SAMPLE = Path(__file__).resolve().parent / "data" / "ukp_conv_arg_sample"
# the sample has 15 workers with at least 5 non-equal judgments: 12 training users and 3 new ones
CONFIG = dict(min_judgments=5, context_pairs=4, test_fraction=0.25)
NEW_USERS = {"A1CF6U3GF7DZEJ", "A1PMKPD5QEU891", "A3LW8MS4WAPT4S"}


def build(folder: Path, **changes) -> dict:
    return build_ukp_conv_arg(SAMPLE, folder, UKPConvArgConfig(**{**CONFIG, **changes}))


def pair_texts(row: dict) -> frozenset[str]:
    return frozenset((row["chosen"], row["rejected"]))


def test_sample_users_and_splits(tmp_path):
    stats = build(tmp_path)
    assert (stats["files"], stats["pairs"], stats["judgments"], stats["equal_dropped"], stats["workers"]) == (
        3, 48, 240, 11, 75)
    assert stats["users"] == {"train": 12, "new": 3} and stats["user_judgments"] == 145
    assert stats["rows"] == {"train": 86, "test": 29, "new_users": 16}
    assert stats["new_users"] == {"context_pairs": 4, "left_out": 2, "test_disjoint": {"arguments": 2, "pairs": 1}}
    data = load_preference_splits(tmp_path)  # the project's reader validates every row and context
    assert {split: len(rows) for split, rows in data.items()} == stats["rows"]
    users = json.loads((tmp_path / "users.json").read_text())
    assert users["source"]["license"].startswith("CC-BY 4.0") and users["config"]["min_judgments"] == 5
    assert {user for user, entry in users["users"].items() if entry["split"] == "new"} == NEW_USERS

    train, test, new = (read_jsonl(tmp_path / f"{split}.jsonl") for split in ("train", "test", "new_users"))
    training_users = {row["user_id"] for row in train}
    assert len(training_users) == 12 and {row["user_id"] for row in test} <= training_users
    assert {row["user_id"] for row in new} == NEW_USERS and not NEW_USERS & training_users  # whole users
    for user in training_users:  # each held-out pair is never among the user's own training pairs
        own = [{row["pair_id"] for row in rows if row["user_id"] == user} for rows in (train, test)]
        assert own[0] and not own[0] & own[1]
        entry = users["users"][user]
        assert (len(own[0]), len(own[1])) == (entry["train"], entry["test"])
    for user in NEW_USERS:
        rows = [row for row in new if row["user_id"] == user]
        context = rows[0]["context"]
        assert len(context) == 4 and all(row["context"] == context for row in rows)
        assert all(row["prompt"].startswith("Human: Which argument is more convincing?\nDebate: ") for row in context)
        assert not {pair_texts(c) for c in context} & {pair_texts(row) for row in rows}  # disjoint pairs
        context_texts = {text for c in context for text in (c["chosen"], c["rejected"])}
        shared = [row for row in rows if context_texts & pair_texts(row)]
        entry = users["users"][user]
        assert entry["test"] == len(rows) and entry["context"] + entry["test"] + entry["left_out"] == entry["pairs"]
        # no test pair shares an argument with the context where that leaves a test pair; else pairs only
        assert (entry["test_disjoint"], bool(shared)) in {("arguments", False), ("pairs", True)}
    assert users["users"]["A1PMKPD5QEU891"]["test_disjoint"] == "pairs"


def test_rows_equal_dropped_and_others_majority(tmp_path):
    build(tmp_path)
    rows = [row for split in ("train", "test", "new_users") for row in read_jsonl(tmp_path / f"{split}.jsonl")]
    by_key = {(row["user_id"], row["pair_id"]): row for row in rows}
    # arg613494_arg231487: a1 by A29H76PRANC3J7 and A2S3B5GB2BC8CP (not a user); a2 by A38RMN9ZMNHWDV (not a
    # user), ADUJUZANFOWKW and A23AATS9XFHHZM
    first = by_key["A29H76PRANC3J7", "arg613494_arg231487"]
    assert first["chosen_id"] == "arg613494" and first["rejected_id"] == "arg231487"
    assert (first["others_majority"], first["others_count"]) == (-1, 4)  # 1 other agrees, 3 chose the rejected
    for user in ("ADUJUZANFOWKW", "A23AATS9XFHHZM"):  # 2 others agree, 2 disagree: a tie
        row = by_key[user, "arg613494_arg231487"]
        assert (row["chosen_id"], row["others_majority"], row["others_count"]) == ("arg231487", 0, 4)
    assert first["topic"] == "christianity-or-atheism-_atheism"
    assert first["prompt"] == ("Human: Which argument is more convincing?\nDebate: Christianity or Atheism?\n"
                               "Stance: Atheism\n\nAssistant:")
    source = {pair.pair_id: pair for pair in read_pairs(SAMPLE)}
    assert first["chosen"] == " " + source["arg613494_arg231487"].texts[0]
    # arg244514_arg613494: four a2 and one equal (A32WQV2ZCBZHEP), which counts as no other worker
    row = by_key["ADUJUZANFOWKW", "arg244514_arg613494"]
    assert (row["chosen_id"], row["others_majority"], row["others_count"]) == ("arg613494", 1, 3)
    # equal judgments give no row: ADUJUZANFOWKW judged one pair equal
    equal = [pair.pair_id for pair in source.values() if "ADUJUZANFOWKW" in pair.equal]
    assert len(equal) == 1 and ("ADUJUZANFOWKW", equal[0]) not in by_key
    users = json.loads((tmp_path / "users.json").read_text())["users"]
    assert users["ADUJUZANFOWKW"]["equal"] == 1
    judged = Counter(worker for pair in source.values() for worker in pair.judgments)
    assert all(entry["judgments"] == judged[user] for user, entry in users.items())


def test_split_is_deterministic_under_the_seed(tmp_path):
    files = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 3)):
        build(tmp_path / name, seed=seed)
        files[name] = [(tmp_path / name / file).read_bytes() for file in OUTPUT_FILES]
    assert files["a"] == files["b"] and files["a"] != files["c"]
    capped = build(tmp_path / "capped", max_pairs_per_user=6)
    assert capped["pairs_per_user"]["max"] == 6 and capped["users"] == {"train": 12, "new": 3}


def test_malformed_xml_names_the_file_and_pair(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "topic.xml").write_text("<list><annotatedArgumentPair><id>p1</id>", encoding="utf-8")
    with pytest.raises(PreferenceDataError, match=r"topic\.xml: not well-formed XML .*expected a <list> of"):
        build_ukp_conv_arg(broken, tmp_path / "out")

    name = "is-porn-wrong-_yes-porn-is-wrong.xml"
    for remove, expected in (("arg2/text", r"pair 39342_79306: missing or empty <arg2><text>"),
                             ("mTurkAssignments/mTurkAssignment/turkID",
                              r"pair 39342_79306, assignment 1: missing or empty <turkID>")):
        folder = tmp_path / remove.replace("/", "-")
        folder.mkdir()
        shutil.copy(SAMPLE / name, folder / name)
        tree = ET.parse(folder / name)
        pair = tree.getroot().find("annotatedArgumentPair")
        parent_path, _, tag = remove.rpartition("/")
        parent = pair.find(parent_path)
        parent.remove(parent.find(tag))
        tree.write(folder / name, encoding="utf-8")
        with pytest.raises(PreferenceDataError, match=rf"{re.escape(name)}, {expected}; expected each <annotated"):
            build_ukp_conv_arg(folder, tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PreferenceDataError, match=r"empty: no \.xml files"):
        build_ukp_conv_arg(tmp_path / "empty", tmp_path / "out")


def test_cli_writes_the_files_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "ukp"
    args = ["ukp-conv-arg", "--xml_dir", str(SAMPLE), "--output", str(out), "--min-judgments", "5",
            "--context_pairs", "4", "--test-fraction", "0.25"]
    main(args)
    printed = capsys.readouterr().out
    assert "users: 12 training, 3 new" in printed and "rows: train 86, test 29, new_users 16" in printed
    assert all((out / file).is_file() for file in OUTPUT_FILES)
    with pytest.raises(SystemExit, match="pass --overwrite"):
        main(args)
    main(args + ["--overwrite"])
    # the defaults need new users with more than 16 pairs: a clear error, not a crash
    with pytest.raises(SystemExit, match="a new user needs --context_pairs 16 context pairs"):
        main(["ukp-conv-arg", "--xml_dir", str(SAMPLE), "--output", str(tmp_path / "x"), "--min_judgments", "5"])
    # a real data set's users.json is not a simulated population's (the evaluation reads true weights from those)
    assert not has_true_weights(out / "users.json")
    (tmp_path / "population.json").write_text(json.dumps({"attributes": ["length"], "users": {}}))
    assert has_true_weights(tmp_path / "population.json")
