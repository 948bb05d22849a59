"""Evaluate a saved reward model: accuracy tables, the context-size curve, latent diagnostics, active queries.

    python -m vpl_trl.evaluate --model DIR --dataset {pets,pets_controversial,PATH} --output_dir OUT [--active]

writes `OUT/metrics.json`, `OUT/report.md` and PNG plots:

- accuracy overall, per user, on controversial and agreed pairs (`accuracy.png`), for every model type;
- for VPL (`vae`) models: accuracy against the number K of context pairs, drawn anew from each user's
  training pairs several times (`accuracy_vs_context.png`); the posterior KL, the active latent units, a
  cross-validated linear probe of the user from `z` beside the same probe on an untrained encoder, the
  accuracy when each example gets another user's context, and a PCA map of the users' `z` (`latent_pca.png`);
- with `--active`: accuracy on new (simulated) users' held-out pairs against the number of pairs asked,
  chosen by expected information about `z` or at random (`active_queries.png`).

The training split serves as the users' context pool, as in training. Files already in OUT are not
overwritten unless `--overwrite` is given.
"""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from transformers import AutoTokenizer, HfArgumentParser

from .active_queries import simulate_active_queries, summarize_active_queries
from .data.registry import load_named_dataset
from .diagnostics import (
    latent_diagnostics,
    plot_accuracy,
    plot_active_queries,
    plot_context_curve,
    plot_latent_map,
    untrained_encoder,
)
from .evaluation import (
    context_size_curve,
    default_context_sizes,
    evaluate_reward_model,
    format_percent,
    per_user_breakdown,
)
from .models import VPLConfig, VPLRewardModel
from .trainer import VPLRewardConfig, VPLRewardTrainer

METRICS_FILE, REPORT_FILE = "metrics.json", "report.md"
ACCURACY_PLOT, CONTEXT_PLOT, LATENT_PLOT, ACTIVE_PLOT = (
    "accuracy.png", "accuracy_vs_context.png", "latent_pca.png", "active_queries.png"
)


@dataclass
class EvaluateArguments:
    model: str = field(metadata={"help": "Folder of a saved reward model (VPLRewardModel.save_pretrained)."})
    output_dir: str = field(metadata={"help": "Where metrics.json, report.md and the plots are written."})
    dataset: str = field(
        default="pets", metadata={"help": "pets, pets_controversial, a folder/file in our format, or a hub id."}
    )
    data_dir: str = field(default="data", metadata={"help": "Where built-in datasets are generated."})
    column_mapping: str | None = field(default=None, metadata={"help": "Rename columns: JSON or 'theirs=ours,...'."})
    split: str = field(default="test", metadata={"help": "The split evaluated; the train split is the context pool."})
    backbone: str | None = field(default=None, metadata={"help": "Load the model on this backbone (default: its own)."})
    num_context: str = field(default="8", metadata={"help": "Context pairs per example for the main tables."})
    seed: int = field(
        default=42, metadata={"help": "Seed of the context draws; the training seed (default 42, as in training) "
                                      "redraws the contexts the recipe evaluated with."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N evaluation pairs."})
    batch_size: int = field(default=64, metadata={"help": "Pairs per forward pass."})
    context_sizes: list[int] = field(
        default_factory=list, metadata={"help": "K values of the context curve (default 1, 2, 4, ... up to the pool)."}
    )
    max_context: int = field(default=32, metadata={"help": "Largest K of the default context curve."})
    context_draws: int = field(default=5, metadata={"help": "Context draws per K."})
    probe_folds: int = field(default=5, metadata={"help": "Cross-validation folds of the linear probe."})
    active: bool = field(default=False, metadata={"help": "Also compare active and random queries for new users."})
    active_queries: int = field(default=8, metadata={"help": "Queries asked of each simulated user."})
    active_candidates: int = field(default=40, metadata={"help": "Unlabelled candidate pairs per simulated user."})
    active_users: int = field(default=10, metadata={"help": "Simulated users per dataset user."})
    active_samples: int = field(default=64, metadata={"help": "Posterior samples of z per query choice."})
    overwrite: bool = field(default=False, metadata={"help": "Write over existing result files in output_dir."})


def planned_files(use_latent: bool, active: bool) -> list[str]:
    files = [METRICS_FILE, REPORT_FILE, ACCURACY_PLOT]
    if use_latent:
        files += [CONTEXT_PLOT, LATENT_PLOT] + ([ACTIVE_PLOT] if active else [])
    return files


def check_output_dir(output_dir: Path, files: list[str], overwrite: bool) -> None:
    """Refuse to write over earlier results unless `overwrite`."""
    existing = [name for name in files if (output_dir / name).exists()]
    if existing and not overwrite:
        raise SystemExit(
            f"error: {output_dir} already holds {', '.join(existing)}; pass --overwrite to write over them, "
            "or choose another --output_dir."
        )


def build_trainer(model: VPLRewardModel, args: EvaluateArguments, pool, workdir: str) -> VPLRewardTrainer:
    """A trainer used only for its data preparation and prediction: `pool` (the training split) is the
    users' context pool, and embeddings come from (and go to) the same cache as in training."""
    tokenizer = None
    if (Path(args.model) / "tokenizer_config.json").exists():  # saved with the model by the trainer
        tokenizer = AutoTokenizer.from_pretrained(args.model, config=model.config)
    config = VPLRewardConfig(
        output_dir=workdir,
        report_to="none",
        num_context=args.num_context,
        seed=args.seed,
        per_device_eval_batch_size=args.batch_size,
        disable_tqdm=True,
    )
    return VPLRewardTrainer(model=model, args=config, train_dataset=pool, processing_class=tokenizer)


def evaluate(args: EvaluateArguments) -> dict[str, Any]:
    output_dir = Path(args.output_dir)
    use_latent = VPLConfig.from_pretrained(args.model).use_latent
    if args.active and not use_latent:
        raise SystemExit(f"error: --active needs a VPL (vae) model; {args.model} has no user latent.")
    check_output_dir(output_dir, planned_files(use_latent, args.active), args.overwrite)

    data = load_named_dataset(args.dataset, args.data_dir, args.column_mapping)
    if "train" not in data or args.split not in data:
        raise SystemExit(f"error: {args.dataset} needs a train split (the context pool) and a {args.split!r} split; "
                         f"it has {list(data)}.")
    pool, test = data["train"], data[args.split]
    if args.max_eval_samples:
        test = test.select(range(min(args.max_eval_samples, len(test))))
    model = VPLRewardModel.from_pretrained(args.model, backbone=args.backbone)
    title = f"{Path(args.model).name} ({model.config.reward_type}) on {args.dataset}"

    with tempfile.TemporaryDirectory(prefix="vpl-evaluate-") as workdir:
        trainer = build_trainer(model, args, pool, workdir)
        # The recipe evaluates under this name, so with the training seed the contexts (and numbers) match.
        name = f"{args.split}-{args.dataset}"
        metrics: dict[str, Any] = {
            "model": args.model,
            "dataset": args.dataset,
            "split": args.split,
            "reward_type": model.config.reward_type,
            "num_context": args.num_context,
            "seed": args.seed,
        }
        predictions = trainer.predict_preferences(test, name=name)
        metrics.update(evaluate_reward_model(trainer, test, name=name, predictions=predictions))
        metrics["per_user_breakdown"] = per_user_breakdown(predictions)
        plots = {"accuracy": ACCURACY_PLOT}
        output_dir.mkdir(parents=True, exist_ok=True)
        plot_accuracy(metrics, metrics["per_user_breakdown"], output_dir / ACCURACY_PLOT, title)

        if use_latent:
            metrics.update(latent_evaluation(trainer, test, pool, predictions, args, output_dir, title))
            plots.update(context_curve=CONTEXT_PLOT, latent_map=LATENT_PLOT)
            if args.active:
                metrics["active_queries"] = simulate_active_queries(
                    trainer, test, num_queries=args.active_queries, num_candidates=args.active_candidates,
                    users_per_group=args.active_users, num_samples=args.active_samples, seed=args.seed,
                )
                metrics["active_queries"]["summary"] = summarize_active_queries(metrics["active_queries"])
                plot_active_queries(metrics["active_queries"], output_dir / ACTIVE_PLOT, title)
                plots["active_queries"] = ACTIVE_PLOT

    metrics["plots"] = plots
    metrics["arguments"] = asdict(args)
    (output_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    (output_dir / REPORT_FILE).write_text(render_report(metrics, title))
    return metrics


def latent_evaluation(trainer, test, pool, predictions, args: EvaluateArguments, output_dir: Path, title: str) -> dict:
    """The context-size curve, and the probe of the user from z beside an untrained encoder's, with their plots."""
    model = trainer.model
    sizes = args.context_sizes or default_context_sizes(pool, args.max_context)
    predict = partial(trainer.predict_preferences, batch_size=args.batch_size)
    curve = context_size_curve(predict, test, pool, sizes, args.context_draws, args.seed)
    plot_context_curve(curve, output_dir / CONTEXT_PLOT, title, _fixed_k(args.num_context))
    with untrained_encoder(model, seed=args.seed):
        untrained = trainer.predict_preferences(test, name=f"{args.split}-{args.dataset}")
    diagnostics = latent_diagnostics(
        model, predictions["latent_mean"], untrained["latent_mean"], predictions["user_id"],
        folds=args.probe_folds, seed=args.seed,
    )
    plot_latent_map(diagnostics, output_dir / LATENT_PLOT, title)
    return {"latent_dim": model.config.latent_dim, "context_curve": curve, "probe": diagnostics["probe"]}


def _fixed_k(num_context: str) -> int | None:
    return int(num_context) if str(num_context).isdigit() else None


# ----- the markdown report ------------------------------------------------------------------------------------


def _pct_spread(values: list[float] | None) -> str:
    if values is None:
        return "-"
    return f"{100 * np.mean(values):.1f} ± {100 * np.std(values):.1f}%"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def render_report(metrics: dict[str, Any], title: str) -> str:
    lines = [f"# Evaluation: {title}", "",
             f"Model `{metrics['model']}`, dataset `{metrics['dataset']}` (split `{metrics['split']}`, "
             f"{metrics['n_eval']} pairs), contexts of {metrics['num_context']} pairs drawn from each user's training "
             f"pairs (seed {metrics['seed']}).", "", "## Accuracy", ""]
    groups = [("all users", metrics, metrics["n_eval"])]
    groups += [(f"user {u}", r, r["n"]) for u, r in metrics["per_user_breakdown"].items()]
    rows = [[name, *(format_percent(values.get(key)) for key in ("accuracy", "controversial_accuracy", "agreed_accuracy")),
             str(n)] for name, values, n in groups]
    lines += _table(["", "all pairs", "controversial", "agreed", "pairs"], rows)
    lines += ["", f"![accuracy]({ACCURACY_PLOT})", ""]

    if "context_curve" not in metrics:
        lines += ["This reward model has no user latent: the context curve and latent diagnostics do not apply.", ""]
        return "\n".join(lines)

    swap = metrics.get("context_swap") or {}
    probe = metrics["probe"]
    lines += ["## Latent diagnostics", ""]
    lines += _table(
        ["diagnostic", "value"],
        [["KL(q(z|context) ‖ N(0, I)), mean per user", f"{metrics['kl']:.2f}"],
         ["active units (posterior mean varies across users)", f"{metrics['active_units']} of {metrics['latent_dim']}"],
         [f"linear probe of the user from z ({probe['folds']}-fold CV), trained encoder",
          format_percent(probe["trained"])],
         ["same probe, untrained encoder", format_percent(probe["untrained"])],
         ["probe chance level (majority user)", format_percent(probe["chance"])],
         ["accuracy with another user's context (context swap)", format_percent(swap.get("accuracy"))],
         ["controversial accuracy with another user's context", format_percent(swap.get("controversial_accuracy"))],
         ["agreed accuracy with another user's context", format_percent(swap.get("agreed_accuracy"))]],
    )
    drop = None if swap.get("accuracy") is None else metrics["accuracy"] - swap["accuracy"]
    lines += ["", f"The context swap costs {format_percent(drop)} of accuracy"
              + (f" ({format_percent(metrics['controversial_accuracy'] - swap['controversial_accuracy'])} on "
                 "controversial pairs)" if swap.get("controversial_accuracy") is not None else "")
              + ": the larger the drop, the more the reward depends on the user's latent. The probe is read against "
              "the untrained encoder's: users' contexts differ, so even random weights may separate them; only a "
              "trained probe above the untrained one shows that training made z carry the user.", "", f"![latent map]({LATENT_PLOT})", "",
              "## Accuracy against the number of context pairs", ""]
    curve = metrics["context_curve"]
    has_controversial = curve["controversial_accuracy"][0] is not None
    rows = [[str(k), _pct_spread(acc)] + ([_pct_spread(contr)] if has_controversial else [])
            for k, acc, contr in zip(curve["k"], curve["accuracy"], curve["controversial_accuracy"])]
    lines += _table(["K", "all pairs"] + (["controversial"] if has_controversial else []), rows)
    lines += ["", f"Mean ± std over {curve['draws']} draws of every example's context.", "",
              f"![accuracy against K]({CONTEXT_PLOT})", ""]

    if "active_queries" in metrics:
        active = metrics["active_queries"]
        summary = active["summary"]
        keys = [k for k in ("accuracy", "controversial_accuracy") if f"active_{k}_mean" in summary[0]]
        header = ["queries"] + [f"{s} ({'all' if k == 'accuracy' else 'controversial'})" for k in keys
                                for s in ("active", "random")]
        has_asked = "active_asked_controversial" in summary[0]
        if has_asked:
            header += ["next pair asked is controversial (active / random)"]
        rows = []
        for row in summary:
            cells = [str(row["queries"])]
            cells += [f"{100 * row[f'{s}_{k}_mean']:.1f} ± {100 * row[f'{s}_{k}_std']:.1f}%" for k in keys
                      for s in ("active", "random")]
            if has_asked:
                asked = [row.get(f"{s}_asked_controversial") for s in ("active", "random")]
                cells.append(" / ".join("-" if a is None else f"{100 * a:.0f}%" for a in asked))
            rows.append(cells)
        lines += ["## Active queries for a new user", "",
                  f"{active['num_simulated_users']} simulated users (each dataset user, several random splits of "
                  f"their pairs into {active['num_candidates']} unlabelled candidates and held-out pairs). Each "
                  f"query is the candidate with the most expected information about z ({active['num_samples']} "
                  "posterior samples; the prior before any answer), or a random one; the user answers with their "
                  "label and the context is encoded again. Accuracy on the held-out pairs with z the posterior "
                  "mean: mean ± std over simulated users here, mean ± standard error in the plot. The last column "
                  "is how often the next pair asked was controversial.", ""]
        lines += _table(header, rows)
        lines += ["", f"![active queries]({ACTIVE_PLOT})", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    (args,) = HfArgumentParser(EvaluateArguments).parse_args_into_dataclasses(args=argv)
    metrics = evaluate(args)
    print(f"{metrics['reward_type']} on {args.dataset}: accuracy {format_percent(metrics['accuracy'])}, "
          f"controversial {format_percent(metrics.get('controversial_accuracy'))}; results in {args.output_dir}")
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
