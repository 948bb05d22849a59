"""`python -m vpl_trl.report RUN_DIR...`: side-by-side accuracy of trained runs, one table per test set."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .metrics import format_table


def load_results(run_dirs: list[str]) -> dict[str, dict]:
    results = {}
    for run in run_dirs:
        path = Path(run) / "eval_results.json"
        if not path.exists():
            raise SystemExit(f"error: {path} not found; train the run first (recipes/train_reward.py).")
        results[run] = json.loads(path.read_text())
    return results


def render(results: dict[str, dict]) -> str:
    test_sets = sorted({name for r in results.values() for name in r.get("by_test_set", {})})
    sections = []
    for test_set in test_sets:
        rows = {
            _run_name(run, results): r["by_test_set"][test_set]
            for run, r in results.items()
            if test_set in r.get("by_test_set", {})
        }
        sections.append(f"Test set: {test_set}\n{format_table(rows)}")
    note = (
        "ctx swap (contr.): accuracy on controversial pairs when each example gets the OTHER user's context;\n"
        "near 0% means the preferred response flips with the user, i.e. the reward uses the latent."
    )
    return "\n\n".join(sections + [note])


def _run_name(run: str, results: dict[str, dict]) -> str:
    """The model type, or the run folder where several runs share a model type."""
    model_type = results[run]["model_type"]
    shared = sum(r["model_type"] == model_type for r in results.values()) > 1
    return f"{model_type} ({Path(run).name})" if shared else model_type


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vpl_trl.report", description=__doc__)
    parser.add_argument("runs", nargs="+", help="output folders of recipes/train_reward.py")
    print(render(load_results(parser.parse_args(argv).runs)))
