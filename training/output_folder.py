"""The output folder of a run: checked, locked, and changed only in what the project wrote itself.

The rule: a run replaces only its own files, and a file is its own only if it is the file it wrote. The folder's
record (OURS, .train.files) lists each file the project wrote there with its size and digest (`proof`), added
before the file is moved into place; a file of that name whose bytes are not those is the user's, whatever the
record's names say (a stale record, after `rm -rf out/*`, hands over nothing). metrics.jsonl, which only grows, is
proven by its first bytes. Its checkpoints are the folders named exactly checkpoint-STEP that hold its
trainer_state.pt; the record keeps the proof of each of their files too, so that a checkpoint whose removal a kill
stopped is known and finished off. Pruning, --overwrite and --resume act on these alone: anything else a user
put in the folder, or in a checkpoint folder, stays as it was. Files appear whole (written beside, then renamed);
what a killed run leaves is removed by the next run in the folder. A checkpoint keeps a copy of the record, so a
folder copied without it (cp -r out/* new/) still resumes.
"""

import contextlib
import hashlib
import json
import os
import pathlib
import re
import shutil
import stat
import sys
import tempfile

import torch
import torch.distributed as dist

from training.errors import ReportedError, note

LOCK = ".train.lock"  # held (flock) while a run writes to the folder
OURS = ".train.files"  # the record: what the project wrote in the folder, each file with its proof (JSON)
RUN_FILES = ("metrics.jsonl", "summary.json", "curves.png", "criterion.png")
COMPARE_FILES = ("compare.png", "comparison.json")
FRONTIER_FILES = ("frontier.json", "frontier.png", "comparison.json")
APPENDED = ("metrics.jsonl",)  # files a run appends to: proven by their first bytes
# What a run reads: a folder holding one of them is never its output folder.
INPUTS = ("model", "model_base", "ref_model", "dataset", "gold_reward")
# Temporaries of ours, by name: what a killed run leaves behind, removed by the next run in the folder.
TEMPORARY = re.compile(
    r"\.saving-\w{8}|\.checkpoint-[0-9]+-\w{8}|\.(metrics\.jsonl|summary\.json|curves\.png|criterion\.png|"
    r"compare\.png|comparison\.json|frontier\.json|frontier\.png|train\.files)\.\w{8}"
)
# The names of a model's files that save_pretrained writes (besides the tokenizer's), and of a peft adapter's
# (its model card README.md among them).
MODEL_FILES = re.compile(
    r"config\.json|generation_config\.json|model\.safetensors(\.index\.json)?|"
    r"model-[0-9]+-of-[0-9]+\.safetensors"
)
ADAPTER_FILES = re.compile(r"adapter_config\.json|adapter_model\.(safetensors|bin)|README\.md")
# What a checkpoint folder of ours holds: the names its removal takes when the record has no proofs of them.
CHECKPOINT_FILES = re.compile(
    rf"trainer_state\.pt|__[0-9]+_[0-9]+\.distcp|\.metadata|{MODEL_FILES.pattern}|{ADAPTER_FILES.pattern}"
)
WHOLE, SAMPLE = 64 * 2**20, 4096  # a proof hashes files up to WHOLE bytes whole; larger ones, in samples


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


# ----------------------------------------------------------------------------------------------------
# The record: each file the project wrote in a folder, with its proof


def proof(path, length=None):
    """[size, digest] of the first `length` bytes of a file (all of it by default): the sha256 of those bytes up to
    WHOLE bytes; of a larger file (a model's weights), of SAMPLE bytes at 256 evenly spaced places and its last
    SAMPLE, a few milliseconds at any size. None when the file holds fewer bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size if length is None else length
        if size <= WHOLE:
            data = file.read(size)
            if len(data) != size:
                return None
            digest.update(data)
        else:
            for offset in [size * i // 256 for i in range(256)] + [size - SAMPLE]:
                file.seek(offset)
                digest.update(file.read(min(SAMPLE, size - offset)))
    return [size, digest.hexdigest()]


def proof_of_bytes(content):
    """proof() of a file that would hold exactly `content` (up to WHOLE bytes)."""
    return [len(content), hashlib.sha256(content).hexdigest()]


def read_record(folder):
    """The record of what the project wrote in folder, {"files": {name: [proof, ...]}, "checkpoints": {name: {file:
    proof}}}; None when the folder has none. A record of an older train.py (names alone) or one that does not parse
    proves nothing ("names only": True). A record that is a link or a folder is refused: it is never followed."""
    path = pathlib.Path(folder) / OURS
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError as error:
        raise ReportedError(f"{path}: cannot be read ({error.strerror})") from None
    if not stat.S_ISREG(mode):
        raise ReportedError(
            f"{path} is a {'link' if stat.S_ISLNK(mode) else 'folder'}, not the record of the files this project "
            f"wrote there (a file); nothing was touched. Move it away, or choose another --output-dir"
        )
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        saved = None
    if not isinstance(saved, dict):
        return {"files": {}, "checkpoints": {}, "names only": True}
    return _checked_record(saved)


def _checked_record(saved):
    """The entries of a record as read (from the folder, or from a checkpoint's copy) that are well formed: names of
    files in the folder itself, proofs of two numbers, checkpoints named checkpoint-STEP."""
    files, checkpoints = saved.get("files"), saved.get("checkpoints")
    return {
        "files": {
            name: [p for p in proofs if _is_proof(p)]
            for name, proofs in (files if isinstance(files, dict) else {}).items()
            if _is_name(name) and isinstance(proofs, list)
        },
        "checkpoints": {
            name: {file: p for file, p in manifest.items() if _is_name(file) and _is_proof(p)}
            for name, manifest in (checkpoints if isinstance(checkpoints, dict) else {}).items()
            if isinstance(name, str) and re.fullmatch(r"checkpoint-[0-9]+", name) and isinstance(manifest, dict)
        },
    }


def _is_name(name):
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\0" not in name


def _is_proof(value):
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], int)
        and value[0] >= 0
        and isinstance(value[1], str)
    )


def _write_record(folder, record):
    """The record, written beside and renamed: it is the old one or the whole new one."""
    path = pathlib.Path(folder) / OURS
    content = "".join(  # JSON, a line per file and per checkpoint
        [
            '{"files": {\n',
            ",\n".join(f" {json.dumps(name)}: {json.dumps(proofs)}" for name, proofs in record["files"].items()),
            '\n}, "checkpoints": {\n',
            ",\n".join(f" {json.dumps(name)}: {json.dumps(files)}" for name, files in record["checkpoints"].items()),
            "\n}}\n",
        ]
    )
    with _naming(path):
        handle, temporary = tempfile.mkstemp(dir=folder, prefix=f"{OURS}.")
        try:
            with os.fdopen(handle, "w") as file:
                file.write(content)
            os.chmod(temporary, 0o644)
            os.replace(temporary, path)
        except BaseException:
            pathlib.Path(temporary).unlink(missing_ok=True)
            raise


def _proves(path, entry, appended=False):
    """The file at path (a file, not a link) is the one `entry` is the proof of; a file the run appends to, one
    that begins with it."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    size = entry[0]
    if not stat.S_ISREG(info.st_mode) or not (info.st_size == size or (appended and 0 < size < info.st_size)):
        return False
    try:
        return proof(path, size) == entry
    except OSError:
        return False


def _proven(folder, name, record):
    """The file `name` in folder is one the project wrote: a proof in the record is its."""
    return any(_proves(pathlib.Path(folder) / name, entry, name in APPENDED) for entry in record["files"].get(name, []))


def _known(folder, checkpoint=None):
    """(the record of folder, with the proofs of the copy a checkpoint (folder, state) keeps added; whether the
    folder has no record of its own; whether it has one of names alone)."""
    record = read_record(folder)
    missing, names_only = record is None, bool(record and record.get("names only"))
    record = record or {"files": {}, "checkpoints": {}}
    saved = checkpoint[1].get("record") if checkpoint else None
    if isinstance(saved, dict):
        saved = _checked_record(saved)
        for name, proofs in saved["files"].items():
            record["files"].setdefault(name, [])
            record["files"][name] += [p for p in proofs if p not in record["files"][name]]
        for name, files in saved["checkpoints"].items():
            record["checkpoints"].setdefault(name, files)
    return record, missing, names_only


def add_proofs(folder, proofs):
    """Before files are moved into folder, {name: proof} of each: the record keeps, for each name, the proof of the
    file there now (killed before the move, it is still ours) and the new one."""
    folder = pathlib.Path(folder)
    record = read_record(folder) or {"files": {}, "checkpoints": {}}
    for name, new in proofs.items():
        there = [e for e in record["files"].get(name, []) if _proves(folder / name, e, name in APPENDED)]
        record["files"][name] = there[:1] + [new]
    _write_record(folder, record)


def _not_ours(folder, name, missing, names_only):
    """Why the file `name` in folder is not taken for the project's, in words."""
    if names_only:
        return (
            f"--output-dir {folder} holds {name}, and its record of the files this project wrote there ({OURS}) "
            f"lists names alone (an older train.py wrote it), which does not prove {name} is the file it wrote"
        )
    if missing and our_checkpoints(folder):  # a run's folder, copied without its record
        return (
            f"--output-dir {folder} holds {name}, but the record of the files this project wrote there ({OURS}) is "
            f"missing, so {name} cannot be told from a file of yours; nothing was touched. Copy {OURS} back from "
            f"where the run was written (cp -r out/* skips it; cp -r out/. new/ copies it), or move {name} away"
        )
    return f"--output-dir {folder} holds {name}, which this project did not write"


def _claim_names(folder, names):
    """Before writing files of these names in folder: refuse if one is there and is not the project's, else list
    them in the record (their proofs come with the files, add_proofs)."""
    folder = pathlib.Path(folder)
    record, missing, names_only = _known(folder)
    for name in names:
        if os.path.lexists(folder / name) and not _proven(folder, name, record):
            why = _not_ours(folder, name, missing, names_only)
            raise ReportedError(
                why
                if "nothing was touched" in why
                else f"{why}; it was not replaced. Move it, or choose another --output-dir"
            )
    new = [name for name in names if name not in record["files"]]
    if new or missing or names_only:
        for name in new:
            record["files"][name] = []
        _write_record(folder, record)


@contextlib.contextmanager
def _naming(path):
    """A write that fails (a full disk) stops the run with one line naming the file."""
    try:
        yield
    except _write_errors() as error:
        raise ReportedError(f"could not write {path} ({_first_line(error)})") from None


def check_only_ours_replaced(output_dir, will_write, checkpoint=None):
    """Refuse, before training, a run that would replace a file or take a name it did not write: anything in
    the folder whose name will_write(name) says the run writes (its model, adapter, tokenizer, metrics and
    figures, checkpoint-STEP) and that is not the project's (a file of yours, a link: never followed). Resuming,
    the copy of the record the checkpoint (folder, state) keeps proves files too."""
    output_dir = pathlib.Path(output_dir)
    if not output_dir.is_dir():
        return
    record, missing, names_only = _known(output_dir, checkpoint)
    checkpoints = {path.name for path in our_checkpoints(output_dir) + _half_removed(output_dir, record)}
    for path in sorted(output_dir.iterdir()):
        if will_write(path.name) and path.name not in checkpoints and not _proven(output_dir, path.name, record):
            why = _not_ours(output_dir, path.name, missing, names_only)
            raise ReportedError(
                why
                if "nothing was touched" in why
                else f"{why} and its run would replace; nothing was touched. Move it, or choose another --output-dir"
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
        if os.path.islink(output_dir / LOCK):
            raise ReportedError(
                f"--output-dir {output_dir}: its {LOCK} is a link, which is never followed; move it away"
            )
        # O_NOFOLLOW: a link put there after the check is not followed either
        handle = os.fdopen(os.open(output_dir / LOCK, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o644))
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


def prepare_output_dir(output_dir, resumed_step, checkpoint=None):
    """Resuming: forget the metrics written after the checkpoint. Otherwise (--overwrite): remove the
    previous run's own files and checkpoints. Either way, finish what a killed run left half done: its
    temporaries, a checkpoint whose removal it began. Called once the data and models are known to be good.
    checkpoint: (folder, state) resumed from, whose copy of the record restores a record that is missing."""
    output_dir = pathlib.Path(output_dir)
    for path in output_dir.iterdir():  # what a killed run of ours left: ours by name and place
        if TEMPORARY.fullmatch(path.name) and not path.is_symlink():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    record, missing, names_only = _known(output_dir, checkpoint)
    if checkpoint and (missing or names_only):  # the proofs of the files the checkpoint's copy proves
        _write_record(output_dir, record)
    for half in _half_removed(output_dir, record):
        remove_checkpoint(half)
    if resumed_step is not None:
        rows = [row for row in read_metrics(output_dir) if row["step"] <= resumed_step]
        write_atomically(output_dir / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
        return
    for checkpoint_folder in our_checkpoints(output_dir):
        remove_checkpoint(checkpoint_folder)
    for name in record["files"]:
        if _proven(output_dir, name, record):
            (output_dir / name).unlink()
    (output_dir / OURS).unlink(missing_ok=True)


_appended = {}  # metrics.jsonl: (inode, size) after this process's last append (the lock keeps others out)


def append_metrics(output_dir, row):
    """One row of metrics.jsonl, in one write() of a whole line: a crash cannot leave half of it. A file begun here
    is proven by its first line, recorded before it is written."""
    path = pathlib.Path(output_dir) / "metrics.jsonl"
    line = (json.dumps(row) + "\n").encode()
    there = os.lstat(path) if os.path.lexists(path) else None
    size = there.st_size if there else 0
    if not there or _appended.get(path) != (there.st_ino, size) or not size:
        _claim_names(output_dir, ["metrics.jsonl"])
        if not size:
            add_proofs(output_dir, {"metrics.jsonl": proof_of_bytes(line)})
    with _naming(path), open(path, "ab") as metrics_file:
        metrics_file.write(line)
        _appended[path] = (os.fstat(metrics_file.fileno()).st_ino, size + len(line))


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
    leaves nothing behind; both stop the run with one line naming the file (ReportedError). The new file's proof
    is recorded before it is moved in."""
    path = pathlib.Path(path)
    _claim_names(path.parent, [path.name])
    with _naming(path):
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(handle, "wb" if isinstance(content, bytes) else "w") as file:
                file.write(content)
            os.chmod(temporary, 0o644)
            add_proofs(path.parent, {path.name: proof(temporary)})
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


def manifest(folder):
    """{file: proof} of every file in a checkpoint folder: what the record keeps of it."""
    return {path.name: proof(path) for path in sorted(pathlib.Path(folder).iterdir()) if path.is_file()}


def record_checkpoint(output_dir, name, files):
    """Before checkpoint `name` appears in output_dir: the proofs of its files (manifest) in the record."""
    record = read_record(output_dir) or {"files": {}, "checkpoints": {}}
    record["checkpoints"][name] = files
    _write_record(output_dir, record)


def _half_removed(output_dir, record):
    """checkpoint-STEP folders whose removal a kill stopped after their trainer_state.pt went: every file left in
    them is one the record proves was the checkpoint's."""
    found = []
    for name, files in record["checkpoints"].items():
        path = pathlib.Path(output_dir) / name
        if path.is_dir() and not path.is_symlink() and not (path / "trainer_state.pt").exists():
            if all(entry.name in files and _proves(entry, files[entry.name]) for entry in path.iterdir()):
                found.append(path)
    return found


def remove_checkpoint(checkpoint):
    """Remove a checkpoint folder of ours, so that a kill at any moment leaves a checkpoint or a temporary (which the
    next run removes), never a folder later runs cannot tell from yours: renamed to a temporary, then removed. A
    file in it of a name the checkpoint did not write (the record's list of its files, else the names a checkpoint
    has) stays, with the folder; its own files go, trainer_state.pt last."""
    checkpoint = pathlib.Path(checkpoint)
    record = read_record(checkpoint.parent)
    files = (record or {"checkpoints": {}})["checkpoints"].get(checkpoint.name)

    def its_own(entry):  # by name: a file of its own torn or damaged is still its own
        if entry.is_symlink() or not entry.is_file():
            return False
        return entry.name in files if files else bool(CHECKPOINT_FILES.fullmatch(entry.name))

    entries = list(checkpoint.iterdir())
    theirs = sorted(entry.name for entry in entries if not its_own(entry))
    if not theirs:
        doomed = pathlib.Path(tempfile.mkdtemp(prefix=f".{checkpoint.name}-", dir=checkpoint.parent))
        os.replace(checkpoint, doomed)  # onto the empty folder: one rename
        shutil.rmtree(doomed)
    else:
        for entry in sorted((e for e in entries if its_own(e)), key=lambda e: e.name == "trainer_state.pt"):
            entry.unlink()
        note(
            f"{checkpoint} holds {', '.join(theirs)}, which this project did not write: left there, and the "
            "folder with it"
        )
    if record is not None and checkpoint.name in record["checkpoints"]:
        del record["checkpoints"][checkpoint.name]
        _write_record(checkpoint.parent, record)
