"""Checkpoints, resuming, and the final save of a run.

A checkpoint is OUTPUT_DIR/checkpoint-STEP/: the policy (or its LoRA adapter) and trainer_state.pt (the optimizer's
state, the baseline β with any pending counts, the s counts, the RNG states, the run's arguments), or under FSDP
every rank's shards (torch.distributed.checkpoint, written in the background: async_checkpoints.py). A resumed run
reads what the run read, with its arguments, and ends where an uninterrupted run ends, bit for bit.
"""

import json
import os
import pathlib
import random
import shutil
import struct
import sys
import tempfile

import torch
import torch.distributed as dist

import epsdpo
from training import dcp_files, sharding
from training.adapters import sft_model_card
from training.arguments import RunConfig
from training.errors import ReportedError, note
from training.evaluation import NOISE
from training.fingerprints import READ_BY_LOADING
from training.output_folder import (
    INPUTS,
    _claim_names,
    _first_line,
    _write_errors,
    add_proofs,
    manifest,
    our_checkpoints,
    proof,
    read_record,
    record_checkpoint,
    remove_checkpoint,
    write_atomically,
)

# What a resumed run may change (--resume DIR --max-steps 500); any other flag that differs is refused.
RESUMABLE = {
    "max_steps",
    "eval_every",
    "save_every",
    "keep_checkpoints",
    "eval_batch_size",
    "max_new_tokens",
    "device",
    "dist_timeout",
    "criterion_pairs",
}
# What runs code: never taken from a checkpoint, only from the command line that resumes it.
RUNS_CODE = {"trust_remote_code", "gold_reward"}


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


def save_model(model, folder, state_dict=None):
    """save_pretrained: a model's weights (a sharded one's as gathered_state_dict gave them), or a peft model's
    adapter. The adapter leaves the embeddings out without looking up its base (on the Hub, if it is an id) to
    see whether they were resized: they never are."""
    if hasattr(model, "peft_config"):
        model.save_pretrained(folder, save_embedding_layers=False)
        card = sft_model_card(model.peft_config["default"].base_model_name_or_path)
        if card:  # its model card begins with what to load it onto
            readme = pathlib.Path(folder) / "README.md"
            front, _, rest = readme.read_text().partition("\n---\n") if readme.exists() else ("", "", "")
            # peft's front matter names the bare base (base_model, a base_model:adapter tag): no model holds it
            front = "\n".join(line for line in front.splitlines() if not line.lstrip("- ").startswith("base_model:"))
            readme.write_text(front + "\n---\n" * bool(front) + card + rest)
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
            write_atomically(
                pathlib.Path(output_dir) / "summary.json", json.dumps({**summary, "saved": names}, indent=2) + "\n"
            )
        add_proofs(output_dir, {name: proof(temporary / name) for name in names})  # before they are moved in
        for name in names:
            os.replace(temporary / name, output_dir / name)
    except _write_errors() as error:
        raise ReportedError(
            f"could not save the model to {output_dir} ({_first_line(error)}); the checkpoints are intact"
        ) from None
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return names


# ----------------------------------------------------------------------------------------------------
# Checkpoints


def trainer_state(step, baseline_beta, s_by_noise, args, inputs):
    """What trainer_state.pt keeps of a train.py run after optimizer step `step`, besides AdamW's state: the baseline
    β with any pending counts, the s counts, the RNG states, the run's arguments, what it read (inputs, as
    checked_inputs fingerprinted it) and its number of processes. Taken when the checkpoint is begun: a checkpoint
    written in the background (async_checkpoints) holds the state of its step, not of the step when it appears."""
    return {
        "step": step,
        "baseline_beta": baseline_beta.state_dict(),
        "s_by_noise": list(s_by_noise),
        "args": dict(vars(args)),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        "inputs": inputs,
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
    }


def restore_checkpoint(checkpoint, policy, optimizer, baseline_beta):
    """The state of checkpoint (folder, state) put back: the weights under FSDP (otherwise loaded with the model),
    AdamW's state, the baseline β and the RNGs. Returns (the step to go on from, the s counts so far, as
    evaluation.NOISE); (1, zeros) with no checkpoint."""
    if checkpoint is None:
        return 1, [0] * len(NOISE)
    folder, state = checkpoint
    load_checkpoint(folder, state, policy, optimizer)
    baseline_beta.load_state_dict(state["baseline_beta"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    return state["step"] + 1, list(state["s_by_noise"])


def write_checkpoint(output_dir, step, policy, optimizer, state, keep):
    """OUTPUT_DIR/checkpoint-STEP/ of one process or DDP: the policy (safetensors) and trainer_state.pt (`state`,
    as trainer_state gives it, with AdamW's state); keeps the last `keep`. Called on every rank; rank 0 writes.

    Synchronous: every rank waits until rank 0 has written it (docs/multi-gpu.md says why it is not written in the
    background). A sharded run's checkpoints are, every rank its shards (async_checkpoints.CheckpointSaver).
    The folder appears whole or not at all: written beside, then renamed (commit_checkpoint). A failed write (a full
    disk) leaves nothing behind and stops the run with a message; the previous checkpoints stay as they were.
    """
    if sharding.sharded(policy):
        raise ValueError("a sharded policy's checkpoints are written by async_checkpoints.CheckpointSaver")
    output_dir = pathlib.Path(output_dir)
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    temporary = pathlib.Path(tempfile.mkdtemp(prefix=f".checkpoint-{step}-", dir=output_dir))
    try:
        save_model(policy, temporary)
        # The proofs of the model's files: a file put in their place later makes the checkpoint one to pass over.
        state = {**state, "optimizer": optimizer.state_dict(), "files": manifest(temporary)}
        commit_checkpoint(output_dir, temporary, step, state)
    except _write_errors() as error:
        shutil.rmtree(temporary, ignore_errors=True)
        raise write_failure(output_dir, step, error) from None
    prune_checkpoints(output_dir, keep)


def commit_checkpoint(output_dir, temporary, step, state):
    """On rank 0, once every file of the checkpoint is written in the folder `temporary` beside: trainer_state.pt
    (state, with a copy of the folder's record), the proofs of its files in the record, then one rename to
    checkpoint-STEP. So the folder appears whole or not at all, and only checkpoint-STEP folders holding a
    trainer_state.pt are ever resumed from. Raises what a failed write raises (_write_errors)."""
    # A copy of the folder's record: a copy of the folder made without it (cp -r out/* new/) resumes.
    torch.save({**state, "record": read_record(output_dir)}, temporary / "trainer_state.pt")
    temporary.chmod(0o755)
    final = output_dir / f"checkpoint-{step}"
    if final in our_checkpoints(output_dir):
        remove_checkpoint(final)
    if os.path.lexists(final):  # a folder of yours, or one a file of yours kept
        raise OSError(f"{final} holds files this project did not write; move them away")
    record_checkpoint(output_dir, final.name, manifest(temporary))
    os.replace(temporary, final)


def prune_checkpoints(output_dir, keep):
    """Remove all but the last `keep` checkpoints of ours (crash-safe: output_folder.remove_checkpoint)."""
    for old in our_checkpoints(output_dir)[:-keep]:
        remove_checkpoint(old)


def write_failure(output_dir, step, error):
    """The ReportedError of checkpoint-STEP's failed write, in one line naming the checkpoint left intact:
    could not write checkpoint-2 ([Errno 28] No space left on device); the last checkpoint, out/checkpoint-1, is
    intact. error: what the write raised; a CheckpointException of a sharded write is said by its first rank's."""
    previous = our_checkpoints(output_dir)[-1:]
    return ReportedError(
        f"could not write checkpoint-{step} ({_first_line(_first_failure(error))}); "
        + (f"the last checkpoint, {previous[0]}, is intact" if previous else "no checkpoint was written")
    )


def load_checkpoint(folder, state, policy, optimizer):
    """AdamW's state from a checkpoint, and under FSDP the policy's weights with it (each rank reads its
    shards; a run on another number of processes gets them resharded)."""
    if "optimizer" in state:
        weights = [p for group in optimizer.param_groups for p in group["params"]]  # the weights it trains
        try:
            saved = state["optimizer"]["state"]
            fits = sum(len(group["params"]) for group in state["optimizer"]["param_groups"]) == len(
                weights
            ) and not any(i in saved and saved[i]["exp_avg"].shape != p.shape for i, p in enumerate(weights))
        except (KeyError, TypeError, AttributeError):
            fits = False
        if not fits:
            model_file = "adapter_model.safetensors" if hasattr(policy, "peft_config") else "model.safetensors"
            raise ReportedError(f"{folder}: its optimizer state is for another model than {folder / model_file}")
        optimizer.load_state_dict(state["optimizer"])
        return
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(policy, optimizer)
    try:
        dcp_files.load({"model": model_state, "optimizer": optimizer_state}, folder)  # runs no code of the folder's
    except (*_checkpoint_errors(), RuntimeError, ValueError) as error:
        first = _first_failure(error)
        raise ReportedError(
            f"{folder}: its shards do not load into this model ({type(first).__name__}: "
            f"{(str(first).splitlines() or [''])[0][:200]})"
        ) from None
    set_state_dict(policy, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)


def _checkpoint_errors():
    """(torch.distributed.checkpoint's CheckpointException,) once a sharded run has imported it, else (): none can be
    raised before. Not imported at the top: it takes 1.3 s, which a run that shards nothing need not pay."""
    api = sys.modules.get("torch.distributed.checkpoint.api")
    return (api.CheckpointException,) if api else ()


def _first_failure(error):
    """The exception of the first rank that failed, for a CheckpointException (whose failures are (exception,
    stack) pairs by rank); the error itself otherwise."""
    if isinstance(error, _checkpoint_errors()):
        failure = next(iter(error.failures.values()), None)
        return failure[0] if isinstance(failure, tuple) and failure else failure or RuntimeError("a rank failed")
    return error


def latest_checkpoint(output_dir):
    """(folder, state) of the newest checkpoint of this script's in output_dir whose state loads.

    One that does not (torn, garbage, written by something else; its model, adapter or shards cut short, not
    safetensors, or not the files it wrote) is named and passed over for the one before. Nothing in it runs code:
    trainer_state.pt loads with weights_only=True, a sharded one's .metadata as dcp_files reads it, and a pickled
    adapter_model.bin is never loaded.
    """
    for folder in reversed(our_checkpoints(output_dir)):
        try:
            state = torch.load(folder / "trainer_state.pt", map_location="cpu", weights_only=True)
            _check_state(state, folder)
            _check_model_files(state, folder)
            return folder, state
        except Exception as error:
            note(
                f"{folder} cannot be resumed from ({type(error).__name__}: "
                f"{(str(error).splitlines() or [''])[0][:120]})"
            )
    raise ReportedError(f"--resume {output_dir}: no checkpoint-STEP folder of a train.py run that can be resumed from")


def _check_state(state, folder):
    if not (
        isinstance(state, dict)
        and isinstance(state.get("step"), int)
        and state["step"] >= 1
        and isinstance(state.get("args"), dict)
        and (isinstance(state.get("optimizer"), dict) or _whole_shards(folder))
        and isinstance(state.get("rng"), dict)
        and isinstance(state["rng"].get("torch"), torch.Tensor)
        and isinstance(state["rng"].get("python"), tuple)
        and isinstance(state.get("s_by_noise"), list)
        and len(state["s_by_noise"]) == 9
        and all(isinstance(count, int) for count in state["s_by_noise"])
        and isinstance(state.get("inputs", {}), dict)
        and all(isinstance(v, dict) for v in state.get("inputs", {}).values())
        and isinstance(state.get("world_size", 1), int)
        and state.get("world_size", 1) >= 1
    ):
        raise ValueError("trainer_state.pt lacks what a train.py checkpoint holds")
    epsdpo.BaselineBeta(1.0, 0.0).load_state_dict(state.get("baseline_beta"))  # raises if malformed


def _check_model_files(state, folder):
    """The checkpoint's model reads whole: its adapter (adapter_config.json and adapter_model.safetensors) in a LoRA
    run, else model.safetensors (or each file its index names); a sharded one's shards are checked with its state.
    Each file is the one the checkpoint wrote (the proofs its trainer_state.pt keeps), and loading reads no other."""
    if "optimizer" not in state:
        return
    if state["args"].get("lora_r"):
        config = json.loads((folder / "adapter_config.json").read_text())
        if not (folder / "adapter_model.safetensors").is_file():
            raise ValueError(
                "adapter_model.safetensors is not there"
                + (" (adapter_model.bin is a pickle: never loaded)" if (folder / "adapter_model.bin").exists() else "")
            )
        _check_adapter_rank(folder / "adapter_model.safetensors", config)
        files = ["adapter_model.safetensors"]
    else:
        index = folder / "model.safetensors.index.json"
        files = (
            sorted(set(json.loads(index.read_text())["weight_map"].values()))
            if index.exists()
            else ["model.safetensors"]
        )
    for name in files:
        _check_safetensors(folder / pathlib.Path(name).name)
    written = state.get("files")
    if isinstance(written, dict):
        for name, entry in written.items():
            path = folder / pathlib.Path(str(name)).name
            if not path.is_file() or path.is_symlink() or proof(path) != entry:
                raise ValueError(f"{path.name} is not the file this checkpoint wrote")
        added = sorted(  # that loading the model would read
            p.name for p in folder.iterdir() if p.name not in written and READ_BY_LOADING.fullmatch(p.name)
        )
        if added:
            raise ValueError(f"{', '.join(added)} came after the checkpoint was written")


def _check_adapter_rank(path, config):
    """Every LoRA weight in the adapter file has the rank its adapter_config.json says (A: r × in, B: out × r)."""
    rank = config.get("r") if isinstance(config, dict) else None
    for name, entry in _safetensors_header(path).items():
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if ".lora_A." in name or ".lora_B." in name:
            inner = shape[0] if ".lora_A." in name else shape[-1]
            if inner != rank:
                layer = name.removeprefix("base_model.model.").split(".lora_")[0]
                raise ValueError(f"{path.name} has rank {inner}, its adapter_config.json r = {rank} ({layer})")


def _safetensors_header(path):
    with open(path, "rb") as file:
        length = struct.unpack("<Q", file.read(8).ljust(8, b"\0"))[0]
        header = json.loads(file.read(length)) if 2 <= length <= 2**27 else None
    if not isinstance(header, dict):
        raise ValueError(f"{path.name} is not a safetensors file")
    return {name: entry for name, entry in header.items() if name != "__metadata__"}


def _check_safetensors(path):
    """A safetensors file whose header reads and whose size holds every tensor it lists."""
    with open(path, "rb") as file:
        length = struct.unpack("<Q", file.read(8).ljust(8, b"\0"))[0]
        if not 2 <= length <= 2**27:
            raise ValueError(f"{path.name} is not a safetensors file")
        text = file.read(length)
    try:
        header = json.loads(text) if len(text) == length else None
        ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
    except (ValueError, AttributeError, KeyError, TypeError, IndexError):
        raise ValueError(f"{path.name} is cut short or not a safetensors file") from None
    if path.stat().st_size < 8 + length + max(ends, default=0):
        raise ValueError(f"{path.name} is cut short")


def _whole_shards(folder):
    """A sharded checkpoint's .metadata reads (as the checkpoint's own classes alone: dcp_files), and every shard
    file holds the bytes it names."""
    sizes = {}
    for item in dcp_files.read_metadata(folder).storage_data.values():
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
    command_line = as_command_line(saved, defaults, leave_out=RUNS_CODE | {"resume", "overwrite"})
    try:
        checked = vars(parse(command_line))
    except ReportedError as error:
        raise ReportedError(f"{checkpoint[0]}: its saved arguments are not valid ({error})") from None
    for name in sorted(set(INPUTS) - RUNS_CODE):
        value, flag = saved[name], "--" + name.replace("_", "-")
        if value != checked[name]:  # relative, or a Hub id now a folder here
            raise ReportedError(
                f"--resume {output_dir}: the run's {flag} {value} would now read {checked[name]}; "
                f"a resumed run reads what the run read"
            )
        if value and os.path.isabs(value) and not os.path.exists(value):
            raise ReportedError(f"--resume {output_dir}: the run read {flag} {value}, which is no longer there")
    for name in sorted(given - RESUMABLE - RUNS_CODE - {"resume", "batch_size", "grad_accum"}):
        if name == "output_dir" and pathlib.Path(args.output_dir).resolve() == output_dir.resolve():
            continue
        if getattr(args, name) != saved[name]:
            flag = "--" + name.replace("_", "-")
            raise ReportedError(
                f"--resume {output_dir}: {flag} {getattr(args, name)} differs from the run's {saved[name]}; "
                f"a resumed run keeps its arguments, and may change only "
                f"{', '.join('--' + n.replace('_', '-') for n in sorted(RESUMABLE))}"
            )
    if "max_new_tokens" in given and args.max_new_tokens != saved["max_new_tokens"]:
        note(
            f"--max-new-tokens {args.max_new_tokens}, the run's {saved['max_new_tokens']}: the gold reward and KL of "
            "samples from now on are of completions of another length than before"
        )
    for name in sorted(RUNS_CODE - given):
        if saved[name]:
            note(
                f"the run had --{name.replace('_', '-')}; it runs code, so it applies only when given again with "
                "--resume"
            )
    resumed = RunConfig(
        **{
            **saved,
            **{name: getattr(args, name) for name in given & RESUMABLE | RUNS_CODE},
            "resume": str(output_dir),
            "output_dir": str(output_dir),
            "overwrite": False,
        }
    )
    keep_pairs_a_step(resumed, args, given, checkpoint[1].get("world_size"), output_dir)
    step = checkpoint[1]["step"]
    # At --max-steps with its final save incomplete (killed while saving): the resumed run only saves.
    if resumed.max_steps is not None and (
        resumed.max_steps < step or resumed.max_steps == step and run_is_saved(output_dir, step)
    ):
        raise ReportedError(
            f"--resume {output_dir}: {checkpoint[0].name} is at or past --max-steps {resumed.max_steps}; "
            f"give a larger --max-steps to train on"
        )
    return resumed, checkpoint


def as_command_line(values, defaults, leave_out=()):
    """The flags that give `values` (a run's arguments by name) where they differ from `defaults`, as a list of
    strings for parse_args: what a checkpoint's saved arguments, or a comparison's runs, are parsed from."""
    command_line = []
    for name, value in values.items():
        if name in defaults and value != defaults[name] and name not in leave_out:
            flag = "--" + name.replace("_", "-")
            command_line += (
                [flag] if value is True else [flag, *map(str, value if isinstance(value, list) else [value])]
            )
    return command_line


def keep_pairs_a_step(resumed, args, given, run_world_size, output_dir):
    """The pairs of an optimizer step (--batch-size × --grad-accum × processes) are the run's: resumed on another
    number of processes (torchrun's WORLD_SIZE), or with --batch-size or --grad-accum given, the per-process batch
    and accumulation are set to keep them, the batch at most the run's (no process needs more memory), else
    ReportedError saying how to resume. The data order gives every step the same pairs (batches.micro_batches)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    run_world_size = run_world_size or world_size  # a checkpoint that does not say: as now
    batch_size, grad_accum = (getattr(args, name) if name in given else None for name in ("batch_size", "grad_accum"))
    if (
        world_size == run_world_size
        and batch_size in (None, resumed.batch_size)
        and grad_accum in (None, resumed.grad_accum)
    ):
        return
    step_pairs = resumed.batch_size * resumed.grad_accum * run_world_size
    ran = (
        f"the run trains {step_pairs} pairs a step (--batch-size {resumed.batch_size} × --grad-accum "
        f"{resumed.grad_accum} × {run_world_size} process{'es' * (run_world_size > 1)})"
    )
    if resumed.fsdp and world_size == 1:
        raise ReportedError(
            f"--resume {output_dir}: the run shards its models (--fsdp) over {run_world_size} processes; "
            f"resume it under torchrun: {resume_command(output_dir, run_world_size)}"
        )
    if step_pairs % world_size:
        raise ReportedError(
            f"--resume {output_dir}: {ran}, which {world_size} processes cannot share evenly; resume it "
            f"as it ran ({resume_command(output_dir, run_world_size)}) or on processes that divide {step_pairs}"
        )
    per_process = step_pairs // world_size
    if batch_size is None and grad_accum is None:  # the largest batch up to the run's
        batch_size = next(
            size for size in range(min(resumed.batch_size, per_process), 0, -1) if per_process % size == 0
        )
    batch_size = batch_size or max(1, per_process // grad_accum)
    grad_accum = grad_accum or max(1, per_process // batch_size)
    if batch_size * grad_accum != per_process:
        raise ReportedError(
            f"--resume {output_dir}: {ran}; --batch-size {batch_size} × --grad-accum {grad_accum} × "
            f"{world_size} would make {batch_size * grad_accum * world_size}: a resumed run keeps its pairs a step"
        )
    note(f"{ran}; now --batch-size {batch_size} × --grad-accum {grad_accum} × {world_size}: the same pairs a step")
    resumed.batch_size, resumed.grad_accum = batch_size, grad_accum


def resume_command(output_dir, world_size=None):
    """The command that continues the run in output_dir on world_size processes; None: on as many as now, on as
    many machines (torchrun's WORLD_SIZE and LOCAL_WORLD_SIZE)."""
    import shlex

    per_node = world_size or int(os.environ.get("LOCAL_WORLD_SIZE", "0")) or None
    world_size = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return f"python train.py --resume {shlex.quote(str(output_dir))}"
    nodes = f"--nnodes {world_size // per_node} " if per_node and per_node != world_size else ""
    return f"torchrun {nodes}--nproc_per_node {per_node or world_size} train.py --resume {shlex.quote(str(output_dir))}"
