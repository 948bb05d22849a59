"""The policy recipe's script (`vpl_trl.scripts.ppo_personalized`, run by `recipes/ppo_personalized.py`) and its
helpers in `vpl_trl.policy`, on tiny models."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

from vpl_trl.data import build_pets
from vpl_trl.data.format import PreferenceDataError
from vpl_trl.data.pets import PROMPT
from vpl_trl.inference.scoring import PersonalizedRewardScorer
from vpl_trl.policy import (
    PersonalizedRewardFunction,
    PolicyConditioning,
    build_policy_dataset,
    context_preamble,
    load_user_pairs,
    policy_prompt,
)
from vpl_trl.scripts import ppo_personalized
from vpl_trl.text import dialogue_messages

USERS = ("harmless", "helpful")


@pytest.fixture(scope="module")
def small_pets(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("small-pets")
    build_pets(folder, n_train_per_user=12, n_test_per_user=4, seed=0)
    return folder


@pytest.fixture(scope="module")
def scorer(tiny_reward_model) -> PersonalizedRewardScorer:
    return PersonalizedRewardScorer.from_pretrained(tiny_reward_model, device="cpu")


def recipe_args(reward_model: str, backbone: str, data: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--reward_model", reward_model, "--user-contexts", str(data), "--model_name_or_path", backbone,
        "--output_dir", str(output_dir), "--max_steps", "2", "--max_completion_length", "6", "--num_context", "3",
        "--preamble_pairs", "1", "--rows_per_user", "4", "--eval_samples", "2", "--report_to", "none",
        "--save_strategy", "no", "--disable_tqdm", "true", *extra,
    ]


def check_adapter(folder: Path) -> None:
    """A LoRA adapter that training moved away from its initialization (lora_B starts at zero)."""
    from safetensors.torch import load_file

    assert (folder / "adapter_config.json").exists()
    weights = load_file(str(folder / "adapter_model.safetensors"))
    lora_b = [w for name, w in weights.items() if "lora_B" in name]
    assert lora_b and any(w.abs().max() > 0 for w in lora_b)


def check_results(output_dir: Path, mode: str) -> dict:
    results = json.loads((output_dir / "eval_results.json").read_text())
    assert results["mode"] == mode and results["users"] == list(USERS)
    for user in USERS:
        own = results["own_reward"][user]
        assert own["before"] == results["matrix_before"][user][user]
        assert own["after"] == results["matrix_after"][user][user]
        assert set(results["matrix_after"][user]) == set(USERS)
    assert (output_dir / "eval_matrix.png").read_bytes().startswith(b"\x89PNG")
    assert set(json.loads((output_dir / "users.json").read_text())["contexts"]) == set(USERS)
    records = [json.loads(line) for line in (output_dir / "eval_completions.jsonl").read_text().splitlines()]
    for stage, matrix in (("before", results["matrix_before"]), ("after", results["matrix_after"])):
        for user in USERS:  # the matrix is the mean of the scored completions it lists
            rows = [r for r in records if r["stage"] == stage and r["policy_for"] == user]
            assert len(rows) == results["eval_prompts"] * results["eval_samples_per_prompt"]
            for scored_by in USERS:
                mean = sum(r["rewards"][scored_by] for r in rows) / len(rows)
                assert mean == pytest.approx(matrix[user][scored_by], abs=1e-5)
    return results


@pytest.mark.slow
@pytest.mark.parametrize("conditioning,signal", [("latent", "bon_sft"), ("latent", "grpo"), ("latent", "dpo"),
                                                 ("text", "bon_sft"), ("text", "grpo"), ("text", "dpo")])
def test_recipe_conditioned_mode(tiny_reward_model, tiny_backbone, small_pets, tmp_path, capsys, conditioning,
                                 signal):
    output_dir = tmp_path / "conditioned"
    ppo_personalized.main(recipe_args(tiny_reward_model, tiny_backbone, small_pets, output_dir, "--mode", "conditioned",
                                      "--conditioning", conditioning, "--signal", signal, "--bon_n", "4"))
    check_adapter(output_dir)
    assert (output_dir / "latent_prompt.safetensors").exists() == (conditioning == "latent")
    policy_config = json.loads((output_dir / "vpl_policy.json").read_text())
    assert policy_config["conditioning"]["kind"] == conditioning and policy_config["signal"] == signal
    # the reward model travels with the policy: copied beside it, recorded relative to it
    assert policy_config["reward_model"] == "reward_model" and (output_dir / "reward_model" / "config.json").exists()
    results = check_results(output_dir, "conditioned")
    assert results["runs"]["all"]["steps"] == 2
    assert set(results["personalization_margin_ci95_after"]) == set(USERS)
    seconds = results["runs"]["all"]["seconds"]
    assert seconds["generation"] > 0 and seconds["scoring"] > 0 and seconds["update"] >= 0
    assert results["eval_prompts_held_out"] is False  # Pets has one prompt: evaluated on the training prompt
    # evaluated as new users: contexts drawn from test pairs, which no training prompt showed
    assert results["eval_contexts_held_out"] is True
    preambles = json.loads((output_dir / "users.json").read_text())["eval_contexts"]
    test_answers = {r["chosen"] for r in load_user_pairs(small_pets, "test")["helpful"]}
    assert preambles["helpful"] and all(pair["chosen"] in test_answers for pair in preambles["helpful"])
    assert "| policy for \\ reward of | harmless | helpful |" in capsys.readouterr().out


@pytest.mark.slow
def test_recipe_offline_pool_round_then_online_rounds(tiny_reward_model, tiny_backbone, small_pets, tmp_path):
    """`--offline_pool`: the first round's pairs come from the pool (scored for every user, no sampling), the next
    round samples the policy; the learning curve holds the policy's rounds only."""
    from vpl_trl.data.pets import KINDS, sentences

    pool = tmp_path / "pool.jsonl"
    answers = [text for kind in KINDS for text in sentences(kind, "test")[:2]]
    pool.write_text("".join(json.dumps({"prompt": "Please talk about one kind of pet.", "response": a}) + "\n"
                            for a in answers))
    output_dir = tmp_path / "offline"
    ppo_personalized.main(recipe_args(tiny_reward_model, tiny_backbone, small_pets, output_dir, "--mode", "conditioned",
                                      "--signal", "dpo", "--bon_n", "4", "--bon_keep", "1", "--bon-epochs-per-round",
                                      "1", "--per_device_train_batch_size", "2", "--num_generations", "2",
                                      "--offline-pool", str(pool)))
    results = check_results(output_dir, "conditioned")
    rounds = results["runs"]["all"]["rounds"]
    assert [r["round"] for r in rounds] == [0, 1] and rounds[0]["offline"] and "offline" not in rounds[1]
    assert [point["step"] for point in results["runs"]["all"]["curve"]] == [rounds[1]["step"]]
    scored = [json.loads(line) for line in (output_dir / "round_candidates.jsonl").read_text().splitlines()]
    offline = [r for r in scored if r["round"] == 0]
    tokenizer = AutoTokenizer.from_pretrained(tiny_backbone)
    cut = {tokenizer.decode(tokenizer(a, add_special_tokens=False)["input_ids"][:6]).strip() for a in answers}
    # the pool's answers, cut to the policy's --max_completion_length (6 tokens)
    assert {r["completion"].strip() for r in offline} == cut and {r["user_id"] for r in offline} == set(USERS)
    assert len([r for r in scored if r["round"] == 1]) == 4 * len(USERS)  # bon_n sampled per user and prompt


@pytest.mark.slow
def test_recipe_runs_follow_their_seed_not_the_process_rng(tiny_reward_model, tiny_backbone, small_pets, tmp_path):
    """The same `--seed` trains the same policy whatever the process drew before (a benchmark that trains reward
    models first, a fresh process): the adapter and soft prompt start from the run's seed."""
    from safetensors.torch import load_file

    weights = []
    for draws in (1, 2):
        torch.manual_seed(draws)  # the process's RNG history before the recipe runs
        torch.rand(draws)
        output_dir = tmp_path / f"after-{draws}-draws"
        ppo_personalized.main(recipe_args(tiny_reward_model, tiny_backbone, small_pets, output_dir, "--mode",
                                          "conditioned", "--signal", "dpo", "--bon_n", "2", "--bon_keep", "1",
                                          "--max_steps", "1", "--seed", "7"))
        weights.append({**load_file(str(output_dir / "adapter_model.safetensors")),
                        **load_file(str(output_dir / "latent_prompt.safetensors"))})
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


@pytest.mark.slow
def test_recipe_without_evaluation_trains_and_records_its_runs(tiny_reward_model, tiny_backbone, small_pets,
                                                               tmp_path, monkeypatch):
    """`--eval_samples 0`: no policy answers the held-out prompts; the policy and its training runs are written."""

    def no_evaluation(*args, **kwargs):
        raise AssertionError("evaluated with --eval_samples 0")

    monkeypatch.setattr(ppo_personalized.PolicyEvaluation, "__call__", no_evaluation)
    output_dir = tmp_path / "no-eval"
    ppo_personalized.main(recipe_args(tiny_reward_model, tiny_backbone, small_pets, output_dir, "--mode", "conditioned",
                                      "--signal", "dpo", "--bon_n", "2", "--bon_keep", "1", "--max_steps", "1",
                                      "--eval_samples", "0"))
    check_adapter(output_dir)
    results = json.loads((output_dir / "eval_results.json").read_text())
    assert results["users"] == list(USERS) and results["runs"]["all"]["steps"] == 1
    assert "matrix_after" not in results and results["eval_prompts"] == 0
    assert not (output_dir / "eval_matrix.png").exists() and not (output_dir / "eval_completions.jsonl").exists()


@pytest.mark.slow
def test_recipe_per_user_mode_from_yaml_config(tiny_reward_model, tiny_backbone, small_pets, tmp_path):
    output_dir = tmp_path / "per-user"
    config = tmp_path / "recipe.yaml"
    train_prompts, eval_prompts = tmp_path / "train.jsonl", tmp_path / "eval.txt"
    train_prompts.write_text(
        json.dumps({"prompt": PROMPT}) + "\n" + json.dumps({"prompt": "Human: A pet?\n\nAssistant:"}) + "\n"
    )
    eval_prompts.write_text("Which pet do you like?\nSay something about cats.\n")
    config.write_text(
        f"mode: per_user\nnum_iterations: 1\nbeta: 0.0\nprompts: {train_prompts}\neval_prompts: {eval_prompts}\n"
    )
    ppo_personalized.main(recipe_args(tiny_reward_model, tiny_backbone, small_pets, output_dir,
                                      "--config", str(config)))
    for user in USERS:
        check_adapter(output_dir / "adapters" / user)
    results = check_results(output_dir, "per_user")
    assert results["eval_prompts_held_out"] is True and results["eval_prompts"] == 2
    assert "eval_contexts_held_out" not in results  # per-user policies see no user context
    assert {u: r["steps"] for u, r in results["runs"].items()} == {u: 2 for u in USERS}


@pytest.mark.slow
def test_recipe_shared_mode_trains_one_user_blind_policy(tiny_base_reward_model, tiny_backbone, small_pets,
                                                         tmp_path):
    """The standard RLHF baseline: one policy, blind to users, against a Bradley-Terry reward."""
    output_dir = tmp_path / "shared"
    ppo_personalized.main(recipe_args(tiny_base_reward_model, tiny_backbone, small_pets, output_dir, "--mode", "shared",
                                      "--bon_n", "2"))
    check_adapter(output_dir)
    policy_config = json.loads((output_dir / "vpl_policy.json").read_text())
    assert policy_config["conditioning"]["kind"] == "none" and policy_config["signal"] == "bon_sft"
    results = check_results(output_dir, "shared")
    assert list(results["runs"]) == ["all"] and results["runs"]["all"]["steps"] == 2
    # one policy that sees no user, and one reward for all: every user is served and scored alike
    assert results["matrix_after"]["harmless"] == results["matrix_after"]["helpful"]
    assert results["matrix_after"]["harmless"]["harmless"] == results["matrix_after"]["harmless"]["helpful"]
    rounds = [json.loads(line) for line in (output_dir / "round_candidates.jsonl").read_text().splitlines()]
    assert {r["user_id"] for r in rounds} == set(USERS) and all(isinstance(r["reward"], float) for r in rounds)


def test_resume_flags_fail_before_any_model_loads(tiny_reward_model, tiny_backbone, small_pets, tmp_path):
    with pytest.raises(SystemExit, match="no intact checkpoint-\\* folder in"):
        ppo_personalized.main(recipe_args(tiny_reward_model, tiny_backbone, small_pets, tmp_path / "fresh",
                                          "--resume_from_checkpoint", "true"))
    with pytest.raises(SystemExit, match="per_user resumes each user's run .* --resume_from_checkpoint true"):
        ppo_personalized.main(recipe_args(tiny_reward_model, tiny_backbone, small_pets, tmp_path / "users", "--mode",
                                          "per_user", "--resume_from_checkpoint", str(tmp_path / "checkpoint-2")))


def test_reward_function_scores_each_completion_under_its_user(scorer, pets_data, precision):
    contexts = {u: [r for r in pets_data["train"] if r["user_id"] == u][:4] for u in USERS}
    latents = {u: scorer.user_latent(c, user_id=u) for u, c in contexts.items()}
    reward = PersonalizedRewardFunction(scorer, latents)
    completions = [
        [{"role": "assistant", "content": " Dogs are loyal."}], [{"role": "assistant", "content": "Cats."}]
    ] * 2
    users = ["harmless", "helpful", "helpful", "harmless"]
    logged = {}
    rewards = reward(["ignored"] * 4, completions, user_id=users, raw_prompt=[PROMPT] * 4,
                     log_metric=logged.__setitem__, trainer_state=None)
    texts = ["Dogs are loyal.", "Cats.", "Dogs are loyal.", "Cats."]
    for reward_value, text, user in zip(rewards, texts, users):
        # scored in one batch of four, and alone: padding differs, so bf16 rounds differently
        assert reward_value == precision.approx(scorer.score([PROMPT], [text], latents[user])[0])
    assert set(logged) == {"reward/harmless", "reward/helpful"}
    with pytest.raises(KeyError, match="carol"):
        reward(["p"], ["x"], user_id=["carol"], raw_prompt=[PROMPT])


def test_evaluation_scores_each_users_own_completions(scorer, pets_data, monkeypatch):
    from vpl_trl.inference.generation import GenerationSettings
    from vpl_trl.policy import PolicyEvaluation, evaluation

    users = ["u0", "u1", "u2"]
    pairs = {user: [r for r in pets_data["train"] if r["user_id"] == user] for user in USERS}
    contexts = {u: pairs[USERS[i % 2]][i : i + 4] for i, u in enumerate(users)}
    user_latents = {u: scorer.user_latent(c, user_id=u) for u, c in contexts.items()}

    def fake_generate(model, tokenizer, prompts, n, settings, latents=None, progress=None):
        # each answer names the user whose latent it was conditioned on, and its prompt's last letter
        owners = [next(u for u in users if torch.equal(row, user_latents[u][0])) for row in latents]
        return [[f"{owner}: {prompt[-1]} #{k}" for k in range(n)] for owner, prompt in zip(owners, prompts)]

    monkeypatch.setattr(evaluation, "generate_candidates", fake_generate)
    evaluate = PolicyEvaluation(scorer, user_latents, ["Pets? A", "Pets? B"], contexts, PolicyConditioning("latent"),
                                False, 2, GenerationSettings())
    rows, records = evaluate(None, None, users, "after")
    for user in users:
        mine = [r for r in records if r["policy_for"] == user]
        assert [(r["prompt"], r["completion"]) for r in mine] == [
            ("Pets? A", f"{user}: A #0"), ("Pets? A", f"{user}: A #1"),
            ("Pets? B", f"{user}: B #0"), ("Pets? B", f"{user}: B #1"),
        ]
        for scored_by in users:  # each answer's rewards are its own: scored with the others as alone
            alone = [scorer.score([r["prompt"]], [r["completion"]], user_latents[scored_by])[0] for r in mine]
            assert [r["rewards"][scored_by] for r in mine] == pytest.approx(alone, abs=1e-5)
            assert rows[user][scored_by] == pytest.approx(sum(alone) / 4, abs=1e-5)


def test_conditioning_preamble_and_dataset():
    context = [{"prompt": PROMPT, "chosen": " Dogs are great.", "rejected": " Cats, I suppose."}] * 3
    preamble = context_preamble(context, max_pairs=2)
    assert preamble.count("- preferred: Dogs are great. / over: Cats, I suppose.") == 2
    assert policy_prompt(PROMPT, context, chat=False, max_pairs=2) == f"{preamble}\n\n{PROMPT}"
    assert policy_prompt(PROMPT, None, chat=True) == [{"role": "user", "content": "Please talk about one kind of pet."}]
    assert policy_prompt("Hi there", None, chat=True) == [{"role": "user", "content": "Hi there"}]
    chat_prompt = [{"role": "user", "content": "hi"}]
    assert policy_prompt(chat_prompt, context, chat=True, max_pairs=2) == (
        [{"role": "system", "content": preamble}] + chat_prompt
    )
    dataset = build_policy_dataset(["p1", "p2"], {"a": context, "b": context}, PolicyConditioning("text", 1),
                                   chat=False, rows_per_user=3)
    assert len(dataset) == 6 and set(dataset.column_names) == {"prompt", "raw_prompt", "bare_prompt", "user_id"}
    assert all(row["prompt"].endswith(row["raw_prompt"]) and "preferred:" in row["prompt"] for row in dataset)
    # users with fewer rows than prompts take turns through them: together they cover every prompt
    dataset = build_policy_dataset(["p1", "p2", "p3", "p4"], {"a": context, "b": context}, PolicyConditioning("none"),
                                   chat=False, rows_per_user=2)
    prompts_of = {user: sorted(row["raw_prompt"] for row in dataset if row["user_id"] == user) for user in "ab"}
    assert prompts_of == {"a": ["p1", "p2"], "b": ["p3", "p4"]}


def test_dialogue_prompts_become_chat_turns():
    dialogue = "\n\nHuman: Hi.\n\nAssistant: Hello!\n\nHuman: A pet?\n\nAssistant:"
    assert dialogue_messages(dialogue) == [
        {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "A pet?"},
    ]
    for not_a_dialogue in (
        "Please talk about a pet.", "Human: Hi.\n\nAssistant: Hello!", "Assistant:", "Note\n\nHuman: x\n\nAssistant:"
    ):
        assert dialogue_messages(not_a_dialogue) is None


def test_user_contexts_from_a_mapping_file(tmp_path):
    pair = {"prompt": "q", "chosen": "a", "rejected": "b"}
    (tmp_path / "ann.jsonl").write_text(json.dumps(pair) + "\n")
    mapping = tmp_path / "users.json"
    mapping.write_text(json.dumps({"ann": "ann.jsonl", "ben": [pair, pair]}))
    assert load_user_pairs(mapping) == {"ann": [pair], "ben": [pair, pair]}
    mapping.write_text(json.dumps({"ann": [{"chosen": "a"}]}))
    with pytest.raises(PreferenceDataError, match="user 'ann', pair 1: missing field `rejected`"):
        load_user_pairs(mapping)


def test_config_defaults_suit_cpu(tmp_path):
    args = ppo_personalized.PersonalizedGRPOConfig(output_dir=str(tmp_path))
    assert not args.use_vllm and args.num_generations >= 2
    assert args.per_device_train_batch_size % args.num_generations == 0


@pytest.mark.parametrize("gpu,bf16_capable,fp16,expected", [
    (False, False, False, False),  # a CPU
    (True, False, False, False),  # a GPU without bf16
    (True, True, False, True),  # a bf16-capable GPU
    (True, True, True, False),  # fp16 asked for
])
def test_bf16_defaults_to_on_only_on_a_bf16_capable_gpu(tmp_path, monkeypatch, gpu, bf16_capable, fp16, expected):
    cuda = SimpleNamespace(is_available=lambda: gpu, is_bf16_supported=lambda: bf16_capable)
    monkeypatch.setattr(ppo_personalized, "torch", SimpleNamespace(cuda=cuda))
    # The machine's own checks of the precision (TrainingArguments) are not what is tested here.
    monkeypatch.setattr(ppo_personalized.GRPOConfig, "__post_init__", lambda self: None)
    assert ppo_personalized.PersonalizedGRPOConfig(output_dir=str(tmp_path), fp16=fp16).bf16 is expected
    assert ppo_personalized.PersonalizedGRPOConfig(output_dir=str(tmp_path), bf16=False).bf16 is False  # as given


def test_margin_interval_brackets_the_margin():
    from vpl_trl.policy import margin_interval

    def record(policy_for, own, other):
        return {"stage": "after", "policy_for": policy_for, "rewards": {"a": own, "b": other}}

    exact = [record("a", 3.0, 0.0)] * 4 + [record("b", 1.0, 5.0)] * 4
    assert margin_interval(exact, "a") == pytest.approx((2.0, 2.0))  # 3 (own) - 1 (b's policy under a's reward)
    noisy = [record("a", 3.0 + 0.5 * (-1) ** i, 0.0) for i in range(16)] + [record("b", 1.0, 5.0)] * 16
    low, high = margin_interval(noisy, "a")
    assert low < 2.0 < high and high - low < 1.0
    overlapping = [record("a", float(i % 5), 0.0) for i in range(8)] + [
        record("b", float(i % 5), 0.0) for i in range(8)
    ]
    low, high = margin_interval(overlapping, "a")
    assert low < 0.0 < high


@pytest.mark.parametrize("users", [3, 40])
def test_cross_user_matrix_png_and_table_stay_readable_for_many_users(tmp_path, users):
    from vpl_trl.policy import format_results, plot_matrices, summarize

    names = [f"user_{i:03d}" for i in range(users)]
    matrix = {a: {b: float(a == b) + 0.01 * j for j, b in enumerate(names)} for a in names}
    results = summarize(matrix, matrix)
    png = plot_matrices(results, tmp_path / "eval_matrix.png").read_bytes()
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert png.startswith(b"\x89PNG") and width <= 3100 and height <= 1500  # 12 users' size at most
    table = format_results(results)
    assert all(f"| {name} | +" in table for name in names)  # every user's own-reward row
    printed_matrix = "| policy for \\ reward of |" in table
    assert printed_matrix == (users <= 12) and ("eval_results.json and eval_matrix.png" in table) == (users > 12)


# ----- the rounds' configs ---------------------------------------------------------------------------------------


def test_round_configs_defaults_and_validation(tmp_path):
    from trl import DPOConfig, SFTConfig

    from vpl_trl.policy import (
        BestOfNDistillationConfig,
        BestOfNDistillationTrainer,
        RewardRankedDPOConfig,
        RewardRankedDPOTrainer,
    )

    common = {"output_dir": str(tmp_path), "report_to": "none", "bf16": False}
    dpo = RewardRankedDPOConfig(**common)
    assert isinstance(dpo, DPOConfig) and dpo.precompute_ref_log_probs and not dpo.replay
    assert (dpo.bon_n, dpo.bon_keep, dpo.bon_epochs_per_round, dpo.offline_pool) == (16, 2, 6, None)
    assert dpo.generation.max_new_tokens == dpo.max_completion_length == 48 and dpo.generation.seed is None
    sft = BestOfNDistillationConfig(**common, bon_n=4, bon_keep=4, max_completion_length=12)
    assert isinstance(sft, SFTConfig) and sft.replay and sft.generation.max_new_tokens == 12

    with pytest.raises(ValueError, match="bon_keep=3 pairs per prompt need at least 6 candidates; got bon_n=5"):
        RewardRankedDPOConfig(**common, bon_n=5, bon_keep=3)
    with pytest.raises(ValueError, match="precompute_ref_log_probs must be True: .* the policy as each round begins"):
        RewardRankedDPOConfig(**common, precompute_ref_log_probs=False)
    with pytest.raises(ValueError, match="bon_keep=5 examples per prompt need at least 5 candidates; got bon_n=4"):
        BestOfNDistillationConfig(**common, bon_n=4, bon_keep=5)
    with pytest.raises(ValueError, match="bon_epochs_per_round must be at least 1, got 0"):
        BestOfNDistillationConfig(**common, bon_epochs_per_round=0)
    with pytest.raises(ValueError, match="offline_pool .*missing.jsonl: no such file"):
        RewardRankedDPOConfig(**common, offline_pool=str(tmp_path / "missing.jsonl"))
    with pytest.raises(TypeError, match="RewardRankedDPOTrainer takes a config with the rounds' fields .*DPOConfig"):
        RewardRankedDPOTrainer(None, DPOConfig(**common), None, None, None)
    with pytest.raises(TypeError, match="a BestOfNDistillationConfig"):
        BestOfNDistillationTrainer(None, SFTConfig(**common), None, None, None)


def test_round_configs_parse_from_yaml_and_flags_in_both_spellings(tmp_path):
    from trl import TrlParser

    from vpl_trl.policy import BestOfNDistillationConfig, RewardRankedDPOConfig

    pool = tmp_path / "pool.jsonl"
    pool.write_text(json.dumps({"prompt": "q", "response": "a"}) + "\n")
    config = tmp_path / "dpo.yaml"
    config.write_text("bon_n: 8\nbon_epochs_per_round: 2\nbeta: 0.2\nreport_to: none\nbf16: false\n")
    (dpo,) = TrlParser((RewardRankedDPOConfig,)).parse_args_and_config(
        ["--config", str(config), "--output-dir", str(tmp_path), "--bon-keep", "3", "--offline_pool", str(pool),
         "--generation-batch-size", "4", "--contrast-pairs", "1", "--consensus_pairs", "2",
         "--offline-contrast-pairs", "0", "--offline_consensus_pairs", "3"]
    )
    assert (dpo.bon_n, dpo.bon_keep, dpo.bon_epochs_per_round, dpo.beta, dpo.contrast_pairs) == (8, 3, 2, 0.2, 1)
    assert dpo.consensus_pairs == 2
    assert (dpo.pair_mix(offline=True), dpo.pair_mix(offline=False)) == ((0, 3), (1, 2))  # the offline round's own
    assert dpo.offline_pool == str(pool) and dpo.generation.batch_size == 4

    # the recipe composes the same fields: its flags and YAML keys build the signal's config
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text((Path(__file__).parents[1] / "recipes/configs/ppo_population.yaml").read_text())
    for spelling in ("--bon_n", "--bon-n"):
        script_args, rounds, args, _ = ppo_personalized.make_parser().parse_args_and_config(
            ["--config", str(recipe), "--reward-model", "r", "--output_dir", str(tmp_path / "out"), spelling, "6",
             "--offline-pool", str(pool), "--dpo-beta", "0.3", "--report_to", "none"]
        )
        # YAML, then the flag
        assert (rounds.bon_n, rounds.bon_keep, rounds.contrast_pairs, rounds.bon_epochs_per_round) == (6, 2, 1, 1)
        dpo = ppo_personalized.signal_args("dpo", args, script_args, rounds)
        assert isinstance(dpo, RewardRankedDPOConfig) and (dpo.bon_n, dpo.bon_keep, dpo.beta) == (6, 2, 0.3)
        assert (dpo.contrast_pairs, dpo.consensus_pairs, dpo.latent_prompt_lr_ratio) == (1, 1, 10.0)
        assert dpo.pair_mix(offline=True) == (0, 2)  # the pool's round: the consensus only
        assert dpo.share_online_candidates and script_args.rows_per_user == 1
        assert dpo.learning_rate == script_args.dpo_learning_rate and dpo.loss_type == ["sigmoid", "sft"]
        assert dpo.max_completion_length == args.max_completion_length == 48 and dpo.offline_pool == str(pool)
        assert dpo.candidates_file == str(tmp_path / "out" / "round_candidates.jsonl")
        sft = ppo_personalized.signal_args("bon_sft", args, script_args, rounds)
        assert isinstance(sft, BestOfNDistillationConfig) and sft.replay and sft.learning_rate == 1.0e-3
        assert sft.latent_prompt_lr_ratio == args.latent_prompt_lr_ratio == 10.0
        assert ppo_personalized.signal_args("grpo", args, script_args, rounds) is args

    # a user-blind policy on the same YAML (benchmarks/policy_population.py's flags): two pairs, no contrast pair
    script_args, rounds, args, _ = ppo_personalized.make_parser().parse_args_and_config(
        ["--config", str(recipe), "--reward-model", "r", "--output_dir", str(tmp_path / "out"), "--mode", "shared",
         "--contrast_pairs", "0", "--offline_contrast_pairs", "0", "--bon_keep", "2"]
    )
    blind = ppo_personalized.signal_args("dpo", args, script_args, rounds)
    assert (blind.pair_mix(offline=True), blind.pair_mix(offline=False)) == ((0, 2), (0, 1))


def test_recipe_refuses_bad_round_settings_before_loading_models(tmp_path):
    with pytest.raises(SystemExit, match="--signal dpo: bon_keep=3 pairs per prompt need at least 6 candidates"):
        ppo_personalized.main(["--reward_model", str(tmp_path / "not-loaded"), "--output_dir", str(tmp_path / "out"),
                               "--bon_n", "4", "--bon_keep", "3", "--report_to", "none"])


def test_recipe_refuses_negative_eval_samples_before_loading_models(tmp_path):
    with pytest.raises(SystemExit, match="--eval_samples -1: expected 0"):
        ppo_personalized.main(["--reward_model", str(tmp_path / "not-loaded"), "--output_dir", str(tmp_path / "out"),
                               "--eval_samples", "-1", "--report_to", "none"])


def test_recipe_refuses_a_missing_init_adapter_before_loading_models(tmp_path):
    with pytest.raises(SystemExit, match="--init_adapter .*missing: no adapter_config.json there"):
        ppo_personalized.main(["--reward_model", str(tmp_path / "not-loaded"), "--output_dir", str(tmp_path / "out"),
                               "--init-adapter", str(tmp_path / "missing"), "--report_to", "none"])


def test_candidate_pool_reads_the_shipped_population_pool():
    from vpl_trl.data.population import dialogue_prompt, load_pool
    from vpl_trl.policy import candidate_pool

    rows = load_pool(Path(__file__).parents[1] / "data" / "population_pool.jsonl.gz")
    pool = candidate_pool(Path(__file__).parents[1] / "data" / "population_pool.jsonl.gz")
    prompts = {row["prompt"] for row in rows}
    assert len(prompts) == 44 and len(pool) == 2 * len(prompts)  # each prompt as written and as a dialogue prompt
    for prompt in prompts:
        assert pool[prompt] is pool[dialogue_prompt(prompt)] and len(pool[prompt]) >= 2
    assert sum(len(pool[p]) for p in prompts) == len({(row["prompt"], row["response"]) for row in rows})
