"""The trust rules of docs/trust.md the fifth pass added: nothing read from a run folder runs code, a stale record
hands over nothing, a comparison resumes, and the rest of issue 31, each checked here as a hostile but fair user
would meet it. The runs are small (tiny_data cut to 200 pairs, a step or two) and in this process."""

import argparse
import ast
import json
import os
import pathlib
import pickle
import random
import shutil
import signal
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # the scripts and the package, at the top
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests never download anything

import pytest
import torch

import compare
import epsdpo
import train
from tests.helpers import RunInThisProcess
from training import adapters, arguments, checkpoints, data, evaluation, models, output_folder
from training.arguments import ROOT, TINY_DATASET, TINY_GOLD_REWARD, TINY_MODEL, parse_args
from training.errors import ReportedError

QUICK = ["--batch-size", "4", "--eval-batch-size", "32", "--max-new-tokens", "8", "--criterion-pairs", "0"]
pytestmark = pytest.mark.xdist_group("trust_fifth_pass")  # one test process computes the module's runs once


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """tiny_data cut to 200 train and 32 held-out pairs, scored by a copy of its gold reward."""
    folder = tmp_path_factory.mktemp("data")
    for split, rows in (("train", 200), ("test", 32)):
        lines = (TINY_DATASET / f"{split}.jsonl").read_text().splitlines()[:rows]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    gold = shutil.copy(TINY_GOLD_REWARD, tmp_path_factory.mktemp("gold") / "gold.py")
    return ["--dataset", str(folder), "--gold-reward", str(gold), *QUICK]


def ctrl_c_at_training_micro_batch(monkeypatch, number):
    """Ctrl-C during the number-th training micro-batch (from 1) of the runs in this process."""
    real_loss, seen = train.micro_batch_loss, []

    def loss_then_ctrl_c(*args):
        if torch.is_grad_enabled():
            seen.append(1)
            if len(seen) == number:
                os.kill(os.getpid(), signal.SIGINT)
        return real_loss(*args)

    monkeypatch.setattr(train, "micro_batch_loss", loss_then_ctrl_c)


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, small_data):
    """A run of 3 steps stopped by Ctrl-C in its second: checkpoint-1 (--save-every 1) and checkpoint-2."""
    output_dir = tmp_path_factory.mktemp("stopped") / "out"
    with pytest.MonkeyPatch.context() as monkeypatch:
        ctrl_c_at_training_micro_batch(monkeypatch, 2)
        with pytest.raises(SystemExit):
            train.main(["--output-dir", str(output_dir), "--max-steps", "3", "--save-every", "1", *small_data])
    assert sorted(p.name for p in output_dir.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    return output_dir


def copy_of(run, tmp_path, dot_files=True):
    """A copy of a run's folder; without dot_files, as cp -r out/* new/ makes it (no .train.files)."""
    copy = tmp_path / "out"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns(".train.lock", *([] if dot_files else [".*"])))
    return copy


def error_of(arguments, main=train.main):
    """The one line a script exits with."""
    with pytest.raises(SystemExit) as exit_info:
        main(arguments)
    assert isinstance(exit_info.value.code, str) and "\n" not in exit_info.value.code, exit_info.value.code
    return exit_info.value.code


def train_rows(output_dir):
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    return [row["step"] for row in map(json.loads, lines) if row["split"] == "train"]


# ----------------------------------------------------------------------------------------------------
# HIGH: nothing in a run folder runs code; a stale record hands over nothing; a comparison resumes


class Payload:
    """A pickle that runs a command when it is loaded, as a hostile .metadata or shard item would hold."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_runs_no_code_from_its_shard_metadata_or_items(tmp_path, capsys):
    """Point 1: a checkpoint-STEP whose .metadata is a pickle calling os.system is passed over and the command never
    runs; torch.distributed.checkpoint's own files still load, and an item of a shard that is such a pickle is
    refused, not run."""
    marker = tmp_path / "ran"
    folder = tmp_path / "out/checkpoint-1"
    folder.mkdir(parents=True)
    torch.save({"step": 1, "args": {}}, folder / "trainer_state.pt")  # a sharded run's state: no optimizer in it
    (folder / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(ReportedError, match="no checkpoint-STEP folder of a train.py run that can be resumed from"):
        checkpoints.latest_checkpoint(tmp_path / "out")
    assert not marker.exists()
    assert "is not what torch.distributed.checkpoint writes" in capsys.readouterr().out

    import torch.distributed.checkpoint as dcp

    from training import dcp_files

    weights = {"model": {"w": torch.arange(6.0).reshape(2, 3)}, "optimizer": {"lr": 0.5, "betas": (0.9, 0.99)}}
    dcp.save(weights, checkpoint_id=tmp_path / "whole")
    loaded = {"model": {"w": torch.zeros(2, 3)}, "optimizer": {"lr": 0.0, "betas": (0.0, 0.0)}}
    dcp_files.load(loaded, tmp_path / "whole")
    assert torch.equal(loaded["model"]["w"], weights["model"]["w"]) and loaded["optimizer"]["lr"] == 0.5
    dcp.save({"item": Payload(marker)}, checkpoint_id=tmp_path / "hostile")  # a non-tensor item: pickled
    with pytest.raises(BaseException) as refused:  # a CheckpointException is one
        dcp_files.load({"item": None}, tmp_path / "hostile")
    assert "unsupported GLOBAL posix.system" in str(checkpoints._first_failure(refused.value))
    assert not marker.exists()


def test_a_stale_record_never_hands_over_a_users_files(tmp_path, small_data):
    """Point 2: after rm -rf out/* (which leaves .train.files), a model or a README.md of the user's copied into out/
    under the names the record lists is refused by --overwrite in one line and left as it was."""
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md", "metrics.jsonl"):
        output_folder.write_atomically(output_dir / name, f"the project's {name}")  # as a run writes them
    for path in output_dir.iterdir():  # rm -rf out/*
        if not path.name.startswith("."):
            path.unlink()
    theirs = {"config.json": "{}", "model.safetensors": "my weights", "tokenizer.json": "{}"}
    for name, text in theirs.items():
        (output_dir / name).write_text(text)
    arguments = ["--output-dir", str(output_dir), "--overwrite", "--max-steps", "1", "--eval-every", "1000"]
    error = error_of([*arguments, *small_data])
    assert error.startswith(f"error: --output-dir {output_dir} holds config.json, which this project did not write")
    for name in theirs:
        (output_dir / name).unlink()
    (output_dir / "README.md").write_text("my notes")
    (output_dir / "metrics.jsonl").write_text('{"step": 0}\n')
    error = error_of([*arguments, "--lora-r", "4", *small_data])
    assert error.startswith(f"error: --output-dir {output_dir} holds README.md, which this project did not write")
    assert (output_dir / "README.md").read_text() == "my notes"
    (output_dir / "README.md").unlink()
    assert error_of([*arguments, *small_data]).startswith(f"error: --output-dir {output_dir} holds metrics.jsonl")
    assert (output_dir / "metrics.jsonl").read_text() == '{"step": 0}\n'


def test_a_comparison_resumes_each_run_from_its_checkpoint_and_a_finished_one_is_redrawn_training_nothing(
    tmp_path, monkeypatch, capsys, small_data
):
    """Points 3 and 6: compare.py --resume DIR goes on with a stopped comparison, each run with its own arguments
    (the comparison's data and batch, not the defaults): the stopped one from its checkpoint, which stays, the one
    that never started from the start; on a finished comparison it draws compare.png again and trains nothing. The
    runs are made in this process (compare.start_run); the real processes: the frontier's Ctrl-C test."""
    monkeypatch.setattr(compare, "start_run", RunInThisProcess, raising=False)
    ctrl_c_at_training_micro_batch(monkeypatch, 1)
    arguments = ["--output-dir", str(tmp_path), "--max-steps", "2", "--eval-every", "1000", "--seed", "3"]
    with pytest.raises(SystemExit) as exit_info:
        compare.main([*arguments, *small_data[:2], *small_data[4:]])  # no gold reward: no samples to wait for
    assert exit_info.value.code == 128 + signal.SIGINT
    assert [p.name for p in (tmp_path / "dpo").glob("checkpoint-*")] == ["checkpoint-1"]
    assert f"python compare.py --resume {tmp_path} goes on" in capsys.readouterr().out

    assert error_of(["--resume", str(tmp_path), "--beta", "0.2"], compare.main).startswith(
        f"error: --resume {tmp_path}: --beta given; a resumed comparison keeps its arguments"
    )
    compare.main(["--resume", str(tmp_path)])
    printed = capsys.readouterr().out
    assert f"resuming from {tmp_path / 'dpo/checkpoint-1'} at step 2" in printed
    assert (tmp_path / "dpo/checkpoint-1").is_dir()  # nothing deleted a stopped run's checkpoint
    for run in ("dpo", "epsilon-dpo"):
        assert train_rows(tmp_path / run) == [1, 2]
        saved = json.loads((tmp_path / run / "summary.json").read_text())["args"]
        assert (saved["dataset"], saved["batch_size"], saved["seed"]) == (small_data[1], 4, 3)
    assert "DPO end" in printed and "ε-DPO end" in printed

    (tmp_path / "compare.png").unlink()

    def no_run(*arguments):
        raise AssertionError("a finished comparison trained a run")

    monkeypatch.setattr(compare, "start_run", no_run)
    compare.main(["--resume", str(tmp_path)])
    assert (tmp_path / "compare.png").exists() and "side by side" in capsys.readouterr().out


class FailedRun(RunInThisProcess):
    def __init__(self, arguments, environment, quiet):
        self.status, self.line = 1, "error: --dataset /d: no such file or folder"


def test_a_comparison_whose_run_fails_stops_naming_it_and_how_to_go_on(tmp_path, monkeypatch):
    """A run that fails stops the comparison (the others would be stopped with their checkpoints), in one line."""
    monkeypatch.setattr(compare, "start_run", FailedRun)
    assert error_of(["--output-dir", str(tmp_path), "--max-steps", "2"], compare.main) == (
        f"error: the run in {tmp_path / 'dpo'} failed: --dataset /d: no such file or folder; 0 of 2 runs finished, 0 "
        f"stopped with a checkpoint, 2 did not start: python compare.py --resume {tmp_path} goes on"
    )


def test_no_script_imports_a_script_and_the_package_imports_none():
    """Issue 29: compare.py runs python train.py in processes of its own; the package never imports a script."""
    modules = [path for path in ROOT.glob("*.py") if not path.name.startswith(("test_", "conftest"))]
    scripts = {path.stem for path in modules} - {"epsdpo", "epsdpo_chunked"}  # the method is a library
    assert {"train", "compare", "bench"} <= scripts
    for path in [*modules, *(ROOT / "training").glob("*.py")]:
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module.split(".")[0])
        assert not imported & scripts, f"{path.name} imports {imported & scripts}"


# ----------------------------------------------------------------------------------------------------
# MED


def test_a_run_folder_copied_without_its_record_resumes_and_otherwise_the_line_says_the_record_is_missing(
    stopped_run, tmp_path, capsys
):
    """Point 4: cp -r out/* new/ leaves .train.files behind; the copy resumes (its checkpoint keeps a copy of the
    record, which proves metrics.jsonl), and the record is written again. A finished run's copy, whose model the
    checkpoint cannot prove, is refused by --overwrite with a line that says the record is missing and what to do.
    Point 15: a resume with another --max-new-tokens says what that changes."""
    output_dir = copy_of(stopped_run, tmp_path, dot_files=False)
    train.main(["--resume", str(output_dir), "--max-new-tokens", "4"])
    printed = capsys.readouterr().out
    assert "note: --max-new-tokens 4, the run's 8: the gold reward and KL of samples from now on" in printed
    assert train_rows(output_dir) == [1, 2, 3] and (output_dir / ".train.files").is_file()
    (output_dir / ".train.files").unlink()
    error = error_of(["--output-dir", str(output_dir), "--overwrite", "--max-steps", "1", *QUICK])
    assert (
        "holds config.json, but the record of the files this project wrote there (.train.files) is missing, so "
        "config.json cannot be told from a file of yours; nothing was touched. Copy .train.files back" in error
    )


def test_a_checkpoint_a_kill_half_removed_is_finished_off_not_held_against_the_user(stopped_run, tmp_path):
    """Point 5: a kill -9 while a checkpoint was removed, after its trainer_state.pt went, left a folder resumes and
    overwrites refused; now it is known as the run's (the record's proofs of its files) and removed. A removal is
    a rename first: killed after it, what is left is a temporary the next run removes."""
    output_dir = copy_of(stopped_run, tmp_path)
    (output_dir / "checkpoint-1/trainer_state.pt").unlink()  # where rmtree was killed
    train.main(["--resume", str(output_dir)])
    assert train_rows(output_dir) == [1, 2, 3] and not (output_dir / "checkpoint-1").exists()

    def killed(path, *args, **kwargs):
        raise KeyboardInterrupt  # the kill, after the rename

    with pytest.MonkeyPatch.context() as monkeypatch, pytest.raises(KeyboardInterrupt):
        monkeypatch.setattr(output_folder.shutil, "rmtree", killed)
        output_folder.remove_checkpoint(output_dir / "checkpoint-2")
    assert [p.name[:14] for p in output_dir.glob("*checkpoint-2*")] == [".checkpoint-2-"]
    (output_dir / ".train.files.k1ll3d00").write_text("{")  # the record's own temporary, as a kill leaves it
    output_folder.prepare_output_dir(output_dir, 3)
    assert not list(output_dir.glob("*checkpoint-2*")) and not (output_dir / ".train.files.k1ll3d00").exists()


def test_a_resume_with_another_gold_reward_or_the_runs_edited_is_refused(stopped_run, tmp_path, small_data):
    """Point 7: the gold reward is an input of the run like its data: another file, or the run's edited in place,
    would put two scorers' numbers in one summary."""
    output_dir, gold = copy_of(stopped_run, tmp_path), pathlib.Path(small_data[small_data.index("--gold-reward") + 1])
    other = tmp_path / "other.py"
    other.write_text(gold.read_text() + "\nBONUS = 100\n")
    error = error_of(["--resume", str(output_dir), "--gold-reward", str(other)])
    assert error == (
        f"error: --resume {output_dir}: the run scored its samples with --gold-reward {gold}, not {other}: its gold "
        f"reward before and after would be two scorers'. Give --gold-reward {gold}, or leave it out to score nothing "
        "from now on"
    )
    text = gold.read_text()
    try:
        gold.write_text(text + "\n# edited\n")
        error = error_of(["--resume", str(output_dir), "--gold-reward", str(gold)])
        assert error.startswith(f"error: --resume {output_dir}: --gold-reward {gold} changed since the run")
    finally:
        gold.write_text(text)


def test_a_signal_to_one_rank_stops_every_rank_with_a_checkpoint_and_that_signals_status(
    tmp_path, monkeypatch, capsys, small_data
):
    """Point 8: a SIGTERM that reached another rank alone (its row of the step's collective says 15) stops this rank
    too, with the checkpoint and the status of that signal, not 'signal None' and a TypeError."""
    real_gather = evaluation.gather_from_every_rank

    def another_rank_got_sigterm(values):
        rows = real_gather(values)
        other = rows[0].clone()
        other[-1] = signal.SIGTERM
        return torch.cat([rows, other[None]])

    monkeypatch.setattr(evaluation, "gather_from_every_rank", another_rank_got_sigterm)
    without_gold_reward = small_data[:2] + small_data[4:]
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--output-dir", str(tmp_path), "--max-steps", "3", "--eval-every", "1000", *without_gold_reward])
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert "stopped by signal 15 (SIGTERM) after step 1; checkpoint written" in capsys.readouterr().out
    assert [p.name for p in tmp_path.glob("checkpoint-*")] == ["checkpoint-1"]


def test_a_beta_the_loss_cannot_take_is_refused_when_parsed_and_the_baseline_never_leaves_that_range(capsys):
    """Point 9: --beta 1e-300 is refused by the parser (train.py's and compare.py's --betas), at the library's
    least β; and the baseline β of a run that falls every step stops there (a floor that always holds)."""
    for parse, flags in ((parse_args, ["--beta", "1e-300"]), (compare.parse_args, ["--betas", "1e-300"])):
        with pytest.raises(SystemExit):
            parse(flags)
        assert "1e-300 is out of range: beta must be in (0, 1e6), and at least 1.2e-38" in capsys.readouterr().err
    assert parse_args(["--beta", "1.2e-38"])[0].beta == 1.2e-38 == arguments.MIN_BETA == epsdpo.BETA_RANGE[0]
    beta = epsdpo.BaselineBeta(2e-38, 0.9, min_beta=0.0, max_beta=arguments.MAX_BETA)  # as train.py builds it
    assert [beta.step((8, 0, 0)) for _ in range(3)] == [arguments.MIN_BETA] * 3
    epsdpo.BaselineBeta(0.1, 0.9).load_state_dict(beta.state_dict())  # its checkpoint resumes


def test_a_lora_checkpoint_whose_adapter_is_not_the_one_it_wrote_is_passed_over_with_a_note(tmp_path, capsys):
    """Point 10: an adapter of rank 8, or on q_proj and v_proj alone, put under a rank-4 all-linear checkpoint's
    adapter_config.json (a RuntimeError traceback, or 10 of 14 adapters silently zero) makes it a checkpoint to pass
    over, as a torn one: the proofs of its files are in its trainer_state.pt, and each adapter's rank is checked
    against its config."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    def adapter(rank, targets):
        model = AutoModelForCausalLM.from_pretrained(TINY_MODEL)
        return get_peft_model(model, LoraConfig(r=rank, lora_alpha=16, target_modules=targets, lora_dropout=0.0))

    policy, output_dir = adapter(4, "all-linear"), tmp_path / "out"
    output_dir.mkdir()
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad])
    for step in (1, 2):
        state = {
            "step": step,
            "baseline_beta": epsdpo.BaselineBeta(0.1, 0.01).state_dict(),
            "s_by_noise": [0] * 9,
            "args": {"lora_r": 4},
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        }
        checkpoints.write_checkpoint(output_dir, step, policy, optimizer, state, keep=2)
    written = (output_dir / "checkpoint-2/adapter_model.safetensors").read_bytes()
    for rank, targets, why in (
        (8, "all-linear", "has rank 8, its adapter_config.json r = 4"),
        (4, ["q_proj", "v_proj"], "is not the file this checkpoint wrote"),
    ):
        adapter(rank, targets).save_pretrained(tmp_path / f"r{rank}", save_embedding_layers=False)
        shutil.copy(tmp_path / f"r{rank}/adapter_model.safetensors", output_dir / "checkpoint-2")
        assert checkpoints.latest_checkpoint(output_dir)[0] == output_dir / "checkpoint-1"
        assert (
            f"note: {output_dir / 'checkpoint-2'} cannot be resumed from (ValueError: adapter_model.safetensors {why}"
            in capsys.readouterr().out
        )
    (output_dir / "checkpoint-2/adapter_model.safetensors").write_bytes(written)
    assert checkpoints.latest_checkpoint(output_dir)[0] == output_dir / "checkpoint-2"
    (output_dir / "checkpoint-2/modeling_mine.py").write_text("import os")  # what --trust-remote-code would run
    assert checkpoints.latest_checkpoint(output_dir)[0] == output_dir / "checkpoint-1"
    assert "(ValueError: modeling_mine.py came after the checkpoint was written)" in capsys.readouterr().out


def test_samples_past_the_models_positions_are_refused_at_start_whatever_the_gold_reward_with_a_hint_that_parses(
    capsys,
):
    """Points 11, 14 and 15: tiny_data's own gold reward (on without --gold-reward) samples too; a prompt and its
    sample past the model's 64 positions are refused when the models are loaded, not an IndexError (GPT-2) or a
    silent sample past them (RoPE). A pair past them is refused with a hint that the parser takes."""
    model = models.load_model(str(TINY_MODEL), torch.device("cpu"), False)
    tokenizer = data.load_tokenizer(str(TINY_MODEL))
    pairs = [{"prompt_ids": [1] * 6, "chosen_ids": [5, 2], "rejected_ids": [6, 2]}]
    run = vars(parse_args(["--max-new-tokens", "60"])[0])
    with pytest.raises(ReportedError, match="--max-new-tokens 60: a prompt of 6 tokens and its sample would pass the"):
        models.check_models(model, model, tokenizer, pairs, argparse.Namespace(**run))
    pairs[0]["chosen_ids"] = [5] * 80
    with pytest.raises(ReportedError) as refused:
        models.check_models(model, model, tokenizer, pairs, argparse.Namespace(**{**run, "max_new_tokens": 8}))
    assert str(refused.value).endswith("give --max-length 64 and --max-prompt-length 32 or less")
    assert parse_args(["--max-length", "64", "--max-prompt-length", "32"])[0].max_length == 64
    with pytest.raises(SystemExit):
        parse_args(["--min-beta", "0.2", "--beta", "0.1"])
    assert "the floor of the baseline β would be above its start" in capsys.readouterr().err
    assert parse_args(["--resume", "out", "--max-length", "32"])[0].max_length == 32  # the resume says what is wrong


def test_a_resume_given_a_flag_it_cannot_change_says_so_not_a_usage_error(stopped_run, tmp_path):
    """Point 14: --max-length 32 on resume is the resume's refusal, not --max-prompt-length's usage error."""
    output_dir = copy_of(stopped_run, tmp_path)
    assert error_of(["--resume", str(output_dir), "--max-length", "32"]).startswith(
        f"error: --resume {output_dir}: --max-length 32 differs from the run's 512; a resumed run keeps its arguments"
    )


@pytest.fixture(scope="module")
def tokenizer():
    return data.load_tokenizer(str(TINY_MODEL))


def tiny_row(line=0):
    """A row of tiny_data (its tokenizer's words), without its extra fields."""
    row = json.loads((TINY_DATASET / "train.jsonl").read_text().splitlines()[line])
    return {field: row[field] for field in ("prompt", "chosen", "rejected")}


def test_a_lone_surrogate_is_the_rows_fault_named_in_one_line_and_skip_invalid_drops_it(tmp_path, tokenizer):
    """Point 12: "\\ud800" is valid JSON but no text: a tokenizers TypeError traceback, also with --skip-invalid and
    through a chat template. Now one line naming the row and the field; --skip-invalid drops it, saying why."""
    good = tiny_row()
    conversation = {
        "prompt": [{"role": "user", "content": good["prompt"]}],
        "chosen": [{"role": "assistant", "content": "fine \ud800"}],
        "rejected": [{"role": "assistant", "content": "poor"}],
    }
    rows = [good, {**good, "chosen": " The \ud800 price"}, conversation, good]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (tmp_path / "test.jsonl").write_text(json.dumps(good) + "\n")
    with pytest.raises(ReportedError) as refused:
        data.load_pairs(str(tmp_path), "train", None, 0.05, 0, tokenizer, 64, 32)
    assert str(refused.value) == (
        f"{tmp_path / 'train.jsonl'}, line 2: field 'chosen' holds a lone surrogate ('\\ud800', character 6), which "
        "is not text (--skip-invalid drops such rows)"
    )
    loaded = data.load_pairs(str(tmp_path), "train", None, 0.05, 0, tokenizer, 64, 32, skip_invalid=True)
    assert len(loaded["pairs"]["train"]) == 2
    assert f"{tmp_path / 'train.jsonl'}, line 3: field 'chosen' holds a lone surrogate" in loaded["notes"][0]


def test_a_line_that_is_not_utf8_is_named_and_skippable_a_bom_is_read_and_each_dropped_row_says_why(
    tmp_path, tokenizer
):
    """Points 17 and 21: a byte that is not UTF-8 is named with its line, and --skip-invalid drops that line as any
    malformed row; a UTF-8 byte-order mark is read as the text it starts; the note of the rows dropped gives each
    one's reason, not only 'invalid'."""
    good = json.dumps(tiny_row()).encode()
    (tmp_path / "test.jsonl").write_bytes(b"\xef\xbb\xbf" + good + b"\n")
    (tmp_path / "train.jsonl").write_bytes(
        b"\n".join([b"\xef\xbb\xbf" + good, good[:-2] + b'\xff"}', good, b'{"prompt": "x", "rejected": "y"}', good])
    )
    with pytest.raises(ReportedError) as refused:
        data.load_pairs(str(tmp_path), "train", None, 0.05, 0, tokenizer, 64, 32)
    assert str(refused.value).startswith(f"{tmp_path / 'train.jsonl'}, line 2: not UTF-8 text (byte 0xff at column")
    loaded = data.load_pairs(str(tmp_path), "train", None, 0.05, 0, tokenizer, 64, 32, skip_invalid=True)
    assert len(loaded["pairs"]["train"]) == 3 and len(loaded["pairs"]["eval"]) == 1
    assert loaded["skipped"]["train"] == {"invalid (--skip-invalid)": 2}
    assert loaded["notes"] == [
        f"--skip-invalid dropped 2 train rows: {tmp_path / 'train.jsonl'}, line 2: not UTF-8 text (byte 0xff at "
        f"column {len(good) - 1}); {tmp_path / 'train.jsonl'}, line 4: field 'chosen' is missing"
    ]


# ----------------------------------------------------------------------------------------------------
# LOW


def test_an_odd_record_is_never_followed_and_a_users_file_in_a_checkpoint_stays(stopped_run, tmp_path, small_data):
    """Point 13: a .train.files that is a link to a dataset file, or a folder, is refused in one line and never
    written through; a folder's name in the record is not removed (no errno line); a file of the user's inside
    checkpoint-N/ stays when --overwrite removes the run, with the folder."""
    output_dir, dataset = tmp_path / "out", tmp_path / "pairs.jsonl"
    output_dir.mkdir()
    dataset.write_text("the user's data\n")
    (output_dir / ".train.files").symlink_to(dataset)
    arguments = ["--output-dir", str(output_dir), "--overwrite", "--max-steps", "1", *small_data]
    assert error_of(arguments) == (
        f"error: {output_dir / '.train.files'} is a link, not the record of the files this project wrote there (a "
        "file); nothing was touched. Move it away, or choose another --output-dir"
    )
    assert dataset.read_text() == "the user's data\n"
    (output_dir / ".train.files").unlink()
    (output_dir / ".train.files").mkdir()
    assert "is a folder, not the record" in error_of(arguments)
    (output_dir / ".train.files").rmdir()
    (output_dir / ".train.lock").unlink()
    (output_dir / ".train.lock").symlink_to(dataset)
    assert error_of(arguments) == (
        f"error: --output-dir {output_dir}: its .train.lock is a link, which is never followed; move it away"
    )
    (output_dir / ".train.lock").unlink()
    (output_dir / ".train.files").write_text("config.json\n")  # an older train.py's record: names alone
    (output_dir / "config.json").write_text("{}")
    with pytest.raises(ReportedError, match="lists names alone .an older train.py wrote it., which does not prove"):
        output_folder.check_only_ours_replaced(output_dir, lambda name: True)

    run = copy_of(stopped_run, tmp_path / "copy")
    (run / "checkpoint-2/notes.txt").write_text("mine")
    (run / "plots").mkdir()
    record = json.loads((run / ".train.files").read_text())
    record["files"]["plots"] = [[0, "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"]]
    (run / ".train.files").write_text(json.dumps(record))
    output_folder.prepare_output_dir(run, None)  # what --overwrite does once the run is known to be good
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("*")) == [
        "checkpoint-2",
        "checkpoint-2/notes.txt",
        "plots",
    ]


def test_the_card_of_a_lora_run_on_an_sft_adapter_names_no_bare_base_and_a_chained_adapter_is_one_line(tmp_path):
    """Point 16: peft's front matter named the bare base (base_model, a base_model:adapter tag), which is another
    model than the one trained on; an adapter whose base is an adapter gave a tokenizer error."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    policy = get_peft_model(
        AutoModelForCausalLM.from_pretrained(TINY_MODEL), LoraConfig(r=2, target_modules=["q_proj"])
    )
    policy.peft_config["default"].base_model_name_or_path = adapters.SFT_BASE.format(adapter="/sft", base="/base")
    checkpoints.save_model(policy, tmp_path / "adapter")
    card = (tmp_path / "adapter/README.md").read_text()
    front = card.split("\n---\n")[0]
    assert "base_model" not in front and "library_name: peft" in front
    assert "merge_and_unload" in card
    for folder, base in (("first", str(TINY_MODEL)), ("second", str(tmp_path / "first"))):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base}))
    with pytest.raises(ReportedError, match=f"its base {tmp_path / 'first'} is an adapter itself; merge"):
        adapters.adapter_base(str(tmp_path / "second"))


def test_a_gold_reward_that_exits_or_raises_keyboard_interrupt_is_its_own_failure_in_one_line(tmp_path):
    """Point 18: sys.exit(0) in score() ended the run with status 0 and nothing written; a KeyboardInterrupt of its own
    was taken for a second signal."""

    def exits(prompt, completion):
        sys.exit(0)

    def interrupts(prompt, completion):
        raise KeyboardInterrupt

    with pytest.raises(ReportedError, match="score\\(\\) raised SystemExit: 0"):
        data.gold_score(exits, "p", "c")
    with pytest.raises(ReportedError, match="score\\(\\) raised KeyboardInterrupt"):
        data.gold_score(interrupts, "p", "c")
    (tmp_path / "gold.py").write_text("import sys\nsys.exit(0)\n")
    with pytest.raises(ReportedError, match="running it raised SystemExit: 0"):
        data.load_gold_reward(str(tmp_path / "gold.py"))


def test_a_model_whose_config_names_its_own_code_says_it_loads_as_the_built_in_class(tmp_path, capsys):
    """Point 19: auto_map with a model_type transformers knows trained as the built-in class without a word."""
    folder = shutil.copytree(TINY_MODEL, tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "mine.Model"}}))
    for _ in range(2):  # the policy and the reference: said once
        models.load_model(str(folder), torch.device("cpu"), False)
    assert capsys.readouterr().out == (
        f"note: {folder}: its config.json names code of its own (auto_map), which runs only with --trust-remote-code; "
        "it loads as transformers' LlamaForCausalLM\n"
    )
