"""End-to-end tests of the scripts: train.py for a few optimizer steps on tiny_data and on data and models
made here, and bench.py --quick."""

import argparse
import copy
import json
import math
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests never download anything

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import compare
import epsdpo
import train
from training import (
    adapters,
    batches,
    bench_counts,
    checkpoints,
    data,
    errors,
    evaluation,
    loss,
    models,
    output_folder,
    signals,
)
from training.arguments import ROOT, TINY_DATASET, TINY_GOLD_REWARD, TINY_MODEL, parse_args

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
QUICK = ["--batch-size", "4", "--eval-batch-size", "32", "--max-new-tokens", "8", "--criterion-pairs", "0"]


def read_metrics(output_dir):
    return [json.loads(line) for line in open(output_dir / "metrics.jsonl")]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def tiny_data_cut(folder, train_rows, test_rows):
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", train_rows), ("test", test_rows)):
        lines = (TINY_DATASET / f"{split}.jsonl").read_text().splitlines()[:rows]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """Arguments for tiny_data cut to 200 train and 32 held-out pairs, with its gold reward: for the tests
    where the size of the data does not matter, so that their evaluations are quick."""
    folder = tiny_data_cut(tmp_path_factory.mktemp("small-data"), 200, 32)
    return ["--dataset", str(folder), "--gold-reward", str(TINY_GOLD_REWARD), *QUICK]


class RunInThisProcess:
    """What compare.start_run returns (a train.py run under way), for a run made in this process by train.main: the
    tests of what a comparison computes need not pay a fresh process's imports for each of its runs."""

    def __init__(self, arguments, environment, quiet):
        self.status, self.line = 0, ""
        try:
            train.main(arguments)
        except SystemExit as exit_info:
            self.status = exit_info.code if isinstance(exit_info.code, int) else 1
            self.line = exit_info.code if isinstance(exit_info.code, str) else ""

    def poll(self):
        return self.status

    wait = poll

    def send_signal(self, number):
        pass

    def kill(self):
        pass

    def last_line(self):
        return self.line


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Three steps of ε-DPO on tiny_data with two micro-batches per step and a large ε, so β moves."""
    output_dir = tmp_path_factory.mktemp("tiny")
    train.main(
        [
            "--output-dir",
            str(output_dir),
            "--max-steps",
            "3",
            "--eval-every",
            "2",
            "--grad-accum",
            "2",
            "--epsilon",
            "0.3",
            "--lr",
            "1e-3",
            *QUICK,
            "--criterion-pairs",
            "64",
        ]
    )
    return output_dir


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


def criterion_agreement_slowly(output_dir, pairs, epsilon):
    """summary.json's "criterion", counted apart from evaluation.py: the first `pairs` train pairs, one sequence at a
    time in float64 through the saved policy and the reference; z(λ) from the logits f_ref + λ (f_θ − f_ref) and s
    from z(1 − ε), z(1), z(1 + ε) by the README's rule; h = z(1) − z(0); ΔK from the KL at each completion position."""
    args, _ = parse_args(["--output-dir", str(output_dir)])
    tokenizer = data.load_tokenizer(TINY_MODEL)
    train_pairs = data.load_pairs(
        args.dataset,
        args.train_split,
        args.eval_split,
        args.eval_fraction,
        args.seed,
        tokenizer,
        args.max_length,
        args.max_prompt_length,
    )["pairs"]["train"][:pairs]
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
    for figure in ("curves.png", "criterion.png"):
        assert (tiny_run / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
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


@pytest.fixture(scope="module")
def local_model(tmp_path_factory):
    """The tiny model saved to a folder of its own, its tokenizer given a chat template."""
    folder = tmp_path_factory.mktemp("model")
    AutoModelForCausalLM.from_pretrained(TINY_MODEL).save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    # Every message ends with EOS, as many chat templates do (so train.py must not add a second one).
    tokenizer.chat_template = (
        "{% for message in messages %}{{ message['role'] }} : {{ message['content'] }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}assistant :{% endif %}"
    )
    tokenizer.save_pretrained(folder)
    return folder


def reviews(num_pairs):
    for i in range(num_pairs):
        product = ("kettle", "lamp", "chair")[i % 3]
        yield f"Review of the {product}:", " The price is great.", " The price is very awful and the fit is poor."


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


def test_compare_trains_dpo_and_epsilon_dpo_side_by_side(tmp_path, capsys, small_data):
    compare.main(["--output-dir", str(tmp_path), "--max-steps", "2", "--epsilon", "0.3", *small_data])
    dpo = json.loads((tmp_path / "dpo/summary.json").read_text())
    epsilon_dpo = json.loads((tmp_path / "epsilon-dpo/summary.json").read_text())
    assert (dpo["args"]["epsilon"], epsilon_dpo["args"]["epsilon"]) == (0.0, 0.3)
    assert dpo["final_beta"] == 0.1
    assert (tmp_path / "compare.png").exists()
    printed = capsys.readouterr().out
    assert "DPO end" in printed and "ε-DPO end" in printed


def test_every_panel_compares_like_with_like(tiny_run, tmp_path, monkeypatch):
    """compare.png has no loss (it moves with β) and leaves DPO, whose s is 0 throughout, out of the s panels;
    criterion.png zooms on [1 − 2ε, 1 + 2ε], where z(1 − ε), z(1), z(1 + ε) of each pair are the dots s compares."""
    import contextlib

    from training import reports

    figures = []
    monkeypatch.setattr(reports, "_save_figure", lambda figure, path: figures.append(figure))
    row = dict(
        split="train",
        beta=0.1,
        h=1.0,
        loss=0.6,
        **{"rewards/accuracies": 0.5, "logps/chosen": -9.0, "logps/rejected": -9.5, "gold_reward": 0.0, "kl": 0.0},
    )
    s = lambda weaker, stronger: {
        "s/weaker/clean": weaker,
        "s/stronger/clean": stronger,
        "s/weaker/noisy": stronger,
        "s/stronger/noisy": weaker,
    }
    runs = {
        "DPO": [dict(row, step=step, **s(0.0, 0.0)) for step in (1, 2)],
        "ε-DPO": [dict(row, step=step, **s(0.75, 0.25)) for step in (1, 2)],
    }
    reports.plot_curves(runs, tmp_path / "compare.png")
    titles = {axis.get_title(): axis for axis in figures[0].axes}
    assert not any("loss" in title for title in titles)
    s_panels = [axis for title, axis in titles.items() if title.startswith("fraction s")]
    assert len(s_panels) == 2 and all("DPO: s = 0 throughout, not drawn" in axis.get_title() for axis in s_panels)
    assert {line.get_color() for axis in s_panels for line in axis.lines} == {"tab:red"}  # ε-DPO's colour only

    folder = tiny_data_cut(tmp_path / "data", 8, 2)
    tokenizer = data.load_tokenizer(str(TINY_MODEL))
    pairs = data.load_pairs(str(folder), "train", None, 0.05, 0, tokenizer, 512, 256)["pairs"]["train"][:4]
    policy, reference = (AutoModelForCausalLM.from_pretrained(path).eval() for path in (tiny_run, TINY_MODEL))
    epsilon = 0.01
    measured = evaluation.criterion_measures(
        policy, reference, pairs, tokenizer.pad_token_id, epsilon, None, contextlib.nullcontext()
    )
    assert {1 - epsilon, 1.0, 1 + epsilon} <= set(measured["lambdas"])
    reports.plot_criterion(measured, epsilon, tmp_path / "criterion.png")
    left, middle, right = figures[1].axes[:3]
    assert middle.get_xlim() == pytest.approx((1 - 2 * epsilon, 1 + 2 * epsilon))
    dots = [line for line in middle.lines if line.get_marker() == "o"]
    assert len(dots) == len(measured["curves"])
    for line in dots:
        assert list(line.get_xdata()) == [1 - epsilon, 1.0, 1 + epsilon] and line.get_ydata()[1] == 0


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--beta", "0", "beta must be in (0, 1e6)"),
        ("--beta", "1.7e308", "beta must be in (0, 1e6)"),
        ("--seed", "100000000000000000000000", "must be in [0, 2**32)"),
        ("--epsilon", "1", "epsilon must be in [0, 1)"),
        ("--epsilon", "-0.1", "epsilon must be in [0, 1)"),
        ("--lr", "0", "the learning rate must be > 0"),
        ("--batch-size", "0", "must be >= 1"),
        ("--beta", "nan", "out of range"),
        ("--lr", "fast", "is not a number"),
        ("--lora-r", "-1", "must be >= 0"),
        ("--lora-alpha", "32", "apply only with --lora-r > 0"),
    ],
)
def test_bad_arguments_are_rejected_when_parsed(flag, value, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args([flag, value])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# Bad input gets a clear message; output is never lost; an interrupted run resumes as if never stopped


def run_expecting_error(arguments, main=train.main):
    """train.main's (or compare.main's) message when it stops on bad input (it exits with the message, no traceback)."""
    with pytest.raises(SystemExit) as exit_info:
        main(arguments)
    assert isinstance(exit_info.value.code, str), exit_info.value.code
    return exit_info.value.code


def good_rows(num_pairs=12):
    return [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in reviews(num_pairs)]


@pytest.mark.parametrize(
    "bad_row, message",
    [
        ({"prompt": "Review of the lamp:", "rejected": " Poor."}, "line 3: field 'chosen' is missing"),
        (
            {"prompt": "Review of the lamp:", "chosen": 5, "rejected": " Poor."},
            "line 3: field 'chosen' must be a string or a list of messages, not int",
        ),
        ({"prompt": "Review of the lamp:", "chosen": " Great.", "rejected": "  "}, "line 3: field 'rejected' is empty"),
        ({"chosen": " Great.", "rejected": " Poor."}, "line 3: field 'prompt' is missing"),
        (
            {"prompt": "Review of the lamp:", "chosen": " Great.", "rejected": " Poor.", "noisy": "yes"},
            "line 3: field 'noisy' must be true, false or null, not str 'yes'",
        ),
    ],
)
def test_a_malformed_row_stops_the_run_before_training_naming_file_line_and_field(tmp_path, bad_row, message):
    rows = good_rows()
    rows.insert(2, bad_row)
    dataset = write_jsonl(tmp_path / "pairs.jsonl", rows)
    error = run_expecting_error(["--dataset", str(dataset), "--output-dir", str(tmp_path / "out"), *QUICK])
    assert error.startswith(f"error: {dataset}, {message}") and "--skip-invalid" in error
    assert [p.name for p in (tmp_path / "out").iterdir()] == [".train.lock"]  # stopped before writing anything


def test_skip_invalid_drops_malformed_rows_and_reports_them(tmp_path, capsys):
    rows = good_rows(20)
    rows[4] = {"prompt": "Review of the lamp:", "chosen": None, "rejected": " Poor."}
    rows[7] = {"prompt": "Review of the lamp:", "chosen": " Same.", "rejected": " Same."}
    dataset = write_jsonl(tmp_path / "pairs.jsonl", rows)
    output_dir = tmp_path / "out"
    train.main(
        [
            "--dataset",
            str(dataset),
            "--output-dir",
            str(output_dir),
            "--skip-invalid",
            "--max-steps",
            "1",
            "--eval-fraction",
            "0.1",
            *QUICK,
        ]
    )
    summary = json.loads((output_dir / "summary.json").read_text())
    skipped = {reason: count for split in summary["skipped"].values() for reason, count in split.items()}
    assert skipped == {"invalid (--skip-invalid)": 1, "chosen identical to rejected": 1}
    assert summary["train_pairs"] + summary["eval_pairs"] == 18
    assert "skipped 1" in capsys.readouterr().out


def test_missing_paths_and_unusable_data_give_one_line_errors(tmp_path):
    output = ["--output-dir", str(tmp_path / "out"), *QUICK]
    assert "no such file or folder" in run_expecting_error(["--dataset", str(tmp_path / "nothing.jsonl"), *output])
    assert run_expecting_error(["--model", str(tmp_path / "no-model"), *output]).startswith(
        f"error: --model {tmp_path / 'no-model'}"
    )
    same = write_jsonl(tmp_path / "same.jsonl", [{"prompt": "Review:", "chosen": " Ok.", "rejected": " Ok."}] * 10)
    assert "0 usable train pairs" in run_expecting_error(["--dataset", str(same), *output])
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(good_rows(1)[0]) + "\n{not json\n")
    assert run_expecting_error(["--dataset", str(broken), *output]).startswith(
        f"error: {broken}, line 2: not valid JSON"
    )


def test_a_tokenizer_without_a_pad_token_pads_with_eos(tmp_path, local_model, small_data):
    folder = tmp_path / "no-pad"
    shutil.copytree(local_model, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(folder)
    assert AutoTokenizer.from_pretrained(folder).pad_token is None
    train.main(["--model", str(folder), "--output-dir", str(tmp_path / "out"), "--max-steps", "1", *small_data])
    assert (tmp_path / "out/summary.json").exists()


def test_a_non_empty_output_dir_is_refused_and_left_untouched(tmp_path, small_data):
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "notes.txt").write_text("mine")
    error = run_expecting_error(["--output-dir", str(output_dir), "--max-steps", "1", *small_data])
    assert "is not empty" in error and "--overwrite" in error
    assert [p.name for p in output_dir.iterdir()] == ["notes.txt"] and (output_dir / "notes.txt").read_text() == "mine"
    train.main(["--output-dir", str(output_dir), "--max-steps", "1", "--overwrite", *small_data])
    assert (output_dir / "summary.json").exists() and (output_dir / "notes.txt").read_text() == "mine"


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_keeps_the_last_checkpoint(
    tmp_path, monkeypatch, small_data
):
    calls, real_loss = [], epsdpo.epsilon_dpo_loss
    monkeypatch.setattr(models, "FROM_HIDDEN_STATES", False)  # the loss from logits, which this wraps

    def loss_that_breaks_at_the_third_step(*args):
        out = real_loss(*args)
        calls.append(torch.is_grad_enabled())  # True in training, False in evaluation
        if sum(calls) == 3 and calls[-1]:  # the third training micro-batch: step 3
            out.losses = out.losses * float("nan")
            out.loss = out.losses.mean()
        return out

    monkeypatch.setattr(epsdpo, "epsilon_dpo_loss", loss_that_breaks_at_the_third_step)
    output_dir = tmp_path / "out"
    error = run_expecting_error(
        ["--output-dir", str(output_dir), "--max-steps", "5", "--save-every", "2", "--eval-every", "100", *small_data]
    )
    assert error.startswith("error: step 3: the loss or the gradient is not finite") and "checkpoint-2" in error
    state = torch.load(output_dir / "checkpoint-2/trainer_state.pt", weights_only=True)
    assert state["step"] == 2
    assert max(row["step"] for row in read_metrics(output_dir)) == 2  # nothing of the bad step


def test_code_in_a_model_folder_runs_only_with_trust_remote_code(tmp_path, local_model, small_data):
    folder = tmp_path / "with-code"
    shutil.copytree(local_model, folder)
    marker = tmp_path / "the model's code ran"
    (folder / "custom_model.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "custom_model.CustomModel"}
    (folder / "config.json").write_text(json.dumps(config))
    train.main(["--model", str(folder), "--output-dir", str(tmp_path / "out"), "--max-steps", "1", *small_data])
    assert not marker.exists()


def test_checkpoints_keep_the_last_few(tmp_path, small_data):
    output_dir = tmp_path / "out"
    train.main(
        [
            "--output-dir",
            str(output_dir),
            "--max-steps",
            "5",
            "--save-every",
            "1",
            "--keep-checkpoints",
            "2",
            "--eval-every",
            "100",
            *small_data,
        ]
    )
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-5"]
    assert sorted(p.name for p in output_dir.glob(".*")) == [".train.files", ".train.lock"]  # no temporary left behind
    assert set(json.loads((output_dir / ".train.files").read_text())["files"]) == {
        "metrics.jsonl",
        "curves.png",
        "summary.json",
        *(p.name for p in output_dir.iterdir() if not p.name.startswith((".", "checkpoint-"))),
    }


def test_the_command_line_runs_offline_and_an_interrupted_run_resumes_to_the_same_end_bit_for_bit(tmp_path, small_data):
    """python train.py as a user types it, in fresh processes with no network: stopped by a SIGTERM mid-run with a
    checkpoint; resumed, it ends as the run never stopped and prints its summary."""
    arguments = ["--max-steps", "60", "--eval-every", "1000", "--save-every", "1000", "--epsilon", "0.2", *small_data]
    train.main(["--output-dir", str(tmp_path / "whole"), *arguments])

    interrupted, offline = tmp_path / "interrupted", {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    process = subprocess.Popen(
        [sys.executable, "train.py", "--output-dir", str(interrupted), *arguments],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=offline,
    )
    deadline = time.time() + 60
    while not any(row["split"] == "train" for row in read_metrics_if_any(interrupted)) and time.time() < deadline:
        time.sleep(0.05)
    # One run per output folder: a second one into it stops at once, and touches nothing.
    started = time.time()
    error = run_expecting_error(["--output-dir", str(interrupted), "--overwrite", *arguments])
    assert (
        error
        == f"error: --output-dir {interrupted} is in use by another run (it holds .train.lock); nothing was touched"
    )
    assert time.time() - started < 1 and process.poll() is None
    process.send_signal(signal.SIGTERM)  # a real signal, mid-run
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM and "Traceback" not in stderr, stderr
    checkpoints_written = list(interrupted.glob("checkpoint-*"))
    assert len(checkpoints_written) == 1, stdout + stderr
    (checkpoint,) = checkpoints_written
    stopped_at = int(checkpoint.name.split("-")[1])
    assert 1 <= stopped_at < 60 and "--resume" in stdout

    resumed = subprocess.run(
        [sys.executable, "train.py", "--resume", str(interrupted)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=offline,
    )
    assert resumed.returncode == 0 and "Traceback" not in resumed.stderr, resumed.stderr
    assert "held-out reward accuracy" in resumed.stdout
    whole_rows, resumed_rows = read_metrics(tmp_path / "whole"), read_metrics(interrupted)
    assert [(r["split"], r["step"]) for r in resumed_rows] == [(r["split"], r["step"]) for r in whole_rows]
    assert [r["beta"] for r in resumed_rows] == [r["beta"] for r in whole_rows]
    whole, resumed = load_file(tmp_path / "whole/model.safetensors"), load_file(interrupted / "model.safetensors")
    assert all(torch.equal(whole[name], resumed[name]) for name in whole)
    assert (
        json.loads((interrupted / "summary.json").read_text())["final_beta"]
        == json.loads((tmp_path / "whole/summary.json").read_text())["final_beta"]
    )


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def one_launch(runs, rendezvous):
    """What each process of two_ranks' torchrun launch runs: train.main on each run's argv in turn. Each run joins a
    process group of its own (train.main ends it): torchrun's would be joined again by a rank that starts the next
    run while the other still finishes the last, and meet that rank's old connection. A run with "from_hidden" takes
    the loss from hidden states whatever its size (loss.PLAIN_LOSS_BYTES = 0). Each process writes, per run, how
    often that loss ran, the all-gathers of each generate() call, the models it read whole (models.load_model) and
    how often the loss left a sharded reference's root gathered, to RENDEZVOUS-I-RANK.json; and its process id
    to RENDEZVOUS-RANK.pid. A run with "stop" is stopped by a signal (train.main exits with its status, counted too):
    the next one follows."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from transformers import GenerationMixin

    import epsdpo_chunked
    from training import sharding

    counts, real_all_gather, real_generate = {}, dist.all_gather_single, GenerationMixin.generate
    real_loss, plain_loss_bytes = epsdpo_chunked.epsilon_dpo_loss_from_hidden, loss.PLAIN_LOSS_BYTES

    def all_gather_single(*args, **kwargs):  # what FSDP2 gathers a unit's weights with
        counts["all_gathers"] += 1
        return real_all_gather(*args, **kwargs)

    def generate(self, *args, **kwargs):
        before = counts["all_gathers"]
        try:
            return real_generate(self, *args, **kwargs)
        finally:
            counts["all_gathers_per_generate"].append(counts["all_gathers"] - before)

    def loss_from_hidden(*args, **kwargs):
        counts["losses_from_hidden"] += 1
        return real_loss(*args, **kwargs)

    def load_model(name, *args, **kwargs):
        counts["models_read"].append(str(name))
        return real_load_model(name, *args, **kwargs)

    def forward(policy, reference, *args, **kwargs):
        out = real_forward(policy, reference, *args, **kwargs)
        if sharding.sharded(reference):  # its root is gathered only for the loss
            counts["reference_root_left_whole"] += not isinstance(reference.get_output_embeddings().weight, DTensor)
        return out

    real_load_model, real_forward = models.load_model, loss.micro_batch_loss
    dist.all_gather_single, GenerationMixin.generate, epsdpo_chunked.epsilon_dpo_loss_from_hidden = (
        all_gather_single,
        generate,
        loss_from_hidden,
    )
    models.load_model, train.micro_batch_loss, evaluation.micro_batch_loss = load_model, forward, forward
    pathlib.Path(f"{rendezvous}-{os.environ['RANK']}.pid").write_text(str(os.getpid()))
    for i, run in enumerate(json.loads(runs)):
        counts.update(
            all_gathers=0,
            all_gathers_per_generate=[],
            losses_from_hidden=0,
            models_read=[],
            reference_root_left_whole=0,
            exit_status=0,
        )
        loss.PLAIN_LOSS_BYTES = 0 if run.get("from_hidden") else plain_loss_bytes
        dist.init_process_group(
            "gloo",
            init_method=f"file://{rendezvous}-{i}",
            rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
        )
        started = time.time()
        try:
            train.main(run["argv"])
        except SystemExit as stopped:
            if not run.get("stop"):
                raise
            counts["exit_status"] = stopped.code
        pathlib.Path(f"{rendezvous}-{i}-{os.environ['RANK']}.json").write_text(json.dumps(counts))
        if os.environ["RANK"] == "0":
            print(f"run {i}: {time.time() - started:.1f} s")


def launch(runs, rendezvous):
    """One torchrun launch of 2 CPU processes (gloo) running one_launch on each run's argv in turn: (its stdout and
    stderr, what each process counted in each run). A run with "stop" is stopped once it has logged a step: "sigterm",
    by a SIGTERM to each process, as a cluster's scheduler sends it to every process of a job it preempts, and the
    launch goes on; "ctrl-c" (the last run), by a Ctrl-C: SIGINT to the whole process group, so that each rank gets
    it two or three times within milliseconds (torchrun passes it on too), which ends the launch."""
    script = "import sys, test_train; test_train.one_launch(sys.argv[1], sys.argv[2])"
    process = subprocess.Popen(
        [*TORCHRUN, "--no-python", sys.executable, "-c", script, json.dumps(list(runs.values())), str(rendezvous)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        start_new_session=True,
    )
    for run in runs.values():
        if run.get("stop"):
            output_dir, deadline = pathlib.Path(run["argv"][1]), time.time() + 240
            while (
                not any(row["split"] == "train" for row in read_metrics_if_any(output_dir)) and time.time() < deadline
            ):
                time.sleep(0.01)  # a step takes tens of milliseconds: signal in the first ones
            if run["stop"] == "ctrl-c":
                os.killpg(process.pid, signal.SIGINT)
            else:
                for rank in (0, 1):
                    os.kill(int(pathlib.Path(f"{rendezvous}-{rank}.pid").read_text()), signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0 or list(runs.values())[-1].get("stop") == "ctrl-c", stderr[-3000:]
    counted = {
        name: [json.loads(pathlib.Path(f"{rendezvous}-{i}-{rank}.json").read_text()) for rank in (0, 1)]
        for i, name in enumerate(runs)
        if runs[name].get("stop") != "ctrl-c"
    }
    return (stdout, stderr), counted


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, lora_run):
    """One process with 8 pairs per step, and 2 CPU processes (gloo) with 4 pairs each: with DDP (the loss from hidden
    states), and with FSDP in two micro-batches of 2: in float32 from logits and from hidden states, and in bf16 from
    hidden states with gradient checkpointing; lora_run's LoRA run with DDP; the one-process run resumed on 2
    processes. An FSDP run stopped by a SIGTERM, then resumed; a DDP run stopped by a Ctrl-C. 33 held-out pairs: the
    ranks' shares differ by one. One torchrun launch (a launch costs seconds to start), ended by the Ctrl-C. Returns
    (folder, what the launch printed, what each process counted in each run)."""
    folder = tmp_path_factory.mktemp("two-ranks")
    arguments = [
        "--dataset",
        str(tiny_data_cut(folder / "data", 200, 33)),
        "--gold-reward",
        str(TINY_GOLD_REWARD),
        "--max-new-tokens",
        "8",
        "--eval-batch-size",
        "16",
        "--max-steps",
        "15",
        "--eval-every",
        "1000",
        "--save-every",
        "1000",
        "--epsilon",
        "0.3",
        "--lr",
        "1e-3",
        "--criterion-pairs",
        "0",
    ]
    train.main(["--output-dir", str(folder / "one"), *arguments, "--batch-size", "8", "--save-every", "5"])
    ddp, fsdp = [*arguments, "--batch-size", "4"], [*arguments, "--fsdp", "--batch-size", "2", "--grad-accum", "2"]
    lora_arguments, _ = lora_run
    shutil.copytree(
        folder / "one", folder / "one-on-two", ignore=shutil.ignore_patterns(".train.lock", "checkpoint-15")
    )
    runs = {
        "ddp-whole": dict(argv=["--output-dir", str(folder / "ddp-whole"), *ddp], from_hidden=True),
        "fsdp-whole": dict(argv=["--output-dir", str(folder / "fsdp-whole"), *fsdp, "--save-every", "5"]),
        "fsdp-hidden": dict(
            argv=["--output-dir", str(folder / "fsdp-hidden"), *fsdp, "--criterion-pairs", "8"], from_hidden=True
        ),
        "fsdp-bf16": dict(
            argv=["--output-dir", str(folder / "fsdp-bf16"), *fsdp, "--dtype", "bfloat16", "--gradient-checkpointing"],
            from_hidden=True,
        ),
        "lora": dict(
            argv=["--output-dir", str(folder / "lora"), *lora_arguments, "--batch-size", "4"], from_hidden=True
        ),
        "one-on-two": dict(argv=["--resume", str(folder / "one-on-two"), "--gold-reward", str(TINY_GOLD_REWARD)]),
        "fsdp": dict(argv=["--output-dir", str(folder / "fsdp"), *fsdp], stop="sigterm"),
        "fsdp-resumed": dict(argv=["--resume", str(folder / "fsdp"), "--gold-reward", str(TINY_GOLD_REWARD)]),
        "ddp": dict(argv=["--output-dir", str(folder / "ddp"), *ddp], from_hidden=True, stop="ctrl-c"),
    }
    started = time.time()
    printed, counted = launch(runs, folder / "rendezvous")
    print(
        f"{len(runs)} runs in one launch of 2 processes: {time.time() - started:.1f} s ("
        + ", ".join(line for line in printed[0].splitlines() if line.startswith("run "))
        + ")"
    )
    return folder, printed, counted


def test_two_ranks_under_torchrun_agree_on_beta_and_match_one_process_and_a_ctrl_c_stops_both_at_once(two_ranks):
    """2 CPU processes (gloo) with 4 pairs each are one process with 8: the same β at every step on both
    ranks and in the single process, and the same weights up to float rounding, with the loss from hidden states:
    DDP sees the forward pass of models.last_hidden_states and averages the output layer's gradient from both of its
    uses. A Ctrl-C reaches each rank two or three times: one stop, one checkpoint, the torchrun command to go on
    (the stopped run is resumed by test_a_two_process_run_resumed_in_one_process_trains_each_step_on_the_same_pairs)."""
    folder, printed, counted = two_ranks
    assert all(process["losses_from_hidden"] > 0 for process in counted["ddp-whole"])
    stdout, stderr = printed
    assert "checkpoint written" in stdout and len(list((folder / "ddp").glob("checkpoint-*"))) == 1
    assert (
        f"checkpoint written: torchrun --nproc_per_node 2 train.py --resume {folder / 'ddp'} continues the run"
        in stdout
    )
    assert "second signal" not in stderr
    one_rows, two_rows = read_metrics(folder / "one"), read_metrics(folder / "ddp-whole")
    assert [(r["split"], r["step"]) for r in two_rows] == [(r["split"], r["step"]) for r in one_rows]
    for one_row, two_row in zip(one_rows, two_rows, strict=True):
        assert two_row["beta"] == one_row["beta"]
        if two_row["split"] == "train":
            assert two_row["beta/ranks"] == [one_row["beta"]] * 2  # the β both ranks used
            assert two_row["beta/pairs_mean"] == one_row["beta/pairs_mean"]  # and the β both moved to
    one, two = load_file(folder / "one/model.safetensors"), load_file(folder / "ddp-whole/model.safetensors")
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-4)


@pytest.mark.parametrize("run", ["fsdp-whole", "fsdp-hidden"])
def test_fsdp_on_two_ranks_is_one_process_with_the_same_global_batch(two_ranks, run):
    """FSDP shards the weights, gradients and AdamW state; ε-DPO is unchanged: the same β and s at every
    step, the metrics, the clipped gradient's norm (over the shards) and the weights up to float32 rounding,
    with the loss from the logits and from the hidden states (the output layer's weight is whole after the
    forward pass: the policy's root unit stays gathered, the reference's until the loss is computed).
    The model rank 0 gathers and saves loads as a float32 model, with --model's generation config."""
    folder, printed, counted = two_ranks
    assert "the loss from full" not in printed[0]  # the hidden path is open
    assert all((process["losses_from_hidden"] > 0) == (run == "fsdp-hidden") for process in counted[run])
    assert all(process["reference_root_left_whole"] == 0 for process in counted[run])  # freed before the backward
    one_rows, fsdp_rows = read_metrics(folder / "one"), read_metrics(folder / run)
    assert [(r["split"], r["step"]) for r in fsdp_rows] == [(r["split"], r["step"]) for r in one_rows]
    for one_row, fsdp_row in zip(one_rows, fsdp_rows, strict=True):
        for key in ("beta", "beta/pairs_mean", "s/weaker", "s/stronger"):
            assert fsdp_row[key] == one_row[key], (key, one_row["step"])
        if fsdp_row["split"] == "train":
            assert fsdp_row["beta/ranks"] == [one_row["beta"]] * 2
        for key in ("loss", "grad_norm", "rewards/margins", "logps/chosen", "logps/rejected"):  # the evaluations'
            if key in one_row:  # 33 pairs too
                assert fsdp_row[key] == pytest.approx(one_row[key], rel=1e-5, abs=1e-6), (key, one_row["step"])
    one = load_file(folder / "one/model.safetensors")
    saved = AutoModelForCausalLM.from_pretrained(folder / run).state_dict()
    for name in one:
        assert saved[name].dtype == torch.float32
        torch.testing.assert_close(saved[name], one[name], rtol=0, atol=1e-4)
    assert (folder / run / "generation_config.json").read_text() == (folder / "one/generation_config.json").read_text()


def test_under_fsdp_process_0_alone_reads_the_weights_once_and_a_resumed_run_reads_only_the_reference(two_ranks):
    """Both models are built on the meta device and filled from process 0's one read of --model (the reference
    being --model); resuming, the policy's shards come from the checkpoint, so --model is read for the
    reference alone. DDP reads both models on every process (resumed: the checkpoint's policy). The FSDP runs equal
    one process's (above), so the rotary frequencies, which are not in the weights' files, are right on every process."""
    _, _, counted = two_ranks
    model = str(TINY_MODEL)
    for run in ("fsdp-whole", "fsdp-hidden", "fsdp-bf16", "fsdp-resumed"):
        assert [process["models_read"] for process in counted[run]] == [[model], []], run
    assert [process["models_read"] for process in counted["ddp-whole"]] == [[model, model]] * 2
    checkpoint = two_ranks[0] / "one-on-two/checkpoint-10"
    assert [process["models_read"] for process in counted["one-on-two"]] == [[str(checkpoint), model]] * 2


def test_under_fsdp_sampling_gathers_each_unit_once_per_evaluation_not_once_per_token(two_ranks):
    """generate() runs the policy once per new token; under FSDP every unit (2 layers and the root) would be
    all-gathered at every call, 3 × up to 8 per generate() here. sharding.gathered_once keeps them gathered
    through an evaluation's samples: each unit at most once in its first generate() (the root may still be
    gathered from the evaluation's loss), none in its second. Two evaluations, each 17 prompts a rank in
    batches of 16 and 1."""
    folder, _, counted = two_ranks
    for run in ("fsdp-whole", "fsdp-hidden", "fsdp-bf16"):
        for process in counted[run]:
            first, second, third, fourth = process["all_gathers_per_generate"]
            assert 1 <= first <= 3 and 1 <= third <= 3 and second == fourth == 0, (run, process)
    # criterion.png under FSDP, from hidden states
    assert json.loads((folder / "fsdp-hidden/summary.json").read_text())["criterion"]["pairs"] == 8
    assert (folder / "fsdp-hidden/criterion.png").exists()


def test_fsdp_resumed_after_a_sigterm_to_each_process_is_the_run_never_stopped_bit_for_bit(two_ranks):
    """A scheduler's SIGTERM to every process of the job: one sharded checkpoint, which the run resumes from."""
    folder, printed, counted = two_ranks
    stdout, stderr = printed
    assert [process["exit_status"] for process in counted["fsdp"]] == [128 + signal.SIGTERM] * 2
    (checkpoint,) = (folder / "fsdp").glob("checkpoint-*")
    step = int(checkpoint.name.split("-")[1])
    assert 1 <= step < 15 and "second signal" not in stderr
    assert (
        f"stopped by signal 15 after step {step}; checkpoint written: torchrun --nproc_per_node 2 train.py --resume "
        f"{folder / 'fsdp'} continues the run" in stdout
    )
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
        "trainer_state.pt",
    ]
    assert "optimizer" not in torch.load(checkpoint / "trainer_state.pt", weights_only=True)  # it is in the shards
    assert read_metrics(folder / "fsdp") == read_metrics(folder / "fsdp-whole")
    whole, resumed = load_file(folder / "fsdp-whole/model.safetensors"), load_file(folder / "fsdp/model.safetensors")
    assert all(torch.equal(whole[name], resumed[name]) for name in whole)


def test_under_fsdp_each_rank_holds_half_of_the_weights_gradients_optimizer_state_and_checkpoint(two_ranks):
    folder, _, _ = two_ranks
    one, ddp, fsdp = (
        json.loads((folder / run / "summary.json").read_text())["bytes_held_by_rank_0"]
        for run in ("one", "ddp-whole", "fsdp-whole")
    )
    assert one["parameters"] == 86_080 * 4 and ddp == one  # DDP: a whole copy on every rank
    for kind in ("parameters", "gradients", "optimizer", "reference"):
        assert fsdp[kind] == pytest.approx(one[kind] / 2, rel=0.01), kind
    # bench.py --memory's computed bytes are these measured ones (less AdamW's step counts, 4 bytes a tensor)
    from training import bench_memory

    with torch.device("meta"):
        computed = bench_memory.bytes_per_gpu(
            AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_MODEL)), gpus=2
        )
    assert computed["ddp"]["policy"] == pytest.approx(one["parameters"] + one["gradients"] + one["optimizer"], abs=100)
    assert computed["fsdp"]["policy"] == pytest.approx(
        fsdp["parameters"] + fsdp["gradients"] + fsdp["optimizer"], abs=100
    )
    shards = [(folder / "fsdp-whole/checkpoint-15" / f"__{rank}_0.distcp").stat().st_size for rank in (0, 1)]
    assert all(0.45 < shard / sum(shards) < 0.55 for shard in shards)
    assert sorted(p.name for p in (folder / "fsdp-whole").glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-15"]


def test_fsdp_in_bf16_starts_exactly_at_the_reference_and_trains_with_gradient_checkpointing(two_ranks):
    """bf16 weights gathered for compute, float32 shards and reductions: at the start the reference (stored
    in bf16) computes the policy's logits bit for bit, so every s is 0 and the loss is log 2; then, with
    layers recomputed in backward, it trains as float32 does within bf16's rounding."""
    folder, _, counted = two_ranks
    assert all(process["losses_from_hidden"] > 0 for process in counted["fsdp-bf16"])  # from hidden states
    bf16_rows, float32_rows = read_metrics(folder / "fsdp-bf16"), read_metrics(folder / "fsdp-whole")
    start, first_step = bf16_rows[0], bf16_rows[1]
    assert (start["rewards/margins"], start["s/weaker"], start["s/stronger"]) == (0.0, 0.0, 0.0)
    assert start["loss"] == float32_rows[0]["loss"] == float(torch.tensor(math.log(2)))
    assert (first_step["split"], first_step["s/weaker"], first_step["s/stronger"]) == ("train", 0.0, 0.0)
    for bf16_row, float32_row in zip(bf16_rows[1:4], float32_rows[1:4], strict=True):
        assert bf16_row["loss"] == pytest.approx(float32_row["loss"], abs=2**-7)


def test_a_model_built_empty_takes_its_shards_from_a_checkpoint_and_another_models_shards_are_refused(tmp_path):
    """models.empty_model has its weights on the meta device and the buffers from_pretrained computes (rotary
    frequencies; Gemma-2's embedding scale; Llama-3.1's scaled rotary frequencies). In a process group of one
    (gloo), in this process: sharded, it takes a sharded checkpoint's weights (sharding.load_sharded_weights, as
    a resumed FSDP run does), and another model's shards give one line."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from training import sharding

    llama_3_1 = {
        "rope_type": "llama3",
        "rope_theta": 5e5,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    }
    for kind, config in [
        ("gemma2", {"head_dim": 8}),
        ("mixtral", {}),
        ("qwen2", {}),
        ("llama", {"rope_parameters": llama_3_1}),
    ]:
        folder = tiny_model_folder(tmp_path / kind, kind=kind, **config)
        loaded, empty = (
            AutoModelForCausalLM.from_pretrained(folder),
            models.empty_model(folder, trust_remote_code=False),
        )
        assert [(n, b.tolist()) for n, b in empty.named_buffers()] == [
            (n, b.tolist()) for n, b in loaded.named_buffers()
        ], kind
    loaded = AutoModelForCausalLM.from_pretrained(TINY_MODEL)
    empty = models.empty_model(str(TINY_MODEL), trust_remote_code=False)
    assert {p.device.type for p in empty.parameters()} == {"meta"}
    assert [(n, b.tolist()) for n, b in empty.named_buffers()] == [(n, b.tolist()) for n, b in loaded.named_buffers()]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        dcp.save({"model": get_model_state_dict(sharding.shard(loaded))}, checkpoint_id=tmp_path / "checkpoint-1")
        other = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_MODEL, vocab_size=70))
        dcp.save({"model": get_model_state_dict(sharding.shard(other))}, checkpoint_id=tmp_path / "checkpoint-2")
        policy = sharding.allocate_shards(sharding.shard(empty), torch.device("cpu"))
        sharding.load_sharded_weights(policy, tmp_path / "checkpoint-1")
        expected = load_file(TINY_MODEL / "model.safetensors")
        assert all(torch.equal(sharding.local(policy.get_parameter(name)), expected[name]) for name in expected)
        with pytest.raises(
            errors.ReportedError, match=f"{tmp_path / 'checkpoint-2'}: its shards do not load into this model"
        ):
            sharding.load_sharded_weights(policy, tmp_path / "checkpoint-2")
    finally:
        dist.destroy_process_group()


def test_a_cut_shard_makes_the_sharded_checkpoint_before_it_the_one_resumed(two_ranks, tmp_path, capsys):
    output_dir = copy_of(two_ranks[0] / "fsdp-whole", tmp_path)
    shard = output_dir / "checkpoint-15/__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    folder, state = checkpoints.latest_checkpoint(output_dir)
    assert (folder, state["step"]) == (output_dir / "checkpoint-10", 10)
    assert (
        f"note: {output_dir / 'checkpoint-15'} cannot be resumed from (ValueError: __1_0.distcp is cut short)"
        in capsys.readouterr().out
    )


def read_metrics_if_any(output_dir):
    try:
        return read_metrics(output_dir)
    except (FileNotFoundError, json.JSONDecodeError):
        return []


# ----------------------------------------------------------------------------------------------------
# Trust: a checkpoint never runs code, the user's files are never touched, one line per bad input


def test_a_resume_never_runs_code_the_checkpoint_names_and_refuses_flags_it_cannot_apply(tmp_path, capsys, small_data):
    gold = tmp_path / "gold.py"
    gold.write_text("def score(prompt, completion):\n    return 100.0\n")
    output_dir = tmp_path / "out"
    train.main(
        [
            "--output-dir",
            str(output_dir),
            *small_data,
            "--gold-reward",
            str(gold),
            "--max-steps",
            "2",
            "--save-every",
            "1",
            "--eval-every",
            "1000",
        ]
    )
    # Someone edits the checkpoint so that resuming it runs their code.
    marker, evil = tmp_path / "their code ran", tmp_path / "evil.py"
    evil.write_text(f"open({str(marker)!r}, 'w').close()\ndef score(prompt, completion):\n    return 0.0\n")
    state_path = output_dir / "checkpoint-2/trainer_state.pt"
    state = torch.load(state_path, weights_only=True)
    state["args"].update(gold_reward=str(evil), trust_remote_code=True)
    torch.save(state, state_path)
    capsys.readouterr()
    train.main(["--resume", str(output_dir), "--max-steps", "3"])  # more steps: allowed
    assert not marker.exists()
    printed = capsys.readouterr().out
    assert "the run had --gold-reward" in printed and "the run had --trust-remote-code" in printed
    summary = json.loads((output_dir / "summary.json").read_text())
    assert (summary["args"]["gold_reward"], summary["args"]["trust_remote_code"], summary["steps"]) == (None, False, 3)
    assert "gold_reward" not in summary["final"]  # no gold reward at all

    error = run_expecting_error(["--resume", str(output_dir), "--max-steps", "4", "--beta", "0.2"])
    assert (
        error.startswith(f"error: --resume {output_dir}: --beta 0.2 differs from the run's 0.1")
        and "--max-steps" in error
    )
    assert run_expecting_error(["--resume", str(output_dir), "--max-steps", "3"]).endswith(
        "checkpoint-3 is at or past --max-steps 3; give a larger --max-steps to train on"
    )
    train.main(["--resume", str(output_dir), "--max-steps", "4", "--gold-reward", str(gold)])  # given again: it runs
    assert json.loads((output_dir / "summary.json").read_text())["final"]["gold_reward"] == 100.0


def test_only_the_projects_own_files_are_touched(tmp_path, small_data):
    output_dir = tmp_path / "out"
    theirs = {
        "checkpoint-14-copy/trainer_state.pt": "a copy",
        "checkpoint-backup/notes.txt": "mine",
        "checkpoint-99-old/trainer_state.pt": "old",
        "checkpoint-2x/x": "mine",
        "notes.txt": "mine",
        ".saving/x": "mine",
        "metrics.jsonl.tmp": "mine",
        "checkpoint-5.tmp/x": "mine",
    }
    for name, text in theirs.items():
        (output_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (output_dir / name).write_text(text)
    arguments = ["--save-every", "1", "--keep-checkpoints", "1", "--eval-every", "1000", *small_data]
    train.main(["--output-dir", str(output_dir), "--overwrite", "--max-steps", "3", *arguments])  # prunes to the last
    train.main(["--resume", str(output_dir), "--max-steps", "4"])  # from checkpoint-3, not 99-old
    assert [r["step"] for r in read_metrics(output_dir) if r["split"] == "train"] == [1, 2, 3, 4]
    train.main(["--output-dir", str(output_dir), "--overwrite", "--max-steps", "1", *arguments])
    assert {name: (output_dir / name).read_text() for name in theirs} == theirs
    assert sorted(p.name for p in output_dir.glob("checkpoint-*") if p.is_dir()) == [
        "checkpoint-1",
        "checkpoint-14-copy",
        "checkpoint-2x",
        "checkpoint-5.tmp",
        "checkpoint-99-old",
        "checkpoint-backup",
    ]


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory, small_data):
    """A run of 2 steps with a checkpoint after each, to copy and break."""
    output_dir = tmp_path_factory.mktemp("two-checkpoints") / "out"
    train.main(
        [
            "--output-dir",
            str(output_dir),
            "--max-steps",
            "2",
            "--save-every",
            "1",
            "--keep-checkpoints",
            "2",
            "--eval-every",
            "1000",
            *small_data,
        ]
    )
    return output_dir


def copy_of(run, tmp_path):
    shutil.copytree(run, tmp_path / "out")
    (tmp_path / "out/.train.lock").unlink()
    return tmp_path / "out"


@pytest.mark.parametrize("break_it", ["garbage", "truncated", "no arguments"])
def test_an_unreadable_checkpoint_is_named_and_the_one_before_resumed(two_checkpoints, tmp_path, capsys, break_it):
    output_dir = copy_of(two_checkpoints, tmp_path)
    state_path = output_dir / "checkpoint-2/trainer_state.pt"
    if break_it == "garbage":
        state_path.write_bytes(b"not a checkpoint at all")
    elif break_it == "truncated":
        state_path.write_bytes(state_path.read_bytes()[:1000])
    else:
        state = torch.load(state_path, weights_only=True)
        del state["args"]
        torch.save(state, state_path)
    train.main(["--resume", str(output_dir)])  # to step 2 again
    printed = capsys.readouterr().out
    assert f"note: {output_dir / 'checkpoint-2'} cannot be resumed from" in printed
    assert f"resuming from {output_dir / 'checkpoint-1'} at step 2" in printed
    assert [r["step"] for r in read_metrics(output_dir) if r["split"] == "train"] == [1, 2]
    for checkpoint in ("checkpoint-1", "checkpoint-2"):
        (output_dir / checkpoint / "trainer_state.pt").write_bytes(b"garbage")
    assert run_expecting_error(["--resume", str(output_dir)]).startswith(f"error: --resume {output_dir}: no checkpoint")


def test_a_checkpoint_of_another_model_is_refused_before_anything_changes(two_checkpoints, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    output_dir = copy_of(two_checkpoints, tmp_path)
    other = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=60,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
        )
    )
    other.save_pretrained(output_dir / "checkpoint-2")
    state = torch.load(output_dir / "checkpoint-2/trainer_state.pt", weights_only=True)
    del state["files"]  # a checkpoint without the proofs of its files (with them, one edited is passed over)
    torch.save(state, output_dir / "checkpoint-2/trainer_state.pt")
    metrics = (output_dir / "metrics.jsonl").read_bytes()
    error = run_expecting_error(["--resume", str(output_dir), "--max-steps", "3"])
    assert (
        error == f"error: {output_dir / 'checkpoint-2'}: its optimizer state is for another model than "
        f"{output_dir / 'checkpoint-2/model.safetensors'}"
    )
    assert (output_dir / "metrics.jsonl").read_bytes() == metrics


def test_a_torn_last_line_of_the_metrics_is_left_out_on_resume(two_checkpoints, tmp_path):
    output_dir = copy_of(two_checkpoints, tmp_path)
    shutil.rmtree(output_dir / "checkpoint-2")
    with open(output_dir / "metrics.jsonl", "a") as metrics_file:
        metrics_file.write('{"step": 3, "split": "tra')
    train.main(["--resume", str(output_dir)])  # from checkpoint-1 to step 2
    assert [(r["split"], r["step"]) for r in read_metrics(output_dir)] == [
        ("eval", 0),
        ("train", 1),
        ("train", 2),
        ("eval", 2),
    ]


def test_a_full_disk_during_a_checkpoint_leaves_the_last_one_intact(tmp_path, monkeypatch, small_data):
    real_save, saves = torch.save, []

    def save_until_the_disk_is_full(obj, path, *args, **kwargs):
        saves.append(path)
        if len(saves) == 2:
            raise OSError(28, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_is_full)
    output_dir = tmp_path / "out"
    error = run_expecting_error(
        ["--output-dir", str(output_dir), "--max-steps", "3", "--save-every", "1", "--eval-every", "1000", *small_data]
    )
    assert (
        error == f"error: could not write checkpoint-2 ([Errno 28] No space left on device); the last checkpoint, "
        f"{output_dir / 'checkpoint-1'}, is intact"
    )
    assert sorted(p.name for p in output_dir.iterdir()) == [
        ".train.files",
        ".train.lock",
        "checkpoint-1",
        "metrics.jsonl",
    ]
    monkeypatch.undo()
    train.main(["--resume", str(output_dir)])
    assert [r["step"] for r in read_metrics(output_dir) if r["split"] == "train"] == [1, 2, 3]


def test_ctrl_c_mid_accumulation_drops_the_step_at_once_and_resumes_to_the_same_end(tmp_path, monkeypatch, small_data):
    arguments = [
        *small_data,
        "--max-steps",
        "3",
        "--grad-accum",
        "6",
        "--batch-size",
        "2",
        "--eval-every",
        "1000",
        "--save-every",
        "1000",
        "--epsilon",
        "0.2",
    ]
    train.main(["--output-dir", str(tmp_path / "whole"), *arguments])
    real_forward, training_calls = train.micro_batch_loss, []

    def forward_then_ctrl_c(*args):
        training_calls.append(torch.is_grad_enabled())
        if training_calls.count(True) == 6 + 3:  # step 2, micro-batch 3 of 6
            os.kill(os.getpid(), signal.SIGINT)
        return real_forward(*args)

    monkeypatch.setattr(train, "micro_batch_loss", forward_then_ctrl_c)
    interrupted = tmp_path / "interrupted"
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--output-dir", str(interrupted), *arguments])
    assert exit_info.value.code == 128 + signal.SIGINT and training_calls.count(True) == 6 + 3
    assert [p.name for p in interrupted.glob("checkpoint-*")] == ["checkpoint-1"]
    monkeypatch.undo()
    train.main(["--resume", str(interrupted), "--gold-reward", str(TINY_GOLD_REWARD)])  # runs code: given again
    assert read_metrics(interrupted) == read_metrics(tmp_path / "whole")
    whole, resumed = load_file(tmp_path / "whole/model.safetensors"), load_file(interrupted / "model.safetensors")
    assert all(torch.equal(whole[name], resumed[name]) for name in whole)


def tiny_model_folder(folder, vocab_size=60, tokenizer_changes=None, kind="llama", **config):
    """A small model of the kind's configuration (Llama unless asked) with the tiny_data tokenizer, saved to a
    folder: vocabulary, configuration and tokenizer as asked."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(
        kind,
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        **config,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    for name, value in (tokenizer_changes or {}).items():
        setattr(tokenizer, name, value)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize(
    "case",
    [
        "device bogus",
        "device cuda",
        "device mps",
        "output-dir is a file",
        "output-dir under a file",
        "gold-reward missing",
        "gold-reward syntax error",
        "gold-reward without score",
        "score raises",
        "score returns text",
        "score returns nan",
        "ref-model of another vocabulary",
        "ids beyond the vocabulary",
        "tokenizer without eos",
        "eval-split is train",
        "lora-target not in the model",
        "fsdp on one process",
        "fsdp with lora",
    ],
)
def test_bad_input_stops_the_run_with_one_line(tmp_path, case, small_data):
    a_file = tmp_path / "a-file"
    a_file.write_text("mine")
    gold = tmp_path / "gold.py"
    gold.write_text(
        {
            "gold-reward syntax error": "def score(:\n",
            "gold-reward without score": "x = 1\n",
            "score raises": "def score(prompt, completion):\n    raise KeyError('boom')\n",
            "score returns text": "def score(prompt, completion):\n    return 'good'\n",
            "score returns nan": "def score(prompt, completion):\n    return float('nan')\n",
        }.get(case, "")
    )
    arguments, expected = {
        "device bogus": (["--device", "bogus"], "--device bogus: not a device"),
        "device cuda": (["--device", "cuda"], "--device cuda: no such device on this machine"),
        "device mps": (["--device", "mps"], "--device mps: no such device on this machine"),
        "output-dir is a file": (["--output-dir", str(a_file)], f"--output-dir {a_file} is a file, not a folder"),
        "output-dir under a file": (
            ["--output-dir", str(a_file / "out")],
            f"--output-dir {a_file / 'out'}: cannot write there",
        ),
        "gold-reward missing": (
            ["--gold-reward", str(tmp_path / "none.py")],
            f"--gold-reward {tmp_path / 'none.py'}: no such file",
        ),
        "gold-reward syntax error": (["--gold-reward", str(gold)], f"--gold-reward {gold}, line 1: "),
        "gold-reward without score": (
            ["--gold-reward", str(gold)],
            f"--gold-reward {gold}: it defines no function score(",
        ),
        "score raises": (["--gold-reward", str(gold)], "--gold-reward: score() raised KeyError: 'boom'"),
        "score returns text": (["--gold-reward", str(gold)], "--gold-reward: score() returned 'good' for "),
        "score returns nan": (["--gold-reward", str(gold)], "--gold-reward: score() returned nan for "),
        "ref-model of another vocabulary": (
            lambda: ["--ref-model", tiny_model_folder(tmp_path / "m", vocab_size=70)],
            "its vocabulary has 70 words, the policy's 60",
        ),
        "ids beyond the vocabulary": (
            lambda: ["--model", tiny_model_folder(tmp_path / "m", vocab_size=30)],
            "but the model has only 30 words",
        ),
        "tokenizer without eos": (
            lambda: ["--model", tiny_model_folder(tmp_path / "m", tokenizer_changes={"eos_token": None})],
            "its tokenizer has no EOS token",
        ),
        "eval-split is train": (["--eval-split", "train"], "--eval-split train is the training split"),
        "lora-target not in the model": (
            ["--lora-r", "4", "--lora-target", "c_attn"],
            "--lora-target c_attn: the model has no layer of that name (its linear layers: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj)",
        ),
        "fsdp on one process": (["--fsdp"], "--fsdp shards the models across the processes torchrun starts"),
        "fsdp with lora": (["--fsdp", "--lora-r", "4"], "--fsdp with --lora-r: not supported"),
    }[case]
    arguments = arguments() if callable(arguments) else arguments  # a model folder, made for its case
    output_dir = tmp_path / "out" if "output-dir" not in case else None
    error = run_expecting_error(
        [*(["--output-dir", str(output_dir)] if output_dir else []), "--max-steps", "1", *small_data, *arguments]
    )
    assert error.startswith("error: ") and expected in error and "\n" not in error, error
    assert a_file.read_text() == "mine"
    assert output_dir is None or not output_dir.exists() or [p.name for p in output_dir.iterdir()] == [".train.lock"]


# ----------------------------------------------------------------------------------------------------
# The GPU path, as far as a CPU shows it: mixed precision, gradient checkpointing, collectives per step


def changed_weights(output_dir):
    """How many weights of the saved policy differ from the reference, and the saved dtypes."""
    trained, reference = load_file(output_dir / "model.safetensors"), load_file(TINY_MODEL / "model.safetensors")
    return sum(int((trained[name] != reference[name]).sum()) for name in reference), {t.dtype for t in trained.values()}


def test_bf16_is_mixed_precision_so_a_small_learning_rate_moves_the_weights_as_in_float32(tmp_path, small_data):
    arguments = ["--max-steps", "2", "--eval-every", "1000", "--lr", "5e-7", "--warmup-ratio", "0", *small_data]
    train.main(["--output-dir", str(tmp_path / "float32"), "--dtype", "float32", *arguments])
    train.main(["--output-dir", str(tmp_path / "bfloat16"), "--dtype", "bfloat16", *arguments])
    float32_changed, float32_dtypes = changed_weights(tmp_path / "float32")
    bfloat16_changed, bfloat16_dtypes = changed_weights(tmp_path / "bfloat16")
    assert float32_changed > 0.9 * 86_080  # nearly every weight gets a gradient
    assert bfloat16_changed >= 0.99 * float32_changed  # pure bf16 weights would keep ~1 % of them
    assert float32_dtypes == bfloat16_dtypes == {torch.float32}  # the saved model keeps float32 weights
    float32_rows, bfloat16_rows = (read_metrics(tmp_path / run) for run in ("float32", "bfloat16"))
    # At the start the bf16 reference computes the policy's logits bit for bit: a tie, every s 0.
    start = bfloat16_rows[0]
    assert (start["rewards/margins"], start["s/weaker"], start["s/stronger"], start["loss"]) == (
        0.0,
        0.0,
        0.0,
        float32_rows[0]["loss"],
    )
    for float32_row, bfloat16_row in zip(float32_rows[1:], bfloat16_rows[1:], strict=True):  # the training steps
        assert bfloat16_row["loss"] == pytest.approx(float32_row["loss"], abs=2**-8)  # within bf16's rounding


def test_gradient_checkpointing_recomputes_the_layers_and_gives_the_same_losses(tmp_path, monkeypatch, small_data):
    real_load_model, layer_calls = models.load_model, []

    def load_and_count(name, *args):
        model = real_load_model(name, *args)
        if not layer_calls:  # the policy is loaded first
            for layer in model.model.layers:  # (hooks do not fire in a recomputation)
                real_forward = layer.mlp.forward
                layer.mlp.forward = lambda *a, _real=real_forward: (
                    layer_calls.append(torch.is_grad_enabled()),
                    _real(*a),
                )[1]
        layer_calls.append("loaded")
        return model

    monkeypatch.setattr(models, "load_model", load_and_count)
    arguments = ["--max-steps", "2", "--eval-every", "1000", "--grad-accum", "2", *small_data]
    counts = {}
    for run, flags in (("plain", []), ("checkpointed", ["--gradient-checkpointing"])):
        layer_calls.clear()
        train.main(["--output-dir", str(tmp_path / run), *arguments, *flags])
        counts[run] = layer_calls.count(True)  # MLP calls with gradients: training
    assert counts == {"plain": 2 * 2 * 2, "checkpointed": 2 * 2 * 2 * 2}  # layers × micro-batches × steps, twice
    plain, checkpointed = (read_metrics(tmp_path / run) for run in ("plain", "checkpointed"))
    assert [r["loss"] for r in checkpointed] == [r["loss"] for r in plain]
    assert changed_weights(tmp_path / "checkpointed") == changed_weights(tmp_path / "plain")


def syncs_and_collectives_per_step(tmp_path, monkeypatch, arguments):
    """Each optimizer step's host synchronizations and collectives in a real train.py run on one gloo rank, followed as
    a GPU would run it (bench_counts.HostSyncs): the models' weights and every batch copied to the device are device
    tensors. [(syncs, collectives)] per step: syncs as (what, where); evaluation left out (it runs every --eval-every
    steps), and everything before the first training batch and after the last step (loading, saving)."""
    import torch.distributed as dist
    from torch.utils._python_dispatch import _disable_current_modes as disable_current_modes

    syncs, collectives, steps = bench_counts.HostSyncs(), [], []
    syncs.paused = True  # until the first training batch

    def wrap(module, name, before=None, pause=False):
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            if before:
                before(*args)
            if not pause:
                return real(*args, **kwargs)
            paused, syncs.paused = syncs.paused, True
            try:
                with disable_current_modes():  # not followed: it runs at full speed
                    return real(*args, **kwargs)
            finally:
                syncs.paused = paused

        monkeypatch.setattr(module, name, wrapper)

    def end_of_step(output_dir, row):
        if row["split"] == "train":
            steps.append((list(syncs.syncs), list(collectives)))
            syncs.syncs.clear(), collectives.clear()

    for name in (
        "all_gather",
        "all_reduce",
        "all_gather_object",
        "broadcast",
        "broadcast_object_list",
        "barrier",
        "reduce_scatter",
    ):
        wrap(dist, name, before=lambda *_, name=name: None if syncs.paused else collectives.append(name))
    copy = lambda tensors, device: syncs.mark([tensor.clone() for tensor in tensors])  # to the device, not waiting
    monkeypatch.setattr(batches, "to_device", copy)
    monkeypatch.setattr(train, "to_device", copy)
    real_setup = train.setup_models

    def setup_on_the_device(*args):
        built = real_setup(*args)
        for model in (built.policy, built.reference):
            syncs.mark([*model.parameters(), *model.buffers()])
        return built

    monkeypatch.setattr(train, "setup_models", setup_on_the_device)
    wrap(train, "collate", before=lambda *_: setattr(syncs, "paused", False))  # the training loop's batches
    wrap(train, "evaluate", pause=True)
    wrap(train, "criterion_measures", pause=True)
    wrap(train, "append_metrics", before=end_of_step)
    wrap(train, "gathered_state_dict", before=lambda *_: setattr(syncs, "paused", True))  # saving, after the last step
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        with syncs:
            train.main(
                ["--output-dir", str(tmp_path / "out"), "--eval-every", "1000", *arguments]
            )  # main ends the group
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert not syncs.syncs and not collectives  # nothing after the last step's metrics
    return steps


def test_an_optimizer_step_at_scale_makes_one_collective_and_one_host_sync(tmp_path, monkeypatch, small_data):
    """At scale (loss.PLAIN_LOSS_BYTES = 0: the loss from hidden states), each optimizer step of 3 micro-batches
    makes one collective, the all_gather of the step's sums, and one host synchronization of this project's, reading
    them back: not one per micro-batch. The models' forward passes no longer wait in transformers' causal-mask builder:
    right-padded rows are given no attention mask (batches.model_inputs)."""
    monkeypatch.setattr(loss, "PLAIN_LOSS_BYTES", 0)
    grad_accum = 3
    steps = syncs_and_collectives_per_step(
        tmp_path, monkeypatch, ["--max-steps", "2", "--grad-accum", str(grad_accum), *small_data]
    )
    assert len(steps) == 2
    for syncs, collectives in steps:
        assert collectives == ["all_gather"]
        ours = [sync for sync in syncs if not sync[1].startswith("masking_utils.py")]
        assert [where.split(":")[0] for _, where in ours] == ["evaluation.py"], ours  # across_ranks: .cpu()
        assert [what for what, _ in syncs if (what, _) not in ours] == []  # no mask: transformers reads none


def test_the_kl_along_samples_is_unbiased_never_negative_and_steadier_than_the_log_ratio():
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


def test_compare_with_betas_draws_the_frontier_of_three_methods_with_lora_too(
    tmp_path, capsys, small_data, monkeypatch
):
    """Its runs train LoRA adapters, as every run of a comparison takes the --lora-* arguments (the full
    fine-tuning of a comparison is tested above). One seed: the means over seeds are tested below; the 6 runs
    one after another, each in this process (the runs in processes of their own: the test above)."""
    monkeypatch.setattr(compare, "start_run", RunInThisProcess)
    compare.main(
        [
            "--betas",
            "0.1",
            "0.3",
            "--seeds",
            "1",
            "--seed",
            "1",
            "--workers",
            "1",
            "--output-dir",
            str(tmp_path),
            "--max-steps",
            "2",
            "--epsilon",
            "0.3",
            "--lora-r",
            "4",
            *small_data,
        ]
    )
    points = json.loads((tmp_path / "frontier.json").read_text())
    assert [(p["method"], p["beta"], p["seed"]) for p in points] == [
        (method, beta, 1) for beta in (0.1, 0.3) for method in ("DPO", "ε-DPO", "ε-DPO, fixed baseline β")
    ]
    for p in points:
        assert {
            "method",
            "beta",
            "epsilon",
            "seed",
            "gold_reward",
            "kl",
            "rewards/accuracies",
            "final_beta",
        } <= p.keys()
        assert math.isfinite(p["gold_reward"]) and p["kl"] >= 0
        assert (p["final_beta"] == p["beta"]) == (p["method"] != "ε-DPO")  # only ε-DPO moves its baseline β
        assert p["epsilon"] == (0.0 if p["method"] == "DPO" else 0.3)
        rows = read_metrics(pathlib.Path(p["output_dir"]))
        assert [r["step"] for r in rows if r["split"] == "eval"] == [0, 2]  # evaluated at the start and the end
        assert (pathlib.Path(p["output_dir"]) / "adapter_model.safetensors").exists()
    same_start = [p for p in points if p["beta"] == 0.1]
    assert len({read_metrics(pathlib.Path(p["output_dir"]))[0]["loss"] for p in same_start}) == 1
    assert (tmp_path / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "ε-DPO, fixed baseline β" in printed and "gold reward" in printed


def test_the_frontier_is_the_mean_over_seeds_per_method_and_beta_with_the_lowest_and_highest(tmp_path, capsys):
    """frontier.json's points from the runs' summaries (mean s over every pair seen), and the frontier's table and
    figure from them: per method and β the mean over seeds, with the lowest and highest seed."""
    from training import reports

    def summary(method, beta, seed):
        gold, kl = {"DPO": 1.0, "ε-DPO": 2.0, "ε-DPO, fixed baseline β": 3.0}[method] + seed, 10 * beta + 2 * seed
        groups = {
            "clean": {"pairs": 30, "weaker": 0.5, "stronger": 0.2},
            "noisy": {"pairs": 10, "weaker": 0.1, "stronger": 0.5},
        }
        return {
            "label": method,
            "args": {
                "beta": beta,
                "epsilon": 0.01,
                "fixed_baseline_beta": False,
                "seed": seed,
                "output_dir": f"{method}-{beta}-{seed}",
            },
            "final": {"gold_reward": gold, "kl": kl, "rewards/accuracies": 0.5 + seed / 10},
            "final_beta": beta * (1 + seed),
            "s_by_noise": groups,
        }

    points = reports.frontier_points(
        [
            summary(method, beta, seed)
            for beta in (0.1, 0.2)
            for seed in (0, 1)
            for method in ("DPO", "ε-DPO", "ε-DPO, fixed baseline β")
        ]
    )
    assert len(points) == 12 and points[0]["mean_s"] == pytest.approx((30 * 0.3 + 10 * -0.4) / 40)
    reports.print_frontier(points)
    lines = capsys.readouterr().out.splitlines()
    dpo = next(line for line in lines if line.startswith("DPO") and " 0.2 " in line)
    assert dpo.split() == [
        "DPO",
        "0.2",
        "+1.50",
        "(+1.00–+2.00)",
        "3.00",
        "(2.00–4.00)",
        "0.550",
        "(0.500–0.600)",
        "0.3000",
        "+0.125",
    ]
    reports.plot_frontier(points, tmp_path / "frontier.png")
    assert (tmp_path / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------------------------
# bench.py


def test_the_quick_benchmark_runs_and_reports_every_figure(tmp_path):
    report_path = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "bench.py", "--quick", "--device", "cpu", "--json", str(report_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(report_path.read_text())
    assert [run["shape"] for run in report["runs"]] == ["tiny_data", "realistic-small"]
    for run in report["runs"]:
        assert set(run["variants"]) == {"dpo", "epsilon-dpo", "hidden", "backbone", "naive", "dpo-precomputed"}
        for figures in run["variants"].values():
            assert figures["median_s"] > 0 and math.isfinite(figures["peak_mib"]) and len(figures["times_s"]) >= 3
        assert len(run["extra_times_s"]) == 3  # --quick: three rounds
        assert run["inherent"]["median_s"] > 0 and all(math.isfinite(value) for value in run["ratios"].values())
    # The reference's logits, (2B, T, V) float32 at realistic-small's 1 pair × 128 tokens and V = 8,000, and what ε-DPO
    # adds to a DPO step's peak: under half of them (the README: no more memory than DPO)
    inherent, ratios = report["runs"][1]["inherent"], report["runs"][1]["ratios"]
    assert inherent["ref_logits_mib"] == 2 * 1 * 128 * 8000 * 4 / 2**20 and inherent["vocab"] == 8000
    assert ratios["extra_memory_over_ref_logits"] < 0.5, ratios
    realistic = report["runs"][1]["variants"]
    # Keeping the perturbed full-vocabulary tensors in the graph costs memory that epsdpo.py does not spend.
    assert realistic["naive"]["peak_mib"] > 1.5 * realistic["epsilon-dpo"]["peak_mib"]
    # And the loss from hidden states adds less to the step's peak than the loss from logits.
    assert realistic["hidden"]["peak_mib"] < realistic["epsilon-dpo"]["peak_mib"]
    assert "extra_time_over_inherent_work" in result.stdout
    # Both losses at scale (4 pairs × 1,024 tokens, V = 128,256): operations and extra peak, counted on FakeTensors.
    (costs,) = report["loss_costs"].values()
    assert costs["hidden"]["operations"] <= 1000 and costs["hidden"]["extra_peak"] <= 0.1 * costs["hidden"]["logits"]
    assert costs["logits"]["operations"] > 0 and costs["logits"]["extra_peak"] > costs["hidden"]["extra_peak"]


# ----------------------------------------------------------------------------------------------------
# Trust: data and library (issue 15)


def test_a_mistyped_eval_split_stops_the_run_naming_the_splits_there_are(tmp_path, small_data):
    error = run_expecting_error(["--output-dir", str(tmp_path / "out"), *small_data, "--eval-split", "tset"])
    assert (
        error == f"error: --dataset {small_data[1]} has no split 'tset' for --eval-split (it has ['test', 'train']); "
        f"leave --eval-split out to hold out --eval-fraction of train"
    )


def test_evaluation_samples_from_the_policy_alone_whatever_the_models_generation_config(tmp_path, monkeypatch):
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
# Trust: output folder, resume, signals, devices (issue 15)


def test_a_folder_the_run_reads_is_never_its_output_folder(tmp_path, local_model, small_data):
    """Not the model's folder (even with --overwrite), not one inside the dataset's folder, not one holding the
    data; the model is left as it was."""
    dataset = pathlib.Path(small_data[1])
    model_files = {path.name: path.read_bytes() for path in local_model.iterdir()}
    cases = [
        (["--model", str(local_model), "--output-dir", str(local_model), "--overwrite"], f"is --model {local_model}"),
        (
            ["--output-dir", str(local_model), "--overwrite"],
            f"is --ref-model {local_model}",
            ["--ref-model", str(local_model)],
        ),
        (["--output-dir", str(dataset / "out")], f"is inside --dataset {dataset}"),
        (["--output-dir", str(dataset.parent), "--overwrite"], f"holds --dataset {dataset}"),
    ]
    for arguments, expected, *more in cases:
        error = run_expecting_error([*small_data, *arguments, *(more[0] if more else []), "--max-steps", "1"])
        assert error.startswith("error: --output-dir ") and expected in error and "\n" not in error, error
    assert {path.name: path.read_bytes() for path in local_model.iterdir()} == model_files
    assert not (dataset / "out").exists()


def test_a_file_or_checkpoint_name_the_project_did_not_write_is_never_replaced(tmp_path, small_data):
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "config.json").write_text("mine")  # the final save would write config.json
    error = run_expecting_error(["--output-dir", str(output_dir), "--overwrite", "--max-steps", "1", *small_data])
    assert error.startswith(f"error: --output-dir {output_dir} holds config.json, which this project did not write")
    assert sorted(p.name for p in output_dir.iterdir()) == [".train.lock", "config.json"]
    (output_dir / "config.json").unlink()
    theirs = tmp_path / "theirs"  # a link named like a checkpoint of ours
    theirs.mkdir()
    (theirs / "trainer_state.pt").write_text("mine")
    (output_dir / "checkpoint-1").symlink_to(theirs, target_is_directory=True)
    error = run_expecting_error(["--output-dir", str(output_dir), "--overwrite", "--max-steps", "1", *small_data])
    assert error.startswith(f"error: --output-dir {output_dir} holds checkpoint-1, which this project did not write")
    assert (output_dir / "checkpoint-1").is_symlink() and (theirs / "trainer_state.pt").read_text() == "mine"


@pytest.mark.parametrize(
    "mode, flags, theirs",
    [
        ("lora", ["--lora-r", "4"], ["README.md", "adapter_config.json", "adapter_model.safetensors"]),
        ("full", [], ["metrics.jsonl", "curves.png", "summary.json", "model.safetensors"]),
        ("compare", [], ["compare.png"]),
        ("frontier", ["--betas", "0.1", "--seeds", "1"], ["frontier.json", "frontier.png"]),
    ],
)
def test_overwrite_never_replaces_a_file_of_any_name_a_mode_writes_that_the_project_did_not_write(
    tmp_path, small_data, mode, flags, theirs
):
    """--overwrite replaces the project's own files alone: a LoRA run's adapter and model card, a full run's
    metrics and figures, --compare's and --betas' figures, if they are the user's, stop the run untouched."""
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    for name in theirs:
        (output_dir / name).write_text(f"my {name}")
    for name in theirs:
        error = run_expecting_error(
            ["--output-dir", str(output_dir), "--overwrite", "--max-steps", "1", *flags, *small_data],
            compare.main if mode in ("compare", "frontier") else train.main,
        )
        assert "which this project did not write" in error and "\n" not in error, error
        assert error.split(" holds ")[1].split(",")[0] in theirs
        (output_dir / error.split(" holds ")[1].split(",")[0]).rename(tmp_path / "moved")
        (tmp_path / "moved").unlink()
    if mode == "lora":  # the run's own files, README.md among them, are replaced by the next run
        train.main(
            [
                "--output-dir",
                str(output_dir),
                "--overwrite",
                "--max-steps",
                "1",
                "--eval-every",
                "1000",
                *flags,
                *small_data,
            ]
        )
        (output_dir / "notes.txt").write_text("mine")
        train.main(
            [
                "--output-dir",
                str(output_dir),
                "--overwrite",
                "--max-steps",
                "1",
                "--eval-every",
                "1000",
                *flags,
                *small_data,
            ]
        )
        assert (output_dir / "README.md").exists() and (output_dir / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in output_dir.iterdir() if p.name in theirs and p.read_bytes().startswith(b"my ")) == []


def test_paths_are_expanded_and_absolute_and_flags_of_compare_py_are_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "data").mkdir()
    args, _ = parse_args(
        [
            "--output-dir",
            "~/runs/a",
            "--dataset",
            "data",
            "--model",
            "org/some-model",
            "--resume",
            "~/runs/a",
            "--gold-reward",
            "gold.py",
            "--ref-model",
            "~/nothing",
        ]
    )
    assert (args.output_dir, args.resume) == (str(tmp_path / "home/runs/a"),) * 2  # never a folder named ~
    assert (args.dataset, args.gold_reward) == (str(tmp_path / "data"), str(tmp_path / "gold.py"))
    assert (args.model, args.ref_model) == ("org/some-model", str(tmp_path / "home/nothing"))  # a Hub id as it is
    for flags in (["--betas", "0.1"], ["--seeds", "2"], ["--workers", "1"]):
        with pytest.raises(SystemExit):
            parse_args(flags)
        assert f"unrecognized arguments: {' '.join(flags)}" in capsys.readouterr().err


def test_a_resumed_run_reads_what_the_run_read_from_anywhere_and_its_schedule_follows_max_steps(tmp_path, monkeypatch):
    first, elsewhere = tmp_path / "first", tmp_path / "elsewhere"
    for folder, pairs in ((first, 40), (elsewhere, 60)):  # the same relative name, other data
        (folder / "data").mkdir(parents=True)
        write_jsonl(folder / "data/train.jsonl", good_rows(pairs))
    arguments = ["--dataset", "data", "--eval-fraction", "0.2", "--save-every", "1", "--eval-every", "1000", *QUICK]
    monkeypatch.chdir(first)
    train.main(["--output-dir", "out", "--max-steps", "2", *arguments])
    state = torch.load(first / "out/checkpoint-2/trainer_state.pt", weights_only=True)
    assert state["args"]["dataset"] == str(first / "data") and state["args"]["output_dir"] == str(first / "out")

    monkeypatch.chdir(elsewhere)
    train.main(["--resume", "../first/out", "--max-steps", "4"])
    summary = json.loads((first / "out/summary.json").read_text())
    assert (summary["train_pairs"], summary["steps"]) == (32, 4)  # the first folder's 40 pairs, 8 held out
    lrs = {r["step"]: r["lr"] for r in read_metrics(first / "out") if r["split"] == "train"}
    # Warmup int(0.1 × 4) = 0 steps: step 3 of 4 takes lr × (4 − 3 + 1) / 4, not the 0 its first plan ended at.
    assert lrs[3] == 5e-4 * 2 / 4 and lrs[4] == 5e-4 * 1 / 4

    state_path = first / "out/checkpoint-4/trainer_state.pt"
    state = torch.load(state_path, weights_only=True)
    state["args"]["eval_every"] = 0  # edited by hand
    torch.save(state, state_path)
    error = run_expecting_error(["--resume", str(first / "out"), "--max-steps", "5"])
    assert (
        error == f"error: {first / 'out/checkpoint-4'}: its saved arguments are not valid (argument --eval-every: "
        f"0 is out of range: must be >= 1)"
    )
    state["args"]["eval_every"] = 1000
    torch.save(state, state_path)
    (first / "data").rename(first / "data-moved")
    error = run_expecting_error(["--resume", str(first / "out"), "--max-steps", "5"])
    assert (
        error == f"error: --resume {first / 'out'}: the run read --dataset {first / 'data'}, which is no longer there"
    )


def test_a_run_killed_while_saving_is_completed_by_resume_and_its_temporaries_removed(
    two_checkpoints, tmp_path, capsys
):
    output_dir = copy_of(two_checkpoints, tmp_path)
    saved_model = (output_dir / "model.safetensors").read_bytes()
    # What a kill -9 during the final save leaves (temporaries named as mkdtemp and mkstemp name them):
    # summary.json and config.json moved in, model.safetensors not yet; and a killed checkpoint and metrics write.
    (output_dir / ".saving-k1ll3d00").mkdir()
    (output_dir / "model.safetensors").rename(output_dir / ".saving-k1ll3d00/model.safetensors")
    (output_dir / ".checkpoint-3-k1ll3d00").mkdir()
    (output_dir / ".metrics.jsonl.k1ll3d00").write_text("{")
    (output_dir / ".saving").mkdir()  # not ours by name: kept
    train.main(["--resume", str(output_dir)])
    assert "its final save did not complete: saving it" in capsys.readouterr().out
    assert (output_dir / "model.safetensors").read_bytes() == saved_model
    assert sorted(p.name for p in output_dir.glob(".*")) == [".saving", ".train.files", ".train.lock"]
    assert [r["step"] for r in read_metrics(output_dir) if r["split"] == "train"] == [1, 2]
    assert run_expecting_error(["--resume", str(output_dir)]).endswith(
        "checkpoint-2 is at or past --max-steps 2; give a larger --max-steps to train on"
    )


def test_a_full_disk_in_torch_save_or_safetensors_gives_one_line_and_leaves_nothing(tmp_path):
    """Real write failures of torch.save and safetensors (a file-size limit: EFBIG, as a full disk's ENOSPC)."""
    import resource

    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL)  # 344 KB of safetensors
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    limits, previous_handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (500_000, limits[1]))
        with pytest.raises(
            data_module().ReportedError, match=r"^could not write checkpoint-1 \(RuntimeError: \[enforce fail"
        ):
            checkpoints.write_checkpoint(
                tmp_path,
                1,
                model,
                torch.optim.AdamW(model.parameters()),
                {"step": 1, "big": torch.zeros(250_000)},
                keep=2,
            )
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, limits[1]))
        with pytest.raises(
            data_module().ReportedError,
            match=r"^could not save the model to .*\(SafetensorError: .*"
            r"the checkpoints are intact$",
        ):
            checkpoints.save_pretrained_atomically(tmp_path, model, tokenizer)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous_handler)
    assert list(tmp_path.iterdir()) == []  # no temporary left


def data_module():
    from training import data

    return data


def test_a_first_signal_before_training_stops_cleanly_and_a_burst_of_signals_is_one(tmp_path, monkeypatch, capsys):
    real_load_tokenizer = train.load_tokenizer

    def ctrl_c_while_loading(*args):
        os.kill(os.getpid(), signal.SIGINT)
        return real_load_tokenizer(*args)

    monkeypatch.setattr(train, "load_tokenizer", ctrl_c_while_loading)
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--output-dir", str(tmp_path / "out"), "--max-steps", "1", *QUICK])
    assert exit_info.value.code == 128 + signal.SIGINT
    assert "stopped by signal 2 before training started; nothing was written" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "out").iterdir()] == [".train.lock"]

    # torchrun delivers one Ctrl-C two or three times within milliseconds: one stop; a later signal stops at once.
    stop = signals.StopOnSignal()
    monkeypatch.setattr(signals.StopOnSignal, "WINDOW", 0.5)
    with stop, stop.training():
        for number in (signal.SIGINT, signal.SIGINT, signal.SIGTERM):
            os.kill(os.getpid(), number)
        assert stop.signal == signal.SIGINT
        time.sleep(0.6)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.1)


def test_ctrl_c_stops_a_sequential_comparison_with_a_checkpoint_and_says_so(tmp_path, monkeypatch, capsys, small_data):
    real_forward = train.micro_batch_loss

    def forward_then_ctrl_c(*args):
        if torch.is_grad_enabled():  # the first training micro-batch
            os.kill(os.getpid(), signal.SIGINT)
        return real_forward(*args)

    monkeypatch.setattr(train, "micro_batch_loss", forward_then_ctrl_c)
    monkeypatch.setattr(compare, "start_run", RunInThisProcess)  # the Ctrl-C reaches the run and the comparison
    with pytest.raises(SystemExit) as exit_info:
        compare.main(["--output-dir", str(tmp_path), "--max-steps", "3", "--eval-every", "1000", *small_data])
    assert exit_info.value.code == 128 + signal.SIGINT
    assert [p.name for p in (tmp_path / "dpo").glob("checkpoint-*")] == ["checkpoint-1"]
    assert not (tmp_path / "epsilon-dpo").exists()
    assert "stopped by signal 2: 0 of 2 runs finished, 1 stopped with a checkpoint, 1 did not start" in (
        capsys.readouterr().out
    )


def test_ctrl_c_stops_every_run_of_a_frontier_within_seconds_each_with_its_checkpoint(tmp_path, capsys, small_data):
    """3 runs on one worker process: the run under way checkpoints and stops; the one the worker has taken but not
    begun returns at once, and the one still queued is cancelled. A Ctrl-C in a terminal sends SIGINT to every
    process of the group: here, to the worker and to this process."""
    import multiprocessing
    import threading

    others, signalled = set(multiprocessing.active_children()), []

    def ctrl_c_once_two_runs_train():
        deadline = time.time() + 120
        while (
            sum(any(r["split"] == "train" for r in read_metrics_if_any(f)) for f in tmp_path.glob("beta-0.1/seed-0/*"))
            < 1
            and time.time() < deadline
        ):
            time.sleep(0.05)
        for worker in set(multiprocessing.active_children()) - others:
            os.kill(worker.pid, signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        signalled.append(time.time())

    threading.Thread(target=ctrl_c_once_two_runs_train, daemon=True).start()
    with pytest.raises(SystemExit) as exit_info:
        compare.main(
            [
                "--betas",
                "0.1",
                "--seeds",
                "1",
                "--workers",
                "1",
                "--output-dir",
                str(tmp_path),
                "--max-steps",
                "500",
                "--eval-every",
                "1000",
                *small_data,
            ]
        )
    assert exit_info.value.code == 128 + signal.SIGINT and time.time() - signalled[0] < 30
    checkpointed = sorted(p.parent.name for p in tmp_path.glob("beta-0.1/seed-0/*/checkpoint-*"))
    stdout = capsys.readouterr().out
    assert (
        checkpointed == ["dpo"] and "stopped by signal 2: 0 of 3 runs finished, 1 stopped with a checkpoint" in stdout
    )
    assert "2 did not start" in stdout


def test_under_torchrun_rank_zero_alone_reports_a_refusal_and_the_others_exit_quietly(tmp_path, monkeypatch, capsys):
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "notes.txt").write_text("mine")
    args, _ = parse_args(["--output-dir", str(output_dir)])
    verdicts = []
    monkeypatch.setattr(
        output_folder.dist, "broadcast", lambda tensor, src: verdicts.append(tensor.item()) or tensor.fill_(1)
    )
    with pytest.raises(SystemExit) as exit_info:  # rank 1 learns that rank 0 refused
        with output_folder.claim_on_rank_zero(output_dir, args, 1, 2, torch.device("cpu")):
            pass
    assert exit_info.value.code == 1 and verdicts == [0]
    with pytest.raises(data_module().ReportedError, match="is not empty"):
        with output_folder.claim_on_rank_zero(output_dir, args, 0, 2, torch.device("cpu")):
            pass
    assert verdicts == [0, 1]
    monkeypatch.setenv("RANK", "1")  # and a rank other than 0 prints nothing
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--output-dir", str(output_dir), "--max-steps", "1"])
    assert exit_info.value.code == 1 and capsys.readouterr().err == ""


def test_under_torchrun_each_process_takes_the_gpu_of_its_local_rank_or_refuses(monkeypatch):
    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(("set_device", index)))
    monkeypatch.setattr(models.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(models.dist, "init_process_group", lambda backend, **kwargs: calls.append(("backend", backend)))
    monkeypatch.setattr(models.dist, "get_rank", lambda: 1)
    for name in ("auto", "cuda"):
        calls.clear()
        assert models.init_distributed(name) == (1, 2, torch.device("cuda", 1))
        assert calls == [("set_device", 1), ("backend", "nccl")]
    calls.clear()
    assert models.init_distributed("cpu") == (1, 2, torch.device("cpu")) and calls == [("backend", "gloo")]
    for name in ("cuda:0", "mps"):
        with pytest.raises(
            data_module().ReportedError, match=f"--device {name}: under torchrun each process uses the GPU"
        ):
            models.init_distributed(name)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(data_module().ReportedError, match="--device cuda: process 1 of this machine has no GPU"):
        models.init_distributed("cuda")


def test_auto_precision_is_bf16_only_on_the_given_gpu_with_bf16_arithmetic(monkeypatch):
    capability = {0: (8, 0), 1: (7, 0)}  # an A100 and a V100; the current GPU is 0
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability[torch.device(device).index])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # it counts emulation
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Tesla V100")
    assert models.precision("auto", torch.device("cuda", 1)) is None
    assert models.precision("auto", torch.device("cuda", 0)).fast_dtype == torch.bfloat16
    with pytest.raises(
        data_module().ReportedError, match=r"--dtype bfloat16: Tesla V100 \(compute capability 7.0\) has no bf16"
    ):
        models.precision("bfloat16", torch.device("cuda", 1))


def test_float32_on_a_gpu_with_tf32_units_multiplies_in_tf32_and_the_start_line_says_so(monkeypatch, capsys):
    """TF32: float32's range with a 10-bit mantissa in matrix products, summed in float32; on the GPUs with bf16
    units (compute capability 8.0 on). Not under bf16 autocast, nor on older GPUs."""
    capability = {0: (8, 0), 1: (7, 0)}  # an A100 and a V100
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability[torch.device(device).index])
    a100, v100 = torch.device("cuda", 0), torch.device("cuda", 1)
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = False
        assert models.precision("float32", v100) is None and models.precision("auto", a100).fast_dtype == torch.bfloat16
        assert torch.get_float32_matmul_precision() == "highest" and models.precision_note(a100) == ""
        assert models.precision("float32", a100) is None
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
        args, _ = parse_args(["--dtype", "float32"])
        from training import reports

        reports.print_start(args, "ε-DPO", None, 1, 3, 10, 2, 1, a100, [], torch.nn.Linear(1, 1), "")
        assert "on 1 × cuda:0, float32 products in TF32, β = 0.1" in capsys.readouterr().out
        assert models.precision_note(torch.device("cpu")) == ""
    finally:
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]


def test_sampling_under_fsdp_keeps_the_units_gathered_only_where_they_fit_in_half_the_free_gpu_memory(monkeypatch):
    from training import sharding

    model = torch.nn.Linear(1000, 1000, bias=False)  # a million weights
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (3_000_000, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 1_500_000)  # 1,000,000 of it unused:
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 500_000)  # free for torch's tensors
    model.gathered_dtype = torch.bfloat16  # 2 MB gathered, half of the 4 MB free
    assert sharding.gathered_fits(model, torch.device("cuda", 0))
    model.gathered_dtype = torch.float32  # 4 MB
    assert not sharding.gathered_fits(model, torch.device("cuda", 0))
    assert sharding.gathered_fits(model, torch.device("cpu"))


def test_batches_go_to_a_gpu_from_pinned_memory_without_waiting(monkeypatch):
    copies = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: copies.append("pinned") or self)
    real_to = torch.Tensor.to
    monkeypatch.setattr(
        torch.Tensor,
        "to",
        lambda self, device, **kwargs: (
            copies.append((str(device), kwargs))
            or (self if torch.device(device).type == "cuda" else real_to(self, device, **kwargs))
        ),
    )
    pairs = [{"prompt_ids": [1, 5], "chosen_ids": [6, 2], "rejected_ids": [7, 8, 2]}]
    batches.collate(pairs, 0, torch.device("cuda", 0))
    assert copies == ["pinned", ("cuda:0", {"non_blocking": True})] * 4  # input ids, two masks, noise flags
    copies.clear()
    batches.collate(pairs, 0, torch.device("cpu"))
    assert copies == [("cpu", {})] * 4


def test_the_reference_is_converted_before_it_moves_and_ddp_broadcasts_no_buffers(monkeypatch):
    seen, wrapped = [], []
    real_convert = models.frozen_weights_in_bf16
    monkeypatch.setattr(
        models,
        "frozen_weights_in_bf16",
        lambda model: seen.append({p.device.type for p in model.parameters()}) or real_convert(model),
    )
    monkeypatch.setattr(
        torch.nn.parallel, "DistributedDataParallel", lambda model, **kwargs: wrapped.append(kwargs) or model
    )
    monkeypatch.setattr(models, "shared_linear_head", lambda *args: (None, "a meta device computes nothing to check"))
    args, _ = parse_args([])
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    pair = {"prompt_ids": [1, 5], "chosen_ids": [6, 2], "rejected_ids": [7, 2]}
    setup = models.setup_models(args, torch.device("meta"), 2, True, tokenizer, [pair])
    assert seen == [{"cpu"}]  # converted on the CPU, then moved
    assert {p.device.type for p in setup.reference.parameters()} == {"meta"}
    assert setup.reference.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert wrapped == [{"device_ids": None, "broadcast_buffers": False}]


def test_the_bf16_reference_holds_every_product_weight_in_bf16_and_starts_bit_for_bit():
    """Tiny random Llama (tied and untied), Qwen2, Gemma-2 and Mixtral (both expert implementations): under
    autocast the bf16 reference gives the float32 policy's logits exactly, so every s is 0 and the loss log 2."""
    from transformers import Gemma2Config, LlamaConfig, MixtralConfig, Qwen2Config

    shape = dict(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    mixtral = dict(**shape, num_local_experts=4, num_experts_per_tok=2)
    configs = [
        ("llama tied", LlamaConfig(**shape, tie_word_embeddings=True), {}),
        ("llama", LlamaConfig(**shape, tie_word_embeddings=False), {}),
        ("qwen2", Qwen2Config(**shape, tie_word_embeddings=True), {}),
        ("gemma2", Gemma2Config(**shape, head_dim=8, tie_word_embeddings=True), {}),
        ("mixtral", MixtralConfig(**mixtral), {}),
        ("mixtral eager", MixtralConfig(**mixtral), {"experts_implementation": "eager"}),
    ]
    input_ids = torch.randint(3, 64, (4, 10), generator=torch.Generator().manual_seed(0))
    completion_mask = torch.zeros_like(input_ids)
    completion_mask[:, 5:] = 1
    for name, config, options in configs:
        torch.manual_seed(0)
        policy = AutoModelForCausalLM.from_config(config, **options).eval()
        reference = AutoModelForCausalLM.from_config(config, **options).eval()
        reference.load_state_dict(policy.state_dict())
        models.frozen_weights_in_bf16(reference.requires_grad_(False))
        in_bf16 = {n for n, p in reference.named_parameters() if p.dtype == torch.bfloat16}
        products = {n for n, _ in reference.named_parameters() if "embed" not in n and "norm" not in n}
        experts = {n for n in products if "experts" in n}  # grouped_mm, not cast: float32
        router = {n for n in products if "mlp.gate." in n}  # a Parameter of its own: float32
        assert in_bf16 == products - router - (experts if name == "mixtral" else set()), name
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            logits, ref_logits = policy(input_ids).logits, reference(input_ids).logits
        assert torch.equal(logits, ref_logits), name
        out = epsdpo.epsilon_dpo_loss(logits, ref_logits, input_ids, completion_mask, 0.1, 0.5)
        assert (out.s == 0).all() and torch.equal(out.losses, -torch.nn.functional.logsigmoid(torch.zeros(2))), name


# ----------------------------------------------------------------------------------------------------
# LoRA: adapters on the policy, the reference the same model with them off


def lora_models(*flags, monkeypatch=None):
    """(models, batch, autocast) as train.py sets them up with LoRA adapters of rank 4 on the tiny model,
    and a batch of 8 of its held-out pairs. With monkeypatch, models.load_model's calls are counted."""
    args, _ = parse_args(["--lora-r", "4", *flags])
    tokenizer = data.load_tokenizer(adapters.tokenizer_name(args.model))
    lines = (TINY_DATASET / "test.jsonl").read_text().splitlines()[:8]
    pairs, _, _ = data.tokenize_rows(
        [(f"line {i}", json.loads(line)) for i, line in enumerate(lines)], tokenizer, 512, 256
    )
    autocast = models.precision(args.dtype, torch.device("cpu"))
    built = models.setup_models(args, torch.device("cpu"), 1, autocast is not None, tokenizer, pairs)
    return (
        built,
        batches.collate(pairs, tokenizer.pad_token_id, torch.device("cpu")),
        autocast or torch.autocast("cpu", enabled=False),
    )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lora_reference_is_the_policy_with_its_adapters_off_so_the_first_loss_is_log_2(dtype, monkeypatch):
    loaded = []
    real_load_model = models.load_model
    monkeypatch.setattr(models, "load_model", lambda *a: (loaded.append(a[0]), real_load_model(*a))[1])
    built, batch, autocast = lora_models("--dtype", dtype)
    assert (
        len(loaded) == 1 and isinstance(built.reference, models.AdaptersOff) and built.reference.policy is built.policy
    )
    trained = {name: weight for name, weight in built.policy.named_parameters() if weight.requires_grad}
    assert trained and all(".lora_A." in name or ".lora_B." in name for name in trained)  # only the adapters
    assert {weight.dtype for weight in trained.values()} == {torch.float32}  # the master weights
    frozen_linear = {
        module.weight.dtype
        for name, module in built.policy.named_modules()
        if isinstance(module, torch.nn.Linear) and name.endswith("base_layer")
    }
    assert frozen_linear == {torch.bfloat16 if dtype == "bfloat16" else torch.float32}  # the base, stored once
    assert built.policy.get_input_embeddings().weight.dtype == torch.float32
    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    with autocast:
        assert torch.equal(built.policy(**inputs).logits, built.reference(**inputs).logits)  # B = 0: bit for bit
        out = loss.micro_batch_loss(
            built.trained, built.reference, batch, 0.1, 0.5, built.head
        )  # as train.py: from hidden states
    assert built.head is not None
    assert torch.equal(out.s, torch.zeros(8, dtype=torch.long))
    log_2 = torch.tensor(math.log(2))  # in float32, as the loss
    assert torch.equal(out.losses, log_2.expand(8)) and torch.equal(out.loss, log_2)
    assert all(weight.requires_grad for weight in trained.values())  # the reference gave the adapters back


def test_lora_gradient_checkpointing_recomputes_the_layers_and_gives_the_same_gradients():
    """The embeddings are frozen, so the checkpointed layers' inputs do not require grad: the reentrant
    kind of checkpointing would give the adapters no gradient at all."""
    gradients, layer_calls = {}, []
    for run, flags in (("plain", []), ("checkpointed", ["--gradient-checkpointing"])):
        torch.manual_seed(0)  # the same adapters' A
        built, batch, _ = lora_models(*flags)
        for name, weight in built.policy.named_parameters():
            if ".lora_B." in name:  # B ≠ 0: every adapter gets a gradient
                torch.nn.init.normal_(weight.data, std=0.1)
        mlp = built.policy.get_base_model().model.layers[0].mlp
        real_forward = mlp.forward
        mlp.forward = lambda *a: (layer_calls.append((run, torch.is_grad_enabled())), real_forward(*a))[1]
        with models.training_mode(built.layers):
            loss.micro_batch_loss(built.trained, built.reference, batch, 0.1, 0.5).loss.backward()
        gradients[run] = {name: w.grad for name, w in built.policy.named_parameters() if w.requires_grad}
    assert layer_calls.count(("plain", True)) == 1 and layer_calls.count(("checkpointed", True)) == 2
    assert all(gradient is not None and gradient.abs().sum() > 0 for gradient in gradients["checkpointed"].values())
    assert all(torch.equal(gradients["checkpointed"][name], gradients["plain"][name]) for name in gradients["plain"])


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, small_data):
    """Arguments and output of 4 steps of 8 pairs with LoRA adapters of rank 4, a checkpoint every 2 steps,
    without a gold reward (no sampling), so that it is quick."""
    data_only = small_data[: small_data.index("--gold-reward")] + small_data[small_data.index("--gold-reward") + 2 :]
    arguments = [
        "--lora-r",
        "4",
        "--max-steps",
        "4",
        "--save-every",
        "2",
        "--eval-every",
        "1000",
        "--epsilon",
        "0.3",
        "--lr",
        "1e-2",
        *data_only,
    ]
    output_dir = tmp_path_factory.mktemp("lora") / "one"
    train.main(["--output-dir", str(output_dir), *arguments, "--batch-size", "8"])
    return arguments, output_dir


def test_a_lora_run_writes_its_adapter_for_the_base_and_checkpoints_without_the_base(lora_run):
    from peft import PeftModel

    _, output_dir = lora_run
    rows = read_metrics(output_dir)
    assert rows[0]["loss"] == float(torch.tensor(math.log(2))) and rows[0]["rewards/margins"] == 0.0  # the start
    summary = json.loads((output_dir / "summary.json").read_text())
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= set(summary["saved"])
    assert not (output_dir / "model.safetensors").exists()
    checkpoint = {p.name for p in (output_dir / "checkpoint-2").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "trainer_state.pt"} <= checkpoint  # the adapter,
    assert "model.safetensors" not in checkpoint  # not the base
    config = json.loads((output_dir / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(TINY_MODEL) and config["r"] == 4
    saved = load_file(output_dir / "adapter_model.safetensors")
    loaded = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"]), output_dir
    )
    weights = {name.replace(".default", ""): w for name, w in loaded.named_parameters() if ".lora_" in name}
    assert weights.keys() == saved.keys() and all(torch.equal(weights[name], saved[name]) for name in saved)
    assert all(saved[name].abs().sum() > 0 for name in saved)  # B moved from 0, A from its start


def test_a_lora_run_resumes_from_its_adapter_checkpoint_to_the_same_adapter_bit_for_bit(lora_run, tmp_path):
    _, whole = lora_run
    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed)
    for name in (".train.lock", "adapter_model.safetensors"):  # the output is written again
        (resumed / name).unlink()
    shutil.rmtree(resumed / "checkpoint-4")
    train.main(["--resume", str(resumed)])  # from checkpoint-2: base + its adapter
    assert read_metrics(resumed) == read_metrics(whole)
    whole_adapter, resumed_adapter = (load_file(run / "adapter_model.safetensors") for run in (whole, resumed))
    assert all(torch.equal(whole_adapter[name], resumed_adapter[name]) for name in whole_adapter)


def test_lora_on_two_ranks_under_torchrun_matches_one_process(lora_run, two_ranks):
    """DDP of the peft model: only the adapters require grad, so only their gradients are averaged. Run in
    two_ranks' launch, with the loss from hidden states (the reference AdaptersOff's through the same hook)."""
    _, one = lora_run
    two, counted = two_ranks[0] / "lora", two_ranks[2]["lora"]
    assert all(process["losses_from_hidden"] > 0 and process["models_read"] == [str(TINY_MODEL)] for process in counted)
    one_rows, two_rows = read_metrics(one), read_metrics(two)
    assert [r["beta"] for r in two_rows] == [r["beta"] for r in one_rows]
    one_adapter, two_adapter = (load_file(run / "adapter_model.safetensors") for run in (one, two))
    for name in one_adapter:
        torch.testing.assert_close(
            two_adapter[name], one_adapter[name], rtol=0, atol=1e-4
        )  # float32 order: a batch of 8 vs 4 + 4


# ----------------------------------------------------------------------------------------------------
# The loss from the last hidden states: what the logits path gives, on the output layers of three families


FAMILIES = [
    ("llama", {"tie_word_embeddings": False}),
    ("qwen2", {"tie_word_embeddings": True}),
    ("gemma2", {"final_logit_softcapping": 0.02, "head_dim": 8}),
]  # Gemma-2's soft-cap made small enough to bite


@pytest.mark.parametrize("kind, config", FAMILIES)
def test_a_step_from_hidden_states_gives_the_loss_and_gradients_of_a_step_from_logits(kind, config, monkeypatch):
    """loss.micro_batch_loss on tiny models of three families: the loss, every output and every gradient as from
    the logits, to float32 rounding; and the KL along samples from hidden states as from the logits."""
    from transformers import AutoConfig

    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(
            kind,
            vocab_size=60,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            **config,
        )
    ).eval()
    reference = copy.deepcopy(policy).requires_grad_(False)
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    head, _ = models.linear_head(policy, torch.tensor([[1, 5, 7]]))
    assert head == models.LinearHead(60, config.get("final_logit_softcapping"))
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    batch = batches.collate(
        [data.tokenize_pair(row, tokenizer, 64, 32) for row in good_rows(4)],
        tokenizer.pad_token_id,
        torch.device("cpu"),
    )

    monkeypatch.setattr(loss, "PLAIN_LOSS_BYTES", 0)  # the paths at scale, on a tiny model

    def step(head):
        out = loss.micro_batch_loss(policy, reference, batch, 0.5, 0.3, head)
        return out, torch.autograd.grad(out.loss, list(policy.parameters()))

    (out, gradients), (expected, expected_gradients) = step(head), step(None)
    assert out.s.abs().sum() > 0
    for name in ("loss", "losses", "s", "chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps"):
        torch.testing.assert_close(getattr(out, name), getattr(expected, name), rtol=1e-5, atol=1e-5)
    for gradient, expected_gradient in zip(gradients, expected_gradients, strict=True):
        torch.testing.assert_close(gradient, expected_gradient, rtol=1e-4, atol=1e-6)
    # What evaluation reads (log π̂_λ and the KL along each completion): from hidden states in chunks as from the
    # logits, these two rows at a time.
    (logps, kls), (expected_logps, expected_kls) = (
        evaluation.completion_measures(policy, reference, batch, h, (0.0, 1.0, 1.3), max_rows=2) for h in (head, None)
    )
    assert (expected_kls > 0).all()
    torch.testing.assert_close(kls, expected_kls)
    torch.testing.assert_close(logps, expected_logps)
    torch.testing.assert_close(logps[1], torch.cat([expected.chosen_logps, expected.rejected_logps]))


def test_the_loss_from_hidden_states_trains_as_the_loss_from_logits(tmp_path, monkeypatch, capsys):
    """Two steps of train.py on a tiny soft-capped Gemma-2: the same metrics, the KL along samples included, to
    float32 rounding; and the logits path says once that it is used."""
    kind, config = FAMILIES[2]
    model = tiny_model_folder(tmp_path / "model", kind=kind, **config)
    # tiny_data's tokenizer (transformers would pick Gemma's tokenizer class for a Gemma-2 folder).
    monkeypatch.setattr(
        train,
        "load_tokenizer",
        lambda name, trust, *given, _real=train.load_tokenizer: _real(str(TINY_MODEL), trust),
    )
    dataset = write_jsonl(tmp_path / "pairs.jsonl", good_rows(10))
    arguments = [
        "--model",
        model,
        "--dataset",
        str(dataset),
        "--eval-fraction",
        "0.2",
        "--batch-size",
        "4",
        "--max-steps",
        "2",
        "--epsilon",
        "0.3",
        "--lr",
        "1e-2",
        "--gold-reward",
        str(TINY_GOLD_REWARD),
        "--max-new-tokens",
        "4",
    ]
    train.main(["--output-dir", str(tmp_path / "hidden"), *arguments])
    assert "the loss from full" not in capsys.readouterr().out
    monkeypatch.setattr(models, "FROM_HIDDEN_STATES", False)
    train.main(["--output-dir", str(tmp_path / "logits"), *arguments])
    assert (
        capsys.readouterr().out.count("the loss from full (2B, T, V) logits: models.FROM_HIDDEN_STATES is False") == 1
    )
    hidden, logits = read_metrics(tmp_path / "hidden"), read_metrics(tmp_path / "logits")
    assert [(r["split"], r["step"]) for r in hidden] == [(r["split"], r["step"]) for r in logits] and len(hidden) == 4
    assert any(r["rewards/margins"] != 0 for r in hidden) and any(r["kl"] > 0 for r in hidden if r["split"] == "eval")
    for hidden_row, logits_row in zip(hidden, logits, strict=True):
        assert hidden_row.keys() == logits_row.keys()
        for name, value in logits_row.items():
            assert hidden_row[name] == (
                value if isinstance(value, str) else pytest.approx(value, rel=1e-4, abs=1e-6)
            ), name


def test_the_last_hidden_state_is_taken_alone_not_every_layers_for_every_architecture():
    """models.last_hidden_states calls the model as usual, with logits_to_keep=1 and without output_hidden_states:
    the model returns no hidden state per layer (it would keep L + 1 of them through the pass); the final normed
    hidden state comes from a hook on the decoder, and softcap(it @ weight.T) is the model's logits. Tiny Llama
    (tied and untied), Qwen2, Gemma-2 soft-capped, Mixtral, GPT-2, and LoRA's reference, AdaptersOff."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig

    shape = dict(
        vocab_size=60,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    configs = {
        "llama tied": ("llama", dict(shape, tie_word_embeddings=True)),
        "llama": ("llama", dict(shape, tie_word_embeddings=False)),
        "qwen2": ("qwen2", shape),
        "gemma2": ("gemma2", dict(shape, head_dim=8, final_logit_softcapping=0.02)),
        "mixtral": ("mixtral", dict(shape, num_local_experts=4, num_experts_per_tok=2)),
        "gpt2": ("gpt2", dict(vocab_size=60, n_embd=16, n_layer=2, n_head=2, bos_token_id=1, eos_token_id=2)),
    }
    input_ids = torch.randint(3, 60, (2, 7), generator=torch.Generator().manual_seed(0))
    for name, (kind, config) in [*configs.items(), ("lora reference", configs["llama"])]:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **config)).eval()
        called = model
        if name == "lora reference":
            with adapters.quiet_peft():
                called = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
            for weight_name, weight in called.named_parameters():
                if ".lora_B." in weight_name:
                    torch.nn.init.normal_(weight.data)  # the policy differs from its reference
            called = models.AdaptersOff(called)
        calls = []
        hook = model.register_forward_hook(
            lambda module, args, kwargs, output: calls.append((kwargs, output)), with_kwargs=True
        )
        with torch.no_grad():
            hidden, weight = models.last_hidden_states(called, dict(input_ids=input_ids))
        hook.remove()
        ((kwargs, output),) = calls
        assert not kwargs.get("output_hidden_states") and output.hidden_states is None, name
        assert output.logits.shape == (2, 1, 60) and hidden.shape == (2, 7, 16), name
        logits = hidden @ weight.T
        cap = config.get("final_logit_softcapping")
        with torch.no_grad():
            expected = (called(input_ids=input_ids) if name == "lora reference" else model(input_ids)).logits
        torch.testing.assert_close(
            logits if cap is None else torch.tanh(logits / cap) * cap, expected, rtol=1e-5, atol=1e-6
        )


def test_heads_that_are_not_a_plain_linear_map_use_the_logits_path():
    from transformers import CohereConfig, CohereForCausalLM, LlamaConfig, LlamaForCausalLM

    sizes = dict(
        vocab_size=60,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    input_ids = torch.tensor([[1, 5, 7, 9]])
    cohere = CohereForCausalLM(CohereConfig(logit_scale=0.5, **sizes)).eval()  # scaled logits
    assert models.linear_head(cohere, input_ids) == (
        None,
        "its logits are not softcap(last hidden state @ output weight.T)",
    )
    with_bias = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False, **sizes)).eval()
    with_bias.lm_head = torch.nn.Linear(16, 60)
    assert models.linear_head(with_bias, input_ids) == (None, "its output layer is a Linear with a bias")


# ----------------------------------------------------------------------------------------------------
# Trust: LoRA, SFT adapters and multi-process runs keep the promises of full fine-tuning (issue 23)


def without_gold_reward(arguments):
    """small_data's arguments without its gold reward: no sampling in evaluations, for tests that do not need it."""
    at = arguments.index("--gold-reward")
    return arguments[:at] + arguments[at + 2 :]


def sft_adapter(folder, base=str(TINY_MODEL), base_name=None, seed=0):
    """A peft LoRA adapter of "supervised fine-tuning" on q_proj and v_proj of base, its B made non-zero, saved to
    folder without a tokenizer; adapter_config.json names base_name (default: base) as its base."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    adapted = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=2, target_modules=["q_proj", "v_proj"])
    )
    for name, weight in adapted.named_parameters():
        if ".lora_B." in name:
            torch.nn.init.normal_(weight.data, std=0.5)
    adapted.save_pretrained(folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base_name or base
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def test_a_resume_refuses_a_dataset_or_model_changed_since_the_run_naming_it(two_checkpoints, tmp_path, small_data):
    """Fingerprints of the pairs as tokenized and of the model's files (weights sampled per tensor) are in every
    checkpoint; a resume that reads anything else is refused before a model is loaded or a file written. (The
    run's model and data are copied here and its checkpoint pointed at the copies: the same fingerprints.)"""
    output_dir, model, dataset = copy_of(two_checkpoints, tmp_path), tmp_path / "model", tmp_path / "data"
    shutil.copytree(TINY_MODEL, model)
    shutil.copytree(small_data[1], dataset)
    state_path = output_dir / "checkpoint-2/trainer_state.pt"
    state = torch.load(state_path, weights_only=True)
    state["args"].update(model=str(model), dataset=str(dataset))
    torch.save(state, state_path)
    resume = ["--resume", str(output_dir), "--max-steps", "3"]
    before = {path: path.read_bytes() for path in output_dir.rglob("*") if path.is_file()}
    test_rows = (dataset / "test.jsonl").read_text()
    (dataset / "test.jsonl").write_text("".join(test_rows.splitlines(keepends=True)[::2]))  # rewritten: 16 of 32
    assert (
        run_expecting_error(resume) == f"error: --resume {output_dir}: the held-out pairs of --dataset {dataset} "
        f"differ from the run's (32 then, 16 now); a resumed run trains on what the run trained on"
    )
    (dataset / "test.jsonl").write_text(test_rows)
    weights = load_file(model / "model.safetensors")  # edited in place: the same size and names
    weights["model.layers.1.mlp.down_proj.weight"][0, :3] += 0.5
    from safetensors.torch import save_file

    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    assert (
        run_expecting_error(resume) == f"error: --resume {output_dir}: --model {model} changed since the run "
        f"(model.safetensors differs); a resumed run trains on what the run trained on"
    )
    assert {
        path: path.read_bytes() for path in output_dir.rglob("*") if path.is_file() and path.name != ".train.lock"
    } == before
    shutil.copy(TINY_MODEL / "model.safetensors", model / "model.safetensors")  # the same bytes again, a new file
    from training import fingerprints

    fingerprint = fingerprints.model_fingerprint(str(model))
    assert fingerprint == state["inputs"]["--model"] and set(fingerprint) == {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    }


def test_an_sft_adapter_with_a_relative_base_trains_its_merged_model_and_resumes_on_that_base_from_anywhere(
    tmp_path, monkeypatch, small_data
):
    """--model an SFT adapter without --lora-r: the merged model trains, every weight of it. adapter_config.json names
    its base relatively (base): from the working directory it is there/base, from the adapter's folder
    there/sft/base, another model. Resolved once, from where the run started, and kept (--model-base)."""
    there, elsewhere = tmp_path / "there", tmp_path / "elsewhere"
    (there / "sft").mkdir(parents=True)
    elsewhere.mkdir()
    shutil.copytree(TINY_MODEL, there / "base")
    tiny_model_folder(there / "sft/base", vocab_size=60, max_position_embeddings=64)  # the other "base"
    sft_adapter(there / "sft", base=str(there / "base"), base_name="base")
    monkeypatch.chdir(there)
    assert adapters.adapter_base(str(there / "sft")) == str(there / "base")
    output_dir = tmp_path / "out"
    train.main(
        [
            "--output-dir",
            str(output_dir),
            "--model",
            str(there / "sft"),
            *without_gold_reward(small_data),
            "--max-steps",
            "1",
            "--save-every",
            "1",
            "--eval-every",
            "1000",
        ]
    )
    state = torch.load(output_dir / "checkpoint-1/trainer_state.pt", weights_only=True)
    assert state["args"]["model_base"] == str(there / "base")
    merged = AutoModelForCausalLM.from_pretrained(output_dir)  # a full model, trained from the SFT model
    assert (
        sum(int((merged.state_dict()[n] != w).sum()) for n, w in load_file(there / "base/model.safetensors").items())
        > 80_000
    )
    monkeypatch.chdir(elsewhere)
    assert adapters.adapter_base(str(there / "sft")) == str(there / "sft/base")  # what a fresh resolution would take
    train.main(["--resume", str(output_dir), "--max-steps", "2"])  # the fingerprints match: the same base
    assert json.loads((output_dir / "summary.json").read_text())["args"]["model_base"] == str(there / "base")


def test_an_sft_adapter_as_model_is_merged_so_the_reference_is_the_sft_model(tmp_path):
    """And the LoRA adapter trained on it says in adapter_config.json and README.md what it must be loaded onto:
    AutoPeftModelForCausalLM stops on it rather than loading it onto the base alone, and the README's code gives
    the trained model."""
    from peft import AutoPeftModelForCausalLM, PeftModel

    sft = sft_adapter(tmp_path / "sft-adapter")
    assert adapters.tokenizer_name(str(sft)) == str(TINY_MODEL)  # no tokenizer: the base's
    built, batch, _ = lora_models("--model", str(sft))
    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    sft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(TINY_MODEL), sft).merge_and_unload()
    base_logits = AutoModelForCausalLM.from_pretrained(TINY_MODEL)(**inputs).logits
    reference_logits = built.reference(**inputs).logits
    assert torch.equal(reference_logits, sft_model(**inputs).logits) and not torch.allclose(
        reference_logits, base_logits
    )
    with torch.no_grad():
        assert torch.equal(built.policy(**inputs).logits, reference_logits)  # a fresh adapter on top: B = 0
        for name, weight in built.policy.named_parameters():
            if ".lora_B." in name:
                weight.add_(0.1)  # trained, say
        trained_logits = built.policy(**inputs).logits
    checkpoints.save_model(built.policy, tmp_path / "out")
    base = json.loads((tmp_path / "out/adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == f"merge {sft.resolve()} into {TINY_MODEL}, then load this adapter onto that model (README.md)"
    with pytest.raises(Exception, match="merge .* into .*README.md"):
        AutoPeftModelForCausalLM.from_pretrained(tmp_path / "out")
    with pytest.raises(errors.ReportedError, match=r"this adapter was trained on another adapter merged into its base"):
        adapters.adapter_base(str(tmp_path / "out"))  # as --model of another run: one line
    readme = (tmp_path / "out/README.md").read_text()
    assert readme.startswith("---\n") and "# Load this adapter onto the supervised fine-tuned model" in readme
    code = readme.split("```python\n")[1].split("```")[0].replace("THIS_FOLDER", str(tmp_path / "out"))
    namespace = {}
    exec(code, namespace)  # the README's own lines
    with torch.no_grad():
        torch.testing.assert_close(namespace["model"](**inputs).logits, trained_logits, rtol=1e-5, atol=1e-5)
    AutoTokenizer.from_pretrained(TINY_MODEL).save_pretrained(sft)
    assert adapters.tokenizer_name(str(sft)) == str(sft)  # an adapter with a tokenizer gives its own
    full, _, _ = lora_models("--model", str(sft), "--lora-r", "0")  # full fine-tuning of the merged model
    assert all(weight.requires_grad for weight in full.policy.parameters())


def test_resuming_on_another_number_of_processes_keeps_the_pairs_of_a_step_or_says_how_to_resume(
    two_checkpoints, tmp_path, monkeypatch, capsys
):
    """A one-process run of 4 pairs a step: on 2 processes 2 each, on 3 refused; given flags must keep the 4; an
    FSDP run needs torchrun. The batch never grows past the run's (no process needs more memory)."""
    output_dir = copy_of(two_checkpoints, tmp_path)

    def resumed(*flags, world_size=1):
        monkeypatch.setenv("WORLD_SIZE", str(world_size))
        args, given = parse_args(["--resume", str(output_dir), "--max-steps", "3", *flags])
        run_args, _ = checkpoints.resumed_args(args, given, lambda argv: parse_args(argv, report=True)[0])
        return run_args.batch_size, run_args.grad_accum

    assert resumed() == (4, 1) and resumed(world_size=2) == (2, 1) and resumed(world_size=4) == (1, 1)
    assert (
        "note: the run trains 4 pairs a step (--batch-size 4 × --grad-accum 1 × 1 process); now --batch-size 2 × "
        "--grad-accum 1 × 2: the same pairs a step" in capsys.readouterr().out
    )
    assert resumed("--grad-accum", "2") == (2, 2) and resumed("--batch-size", "1") == (1, 4)
    with pytest.raises(
        errors.ReportedError,
        match=r"^--resume .*: the run trains 4 pairs a step \(--batch-size 4 × "
        r"--grad-accum 1 × 1 process\), which 3 processes cannot share evenly; "
        r"resume it as it ran \(python train.py --resume .*\) or on processes "
        r"that divide 4$",
    ):
        resumed(world_size=3)
    with pytest.raises(
        errors.ReportedError, match=r"--batch-size 3 × --grad-accum 1 × 1 would make 3: a resumed run keeps"
    ):
        resumed("--batch-size", "3")
    state_path = output_dir / "checkpoint-2/trainer_state.pt"
    state = torch.load(state_path, weights_only=True)
    state["args"]["fsdp"], state["world_size"] = True, 2
    torch.save(state, state_path)
    with pytest.raises(
        errors.ReportedError,
        match=r"the run shards its models \(--fsdp\) over 2 processes; resume it under "
        r"torchrun: torchrun --nproc_per_node 2 train.py --resume ",
    ):
        resumed()


def test_a_two_process_run_resumed_in_one_process_trains_each_step_on_the_same_pairs(
    two_ranks, tmp_path, capsys, monkeypatch
):
    """The DDP run of 4 + 4 pairs a step, stopped by a Ctrl-C, resumed by python train.py (4 × 2 micro-batches, the
    same memory a process), ends as the same run never stopped, bit for bit, and as the one-process run of 8
    does; the one-process run resumed on 2 processes (in the fixture's torchrun launch, 1 note in all) too. To the
    one-process run: float32 order, as DDP itself."""
    folder, printed, _ = two_ranks
    stopped = shutil.copytree(folder / "ddp", tmp_path / "ddp", ignore=shutil.ignore_patterns(".train.lock"))
    monkeypatch.setattr(loss, "PLAIN_LOSS_BYTES", 0)  # the loss from hidden states, as it ran
    train.main(["--resume", str(stopped)])  # no gold reward: no sampling, quicker
    assert (
        "note: the run trains 8 pairs a step (--batch-size 4 × --grad-accum 1 × 2 processes); now --batch-size 4 × "
        "--grad-accum 2 × 1: the same pairs a step" in capsys.readouterr().out
    )
    # Bit for bit the same run never stopped, under torchrun: one process halves each of its 2 micro-batches'
    # gradients, DDP halves their sum, and halving is exact.
    resumed, never_stopped = load_file(stopped / "model.safetensors"), load_file(folder / "ddp-whole/model.safetensors")
    assert all(torch.equal(resumed[name], never_stopped[name]) for name in never_stopped)
    one = load_file(folder / "one/model.safetensors")
    for resumed in (stopped, folder / "one-on-two"):
        rows, one_rows = read_metrics(resumed), read_metrics(folder / "one")
        assert [(r["split"], r["step"], r["beta"]) for r in rows] == [
            (r["split"], r["step"], r["beta"]) for r in one_rows
        ]
        weights = load_file(resumed / "model.safetensors")
        for name in one:
            torch.testing.assert_close(weights[name], one[name], rtol=0, atol=1e-4)
    assert (
        printed[0].count(
            "note: the run trains 8 pairs a step (--batch-size 8 × --grad-accum 1 × 1 process); "
            "now --batch-size 4 × --grad-accum 1 × 2: the same pairs a step"
        )
        == 1
    )


def test_pairs_past_the_models_positions_are_refused_at_load_naming_the_limit(tmp_path):
    model = tiny_model_folder(tmp_path / "m", max_position_embeddings=24)
    long_rows = good_rows(12)  # 18 tokens a pair, 6 a prompt
    long_rows[3]["chosen"] = " The price is great." * 6  # 37 tokens with its prompt and EOS
    dataset = write_jsonl(tmp_path / "pairs.jsonl", long_rows)
    arguments = [
        "--model",
        model,
        "--dataset",
        str(dataset),
        "--output-dir",
        str(tmp_path / "out"),
        "--max-steps",
        "1",
        *QUICK,
    ]
    assert (
        run_expecting_error(arguments) == f"error: --model {model}: it takes at most 24 positions "
        f"(max_position_embeddings), and a pair has 37 tokens; give --max-length 24 and --max-prompt-length 12 or less"
    )
    dataset = write_jsonl(tmp_path / "pairs.jsonl", good_rows(12))
    error = run_expecting_error([*arguments, "--gold-reward", str(TINY_GOLD_REWARD), "--max-new-tokens", "20"])
    assert (
        error == f"error: --max-new-tokens 20: a prompt of 6 tokens and its sample would pass the 24 positions of "
        f"--model {model}; give --max-new-tokens 18 or less, or a smaller --max-prompt-length"
    )
    assert [p.name for p in (tmp_path / "out").iterdir()] == [".train.lock"]


@pytest.mark.parametrize(
    "run, break_it", [("two_checkpoints", "torn model"), ("lora_run", "torn adapter"), ("lora_run", "pickled adapter")]
)
def test_an_unreadable_model_or_adapter_makes_the_checkpoint_before_it_the_one_resumed(
    request, tmp_path, capsys, run, break_it
):
    """As a torn trainer_state.pt does: the checkpoint is named and passed over (a pickle is never loaded)."""
    output_dir = copy_of(
        request.getfixturevalue(run) if run == "two_checkpoints" else request.getfixturevalue(run)[1], tmp_path
    )
    latest, before = sorted(output_dir.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))[-2:][::-1]
    capsys.readouterr()  # what the run printed, if it ran just now
    model = latest / ("model.safetensors" if break_it == "torn model" else "adapter_model.safetensors")
    if break_it.startswith("torn"):
        model.write_bytes(model.read_bytes()[:-100])  # the end of the last tensor is missing
    else:
        torch.save(load_file(model), latest / "adapter_model.bin")  # what peft would unpickle instead
        model.unlink()
    folder, _ = checkpoints.latest_checkpoint(output_dir)
    assert folder == before
    expected = (
        f"{model.name} is cut short"
        if break_it.startswith("torn")
        else "adapter_model.safetensors is not there (adapter_model.bin is a pickle: never loaded)"
    )
    assert capsys.readouterr().out == f"note: {latest} cannot be resumed from (ValueError: {expected})\n"


def test_a_lora_checkpoint_of_another_adapter_is_refused_in_one_line_naming_its_adapter(lora_run, tmp_path):
    """An adapter on other layers (q_proj alone) in the run's checkpoint; and, its adapter config put back, an
    optimizer state of other shapes, named after the adapter's file, not model.safetensors."""
    arguments, run = lora_run
    output_dir = copy_of(run, tmp_path)
    checkpoint = output_dir / "checkpoint-4"
    config = (checkpoint / "adapter_config.json").read_text()
    (checkpoint / "adapter_config.json").write_text(json.dumps({**json.loads(config), "target_modules": ["q_proj"]}))
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)
    del state["files"]  # a checkpoint without the proofs of its files (with them, one edited is passed over)
    torch.save(state, checkpoint / "trainer_state.pt")
    error = run_expecting_error(["--resume", str(output_dir), "--max-steps", "5"])
    assert (
        error
        == f"error: {checkpoint}: its adapter ({checkpoint / 'adapter_config.json'}) is not the run's (--lora-r 4 "
        f"--lora-alpha 16 --lora-target all-linear, 14 layers): it is not a checkpoint of this run"
    )
    (checkpoint / "adapter_config.json").write_text(config)
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)
    state["optimizer"]["param_groups"][0]["params"] = state["optimizer"]["param_groups"][0]["params"][:-2]
    torch.save(state, checkpoint / "trainer_state.pt")
    error = run_expecting_error(["--resume", str(output_dir), "--max-steps", "5"])
    assert (
        error
        == f"error: {checkpoint}: its optimizer state is for another model than {checkpoint / 'adapter_model.safetensors'}"
    )


@pytest.mark.parametrize(
    "case", ["lora-r 10**20", "lora-r past a layer", "a misspelled lora-target", "an offline Hub base"]
)
def test_lora_flags_and_adapters_that_cannot_work_stop_the_run_with_one_line(tmp_path, case, small_data):
    arguments, expected = {
        "lora-r 10**20": (
            ["--lora-r", str(10**20)],
            f"--lora-r {10**20}: more than the rank of a layer it adapts "
            f"(model.layers.0.mlp.down_proj: 64 × 128); give --lora-r 64 or less",
        ),
        "lora-r past a layer": (
            ["--lora-r", "65", "--lora-target", "q_proj"],
            "--lora-r 65: more than the rank of a layer",
        ),
        "a misspelled lora-target": (
            ["--lora-r", "4", "--lora-target", "q_proj", "v_prj"],
            "--lora-target v_prj: the model "
            "has no layer of that name (its linear layers: down_proj, gate_proj, k_proj, lm_head, "
            "o_proj, q_proj, up_proj, v_proj)",
        ),
        "an offline Hub base": (
            lambda: ["--model", str(sft_adapter(tmp_path / "sft", base_name="nobody/not-downloaded"))],
            f"--model {tmp_path / 'sft'}: its base nobody/not-downloaded: OSError",
        ),
    }[case]
    arguments = arguments() if callable(arguments) else arguments
    error = run_expecting_error(["--output-dir", str(tmp_path / "out"), "--max-steps", "1", *small_data, *arguments])
    assert error.startswith(f"error: {expected}") and "\n" not in error, error


def test_lora_flags_are_parsed_as_meant_and_the_output_layer_named_is_why_the_logits_path_runs(two_checkpoints, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--lora-r", "4", "--lora-target", "all-linear", "q_proj"])
    assert "--lora-target all-linear stands alone" in capsys.readouterr().err
    args, given = parse_args(["--resume", str(two_checkpoints), "--lora-alpha", "32"])  # the run's --lora-r decides
    with pytest.raises(errors.ReportedError, match="--lora-alpha 32.0 differs from the run's 16.0"):
        checkpoints.resumed_args(args, given, lambda argv: parse_args(argv, report=True)[0])
    built, _, _ = lora_models("--lora-target", "q_proj", "lm_head")
    assert (built.head, built.loss_note) == (
        None,
        "LoRA adapts its output layer (--lora-target), so its logits are not one matrix product",
    )


def test_a_full_disk_names_the_file_and_a_sharded_writes_failure_prints_no_python_objects(
    tmp_path, monkeypatch, capsys
):
    import resource
    import traceback

    from torch.distributed.checkpoint.api import CheckpointException

    limits, previous_handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, limits[1]))
        with pytest.raises(
            errors.ReportedError, match=rf"^could not write {tmp_path / 'curves.png'} \(\[Errno 27\] File too large\)$"
        ):
            output_folder.write_atomically(tmp_path / "curves.png", b"\x89PNG" * 50_000)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous_handler)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".train.files"]  # nothing half-written
    failure = CheckpointException("failed", {1: (OSError(28, "No space left on device"), traceback.StackSummary())})
    assert checkpoints._first_line(checkpoints._first_failure(failure)) == "[Errno 28] No space left on device"
    monkeypatch.setenv("RANK", "1")  # under torchrun a note is rank 0's alone
    errors.note("said once")
    monkeypatch.setenv("RANK", "0")
    errors.note("said once")
    assert capsys.readouterr().out == "note: said once\n"


def test_ctrl_c_while_torch_imports_stops_with_one_line(tmp_path):
    process = subprocess.Popen(
        [sys.executable, "train.py", "--output-dir", str(tmp_path / "out")],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    maps, deadline = pathlib.Path(f"/proc/{process.pid}/maps"), time.time() + 60
    while "libtorch" not in maps.read_text() and time.time() < deadline:  # torch's import under way
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGINT and "Traceback" not in stderr, stderr
    assert stderr.strip() == "stopped by signal 2 before training started; nothing was written to resume from"
    assert not (tmp_path / "out").exists()


def test_beta_stays_within_min_beta_and_the_bound_of_beta_whatever_epsilon(tmp_path, monkeypatch, small_data, capsys):
    """ε close to 1 multiplies β by 1/(1 − ε) at a step where every pair gets s = −1: β stops at 1e6, --beta's own
    bound, never 1e10 before the loss breaks; --min-beta (issue 24) is a floor for the other way."""
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


def test_the_flags_trust_md_says_a_resume_may_change_are_those_it_may():
    text = (ROOT / "docs/trust.md").read_text()
    sentence = text[text.index("A flag given with `--resume` may change only") + 44 :].split(";")[0]
    assert set(re.findall(r"`(--[a-z-]+)`", sentence)) == {
        "--" + name.replace("_", "-") for name in checkpoints.RESUMABLE
    }
