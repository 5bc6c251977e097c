"""The output folder's safety: only the project's own files are written, replaced or pruned; a folder the run reads
is never its output; a full disk leaves the last checkpoint intact and nothing half-written."""

import json
import pathlib
import signal

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import compare
import train
from tests.helpers import QUICK, copy_of, read_metrics, run_expecting_error, train_steps
from training import checkpoints, errors, output_folder
from training.arguments import TINY_MODEL

# ----------------------------------------------------------------------------------------------------
# Whose files the run writes, replaces and prunes


def test_a_non_empty_output_dir_is_refused_and_left_untouched(tmp_path, small_data):
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "notes.txt").write_text("mine")
    error = run_expecting_error(["--output-dir", str(output_dir), "--max-steps", "1", *small_data])
    assert "is not empty" in error and "--overwrite" in error
    assert [p.name for p in output_dir.iterdir()] == ["notes.txt"] and (output_dir / "notes.txt").read_text() == "mine"
    train.main(["--output-dir", str(output_dir), "--max-steps", "1", "--overwrite", *small_data])
    assert (output_dir / "summary.json").exists() and (output_dir / "notes.txt").read_text() == "mine"


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


def test_a_file_or_checkpoint_the_project_did_not_write_is_never_replaced(tmp_path, small_data):
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
def test_overwrite_never_replaces_a_users_file_named_as_a_mode_writes(tmp_path, small_data, mode, flags, theirs):
    """--overwrite replaces the project's own files alone: a LoRA run's adapter and model card, a full run's
    metrics and figures, --compare's and --betas' figures, if they are the user's, stop the run untouched."""
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    for name in theirs:
        (output_dir / name).write_text(f"my {name}")
    for _ in theirs:  # one refusal for each of their files, which is then moved away
        error = run_expecting_error(
            ["--output-dir", str(output_dir), "--overwrite", "--max-steps", "1", *flags, *small_data],
            compare.main if mode in ("compare", "frontier") else train.main,
        )
        assert "which this project did not write" in error and "\n" not in error, error
        assert error.split(" holds ")[1].split(",")[0] in theirs
        (output_dir / error.split(" holds ")[1].split(",")[0]).rename(tmp_path / "moved")
        (tmp_path / "moved").unlink()
    if mode == "lora":  # the run's own files, README.md among them, are replaced by the next run
        overwrite = ["--output-dir", str(output_dir), "--overwrite", "--max-steps", "1", "--eval-every", "1000"]
        train.main([*overwrite, *flags, *small_data])
        (output_dir / "notes.txt").write_text("mine")
        train.main([*overwrite, *flags, *small_data])
        assert (output_dir / "README.md").exists() and (output_dir / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in output_dir.iterdir() if p.name in theirs and p.read_bytes().startswith(b"my ")) == []


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


# ----------------------------------------------------------------------------------------------------
# The record of the project's files (.train.files): stale, missing or odd; a checkpoint half removed


def test_a_stale_record_never_hands_over_a_users_files(tmp_path, small_data):
    """After rm -rf out/* (which leaves .train.files), a model or a README.md of the user's copied into out/ under the
    names the record lists is refused by --overwrite in one line and left as it was."""
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
    error = run_expecting_error([*arguments, *small_data])
    assert error.startswith(f"error: --output-dir {output_dir} holds config.json, which this project did not write")
    for name in theirs:
        (output_dir / name).unlink()
    (output_dir / "README.md").write_text("my notes")
    (output_dir / "metrics.jsonl").write_text('{"step": 0}\n')
    error = run_expecting_error([*arguments, "--lora-r", "4", *small_data])
    assert error.startswith(f"error: --output-dir {output_dir} holds README.md, which this project did not write")
    assert (output_dir / "README.md").read_text() == "my notes"
    (output_dir / "README.md").unlink()
    assert run_expecting_error([*arguments, *small_data]).startswith(
        f"error: --output-dir {output_dir} holds metrics.jsonl"
    )
    assert (output_dir / "metrics.jsonl").read_text() == '{"step": 0}\n'


def test_a_copy_without_the_record_resumes_or_is_refused_naming_it(stopped_run, tmp_path, capsys):
    """cp -r out/* new/ leaves .train.files behind: the copy of a stopped run resumes (its checkpoint keeps a copy of
    the record, which proves metrics.jsonl), saying what another --max-new-tokens changes, and the record is written
    again. A finished run's copy, whose model no checkpoint proves, is refused by --overwrite with a line that says
    the record is missing and what to do."""
    output_dir = copy_of(stopped_run, tmp_path, dot_files=False)
    train.main(["--resume", str(output_dir), "--max-new-tokens", "4"])
    printed = capsys.readouterr().out
    assert "note: --max-new-tokens 4, the run's 8: the gold reward and KL of samples from now on" in printed
    assert train_steps(output_dir) == [1, 2, 3] and (output_dir / ".train.files").is_file()
    (output_dir / ".train.files").unlink()
    error = run_expecting_error(["--output-dir", str(output_dir), "--overwrite", "--max-steps", "1", *QUICK])
    assert (
        "holds config.json, but the record of the files this project wrote there (.train.files) is missing, so "
        "config.json cannot be told from a file of yours; nothing was touched. Copy .train.files back" in error
    )


def test_a_checkpoint_half_removed_by_a_kill_is_finished_off_not_refused(stopped_run, tmp_path):
    """A kill -9 while a checkpoint was removed, after its trainer_state.pt went, left a folder that made resumes and
    overwrites refuse: the record's proofs of its files show it is the run's, and it is removed. A removal renames
    first: killed after the rename, what is left is a temporary the next run removes, as the record's own temporary."""
    output_dir = copy_of(stopped_run, tmp_path)
    (output_dir / "checkpoint-1/trainer_state.pt").unlink()  # where rmtree was killed
    train.main(["--resume", str(output_dir)])
    assert train_steps(output_dir) == [1, 2, 3] and not (output_dir / "checkpoint-1").exists()

    def killed(path, *args, **kwargs):
        raise KeyboardInterrupt  # the kill, after the rename

    with pytest.MonkeyPatch.context() as monkeypatch, pytest.raises(KeyboardInterrupt):
        monkeypatch.setattr(output_folder.shutil, "rmtree", killed)
        output_folder.remove_checkpoint(output_dir / "checkpoint-2")
    assert [p.name[:14] for p in output_dir.glob("*checkpoint-2*")] == [".checkpoint-2-"]
    (output_dir / ".train.files.k1ll3d00").write_text("{")  # the record's own temporary, as a kill leaves it
    output_folder.prepare_output_dir(output_dir, 3)
    assert not list(output_dir.glob("*checkpoint-2*")) and not (output_dir / ".train.files.k1ll3d00").exists()


def test_an_odd_record_is_never_followed_and_a_users_checkpoint_file_stays(stopped_run, tmp_path, small_data):
    """A .train.files that is a link to a dataset file, or a folder, is refused in one line and never written through,
    and so is a .train.lock that is a link; a record of names alone (an older train.py's) proves nothing; a folder's
    name in the record is not removed (no errno line); a file of the user's inside checkpoint-N/ stays, with the
    folder, when --overwrite removes the run."""
    output_dir, dataset = tmp_path / "out", tmp_path / "pairs.jsonl"
    output_dir.mkdir()
    dataset.write_text("the user's data\n")
    (output_dir / ".train.files").symlink_to(dataset)
    arguments = ["--output-dir", str(output_dir), "--overwrite", "--max-steps", "1", *small_data]
    assert run_expecting_error(arguments) == (
        f"error: {output_dir / '.train.files'} is a link, not the record of the files this project wrote there (a "
        "file); nothing was touched. Move it away, or choose another --output-dir"
    )
    assert dataset.read_text() == "the user's data\n"
    (output_dir / ".train.files").unlink()
    (output_dir / ".train.files").mkdir()
    assert "is a folder, not the record" in run_expecting_error(arguments)
    (output_dir / ".train.files").rmdir()
    (output_dir / ".train.lock").unlink()
    (output_dir / ".train.lock").symlink_to(dataset)
    assert run_expecting_error(arguments) == (
        f"error: --output-dir {output_dir}: its .train.lock is a link, which is never followed; move it away"
    )
    (output_dir / ".train.lock").unlink()
    (output_dir / ".train.files").write_text("config.json\n")  # an older train.py's record: names alone
    (output_dir / "config.json").write_text("{}")
    with pytest.raises(
        errors.ReportedError, match="lists names alone .an older train.py wrote it., which does not prove"
    ):
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


# ----------------------------------------------------------------------------------------------------
# A full disk


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


def test_a_full_disk_in_a_save_gives_one_line_and_leaves_nothing(tmp_path):
    """Real write failures of torch.save and safetensors (a file-size limit: EFBIG, as a full disk's ENOSPC)."""
    import resource

    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL)  # 344 KB of safetensors
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    limits, previous_handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (500_000, limits[1]))
        with pytest.raises(errors.ReportedError, match=r"^could not write checkpoint-1 \(RuntimeError: \[enforce fail"):
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
            errors.ReportedError,
            match=r"^could not save the model to .*\(SafetensorError: .*"
            r"the checkpoints are intact$",
        ):
            checkpoints.save_pretrained_atomically(tmp_path, model, tokenizer)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous_handler)
    assert list(tmp_path.iterdir()) == []  # no temporary left


def test_a_full_disk_names_the_file_and_sharded_failures_print_no_objects(tmp_path, monkeypatch, capsys):
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
