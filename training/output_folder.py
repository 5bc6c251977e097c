"""The output folder of a run: checked, locked, and changed only in what the project wrote itself.

The rule: a run replaces only its own files. Its checkpoints are the folders named exactly checkpoint-STEP that
hold its trainer_state.pt; its files are those listed in the folder's OURS file, where each name is added before
the file is first written (write_atomically and checkpoints.save_pretrained_atomically refuse to replace any
other). Pruning, --overwrite and --resume act on those alone: anything else a user put in the folder stays as it
was, whatever its name. Files appear whole (written beside, then renamed); what a killed run leaves is removed by
the next run in the folder.
"""

import contextlib
import json
import os
import pathlib
import re
import shutil
import sys
import tempfile

import torch
import torch.distributed as dist

from training.errors import ReportedError

LOCK = ".train.lock"  # held (flock) while a run writes to the folder
OURS = ".train.files"  # the names of the files the project wrote there, one a line
RUN_FILES = ("metrics.jsonl", "summary.json", "curves.png", "criterion.png")
COMPARE_FILES, FRONTIER_FILES = ("compare.png",), ("frontier.json", "frontier.png")
# What a run reads: a folder holding one of them is never its output folder.
INPUTS = ("model", "model_base", "ref_model", "dataset", "gold_reward")
# Temporaries of ours, by name: what a killed run leaves behind, removed by the next run in the folder.
TEMPORARY = re.compile(
    r"\.saving-\w{8}|\.checkpoint-[0-9]+-\w{8}|\.(metrics\.jsonl|summary\.json|curves\.png|"
    r"compare\.png|frontier\.json|frontier\.png)\.\w{8}"
)
# The names of a model's files that save_pretrained writes (besides the tokenizer's), and of a peft adapter's
# (its model card README.md among them).
MODEL_FILES = re.compile(
    r"config\.json|generation_config\.json|model\.safetensors(\.index\.json)?|"
    r"model-[0-9]+-of-[0-9]+\.safetensors"
)
ADAPTER_FILES = re.compile(r"adapter_config\.json|adapter_model\.(safetensors|bin)|README\.md")


# ----------------------------------------------------------------------------------------------------
# The output folder: checked, locked, and changed only once the run is known to be good


def claim_output_dir(output_dir, args):
    """Check the output folder and lock it for this run, before anything is loaded; returns the lock.

    A folder that holds something is refused, untouched, unless told to replace this script's run in it
    (--overwrite) or to continue it (--resume). The lock is the operating system's (flock): it goes with
    the process however the process ends, and a second run into the folder stops at once.
    """
    output_dir = pathlib.Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ReportedError(f"--output-dir {output_dir} is a file, not a folder")
    check_not_an_input(output_dir, args)
    lock = _lock(output_dir) if (output_dir / LOCK).exists() else None  # a run of ours: is it still going?
    if (
        not (args.overwrite or args.resume)
        and output_dir.exists()
        and any(p.name != LOCK for p in output_dir.iterdir())
    ):
        if lock:
            lock.close()
        raise ReportedError(
            f"--output-dir {output_dir} is not empty; nothing in it was touched. Pass --overwrite "
            f"to replace its run, --resume {output_dir} to continue it, or another --output-dir"
        )
    return lock or _lock(output_dir)


def check_not_an_input(output_dir, args):
    """A folder that holds what the run reads (the model, the reference, the data, the gold reward), or lies
    inside the dataset's folder, is never its output folder, with or without --overwrite."""
    resolved = output_dir.resolve()
    for name in INPUTS:
        value = getattr(args, name, None)
        path = pathlib.Path(value).expanduser().resolve() if value else None
        if path is None or not path.exists():  # a Hub id, or nothing
            continue
        if path == resolved or resolved in path.parents or (path.is_dir() and path in resolved.parents):
            relation = "is" if path == resolved else "holds" if resolved in path.parents else "is inside"
            raise ReportedError(
                f"--output-dir {output_dir} {relation} --{name.replace('_', '-')} {value}: a run never "
                f"writes where it reads; choose another --output-dir"
            )


def ours(folder):
    """The names of the files and checkpoint folders this project wrote in folder."""
    folder = pathlib.Path(folder)
    try:
        names = set((folder / OURS).read_text().splitlines())
    except OSError:
        names = set()
    return {n for n in names if n and n == pathlib.Path(n).name and n[:1] != "."} | {
        p.name for p in our_checkpoints(folder)
    }


def _claim_names(folder, names):
    """Before writing files of these names in folder: refuse if one is there and not ours, else list them as ours."""
    folder, known = pathlib.Path(folder), ours(folder)
    for name in names:
        if name not in known and (os.path.lexists(folder / name)):
            raise ReportedError(
                f"{folder} holds {name}, which this project did not write; it was not replaced. "
                f"Move it, or choose another --output-dir"
            )
    new = [name for name in names if name not in known]
    if new:
        with _naming(folder / OURS), open(folder / OURS, "a") as listing:
            listing.write("".join(name + "\n" for name in new))


@contextlib.contextmanager
def _naming(path):
    """A write that fails (a full disk) stops the run with one line naming the file."""
    try:
        yield
    except _write_errors() as error:
        raise ReportedError(f"could not write {path} ({_first_line(error)})") from None


def check_only_ours_replaced(output_dir, will_write):
    """Refuse, before training, a run that would replace a file or take a name it did not write: anything in
    the folder whose name will_write(name) says the run writes (its model, adapter, tokenizer, metrics and
    figures, checkpoint-STEP) and that is not ours (a file of yours, a link: never followed)."""
    output_dir = pathlib.Path(output_dir)
    if not output_dir.is_dir():
        return
    known = ours(output_dir)
    for path in sorted(output_dir.iterdir()):
        if will_write(path.name) and path.name not in known:
            raise ReportedError(
                f"--output-dir {output_dir} holds {path.name}, which this project did not write and its run "
                f"would replace; nothing was touched. Move it, or choose another --output-dir"
            )


def run_writes(tokenizer, lora):
    """will_write for check_only_ours_replaced: the names a training run may write in its output folder."""
    with tempfile.TemporaryDirectory() as names_of:  # which files the tokenizer writes
        tokenizer.save_pretrained(names_of)
        tokenizer_files = set(os.listdir(names_of))
    model_files = ADAPTER_FILES if lora else MODEL_FILES
    return lambda name: bool(
        name in RUN_FILES
        or name in tokenizer_files
        or model_files.fullmatch(name)
        or re.fullmatch(r"checkpoint-[0-9]+", name)
    )


@contextlib.contextmanager
def claim_on_rank_zero(output_dir, args, rank, world_size, device):
    """claim_output_dir on rank 0, whose verdict every rank learns: if it refuses, the others exit quietly."""
    refusal, lock = None, contextlib.nullcontext()
    if rank == 0:
        try:
            lock = claim_output_dir(output_dir, args)
        except ReportedError as error:
            refusal = error
    if world_size > 1:
        refused = torch.tensor([refusal is not None], dtype=torch.float32, device=device)
        dist.broadcast(refused, src=0)
        if refused.item() and rank != 0:
            sys.exit(1)  # rank 0 says why, once
    if refusal:
        raise refusal
    with lock:
        yield


def _lock(output_dir):
    import fcntl

    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        handle = open(output_dir / LOCK, "a")
    except OSError as error:
        raise ReportedError(f"--output-dir {output_dir}: cannot write there ({error.strerror})") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ReportedError(
            f"--output-dir {output_dir} is in use by another run (it holds {LOCK}); nothing was touched"
        ) from None
    return handle


def prepare_output_dir(output_dir, resumed_step):
    """Resuming: forget the metrics written after the checkpoint. Otherwise (--overwrite): remove the
    previous run's own files and checkpoints. Called once the data and models are known to be good."""
    output_dir = pathlib.Path(output_dir)
    for path in output_dir.iterdir():  # what a killed run of ours left: ours by name and place
        if TEMPORARY.fullmatch(path.name) and not path.is_symlink():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    if resumed_step is not None:
        rows = [row for row in read_metrics(output_dir) if row["step"] <= resumed_step]
        write_atomically(output_dir / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
        return
    for checkpoint in our_checkpoints(output_dir):
        shutil.rmtree(checkpoint)
    for name in ours(output_dir):  # files only: no folder is listed
        (output_dir / name).unlink(missing_ok=True)
    (output_dir / OURS).unlink(missing_ok=True)


def append_metrics(output_dir, row):
    """One row of metrics.jsonl, in one write() of a whole line: a crash cannot leave half of it."""
    _claim_names(output_dir, ["metrics.jsonl"])
    path = pathlib.Path(output_dir) / "metrics.jsonl"
    with _naming(path), open(path, "a") as metrics_file:
        metrics_file.write(json.dumps(row) + "\n")


def read_metrics(output_dir):
    """The rows of metrics.jsonl; a line a crash tore in half is left out."""
    path = pathlib.Path(output_dir) / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [row for row in rows if isinstance(row, dict) and isinstance(row.get("step"), int)]


def write_atomically(path, content):
    """Write to a temporary file beside it, then rename: the file is either the old one or the whole new one.
    A file of that name that the project did not write is never replaced; a write that fails (a full disk)
    leaves nothing behind; both stop the run with one line naming the file (ReportedError)."""
    path = pathlib.Path(path)
    _claim_names(path.parent, [path.name])
    with _naming(path):
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(handle, "wb" if isinstance(content, bytes) else "w") as file:
                file.write(content)
            os.chmod(temporary, 0o644)
            os.replace(temporary, path)
        except BaseException:
            pathlib.Path(temporary).unlink(missing_ok=True)
            raise


# What a write that fails raises: OSError from Python, RuntimeError from torch.save ("[enforce fail at
# inline_container.cc] ... file write failed"), SafetensorError from safetensors ("... os error 28").
def _write_errors():
    from safetensors import SafetensorError

    return OSError, RuntimeError, SafetensorError


def _first_line(error):
    text = (str(error).splitlines() or [""])[0][:200]
    return text if isinstance(error, OSError) else f"{type(error).__name__}: {text}"


def our_checkpoints(output_dir):
    """The checkpoint-STEP folders this script wrote, oldest first."""
    found = []
    for path in pathlib.Path(output_dir).glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-([0-9]+)", path.name)
        if match and not path.is_symlink() and (path / "trainer_state.pt").is_file():
            found.append((int(match[1]), path))
    return [path for _, path in sorted(found)]
