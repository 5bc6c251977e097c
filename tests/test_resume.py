"""Resuming (--resume): from the last readable checkpoint, on the run's own data, model and flags, never running
code a checkpoint names; from anywhere, and on another number of processes."""

import json
import os
import pickle
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

import train
from tests.helpers import QUICK, copy_of, good_rows, read_metrics, run_expecting_error, write_jsonl
from training import checkpoints, errors
from training.arguments import ROOT, TINY_MODEL, parse_args

# ----------------------------------------------------------------------------------------------------
# What a resume reads, and what it refuses


def test_a_resume_never_runs_checkpoint_code_and_refuses_changed_flags(tmp_path, capsys, small_data):
    gold = tmp_path / "gold.py"
    gold.write_text("def score(prompt, completion):\n    return 100.0\n")
    output_dir = tmp_path / "out"
    train.main(
        [
            "--output-dir",
            str(output_dir),
            *small_data,
            "--gold-reward",
            str(gold),
            "--max-steps",
            "2",
            "--save-every",
            "1",
            "--eval-every",
            "1000",
        ]
    )
    # Someone edits the checkpoint so that resuming it runs their code.
    marker, evil = tmp_path / "their code ran", tmp_path / "evil.py"
    evil.write_text(f"open({str(marker)!r}, 'w').close()\ndef score(prompt, completion):\n    return 0.0\n")
    state_path = output_dir / "checkpoint-2/trainer_state.pt"
    state = torch.load(state_path, weights_only=True)
    state["args"].update(gold_reward=str(evil), trust_remote_code=True)
    torch.save(state, state_path)
    capsys.readouterr()
    train.main(["--resume", str(output_dir), "--max-steps", "3"])  # more steps: allowed
    assert not marker.exists()
    printed = capsys.readouterr().out
    assert "the run had --gold-reward" in printed and "the run had --trust-remote-code" in printed
    summary = json.loads((output_dir / "summary.json").read_text())
    assert (summary["args"]["gold_reward"], summary["args"]["trust_remote_code"], summary["steps"]) == (None, False, 3)
    assert "gold_reward" not in summary["final"]  # no gold reward at all

    error = run_expecting_error(["--resume", str(output_dir), "--max-steps", "4", "--beta", "0.2"])
    assert (
        error.startswith(f"error: --resume {output_dir}: --beta 0.2 differs from the run's 0.1")
        and "--max-steps" in error
    )
    assert run_expecting_error(["--resume", str(output_dir), "--max-steps", "3"]).endswith(
        "checkpoint-3 is at or past --max-steps 3; give a larger --max-steps to train on"
    )
    train.main(["--resume", str(output_dir), "--max-steps", "4", "--gold-reward", str(gold)])  # given again: it runs
    assert json.loads((output_dir / "summary.json").read_text())["final"]["gold_reward"] == 100.0


def test_the_flags_trust_md_says_a_resume_may_change_are_those_it_may():
    text = (ROOT / "docs/trust.md").read_text()
    sentence = text[text.index("A flag given with `--resume` may change only") + 44 :].split(";")[0]
    assert set(re.findall(r"`(--[a-z-]+)`", sentence)) == {
        "--" + name.replace("_", "-") for name in checkpoints.RESUMABLE
    }


def test_a_resume_from_anywhere_reads_the_runs_inputs_and_new_max_steps(tmp_path, monkeypatch):
    first, elsewhere = tmp_path / "first", tmp_path / "elsewhere"
    for folder, pairs in ((first, 40), (elsewhere, 60)):  # the same relative name, other data
        (folder / "data").mkdir(parents=True)
        write_jsonl(folder / "data/train.jsonl", good_rows(pairs))
    arguments = ["--dataset", "data", "--eval-fraction", "0.2", "--save-every", "1", "--eval-every", "1000", *QUICK]
    monkeypatch.chdir(first)
    train.main(["--output-dir", "out", "--max-steps", "2", *arguments])
    state = torch.load(first / "out/checkpoint-2/trainer_state.pt", weights_only=True)
    assert state["args"]["dataset"] == str(first / "data") and state["args"]["output_dir"] == str(first / "out")

    monkeypatch.chdir(elsewhere)
    train.main(["--resume", "../first/out", "--max-steps", "4"])
    summary = json.loads((first / "out/summary.json").read_text())
    assert (summary["train_pairs"], summary["steps"]) == (32, 4)  # the first folder's 40 pairs, 8 held out
    lrs = {r["step"]: r["lr"] for r in read_metrics(first / "out") if r["split"] == "train"}
    # Warmup int(0.1 × 4) = 0 steps: step 3 of 4 takes lr × (4 − 3 + 1) / 4, not the 0 its first plan ended at.
    assert lrs[3] == 5e-4 * 2 / 4 and lrs[4] == 5e-4 * 1 / 4

    state_path = first / "out/checkpoint-4/trainer_state.pt"
    state = torch.load(state_path, weights_only=True)
    state["args"]["eval_every"] = 0  # edited by hand
    torch.save(state, state_path)
    error = run_expecting_error(["--resume", str(first / "out"), "--max-steps", "5"])
    assert (
        error == f"error: {first / 'out/checkpoint-4'}: its saved arguments are not valid (argument --eval-every: "
        f"0 is out of range: must be >= 1)"
    )
    state["args"]["eval_every"] = 1000
    torch.save(state, state_path)
    (first / "data").rename(first / "data-moved")
    error = run_expecting_error(["--resume", str(first / "out"), "--max-steps", "5"])
    assert (
        error == f"error: --resume {first / 'out'}: the run read --dataset {first / 'data'}, which is no longer there"
    )


def test_a_resume_refuses_a_dataset_or_model_changed_since_the_run(two_checkpoints, tmp_path, small_data):
    """Fingerprints of the pairs as tokenized and of the model's files (weights sampled per tensor) are in every
    checkpoint; a resume that reads anything else is refused before a model is loaded or a file written. (The
    run's model and data are copied here and its checkpoint pointed at the copies: the same fingerprints.)"""
    output_dir, model, dataset = copy_of(two_checkpoints, tmp_path), tmp_path / "model", tmp_path / "data"
    shutil.copytree(TINY_MODEL, model)
    shutil.copytree(small_data[1], dataset)
    state_path = output_dir / "checkpoint-2/trainer_state.pt"
    state = torch.load(state_path, weights_only=True)
    state["args"].update(model=str(model), dataset=str(dataset))
    torch.save(state, state_path)
    resume = ["--resume", str(output_dir), "--max-steps", "3"]
    before = {path: path.read_bytes() for path in output_dir.rglob("*") if path.is_file()}
    test_rows = (dataset / "test.jsonl").read_text()
    (dataset / "test.jsonl").write_text("".join(test_rows.splitlines(keepends=True)[::2]))  # rewritten: 16 of 32
    assert (
        run_expecting_error(resume) == f"error: --resume {output_dir}: the held-out pairs of --dataset {dataset} "
        f"differ from the run's (32 then, 16 now); a resumed run trains on what the run trained on"
    )
    (dataset / "test.jsonl").write_text(test_rows)
    weights = load_file(model / "model.safetensors")  # edited in place: the same size and names
    weights["model.layers.1.mlp.down_proj.weight"][0, :3] += 0.5
    from safetensors.torch import save_file

    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    assert (
        run_expecting_error(resume) == f"error: --resume {output_dir}: --model {model} changed since the run "
        f"(model.safetensors differs); a resumed run trains on what the run trained on"
    )
    assert {
        path: path.read_bytes() for path in output_dir.rglob("*") if path.is_file() and path.name != ".train.lock"
    } == before
    shutil.copy(TINY_MODEL / "model.safetensors", model / "model.safetensors")  # the same bytes again, a new file
    from training import fingerprints

    fingerprint = fingerprints.model_fingerprint(str(model))
    assert fingerprint == state["inputs"]["--model"] and set(fingerprint) == {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    }


def test_resuming_on_n_processes_keeps_a_steps_pairs_or_says_how_to_resume(
    two_checkpoints, tmp_path, monkeypatch, capsys
):
    """A one-process run of 4 pairs a step: on 2 processes 2 each, on 3 refused; given flags must keep the 4; an
    FSDP run needs torchrun. The batch never grows past the run's (no process needs more memory)."""
    output_dir = copy_of(two_checkpoints, tmp_path)

    def resumed(*flags, world_size=1):
        monkeypatch.setenv("WORLD_SIZE", str(world_size))
        args, given = parse_args(["--resume", str(output_dir), "--max-steps", "3", *flags])
        run_args, _ = checkpoints.resumed_args(args, given, lambda argv: parse_args(argv, report=True)[0])
        return run_args.batch_size, run_args.grad_accum

    assert resumed() == (4, 1) and resumed(world_size=2) == (2, 1) and resumed(world_size=4) == (1, 1)
    assert (
        "note: the run trains 4 pairs a step (--batch-size 4 × --grad-accum 1 × 1 process); now --batch-size 2 × "
        "--grad-accum 1 × 2: the same pairs a step" in capsys.readouterr().out
    )
    assert resumed("--grad-accum", "2") == (2, 2) and resumed("--batch-size", "1") == (1, 4)
    with pytest.raises(
        errors.ReportedError,
        match=r"^--resume .*: the run trains 4 pairs a step \(--batch-size 4 × "
        r"--grad-accum 1 × 1 process\), which 3 processes cannot share evenly; "
        r"resume it as it ran \(python train.py --resume .*\) or on processes "
        r"that divide 4$",
    ):
        resumed(world_size=3)
    with pytest.raises(
        errors.ReportedError, match=r"--batch-size 3 × --grad-accum 1 × 1 would make 3: a resumed run keeps"
    ):
        resumed("--batch-size", "3")
    state_path = output_dir / "checkpoint-2/trainer_state.pt"
    state = torch.load(state_path, weights_only=True)
    state["args"]["fsdp"], state["world_size"] = True, 2
    torch.save(state, state_path)
    with pytest.raises(
        errors.ReportedError,
        match=r"the run shards its models \(--fsdp\) over 2 processes; resume it under "
        r"torchrun: torchrun --nproc_per_node 2 train.py --resume ",
    ):
        resumed()


def test_a_resume_with_another_gold_reward_or_the_runs_edited_is_refused(stopped_run, tmp_path):
    """The gold reward is an input of the run like its data: another file, or the run's own edited in place, would put
    two scorers' numbers in one summary."""
    output_dir, gold = copy_of(stopped_run, tmp_path), stopped_run.parent / "gold_reward.py"
    other = tmp_path / "other.py"
    other.write_text(gold.read_text() + "\nBONUS = 100\n")
    error = run_expecting_error(["--resume", str(output_dir), "--gold-reward", str(other)])
    assert error == (
        f"error: --resume {output_dir}: the run scored its samples with --gold-reward {gold}, not {other}: its gold "
        f"reward before and after would be two scorers'. Give --gold-reward {gold}, or leave it out to score nothing "
        "from now on"
    )
    text = gold.read_text()
    try:
        gold.write_text(text + "\n# edited\n")
        error = run_expecting_error(["--resume", str(output_dir), "--gold-reward", str(gold)])
        assert error.startswith(f"error: --resume {output_dir}: --gold-reward {gold} changed since the run")
    finally:
        gold.write_text(text)


def test_a_resume_given_a_flag_it_cannot_change_says_so_not_a_usage_error(stopped_run, tmp_path):
    """--max-length 32 on resume is the resume's refusal (the run's 512 stays), not --max-prompt-length's usage
    error."""
    output_dir = copy_of(stopped_run, tmp_path)
    assert run_expecting_error(["--resume", str(output_dir), "--max-length", "32"]).startswith(
        f"error: --resume {output_dir}: --max-length 32 differs from the run's 512; a resumed run keeps its arguments"
    )


# ----------------------------------------------------------------------------------------------------
# A broken checkpoint: named, and the one before it resumed


@pytest.mark.parametrize("break_it", ["garbage", "truncated", "no arguments"])
def test_an_unreadable_checkpoint_is_named_and_the_one_before_resumed(two_checkpoints, tmp_path, capsys, break_it):
    output_dir = copy_of(two_checkpoints, tmp_path)
    state_path = output_dir / "checkpoint-2/trainer_state.pt"
    if break_it == "garbage":
        state_path.write_bytes(b"not a checkpoint at all")
    elif break_it == "truncated":
        state_path.write_bytes(state_path.read_bytes()[:1000])
    else:
        state = torch.load(state_path, weights_only=True)
        del state["args"]
        torch.save(state, state_path)
    train.main(["--resume", str(output_dir)])  # to step 2 again
    printed = capsys.readouterr().out
    assert f"note: {output_dir / 'checkpoint-2'} cannot be resumed from" in printed
    assert f"resuming from {output_dir / 'checkpoint-1'} at step 2" in printed
    assert [r["step"] for r in read_metrics(output_dir) if r["split"] == "train"] == [1, 2]
    for checkpoint in ("checkpoint-1", "checkpoint-2"):
        (output_dir / checkpoint / "trainer_state.pt").write_bytes(b"garbage")
    assert run_expecting_error(["--resume", str(output_dir)]).startswith(f"error: --resume {output_dir}: no checkpoint")


@pytest.mark.parametrize(
    "run, break_it", [("two_checkpoints", "torn model"), ("lora_run", "torn adapter"), ("lora_run", "pickled adapter")]
)
def test_an_unreadable_model_or_adapter_resumes_the_checkpoint_before_it(request, tmp_path, capsys, run, break_it):
    """As a torn trainer_state.pt does: the checkpoint is named and passed over (a pickle is never loaded)."""
    output_dir = copy_of(
        request.getfixturevalue(run) if run == "two_checkpoints" else request.getfixturevalue(run)[1], tmp_path
    )
    latest, before = sorted(output_dir.glob("checkpoint-*"), key=lambda path: int(path.name.split("-")[1]))[-2:][::-1]
    capsys.readouterr()  # what the run printed, if it ran just now
    model = latest / ("model.safetensors" if break_it == "torn model" else "adapter_model.safetensors")
    if break_it.startswith("torn"):
        model.write_bytes(model.read_bytes()[:-100])  # the end of the last tensor is missing
    else:
        torch.save(load_file(model), latest / "adapter_model.bin")  # what peft would unpickle instead
        model.unlink()
    folder, _ = checkpoints.latest_checkpoint(output_dir)
    assert folder == before
    expected = (
        f"{model.name} is cut short"
        if break_it.startswith("torn")
        else "adapter_model.safetensors is not there (adapter_model.bin is a pickle: never loaded)"
    )
    assert capsys.readouterr().out == f"note: {latest} cannot be resumed from (ValueError: {expected})\n"


def test_a_checkpoint_of_another_model_is_refused_before_anything_changes(two_checkpoints, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    output_dir = copy_of(two_checkpoints, tmp_path)
    other = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=60,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
        )
    )
    other.save_pretrained(output_dir / "checkpoint-2")
    state = torch.load(output_dir / "checkpoint-2/trainer_state.pt", weights_only=True)
    del state["files"]  # a checkpoint without the proofs of its files (with them, one edited is passed over)
    torch.save(state, output_dir / "checkpoint-2/trainer_state.pt")
    metrics = (output_dir / "metrics.jsonl").read_bytes()
    error = run_expecting_error(["--resume", str(output_dir), "--max-steps", "3"])
    assert (
        error == f"error: {output_dir / 'checkpoint-2'}: its optimizer state is for another model than "
        f"{output_dir / 'checkpoint-2/model.safetensors'}"
    )
    assert (output_dir / "metrics.jsonl").read_bytes() == metrics


def test_a_torn_last_line_of_the_metrics_is_left_out_on_resume(two_checkpoints, tmp_path):
    output_dir = copy_of(two_checkpoints, tmp_path)
    shutil.rmtree(output_dir / "checkpoint-2")
    with open(output_dir / "metrics.jsonl", "a") as metrics_file:
        metrics_file.write('{"step": 3, "split": "tra')
    train.main(["--resume", str(output_dir)])  # from checkpoint-1 to step 2
    assert [(r["split"], r["step"]) for r in read_metrics(output_dir)] == [
        ("eval", 0),
        ("train", 1),
        ("train", 2),
        ("eval", 2),
    ]


def test_resume_completes_a_run_killed_while_saving_removing_temporaries(two_checkpoints, tmp_path, capsys):
    output_dir = copy_of(two_checkpoints, tmp_path)
    saved_model = (output_dir / "model.safetensors").read_bytes()
    # What a kill -9 during the final save leaves (temporaries named as mkdtemp and mkstemp name them):
    # summary.json and config.json moved in, model.safetensors not yet; and a killed checkpoint and metrics write.
    (output_dir / ".saving-k1ll3d00").mkdir()
    (output_dir / "model.safetensors").rename(output_dir / ".saving-k1ll3d00/model.safetensors")
    (output_dir / ".checkpoint-3-k1ll3d00").mkdir()
    (output_dir / ".metrics.jsonl.k1ll3d00").write_text("{")
    (output_dir / ".saving").mkdir()  # not ours by name: kept
    train.main(["--resume", str(output_dir)])
    assert "its final save did not complete: saving it" in capsys.readouterr().out
    assert (output_dir / "model.safetensors").read_bytes() == saved_model
    assert sorted(p.name for p in output_dir.glob(".*")) == [".saving", ".train.files", ".train.lock"]
    assert [r["step"] for r in read_metrics(output_dir) if r["split"] == "train"] == [1, 2]
    assert run_expecting_error(["--resume", str(output_dir)]).endswith(
        "checkpoint-2 is at or past --max-steps 2; give a larger --max-steps to train on"
    )


class Payload:
    """A pickle that runs a command when it is loaded, as a hostile .metadata or shard item would hold."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_runs_no_code_from_its_shard_metadata_or_items(tmp_path, capsys):
    """A checkpoint-STEP whose .metadata is a pickle calling os.system is passed over and the command never runs;
    torch.distributed.checkpoint's own files still load, and an item of a shard that is such a pickle is refused, not
    run."""
    marker = tmp_path / "ran"
    folder = tmp_path / "out/checkpoint-1"
    folder.mkdir(parents=True)
    torch.save({"step": 1, "args": {}}, folder / "trainer_state.pt")  # a sharded run's state: no optimizer in it
    (folder / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(
        errors.ReportedError, match="no checkpoint-STEP folder of a train.py run that can be resumed from"
    ):
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
