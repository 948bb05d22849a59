"""Evaluate a saved reward model: accuracy tables, the context-size curve, latent diagnostics, active queries.

    python -m vpl_trl.evaluate --model DIR --dataset {pets,pets_controversial,PATH} --output_dir OUT [--active]

writes `OUT/metrics.json`, `OUT/report.md` and PNG plots:

- accuracy overall, per user, on controversial and agreed pairs (`accuracy.png`), for every model type;
- for VPL (`vae`) models: accuracy against the number K of context pairs, drawn anew from each user's
  training pairs several times (`accuracy_vs_context.png`); the posterior KL, the active latent units, a
  cross-validated linear probe of the user from `z` beside the same probe on an untrained encoder, the
  accuracy when each example gets another user's context, and a PCA map of the users' `z` (`latent_pca.png`);
- with `--active`: accuracy on new (simulated) users' held-out pairs against the number of pairs asked,
  chosen by expected information about `z` or at random (`active_queries.png`); a data set with real new users
  simulates them instead (below).

A data set with a `new_users` split (users absent from training, each bringing their own context, as the
simulated population has) also gets a new-user section: accuracy with K of each new user's own pairs, against
their labels and, where the data knows it (`true_margin`), against their true preference, with the worst 10% of
users; the context swap (another user's context, drawn at random); for VPL models the accuracy against K
(`new_users_accuracy_vs_context.png`), how well `z` predicts the true weights when a simulated population's
`users.json` lies beside the data, and with `--active` active queries chosen from each new user's context
(`new_users_active_queries.png`).

The training split serves as the users' context pool, as in training. Files already in OUT are not
overwritten unless `--overwrite` is given.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from transformers import AutoTokenizer, HfArgumentParser

from ..data.population import Population, has_true_weights
from ..data.registry import BUILTIN, builtin_dataset_folder, load_named_dataset
from ..embedded_model import resolve_model_name_or_path
from ..inference.reward_inference import RewardInference
from ..logs import show_info_logs
from ..models import VPLConfig, VPLRewardModel, local_model_folder
from .active_queries import simulate_active_queries, simulate_new_user_queries, summarize_active_queries
from .diagnostics import (
    MAX_USER_BARS,
    latent_diagnostics,
    plot_accuracy,
    plot_active_queries,
    plot_context_curve,
    plot_latent_map,
    untrained_encoder,
)
from .metrics import (
    context_size_curve,
    context_sizes_up_to,
    default_context_sizes,
    evaluate_reward_model,
    format_percent,
    limit_contexts,
    per_user_breakdown,
    predict,
    worst_fraction_mean,
    z_weight_r2,
)

METRICS_FILE, REPORT_FILE = "metrics.json", "report.md"
ACCURACY_PLOT, CONTEXT_PLOT, LATENT_PLOT, ACTIVE_PLOT = (
    "accuracy.png", "accuracy_vs_context.png", "latent_pca.png", "active_queries.png"
)
NEW_USERS_SPLIT = "new_users"
NEW_CONTEXT_PLOT, NEW_ACTIVE_PLOT = "new_users_accuracy_vs_context.png", "new_users_active_queries.png"


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


def planned_files(use_latent: bool, active: bool, new_users: bool = False) -> list[str]:
    files = [METRICS_FILE, REPORT_FILE, ACCURACY_PLOT]
    if use_latent:  # active queries are simulated for the real new users where the data set has them
        files += [CONTEXT_PLOT, LATENT_PLOT] + ([ACTIVE_PLOT] if active and not new_users else [])
        if new_users:
            files += [NEW_CONTEXT_PLOT] + ([NEW_ACTIVE_PLOT] if active else [])
    return files


def check_output_dir(output_dir: Path, files: list[str], overwrite: bool) -> None:
    """Refuse to write over earlier results unless `overwrite`."""
    existing = [name for name in files if (output_dir / name).exists()]
    if existing and not overwrite:
        raise SystemExit(
            f"error: {output_dir} already holds {', '.join(existing)}; pass --overwrite to write over them, "
            "or choose another --output_dir."
        )


def build_inference(model: VPLRewardModel, args: EvaluateArguments, pool) -> RewardInference:
    """The model's inference: `pool` (the training split) is the users' context pool, and embeddings come from (and
    go to) the same cache as in training."""
    folder = local_model_folder(args.model)
    tokenizer_source = folder if (folder / "tokenizer_config.json").exists() else resolve_model_name_or_path(
        model.config.backbone_name_or_path)  # saved with the model by the trainer, else its backbone's
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return RewardInference(model, tokenizer, num_context=args.num_context, seed=args.seed, context_pool=pool,
                           batch_size=args.batch_size)


def evaluate(args: EvaluateArguments) -> dict[str, Any]:
    output_dir = Path(args.output_dir)
    use_latent = VPLConfig.from_pretrained(args.model).use_latent
    if args.active and not use_latent:
        raise SystemExit(f"error: --active needs a VPL (vae) model; {args.model} has no user latent.")
    data = load_named_dataset(args.dataset, args.data_dir, args.column_mapping)
    check_output_dir(output_dir, planned_files(use_latent, args.active, NEW_USERS_SPLIT in data), args.overwrite)
    if "train" not in data or args.split not in data:
        raise SystemExit(f"error: {args.dataset} needs a train split (the context pool) and a {args.split!r} split; "
                         f"it has {list(data)}.")
    pool, test = data["train"], data[args.split]
    if args.max_eval_samples:
        test = test.select(range(min(args.max_eval_samples, len(test))))
    model = VPLRewardModel.from_pretrained(args.model, backbone=args.backbone)
    title = f"{Path(args.model).name} ({model.config.reward_type}) on {args.dataset}"

    inference = build_inference(model.eval(), args, pool)
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
    predictions = predict(inference, test, name)
    metrics.update(evaluate_reward_model(inference, test, name=name, predictions=predictions))
    metrics["per_user_breakdown"] = per_user_breakdown(predictions)
    plots = {"accuracy": ACCURACY_PLOT}
    output_dir.mkdir(parents=True, exist_ok=True)
    plot_accuracy(metrics, metrics["per_user_breakdown"], output_dir / ACCURACY_PLOT, title)

    if use_latent:
        metrics.update(latent_evaluation(inference, test, pool, predictions, args, output_dir, title))
        plots.update(context_curve=CONTEXT_PLOT, latent_map=LATENT_PLOT)
        if args.active and NEW_USERS_SPLIT not in data:
            metrics["active_queries"] = simulate_active_queries(
                inference, test, num_queries=args.active_queries, num_candidates=args.active_candidates,
                users_per_group=args.active_users, num_samples=args.active_samples, seed=args.seed,
            )
            metrics["active_queries"]["summary"] = summarize_active_queries(metrics["active_queries"])
            plot_active_queries(metrics["active_queries"], output_dir / ACTIVE_PLOT, title)
            plots["active_queries"] = ACTIVE_PLOT
    if NEW_USERS_SPLIT in data and args.split != NEW_USERS_SPLIT:
        metrics["new_users"] = new_user_evaluation(inference, data, args, output_dir, title)
        plots.update(metrics["new_users"].pop("plots"))

    metrics["plots"] = plots
    metrics["arguments"] = asdict(args)
    (output_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    (output_dir / REPORT_FILE).write_text(render_report(metrics, title))
    return metrics


def latent_evaluation(inference: RewardInference, test, pool, predictions, args: EvaluateArguments, output_dir: Path,
                      title: str) -> dict:
    """The context-size curve, and the probe of the user from z beside an untrained encoder's, with their plots."""
    model = inference.model
    sizes = args.context_sizes or default_context_sizes(pool, args.max_context)
    curve = context_size_curve(partial(predict, inference, batch_size=args.batch_size), test, pool, sizes,
                               args.context_draws, args.seed)
    plot_context_curve(curve, output_dir / CONTEXT_PLOT, title, _fixed_k(args.num_context))
    with untrained_encoder(model, seed=args.seed):
        untrained = inference.predict_preferences(test, name=f"{args.split}-{args.dataset}")
    diagnostics = latent_diagnostics(
        model, predictions["latent_mean"], untrained["latent_mean"], predictions["user_id"],
        folds=args.probe_folds, seed=args.seed,
    )
    plot_latent_map(diagnostics, output_dir / LATENT_PLOT, title)
    return {"latent_dim": model.config.latent_dim, "context_curve": curve, "probe": diagnostics["probe"]}


def new_user_evaluation(inference, data, args: EvaluateArguments, output_dir: Path, title: str) -> dict[str, Any]:
    """Users absent from training, each with their own context: accuracy with K of their pairs (`num_context`,
    or all of them for a range), per user, with swapped contexts, against K, what z knows of their true weights,
    and active queries."""
    new = data[NEW_USERS_SPLIT]
    if args.max_eval_samples:
        new = new.select(range(min(args.max_eval_samples, len(new))))
    fixed = _fixed_k(args.num_context)
    limited = limit_contexts(new, fixed) if fixed else new
    name = f"{NEW_USERS_SPLIT}-{args.dataset}"
    predictions = predict(inference, limited, name, batch_size=args.batch_size)
    result: dict[str, Any] = evaluate_reward_model(inference, limited, name=name, predictions=predictions)
    result["num_context"] = fixed or "all"
    breakdown = per_user_breakdown(predictions)
    result["num_users"] = len(breakdown)
    result["worst_decile_accuracy"] = worst_fraction_mean([row["accuracy"] for row in breakdown.values()])
    result["plots"] = {}
    if not inference.model.config.use_latent:
        return result
    longest = max(len(c) for c in new["context"])
    sizes = args.context_sizes or context_sizes_up_to(longest, args.max_context)
    result["context_curve"] = context_size_curve(partial(predict, inference, batch_size=args.batch_size), new, None,
                                                 sizes, args.context_draws, args.seed)
    plot_context_curve(result["context_curve"], output_dir / NEW_CONTEXT_PLOT, f"{title}: new users", fixed)
    result["plots"]["new_users_context_curve"] = NEW_CONTEXT_PLOT
    users_file = dataset_folder(args) / "users.json"
    if users_file.is_file() and has_true_weights(users_file):  # a real data set's users have no true weights
        result["z_r2"] = z_weight_r2(inference, data[args.split], data["train"], limited, Population.load(users_file),
                                     seed=args.seed, name=f"{name}-z")
    if args.active:
        active = simulate_new_user_queries(inference, new, num_queries=min(args.active_queries, longest),
                                           num_samples=args.active_samples, seed=args.seed)
        active["summary"] = summarize_active_queries(active)
        result["active_queries"] = active
        plot_active_queries(active, output_dir / NEW_ACTIVE_PLOT, f"{title}: new users")
        result["plots"]["new_users_active_queries"] = NEW_ACTIVE_PLOT
    return result


def dataset_folder(args: EvaluateArguments) -> Path:
    """The folder the evaluated data set was read from (where a simulated population keeps `users.json`)."""
    return builtin_dataset_folder(args.dataset, args.data_dir) if args.dataset in BUILTIN else Path(args.dataset)


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
    lines += _accuracy_table(metrics, metrics["per_user_breakdown"])
    lines += ["", f"![accuracy]({ACCURACY_PLOT})", ""]

    if "context_curve" not in metrics:
        lines += ["This reward model has no user latent: the context curve and latent diagnostics do not apply.", ""]
    else:
        lines += _latent_sections(metrics)
    if "new_users" in metrics:
        lines += _new_user_section(metrics["new_users"])
    return "\n".join(lines)


def _accuracy_table(metrics: dict[str, Any], breakdown: dict[str, dict[str, Any]]) -> list[str]:
    """Accuracy of all users and of each user (or, for many users, the spread of per-user accuracies), against
    the labels, on controversial and agreed pairs, and against the true preference where the data knows it."""
    has_truth = "true_accuracy" in metrics
    keys = ["accuracy", "controversial_accuracy", "agreed_accuracy"] + (["true_accuracy"] if has_truth else [])
    header = ["", "all pairs" + (" (labels)" if has_truth else ""), "controversial", "agreed"]
    header += (["true preference"] if has_truth else []) + ["pairs"]
    rows = [["all users", *(format_percent(metrics.get(key)) for key in keys), str(metrics["n_eval"])]]
    if len(breakdown) <= MAX_USER_BARS:
        rows += [
            [f"user {u}", *(format_percent(r.get(key)) for key in keys), str(r["n"])] for u, r in breakdown.items()
        ]
    lines = _table(header, rows)
    if len(breakdown) > MAX_USER_BARS:
        per_user = sorted(r["accuracy"] for r in breakdown.values())
        lines += ["", f"{len(per_user)} users; a user's accuracy against their labels: median "
                  f"{format_percent(float(np.median(per_user)))}, worst 10% of users "
                  f"{format_percent(worst_fraction_mean(per_user))}, best {format_percent(per_user[-1])}"
                  + (f"; against the true preference, worst 10% {format_percent(metrics['true_accuracy_worst_decile'])}"
                     if has_truth else "") + "."]
    if metrics.get("controversy_unknown"):
        lines += ["", f"{metrics['controversy_unknown']} pairs carry no `controversial` flag: they are counted in all "
                      "pairs only, neither controversial nor agreed."]
    return lines


def _latent_sections(metrics: dict[str, Any]) -> list[str]:
    lines: list[str] = []
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
              "trained probe above the untrained one shows that training made z carry the user.", "",
              f"![latent map]({LATENT_PLOT})", "",
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
    return lines


def _new_user_section(result: dict[str, Any]) -> list[str]:
    lines = ["## New users (absent from training, each with their own context)", "",
             f"{result['num_users']} new users, {result['n_eval']} pairs, contexts of "
             f"{result['num_context']} of each user's own pairs.", ""]
    lines += _table(["", "value"], [
        ["accuracy against the labels", format_percent(result["accuracy"])],
        ["accuracy against the true preference", format_percent(result.get("true_accuracy"))],
        ["worst 10% of users (labels)", format_percent(result.get("worst_decile_accuracy"))],
        ["worst 10% of users (true preference)", format_percent(result.get("true_accuracy_worst_decile"))],
        ["controversial pairs", format_percent(result.get("controversial_accuracy"))],
        [
            "with another user's context (context swap)",
            format_percent((result.get("context_swap") or {}).get("accuracy")),
        ],
        ["R^2 of the true weights from z (fitted on training users)",
         "-" if result.get("z_r2") is None else f"{result['z_r2']:.3f}"],
    ])
    curve = result.get("context_curve")
    if curve:
        key = "true_accuracy" if "true_accuracy" in curve else "accuracy"
        lines += ["", f"Accuracy ({'true preference' if key == 'true_accuracy' else 'labels'}) against K of the new "
                      "users' own pairs:", ""]
        lines += _table(["K", "accuracy"], [[str(k), _pct_spread(v)] for k, v in zip(curve["k"], curve[key])])
        lines += ["", f"![new users against K]({NEW_CONTEXT_PLOT})", ""]
    active = result.get("active_queries")
    if active:
        lines += ["Active queries among each new user's context pairs (accuracy "
                  f"{'against the true preference' if 'true_accuracy' in result else 'on their labels'}):", ""]
        lines += _table(["queries", "active", "random"], [
            [
                str(row["queries"]),
                f"{100 * row['active_accuracy_mean']:.1f}%",
                f"{100 * row['random_accuracy_mean']:.1f}%",
            ]
            for row in active["summary"]])
        lines += ["", f"![new users' active queries]({NEW_ACTIVE_PLOT})", ""]
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    show_info_logs()
    (args,) = HfArgumentParser(EvaluateArguments).parse_args_into_dataclasses(args=argv)
    metrics = evaluate(args)
    print(f"{metrics['reward_type']} on {args.dataset}: accuracy {format_percent(metrics['accuracy'])}, "
          f"controversial {format_percent(metrics.get('controversial_accuracy'))}; results in {args.output_dir}")
    return metrics
