"""Personalized best-of-n, on tiny models: the `python -m vpl_trl.sample` CLI and the Python API
(`vpl_trl.inference.best_of_n`, `vpl_trl.inference.generation`, `vpl_trl.inference.scoring`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vpl_trl.data.format import PreferenceDataError
from vpl_trl.data.pets import PROMPT
from vpl_trl.data.user_files import load_user_context, read_prompts
from vpl_trl.embeddings import _tokenize
from vpl_trl.inference.best_of_n import PersonalizedBestOfN
from vpl_trl.inference.generation import GenerationSettings, generate_candidates
from vpl_trl.inference.sample import main
from vpl_trl.inference.scoring import PersonalizedRewardScorer
from vpl_trl.models.causal_lm import load_policy
from vpl_trl.text import render_text

FAST = ["--max_new_tokens", "6", "--batch_size", "4"]


def context_pairs(pets_data, user: str, k: int = 4) -> list[dict]:
    rows = [r for r in pets_data["train"] if r["user_id"] == user][:k]
    return [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows]


@pytest.fixture(scope="module")
def context_file(tmp_path_factory, pets_data) -> str:
    path = tmp_path_factory.mktemp("context") / "helpful.json"
    path.write_text(json.dumps(context_pairs(pets_data, "helpful")))
    return str(path)


@pytest.fixture(scope="module")
def best_of_n(tiny_reward_model, tiny_backbone) -> PersonalizedBestOfN:
    return PersonalizedBestOfN.from_pretrained(
        tiny_reward_model, policy=tiny_backbone, settings=GenerationSettings(max_new_tokens=6, batch_size=4)
    )


def check_ranking(result: dict, n: int) -> None:
    rewards = [c["reward"] for c in result["candidates"]]
    assert len(rewards) == n
    assert rewards == sorted(rewards, reverse=True)
    assert result["best"]["reward"] == max(rewards)
    assert result["best"] == result["candidates"][0]


def test_cli_end_to_end_json(tiny_reward_model, tiny_backbone, context_file):
    command = [
        sys.executable, "-m", "vpl_trl.sample", "--reward-model", tiny_reward_model, "--user-context", context_file,
        "--prompt", PROMPT, "--policy", tiny_backbone, "--n", "4", "--max-new-tokens", "6", "--json",
    ]
    env = {**os.environ, "WANDB_MODE": "offline"}  # transformers then prints a notice on import: not to stdout
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["prompt"] == PROMPT
    check_ranking(result, 4)


def test_cli_underscore_flags_and_prompts_file(tiny_reward_model, tiny_backbone, context_file, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in (PROMPT, "Tell me about pets.")) + "\n")
    code = main(["--reward_model", tiny_reward_model, "--user_context", context_file, "--prompts", str(prompts),
                 "--policy", tiny_backbone, "--n", "3", "--json", *FAST])
    assert code == 0
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in results] == [PROMPT, "Tell me about pets."]
    for result in results:
        check_ranking(result, 3)


def test_cli_text_output_and_prior_user(tiny_reward_model, tiny_backbone, capsys):
    code = main(["--reward_model", tiny_reward_model, "--prompt", "Talk about a pet.", "--policy", tiny_backbone,
                 "--n", "2", *FAST])
    assert code == 0
    captured = capsys.readouterr()
    assert "no --user_context given" in captured.err and "prior mean user" in captured.err
    assert "Best (reward" in captured.out and "Candidates:" in captured.out


@pytest.mark.parametrize(
    "name, content, expected",
    [
        (
            "bad.jsonl",
            '{"chosen": "a", "rejected": "b"}\n\n{"chosen": "a"}\n',
            "bad.jsonl, line 3: missing field `rejected`",
        ),
        ("bad.json", '[{"chosen": "a", "rejected": "b"}, 3]', "bad.json, entry 2: expected an object"),
        ("broken.json", '[{"chosen": "a",\n "rejected": }]', "broken.json, line 2: not valid JSON"),
        ("empty.json", "[]", "empty.json: no context pairs"),
    ],
)
def test_cli_rejects_bad_context_files(tiny_reward_model, tmp_path, capsys, name, content, expected):
    path = tmp_path / name
    path.write_text(content)
    code = main(["--reward_model", tiny_reward_model, "--user_context", str(path), "--prompt", "x"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and expected in err and "\n" not in err


def test_cli_missing_reward_model_is_a_one_line_error(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    assert main(["--reward_model", str(missing), "--prompt", "x"]) == 2
    assert capsys.readouterr().err == f"error: reward model {missing}: no such directory.\n"


def test_cli_rejects_a_folder_that_is_not_a_reward_model(tiny_backbone, capsys):
    assert main(["--reward_model", tiny_backbone, "--prompt", "x"]) == 2
    assert "not a VPL reward model" in capsys.readouterr().err


def test_cli_needs_exactly_one_prompt_source(tiny_reward_model, capsys):
    assert main(["--reward_model", tiny_reward_model]) == 2
    assert "exactly one of --prompt" in capsys.readouterr().err


def test_cli_refuses_latent_guidance_for_a_policy_without_a_latent(tiny_reward_model, tiny_backbone, capsys):
    # guidance would silently do nothing: the plain policy has no latent to be guided by
    assert main(["--reward_model", tiny_reward_model, "--policy", tiny_backbone, "--prompt", PROMPT,
                 "--latent-guidance-scale", "2"]) == 2
    err = capsys.readouterr().err
    assert "--latent_guidance_scale guides a latent-conditioned policy" in err and "not a conditioned policy" in err


def test_load_user_context_formats(tmp_path, pets_data):
    pairs = context_pairs(pets_data, "harmless", 2)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (tmp_path / "b.json").write_text(json.dumps({"user_id": "harmless", "context": pairs}))
    assert load_user_context(tmp_path / "a.jsonl") == pairs == load_user_context(tmp_path / "b.json")
    with pytest.raises(PreferenceDataError, match="no such user context file"):
        load_user_context(tmp_path / "missing.json")


def test_read_prompts(tmp_path):
    (tmp_path / "p.txt").write_text("first\n\nsecond\n")
    assert read_prompts(tmp_path / "p.txt") == ["first", "second"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(PreferenceDataError, match="p.jsonl, line 2: missing field `prompt`"):
        read_prompts(tmp_path / "p.jsonl")


def test_latent_cache(best_of_n, pets_data):
    scorer = best_of_n.scorer
    helpful, harmless = context_pairs(pets_data, "helpful"), context_pairs(pets_data, "harmless")
    start = scorer.latent_computations
    z_helpful = scorer.user_latent(helpful)
    assert torch.equal(scorer.user_latent(list(helpful)), z_helpful)  # same pairs: cached by their hash
    assert scorer.latent_computations == start + 1
    best_of_n.rank(PROMPT, context=harmless, user_id="bob", n=2)
    best_of_n.rank(PROMPT, user_id="bob", n=2)  # by user id alone
    assert scorer.latent_computations == start + 2
    z_bob = scorer.user_latent(helpful, user_id="bob")  # bob's pairs changed: re-encoded
    assert scorer.latent_computations == start + 3 and torch.equal(z_bob, z_helpful)
    with pytest.raises(KeyError, match="alice"):
        scorer.user_latent(user_id="alice")
    assert torch.equal(scorer.user_latent(), scorer.model.prior_latent(1))
    assert z_helpful.shape == (1, scorer.model.config.latent_dim)


def test_scores_match_the_reward_model_on_training_texts(best_of_n, pets_data, precision):
    """Scored texts are rendered and embedded as in training: prompt + response, EOS, the model's forward."""
    # A scorer made in this precision: a scorer keeps what it embedded, in the precision it ran in.
    scorer = PersonalizedRewardScorer(best_of_n.scorer.model, best_of_n.scorer.tokenizer)
    context = context_pairs(pets_data, "helpful")
    rows = [r for r in pets_data["test"]][:5]
    latent = scorer.user_latent(context)
    # Pets responses start with a space after "Assistant:"; a chat policy's stripped answer gets it back.
    scored = scorer.score([r["prompt"] for r in rows], [r["chosen"].lstrip() for r in rows], latent)
    texts = [render_text(scorer.tokenizer, r["prompt"], r["chosen"]) for r in rows]
    batch = _tokenize(scorer.tokenizer, texts, max_length=512)
    with torch.no_grad():
        expected = scorer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], latent=latent)
    assert scored == precision.approx(expected.logits.squeeze(-1).tolist())  # the scorer computes in `precision`
    per_row = scorer.score([r["prompt"] for r in rows], [r["chosen"] for r in rows], latent.repeat(5, 1))
    assert per_row == pytest.approx(scored, abs=1e-6)  # the same computation


def test_scoring_truncates_where_training_did(best_of_n):
    """Over-long texts keep their end in training; scoring cuts them at the length the model was trained with."""
    model, tokenizer = best_of_n.scorer.model, best_of_n.scorer.tokenizer
    prompts = ["Human: Talk about a pet.\n\nAssistant:", "Human: Tell me anything at all, please.\n\nAssistant:"]
    answer = "Dogs are loyal and energetic pets."
    saved = model.config.max_sequence_length
    try:
        model.config.max_sequence_length = len(tokenizer(" " + answer + tokenizer.eos_token)["input_ids"])
        scorer = PersonalizedRewardScorer(model, tokenizer)
        assert scorer.max_length == model.config.max_sequence_length
        same = scorer.score(prompts, [answer, answer])
        assert same[0] == pytest.approx(same[1], abs=1e-6)  # the prompts were cut off, as in training
        model.config.max_sequence_length = None
        different = PersonalizedRewardScorer(model, tokenizer).score(prompts, [answer, answer])
        assert different[0] != pytest.approx(different[1], abs=1e-6)
    finally:
        model.config.max_sequence_length = saved


def test_generation_batches_and_seeds(tiny_backbone):
    model, tokenizer = load_policy(tiny_backbone, device="cpu")
    settings = GenerationSettings(max_new_tokens=5, batch_size=3, seed=7)
    first = generate_candidates(model, tokenizer, ["a", "b"], 4, settings)
    assert [len(c) for c in first] == [4, 4]
    assert generate_candidates(model, tokenizer, ["a", "b"], 4, settings) == first
    assert tokenizer.padding_side == "right"


def test_reward_scorer_from_pretrained_errors(tmp_path):
    from vpl_trl.inference.scoring import RewardModelError

    with pytest.raises(RewardModelError, match="no config.json"):
        PersonalizedRewardScorer.from_pretrained(tmp_path)
    assert Path(tmp_path).exists()


def publish_to_hub_cache(folder: str, repo_id: str, cache: Path) -> None:
    """Lay `folder` out as huggingface_hub's cache holds a downloaded repo, so `repo_id` loads offline."""
    revision = "0" * 40
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)


def test_reward_model_loads_from_a_hub_repo_id(tiny_reward_model, context_file, tmp_path):
    """A reward model pushed to the Hub loads by its repo id, with the tokenizer saved beside it (here from a
    hub cache built in the test, offline)."""
    cache = tmp_path / "hub"
    publish_to_hub_cache(tiny_reward_model, "someone/tiny-vpl", cache)
    code = (
        "import json, sys; from vpl_trl.data.user_files import load_user_context; "
        "from vpl_trl.inference.scoring import PersonalizedRewardScorer; "
        "scorer = PersonalizedRewardScorer.from_pretrained('someone/tiny-vpl'); "
        f"latent = scorer.user_latent(load_user_context({context_file!r})); "
        f"print(json.dumps({{'tokenizer': scorer.tokenizer.name_or_path, 'rewards': scorer.score([{PROMPT!r}] * 2, "
        "['Dogs are loyal.', 'Cats.'], latent)}))"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout)
    assert Path(loaded["tokenizer"]).parts[-2:] == ("snapshots", "0" * 40)  # its own tokenizer, not the backbone's
    local = PersonalizedRewardScorer.from_pretrained(tiny_reward_model)
    expected = local.score(
        [PROMPT] * 2, ["Dogs are loyal.", "Cats."], local.user_latent(load_user_context(context_file))
    )
    assert loaded["rewards"] == pytest.approx(expected, abs=1e-6)
