"""Bad input stops train.py before it trains, with one line that says what is wrong (no traceback), and runs
nothing it should not: flags, rows, paths, models, gold rewards, a loss that is no longer finite."""

import argparse
import json
import shutil
import sys

import pytest
import torch

import compare
import epsdpo
import train
from tests.helpers import QUICK, good_rows, read_metrics, run_expecting_error, tiny_model_folder, write_jsonl
from training import data, errors, models
from training.arguments import MAX_BETA, MIN_BETA, TINY_GOLD_REWARD, TINY_MODEL, parse_args


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


def test_paths_are_expanded_and_absolute_and_compare_py_flags_refused(tmp_path, monkeypatch, capsys):
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
            "--lora-target c_attn: the model has no layer of that name (its linear layers: down_proj, gate_proj, "
            "k_proj, lm_head, o_proj, q_proj, up_proj, v_proj)",
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
def test_a_malformed_row_stops_the_run_at_once_naming_file_line_and_field(tmp_path, bad_row, message):
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


def test_a_mistyped_eval_split_stops_the_run_naming_the_splits_there_are(tmp_path, small_data):
    error = run_expecting_error(["--output-dir", str(tmp_path / "out"), *small_data, "--eval-split", "tset"])
    assert (
        error == f"error: --dataset {small_data[1]} has no split 'tset' for --eval-split (it has ['test', 'train']); "
        f"leave --eval-split out to hold out --eval-fraction of train"
    )


def test_pairs_past_the_models_positions_are_refused_naming_the_limit(tmp_path):
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


def test_samples_past_the_models_positions_are_refused_with_a_valid_hint(capsys):
    """tiny_data's own gold reward (on without --gold-reward) samples too: a prompt and its sample past the model's
    64 positions are refused when the models are loaded, not an IndexError (GPT-2) or a silent sample past them
    (RoPE). A pair past them is refused with a hint that the parser takes; --min-beta above --beta is refused when
    parsed; a resume's --max-length parses, and the resume says what is wrong with it."""
    model = models.load_model(str(TINY_MODEL), torch.device("cpu"), False)
    tokenizer = data.load_tokenizer(str(TINY_MODEL))
    pairs = [{"prompt_ids": [1] * 6, "chosen_ids": [5, 2], "rejected_ids": [6, 2]}]
    run = vars(parse_args(["--max-new-tokens", "60"])[0])
    with pytest.raises(
        errors.ReportedError, match="--max-new-tokens 60: a prompt of 6 tokens and its sample would pass the"
    ):
        models.check_models(model, model, tokenizer, pairs, argparse.Namespace(**run))
    pairs[0]["chosen_ids"] = [5] * 80
    with pytest.raises(errors.ReportedError) as refused:
        models.check_models(model, model, tokenizer, pairs, argparse.Namespace(**{**run, "max_new_tokens": 8}))
    assert str(refused.value).endswith("give --max-length 64 and --max-prompt-length 32 or less")
    assert parse_args(["--max-length", "64", "--max-prompt-length", "32"])[0].max_length == 64
    with pytest.raises(SystemExit):
        parse_args(["--min-beta", "0.2", "--beta", "0.1"])
    assert "the floor of the baseline β would be above its start" in capsys.readouterr().err
    assert parse_args(["--resume", "out", "--max-length", "32"])[0].max_length == 32  # the resume says what is wrong


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


def test_a_model_naming_code_of_its_own_says_it_loads_the_built_in_class(tmp_path, capsys):
    """A config.json with an auto_map and a model_type transformers knows trained as the built-in class without a
    word: now a note says so, once for both models."""
    folder = shutil.copytree(TINY_MODEL, tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "mine.Model"}}))
    for _ in range(2):  # the policy and the reference: said once
        models.load_model(str(folder), torch.device("cpu"), False)
    assert capsys.readouterr().out == (
        f"note: {folder}: its config.json names code of its own (auto_map), which runs only with --trust-remote-code; "
        "it loads as transformers' LlamaForCausalLM\n"
    )


def test_a_gold_reward_that_exits_or_raises_ctrl_c_fails_in_one_line(tmp_path):
    """sys.exit(0) in score() ended the run with status 0 and nothing written, and a KeyboardInterrupt of its own was
    taken for a second signal: each is the gold reward's failure, in one line, when scoring or loading."""

    def exits(prompt, completion):
        sys.exit(0)

    def interrupts(prompt, completion):
        raise KeyboardInterrupt

    with pytest.raises(errors.ReportedError, match="score\\(\\) raised SystemExit: 0"):
        data.gold_score(exits, "p", "c")
    with pytest.raises(errors.ReportedError, match="score\\(\\) raised KeyboardInterrupt"):
        data.gold_score(interrupts, "p", "c")
    (tmp_path / "gold.py").write_text("import sys\nsys.exit(0)\n")
    with pytest.raises(errors.ReportedError, match="running it raised SystemExit: 0"):
        data.load_gold_reward(str(tmp_path / "gold.py"))


def test_a_beta_the_loss_cannot_take_is_refused_and_never_reached(capsys):
    """--beta 1e-300 is refused by the parser (train.py's, and compare.py's --betas) at the library's least β; and
    the baseline β of a run that falls every step stops there (a floor that always holds)."""
    for parse, flags in ((parse_args, ["--beta", "1e-300"]), (compare.parse_args, ["--betas", "1e-300"])):
        with pytest.raises(SystemExit):
            parse(flags)
        assert "1e-300 is out of range: beta must be in (0, 1e6), and at least 1.2e-38" in capsys.readouterr().err
    assert parse_args(["--beta", "1.2e-38"])[0].beta == 1.2e-38 == MIN_BETA == epsdpo.BETA_RANGE[0]
    beta = epsdpo.BaselineBeta(2e-38, 0.9, min_beta=0.0, max_beta=MAX_BETA)  # as train.py builds it
    assert [beta.step((8, 0, 0)) for _ in range(3)] == [MIN_BETA] * 3
    epsdpo.BaselineBeta(0.1, 0.9).load_state_dict(beta.state_dict())  # its checkpoint resumes


def test_a_non_finite_loss_stops_naming_its_step_and_keeps_the_checkpoint(tmp_path, monkeypatch, small_data):
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
