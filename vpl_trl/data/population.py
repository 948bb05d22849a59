"""A simulated user population with ground truth, over real LLM answers (`data/population_pool.jsonl.gz`).

Each answer gets interpretable attributes (`ATTRIBUTES`, plain Python scorers), z-scored over the pool
and clipped to [-3, 3]. A user is a weight vector over them: a shared component plus individual, signed
variation, so users really disagree. A user's utility for an answer is `weights . z(answer)`, and each
label is drawn Bradley-Terry: P(a preferred to b) = sigmoid((u(a) - u(b)) / temperature).

`build_population(output, ...)` writes:

- `train.jsonl`: training users' pairs (`user_000`...); contexts are drawn from a user's other pairs.
- `test.jsonl`: training users' held-out pairs (never among their own training pairs).
- `new_users.jsonl`: users never seen in training (`new_000`...), one row per test pair, each carrying the
  user's own `context` (`--context_pairs` labelled pairs; any prefix of it is a valid K-pair context).
  A new user's context and test pairs are disjoint, and no new user's pair (prompt and two answers, in
  either order) is ever labelled by a training user: the prompt's answer pairs are split between the two
  groups of users before any label is drawn.
- `users.json`: attribute names, the pool standardization, every user's true weights and the settings.

Prompts are written as `Human: ...\n\nAssistant:` and answers with a leading space, as in Pets and HH-RLHF
(`dialogue_prompt`). Every row has `prompt`, `chosen`, `rejected`, `user_id`, `controversial` (the training
users' true preference on the pair is split at least 25/75), `true_margin` (u(chosen) - u(rejected) under
the user's true weights: positive when the noisy label agrees with the true preference) and the answers'
pool ids (`chosen_id`, `rejected_id`).

`true_utility(texts, user, users_file)` and `utility_from_weights(texts, weights, users_file)` score any
answers (a policy's outputs, without their prompt) under the ground truth, standardized as the pool was.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .format import PreferenceDataError, iter_jsonl, write_jsonl

POOL_FILE = "population_pool.jsonl.gz"
PROMPT_TEMPLATE = "Human: {prompt}\n\nAssistant:"
OUTPUT_FILES = ("train.jsonl", "test.jsonl", "new_users.jsonl", "users.json")
Z_CLIP = 3.0
CONTROVERSY = 0.25  # a pair is controversial when at least this fraction of users is on each side

# ----- attributes -------------------------------------------------------------------------------------------

_WORD = re.compile(r"[A-Za-z][A-Za-z'\-]*|\d[\d,.]*%?")
_LIST_ITEM = re.compile(r"^\s*(?:\d+[.)]|[-*\u2022])\s+", re.MULTILINE)
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*%?")
_CONTRACTION = re.compile(r"\b\w+(?:n't|'re|'ll|'ve|'m|'d|'s)\b", re.IGNORECASE)


def _phrases(*words: str) -> re.Pattern:
    return re.compile(r"\b(?:" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)


_ENTHUSIASM = _phrases("great", "wonderful", "amazing", "awesome", "love", "fantastic", "exciting", "excited",
                       "incredible", "wow", "delightful", "perfect", "brilliant", "fun", "thrilled", "absolutely")
_HEDGES = _phrases("maybe", "perhaps", "might", "possibly", "probably", "likely", "unsure", "not sure", "depends",
                   "depend", "seems", "seem", "may", "could", "i guess", "i think", "somewhat", "not entirely")
_CAUTION = _phrases("careful", "caution", "cautious", "safe", "safely", "safety", "risk", "risks", "warning", "warn",
                    "danger", "dangerous", "consult", "professional", "doctor", "avoid", "harm", "injury",
                    "emergency", "never", "be aware")
_FORMAL = _phrases("therefore", "furthermore", "moreover", "however", "additionally", "consequently", "thus",
                   "hence", "regarding", "respect", "inquiry", "considerations", "accordingly", "certainly",
                   "shall", "whereas", "notably", "significant", "essential")
_CASUAL = _phrases("yeah", "okay", "ok", "gonna", "wanna", "kinda", "stuff", "cool", "honestly", "pretty",
                   "lol", "hey", "guys", "super", "totally", "so")


def _words(text: str) -> list[str]:
    return _WORD.findall(text)


def _rate(count: int, text: str) -> float:
    """Occurrences per 100 words, smoothed (10 extra words) so a two-word answer is not extreme."""
    return 100.0 * count / (len(_words(text)) + 10)


def length(text: str) -> float:
    """log(1 + words)."""
    return math.log1p(len(_words(text)))


def structure(text: str) -> float:
    """List items and paragraph breaks: log(1 + items + breaks / 2)."""
    return math.log1p(len(_LIST_ITEM.findall(text)) + 0.5 * text.count("\n\n"))


def enthusiasm(text: str) -> float:
    """Exclamation marks and enthusiastic words per 100 words."""
    return _rate(text.count("!") + len(_ENTHUSIASM.findall(text)), text)


def hedging(text: str) -> float:
    """Hedges (maybe, perhaps, might, it depends...) per 100 words."""
    return _rate(len(_HEDGES.findall(text)), text)


def formality(text: str) -> float:
    """Mean word length plus formal markers minus contractions and casual words (per 100 words, / 10)."""
    words = [w for w in _words(text) if w[0].isalpha()]
    mean_length = sum(len(w) for w in words) / len(words) if words else 0.0
    markers = len(_FORMAL.findall(text)) - len(_CONTRACTION.findall(text)) - len(_CASUAL.findall(text))
    return mean_length + _rate(markers, text) / 10.0


def specifics(text: str) -> float:
    """Numbers, quantities and percentages per 100 words."""
    return _rate(len(_NUMBER.findall(text)), text)


def questions(text: str) -> float:
    """Questions back to the user: log(1 + question marks)."""
    return math.log1p(text.count("?"))


def caution(text: str) -> float:
    """Safety caveats (careful, risk, consult a professional...) per 100 words."""
    return _rate(len(_CAUTION.findall(text)), text)


ATTRIBUTES: dict[str, Callable[[str], float]] = {
    f.__name__: f for f in (length, structure, enthusiasm, hedging, formality, specifics, questions, caution)
}
# Users weigh these by default: the four the frozen SmolLM2 embedding predicts best (linear-probe R^2 0.6-0.8 with
# mean pooling; benchmarks/results/population_attributes.md). Each attribute the embedding predicts poorly adds a
# preference that no model on this backbone can read from a user's pairs: with enthusiasm and questions added,
# even Bayesian inference of the weights from 16 pairs closes well under 60% of the gap between one pooled reward
# and the oracle (benchmarks/results/population.md measures VPL on those harder settings).
DEFAULT_ATTRIBUTES = ("length", "structure", "formality", "specifics")


def raw_attributes(texts: Sequence[str], names: Sequence[str] = tuple(ATTRIBUTES)) -> np.ndarray:
    """(len(texts), len(names)) raw attribute scores."""
    unknown = [n for n in names if n not in ATTRIBUTES]
    if unknown:
        raise PreferenceDataError(f"unknown attribute(s) {unknown}; known: {list(ATTRIBUTES)}.")
    scores = [[ATTRIBUTES[n](t) for n in names] for t in texts]
    return np.array(scores, dtype=np.float64).reshape(len(texts), len(names))


@dataclass
class Standardization:
    """Pool mean and standard deviation of each raw attribute; `apply` gives clipped z-scores."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, raw: np.ndarray) -> Standardization:
        std = raw.std(axis=0)
        return cls(raw.mean(axis=0), np.where(std > 0, std, 1.0))

    def apply(self, raw: np.ndarray) -> np.ndarray:
        return np.clip((raw - self.mean) / self.std, -Z_CLIP, Z_CLIP)


# ----- the response pool ------------------------------------------------------------------------------------


def default_pool_path() -> Path:
    """`data/population_pool.jsonl.gz` under the working directory, else the one shipped in the repository."""
    local = Path("data") / POOL_FILE
    return local if local.exists() else Path(__file__).resolve().parents[2] / "data" / POOL_FILE


def load_pool(path: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """The response pool: rows with `id`, `prompt_id`, `prompt`, `style` and `response`."""
    path = Path(path) if path else default_pool_path()
    if not path.is_file():
        raise PreferenceDataError(
            f"{path}: no response pool; generate one with `python -m vpl_trl.data.population_pool --output {path}`."
        )
    rows = []
    for number, row in iter_jsonl(path):
        missing = [k for k in ("prompt", "response") if not isinstance(row.get(k), str)]
        if missing:
            raise PreferenceDataError(f"{path}, line {number}: missing text field(s) {missing}.")
        rows.append(row)
    if not rows:
        raise PreferenceDataError(f"{path}: the response pool is empty.")
    return rows


# ----- users and their utilities ----------------------------------------------------------------------------


@dataclass
class Population:
    """The ground truth of `users.json`: attributes, their standardization and each user's true weights."""

    attributes: list[str]
    standardization: Standardization
    users: dict[str, dict[str, Any]]
    settings: dict[str, Any]
    source: str = "users.json"

    def weights(self, user: str) -> np.ndarray:
        if user not in self.users:
            raise KeyError(f"{self.source}: no user {user!r} (users: {_preview(self.users)}).")
        return np.asarray(self.users[user]["weights"], dtype=np.float64)

    def attribute_scores(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), n_attributes) standardized (clipped z) scores."""
        return self.standardization.apply(raw_attributes(texts, self.attributes))

    def utility(self, texts: Sequence[str] | str, user_or_weights: str | Sequence[float] | np.ndarray) -> np.ndarray:
        """True utility of each text (an answer, without its prompt) for a user id or a weight vector."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if isinstance(user_or_weights, str):
            weights = self.weights(user_or_weights)
        else:
            weights = np.asarray(user_or_weights, dtype=np.float64)
            if weights.shape != (len(self.attributes),):
                raise ValueError(
                    f"weights must be a vector of {len(self.attributes)} numbers, one per attribute of "
                    f"{self.source} ({', '.join(self.attributes)}); got shape {tuple(weights.shape)}."
                )
        return self.attribute_scores(texts) @ weights

    def to_json(self) -> dict[str, Any]:
        return {
            "attributes": self.attributes,
            "standardization": {"mean": self.standardization.mean.tolist(), "std": self.standardization.std.tolist(),
                                "clip": Z_CLIP},
            "settings": self.settings,
            "users": self.users,
        }

    @classmethod
    def load(cls, path: str | os.PathLike) -> Population:
        """Read and validate `users.json`; errors name the file and the field."""
        path = Path(path)
        if path.is_dir():
            path = path / "users.json"
        if not path.is_file():
            raise PreferenceDataError(f"{path}: no such users file (written by `python -m vpl_trl.data population`).")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise PreferenceDataError(f"{path}, line {error.lineno}: not valid JSON ({error.msg}).") from None
        if not isinstance(data, dict):
            raise PreferenceDataError(f"{path}: expected a JSON object with `attributes` and `users`.")
        attributes = data.get("attributes")
        if not isinstance(attributes, list) or not attributes or not all(a in ATTRIBUTES for a in attributes):
            raise PreferenceDataError(
                f"{path}: field `attributes` must be a non-empty list of attribute names from {list(ATTRIBUTES)}, "
                f"got {attributes!r}."
            )
        n = len(attributes)
        stats = data.get("standardization")
        if not isinstance(stats, dict) or not all(_is_vector(stats.get(k), n) for k in ("mean", "std")):
            raise PreferenceDataError(
                f"{path}: field `standardization` must hold `mean` and `std`, lists of {n} numbers (one per attribute)."
            )
        users = data.get("users")
        if not isinstance(users, dict) or not users:
            raise PreferenceDataError(f"{path}: field `users` must be a non-empty object of user id -> {{weights}}.")
        for user, entry in users.items():
            if not isinstance(entry, dict) or not _is_vector(entry.get("weights"), n):
                raise PreferenceDataError(
                    f"{path}: field `users.{user}.weights` must be a list of {n} numbers "
                    f"(one per attribute: {', '.join(attributes)})."
                )
        standardization = Standardization(np.asarray(stats["mean"], float), np.asarray(stats["std"], float))
        return cls(attributes, standardization, users, data.get("settings", {}), source=str(path))


def has_true_weights(path: str | os.PathLike) -> bool:
    """Whether `path` (a `users.json`) is a simulated population's, with true weights over `attributes`, and not
    another builder's list of real users (`ukp_conv_arg`); a file that is not valid JSON counts as one, so that
    `Population.load` names its error."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return True
    return isinstance(data, dict) and "attributes" in data


def _is_vector(value: Any, n: int) -> bool:
    return (isinstance(value, list) and len(value) == n
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value))


def _preview(users: Mapping[str, Any]) -> str:
    names = list(users)
    return ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")


def true_utility(texts: Sequence[str] | str, user: str, users_file: str | os.PathLike = "data/population/users.json"
                 ) -> np.ndarray:
    """The true utility of each answer (without its prompt) for a user of `users_file`."""
    return Population.load(users_file).utility(texts, user)


def utility_from_weights(texts: Sequence[str] | str, weights: Sequence[float] | np.ndarray,
                         users_file: str | os.PathLike = "data/population/users.json") -> np.ndarray:
    """The utility of each answer under any weight vector (one number per attribute of `users_file`)."""
    return Population.load(users_file).utility(texts, weights)


# ----- building the data set --------------------------------------------------------------------------------


@dataclass
class PopulationConfig:
    """Settings of `build_population`, and the options of `python -m vpl_trl.data population` (each field a flag).

    `attributes` and `shared_weights` may also be given as the command line writes them (`"length,hedging"`,
    `"specifics=1,hedging=-0.5"`), as `TrainingArguments` takes a dict field as a string; they are parsed here.
    """

    train_users: int = field(default=200, metadata={"help": "Training users."})
    new_users: int = field(default=50, metadata={"help": "Users never seen in training."})
    pairs_per_user: int = field(default=32, metadata={"help": "Training pairs of each training user."})
    test_pairs_per_user: int = field(default=8, metadata={"help": "Held-out pairs of each training user (test.jsonl)."})
    context_pairs: int = field(
        default=32, metadata={"help": "Labelled context pairs of each new user (the largest K)."}
    )
    new_test_pairs: int = field(default=64, metadata={"help": "Test pairs of each new user."})
    temperature: float = field(
        default=0.5, metadata={"help": "Bradley-Terry label noise: P(a > b) = sigmoid((u(a) - u(b)) / T)."}
    )
    shared_scale: float = field(
        default=1.0, metadata={"help": "Norm of the component of the weights shared by all users."}
    )
    spread: float = field(default=1.5, metadata={"help": "Expected norm of each user's individual variation."})
    new_pair_fraction: float = field(
        default=0.3, metadata={"help": "Fraction of each prompt's answer pairs reserved for new users."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the users' weights, pairs and labels."})
    attributes: tuple[str, ...] | str | None = field(
        default=DEFAULT_ATTRIBUTES,
        metadata={"help": f"Attributes users weigh, comma-separated, from: {', '.join(ATTRIBUTES)}."},
    )
    shared_weights: dict[str, float] | str | None = field(
        default=None,
        metadata={"help": "The shared component by attribute, e.g. 'specifics=1,hedging=-0.5' (absent attributes 0); "
                          "unset: a random direction of norm --shared_scale, drawn from the seed."},
    )

    def __post_init__(self):
        if self.attributes is None or isinstance(self.attributes, str):
            self.attributes = parse_attributes(self.attributes)
        else:
            self.attributes = tuple(self.attributes)
        if isinstance(self.shared_weights, str):
            self.shared_weights = parse_shared_weights(self.shared_weights)


def draw_weights(config: PopulationConfig, n_users: int, rng: np.random.Generator,
                 shared: np.ndarray) -> np.ndarray:
    """Per-user weights: the shared component plus N(0, spread^2 / d) signed variation per attribute."""
    d = len(shared)
    return shared + rng.normal(0.0, config.spread / math.sqrt(d), size=(n_users, d))


def shared_component(config: PopulationConfig, rng: np.random.Generator) -> np.ndarray:
    """`config.shared_weights` (absent attributes 0), else a random direction of norm `shared_scale`."""
    names = list(config.attributes)
    if config.shared_weights is not None:
        unknown = [k for k in config.shared_weights if k not in names]
        if unknown:
            raise PreferenceDataError(f"--shared_weights names unknown attribute(s) {unknown}; known: {names}.")
        return np.array([float(config.shared_weights.get(n, 0.0)) for n in names])
    direction = rng.normal(size=len(names))
    return config.shared_scale * direction / np.linalg.norm(direction)


def parse_attributes(value: str | None) -> tuple[str, ...]:
    """`"length,hedging"` -> ("length", "hedging"); None -> the default set."""
    if not value:
        return DEFAULT_ATTRIBUTES
    names = tuple(name.strip() for name in value.split(",") if name.strip())
    unknown = [n for n in names if n not in ATTRIBUTES]
    if unknown or len(set(names)) != len(names) or not names:
        raise PreferenceDataError(f"--attributes must name distinct attributes from {list(ATTRIBUTES)}, got {value!r}.")
    return names


def parse_shared_weights(value: str | None) -> dict[str, float] | None:
    """`"length=1,hedging=-0.5"` -> {"length": 1.0, "hedging": -0.5}."""
    if not value:
        return None
    try:
        return {name.strip(): float(number) for name, number in (part.split("=", 1) for part in value.split(","))}
    except ValueError:
        raise PreferenceDataError(f"--shared_weights must look like 'length=1,hedging=-0.5', got {value!r}.") from None


def dialogue_prompt(prompt: str) -> str:
    """A pool prompt as the data sets' dialogue prompt (answers follow it after a space)."""
    return PROMPT_TEMPLATE.format(prompt=prompt)


def _split_pairs(pool: list[dict], fraction: float, rng: np.random.Generator) -> tuple[list, list]:
    """All unordered answer pairs of each prompt, split into the training users' and the new users' pairs."""
    by_prompt: dict[Any, list[int]] = {}
    seen: set[tuple[str, str]] = set()
    for index, row in enumerate(pool):
        if (row["prompt"], row["response"]) not in seen:  # a repeated answer would repeat its pairs
            seen.add((row["prompt"], row["response"]))
            by_prompt.setdefault(row.get("prompt_id", row["prompt"]), []).append(index)
    pairs = [(a, b) for members in by_prompt.values() for i, a in enumerate(members) for b in members[i + 1:]]
    order = rng.permutation(len(pairs))
    n_new = int(round(fraction * len(pairs)))
    return [pairs[i] for i in order[n_new:]], [pairs[i] for i in order[:n_new]]


def _label(user_rng: np.random.Generator, utilities: np.ndarray, pair: tuple[int, int], temperature: float):
    a, b = pair
    if user_rng.random() < 0.5:  # random presentation order, so `a` is not always the lower pool id
        a, b = b, a
    margin = utilities[a] - utilities[b]
    p_a = 1.0 / (1.0 + math.exp(-max(min(margin / temperature, 50.0), -50.0)))
    return (a, b) if user_rng.random() < p_a else (b, a)


def build_population(output: str | os.PathLike, config: PopulationConfig | None = None,
                     pool: str | os.PathLike | list[dict] | None = None) -> dict[str, Any]:
    """Write the population data set to `output` (see the module docstring); returns its statistics."""
    config = config or PopulationConfig()
    _check_config(config)
    rows = pool if isinstance(pool, list) else load_pool(pool)
    texts = [r["response"] for r in rows]
    names = list(config.attributes)
    raw = raw_attributes(texts, names)
    standardization = Standardization.fit(raw)
    scores = standardization.apply(raw)

    weight_rng, pair_rng, shared_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(config.seed).spawn(3))
    shared = shared_component(config, shared_rng)
    user_ids = [f"user_{i:03d}" for i in range(config.train_users)] + [f"new_{i:03d}" for i in range(config.new_users)]
    weights = draw_weights(config, len(user_ids), weight_rng, shared)
    utilities = weights @ scores.T  # (users, answers)
    n_train = config.train_users
    mean_user = (weights[:n_train].mean(axis=0) if n_train else shared) @ scores.T

    train_pairs, new_pairs = _split_pairs(rows, config.new_pair_fraction, pair_rng)
    need_train = config.pairs_per_user + config.test_pairs_per_user
    need_new = config.context_pairs + config.new_test_pairs
    for group, pairs, need in (("training", train_pairs, need_train), ("new", new_pairs, need_new)):
        if len(pairs) < need:
            raise PreferenceDataError(
                f"the pool gives only {len(pairs)} answer pairs to {group} users, who need {need} each; "
                "use a larger pool, fewer pairs per user or another --new_pair_fraction."
            )
    # controversy from the training users' true preferences (what a data set's labellers would disagree on)
    def controversial(a: int, b: int) -> bool:
        share = float(np.mean(utilities[:n_train, a] > utilities[:n_train, b])) if n_train else 0.5
        return min(share, 1.0 - share) >= CONTROVERSY

    def make_row(u: int, pair: tuple[int, int], rng: np.random.Generator) -> dict[str, Any]:
        chosen, rejected = _label(rng, utilities[u], pair, config.temperature)
        return {
            "prompt": dialogue_prompt(rows[chosen]["prompt"]),
            "chosen": " " + rows[chosen]["response"],
            "rejected": " " + rows[rejected]["response"],
            "user_id": user_ids[u],
            "controversial": controversial(chosen, rejected),
            "true_margin": round(float(utilities[u, chosen] - utilities[u, rejected]), 6),
            "chosen_id": rows[chosen].get("id", chosen),
            "rejected_id": rows[rejected].get("id", rejected),
            "_mean_user_margin": float(mean_user[chosen] - mean_user[rejected]),
        }

    splits: dict[str, list[dict]] = {"train": [], "test": [], "new_users": []}
    for u, user in enumerate(user_ids):
        rng = np.random.default_rng([config.seed, u, 1])
        is_new = u >= n_train
        candidates = new_pairs if is_new else train_pairs
        picks = [candidates[i] for i in rng.choice(len(candidates), size=need_new if is_new else need_train,
                                                   replace=False)]
        if is_new:
            context = [{k: r[k] for k in ("prompt", "chosen", "rejected")}
                       for r in (make_row(u, p, rng) for p in picks[: config.context_pairs])]
            for pair in picks[config.context_pairs:]:
                splits["new_users"].append({**make_row(u, pair, rng), "context": context})
        else:
            splits["train"] += [make_row(u, p, rng) for p in picks[: config.pairs_per_user]]
            splits["test"] += [make_row(u, p, rng) for p in picks[config.pairs_per_user:]]

    population = Population(
        names, standardization,
        {user: {"weights": [round(float(w), 6) for w in weights[u]], "split": "new" if u >= n_train else "train"}
         for u, user in enumerate(user_ids)},
        settings={**{k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(config).items()},
                  "shared_weights": [round(float(w), 6) for w in shared], "pool_size": len(rows)},
    )
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    stats = summarize_population(splits)
    for split, split_rows in splits.items():
        write_jsonl(({k: v for k, v in r.items() if not k.startswith("_")} for r in split_rows),
                    output / f"{split}.jsonl")
    population.settings["statistics"] = stats
    (output / "users.json").write_text(json.dumps(population.to_json(), indent=1) + "\n", encoding="utf-8")
    return stats


def _check_config(config: PopulationConfig) -> None:
    if config.temperature <= 0:
        raise PreferenceDataError(f"--temperature must be positive, got {config.temperature}.")
    if not 0 < config.new_pair_fraction < 1 and config.new_users and config.train_users:
        raise PreferenceDataError(f"--new_pair_fraction must be in (0, 1), got {config.new_pair_fraction}.")
    counts = {"--train_users": config.train_users, "--new_users": config.new_users,
              "--pairs_per_user": config.pairs_per_user, "--context_pairs": config.context_pairs,
              "--new_test_pairs": config.new_test_pairs, "--test_pairs_per_user": config.test_pairs_per_user}
    negative = [name for name, value in counts.items() if value < 0]
    if negative:
        raise PreferenceDataError(f"{', '.join(negative)} must not be negative.")


def summarize_population(splits: Mapping[str, list[dict]]) -> dict[str, Any]:
    """Label agreement with the true preference per split (the ceiling of any model against the labels), and
    the accuracy of one shared reward equal to the mean training user (what averaging users gives)."""
    stats: dict[str, Any] = {"rows": {k: len(v) for k, v in splits.items()}}
    for split, rows in splits.items():
        if not rows:
            continue
        agree = [r["true_margin"] > 0 for r in rows if r["true_margin"] != 0]
        # the mean user's preference vs each user's true preference (ties count half)
        mean_margin = np.array([r["_mean_user_margin"] for r in rows])
        true_sign = np.sign([r["true_margin"] for r in rows])
        mean_user = np.mean(np.where(np.sign(mean_margin) == 0, 0.5, np.sign(mean_margin) == true_sign))
        stats[split] = {"label_agreement": round(float(np.mean(agree)), 4),
                        "mean_user_accuracy": round(float(mean_user), 4),
                        "controversial_fraction": round(float(np.mean([r["controversial"] for r in rows])), 4)}
    return stats


def summarize(stats: Mapping[str, Any], output: str | os.PathLike) -> list[str]:
    rows = stats["rows"]
    lines = [f"Population: wrote {rows['train']} train, {rows['test']} test and {rows['new_users']} new-user rows, "
             f"and users.json, to {output}"]
    for split in ("train", "test", "new_users"):
        if split in stats:
            s = stats[split]
            lines.append(f"  {split}: label agreement with the true preference {s['label_agreement']:.1%}, "
                         f"population-mean user {s['mean_user_accuracy']:.1%}, "
                         f"controversial pairs {s['controversial_fraction']:.1%}")
    return lines
