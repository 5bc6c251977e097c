"""A sharded run's checkpoints, written in the background (training/async_checkpoints.py): training goes on while
they are written, each appears whole or not at all, a resume from one is bit for bit, a failed write stops the run in
one line, a signal while one is written ends with both whole.

Each run is 2 processes forked from this one (gloo, FSDP on tiny_data's model): no fresh Python to start, so each
costs its training alone. Hooks installed in the forked processes hold a shard's write (FileSystemWriter.write_data)
until the main thread has finished a later optimizer step, fail it, kill the process, or send it a signal; each
process writes what it saw, in order, to a file the test reads."""

import json
import os
import pathlib
import shutil
import signal
import sys
import threading
import time

import pytest
import torch
from torch.distributed.checkpoint import FileSystemWriter

import train
from tests.helpers import read_metrics, tiny_data_cut
from training import checkpoints, output_folder

# The runs below are made once, in one test process; they fork processes that train (seconds).
pytestmark = [pytest.mark.xdist_group("async_checkpoints"), pytest.mark.slow]

HOLD = 30  # seconds a held write waits for the step that releases it; reached only when saving is not in the background


def fsdp_arguments(data, output_dir, *more):
    """A 2-process FSDP run on `data` of 4 pairs a step, no sampling, no criterion figure."""
    return [
        "--output-dir", str(output_dir), "--dataset", str(data), "--fsdp", "--batch-size", "2", "--eval-every",
        "1000", "--eval-batch-size", "8", "--criterion-pairs", "0", "--epsilon", "0.3", "--lr", "1e-3", *more,
    ]  # fmt: skip


def written_step(writer):
    """The step of the checkpoint a FileSystemWriter writes, from its temporary folder .checkpoint-STEP-XXXXXXXX."""
    return int(pathlib.Path(writer.path).name.split("-")[1])


def on_two_forked_ranks(folder, name, argv, hooks):
    """train.main(argv) on 2 processes forked from this one, each in a gloo process group of its own, with hooks(rank,
    say) installed first (say(text): a line of what that process saw, appended at once, so a killed process keeps
    it). Returns, for each rank, (its exit status: an int, train.main's message, or -9 when killed; the lines it
    said). Stdout and stderr go to NAME-RANK.out."""
    import torch.distributed as dist

    assert not dist.is_initialized()
    pids = []
    for rank in (0, 1):
        pid = os.fork()
        if pid == 0:  # the forked process: never returns into pytest
            status = 1
            try:
                output = os.open(folder / f"{name}-{rank}.out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(output, 1)
                os.dup2(output, 2)
                sys.stdout = sys.stderr = open(output, "w", buffering=1)  # pytest's capture is not fd 1 alone
                os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")

                def say(text, rank=rank):
                    with open(folder / f"{name}-{rank}.said", "a") as file:
                        file.write(text + "\n")

                hooks(rank, say)
                dist.init_process_group("gloo", init_method=f"file://{folder / name}.group", rank=rank, world_size=2)
                try:
                    train.main(argv)
                    status = 0
                except SystemExit as stopped:
                    status = stopped.code
                except BaseException as error:  # a failure of the test harness, said in the status
                    import traceback

                    traceback.print_exc()
                    status = f"{type(error).__name__}: {error}"
                (folder / f"{name}-{rank}.status").write_text(json.dumps(status))
            finally:
                sys.stdout.flush()
                os._exit(0)
        pids.append(pid)
    deadline, exits = time.time() + 120, {}
    while len(exits) < 2 and time.time() < deadline:
        for rank, pid in enumerate(pids):
            if rank not in exits and os.waitpid(pid, os.WNOHANG)[0]:
                exits[rank] = pid
        time.sleep(0.02)
    for rank, pid in enumerate(pids):
        if rank not in exits:  # stuck: end it, the test fails below
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    results = []
    for rank in (0, 1):
        status_file, said_file = folder / f"{name}-{rank}.status", folder / f"{name}-{rank}.said"
        status = json.loads(status_file.read_text()) if status_file.exists() else -9
        said = said_file.read_text().splitlines() if said_file.exists() else []
        results.append((status, said))
    assert len(exits) == 2, f"{name} did not end: {(folder / f'{name}-0.out').read_text()[-3000:]}"
    return results


def hold_writes(output_dir, release_after, say, kill_at=None, sigterm_at=None):
    """Hooks of one forked process: the shards' write of checkpoint-K waits until the main thread has finished
    optimizer step release_after[K] (None: never, until the process is killed); at step kill_at the process kills
    itself (kill -9), at step sigterm_at it sends itself a SIGTERM. Says each write's start and end, and at the end
    of each step which checkpoints output_dir holds."""
    real_write, real_train_row = FileSystemWriter.write_data, train.train_row
    finished = {}  # step: threading.Event, set once the main thread has finished it

    def write_data(writer, *args, **kwargs):
        step = written_step(writer)
        say(f"write {step} begins")
        release = release_after.get(step, 0)
        if release != 0:
            waited = finished.setdefault(release, threading.Event()).wait(HOLD if release else 3 * HOLD)
            say(f"write {step} {'released' if waited else 'still held'} after step {release}")
        result = real_write(writer, *args, **kwargs)
        say(f"write {step} returns")
        return result

    def train_row(step, *args, **kwargs):
        row = real_train_row(step, *args, **kwargs)  # after the optimizer step
        there = sorted(p.name for p in output_dir.glob("checkpoint-*"))
        say(f"step {step} done, {there}")
        if step == sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)
            say(f"SIGTERM at step {step}")
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        finished.setdefault(step, threading.Event()).set()
        return row

    FileSystemWriter.write_data, train.train_row = write_data, train_row


def import_what_a_run_imports():
    """The modules a sharded run imports on its way (datasets, a Llama model's code, FSDP, DCP, matplotlib's
    backend), imported here once, not in each forked process: seconds each, more than the runs' training."""
    import datasets  # noqa: F401
    import matplotlib.backends.backend_agg  # noqa: F401
    import torch.distributed.checkpoint.state_dict  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401

    from training import models
    from training.arguments import TINY_MODEL

    models.empty_model(str(TINY_MODEL), trust_remote_code=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three 2-process FSDP runs on 48 pairs of tiny_data, 4 a step, a checkpoint every 2 steps:

    - "held": checkpoint-2's write held until step 3 is done, checkpoint-4's until the processes kill themselves
      (kill -9) at step 5; its folder as the kill left it is copied to held-as-killed;
    - "resumed": it, resumed with a checkpoint every step (python train.py --resume --save-every 1); rank 1's write
      of checkpoint-3 fails with a full disk;
    - "signalled": checkpoint-2's write held until step 3 is done, where rank 1 gets a SIGTERM.
    Returns (folder, {run: [(exit status, lines said) of each rank]})."""
    folder = tmp_path_factory.mktemp("async")
    import_what_a_run_imports()
    data = tiny_data_cut(folder / "data", 48, 8)
    results = {}

    def run(name, argv, hooks):
        results[name] = on_two_forked_ranks(folder, name, argv, hooks)

    held = fsdp_arguments(data, folder / "held", "--max-steps", "6", "--save-every", "2", "--keep-checkpoints", "3")
    run("held", held, lambda rank, say: hold_writes(folder / "held", {2: 3, 4: None}, say, kill_at=5))
    shutil.copytree(folder / "held", folder / "held-as-killed")

    def full_disk(rank, say):
        real_write = FileSystemWriter.write_data

        def write_data(writer, *args, **kwargs):
            if rank == 1 and written_step(writer) == 3:
                raise OSError(28, "No space left on device")
            return real_write(writer, *args, **kwargs)

        FileSystemWriter.write_data = write_data

    run("resumed", ["--resume", str(folder / "held"), "--save-every", "1"], full_disk)
    signalled = fsdp_arguments(data, folder / "signalled", "--max-steps", "6", "--save-every", "2")
    sigterm = {1: 3}  # rank: step
    run(
        "signalled",
        signalled,
        lambda rank, say: hold_writes(folder / "signalled", {2: 3}, say, sigterm_at=sigterm.get(rank)),
    )
    return folder, results


def whole(checkpoint):
    """A sharded checkpoint that resumes: its trainer_state.pt and shards read whole, and the folder's record proves
    each of its files."""
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)
    checkpoints._check_state(state, checkpoint)
    record = output_folder.read_record(checkpoint.parent)["checkpoints"][checkpoint.name]
    assert record == output_folder.manifest(checkpoint)
    assert sorted(record) == [".metadata", "__0_0.distcp", "__1_0.distcp", "trainer_state.pt"]
    return state


def test_a_checkpoint_is_written_while_training_goes_on_and_appears_whole(runs):
    """checkpoint-2's write is held until the main thread has finished step 3: saved in the background, step 3 runs
    meanwhile and the write returns after it, with no checkpoint-2 in the folder until then. Saved synchronously, the
    held write would wait HOLD seconds for a step that cannot come, and return before step 3. A kill -9 while
    checkpoint-4 is being written leaves checkpoint-2 whole and checkpoint-4 a temporary, never a checkpoint-4."""
    folder, results = runs
    for rank, (status, said) in enumerate(results["held"]):
        assert status == -9  # killed at step 5
        assert said.index("step 3 done, []") < said.index("write 2 returns"), said
        assert "write 2 released after step 3" in said
        if rank == 0:  # rank 0 commits it at the end of step 4, after its row, before checkpoint-4 begins (rank 1
            assert "step 4 done, []" in said  # may list the folder before or after: nothing orders them there)
        assert "step 5 done, ['checkpoint-2']" in said and "write 4 returns" not in said
    killed = folder / "held-as-killed"
    assert sorted(p.name for p in killed.glob("checkpoint-*")) == ["checkpoint-2"]
    (temporary,) = killed.glob(".checkpoint-4-*")  # what the kill left
    assert "checkpoint-4" not in output_folder.read_record(killed)["checkpoints"]
    assert whole(killed / "checkpoint-2")["step"] == 2


def test_a_resume_from_a_background_checkpoint_is_bit_for_bit_the_run(runs):
    """The killed run's step 3 changed the weights and AdamW's state while checkpoint-2 was being written; its write
    holds them as they were after step 2 (they were copied into CPU memory before step 3): resumed from it, steps 3
    and 4 give the killed run's metrics bit for bit. The resumed run takes checkpoint-2, not the half-written
    checkpoint-4, and removes the temporary the kill left."""
    folder, _ = runs
    killed = read_metrics(folder / "held-as-killed")
    assert [row["step"] for row in killed if row["split"] == "train"] == [1, 2, 3, 4]
    assert read_metrics(folder / "held") == killed  # resumed at step 3, stopped after step 4 (below)
    assert f"resuming from {folder / 'held/checkpoint-2'} at step 3" in (folder / "resumed-0.out").read_text()
    assert not list((folder / "held").glob(".checkpoint-*"))


def test_a_failed_background_write_stops_in_one_line_keeping_the_last(runs):
    """Rank 1's write of checkpoint-3 fails (a full disk) while step 4 runs: every rank stops at the end of step 4,
    before another checkpoint; rank 0 says it in one line naming the checkpoint; checkpoint-2 is whole and the one to
    resume from, and nothing of checkpoint-3 is left."""
    folder, results = runs
    output_dir = folder / "held"
    (rank_0, _), (rank_1, _) = results["resumed"]
    assert rank_0 == (
        f"error: could not write checkpoint-3 ([Errno 28] No space left on device); the last checkpoint, "
        f"{output_dir / 'checkpoint-2'}, is intact"
    )
    assert rank_1 == 1  # rank 0 alone says why
    assert "Traceback" not in (folder / "resumed-0.out").read_text() + (folder / "resumed-1.out").read_text()
    assert sorted(p.name for p in output_dir.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]
    assert whole(output_dir / "checkpoint-2")["step"] == 2
    assert checkpoints.latest_checkpoint(output_dir)[0] == output_dir / "checkpoint-2"


def test_a_signal_while_a_checkpoint_is_written_leaves_both_whole(runs):
    """A SIGTERM to rank 1 at step 3, while checkpoint-2 is still being written: every rank ends after step 4 with the
    status of the signal, once checkpoint-2 is finished and the stop's checkpoint-4 written; both are whole."""
    folder, results = runs
    output_dir = folder / "signalled"
    assert [status for status, _ in results["signalled"]] == [128 + signal.SIGTERM] * 2
    said = results["signalled"][1][1]
    assert said.index("SIGTERM at step 3") < said.index("write 2 returns"), said
    assert (
        "stopped by signal 15 (SIGTERM) after step 4; checkpoint written: "
        f"torchrun --nproc_per_node 2 train.py --resume {output_dir} continues the run"
        in (folder / "signalled-0.out").read_text()
    )
    assert sorted(p.name for p in output_dir.iterdir() if "checkpoint" in p.name) == ["checkpoint-2", "checkpoint-4"]
    assert [whole(output_dir / f"checkpoint-{step}")["step"] for step in (2, 4)] == [2, 4]
