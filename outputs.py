"""What train.py writes and shows: a checked and locked output folder, files written whole, checkpoints a run
resumes from bit for bit, and the figures and tables of a run, a comparison and a reward–KL frontier.

The rule all of it follows: the project changes only what it wrote itself. Its checkpoints are the folders
named exactly checkpoint-STEP that hold its trainer_state.pt; its files are those listed in the folder's OURS
file, where each name is added before the file is first written (write_atomically and
save_pretrained_atomically refuse to replace any other). Pruning, --overwrite and --resume act on those
alone: anything else a user put in the folder stays as it was, whatever its name.
"""

import argparse
import contextlib
import json
import os
import pathlib
import re
import shutil
import signal
import sys
import tempfile
import time

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

import epsdpo
import models
from data import ReportedError, collate

LOCK = ".train.lock"                                        # held (flock) while a run writes to the folder
OURS = ".train.files"                                       # the names of the files the project wrote there, one a line
RUN_FILES = ("metrics.jsonl", "summary.json", "curves.png", "criterion.png")
COMPARE_FILES, FRONTIER_FILES = ("compare.png",), ("frontier.json", "frontier.png")
# What a resumed run may change (--resume DIR --max-steps 500); any other flag that differs is refused.
RESUMABLE = {"max_steps", "eval_every", "save_every", "keep_checkpoints", "eval_batch_size", "max_new_tokens", "device",
             "criterion_pairs"}
# What runs code: never taken from a checkpoint, only from the command line that resumes it.
RUNS_CODE = {"trust_remote_code", "gold_reward"}
# What a run reads: a folder holding one of them is never its output folder.
INPUTS = ("model", "ref_model", "dataset", "gold_reward")
# Temporaries of ours, by name: what a killed run leaves behind, removed by the next run in the folder.
TEMPORARY = re.compile(r"\.saving-\w{8}|\.checkpoint-[0-9]+-\w{8}|\.(metrics\.jsonl|summary\.json|curves\.png|"
                       r"compare\.png|frontier\.json|frontier\.png)\.\w{8}")
# The names of a model's files that save_pretrained writes (besides the tokenizer's), and of a peft adapter's
# (its model card README.md among them).
MODEL_FILES = re.compile(r"config\.json|generation_config\.json|model\.safetensors(\.index\.json)?|"
                         r"model-[0-9]+-of-[0-9]+\.safetensors")
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
    lock = _lock(output_dir) if (output_dir / LOCK).exists() else None   # a run of ours: is it still going?
    if not (args.overwrite or args.resume) and output_dir.exists() and any(p.name != LOCK for p in output_dir.iterdir()):
        if lock:
            lock.close()
        raise ReportedError(f"--output-dir {output_dir} is not empty; nothing in it was touched. Pass --overwrite "
                            f"to replace its run, --resume {output_dir} to continue it, or another --output-dir")
    return lock or _lock(output_dir)


def check_not_an_input(output_dir, args):
    """A folder that holds what the run reads (the model, the reference, the data, the gold reward), or lies
    inside the dataset's folder, is never its output folder, with or without --overwrite."""
    resolved = output_dir.resolve()
    for name in INPUTS:
        value = getattr(args, name, None)
        path = pathlib.Path(value).expanduser().resolve() if value else None
        if path is None or not path.exists():                          # a Hub id, or nothing
            continue
        if path == resolved or resolved in path.parents or (path.is_dir() and path in resolved.parents):
            relation = "is" if path == resolved else "holds" if resolved in path.parents else "is inside"
            raise ReportedError(f"--output-dir {output_dir} {relation} --{name.replace('_', '-')} {value}: a run never "
                                f"writes where it reads; choose another --output-dir")


def ours(folder):
    """The names of the files and checkpoint folders this project wrote in folder."""
    folder = pathlib.Path(folder)
    try:
        names = set((folder / OURS).read_text().splitlines())
    except OSError:
        names = set()
    return {n for n in names if n and n == pathlib.Path(n).name and n[:1] != "."} | {p.name for p in our_checkpoints(folder)}


def _claim_names(folder, names):
    """Before writing files of these names in folder: refuse if one is there and not ours, else list them as ours."""
    folder, known = pathlib.Path(folder), ours(folder)
    for name in names:
        if name not in known and (os.path.lexists(folder / name)):
            raise ReportedError(f"{folder} holds {name}, which this project did not write; it was not replaced. "
                                f"Move it, or choose another --output-dir")
    new = [name for name in names if name not in known]
    if new:
        with open(folder / OURS, "a") as listing:
            listing.write("".join(name + "\n" for name in new))


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
            raise ReportedError(f"--output-dir {output_dir} holds {path.name}, which this project did not write and its run "
                                f"would replace; nothing was touched. Move it, or choose another --output-dir")


def run_writes(tokenizer, lora):
    """will_write for check_only_ours_replaced: the names a training run may write in its output folder."""
    with tempfile.TemporaryDirectory() as names_of:                    # which files the tokenizer writes
        tokenizer.save_pretrained(names_of)
        tokenizer_files = set(os.listdir(names_of))
    model_files = ADAPTER_FILES if lora else MODEL_FILES
    return lambda name: bool(name in RUN_FILES or name in tokenizer_files or model_files.fullmatch(name)
                             or re.fullmatch(r"checkpoint-[0-9]+", name))


def _saved_files(output_dir):
    """The files the model's save_pretrained wrote, as summary.json lists them."""
    try:
        saved = json.loads((pathlib.Path(output_dir) / "summary.json").read_text()).get("saved", [])
    except (OSError, ValueError, AttributeError):
        saved = []
    return [n for n in saved if isinstance(n, str) and n == pathlib.Path(n).name and n[:1] != "."]


def run_is_saved(output_dir, step):
    """The run in output_dir ended at `step` and its final save completed: summary.json says so, and every
    file it lists is there (summary.json is written just before the model's files are moved in)."""
    try:
        steps = json.loads((pathlib.Path(output_dir) / "summary.json").read_text()).get("steps")
    except (OSError, ValueError, AttributeError):
        return False
    saved = _saved_files(output_dir)
    return steps == step and bool(saved) and all((pathlib.Path(output_dir) / name).is_file() for name in saved)


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
            sys.exit(1)                                                 # rank 0 says why, once
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
        raise ReportedError(f"--output-dir {output_dir} is in use by another run (it holds {LOCK}); "
                            f"nothing was touched") from None
    return handle


def prepare_output_dir(output_dir, resumed_step):
    """Resuming: forget the metrics written after the checkpoint. Otherwise (--overwrite): remove the
    previous run's own files and checkpoints. Called once the data and models are known to be good."""
    output_dir = pathlib.Path(output_dir)
    for path in output_dir.iterdir():                  # what a killed run of ours left: ours by name and place
        if TEMPORARY.fullmatch(path.name) and not path.is_symlink():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    if resumed_step is not None:
        rows = [row for row in read_metrics(output_dir) if row["step"] <= resumed_step]
        write_atomically(output_dir / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in rows))
        return
    for checkpoint in our_checkpoints(output_dir):
        shutil.rmtree(checkpoint)
    for name in ours(output_dir):                                      # files only: no folder is listed
        (output_dir / name).unlink(missing_ok=True)
    (output_dir / OURS).unlink(missing_ok=True)


def append_metrics(output_dir, row):
    """One row of metrics.jsonl, in one write() of a whole line: a crash cannot leave half of it."""
    _claim_names(output_dir, ["metrics.jsonl"])
    with open(pathlib.Path(output_dir) / "metrics.jsonl", "a") as metrics_file:
        metrics_file.write(json.dumps(row) + "\n")


def read_metrics(output_dir):
    """The rows of metrics.jsonl; a line a crash tore in half is left out."""
    path = pathlib.Path(output_dir) / "metrics.jsonl"
    rows = []
    for line in (path.read_text().splitlines() if path.exists() else []):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [row for row in rows if isinstance(row, dict) and isinstance(row.get("step"), int)]


def write_atomically(path, content):
    """Write to a temporary file beside it, then rename: the file is either the old one or the whole new one.
    A file of that name that the project did not write is never replaced (ReportedError)."""
    path = pathlib.Path(path)
    _claim_names(path.parent, [path.name])
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


def save_model(model, folder, state_dict=None):
    """save_pretrained: a model's weights (a sharded one's as gathered_state_dict gave them), or a peft model's
    adapter. The adapter leaves the embeddings out without looking up its base (on the Hub, if it is an id) to
    see whether they were resized: they never are."""
    if hasattr(model, "peft_config"):
        model.save_pretrained(folder, save_embedding_layers=False)
    else:
        model.save_pretrained(folder, state_dict=state_dict)


def save_pretrained_atomically(output_dir, model, tokenizer, summary=None, state_dict=None):
    """The model (in float32; a sharded one's state_dict as gathered_state_dict gave it) and tokenizer, each
    file written whole; returns the names of the files written.

    With a summary, summary.json (listing those names under "saved") is written just before the files are
    moved in: a run killed in between is known by it to be unsaved (run_is_saved), and its files to be ours."""
    temporary = pathlib.Path(tempfile.mkdtemp(prefix=".saving-", dir=output_dir))
    try:
        save_model(model, temporary, state_dict)
        tokenizer.save_pretrained(temporary)
        names = sorted(path.name for path in temporary.iterdir())
        _claim_names(output_dir, names)
        if summary is not None:
            write_atomically(pathlib.Path(output_dir) / "summary.json", json.dumps({**summary, "saved": names}, indent=2) + "\n")
        for name in names:
            os.replace(temporary / name, output_dir / name)
    except _write_errors() as error:
        raise ReportedError(f"could not save the model to {output_dir} ({_first_line(error)}); the checkpoints are "
                            f"intact") from None
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return names


# ----------------------------------------------------------------------------------------------------
# Checkpoints


def our_checkpoints(output_dir):
    """The checkpoint-STEP folders this script wrote, oldest first."""
    found = []
    for path in pathlib.Path(output_dir).glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-([0-9]+)", path.name)
        if match and not path.is_symlink() and (path / "trainer_state.pt").is_file():
            found.append((int(match[1]), path))
    return [path for _, path in sorted(found)]


def write_checkpoint(output_dir, step, policy, optimizer, state, keep):
    """OUTPUT_DIR/checkpoint-STEP/: the policy and AdamW's state, and trainer_state.pt; keeps the last `keep`.
    Called on every rank.

    One process or DDP: rank 0 writes the policy (safetensors) and the optimizer's state into
    trainer_state.pt. FSDP: every rank writes its own shard of both with torch.distributed.checkpoint
    (__RANK_0.distcp, and .metadata from rank 0): no rank ever gathers the whole state.
    The folder appears whole or not at all: written beside, then renamed by rank 0 once every rank has
    written. A failed write (a full disk) leaves nothing behind and stops the run with a message; the
    previous checkpoints stay as they were.
    """
    output_dir, rank = pathlib.Path(output_dir), dist.get_rank() if dist.is_initialized() else 0
    shards = models.sharded(policy)
    if rank != 0 and not shards:
        return
    temporary = [tempfile.mkdtemp(prefix=f".checkpoint-{step}-", dir=output_dir) if rank == 0 else None]
    if shards:
        dist.broadcast_object_list(temporary)                          # one folder, rank 0's
    temporary = pathlib.Path(temporary[0])
    try:
        if shards:
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_state_dict

            model_state, optimizer_state = get_state_dict(policy, optimizer)
            # Returns on every rank once rank 0 has every rank's result and has written .metadata.
            dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=temporary)
        elif rank == 0:
            save_model(policy, temporary)
            state = {**state, "optimizer": optimizer.state_dict()}
        if rank == 0:
            torch.save(state, temporary / "trainer_state.pt")
            temporary.chmod(0o755)
            final = output_dir / f"checkpoint-{step}"
            if final in our_checkpoints(output_dir):
                shutil.rmtree(final)
            os.replace(temporary, final)
    except (*_write_errors(), CheckpointException) as error:        # a rank's failed write reaches every rank
        if rank == 0:
            shutil.rmtree(temporary, ignore_errors=True)
        previous = our_checkpoints(output_dir)[-1:]
        error = next(iter(error.failures.values()), error) if isinstance(error, CheckpointException) else error
        raise ReportedError(f"could not write checkpoint-{step} ({_first_line(error)}); " + (
            f"the last checkpoint, {previous[0]}, is intact" if previous else "no checkpoint was written")) from None
    if rank == 0:
        for old in our_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old)
    if shards:
        dist.barrier()                                                 # no rank goes on (or exits) before it is whole


def load_checkpoint(folder, state, policy, optimizer):
    """AdamW's state from a checkpoint, and under FSDP the policy's weights with it (each rank reads its
    shards; a run on another number of processes gets them resharded)."""
    if "optimizer" in state:
        saved = state["optimizer"]["state"]
        weights = [p for group in optimizer.param_groups for p in group["params"]]     # the weights it trains
        if any(i in saved and saved[i]["exp_avg"].shape != p.shape for i, p in enumerate(weights)):
            raise ReportedError(f"{folder}: its optimizer state is for another model than {folder / 'model.safetensors'}")
        optimizer.load_state_dict(state["optimizer"])
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(policy, optimizer)
    try:
        dcp.load({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=folder)
    except (CheckpointException, RuntimeError, ValueError) as error:
        first = error if not isinstance(error, CheckpointException) else next(iter(error.failures.values()), error)
        raise ReportedError(f"{folder}: its shards do not load into this model ({type(first).__name__}: "
                            f"{(str(first).splitlines() or [''])[0][:200]})") from None
    set_state_dict(policy, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)


def latest_checkpoint(output_dir):
    """(folder, state) of the newest checkpoint of this script's in output_dir whose state loads.

    One that does not (torn, garbage, written by something else) is named and passed over for the one
    before. Loaded with weights_only=True: nothing in it is unpickled blindly.
    """
    for folder in reversed(our_checkpoints(output_dir)):
        try:
            state = torch.load(folder / "trainer_state.pt", map_location="cpu", weights_only=True)
            _check_state(state, folder)
            return folder, state
        except Exception as error:
            print(f"note: {folder} cannot be resumed from ({type(error).__name__}: {(str(error).splitlines() or [''])[0][:120]})")
    raise ReportedError(f"--resume {output_dir}: no checkpoint-STEP folder of a train.py run that can be resumed from")


def _check_state(state, folder):
    if not (isinstance(state, dict) and isinstance(state.get("step"), int) and state["step"] >= 1
            and isinstance(state.get("args"), dict) and (isinstance(state.get("optimizer"), dict) or _whole_shards(folder))
            and isinstance(state.get("rng"), dict)
            and isinstance(state["rng"].get("torch"), torch.Tensor) and isinstance(state["rng"].get("python"), tuple)
            and isinstance(state.get("s_by_noise"), list) and len(state["s_by_noise"]) == 9
            and all(isinstance(count, int) for count in state["s_by_noise"])):
        raise ValueError("trainer_state.pt lacks what a train.py checkpoint holds")
    epsdpo.BaselineBeta(1.0, 0.0).load_state_dict(state.get("baseline_beta"))   # raises if malformed


def _whole_shards(folder):
    """A sharded checkpoint's .metadata reads, and every shard file holds the bytes it names."""
    from torch.distributed.checkpoint import FileSystemReader

    sizes = {}
    for item in FileSystemReader(folder).read_metadata().storage_data.values():
        if item.relative_path not in sizes:
            sizes[item.relative_path] = (folder / item.relative_path).stat().st_size
        if item.offset + item.length > sizes[item.relative_path]:
            raise ValueError(f"{item.relative_path} is cut short")
    return True


def resumed_args(args, given, parse):
    """The arguments of the run in --resume DIR and the checkpoint to go on from.

    args: the command line's arguments, given: the names it gave, parse: train.py's parse_args for a list of
    arguments, raising ReportedError. The saved arguments decide the run; they are checked by the same
    parsers as the command line, and the files they name must still be there (they were stored as absolute
    paths): a resumed run reads what the run read, or refuses. A flag given again may change only what
    RESUMABLE lists, and any other that differs is refused. --trust-remote-code and --gold-reward run code,
    so a checkpoint never turns them on: they apply only when given on the command line that resumes.
    """
    output_dir = pathlib.Path(args.resume)
    checkpoint = latest_checkpoint(output_dir)
    defaults = vars(parse([]))
    saved = {**defaults, **{k: v for k, v in checkpoint[1]["args"].items() if k in defaults}}
    wrong = sorted(k for k, v in saved.items() if None not in (v, defaults[k]) and type(v) is not type(defaults[k]))
    if wrong:
        raise ReportedError(f"{checkpoint[0]}: its arguments {', '.join(wrong)} are not of the types train.py writes")
    command_line = []
    for name, value in saved.items():                              # the saved values as a command line
        if value != defaults[name] and name not in RUNS_CODE | {"resume", "overwrite"}:
            flag = "--" + name.replace("_", "-")
            command_line += [flag] if value is True else [flag, *map(str, value if isinstance(value, list) else [value])]
    try:
        checked = vars(parse(command_line))
    except ReportedError as error:
        raise ReportedError(f"{checkpoint[0]}: its saved arguments are not valid ({error})") from None
    for name in sorted(set(INPUTS) - RUNS_CODE):
        value, flag = saved[name], "--" + name.replace("_", "-")
        if value != checked[name]:                                  # relative, or a Hub id now a folder here
            raise ReportedError(f"--resume {output_dir}: the run's {flag} {value} would now read {checked[name]}; "
                                f"a resumed run reads what the run read")
        if value and os.path.isabs(value) and not os.path.exists(value):
            raise ReportedError(f"--resume {output_dir}: the run read {flag} {value}, which is no longer there")
    for name in sorted(given - RESUMABLE - RUNS_CODE - {"resume"}):
        if name == "output_dir" and pathlib.Path(args.output_dir).resolve() == output_dir.resolve():
            continue
        if getattr(args, name) != saved[name]:
            flag = "--" + name.replace("_", "-")
            raise ReportedError(f"--resume {output_dir}: {flag} {getattr(args, name)} differs from the run's {saved[name]}; "
                                f"a resumed run keeps its arguments, and may change only "
                                f"{', '.join('--' + n.replace('_', '-') for n in sorted(RESUMABLE))}")
    for name in sorted(RUNS_CODE - given):
        if saved[name]:
            print(f"note: the run had --{name.replace('_', '-')}; it runs code, so it applies only when given again with --resume")
    resumed = argparse.Namespace(**{**saved, **{name: getattr(args, name) for name in given & RESUMABLE | RUNS_CODE},
                                    "resume": str(output_dir), "output_dir": str(output_dir), "overwrite": False})
    step = checkpoint[1]["step"]
    # At --max-steps with its final save incomplete (killed while saving): the resumed run only saves.
    if resumed.max_steps is not None and (resumed.max_steps < step or resumed.max_steps == step and run_is_saved(output_dir, step)):
        raise ReportedError(f"--resume {output_dir}: {checkpoint[0].name} is at or past --max-steps {resumed.max_steps}; "
                            f"give a larger --max-steps to train on")
    return resumed, checkpoint


class StopNow(KeyboardInterrupt):
    """The first SIGINT or SIGTERM before training: there is nothing to save, so the run stops at once."""

    def __init__(self, number):
        super().__init__(number)
        self.signal = number


class StopOnSignal:
    """SIGINT and SIGTERM while active (`with stop_signals:`, nestable). The first signal stops the run:
    before training at once (StopNow), during training (inside `with stop_signals.training():`) after the
    step under way, with a checkpoint: there it only sets .signal. Under torchrun one Ctrl-C reaches each
    process two or three times within milliseconds (the terminal's SIGINT to the process group, then
    torchrun's forwarded SIGINT and SIGTERM): signals within WINDOW seconds of the first are that same stop.
    One sent later raises KeyboardInterrupt: it stops at once."""

    WINDOW = 2.0

    def __init__(self):
        self.depth, self.signal, self.first_at, self.training_now = 0, None, None, False

    def __enter__(self):
        if self.depth == 0:
            self.signal = None
            self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        self.depth += 1
        return self

    def __exit__(self, *exc):
        self.depth -= 1
        if self.depth == 0:
            for number, handler in self.previous.items():
                signal.signal(number, handler)

    @contextlib.contextmanager
    def training(self):
        with self:
            self.training_now = True
            try:
                yield self
            finally:
                self.training_now = False

    def _handle(self, number, frame):
        now = time.monotonic()
        if self.signal is None:
            self.signal, self.first_at = number, now
            if not self.training_now:
                raise StopNow(number)
        elif now - self.first_at >= self.WINDOW:
            raise KeyboardInterrupt


stop_signals = StopOnSignal()                              # one per process: main() holds it while it runs


# ----------------------------------------------------------------------------------------------------
# What the user sees


def print_data_report(notes, skipped, boundary_moved):
    """What the data preparation left out or changed, by split: nothing is dropped silently."""
    for note in notes:
        print(f"note: {note}")
    for split, reasons in skipped.items():
        for reason, count in reasons.items():
            print(f"skipped {count} {split} rows: {reason}")
    if sum(boundary_moved.values()):
        print(f"note: in {boundary_moved['train']} train and {boundary_moved['eval']} held-out pairs the tokenizer merges "
              f"tokens across the prompt/completion boundary; the prompt is the part both sequences share")


def s_fractions(s_by_noise):
    """Fractions of s = +1 (the weaker penalty) and s = −1 (the stronger), for clean and noisy pairs separately.

    s_by_noise: counts of pairs with (flag, s) for flag in (absent, clean, noisy), s in (+1, 0, −1)."""
    groups = {}
    for name, (weaker, kept, stronger) in zip(("all", "clean", "noisy"), zip(*[iter(s_by_noise)] * 3)):
        if weaker + kept + stronger:
            groups[name] = {"pairs": weaker + kept + stronger, "weaker": weaker / (weaker + kept + stronger),
                            "stronger": stronger / (weaker + kept + stronger)}
    return dict(sorted(groups.items()))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(figure, path):
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=110, format="png")
    write_atomically(pathlib.Path(path), buffer.getvalue())             # the figure appears whole
    _pyplot().close(figure)


def _rolling_mean(points, window=10):
    """(steps, values) -> (steps, the mean of each value with the window - 1 before it)."""
    steps, values = zip(*points)
    return steps, [sum(values[max(0, i - window + 1) : i + 1]) / min(i + 1, window) for i in range(len(values))]


def plot_curves(runs, path):
    """One panel per quantity; each run (label -> metric rows) a colour, training a thin line, evaluations dots.
    The fractions of s: a mean over 10 steps, clean pairs solid and mislabelled ones dashed where marked."""
    plt = _pyplot()
    every_row = [row for rows in runs.values() for row in rows]

    def s_keys(kind):
        marked = [f"s/{kind}/clean", f"s/{kind}/noisy"]
        return marked if any(marked[0] in row for row in every_row) else [f"s/{kind}"]

    panels = [("loss −log σ(β̃ h)", ["loss"]), ("reward accuracy: how often h > 0", ["rewards/accuracies"]),
              ("margin h = z_θ − γ", ["h"]), ("baseline β", ["beta"]),
              ("fraction s = +1: weaker penalty β/(1+ε)", s_keys("weaker")),
              ("fraction s = −1: stronger penalty β/(1−ε)", s_keys("stronger")),
              ("gold reward of samples", ["gold_reward"]), ("KL(π_θ ‖ π_ref) along samples", ["kl"])]
    if not any("gold_reward" in row for row in every_row):
        panels = panels[:6]
    figure, axes = plt.subplots(2, len(panels) // 2, figsize=(4 * len(panels) // 2, 6.5), squeeze=False)
    for (title, keys), axis in zip(panels, axes.flat):
        for color, (label, rows) in zip(("tab:blue", "tab:red", "tab:green"), runs.items()):
            for key, linestyle in zip(keys, ("-", "--")):
                kind = {"clean": ", clean pairs", "noisy": ", mislabelled pairs"}.get(key.split("/")[-1], "")
                train = [(r["step"], r[key]) for r in rows if r["split"] == "train" and key in r]
                evals = [(r["step"], r[key]) for r in rows if r["split"] == "eval" and key in r]
                if train:
                    axis.plot(*(_rolling_mean(train) if key.startswith("s/") else zip(*train)), color=color,
                              linestyle=linestyle, linewidth=0.8, alpha=0.7, label=f"{label} train{kind}")
                if evals:
                    axis.plot(*zip(*evals), color=color, marker="o", linestyle=":", label=f"{label} held-out")
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("optimizer step")
    axes.flat[0].legend(fontsize=7)
    axes.flat[4].legend(fontsize=7)
    figure.tight_layout()
    _save_figure(figure, path)


@torch.no_grad()
def criterion_figure(policy, reference, pairs, pad_token_id, epsilon, forward, head, autocast, path, batch_size=64):
    """What the criterion measures on the final policy: how often s = sign(h − ΔK) and s = sign(h) over the
    pairs, and criterion.png at path (if not None). Returns those fractions; None at ε = 0 or without pairs.

    ΔK = K_w − K_l, with K the KL(π_θ‖π_ref) summed along a completion. To first order in ε,
    z(1 ± ε) − z(1) = ± ε dz/dλ with dz/dλ = h − ΔK, so s = sign(h − ΔK) where that is clear of zero.
    forward and head: train.py's loss of a batch and the models' LinearHead (None: from full logits), so that
    this holds no more memory than training does; only the few pairs drawn take full logits, one at a time.
    """
    if epsilon == 0 or not pairs:
        return None
    device = next(policy.parameters()).device

    def logits_of(chunk):
        batch = collate(chunk, pad_token_id, device)
        with autocast:
            logits, ref_logits = (model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
                                  for model in (policy, reference))
        return batch, logits.float(), ref_logits.float()

    columns = []                                            # per pair: h, ΔK, s, noise flag
    for start in range(0, len(pairs), batch_size):
        batch = collate(pairs[start : start + batch_size], pad_token_id, device)
        inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        with autocast:
            out = forward(policy, reference, batch, 1.0, epsilon, head)
            kls = models.sequence_kl(*(models.completion_logits(model, inputs, batch.completion_mask, head)
                                       for model in (policy, reference)))
        half = len(out.s)
        h = (out.chosen_logps - out.ref_chosen_logps) - (out.rejected_logps - out.ref_rejected_logps)
        columns.append(torch.stack([v.double() for v in (h, kls[:half] - kls[half:], out.s, batch.noise)]).cpu())
    h, delta_k, s, noise = torch.cat(columns, dim=1)
    agreement = {"pairs": len(s), "s = sign(h − ΔK)": (s == torch.sign(h - delta_k)).double().mean().item(),
                 "s = sign(h)": (s == torch.sign(h)).double().mean().item()}
    # A few pairs' z(λ) from λ = 0 (the reference) to 2: three clean and three mislabelled where marked. On
    # every rank: under FSDP each forward pass is a collective.
    marked = [i for flag in (1, 2) for i in (noise == flag).nonzero().flatten().tolist()[:3]]
    examples = marked if len(marked) > 3 else list(range(min(6, len(s))))
    lambdas = [step / 10 for step in range(21)]
    curves = {}
    for i in examples:
        batch, logits, ref_logits = logits_of([pairs[i]])
        curves[i] = [(lambda logps: (logps[0] - logps[1]).item())(epsdpo.sequence_logps(
                     torch.lerp(ref_logits, logits, lam), batch.input_ids, batch.completion_mask)) for lam in lambdas]
    if path is None:
        return agreement

    plt = _pyplot()
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = {1.0: "tab:blue", -1.0: "tab:red", 0.0: "tab:gray"}
    left.axvspan(1 - epsilon, 1 + epsilon, color="gold", alpha=0.6, label=f"[1 − ε, 1 + ε], ε = {epsilon:g}")
    for i, z in curves.items():
        z_at_1 = z[lambdas.index(1.0)]
        left.plot(lambdas, [value - z_at_1 for value in z], color=colors[s[i].item()],
                  linestyle="--" if noise[i] == 2 else "-", label=f"pair {i}{', mislabelled' if noise[i] == 2 else ''}: s = {s[i]:+.0f}")
        left.plot([0.7, 1.3], [-0.3 * (h[i] - delta_k[i]), 0.3 * (h[i] - delta_k[i])], color="black", linewidth=0.6, linestyle=":")
    left.axhline(0, color="black", linewidth=0.5)
    left.set_xlabel("λ: the policy estimated for β/λ (λ = 0: the reference, 1: the policy)")
    left.set_ylabel("z(λ) − z(1)")
    left.set_title("z(λ) of a few train pairs; dotted: slope h − ΔK at λ = 1", fontsize=10)
    left.legend(fontsize=7)
    for value, name in ((1.0, "s = +1"), (-1.0, "s = −1"), (0.0, "s = 0")):
        for flag, marker, kind in ((1, "o", "clean"), (0, "o", ""), (2, "x", "mislabelled")):
            chosen = (s == value) & (noise == flag)
            if chosen.any():
                right.scatter(delta_k[chosen], h[chosen], s=10, marker=marker, color=colors[value], label=f"{name} {kind}".strip())
    low, high = min(h.min(), delta_k.min()).item(), max(h.max(), delta_k.max()).item()
    right.plot([low, high], [low, high], color="black", linewidth=0.8, label="h = K_w − K_l")
    right.set_xlabel("K_w − K_l: KL(π_θ‖π_ref) along the chosen minus along the rejected")
    right.set_ylabel("margin h = z_θ − γ")
    right.set_title(f"{len(s)} train pairs: s = sign(h − ΔK) for {agreement['s = sign(h − ΔK)']:.1%}, "
                    f"s = sign(h) for {agreement['s = sign(h)']:.1%}", fontsize=10)
    right.legend(fontsize=7)
    figure.tight_layout()
    _save_figure(figure, path)
    return agreement


def print_summary(summaries):
    """A table of the held-out numbers at the start and the end of each run."""
    rows = [("held-out reward accuracy", "rewards/accuracies", "{:.3f}"), ("held-out margin h", "h", "{:.3f}"),
            ("held-out loss", "loss", "{:.4f}"), ("gold reward of samples", "gold_reward", "{:+.3f}"),
            ("KL(π_θ‖π_ref) along samples", "kl", "{:.3f}")]
    header = f"{'':28}" + "".join(f"{'start':>10}{s['label'] + ' end':>16}" for s in summaries[:1]) + "".join(
        f"{s['label'] + ' end':>16}" for s in summaries[1:])
    print("\n" + header)
    for name, key, fmt in rows:
        if key in summaries[0]["final"]:
            cells = [fmt.format(summaries[0]["start"][key])] + [fmt.format(s["final"][key]) for s in summaries]
            print(f"{name:28}{cells[0]:>10}" + "".join(f"{c:>16}" for c in cells[1:]))
    print(f"{'baseline β':28}{summaries[0]['args']['beta']:>10.4f}" + "".join(f"{s['final_beta']:>16.4f}" for s in summaries))
    for s in summaries:
        for group, f in s["s_by_noise"].items():
            print(f"{s['label']}, {group} train pairs ({f['pairs']} seen): s = +1 {f['weaker']:.1%}, s = −1 {f['stronger']:.1%}")
        if s.get("criterion"):
            c = s["criterion"]
            print(f"{s['label']}, final policy, {c['pairs']} train pairs: s = sign(h − ΔK) for {c['s = sign(h − ΔK)']:.1%}, "
                  f"s = sign(h) for {c['s = sign(h)']:.1%}")
        print(f"{s['label']}: {s['seconds']} s, written to {s['args']['output_dir']}")


def frontier_points(summaries):
    """One point per run of a frontier: what frontier.json holds."""
    points = []
    for s in summaries:
        groups = s["s_by_noise"].values()
        pairs = sum(group["pairs"] for group in groups)
        points.append({"method": s["label"], "beta": s["args"]["beta"], "epsilon": s["args"]["epsilon"],
                       "fixed_baseline_beta": s["args"]["fixed_baseline_beta"], "seed": s["args"]["seed"],
                       "gold_reward": s["final"]["gold_reward"], "kl": s["final"]["kl"],
                       "rewards/accuracies": s["final"]["rewards/accuracies"], "final_beta": s["final_beta"],
                       "mean_s": sum(g["pairs"] * (g["weaker"] - g["stronger"]) for g in groups) / pairs,
                       "output_dir": s["args"]["output_dir"]})
    return points


def _by_method_and_beta(points):
    """{method: {β: [points over seeds]}}, in the order the points came."""
    grouped = {}
    for point in points:
        grouped.setdefault(point["method"], {}).setdefault(point["beta"], []).append(point)
    return grouped


def plot_frontier(points, path):
    """Gold reward against KL: per method and β the mean over seeds (a dot), with bars from the lowest to the
    highest seed; a line joins each method's frontier, its means that no other mean of it beats with less KL.
    The KL axis ends a little past the largest mean; a bar beyond it is cut there and labelled with its end,
    so that one seed far out does not squeeze every other point."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(8, 5.5))
    grouped = _by_method_and_beta(points)
    means = {(method, beta): (sum(p["kl"] for p in runs) / len(runs), sum(p["gold_reward"] for p in runs) / len(runs))
             for method, by_beta in grouped.items() for beta, runs in by_beta.items()}
    kl_end = 1.15 * max(x for x, _ in means.values())
    for color, (method, by_beta) in zip(("tab:blue", "tab:red", "tab:green"), grouped.items()):
        for beta, runs in by_beta.items():
            (x, y), kls, golds = means[method, beta], [p["kl"] for p in runs], [p["gold_reward"] for p in runs]
            axis.errorbar(x, y, xerr=[[x - min(kls)], [min(max(kls), kl_end) - x]], yerr=[[y - min(golds)], [max(golds) - y]],
                          color=color, capsize=3, linewidth=0.7, alpha=0.45, marker="o", markersize=6, markeredgewidth=0)
            if max(kls) > kl_end:
                axis.annotate(f"{max(kls):.1f} →", (kl_end, y), xytext=(-34, 3), textcoords="offset points", fontsize=7, color=color)
            axis.annotate(f"β={beta:g}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7, color=color)
        frontier = []
        for x, y in sorted(means[method, beta] for beta in by_beta):
            if not frontier or y > frontier[-1][1]:
                frontier.append((x, y))
        axis.plot(*zip(*frontier), marker="o", color=color, label=method)
    seeds = max(len(runs) for by_beta in grouped.values() for runs in by_beta.values())
    axis.set_xlim(0, kl_end)
    axis.set_xlabel("KL(π_θ ‖ π_ref) along samples (nats per review)")
    axis.set_ylabel("gold reward of samples")
    axis.set_title(f"reward–KL frontier, mean of {seeds} seed(s); bars: lowest to highest seed; "
                   f"lines: each method's best gold reward at a KL", fontsize=9)
    axis.legend(fontsize=8)
    figure.tight_layout()
    _save_figure(figure, path)


def print_frontier(points):
    """The frontier as a table: per method and β, the mean over seeds and (lowest–highest)."""
    def cell(values, fmt):
        mean = sum(values) / len(values)
        spread = f" ({fmt.format(min(values))}–{fmt.format(max(values))})" if len(values) > 1 else ""
        return fmt.format(mean) + spread

    print(f"\n{'method':25}{'β':>5}  {'gold reward':<21}{'KL':<21}{'reward accuracy':<21}{'final β':>8}{'mean s':>8}")
    for method, by_beta in _by_method_and_beta(points).items():
        for beta, runs in sorted(by_beta.items()):
            print(f"{method:25}{beta:>5g}  {cell([p['gold_reward'] for p in runs], '{:+.2f}'):<21}"
                  f"{cell([p['kl'] for p in runs], '{:.2f}'):<21}{cell([p['rewards/accuracies'] for p in runs], '{:.3f}'):<21}"
                  f"{sum(p['final_beta'] for p in runs) / len(runs):>8.4f}{sum(p['mean_s'] for p in runs) / len(runs):>+8.3f}")
