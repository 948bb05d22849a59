"""The response pool of the simulated population: real LLM answers in deliberately different styles.

`python -m vpl_trl.data.population_pool --output data/population_pool.jsonl.gz` answers each of our own
prompts (`PROMPTS`) under each style (`STYLES`) with the embedded SmolLM2 (or `--policy`), sampling
`--samples` answers per prompt and style. A 135M model follows system prompts only loosely, so each style
also starts the answer (a prefill, kept in the text) and sets its own length; the rest is sampled.
The pool is generated once and shipped; `python -m vpl_trl.data population` then builds users from it
without any generation. Rows: `{"id", "prompt_id", "prompt", "style", "response"}`.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from dataclasses import dataclass
from pathlib import Path

from transformers.utils import logging

logger = logging.get_logger(__name__)

PROMPTS = (
    # advice
    "How can I get better sleep?",
    "What should I do to prepare for a job interview?",
    "How do I save money on groceries?",
    "My friend is upset with me. How can I make things right?",
    "How can I stay focused while working from home?",
    "What is a good way to start running as a beginner?",
    "How should I deal with stress before an exam?",
    "How do I ask my manager for a raise?",
    "What should I pack for a weekend camping trip?",
    "How can I make my small apartment feel bigger?",
    # explanations
    "Why is the sky blue?",
    "How does a vaccine work?",
    "What is inflation and why does it happen?",
    "How do airplanes stay in the air?",
    "What causes the seasons on Earth?",
    "How does the internet send data from one computer to another?",
    "What is the difference between weather and climate?",
    "Why do we need to sleep?",
    "How do solar panels make electricity?",
    "What is a black hole?",
    # how-to
    "How do I make a simple tomato pasta sauce?",
    "How do I change a flat tire on a car?",
    "How can I learn to play the guitar?",
    "How do I write a good cover letter?",
    "How do I clean a cast iron pan?",
    "How can I start learning a new language?",
    "How do I set up a monthly budget?",
    "How do I take care of a houseplant?",
    "How do I back up the photos on my phone?",
    "How do I give a good presentation?",
    # recommendations
    "Can you recommend a hobby I could start this year?",
    "What are some good books for someone who likes science?",
    "Which city should I visit in Europe for a first trip?",
    "What are some healthy snacks for work?",
    "What is a good pet for a family with small children?",
    "What board games are fun for a group of friends?",
    "Should I buy a laptop or a tablet for college?",
    "What exercises can I do at home without equipment?",
    # short creative tasks
    "Write a short poem about the ocean.",
    "Write a two-sentence story about a lost key.",
    "Give me a name and a slogan for a new coffee shop.",
    "Describe a sunset to someone who has never seen one.",
    "Write a short birthday message for my grandmother.",
    "Invent a new holiday and describe how people celebrate it.",
)


@dataclass(frozen=True)
class Style:
    """A style instruction (system prompt), answer openings (one per sample, cycled) and a length."""

    name: str
    system: str
    openings: tuple[str, ...]
    max_new_tokens: int = 80


STYLES = (
    Style("brief", "Answer in one short sentence. Be extremely brief.",
          ("In short,", "Simply put,", ""), max_new_tokens=24),
    Style("list", "Always answer with a numbered list of short points.",
          ("Here are a few steps:\n\n1.", "Some ideas:\n\n1.", "1."), max_new_tokens=80),
    Style("enthusiastic", "You are extremely enthusiastic and excited! Use lots of exclamation marks!",
          ("Oh, what a wonderful question!", "Wow, I love this!", "Great question!!"), max_new_tokens=64),
    Style("cautious", "You are very cautious. Add safety warnings and suggest consulting a professional.",
          ("Please be careful here.", "Before anything else, a word of caution:", "It is important to stay safe."),
          max_new_tokens=72),
    Style("formal", "You write in a formal, academic register. Avoid contractions and casual words.",
          ("Certainly.", "The matter may be addressed as follows.", "With respect to your inquiry,"),
          max_new_tokens=72),
    Style("facts", "Always give specific numbers, quantities, percentages and facts.",
          ("Here are the key facts and figures:", "In numbers:", "According to the data,"), max_new_tokens=72),
    Style("question", "Ask the user a clarifying question about their situation before answering.",
          ("Could you tell me a bit more about", "Before I answer, may I ask", "That depends. Do you"),
          max_new_tokens=56),
    Style("hedging", "You are unsure. Hedge with words like maybe, perhaps, it might depend.",
          ("I'm not entirely sure, but perhaps", "It might depend, but maybe", "Hmm, possibly"),
          max_new_tokens=64),
    Style("casual", "Talk like a relaxed friend: casual, short sentences, contractions, a bit of slang.",
          ("Honestly?", "Okay so,", "Yeah,"), max_new_tokens=56),
)

_SENTENCE_END = re.compile(r"[.!?:)](?=\s|$)|\n")


def trim_to_sentence(text: str) -> str:
    """Cut a sampled answer after its last complete sentence or line, when it has one."""
    text = text.rstrip()
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    if ends and ends[-1] < len(text) and ends[-1] >= 0.3 * len(text):
        text = text[: ends[-1]]
    return re.sub(r"\n\s*\d+\.?\s*$", "", text).strip()  # a list item left with only its number


def _jobs(tokenizer, prompts, styles, samples: int) -> list[tuple]:
    """(prompt_id, prompt, style, opening, input text, sample), ordered by sample first: the first `len(prompts) *
    len(styles)` jobs answer every prompt in every style once."""
    from ..text import policy_input_text

    jobs = []
    for sample in range(samples):
        for prompt_id, prompt in enumerate(prompts):
            for style in styles:
                messages = [{"role": "system", "content": style.system}, {"role": "user", "content": prompt}]
                opening = style.openings[(prompt_id + sample) % len(style.openings)]
                text = policy_input_text(tokenizer, messages) + opening
                jobs.append((prompt_id, prompt, style, opening, text, sample))
    return jobs


def generate_pool(policy: str | None = None, samples: int = 2, seed: int = 0, batch_size: int = 16,
                  temperature: float = 0.8, repetition_penalty: float = 1.15,
                  prompts: tuple[str, ...] = PROMPTS, styles: tuple[Style, ...] = STYLES,
                  partial: str | Path | None = None, time_limit: float | None = None) -> list[dict]:
    """Generate the pool: `samples` answers per (prompt, style), deterministically from `seed`.

    Finished batches are appended to `partial` (JSONL), from which an interrupted run resumes. Past
    `time_limit` seconds the run stops after its current batch and returns what is done: every prompt and
    style is answered once before any is answered twice.
    """
    import time

    import torch
    from tqdm.auto import tqdm

    from ..embedded_model import DEFAULT_MODEL
    from ..models.causal_lm import load_policy

    model, tokenizer = load_policy(policy or DEFAULT_MODEL)
    device = next(model.parameters()).device
    jobs = _jobs(tokenizer, prompts, styles, samples)
    done: dict[int, dict] = {}
    if partial and Path(partial).exists():
        done = {row["id"]: row for row in map(json.loads, Path(partial).read_text(encoding="utf-8").splitlines())}
    # within a sample, batches of one style share a length budget; the seed is reset per batch (reproducible)
    order = sorted(range(len(jobs)), key=lambda i: (jobs[i][5], jobs[i][2].max_new_tokens, i))
    batches = [order[b : b + batch_size] for b in range(0, len(order), batch_size)]
    started = time.perf_counter()
    for number, batch in enumerate(tqdm(batches, desc="Generating the response pool")):
        if all(i in done for i in batch):
            continue
        if time_limit is not None and time.perf_counter() - started > time_limit:
            logger.warning(f"time limit reached: {len(done)} of {len(jobs)} answers generated")
            break
        torch.manual_seed(seed * 100_003 + number)
        encoded = tokenizer([jobs[i][4] for i in batch], return_tensors="pt", padding=True, padding_side="left",
                            add_special_tokens=False).to(device)
        with torch.no_grad():
            generated = model.generate(
                **encoded, max_new_tokens=max(jobs[i][2].max_new_tokens for i in batch), do_sample=True,
                temperature=temperature, top_p=0.95, repetition_penalty=repetition_penalty,
                pad_token_id=tokenizer.pad_token_id,
            )
        start = encoded["input_ids"].shape[1]
        finished = []
        for i, tokens in zip(batch, generated[:, start:]):
            prompt_id, prompt, style, opening, _, _ = jobs[i]
            text = tokenizer.decode(tokens[: style.max_new_tokens], skip_special_tokens=True)
            finished.append({"id": i, "prompt_id": prompt_id, "prompt": prompt, "style": style.name,
                             "response": trim_to_sentence(opening + text)})
        done.update((row["id"], row) for row in finished)
        if partial:
            with open(partial, "a", encoding="utf-8") as handle:
                handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in finished)
    return [done[i] for i in sorted(done)]


def write_pool(rows: list[dict], path: str | Path) -> None:
    """Gzipped JSONL with a fixed mtime, so the same pool gives the same bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as handle:
        for row in rows:
            handle.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vpl_trl.data.population_pool", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="data/population_pool.jsonl.gz")
    parser.add_argument("--policy", default=None, help="causal LM id or folder (default: the embedded SmolLM2)")
    parser.add_argument("--samples", type=int, default=2, help="answers per prompt and style")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", "--batch-size", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--time_limit_minutes", "--time-limit-minutes", type=float, default=None,
                        help="stop after this long and write what is done (rerun to resume from OUTPUT.partial.jsonl)")
    parser.add_argument("--limit_prompts", "--limit-prompts", type=int, default=None,
                        help="only the first N prompts (a quick look)")
    args = parser.parse_args(argv)
    prompts = PROMPTS[: args.limit_prompts] if args.limit_prompts else PROMPTS
    partial = Path(f"{args.output}.partial.jsonl")
    rows = generate_pool(args.policy, samples=args.samples, seed=args.seed, batch_size=args.batch_size,
                         temperature=args.temperature, prompts=prompts, partial=partial,
                         time_limit=args.time_limit_minutes * 60 if args.time_limit_minutes else None)
    write_pool(rows, args.output)
    if len(rows) == len(prompts) * len(STYLES) * args.samples:
        partial.unlink(missing_ok=True)
    print(f"wrote {len(rows)} responses ({len(prompts)} prompts x {len(STYLES)} styles x up to {args.samples}) "
          f"to {args.output}")


if __name__ == "__main__":
    main()
