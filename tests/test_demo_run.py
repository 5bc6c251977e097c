"""train.py end to end for a few steps: the demo on tiny_data (every metric, the summary, the figures, the
criterion's agreements, β step by step), ε = 0 as a DPO run, JSONL files and a model folder of one's own, and
what an evaluation measures (the KL along samples, samples from the policy alone)."""

import argparse
import json
import math
import shutil

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import compare
import epsdpo
import train
from tests.helpers import (
    QUICK,
    read_metrics,
    reviews,
    run_expecting_error,
    tiny_model_folder,
    without_gold_reward,
    write_jsonl,
)
from training import batches, data, evaluation, models
from training.arguments import TINY_MODEL, parse_args

# ----------------------------------------------------------------------------------------------------
# The demo on tiny_data


METRIC_KEYS = {
    "step",
    "split",
    "loss",
    "beta",
    "beta/pairs_mean",
    "s/weaker",
    "s/stronger",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "h",
    "lr",
}


def test_the_demo_writes_every_metric_finite_for_every_step(tiny_run):
    rows = read_metrics(tiny_run)
    assert [(r["split"], r["step"]) for r in rows] == [
        ("eval", 0),
        ("train", 1),
        ("train", 2),
        ("eval", 2),
        ("train", 3),
        ("eval", 3),
    ]
    for row in rows:
        assert METRIC_KEYS <= row.keys(), METRIC_KEYS - row.keys()
        assert all(math.isfinite(v) for v in row.values() if isinstance(v, float))
        if row["split"] == "eval":
            assert {"gold_reward", "kl"} <= row.keys()  # tiny_data has a gold reward
        else:  # tiny_data marks its noisy pairs: s by kind, per step
            assert {"s/weaker/clean", "s/stronger/clean"} <= row.keys()
    assert rows[0]["kl"] == 0.0 and rows[0]["rewards/accuracies"] == 0.5  # the policy starts as the reference


def the_demos_train_pairs(count):
    """(tokenizer, the first `count` train pairs of the demo's run): tiny_data read and tokenized with train.py's
    defaults, as the run reads it."""
    args, _ = parse_args([])
    tokenizer = data.load_tokenizer(str(TINY_MODEL))
    loaded = data.load_pairs(
        args.dataset,
        args.train_split,
        args.eval_split,
        args.eval_fraction,
        args.seed,
        tokenizer,
        args.max_length,
        args.max_prompt_length,
    )
    return tokenizer, loaded["pairs"]["train"][:count]


def criterion_agreement_slowly(output_dir, pairs, epsilon):
    """summary.json's "criterion", counted apart from evaluation.py: the first `pairs` train pairs, one sequence at a
    time in float64 through the saved policy and the reference; z(λ) from the logits f_ref + λ (f_θ − f_ref) and s
    from z(1 − ε), z(1), z(1 + ε) by the README's rule; h = z(1) − z(0); ΔK from the KL at each completion
    position."""
    _, train_pairs = the_demos_train_pairs(pairs)
    policy, reference = (
        AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float64).eval() for folder in (output_dir, TINY_MODEL)
    )
    agree_with_h_minus_k = agree_with_h = 0
    for pair in train_pairs:
        logps, kls = {}, {}
        for side in ("chosen", "rejected"):
            ids = torch.tensor([pair["prompt_ids"] + pair[side + "_ids"]])
            start = len(pair["prompt_ids"]) - 1  # the logits at t predict the token at t + 1
            with torch.no_grad():
                f, f_ref = (model(input_ids=ids).logits[0, start:-1] for model in (policy, reference))
            targets = ids[0, start + 1 :]
            logps[side] = {
                lam: torch.log_softmax(f_ref + lam * (f - f_ref), -1)[range(len(targets)), targets].sum().item()
                for lam in (0, 1 - epsilon, 1, 1 + epsilon)
            }
            p, logp, logp_ref = f.softmax(-1), f.log_softmax(-1), f_ref.log_softmax(-1)
            kls[side] = (p * (logp - logp_ref)).sum().item()
        z = {lam: logps["chosen"][lam] - logps["rejected"][lam] for lam in logps["chosen"]}
        weaker, stronger = z[1 - epsilon] < z[1] < z[1 + epsilon], z[1 - epsilon] > z[1] > z[1 + epsilon]
        s = 1 if weaker else -1 if stronger else 0
        h, delta_k = z[1] - z[0], kls["chosen"] - kls["rejected"]
        agree_with_h_minus_k += s == (h > delta_k) - (h < delta_k)
        agree_with_h += s == (h > 0) - (h < 0)
    return {
        "pairs": len(train_pairs),
        "s = sign(h − ΔK)": agree_with_h_minus_k / len(train_pairs),
        "s = sign(h)": agree_with_h / len(train_pairs),
    }


def test_the_demo_writes_a_summary_a_figure_and_a_model_that_reloads(tiny_run):
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert summary["args"]["epsilon"] == 0.3 and summary["args"]["beta"] == 0.1 and summary["steps"] == 3
    assert set(summary["s_by_noise"]) == {"clean", "noisy"}
    assert sum(group["pairs"] for group in summary["s_by_noise"].values()) == 3 * 2 * 4
    assert summary["final"]["step"] == 3 and "gold_reward" in summary["final"]
    for figure, inches in (("curves.png", (16, 6.5)), ("criterion.png", (17, 5))):  # drawn at 110 dots an inch
        with Image.open(tiny_run / figure) as image:
            assert image.format == "PNG" and image.size == tuple(round(110 * side) for side in inches)
    # s on the final policy against sign(h − ΔK) and sign(h): the fractions a slow float64 count of its own gives
    assert summary["criterion"] == pytest.approx(
        criterion_agreement_slowly(tiny_run, pairs=64, epsilon=0.3), abs=1 / 64
    )

    model = AutoModelForCausalLM.from_pretrained(tiny_run)
    tokenizer = AutoTokenizer.from_pretrained(tiny_run)
    reference = AutoModelForCausalLM.from_pretrained(TINY_MODEL)
    assert (
        tokenizer("Review of the lamp:")["input_ids"]
        == AutoTokenizer.from_pretrained(TINY_MODEL)("Review of the lamp:")["input_ids"]
    )
    changed = [
        not torch.equal(p, q) for p, q in zip(model.state_dict().values(), reference.state_dict().values(), strict=True)
    ]
    assert any(changed)  # it trained


def test_beta_in_the_metrics_follows_method_section_5(tiny_run):
    train_rows = [r for r in read_metrics(tiny_run) if r["split"] == "train"]
    epsilon = 0.3
    assert train_rows[0]["beta"] == 0.1
    for row, next_row in zip(train_rows, train_rows[1:] + [None], strict=True):
        weaker, stronger = row["s/weaker"], row["s/stronger"]
        # The mean β̃ over the 8 pairs of the step's two micro-batches.
        mean_pair_beta = row["beta"] * (weaker / (1 + epsilon) + stronger / (1 - epsilon) + (1 - weaker - stronger))
        assert row["beta/pairs_mean"] == pytest.approx(mean_pair_beta, rel=1e-6)
        if next_row is not None:
            assert next_row["beta"] == row["beta/pairs_mean"]  # the next step uses it
    assert any(r["beta/pairs_mean"] != r["beta"] for r in train_rows)


def test_beta_stays_within_min_beta_and_the_bound_of_beta_whatever_epsilon(tmp_path, monkeypatch, small_data, capsys):
    """ε close to 1 multiplies β by 1/(1 − ε) at a step where every pair gets s = −1: β stops at 1e6, --beta's
    own bound, never 1e10 before the loss breaks; --min-beta is a floor for the other way."""
    counts = iter([(8, 0, 0)] + [(0, 0, 8)] * 4)  # all s = +1, then all s = −1
    monkeypatch.setattr(train, "s_counts", lambda totals: next(counts))
    train.main(
        [
            "--output-dir",
            str(tmp_path / "out"),
            *without_gold_reward(small_data),
            "--max-steps",
            "5",
            "--eval-every",
            "1000",
            "--epsilon",
            "0.999",
            "--min-beta",
            "0.09",
        ]
    )
    betas = [row["beta"] for row in read_metrics(tmp_path / "out") if row["split"] == "train"]
    assert betas == pytest.approx([0.1, 0.09, 90, 90_000, 1e6]) and betas[-1] == 1e6
    assert json.loads((tmp_path / "out/summary.json").read_text())["final_beta"] == 1e6
    with pytest.raises(SystemExit):
        parse_args(["--min-beta", "0.2", "--beta", "0.1"])
    assert "--min-beta 0.2 is more than --beta 0.1" in capsys.readouterr().err
    assert run_expecting_error(
        ["--min-beta", "0.2", "--betas", "0.1", "0.3", "--output-dir", str(tmp_path / "c")], compare.main
    ).startswith("error: --min-beta 0.2 is more than --betas 0.1")


def plain_dpo(policy_logits, ref_logits, input_ids, completion_mask, beta, epsilon):
    """DPO with a fixed β, nothing of ε-DPO: what --epsilon 0 must reproduce."""
    half = policy_logits.shape[0] // 2
    logps = epsdpo.sequence_logps(policy_logits, input_ids, completion_mask)
    with torch.no_grad():
        ref_logps = epsdpo.sequence_logps(ref_logits, input_ids, completion_mask)
    losses, chosen_rewards, rejected_rewards = epsdpo.dpo_loss(
        logps[:half], logps[half:], ref_logps[:half], ref_logps[half:], beta
    )
    return epsdpo.EpsilonDPOOutput(
        loss=losses.mean(),
        losses=losses,
        pair_betas=torch.full((half,), beta),
        s=torch.zeros(half, dtype=torch.long),
        h=(logps[:half] - logps[half:] - ref_logps[:half] + ref_logps[half:]).detach(),
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        chosen_logps=logps[:half],
        rejected_logps=logps[half:],
        ref_chosen_logps=ref_logps[:half],
        ref_rejected_logps=ref_logps[half:],
    )


def test_epsilon_zero_is_a_dpo_run_bit_for_bit(tmp_path, monkeypatch, small_data):
    monkeypatch.setattr(models, "FROM_HIDDEN_STATES", False)  # both from logits: plain_dpo takes logits
    arguments = ["--max-steps", "3", "--eval-every", "3", "--epsilon", "0", "--lr", "1e-3", *small_data]
    train.main(["--output-dir", str(tmp_path / "epsilon-zero"), *arguments])
    monkeypatch.setattr(epsdpo, "epsilon_dpo_loss", plain_dpo)
    train.main(["--output-dir", str(tmp_path / "dpo"), *arguments])

    epsilon_zero, dpo = (
        load_file(tmp_path / "epsilon-zero/model.safetensors"),
        load_file(tmp_path / "dpo/model.safetensors"),
    )
    assert epsilon_zero.keys() == dpo.keys()
    assert all(torch.equal(epsilon_zero[name], dpo[name]) for name in dpo)
    for row, dpo_row in zip(read_metrics(tmp_path / "epsilon-zero"), read_metrics(tmp_path / "dpo"), strict=True):
        assert row == dpo_row


# ----------------------------------------------------------------------------------------------------
# Other data and models: JSONL files, a model folder


def test_standard_jsonl_from_a_local_model_folder(tmp_path, local_model):
    rows = [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in reviews(40)]
    dataset = write_jsonl(tmp_path / "pairs.jsonl", rows)
    output_dir = tmp_path / "out"
    train.main(
        [
            "--model",
            str(local_model),
            "--dataset",
            str(dataset),
            "--output-dir",
            str(output_dir),
            "--max-steps",
            "2",
            "--eval-fraction",
            "0.2",
            *QUICK,
        ]
    )
    summary = json.loads((output_dir / "summary.json").read_text())
    assert (summary["train_pairs"], summary["eval_pairs"]) == (32, 8)  # no test split: 20 % held out
    assert "gold_reward" not in summary["final"]  # no gold reward for other data
    assert summary["s_by_noise"].keys() == {"all"}
    # The trained model reloads: the local model's weights, every one finite, moved by its 2 steps
    trained, start = (AutoModelForCausalLM.from_pretrained(folder).state_dict() for folder in (output_dir, local_model))
    assert trained.keys() == start.keys() and all(trained[name].isfinite().all() for name in trained)
    assert not all(torch.equal(trained[name], start[name]) for name in trained)


def test_conversational_jsonl_is_rendered_with_the_chat_template(tmp_path, local_model):
    rows = [
        {
            "prompt": [{"role": "user", "content": p}],
            "chosen": [{"role": "assistant", "content": c}],
            "rejected": [{"role": "assistant", "content": r}],
        }
        for p, c, r in reviews(40)
    ]
    dataset = write_jsonl(tmp_path / "conversations.jsonl", rows)
    output_dir = tmp_path / "out"
    train.main(
        [
            "--model",
            str(local_model),
            "--dataset",
            str(dataset),
            "--output-dir",
            str(output_dir),
            "--max-steps",
            "2",
            *QUICK,
        ]
    )
    assert [r["step"] for r in read_metrics(output_dir) if r["split"] == "train"] == [1, 2]


def test_a_tokenizer_without_a_pad_token_pads_with_eos(tmp_path, local_model, small_data):
    folder = tmp_path / "no-pad"
    shutil.copytree(local_model, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(folder)
    assert AutoTokenizer.from_pretrained(folder).pad_token is None
    train.main(["--model", str(folder), "--output-dir", str(tmp_path / "out"), "--max-steps", "1", *small_data])
    assert (tmp_path / "out/summary.json").exists()


# ----------------------------------------------------------------------------------------------------
# What an evaluation measures


def test_the_sampled_kl_is_unbiased_non_negative_steadier_than_log_ratio():
    """On a model small enough to enumerate every completion (tokens 0, 1 and EOS = 2, at most 3 of them),
    the estimator's mean over π_θ is the exact KL(π_θ ‖ π_ref), computed here from its definition; on this
    model its variance is also less than half the sampled log-ratio's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=3,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=8,
    )
    reference = LlamaForCausalLM(config).eval()
    policy = LlamaForCausalLM(config).eval()
    policy.load_state_dict({k: v + 0.5 * torch.randn_like(v) for k, v in reference.state_dict().items()})
    # EOS ends a completion; one of 3 tokens ends anyway (max_new_tokens = 3).
    completions = [[2]] + [[a, 2] for a in (0, 1)] + [[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1, 2)]
    input_ids = torch.tensor([[1, 0] + y + [2] * (3 - len(y)) for y in completions])  # prompt [1, 0]
    completion_mask = torch.tensor([[0, 0] + [1] * len(y) + [0] * (3 - len(y)) for y in completions])
    with torch.no_grad():
        policy_logits, ref_logits = policy(input_ids).logits, reference(input_ids).logits
    logps = epsdpo.sequence_logps(policy_logits.double(), input_ids, completion_mask)
    ref_logps = epsdpo.sequence_logps(ref_logits.double(), input_ids, completion_mask)
    probabilities = logps.exp()
    assert probabilities.sum().item() == pytest.approx(1.0, abs=1e-9)  # every completion, once
    exact_kl = (probabilities * (logps - ref_logps)).sum()
    scored = completion_mask[:, 1:].bool()
    estimates = evaluation.sequence_kl(
        policy_logits[:, :-1][scored].split(scored.sum(1).tolist()),
        ref_logits[:, :-1][scored].split(scored.sum(1).tolist()),
    ).double()
    assert (estimates >= 0).all()
    assert (probabilities * estimates).sum().item() == pytest.approx(exact_kl.item(), rel=1e-5)
    log_ratio_variance = (probabilities * (logps - ref_logps - exact_kl) ** 2).sum()
    estimate_variance = (probabilities * (estimates - exact_kl) ** 2).sum()
    assert estimate_variance < 0.5 * log_ratio_variance


def test_evaluation_samples_the_policy_ignoring_its_generation_config(tmp_path, monkeypatch):
    from transformers import GenerationConfig
    from transformers.generation.utils import GenerationMixin

    folder = tiny_model_folder(tmp_path / "m")
    defaults = dict(
        do_sample=True,
        temperature=0.3,
        top_k=3,
        top_p=0.5,
        min_p=0.1,
        typical_p=0.9,
        repetition_penalty=1.1,
        no_repeat_ngram_size=2,
        min_new_tokens=4,
        bad_words_ids=[[5]],
        suppress_tokens=[6],
        epsilon_cutoff=1e-3,
        renormalize_logits=True,
        forced_eos_token_id=2,
    )
    GenerationConfig(**defaults).save_pretrained(folder)  # as an instruct checkpoint might ship it
    policy = AutoModelForCausalLM.from_pretrained(folder)
    assert policy.generation_config.repetition_penalty == 1.1
    built = []  # every logits processor generate() makes

    def recording(self, *args, **kwargs):
        processors = original(self, *args, **kwargs)
        built.append([type(processor).__name__ for processor in processors])
        return processors

    original = GenerationMixin._get_logits_processor
    monkeypatch.setattr(GenerationMixin, "_get_logits_processor", recording)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    pairs = [{"prompt_ids": tokenizer("Review of the lamp:")["input_ids"], "prompt": "Review of the lamp:"}] * 3
    args = argparse.Namespace(max_new_tokens=6, eval_batch_size=2, batch_size=2, seed=0)
    rewards, kls = evaluation.sample_and_score(
        policy, policy, tokenizer, pairs, lambda prompt, completion: 0.0, args, torch.device("cpu")
    )
    assert len(rewards) == len(kls) == 3 and len(built) == 2 and built == [[], []]  # no processor and no warper
    assert policy.generation_config.to_diff_dict() == GenerationConfig.from_pretrained(folder).to_diff_dict()


# ----------------------------------------------------------------------------------------------------
# The README's conventions, on the tiny model


def test_dropout_makes_s_measure_noise_and_eval_mode_makes_it_zero():
    # README, "The conventions": at the start (policy = reference) s is 0 for every pair, unless dropout draws a new
    # mask for each model's forward pass. The shipped model has no dropout: set attention_dropout = 0.1 to see it.
    tokenizer, pairs = the_demos_train_pairs(256)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL, attention_dropout=0.1)
    fractions = {}
    for mode in ("train", "eval"):
        model.train(mode == "train")
        s = []
        with torch.no_grad():
            for start in range(0, len(pairs), 64):
                batch = batches.collate(pairs[start : start + 64], tokenizer.pad_token_id, torch.device("cpu"))
                inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
                policy_logits, ref_logits = model(**inputs).logits, model(**inputs).logits
                s.append(epsdpo.criterion(policy_logits, ref_logits, batch.input_ids, batch.completion_mask, 0.01))
        fractions[mode] = (torch.cat(s) != 0).double().mean().item()
    assert fractions["eval"] == 0 and fractions["train"] > 0.9, fractions
