"""End-to-end tests of the scripts: train.py for a few optimizer steps on tiny_data and on data and models
made here, and bench.py --quick."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests never download anything

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import epsdpo
import train

METRIC_KEYS = {"step", "split", "loss", "beta", "beta/pairs_mean", "steps/lower_beta", "steps/higher_beta",
               "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
               "logps/rejected", "lr"}
QUICK = ["--batch-size", "4", "--eval-batch-size", "32", "--max-new-tokens", "8"]


def read_metrics(output_dir):
    return [json.loads(line) for line in open(output_dir / "metrics.jsonl")]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Three steps of ε-DPO on tiny_data with two micro-batches per step and a large ε, so β moves."""
    output_dir = tmp_path_factory.mktemp("tiny")
    train.main(["--output-dir", str(output_dir), "--max-steps", "3", "--eval-every", "2", "--grad-accum", "2",
                "--epsilon", "0.3", "--lr", "1e-3", *QUICK])
    return output_dir


def test_the_demo_writes_every_metric_finite_for_every_step(tiny_run):
    rows = read_metrics(tiny_run)
    assert [(r["split"], r["step"]) for r in rows] == [
        ("eval", 0), ("train", 1), ("train", 2), ("eval", 2), ("train", 3), ("eval", 3)]
    for row in rows:
        assert METRIC_KEYS <= row.keys(), METRIC_KEYS - row.keys()
        assert all(math.isfinite(v) for v in row.values() if isinstance(v, float))
        if row["split"] == "eval":
            assert {"gold_reward", "kl"} <= row.keys()          # tiny_data has a gold reward
    assert rows[0]["kl"] == 0.0 and rows[0]["rewards/accuracies"] == 0.5   # the policy starts as the reference


def test_the_demo_writes_a_summary_a_figure_and_a_model_that_reloads(tiny_run):
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert summary["args"]["epsilon"] == 0.3 and summary["args"]["beta"] == 0.1 and summary["steps"] == 3
    assert set(summary["steps_by_noise"]) == {"clean", "noisy"}
    assert sum(group["pairs"] for group in summary["steps_by_noise"].values()) == 3 * 2 * 4
    assert summary["final"]["step"] == 3 and "gold_reward" in summary["final"]
    assert (tiny_run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    model = AutoModelForCausalLM.from_pretrained(tiny_run)
    tokenizer = AutoTokenizer.from_pretrained(tiny_run)
    reference = AutoModelForCausalLM.from_pretrained(train.TINY_MODEL)
    assert tokenizer("Review of the lamp:")["input_ids"] == AutoTokenizer.from_pretrained(train.TINY_MODEL)(
        "Review of the lamp:")["input_ids"]
    changed = [not torch.equal(p, q) for p, q in zip(model.state_dict().values(), reference.state_dict().values())]
    assert any(changed)                                          # it trained


def test_beta_in_the_metrics_follows_method_section_5(tiny_run):
    train_rows = [r for r in read_metrics(tiny_run) if r["split"] == "train"]
    epsilon = 0.3
    assert train_rows[0]["beta"] == 0.1
    for row, next_row in zip(train_rows, train_rows[1:] + [None]):
        lower, higher = row["steps/lower_beta"], row["steps/higher_beta"]
        # The mean β̃ over the 8 pairs of the step's two micro-batches.
        mean_pair_beta = row["beta"] * (lower / (1 + epsilon) + higher / (1 - epsilon) + (1 - lower - higher))
        assert row["beta/pairs_mean"] == pytest.approx(mean_pair_beta, rel=1e-6)
        if next_row is not None:
            assert next_row["beta"] == row["beta/pairs_mean"]      # the next step uses it
    assert any(r["beta/pairs_mean"] != r["beta"] for r in train_rows)


def plain_dpo(policy_logits, ref_logits, input_ids, completion_mask, beta, epsilon):
    """DPO with a fixed β, nothing of ε-DPO: what --epsilon 0 must reproduce."""
    half = policy_logits.shape[0] // 2
    logps = epsdpo.sequence_logps(policy_logits, input_ids, completion_mask)
    with torch.no_grad():
        ref_logps = epsdpo.sequence_logps(ref_logits, input_ids, completion_mask)
    losses, chosen_rewards, rejected_rewards = epsdpo.dpo_loss(logps[:half], logps[half:], ref_logps[:half],
                                                               ref_logps[half:], beta)
    return epsdpo.EpsilonDPOOutput(
        loss=losses.mean(), losses=losses, pair_betas=torch.full((half,), beta), steps=torch.zeros(half, dtype=torch.long),
        chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards, chosen_logps=logps[:half],
        rejected_logps=logps[half:], ref_chosen_logps=ref_logps[:half], ref_rejected_logps=ref_logps[half:],
    )


def test_epsilon_zero_is_a_dpo_run_bit_for_bit(tmp_path, monkeypatch):
    arguments = ["--max-steps", "3", "--eval-every", "3", "--epsilon", "0", "--lr", "1e-3", *QUICK]
    train.main(["--output-dir", str(tmp_path / "epsilon-zero"), *arguments])
    monkeypatch.setattr(epsdpo, "epsilon_dpo_loss", plain_dpo)
    train.main(["--output-dir", str(tmp_path / "dpo"), *arguments])

    epsilon_zero, dpo = load_file(tmp_path / "epsilon-zero/model.safetensors"), load_file(tmp_path / "dpo/model.safetensors")
    assert epsilon_zero.keys() == dpo.keys()
    assert all(torch.equal(epsilon_zero[name], dpo[name]) for name in dpo)
    for row, dpo_row in zip(read_metrics(tmp_path / "epsilon-zero"), read_metrics(tmp_path / "dpo")):
        assert row == dpo_row


@pytest.fixture(scope="module")
def local_model(tmp_path_factory):
    """The tiny model saved to a folder of its own, its tokenizer given a chat template."""
    folder = tmp_path_factory.mktemp("model")
    AutoModelForCausalLM.from_pretrained(train.TINY_MODEL).save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(train.TINY_MODEL)
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
    train.main(["--model", str(local_model), "--dataset", str(dataset), "--output-dir", str(output_dir),
                "--max-steps", "2", "--eval-fraction", "0.2", *QUICK])
    summary = json.loads((output_dir / "summary.json").read_text())
    assert (summary["train_pairs"], summary["eval_pairs"]) == (32, 8)   # no test split: 20 % held out
    assert "gold_reward" not in summary["final"]                       # no gold reward for other data
    assert summary["steps_by_noise"].keys() == {"all"}
    assert AutoModelForCausalLM.from_pretrained(output_dir) is not None


def test_conversational_jsonl_is_rendered_with_the_chat_template(tmp_path, local_model):
    rows = [{"prompt": [{"role": "user", "content": p}], "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]} for p, c, r in reviews(40)]
    dataset = write_jsonl(tmp_path / "conversations.jsonl", rows)
    output_dir = tmp_path / "out"
    train.main(["--model", str(local_model), "--dataset", str(dataset), "--output-dir", str(output_dir),
                "--max-steps", "2", *QUICK])
    assert [r["step"] for r in read_metrics(output_dir) if r["split"] == "train"] == [1, 2]


def test_compare_trains_dpo_and_epsilon_dpo_side_by_side(tmp_path, capsys):
    train.main(["--compare", "--output-dir", str(tmp_path), "--max-steps", "2", "--epsilon", "0.3", *QUICK])
    dpo = json.loads((tmp_path / "dpo/summary.json").read_text())
    epsilon_dpo = json.loads((tmp_path / "epsilon-dpo/summary.json").read_text())
    assert (dpo["args"]["epsilon"], epsilon_dpo["args"]["epsilon"]) == (0.0, 0.3)
    assert dpo["final_beta"] == 0.1
    assert (tmp_path / "compare.png").exists()
    printed = capsys.readouterr().out
    assert "DPO end" in printed and "ε-DPO end" in printed


@pytest.mark.parametrize("flag, value, message", [
    ("--beta", "0", "beta must be in (0, 1e6)"), ("--beta", "1.7e308", "beta must be in (0, 1e6)"),
    ("--seed", "100000000000000000000000", "must be in [0, 2**32)"), ("--epsilon", "1", "epsilon must be in [0, 1)"),
    ("--epsilon", "-0.1", "epsilon must be in [0, 1)"), ("--lr", "0", "the learning rate must be > 0"),
    ("--batch-size", "0", "must be >= 1"), ("--beta", "nan", "out of range"), ("--lr", "fast", "is not a float"),
])
def test_bad_arguments_are_rejected_when_parsed(flag, value, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args([flag, value])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_the_command_line_runs_offline_from_a_fresh_process(tmp_path):
    result = subprocess.run(
        [sys.executable, "train.py", "--output-dir", str(tmp_path), "--max-steps", "1", "--eval-every", "1", *QUICK],
        cwd=train.HERE, capture_output=True, text=True, timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert "held-out reward accuracy" in result.stdout and "Traceback" not in result.stderr


# ----------------------------------------------------------------------------------------------------
# Bad input gets a clear message; output is never lost; an interrupted run resumes as if never stopped


def run_expecting_error(arguments):
    """train.main's message when it stops on bad input (it exits with the message, no traceback)."""
    with pytest.raises(SystemExit) as exit_info:
        train.main(arguments)
    assert isinstance(exit_info.value.code, str), exit_info.value.code
    return exit_info.value.code


def good_rows(num_pairs=12):
    return [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in reviews(num_pairs)]


@pytest.mark.parametrize("bad_row, message", [
    ({"prompt": "Review of the lamp:", "rejected": " Poor."}, "line 3: field 'chosen' is missing"),
    ({"prompt": "Review of the lamp:", "chosen": 5, "rejected": " Poor."},
     "line 3: field 'chosen' must be a string or a list of messages, not int"),
    ({"prompt": "Review of the lamp:", "chosen": " Great.", "rejected": "  "}, "line 3: field 'rejected' is empty"),
    ({"chosen": " Great.", "rejected": " Poor."}, "line 3: field 'prompt' is missing"),
    ({"prompt": "Review of the lamp:", "chosen": " Great.", "rejected": " Poor.", "noisy": "yes"},
     "line 3: field 'noisy' must be true, false or null, not str 'yes'"),
])
def test_a_malformed_row_stops_the_run_before_training_naming_file_line_and_field(tmp_path, bad_row, message):
    rows = good_rows()
    rows.insert(2, bad_row)
    dataset = write_jsonl(tmp_path / "pairs.jsonl", rows)
    error = run_expecting_error(["--dataset", str(dataset), "--output-dir", str(tmp_path / "out"), *QUICK])
    assert error.startswith(f"error: {dataset}, {message}") and "--skip-invalid" in error
    assert [p.name for p in (tmp_path / "out").iterdir()] == [".train.lock"]   # stopped before writing anything


def test_skip_invalid_drops_malformed_rows_and_reports_them(tmp_path, capsys):
    rows = good_rows(20)
    rows[4] = {"prompt": "Review of the lamp:", "chosen": None, "rejected": " Poor."}
    rows[7] = {"prompt": "Review of the lamp:", "chosen": " Same.", "rejected": " Same."}
    dataset = write_jsonl(tmp_path / "pairs.jsonl", rows)
    output_dir = tmp_path / "out"
    train.main(["--dataset", str(dataset), "--output-dir", str(output_dir), "--skip-invalid", "--max-steps", "1",
                "--eval-fraction", "0.1", *QUICK])
    summary = json.loads((output_dir / "summary.json").read_text())
    skipped = {reason: count for split in summary["skipped"].values() for reason, count in split.items()}
    assert skipped == {"invalid (--skip-invalid)": 1, "chosen identical to rejected": 1}
    assert summary["train_pairs"] + summary["eval_pairs"] == 18
    assert "skipped 1" in capsys.readouterr().out


def test_missing_paths_and_unusable_data_give_one_line_errors(tmp_path):
    output = ["--output-dir", str(tmp_path / "out"), *QUICK]
    assert "no such file or folder" in run_expecting_error(["--dataset", str(tmp_path / "nothing.jsonl"), *output])
    assert run_expecting_error(["--model", str(tmp_path / "no-model"), *output]).startswith(f"error: --model {tmp_path / 'no-model'}")
    same = write_jsonl(tmp_path / "same.jsonl", [{"prompt": "Review:", "chosen": " Ok.", "rejected": " Ok."}] * 10)
    assert "0 usable train pairs" in run_expecting_error(["--dataset", str(same), *output])
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(good_rows(1)[0]) + "\n{not json\n")
    assert run_expecting_error(["--dataset", str(broken), *output]).startswith(f"error: {broken}, line 2: not valid JSON")


def test_a_tokenizer_without_a_pad_token_pads_with_eos(tmp_path, local_model):
    folder = tmp_path / "no-pad"
    shutil.copytree(local_model, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(folder)
    assert AutoTokenizer.from_pretrained(folder).pad_token is None
    train.main(["--model", str(folder), "--output-dir", str(tmp_path / "out"), "--max-steps", "1", *QUICK])
    assert (tmp_path / "out/summary.json").exists()


def test_a_non_empty_output_dir_is_refused_and_left_untouched(tmp_path):
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "notes.txt").write_text("mine")
    error = run_expecting_error(["--output-dir", str(output_dir), "--max-steps", "1", *QUICK])
    assert "is not empty" in error and "--overwrite" in error
    assert [p.name for p in output_dir.iterdir()] == ["notes.txt"] and (output_dir / "notes.txt").read_text() == "mine"
    train.main(["--output-dir", str(output_dir), "--max-steps", "1", "--overwrite", *QUICK])
    assert (output_dir / "summary.json").exists() and (output_dir / "notes.txt").read_text() == "mine"


def test_a_non_finite_loss_stops_the_run_naming_the_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    calls, real_loss = [], epsdpo.epsilon_dpo_loss

    def loss_that_breaks_at_the_third_step(*args):
        out = real_loss(*args)
        calls.append(torch.is_grad_enabled())                           # True in training, False in evaluation
        if sum(calls) == 3 and calls[-1]:                                # the third training micro-batch: step 3
            out.losses = out.losses * float("nan")
            out.loss = out.losses.mean()
        return out

    monkeypatch.setattr(epsdpo, "epsilon_dpo_loss", loss_that_breaks_at_the_third_step)
    output_dir = tmp_path / "out"
    error = run_expecting_error(["--output-dir", str(output_dir), "--max-steps", "5", "--save-every", "2",
                                 "--eval-every", "100", *QUICK])
    assert error.startswith("error: step 3: the loss or the gradient is not finite") and "checkpoint-2" in error
    state = torch.load(output_dir / "checkpoint-2/trainer_state.pt", weights_only=True)
    assert state["step"] == 2
    assert max(row["step"] for row in read_metrics(output_dir)) == 2      # nothing of the bad step


def test_code_in_a_model_folder_runs_only_with_trust_remote_code(tmp_path, local_model):
    folder = tmp_path / "with-code"
    shutil.copytree(local_model, folder)
    marker = tmp_path / "the model's code ran"
    (folder / "custom_model.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "custom_model.CustomModel"}
    (folder / "config.json").write_text(json.dumps(config))
    train.main(["--model", str(folder), "--output-dir", str(tmp_path / "out"), "--max-steps", "1", *QUICK])
    assert not marker.exists()


def test_checkpoints_keep_the_last_few(tmp_path):
    output_dir = tmp_path / "out"
    train.main(["--output-dir", str(output_dir), "--max-steps", "5", "--save-every", "1", "--keep-checkpoints", "2",
                "--eval-every", "100", *QUICK])
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-5"]
    assert [p.name for p in output_dir.glob(".*")] == [".train.lock"]    # no temporary left behind


def test_an_interrupted_run_resumes_to_the_same_end_bit_for_bit(tmp_path):
    arguments = ["--max-steps", "40", "--eval-every", "1000", "--save-every", "1000", "--epsilon", "0.2", *QUICK]
    train.main(["--output-dir", str(tmp_path / "whole"), *arguments])

    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen([sys.executable, "train.py", "--output-dir", str(interrupted), *arguments],
                               cwd=train.HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 60
    while not any(row["split"] == "train" for row in read_metrics_if_any(interrupted)) and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)                                  # a real signal, mid-run
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    (checkpoint,) = interrupted.glob("checkpoint-*")
    stopped_at = int(checkpoint.name.split("-")[1])
    assert 1 <= stopped_at < 40 and "--resume" in stdout

    train.main(["--resume", str(interrupted)])
    whole_rows, resumed_rows = read_metrics(tmp_path / "whole"), read_metrics(interrupted)
    assert [(r["split"], r["step"]) for r in resumed_rows] == [(r["split"], r["step"]) for r in whole_rows]
    assert [r["beta"] for r in resumed_rows] == [r["beta"] for r in whole_rows]
    whole, resumed = load_file(tmp_path / "whole/model.safetensors"), load_file(interrupted / "model.safetensors")
    assert all(torch.equal(whole[name], resumed[name]) for name in whole)
    assert json.loads((interrupted / "summary.json").read_text())["final_beta"] == \
        json.loads((tmp_path / "whole/summary.json").read_text())["final_beta"]


def test_two_ranks_under_torchrun_agree_on_beta_and_match_one_process_even_across_a_resume(tmp_path):
    """2 CPU processes (gloo) with 4 pairs each are one process with 8: the same β at every step on both
    ranks and in the single process, and the same weights up to float rounding, also when the 2-rank run is
    stopped by SIGTERM and resumed under torchrun."""
    arguments = ["--max-steps", "15", "--eval-every", "1000", "--save-every", "1000", "--epsilon", "0.3",
                 "--lr", "1e-3", "--eval-batch-size", "32", "--max-new-tokens", "8"]
    train.main(["--output-dir", str(tmp_path / "one"), "--batch-size", "8", *arguments])

    two = tmp_path / "two"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py"]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([*torchrun, "--output-dir", str(two), "--batch-size", "4", *arguments],
                               cwd=train.HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)
    deadline = time.time() + 90
    while not any(row["split"] == "train" for row in read_metrics_if_any(two)) and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)                                  # torchrun passes it to both ranks
    stdout, _ = process.communicate(timeout=90)
    assert "checkpoint written" in stdout and len(list(two.glob("checkpoint-*"))) == 1
    resumed = subprocess.run([*torchrun, "--resume", str(two)], cwd=train.HERE, capture_output=True, text=True,
                             timeout=120, env=environment)
    assert resumed.returncode == 0, resumed.stderr

    one_rows, two_rows = read_metrics(tmp_path / "one"), read_metrics(two)
    assert [(r["split"], r["step"]) for r in two_rows] == [(r["split"], r["step"]) for r in one_rows]
    for one_row, two_row in zip(one_rows, two_rows):
        assert two_row["beta"] == one_row["beta"]
        if two_row["split"] == "train":
            assert two_row["beta/ranks"] == [one_row["beta"]] * 2             # the β both ranks used
            assert two_row["beta/pairs_mean"] == one_row["beta/pairs_mean"]    # and the β both moved to
    one, two = load_file(tmp_path / "one/model.safetensors"), load_file(two / "model.safetensors")
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-4)


def read_metrics_if_any(output_dir):
    try:
        return read_metrics(output_dir)
    except (FileNotFoundError, json.JSONDecodeError):
        return []


# ----------------------------------------------------------------------------------------------------
# bench.py


def test_the_quick_benchmark_runs_and_reports_every_figure(tmp_path):
    report_path = tmp_path / "bench.json"
    result = subprocess.run([sys.executable, "bench.py", "--quick", "--device", "cpu", "--json", str(report_path)],
                            cwd=train.HERE, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    report = json.loads(report_path.read_text())
    assert [run["shape"] for run in report["runs"]] == ["tiny_data", "realistic-small"]
    for run in report["runs"]:
        assert set(run["variants"]) == {"dpo", "epsilon-dpo", "naive", "dpo-precomputed"}
        for figures in run["variants"].values():
            assert figures["median_s"] > 0 and math.isfinite(figures["peak_mib"]) and len(figures["times_s"]) >= 3
        assert len(run["extra_times_s"]) == 3                            # --quick: three rounds
        assert run["inherent"]["median_s"] > 0 and all(math.isfinite(value) for value in run["ratios"].values())
        assert run["ratios"]["extra_memory_over_ref_logits"] == pytest.approx(
            (run["variants"]["epsilon-dpo"]["peak_mib"] - run["variants"]["dpo"]["peak_mib"]) / run["inherent"]["ref_logits_mib"])
    realistic = report["runs"][1]["variants"]
    # Keeping the perturbed full-vocabulary tensors in the graph costs memory that epsdpo.py does not spend.
    assert realistic["naive"]["peak_mib"] > 1.5 * realistic["epsilon-dpo"]["peak_mib"]
    assert "extra_time_over_inherent_work" in result.stdout
