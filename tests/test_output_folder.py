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
from tests.helpers import read_metrics, run_expecting_error
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
