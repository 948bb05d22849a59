"""Real annotators: UKPConvArg1's crowd workers as users, and new workers who bring K of their own pairs.

    git clone https://github.com/UKPLab/acl2016-convincing-arguments
    python benchmarks/real_annotators.py --output_dir DIR \
        --xml_dir acl2016-convincing-arguments/data/UKPConvArg1-full-XML

It builds the data set (`python -m vpl_trl.data ukp-conv-arg`: workers with at least 50 judgments are users, 20% of
them new users), trains with the reward recipe as a user would (`recipes/train_reward.py`):

- VPL with the general many-user configuration (`recipes/configs/many_users.yaml`, its selection on pseudo-new
  users included);
- Bradley-Terry with the same settings and as many updates (VPL sees each pair once per context draw);
- LoRe-style (rank 8) on the same frozen embeddings: a new user's weights fitted from their pairs;

and scores the new users' test pairs against their own labels: accuracy at K = 1, 4, 16 of their pairs (VPL; LoRe at
16), the mean accuracy of the worst 10% of new users at K=16, and a pooled reference that needs no model: the other
workers' majority on the same pair (ties count half).

Writes `DIR/summary.json` (`{"new_users": {"btl": A, "vpl": {"1": A, "4": A, "16": A}, "lore": {"16": A},
"worst_decile": {"btl": A, "vpl": A}, ...}, "seconds": S}`) and the results file (default
`benchmarks/results/real_annotators.md`).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from population import PoolEmbeddings, lore_margins  # noqa: E402

from vpl_trl.baselines import fit_low_rank_reward  # noqa: E402
from vpl_trl.data.format import load_preference_splits  # noqa: E402
from vpl_trl.data.ukp_conv_arg import UKPConvArgConfig, build_ukp_conv_arg  # noqa: E402
from vpl_trl.evaluation.metrics import limit_contexts, predict, worst_fraction_mean  # noqa: E402
from vpl_trl.inference.reward_inference import RewardInference  # noqa: E402
from vpl_trl.models import VPLRewardModel  # noqa: E402
from vpl_trl.scripts import train_reward  # noqa: E402
from vpl_trl.text import render_text  # noqa: E402

CONFIG = ROOT / "recipes" / "configs" / "many_users.yaml"
K_VALUES = (1, 4, 16)


def train(model_type: str, data: Path, output_dir: Path, config: Path, extra: list[str]) -> Path:
    """The reward recipe on `data`, as `accelerate launch recipes/train_reward.py` runs it."""
    argv = ["--config", str(config), "--dataset", str(data), "--model_type", model_type,
            "--output_dir", str(output_dir), "--overwrite_output_dir", *extra]
    if model_type != "vae":  # as many updates as VPL, which sees each pair once per context draw
        settings = yaml.safe_load(config.read_text())
        epochs = settings.get("num_train_epochs", 1) * settings.get("train_context_draws", 1)
        argv += ["--num_train_epochs", str(epochs), "--train_context_draws", "1", "--selection_fraction", "0"]
    start = time.perf_counter()
    train_reward.main(argv)
    print(f"trained {model_type} in {time.perf_counter() - start:.0f} s")
    return output_dir


def load_inference(folder: Path) -> RewardInference:
    model = VPLRewardModel.from_pretrained(folder)
    return RewardInference(model, AutoTokenizer.from_pretrained(folder if (folder / "tokenizer.json").exists()
                                                                else model.config.backbone_name_or_path))


def per_user_accuracy(correct: np.ndarray, users: np.ndarray) -> dict[str, float]:
    return {str(u): float(correct[users == u].mean()) for u in sorted(set(users.tolist()))}


def correct_of(predictions: dict[str, Any]) -> np.ndarray:
    chosen, rejected = np.asarray(predictions["reward_chosen"]), np.asarray(predictions["reward_rejected"])
    return (chosen > rejected).astype(float) + 0.5 * (chosen == rejected)


class Embedded(PoolEmbeddings):
    """Every text of the rows (contexts included), embedded once by a saved model's frozen backbone, standardized;
    `pairs` as the population benchmark's."""

    def __init__(self, inference: RewardInference, rows: list[dict[str, Any]]):
        tokenizer, keys = inference.tokenizer, {}
        for row in rows:
            for pair in [row, *(row.get("context") or [])]:
                for side in ("chosen", "rejected"):
                    keys.setdefault((pair["prompt"], pair[side]), render_text(tokenizer, pair["prompt"], pair[side]))
        raw = inference.embed(list(keys.values()), desc="Embedding the texts for LoRe")
        with torch.no_grad():
            self.matrix = inference.model._standardize(raw).float()
        self.row = {key: i for i, key in enumerate(keys)}


def evaluate(vpl_dir: Path, btl_dir: Path, splits, lore_rank: int, seed: int) -> dict[str, Any]:
    new = splits["new_users"]
    users = np.asarray(new["user_id"], dtype=object)
    result: dict[str, Any] = {"users": len(set(users.tolist())), "pairs": len(new)}

    btl = load_inference(btl_dir)
    btl_correct = correct_of(predict(btl, new.remove_columns("context"), "new-btl"))
    result["btl"] = float(btl_correct.mean())

    vpl = load_inference(vpl_dir)
    result["vpl_latent_scale"] = vpl.model.config.latent_scale
    result["vpl"], per_user = {}, {}
    for k in K_VALUES:
        correct = correct_of(predict(vpl, limit_contexts(new, k, seed=seed), f"new-vpl-k{k}"))
        result["vpl"][str(k)] = float(correct.mean())
        per_user[k] = per_user_accuracy(correct, users)
    vpl.model.config.latent_scale = 0.0
    result["vpl_pooled"] = float(correct_of(predict(vpl, limit_contexts(new, 1, seed=seed), "new-vpl-pooled")).mean())

    train_rows = splits["train"].to_list()
    limited = limit_contexts(new, max(K_VALUES), seed=seed).to_list()
    embedded = Embedded(btl, train_rows + limited)
    index = {u: i for i, u in enumerate(sorted({r["user_id"] for r in train_rows}))}
    lore = fit_low_rank_reward(embedded.matrix, embedded.pairs(train_rows, index), len(index), rank=lore_rank,
                               seed=seed)
    margins, _ = lore_margins(lore, embedded, limited)
    lore_correct = (margins > 0).astype(float) + 0.5 * (margins == 0)
    result["lore"] = {str(max(K_VALUES)): float(lore_correct.mean())}

    majority = np.asarray(new["others_majority"], dtype=float)
    result["others_majority"] = float(np.mean(np.where(majority == 0, 0.5, majority > 0)))
    result["others_majority_coverage"] = float(np.mean(np.asarray(new["others_count"]) > 0))

    serve_k = max(K_VALUES)
    result["per_user_accuracy"] = {"vpl": per_user[serve_k], "btl": per_user_accuracy(btl_correct, users),
                                   "lore": per_user_accuracy(lore_correct, users)}
    result["worst_decile"] = {name: worst_fraction_mean(list(values.values()))
                              for name, values in result["per_user_accuracy"].items()}
    return result


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def render(summary: dict[str, Any]) -> str:
    r, d = summary["new_users"], summary["data"]
    selection = summary.get("selection") or {}
    lines = [
        "# Real annotators: UKPConvArg1's crowd workers", "",
        f"`python benchmarks/real_annotators.py --output_dir DIR --xml_dir ...`, {summary['seconds'] / 60:.1f} min on "
        f"{summary['machine']}. Data (Habernal & Gurevych, ACL 2016; CC-BY 4.0): workers with at least "
        f"{d['config']['min_judgments']} judgments are users: {d['users']['train']} training workers, "
        f"{d['users']['new']} new workers who bring K of their own pairs and are tested on {r['pairs']} other pairs "
        f"of theirs (none sharing an argument with their context where possible). Accuracy is against each new "
        "worker's own label. Models on frozen SmolLM2-135M embeddings, trained by the reward recipe with "
        "`recipes/configs/many_users.yaml`.", "",
        "| model | K=1 | K=4 | K=16 | worst 10% of new workers (K=16) |", "|---|---|---|---|---|",
        "| VPL (general configuration) | " + " | ".join(pct(r["vpl"][str(k)]) for k in K_VALUES)
        + f" | {pct(r['worst_decile']['vpl'])} |",
        f"| Bradley-Terry | {pct(r['btl'])} | {pct(r['btl'])} | {pct(r['btl'])} | {pct(r['worst_decile']['btl'])} |",
        f"| LoRe-style (rank {summary['lore_rank']}) | - | - | {pct(r['lore']['16'])} | "
        f"{pct(r['worst_decile']['lore'])} |",
        f"| VPL's pooled reward (latent 0) | {pct(r['vpl_pooled'])} | | | |",
        f"| the other workers' majority on the same pair | {pct(r['others_majority'])} | | | |", "",
        "VPL minus Bradley-Terry: " + ", ".join(f"K={k} {100 * (r['vpl'][str(k)] - r['btl']):+.1f} points"
                                                for k in K_VALUES)
        + f"; worst decile {100 * (r['worst_decile']['vpl'] - r['worst_decile']['btl']):+.1f} points.", "",
    ]
    if selection:
        lines += ["## What the recipe chose on pseudo-new users", "", selection["reason"], "",
                  "| candidate | " + " | ".join(f"scale {s}" for s in selection["candidates"][0]["scores"]) + " |",
                  "|---|" + "---|" * len(selection["candidates"][0]["scores"])]
        for c in selection["candidates"]:
            fit = f", latent fit {c['latent_fit_precision']:g}" if c.get("latent_fit_precision") else ""
            lines.append(f"| {c['settings'] or 'as configured'}{fit} | "
                         + " | ".join(pct(e["score"]) for e in c["scores"].values()) + " |")
        sizes = [k for k in selection["candidates"][0]["scores"]["0"] if k != "score"]
        lines += ["", f"Scores: mean accuracy over K={'/'.join(sizes)} at each scale; the chosen candidate's scale "
                      f"at each K: {selection['latent_scale']}; on "
                      f"{selection['users']['pseudo_new']} pseudo-new users ({selection['users']['pseudo_new_pairs']} "
                      "pairs), training workers held out whole.", ""]
    lines += ["| training | seconds |", "|---|---|",
              *(f"| {name} | {s:.0f} |" for name, s in summary["train_seconds"].items())]
    if summary.get("note"):
        lines += ["", summary["note"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", "--output-dir", required=True)
    parser.add_argument("--xml_dir", "--xml-dir", default="acl2016-convincing-arguments/data/UKPConvArg1-full-XML",
                        help="the fetched data/UKPConvArg1-full-XML folder")
    parser.add_argument("--config", default=str(CONFIG), help="the VPL recipe configuration")
    parser.add_argument("--results", default=str(ROOT / "benchmarks" / "results" / "real_annotators.md"))
    parser.add_argument("--min_judgments", "--min-judgments", type=int, default=50)
    parser.add_argument("--lore_rank", "--lore-rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--note", default=None, help="a line added to the results file")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    output_dir = Path(args.output_dir)
    data = output_dir / "data"
    if not (data / "users.json").exists():
        build_ukp_conv_arg(args.xml_dir, data, UKPConvArgConfig(min_judgments=args.min_judgments, seed=args.seed))
    splits = load_preference_splits(data)
    users = json.loads((data / "users.json").read_text())

    seconds, extra = {}, ["--seed", str(args.seed)]
    for name, model_type in (("vpl", "vae"), ("btl", "base")):
        t = time.perf_counter()
        train(model_type, data, output_dir / name, Path(args.config), extra)
        seconds[name] = time.perf_counter() - t
    new_users = evaluate(output_dir / "vpl", output_dir / "btl", splits, args.lore_rank, args.seed)
    selection_file = output_dir / "vpl" / "selection.json"
    summary = {
        "new_users": new_users,
        "data": {"users": {split: sum(1 for u in users["users"].values() if u["split"] == split)
                           for split in ("train", "new")},
                 "config": users["config"], "rows": {name: len(split) for name, split in splits.items()}},
        "selection": json.loads(selection_file.read_text()) if selection_file.exists() else None,
        "lore_rank": args.lore_rank,
        "train_seconds": seconds,
        "machine": f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}",
        "note": args.note,
        "seconds": time.perf_counter() - start,
    }
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(render(summary))
    print(f"new workers: Bradley-Terry {pct(new_users['btl'])}, VPL K=1/4/16 "
          + "/".join(pct(new_users["vpl"][str(k)]) for k in K_VALUES)
          + f"; worst decile VPL {pct(new_users['worst_decile']['vpl'])} against "
          f"{pct(new_users['worst_decile']['btl'])}; {summary['seconds'] / 60:.1f} min; results in {results}")
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
