"""Signals: a SIGTERM or a Ctrl-C stops a run with a checkpoint, and the run resumed from it ends as the run never
stopped, bit for bit; a comparison stops every run it started; a signal before training writes nothing."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import compare
import train
from tests.helpers import (
    QUICK,
    RunInThisProcess,
    read_metrics,
    read_metrics_if_any,
    run_expecting_error,
    without_gold_reward,
)
from training import evaluation, signals
from training.arguments import ROOT, TINY_GOLD_REWARD


@pytest.mark.slow
def test_a_command_line_run_stopped_by_sigterm_resumes_bit_for_bit(tmp_path, small_data, capsys):
    """python train.py as a user types it, in a fresh process with no network: stopped by a SIGTERM mid-run with a
    checkpoint; resumed (in this process), it ends as the run never stopped and prints its summary."""
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

    capsys.readouterr()
    train.main(["--resume", str(interrupted)])  # here: the checkpoint is all that carries the run on
    assert "held-out reward accuracy" in capsys.readouterr().out
    whole_rows, resumed_rows = read_metrics(tmp_path / "whole"), read_metrics(interrupted)
    assert [(r["split"], r["step"]) for r in resumed_rows] == [(r["split"], r["step"]) for r in whole_rows]
    assert [r["beta"] for r in resumed_rows] == [r["beta"] for r in whole_rows]
    whole, resumed = load_file(tmp_path / "whole/model.safetensors"), load_file(interrupted / "model.safetensors")
    assert all(torch.equal(whole[name], resumed[name]) for name in whole)
    assert (
        json.loads((interrupted / "summary.json").read_text())["final_beta"]
        == json.loads((tmp_path / "whole/summary.json").read_text())["final_beta"]
    )


def test_ctrl_c_mid_accumulation_drops_the_step_and_resumes_bit_for_bit(tmp_path, monkeypatch, small_data):
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


def test_a_signal_to_one_rank_stops_every_rank_with_its_status(tmp_path, monkeypatch, capsys, small_data):
    """A SIGTERM that reached another rank alone (its row of the step's collective says 15) stops this rank too, with
    a checkpoint and the status of that signal, not 'signal None' and a TypeError."""
    real_gather = evaluation.gather_from_every_rank

    def another_rank_got_sigterm(values):
        rows = real_gather(values)
        other = rows[0].clone()
        other[-1] = signal.SIGTERM
        return torch.cat([rows, other[None]])

    monkeypatch.setattr(evaluation, "gather_from_every_rank", another_rank_got_sigterm)
    arguments = ["--output-dir", str(tmp_path), "--max-steps", "3", "--eval-every", "1000"]
    with pytest.raises(SystemExit) as exit_info:
        train.main([*arguments, *without_gold_reward(small_data)])
    assert exit_info.value.code == 128 + signal.SIGTERM
    assert "stopped by signal 15 (SIGTERM) after step 1; checkpoint written" in capsys.readouterr().out
    assert [p.name for p in tmp_path.glob("checkpoint-*")] == ["checkpoint-1"]


def test_a_signal_before_training_stops_cleanly_and_a_burst_counts_once(tmp_path, monkeypatch, capsys):
    real_load_tokenizer = train.load_tokenizer

    def ctrl_c_while_loading(*args):
        os.kill(os.getpid(), signal.SIGINT)
        return real_load_tokenizer(*args)

    monkeypatch.setattr(train, "load_tokenizer", ctrl_c_while_loading)
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--output-dir", str(tmp_path / "out"), "--max-steps", "1", *QUICK])
    assert exit_info.value.code == 128 + signal.SIGINT
    assert "stopped by signal 2 (SIGINT) before training started; nothing was written" in capsys.readouterr().err
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


@pytest.mark.slow
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
    assert stderr.strip() == "stopped by signal 2 (SIGINT) before training started; nothing was written to resume from"
    assert not (tmp_path / "out").exists()


def test_ctrl_c_stops_a_sequential_comparison_checkpointed_and_says_so(tmp_path, monkeypatch, capsys, small_data):
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
    assert "stopped by signal 2 (SIGINT): 0 of 2 runs finished, 1 stopped with a checkpoint, 1 did not start" in (
        capsys.readouterr().out
    )


@pytest.mark.slow
def test_ctrl_c_stops_every_run_of_a_frontier_within_seconds(tmp_path, small_data):
    """python compare.py as a user types it, its 3 runs one at a time (python train.py each), stopped by a Ctrl-C in
    its terminal: SIGINT to every process of the group, compare.py's and its run's. The run under way checkpoints and
    stops, the two others never start, and compare.py says so and exits with the signal's status, within seconds."""
    arguments = ["--betas", "0.1", "--seeds", "1", "--workers", "1", "--output-dir", str(tmp_path)]
    process = subprocess.Popen(
        [sys.executable, "compare.py", *arguments, "--max-steps", "500", "--eval-every", "1000", *small_data],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        start_new_session=True,  # a process group of its own, as a terminal gives a command
    )
    deadline = time.time() + 120
    while (
        not any(any(r["split"] == "train" for r in read_metrics_if_any(f)) for f in tmp_path.glob("beta-0.1/seed-0/*"))
        and time.time() < deadline
    ):
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)
    signalled = time.time()
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGINT and time.time() - signalled < 30, stderr
    assert "Traceback" not in stderr, stderr
    checkpointed = sorted(p.parent.name for p in tmp_path.glob("beta-0.1/seed-0/*/checkpoint-*"))
    assert (
        checkpointed == ["dpo"]
        and "stopped by signal 2 (SIGINT): 0 of 3 runs finished, 1 stopped with a checkpoint" in stdout
    )
    assert "2 did not start" in stdout
