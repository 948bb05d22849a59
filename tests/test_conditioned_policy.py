"""One policy for every user: latent (soft-prompt) and text conditioning, saving and serving, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig
from transformers import AutoTokenizer, LogitsProcessorList

from vpl_trl import VPLRewardConfig, VPLRewardTrainer
from vpl_trl.data import build_pets
from vpl_trl.data.format import PreferenceDataError
from vpl_trl.data.pets import PROMPT
from vpl_trl.inference.generation import GenerationSettings, generate_candidates
from vpl_trl.inference.latent_guidance import LatentGuidanceLogitsProcessor
from vpl_trl.inference.sample import main as sample_main
from vpl_trl.inference.scoring import PersonalizedRewardScorer
from vpl_trl.models.latent_prompt import find_latent_embedding, save_latent_prompt
from vpl_trl.policy import (
    LATENT_TOKEN,
    PolicyConditioning,
    build_policy,
    build_policy_dataset,
    conditioned_on,
    load_conditioned_policy,
    load_user_pairs,
    write_policy_config,
)
from vpl_trl.precision import inference_autocast
from vpl_trl.scripts import ppo_personalized
from vpl_trl.text import policy_input_text

USERS = ("harmless", "helpful")
LORA = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def pairs_of(pets_data, user: str, k: int = 4) -> list[dict]:
    rows = [r for r in pets_data["train"] if r["user_id"] == user][:k]
    return [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in rows]


@pytest.fixture(scope="module")
def scorer(tiny_reward_model) -> PersonalizedRewardScorer:
    return PersonalizedRewardScorer.from_pretrained(tiny_reward_model, device="cpu")


@pytest.fixture(scope="module")
def small_pets(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("small-pets")
    build_pets(folder, n_train_per_user=12, n_test_per_user=4, seed=0)
    return folder


def train_tiny_reward(folder: Path, backbone: str, pets_data, **config) -> str:
    args = VPLRewardConfig(output_dir=str(folder / "run"), embedding_mode="frozen", hidden_dim=32, num_train_epochs=1,
                           num_context="4", per_device_train_batch_size=16, report_to="none", save_strategy="no",
                           disable_tqdm=True, **config)
    trainer = VPLRewardTrainer(model=backbone, args=args, train_dataset=pets_data["train"].select(range(64)))
    trainer.train()
    trainer.save_model(str(folder / "model"))
    return str(folder / "model")


def completion_logprob(model, tokenizer, prompt, completion: str, latent: torch.Tensor | None) -> float:
    """log p(completion | prompt) under the policy, conditioned on `latent`."""
    text = policy_input_text(tokenizer, prompt)
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + tokenizer(completion, add_special_tokens=False)["input_ids"]])
    with torch.no_grad(), conditioned_on(model, latent):
        logits = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
    targets = ids[0, 1:]
    return float(logits[len(prompt_ids) - 1 :].gather(-1, targets[len(prompt_ids) - 1 :, None]).sum())


def test_two_users_latents_give_different_logprobs(tiny_backbone, scorer, pets_data):
    torch.manual_seed(0)  # the soft prompt's initialization, whatever ran before
    tokenizer = AutoTokenizer.from_pretrained(tiny_backbone)
    conditioning = PolicyConditioning("latent", latent_tokens=3)
    model = build_policy(tiny_backbone, tokenizer, conditioning, scorer.model.config.latent_dim, LORA).eval()
    prompt = conditioning.prompt(PROMPT, None, chat=True)
    assert tokenizer.apply_chat_template(prompt, tokenize=False).count(LATENT_TOKEN) == 3
    latents = {user: scorer.user_latent(pairs_of(pets_data, user)) for user in USERS}
    assert not torch.allclose(latents["harmless"], latents["helpful"])
    logprobs = {user: completion_logprob(model, tokenizer, prompt, " Dogs are great.", latents[user]) for user in USERS}
    assert abs(logprobs["harmless"] - logprobs["helpful"]) > 1e-4
    # the soft prompt, not the placeholder's (out-of-vocabulary) embedding, is what the model reads
    assert completion_logprob(model, tokenizer, prompt, " Dogs are great.", latents["helpful"]) == logprobs["helpful"]
    with pytest.raises(RuntimeError, match="no user latent is set"):
        completion_logprob(model, tokenizer, prompt, " Dogs.", None)
    # the module trains with the adapter
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    assert any("prompt.net" in name for name in trainable) and any("lora_" in name for name in trainable)


def test_text_conditioning_shows_the_users_pairs(pets_data):
    pairs = pairs_of(pets_data, "helpful")
    prompt = PolicyConditioning("text", preamble_pairs=2).prompt(PROMPT, pairs, chat=True)
    assert prompt[0]["role"] == "system" and prompt[0]["content"].count("- preferred:") == 2
    assert PolicyConditioning("none").prompt(PROMPT, pairs, chat=True) == prompt[1:]
    with pytest.raises(ValueError, match="conditioning must be one of"):
        PolicyConditioning("telepathy")


def test_saved_latent_policy_reloads_and_serves_a_new_user(tiny_backbone, tiny_reward_model, scorer, pets_data,
                                                           tmp_path, capsys):
    tokenizer = AutoTokenizer.from_pretrained(tiny_backbone)
    conditioning = PolicyConditioning("latent", latent_tokens=2)
    latent_dim = scorer.model.config.latent_dim
    model = build_policy(tiny_backbone, tokenizer, conditioning, latent_dim, LORA).eval()
    with torch.no_grad():  # as if trained: the adapter and the soft-prompt module moved from their initialization
        for name, param in model.named_parameters():
            if "lora_B" in name or "prompt.net.0" in name:
                param.add_(0.05 * torch.randn_like(param))
    folder = tmp_path / "policy"
    model.save_pretrained(folder)
    save_latent_prompt(model, folder)
    tokenizer.save_pretrained(folder)
    write_policy_config(folder, conditioning, latent_dim, tiny_reward_model, tiny_backbone)

    reloaded, reloaded_tokenizer, reloaded_conditioning, _ = load_conditioned_policy(folder, device="cpu")
    assert reloaded_conditioning == conditioning
    prompt = conditioning.prompt(PROMPT, None, chat=True)
    new_user = pairs_of(pets_data, "harmless", k=3)
    latent = scorer.user_latent(new_user)
    original = completion_logprob(model, tokenizer, prompt, " Cats are calm.", latent)
    assert completion_logprob(reloaded, reloaded_tokenizer, prompt, " Cats are calm.", latent) == pytest.approx(
        original, abs=1e-5
    )

    context_file = tmp_path / "new_user.json"
    context_file.write_text(json.dumps(new_user))
    code = sample_main(["--policy", str(folder), "--user-context", str(context_file), "--prompt", PROMPT, "--n", "2",
                        "--max_new_tokens", "5", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(result["candidates"]) == 2
    # guided by the user's latent, and a scale that means nothing refused before any model loads
    served = ["--policy", str(folder), "--user-context", str(context_file), "--prompt", PROMPT, "--n", "1",
              "--max_new_tokens", "5", "--json"]
    assert sample_main([*served, "--latent-guidance-scale", "2"]) == 0
    assert len(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["candidates"]) == 1
    assert sample_main([*served, "--latent_guidance_scale", "-1"]) == 2
    assert "--latent_guidance_scale must be at least 0" in capsys.readouterr().err


def test_policy_errors(tiny_backbone, tiny_reward_model, scorer, pets_data, tmp_path, capsys):
    # a latent policy given a reward model of another latent size
    tokenizer = AutoTokenizer.from_pretrained(tiny_backbone)
    conditioning = PolicyConditioning("latent", latent_tokens=2)
    model = build_policy(tiny_backbone, tokenizer, conditioning, scorer.model.config.latent_dim, LORA)
    folder = tmp_path / "policy"
    model.save_pretrained(folder)
    save_latent_prompt(model, folder)
    tokenizer.save_pretrained(folder)
    write_policy_config(folder, conditioning, scorer.model.config.latent_dim, tiny_reward_model, tiny_backbone)
    other_reward = train_tiny_reward(tmp_path / "reward4", tiny_backbone, pets_data, model_type="vae", latent_dim=4)
    assert sample_main(["--policy", str(folder), "--reward_model", other_reward, "--prompt", "x"]) == 2
    error = capsys.readouterr().err
    assert "latents of size 8" in error and "has size 4" in error

    # a context file of the wrong shape
    bad = tmp_path / "context.json"
    bad.write_text(json.dumps({"pairs": [{"chosen": "a", "rejected": "b"}]}))
    assert sample_main(["--policy", str(folder), "--user-context", str(bad), "--prompt", "x"]) == 2
    assert "expected a JSON list" in capsys.readouterr().err

    # a user with no pairs
    mapping = tmp_path / "users.json"
    mapping.write_text(json.dumps({"ann": [], "ben": pairs_of(pets_data, "helpful")}))
    with pytest.raises(PreferenceDataError, match="user 'ann'"):
        load_user_pairs(mapping)
    with pytest.raises(PreferenceDataError, match="user 'ann': no labelled pairs"):
        build_policy_dataset([PROMPT], {"ann": [], "ben": pairs_of(pets_data, "helpful")}, conditioning, True, 2,
                             user_latent=scorer.user_latent)


def test_conditioned_mode_refuses_a_reward_model_without_latent(tiny_backbone, tiny_base_reward_model, small_pets,
                                                                 tmp_path):
    base_reward = tiny_base_reward_model
    with pytest.raises(SystemExit, match="no user latent.*--mode per_user"):
        ppo_personalized.main(["--reward_model", base_reward, "--user_contexts", str(small_pets),
                               "--model_name_or_path", tiny_backbone, "--output_dir", str(tmp_path / "out"),
                               "--mode", "conditioned", "--report_to", "none"])


def test_reward_ranked_dpo_pairs_reference_and_update(tiny_backbone, scorer, pets_data, tmp_path):
    """Each pair's chosen answer outranks its rejected one under the pair's user; the reference is the policy as the
    round begins (so DPO starts at log 2 with both users' latents); training widens the policy's margin."""
    from vpl_trl.policy import PersonalizedRewardFunction, RewardRankedDPOConfig, RewardRankedDPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_backbone)
    conditioning = PolicyConditioning("latent", latent_tokens=2)
    model = build_policy(tiny_backbone, tokenizer, conditioning, scorer.model.config.latent_dim, LORA)
    pairs = {user: pairs_of(pets_data, user, k=6) for user in USERS}
    latents = {user: scorer.user_latent(pairs[user]) for user in USERS}
    dataset = build_policy_dataset([PROMPT], pairs, conditioning, True, 2, num_context=3,
                                   user_latent=scorer.user_latent)
    candidates = tmp_path / "candidates.jsonl"
    args = RewardRankedDPOConfig(output_dir=str(tmp_path / "dpo"), per_device_train_batch_size=2, learning_rate=5e-3,
                                 num_train_epochs=10, report_to="none", save_strategy="no", disable_tqdm=True,
                                 logging_steps=1, bf16=False, bon_n=4, bon_keep=2, bon_epochs_per_round=100,
                                 candidates_file=str(candidates), max_completion_length=6, generation_batch_size=8)
    trainer = RewardRankedDPOTrainer(model, args, dataset, PersonalizedRewardFunction(scorer, latents), tokenizer)
    assert "ref" not in trainer.model.peft_config  # TRL's adapter copy is not this trainer's reference

    scored = [json.loads(line) for line in candidates.read_text().splitlines()]
    assert {r["user_id"] for r in scored} == set(USERS) and {r["round"] for r in scored} == {0}
    examples = trainer.train_dataset.data
    user_of = {tuple(row["user_latent"]): row["user_id"] for row in dataset}
    assert len(examples) == 2 * len(USERS)  # `keep` pairs per (user, prompt): 1st against 4th, 2nd against 3rd
    for example in examples:
        user = user_of[tuple(example["user_latent"])]
        rewards = {r["completion"]: r["reward"] for r in scored if r["user_id"] == user}
        text = [tokenizer.decode(example[k], skip_special_tokens=True).strip() for k in ("chosen_ids", "rejected_ids")]
        assert rewards[text[0]] >= rewards[text[1]]

    def policy_margin() -> tuple[float, float]:
        batch = trainer.data_collator([examples[i] for i in range(len(examples))])
        with torch.no_grad():
            loss = float(trainer.compute_loss(trainer.model, dict(batch)))
        margin = trainer._metrics["train"]["rewards/margins"][-1]
        return loss, margin

    loss, margin = policy_margin()
    assert loss == pytest.approx(np.log(2), abs=1e-4) and margin == pytest.approx(0.0, abs=1e-3)
    trainer.train()
    loss, margin = policy_margin()
    assert margin > 0.05 and loss < np.log(2)


def test_best_of_n_distillation_resumes_from_a_checkpoint(tiny_backbone, scorer, pets_data, tmp_path):
    """A resumed run trains on the round its checkpoint was saved in (no new sampling at the resumed epoch), with
    the checkpoint's soft prompt, and ends where an uninterrupted run does."""
    from safetensors.torch import load_file

    from vpl_trl.checkpoints import MANIFEST_NAME
    from vpl_trl.models.latent_prompt import WEIGHTS_NAME, find_latent_embedding
    from vpl_trl.policy import BestOfNDistillationConfig, BestOfNDistillationTrainer, PersonalizedRewardFunction

    tokenizer = AutoTokenizer.from_pretrained(tiny_backbone)
    conditioning = PolicyConditioning("latent", latent_tokens=2)
    pairs = {user: pairs_of(pets_data, user, k=4) for user in USERS}
    reward = PersonalizedRewardFunction(scorer, {user: scorer.user_latent(pairs[user]) for user in USERS})
    dataset = build_policy_dataset([PROMPT], pairs, conditioning, True, 1, num_context=2,
                                   user_latent=scorer.user_latent)

    def trainer_for(output_dir, resume=None):
        model = build_policy(tiny_backbone, tokenizer, conditioning, scorer.model.config.latent_dim, LORA)
        args = BestOfNDistillationConfig(
            output_dir=str(output_dir), per_device_train_batch_size=1, num_train_epochs=3, learning_rate=1e-3,
            save_strategy="steps", save_steps=1, report_to="none", bf16=False, disable_tqdm=True,
            resume_from_checkpoint=resume, bon_n=2, bon_keep=1, bon_epochs_per_round=1, max_completion_length=4,
            temperature=0.8, top_p=0.95, generation_batch_size=8,
        )
        return BestOfNDistillationTrainer(model, args, dataset, reward, tokenizer)

    full = trainer_for(tmp_path / "full")
    full.train()
    assert full.state.global_step == 6 and len(full.rounds) == 3  # 2 examples a round, a round each epoch

    for checkpoint in (3, 4):  # within the second epoch's round, and at its end
        folder = tmp_path / "full" / f"checkpoint-{checkpoint}"
        # the manifest covers the rounds' state and the soft prompt, written after the trainer's own files
        assert {"best_of_n_rounds.json", WEIGHTS_NAME} <= set(json.loads((folder / MANIFEST_NAME).read_text())["files"])
        saved = json.loads((folder / "best_of_n_rounds.json").read_text())
        resumed = trainer_for(tmp_path / f"resumed-{checkpoint}", resume=str(folder))
        assert resumed.rounds == saved["rounds"] and len(resumed.rounds) == 2
        assert resumed.train_dataset.data.to_list() == saved["prepared"]
        resumed.train(resume_from_checkpoint=str(folder))
        assert resumed.state.global_step == 6 and [r["round"] for r in resumed.rounds] == [0, 1, 2]

        resumed._load_from_checkpoint(str(folder))
        prompt = find_latent_embedding(resumed.model).prompt.state_dict()
        assert all(torch.equal(prompt[name], tensor) for name, tensor in load_file(str(folder / WEIGHTS_NAME)).items())


def write_pool(path: Path, prompt: str, answers: list[str]) -> Path:
    """A candidate pool in `data/population_pool.jsonl.gz`'s format: rows with `prompt` and `response`."""
    rows = [{"id": i, "prompt": prompt, "style": "any", "response": answer} for i, answer in enumerate(answers)]
    rows.append({"id": len(rows), "prompt": "A prompt no user trains on.", "style": "any", "response": "Unused."})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def pool_answers(count: int) -> list[str]:
    """Pets answers of every kind, of distinct lengths (so that rewards by length never tie)."""
    from vpl_trl.data.pets import KINDS, sentences

    by_length = {}
    for kind in KINDS:
        for text in sentences(kind, "test"):
            by_length.setdefault(len(text), text)
    return [by_length[length] for length in sorted(by_length)][:count]


def one_prompt_pool(tiny_backbone, scorer, pets_data, tmp_path):
    """Six pool answers to the one training prompt, the tokenizer, latent conditioning and a row per user."""
    answers = pool_answers(6)
    pool = write_pool(tmp_path / "pool.jsonl", "Please talk about one kind of pet.", answers)
    tokenizer = AutoTokenizer.from_pretrained(tiny_backbone)
    conditioning = PolicyConditioning("latent", latent_tokens=2)
    pairs = {user: pairs_of(pets_data, user, k=6) for user in USERS}
    dataset = build_policy_dataset([PROMPT], pairs, conditioning, True, 1, num_context=3,
                                   user_latent=scorer.user_latent)
    return answers, pool, tokenizer, conditioning, dataset


def offline_dpo_trainer(model, tokenizer, dataset, reward, output_dir: Path, pool: Path, **overrides):
    from vpl_trl.policy import RewardRankedDPOConfig, RewardRankedDPOTrainer

    settings = dict(output_dir=str(output_dir), per_device_train_batch_size=2, learning_rate=5e-3, num_train_epochs=3,
                    report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=1, bf16=False, bon_n=4,
                    bon_keep=2, bon_epochs_per_round=100, offline_pool=str(pool),
                    candidates_file=str(output_dir / "candidates.jsonl"))
    args = RewardRankedDPOConfig(**{**settings, **overrides})
    return RewardRankedDPOTrainer(model, args, dataset, reward, tokenizer)


def test_offline_pool_pairs_are_ranked_per_user_without_generation(tiny_backbone, scorer, pets_data, tmp_path,
                                                                   monkeypatch):
    """The offline round ranks the pool's answers under each user's reward (one call for all users) into
    best-against-worst pairs, and DPO trains on them: no generation at all."""
    import peft
    import transformers

    from vpl_trl.policy import PersonalizedRewardFunction
    from vpl_trl.text import completion_text

    def no_generation(*args, **kwargs):
        raise AssertionError("the offline round generated")

    monkeypatch.setattr(transformers.GenerationMixin, "generate", no_generation)
    monkeypatch.setattr(peft.PeftModelForCausalLM, "generate", no_generation)
    pool = write_pool(tmp_path / "pool.jsonl", "Please talk about one kind of pet.", pool_answers(6))
    tokenizer = AutoTokenizer.from_pretrained(tiny_backbone)
    conditioning = PolicyConditioning("latent", latent_tokens=2)
    latent_dim = scorer.model.config.latent_dim
    pairs = {user: pairs_of(pets_data, user, k=6) for user in USERS}
    dataset = build_policy_dataset([PROMPT], pairs, conditioning, True, 2, num_context=3,
                                   user_latent=scorer.user_latent)
    user_of = {tuple(row["user_latent"]): row["user_id"] for row in dataset}

    def examples_by_user(trainer) -> dict[str, list[tuple[str, str]]]:
        found = {user: [] for user in USERS}
        for example in trainer._round_examples:
            found[user_of[tuple(example["user_latent"])]].append(
                (completion_text(example["chosen"]).strip(), completion_text(example["rejected"]).strip()))
        return found

    # users with opposite rewards (one likes long answers, the other short ones) get opposite pairs
    calls = []

    def opposite(prompts, completions, user_id, raw_prompt, **kwargs):
        calls.append(sorted(set(user_id)))
        sign = {"harmless": 1.0, "helpful": -1.0}
        return [sign[user] * len(completion_text(c).strip()) for user, c in zip(user_id, completions)]

    model = build_policy(tiny_backbone, tokenizer, conditioning, latent_dim, LORA)
    trainer = offline_dpo_trainer(model, tokenizer, dataset, opposite, tmp_path / "opposite", pool)
    assert calls == [list(USERS)]  # one scoring pass over every user's candidates
    assert trainer.rounds[0]["offline"] and trainer.rounds[0]["generation_seconds"] < 1.0
    found = examples_by_user(trainer)
    longest_first = sorted(pool_answers(6), key=len, reverse=True)
    assert found["harmless"] == [(longest_first[0], longest_first[-1]), (longest_first[1], longest_first[-2])]
    assert found["helpful"] == [(rejected, chosen) for chosen, rejected in found["harmless"]]

    # under the VPL reward: each pair's chosen answer has the higher reward for its user; DPO trains on the pairs
    model = build_policy(tiny_backbone, tokenizer, conditioning, latent_dim, LORA)
    reward = PersonalizedRewardFunction(scorer, {user: scorer.user_latent(pairs[user]) for user in USERS})
    trainer = offline_dpo_trainer(model, tokenizer, dataset, reward, tmp_path / "vpl", pool)
    scored = [json.loads(line) for line in (tmp_path / "vpl" / "candidates.jsonl").read_text().splitlines()]
    assert len(scored) == 6 * len(USERS) and {r["round"] for r in scored} == {0}
    for user, user_pairs in examples_by_user(trainer).items():
        rewards = {r["completion"].strip(): r["reward"] for r in scored if r["user_id"] == user}
        assert len(user_pairs) == 2 and all(rewards[chosen] > rewards[rejected] for chosen, rejected in user_pairs)
    trainer.train()
    assert trainer.state.global_step == 6 and len(trainer.rounds) == 1  # 4 pairs, 2 per step, 3 epochs
    margins = [entry["rewards/margins"] for entry in trainer.state.log_history if "rewards/margins" in entry]
    # from 0 (the reference is the policy as training began), widening step after step
    assert len(margins) == 6 and margins[0] == pytest.approx(0.0, abs=1e-4) and margins[-1] > 0.01
    assert all(later > earlier for earlier, later in zip(margins, margins[1:]))


def test_the_soft_prompt_learns_at_its_own_rate(tiny_backbone, scorer, pets_data, tmp_path):
    """With `latent_prompt_lr_ratio`, the soft-prompt module's optimizer groups run at that multiple of the adapter's
    learning rate through the schedule, every trainable parameter in one group, and the module moves further."""
    import copy

    from vpl_trl.models.latent_prompt import find_latent_embedding
    from vpl_trl.text import completion_text

    _, pool, tokenizer, conditioning, dataset = one_prompt_pool(tiny_backbone, scorer, pets_data, tmp_path)
    initial = build_policy(tiny_backbone, tokenizer, conditioning, scorer.model.config.latent_dim, LORA)

    def reward(prompts, completions, user_id, **kwargs):  # harmless likes long answers, helpful short ones
        sign = {"harmless": 1.0, "helpful": -1.0}
        return [sign[user] * len(completion_text(c)) for user, c in zip(user_id, completions)]

    moved = {}
    for ratio in (1.0, 10.0):
        model = copy.deepcopy(initial)
        prompt = find_latent_embedding(model).prompt
        before = [p.detach().clone() for p in prompt.parameters()]
        trainer = offline_dpo_trainer(model, tokenizer, dataset, reward, tmp_path / f"ratio{ratio}", pool,
                                      learning_rate=1e-3, lr_scheduler_type="constant",
                                      latent_prompt_lr_ratio=ratio)
        trainer.train()
        ids = {id(p) for p in prompt.parameters()}
        rate = {id(p): group["lr"] for group in trainer.optimizer.param_groups for p in group["params"]}
        trainable = [p for p in trainer.model.parameters() if p.requires_grad]
        assert len(rate) == sum(len(g["params"]) for g in trainer.optimizer.param_groups) == len(trainable)
        assert [rate[id(p)] for p in trainable if id(p) in ids] == pytest.approx([ratio * 1e-3] * len(ids))
        assert [rate[id(p)] for p in trainable if id(p) not in ids] == pytest.approx([1e-3] * (len(rate) - len(ids)))
        moved[ratio] = sum(float((p.detach() - b).abs().sum()) for p, b in zip(prompt.parameters(), before))
    assert moved[10.0] > 3 * moved[1.0] > 0

    with pytest.raises(ValueError, match="latent_prompt_lr_ratio must be above 0"):
        offline_dpo_trainer(initial, tokenizer, dataset, reward, tmp_path / "bad", pool, latent_prompt_lr_ratio=0)


def test_contrast_pairs_carry_what_sets_a_user_apart(tiny_backbone, scorer, pets_data, tmp_path):
    """With `contrast_pairs`, the offline round's last pairs per user set the answer of their upper half that they
    prefer most relative to the other users against the answer of their lower half that the others prefer most
    relative to them, rather than their best against an answer everyone dislikes. With `consensus_pairs`, the
    first pairs rank the answers by all the prompt's users together: the same pair for each of them."""
    from vpl_trl.text import completion_text

    answers, pool, tokenizer, conditioning, dataset = one_prompt_pool(tiny_backbone, scorer, pets_data, tmp_path)
    user_of = {tuple(row["user_latent"]): row["user_id"] for row in dataset}
    # harmless likes 0 best, then 1, which helpful likes least; helpful likes 3 best (harmless's 4th), then 0
    table = {"harmless": [5, 4, 3, 2, 1, 0], "helpful": [4, 0, 2, 5, 3, 1]}

    def reward(prompts, completions, user_id, raw_prompt, **kwargs):
        return [float(table[user][answers.index(completion_text(c).strip())]) for user, c in zip(user_id, completions)]

    def pairs_by_user(contrast_pairs: int, consensus_pairs: int = 0, data=dataset, **offline
                      ) -> dict[str, list[tuple[int, int]]]:
        model = build_policy(tiny_backbone, tokenizer, conditioning, scorer.model.config.latent_dim, LORA)
        folder = tmp_path / "-".join(map(str, [contrast_pairs, consensus_pairs, len(data), *offline.values()]))
        trainer = offline_dpo_trainer(model, tokenizer, data, reward, folder, pool, bon_keep=2,
                                      contrast_pairs=contrast_pairs, consensus_pairs=consensus_pairs, **offline)
        found = {user: [] for user in set(data["user_id"])}
        for example in trainer._round_examples:
            found[user_of[tuple(example["user_latent"])]].append(
                tuple(answers.index(completion_text(example[side]).strip()) for side in ("chosen", "rejected")))
        return found

    assert pairs_by_user(0) == {"harmless": [(0, 5), (1, 4)], "helpful": [(3, 1), (0, 5)]}
    # harmless: of its upper half 0, 1, 2, answer 1 is the most its own (helpful likes it least); of its lower half
    # 3, 4, 5 helpful prefers 3 most. helpful: of 3, 0, 4, answer 3 is the most its own; of 2, 5, 1 harmless
    # prefers 1 most
    assert pairs_by_user(1) == {"harmless": [(0, 5), (1, 3)], "helpful": [(3, 1), (3, 1)]}
    # a consensus pair instead of each user's best against worst: standardized, the two users' rewards add up to
    # 4, -1, 0, 2, -1, -4 over answers 0 to 5, so both users get 0 against 5 (helpful's own best is 3)
    with_consensus = pairs_by_user(1, consensus_pairs=1)
    assert {user: sorted(pairs) for user, pairs in with_consensus.items()} == {"harmless": [(0, 5), (1, 3)],
                                                                             "helpful": [(0, 5), (3, 1)]}
    # the offline round's own mix, whatever the online rounds' (which keep theirs)
    offline_mix = pairs_by_user(0, offline_contrast_pairs=1, offline_consensus_pairs=1)
    assert {user: sorted(pairs) for user, pairs in offline_mix.items()} == {"harmless": [(0, 5), (1, 3)],
                                                                          "helpful": [(0, 5), (3, 1)]}
    # a prompt that no other user scored has nothing to contrast: best against worst, second against second worst
    alone = dataset.filter(lambda row: row["user_id"] == "harmless")
    assert pairs_by_user(1, data=alone) == {"harmless": [(0, 5), (1, 4)]}
    with pytest.raises(ValueError, match="contrast_pairs must be between 0 and bon_keep=2"):
        offline_dpo_trainer(None, tokenizer, dataset, reward, tmp_path / "bad", pool, bon_keep=2, contrast_pairs=3)
    with pytest.raises(ValueError, match="consensus_pairs must be between 0 and bon_keep - contrast_pairs=1"):
        offline_dpo_trainer(None, tokenizer, dataset, reward, tmp_path / "bad", pool, bon_keep=2, contrast_pairs=1,
                            consensus_pairs=2)
    with pytest.raises(ValueError, match="offline_consensus_pairs must be between 0 and bon_keep - "
                                         "offline_contrast_pairs=1"):
        offline_dpo_trainer(None, tokenizer, dataset, reward, tmp_path / "bad", pool, bon_keep=2,
                            offline_contrast_pairs=1, offline_consensus_pairs=2)


def test_online_rounds_can_share_candidates_across_users(tiny_backbone, scorer, pets_data, tmp_path, monkeypatch):
    """With `share_online_candidates`, each user of a prompt also ranks the online round's samples of the prompt's
    other users, so that the round's contrast pairs carry what sets a user apart, an answer written for another
    user among them; the learning curve still scores each user's own samples only."""
    from vpl_trl.policy import best_of_n_rounds
    from vpl_trl.text import completion_text

    answers, pool, tokenizer, conditioning, dataset = one_prompt_pool(tiny_backbone, scorer, pets_data, tmp_path)
    user_of = {tuple(row["user_latent"]): row["user_id"] for row in dataset}
    sampled = {"harmless": ["Cats purr when they are calm.", "Dogs need long walks."],
               "helpful": ["Fish are quiet.", "Birds sing at dawn."]}
    texts = [*sampled["harmless"], *sampled["helpful"]]
    # harmless: its own first sample best, its second worst; helpful the reverse, and of its own prefers its second
    table = {"harmless": [4, 0, 2, 1], "helpful": [0, 3, 1, 2]}

    def reward(prompts, completions, user_id, **kwargs):
        return [float((table[user] + [0] * 6)[(texts + answers).index(completion_text(c).strip())])
                for user, c in zip(user_id, completions)]

    def samples(model, tokenizer, prompts, n, settings=None, latents=None, progress=None):
        return [list(sampled[user_of[tuple(latent.tolist())]]) for latent in latents]

    monkeypatch.setattr(best_of_n_rounds, "generate_candidates", samples)
    for share in (False, True):
        model = build_policy(tiny_backbone, tokenizer, conditioning, scorer.model.config.latent_dim, LORA)
        folder = tmp_path / f"share-{share}"
        trainer = offline_dpo_trainer(model, tokenizer, dataset, reward, folder, pool, bon_n=2, bon_keep=1,
                                      contrast_pairs=1, share_online_candidates=share)
        trainer.next_round()
        pairs = {user_of[tuple(e["user_latent"])]: (completion_text(e["chosen"]).strip(),
                                                    completion_text(e["rejected"]).strip())
                 for e in trainer._round_examples}
        scored = [json.loads(line) for line in (folder / "candidates.jsonl").read_text().splitlines()]
        ranked = {user: sorted(r["completion"].strip() for r in scored if r["round"] == 1 and r["user_id"] == user)
                  for user in USERS}
        assert (trainer.rounds[1]["reward/harmless"], trainer.rounds[1]["reward/helpful"]) == (2.0, 1.5)
        if not share:  # each user's own samples: best against worst
            assert ranked == {user: sorted(sampled[user]) for user in USERS}
            assert pairs == {"harmless": tuple(sampled["harmless"]), "helpful": tuple(sampled["helpful"][::-1])}
        else:  # every sample of the prompt; helpful's contrast pair is two answers written for harmless
            assert ranked == {user: sorted(texts) for user in USERS}
            assert pairs == {"harmless": tuple(sampled["harmless"]), "helpful": tuple(sampled["harmless"][::-1])}

    # shared, bon_n may be below what bon_keep needs alone: 2 samples per user, and the prompt's 4 give 2 pairs each
    trainer = offline_dpo_trainer(model, tokenizer, dataset, reward, tmp_path / "fewer", pool, bon_n=2, bon_keep=2,
                                  contrast_pairs=1, consensus_pairs=1, share_online_candidates=True)
    trainer.next_round()
    kept = [(user_of[tuple(e["user_latent"])], e["chosen"] != e["rejected"]) for e in trainer._round_examples]
    assert sorted(kept) == [("harmless", True)] * 2 + [("helpful", True)] * 2
    # but not fewer than the first round kept (the pool's 6 answers gave 3 pairs per user; 4 samples give 2)
    trainer = offline_dpo_trainer(model, tokenizer, dataset, reward, tmp_path / "too-few", pool, bon_n=2, bon_keep=3,
                                  contrast_pairs=1, share_online_candidates=True)
    with pytest.raises(ValueError, match="a round has 4 examples, expected 6 .*raise `bon_n`"):
        trainer.next_round()
    with pytest.raises(ValueError, match="bon_keep=2 pairs per prompt need at least 4 candidates; got bon_n=2"):
        offline_dpo_trainer(model, tokenizer, dataset, reward, tmp_path / "alone", pool, bon_n=2, bon_keep=2)
    with pytest.raises(ValueError, match="bon_keep=2 pairs per prompt need at least 2 candidates; got bon_n=1"):
        offline_dpo_trainer(model, tokenizer, dataset, reward, tmp_path / "one", pool, bon_n=1, bon_keep=2,
                            share_online_candidates=True)


def test_max_rounds_whole_rounds_and_a_final_scored_round(tiny_backbone, scorer, pets_data, tmp_path, monkeypatch):
    """Training stops after `max_rounds` rounds (no step past the last round's epochs); `score_final_round`
    samples and scores the trained policy once more, not trained on; a new round starts only if one as long as
    the last (candidates and updates) ends before the deadline."""
    import time

    from vpl_trl.policy import PersonalizedRewardFunction, best_of_n_rounds

    answers, pool, tokenizer, conditioning, dataset = one_prompt_pool(tiny_backbone, scorer, pets_data, tmp_path)
    monkeypatch.setattr(best_of_n_rounds, "generate_candidates",
                        lambda model, tokenizer, prompts, n, settings=None, latents=None, progress=None:
                        [answers[:n] for _ in prompts])
    pairs = {user: pairs_of(pets_data, user, k=6) for user in USERS}
    reward = PersonalizedRewardFunction(scorer, {user: scorer.user_latent(pairs[user]) for user in USERS})
    model = build_policy(tiny_backbone, tokenizer, conditioning, scorer.model.config.latent_dim, LORA)
    folder = tmp_path / "rounds"
    trainer = offline_dpo_trainer(model, tokenizer, dataset, reward, folder, pool, num_train_epochs=5,
                                  bon_epochs_per_round=1, max_rounds=2, score_final_round=True)
    trainer.train()
    # 2 rounds of 4 pairs, 2 per step; then the final round, scored only
    assert trainer.state.global_step == 4 and [r.get("final", False) for r in trainer.rounds] == [False, False, True]
    scored = [json.loads(line) for line in (folder / "candidates.jsonl").read_text().splitlines()]
    assert {r["round"] for r in scored if r.get("final")} == {2} and {r["round"] for r in scored} == {0, 1, 2}

    # the next round would end past the deadline: training stops instead of sampling it
    trainer.rounds[-1]["elapsed"] = time.perf_counter() - trainer._start - 100.0  # the last round took 100 s
    trainer.deadline = time.perf_counter() + 50.0
    trainer.control.should_training_stop = False
    trainer.args.max_rounds = None
    trainer.next_round()
    assert trainer.control.should_training_stop and len(trainer.rounds) == 3
    trainer.deadline = time.perf_counter() + 150.0
    trainer.control.should_training_stop = False
    trainer.next_round()
    assert not trainer.control.should_training_stop and len(trainer.rounds) == 4


def test_a_policy_starts_from_a_saved_adapter(tiny_backbone, scorer, tmp_path):
    """A latent-conditioned policy can start from a user-blind policy's adapter (its soft prompt fresh); an adapter
    of other LoRA settings, or none, is refused with the folder named."""
    from peft import get_peft_model_state_dict

    from vpl_trl.models.latent_prompt import find_latent_embedding
    from vpl_trl.policy import PolicyError

    tokenizer = AutoTokenizer.from_pretrained(tiny_backbone)
    blind = build_policy(tiny_backbone, tokenizer, PolicyConditioning("none"), 0, LORA)
    with torch.no_grad():
        for name, param in blind.named_parameters():
            if "lora_B" in name:
                param.normal_()
    blind.save_pretrained(tmp_path / "blind")
    saved = get_peft_model_state_dict(blind)

    latent_dim = scorer.model.config.latent_dim
    conditioned = build_policy(tiny_backbone, AutoTokenizer.from_pretrained(tiny_backbone),
                               PolicyConditioning("latent", latent_tokens=2), latent_dim, LORA,
                               init_adapter=tmp_path / "blind")
    loaded = get_peft_model_state_dict(conditioned)
    assert set(loaded) == set(saved) and all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert find_latent_embedding(conditioned).prompt.net[0].weight.requires_grad

    wider = LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    with pytest.raises(PolicyError, match="blind: adapter weights of another shape"):
        build_policy(tiny_backbone, tokenizer, PolicyConditioning("none"), 0, wider, init_adapter=tmp_path / "blind")
    more = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"], task_type="CAUSAL_LM")
    with pytest.raises(PolicyError, match="blind: its adapter does not fit the policy's LoRA settings"):
        build_policy(tiny_backbone, tokenizer, PolicyConditioning("none"), 0, more, init_adapter=tmp_path / "blind")
    with pytest.raises(PolicyError, match="empty: no LoRA adapter to start from"):
        (tmp_path / "empty").mkdir()
        build_policy(tiny_backbone, tokenizer, PolicyConditioning("none"), 0, LORA, init_adapter=tmp_path / "empty")


def test_a_saved_policy_travels(tiny_backbone, tiny_reward_model, scorer, pets_data, tmp_path, tmp_path_factory,
                                monkeypatch, capsys):
    """A trained policy records its base model's hub id (resolved locally, as the embedded default is) and keeps
    its reward model beside it: moved elsewhere, with the original reward folder gone, it serves the same
    answers. A folder of the older kind (absolute paths) still resolves its reward model."""
    import shutil

    from vpl_trl.policy import conditioned_policy, policy_reward_model, read_policy_config

    hub_id = "acme/tiny-llama"  # a hub id that this machine resolves to a local folder, as the embedded default
    resolve = conditioned_policy.resolve_model_name_or_path
    monkeypatch.setattr(conditioned_policy, "resolve_model_name_or_path",
                        lambda name: tiny_backbone if name == hub_id else resolve(name))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    reward_folder = tmp_path / "reward"
    shutil.copytree(tiny_reward_model, reward_folder)
    tokenizer = AutoTokenizer.from_pretrained(tiny_backbone)
    conditioning = PolicyConditioning("latent", latent_tokens=2)
    latent_dim = scorer.model.config.latent_dim
    pairs = {user: pairs_of(pets_data, user, k=6) for user in USERS}
    dataset = build_policy_dataset([PROMPT], pairs, conditioning, True, 2, num_context=3,
                                   user_latent=scorer.user_latent)
    pool = write_pool(tmp_path / "pool.jsonl", "Please talk about one kind of pet.", pool_answers(4))
    folder = tmp_path / "policy"
    model = build_policy(hub_id, tokenizer, conditioning, latent_dim, LORA)
    reward = lambda completions, user_id, **kwargs: [float(len(str(c))) for c in completions]  # noqa: E731
    trainer = offline_dpo_trainer(model, tokenizer, dataset, reward, folder, pool, num_train_epochs=1)
    trainer.train()
    trainer.save_model(str(folder))
    write_policy_config(folder, conditioning, latent_dim, str(reward_folder), hub_id, signal="dpo")

    recorded = {name: (folder / name).read_text() for name in ("vpl_policy.json", "adapter_config.json")}
    assert all(str(tmp_path) not in text for text in recorded.values())  # no path of this machine
    assert json.loads(recorded["adapter_config.json"])["base_model_name_or_path"] == hub_id
    assert read_policy_config(folder)["reward_model"] == "reward_model"

    context_file = tmp_path_factory.mktemp("user") / "new_user.json"
    context_file.write_text(json.dumps(pairs_of(pets_data, "harmless", k=3)))

    def serve(policy: Path) -> dict:
        capsys.readouterr()  # what ran before (training logs)
        code = sample_main(["--policy", str(policy), "--user-context", str(context_file), "--prompt", PROMPT,
                            "--n", "3", "--max_new_tokens", "6", "--seed", "1", "--json"])
        assert code == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    here = serve(folder)
    moved = tmp_path_factory.mktemp("elsewhere") / "policy"
    shutil.move(str(folder), str(moved))
    shutil.rmtree(reward_folder)
    assert serve(moved) == here and len(here["candidates"]) == 3

    # an older folder records absolute paths: they are used where they exist
    old_config = read_policy_config(moved)
    old_config["reward_model"] = str(tiny_reward_model)
    assert policy_reward_model(moved, old_config) == str(tiny_reward_model)


def test_offline_pool_answers_are_cut_as_the_policy_samples(tiny_backbone, scorer, pets_data, tmp_path):
    """The offline round's candidates are the pool's answers cut to `max_completion_length` tokens, the length
    of the policy's own samples: DPO does not train on text the policy could never write."""
    from vpl_trl.text import completion_text

    answers, pool, tokenizer, conditioning, dataset = one_prompt_pool(tiny_backbone, scorer, pets_data, tmp_path)
    model = build_policy(tiny_backbone, tokenizer, conditioning, scorer.model.config.latent_dim, LORA)
    reward = lambda completions, user_id, **kwargs: [float(len(str(c))) for c in completions]  # noqa: E731
    trainer = offline_dpo_trainer(model, tokenizer, dataset, reward, tmp_path / "cut", pool, max_completion_length=3,
                                  bon_keep=1)
    texts = [completion_text(example[side]).strip() for example in trainer._round_examples
             for side in ("chosen", "rejected")]
    assert texts and all(len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= 3 for text in texts)
    assert all(any(answer.startswith(text) and len(text) < len(answer) for answer in answers) for text in texts)


def test_latent_guidance_pushes_each_token_from_the_null_latent(tiny_backbone, scorer, pets_data):
    """Every guided token is the argmax of log p(.|z) + (scale - 1)(log p(.|z) - log p(.|0)), each computed by a
    full forward pass of the row alone: the null branch's cache and positions hold for left-padded rows."""
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_backbone)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    conditioning = PolicyConditioning("latent", latent_tokens=2)
    model = build_policy(tiny_backbone, tokenizer, conditioning, scorer.model.config.latent_dim, LORA).eval()
    with torch.no_grad():  # a soft prompt that moves with z, as after training
        find_latent_embedding(model).prompt.net[2].weight.mul_(50.0)
    prompts = [conditioning.prompt(PROMPT, None, chat=True),
               conditioning.prompt("Human: Name one pet that sleeps a lot, and why.\n\nAssistant:", None, chat=True)]
    latents = torch.cat([scorer.user_latent(pairs_of(pets_data, user)) for user in USERS])
    scale, steps = 8.0, 6
    batch = tokenizer([policy_input_text(tokenizer, p) for p in prompts], return_tensors="pt", padding=True,
                      padding_side="left", add_special_tokens=not tokenizer.chat_template)
    assert (batch["attention_mask"] == 0).any()  # the prompts differ in length: one row is left-padded
    guidance = LatentGuidanceLogitsProcessor(model, scale, batch["attention_mask"], torch.zeros_like(latents[:1]))
    with torch.no_grad(), conditioned_on(model, latents):
        generated = model.generate(**batch, logits_processor=LogitsProcessorList([guidance]), do_sample=False,
                                   max_new_tokens=steps, pad_token_id=tokenizer.pad_token_id)

    changed = 0
    for row in range(len(prompts)):
        ids = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        for step in range(steps):
            prefix = torch.tensor([ids + generated[row, batch["input_ids"].shape[1] : batch["input_ids"].shape[1]
                                                   + step].tolist()])
            with torch.no_grad():
                with conditioned_on(model, latents[row : row + 1]):
                    user = model(input_ids=prefix).logits[0, -1].log_softmax(-1)
                with conditioned_on(model, torch.zeros_like(latents[:1])):
                    null = model(input_ids=prefix).logits[0, -1].log_softmax(-1)
            expected = user + (scale - 1) * (user - null)
            token = int(generated[row, batch["input_ids"].shape[1] + step])
            if token == tokenizer.pad_token_id:  # the row ended
                break
            assert expected[token] == pytest.approx(float(expected.max()), abs=1e-3)
            changed += int(user.argmax()) != token
    assert changed > 0  # guidance chose other tokens than the policy alone would have

    # `generate_candidates` guides a latent-conditioned policy when asked to, and only then
    texts = {value: generate_candidates(model, tokenizer, prompts, 1, GenerationSettings(
        max_new_tokens=steps, temperature=0, batch_size=2, latent_guidance_scale=value), latents=latents)
        for value in (1.0, scale)}
    with torch.no_grad(), conditioned_on(model, latents), inference_autocast("cpu"):  # as generate_candidates runs
        plain = model.generate(**batch, do_sample=False, max_new_tokens=steps, pad_token_id=tokenizer.pad_token_id)
    plain_texts = tokenizer.batch_decode(plain[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert [t[0] for t in texts[1.0]] == [t.strip() for t in plain_texts]
    assert texts[scale] != texts[1.0]
    with pytest.raises(ValueError, match="guidance_scale must be at least 0"):
        LatentGuidanceLogitsProcessor(model, -1.0, batch["attention_mask"], latents[:1])
