"""Multi-process runs: the one torchrun launch of two_ranks (DDP, FSDP from logits, from hidden states and in
bf16, LoRA, resumes) gives what one process gives; and what a process group of one shows in this process."""

import json
import math
import shutil
import signal
import types

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

import epsdpo
import train
from tests.helpers import copy_of, read_metrics, tiny_llama, tiny_model_folder
from training import checkpoints, errors, evaluation, loss, models, output_folder, sharding
from training.arguments import TINY_MODEL, parse_args

# ----------------------------------------------------------------------------------------------------
# DDP and LoRA under torchrun


def test_ddp_on_two_ranks_is_one_process_and_a_ctrl_c_stops_both(two_ranks):
    """2 CPU processes (gloo) with 4 pairs each are one process with 8: the same β at every step on both
    ranks and in the single process, and the same weights up to float rounding, with the loss from hidden states:
    DDP sees the forward pass of models.last_hidden_states and averages the output layer's gradient from both of its
    uses. A Ctrl-C reaches each rank two or three times: one stop, one checkpoint, the torchrun command to go on
    (the stopped run is resumed by test_a_two_process_run_resumed_in_one_trains_on_the_same_pairs)."""
    folder, printed, counted = two_ranks
    assert all(process["losses_from_hidden"] > 0 for process in counted["ddp-whole"])
    stdout, stderr = printed
    assert "checkpoint written" in stdout and len(list((folder / "ddp").glob("checkpoint-*"))) == 1
    assert (
        f"checkpoint written: torchrun --nproc_per_node 2 train.py --resume {folder / 'ddp'} continues the run"
        in stdout
    )
    assert "second signal" not in stderr
    one_rows, two_rows = read_metrics(folder / "one"), read_metrics(folder / "ddp-whole")
    assert [(r["split"], r["step"]) for r in two_rows] == [(r["split"], r["step"]) for r in one_rows]
    for one_row, two_row in zip(one_rows, two_rows, strict=True):
        assert two_row["beta"] == one_row["beta"]
        if two_row["split"] == "train":
            assert two_row["beta/ranks"] == [one_row["beta"]] * 2  # the β both ranks used
            assert two_row["beta/pairs_mean"] == one_row["beta/pairs_mean"]  # and the β both moved to
    one, two = load_file(folder / "one/model.safetensors"), load_file(folder / "ddp-whole/model.safetensors")
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-4)


def test_a_two_process_run_resumed_in_one_trains_on_the_same_pairs(two_ranks, tmp_path, capsys, monkeypatch):
    """The DDP run of 4 + 4 pairs a step, stopped by a Ctrl-C, resumed by python train.py (4 × 2 micro-batches, the
    same memory a process), ends as the same run never stopped, bit for bit, and as the one-process run of 8
    does; the one-process run resumed on 2 processes (in the fixture's torchrun launch, 1 note in all) too. To the
    one-process run: float32 order, as DDP itself."""
    folder, printed, _ = two_ranks
    stopped = shutil.copytree(folder / "ddp", tmp_path / "ddp", ignore=shutil.ignore_patterns(".train.lock"))
    monkeypatch.setattr(loss, "PLAIN_LOSS_BYTES", 0)  # the loss from hidden states, as it ran
    train.main(["--resume", str(stopped)])  # no gold reward: no sampling, quicker
    assert (
        "note: the run trains 8 pairs a step (--batch-size 4 × --grad-accum 1 × 2 processes); now --batch-size 4 × "
        "--grad-accum 2 × 1: the same pairs a step" in capsys.readouterr().out
    )
    # Bit for bit the same run never stopped, under torchrun: one process halves each of its 2 micro-batches'
    # gradients, DDP halves their sum, and halving is exact.
    resumed, never_stopped = load_file(stopped / "model.safetensors"), load_file(folder / "ddp-whole/model.safetensors")
    assert all(torch.equal(resumed[name], never_stopped[name]) for name in never_stopped)
    one = load_file(folder / "one/model.safetensors")
    for resumed in (stopped, folder / "one-on-two"):
        rows, one_rows = read_metrics(resumed), read_metrics(folder / "one")
        assert [(r["split"], r["step"], r["beta"]) for r in rows] == [
            (r["split"], r["step"], r["beta"]) for r in one_rows
        ]
        weights = load_file(resumed / "model.safetensors")
        for name in one:
            torch.testing.assert_close(weights[name], one[name], rtol=0, atol=1e-4)
    assert (
        printed[0].count(
            "note: the run trains 8 pairs a step (--batch-size 8 × --grad-accum 1 × 1 process); "
            "now --batch-size 4 × --grad-accum 1 × 2: the same pairs a step"
        )
        == 1
    )


def test_lora_on_two_ranks_under_torchrun_matches_one_process(lora_run, two_ranks):
    """DDP of the peft model: only the adapters require grad, so only their gradients are averaged. Run in
    two_ranks' launch, with the loss from hidden states (the reference AdaptersOff's through the same hook)."""
    _, one = lora_run
    two, counted = two_ranks[0] / "lora", two_ranks[2]["lora"]
    assert all(process["losses_from_hidden"] > 0 and process["models_read"] == [str(TINY_MODEL)] for process in counted)
    one_rows, two_rows = read_metrics(one), read_metrics(two)
    assert [r["beta"] for r in two_rows] == [r["beta"] for r in one_rows]
    one_adapter, two_adapter = (load_file(run / "adapter_model.safetensors") for run in (one, two))
    for name in one_adapter:
        torch.testing.assert_close(
            two_adapter[name], one_adapter[name], rtol=0, atol=1e-4
        )  # float32 order: a batch of 8 vs 4 + 4


# ----------------------------------------------------------------------------------------------------
# FSDP


@pytest.mark.parametrize("run", ["fsdp-whole", "fsdp-hidden"])
def test_fsdp_on_two_ranks_is_one_process_with_the_same_global_batch(two_ranks, run):
    """FSDP shards the weights, gradients and AdamW state; ε-DPO is unchanged: the same β and s at every
    step, the metrics, the clipped gradient's norm (over the shards) and the weights up to float32 rounding,
    with the loss from the logits and from the hidden states (the output layer's weight is whole after the
    forward pass: the policy's root unit stays gathered, the reference's until the loss is computed).
    The model rank 0 gathers and saves loads as a float32 model, with --model's generation config."""
    folder, printed, counted = two_ranks
    assert "the loss from full" not in printed[0]  # the hidden path is open
    assert all((process["losses_from_hidden"] > 0) == (run == "fsdp-hidden") for process in counted[run])
    assert all(process["reference_root_left_whole"] == 0 for process in counted[run])  # freed before the backward
    one_rows, fsdp_rows = read_metrics(folder / "one"), read_metrics(folder / run)
    assert [(r["split"], r["step"]) for r in fsdp_rows] == [(r["split"], r["step"]) for r in one_rows]
    for one_row, fsdp_row in zip(one_rows, fsdp_rows, strict=True):
        for key in ("beta", "beta/pairs_mean", "s/weaker", "s/stronger"):
            assert fsdp_row[key] == one_row[key], (key, one_row["step"])
        if fsdp_row["split"] == "train":
            assert fsdp_row["beta/ranks"] == [one_row["beta"]] * 2
        for key in ("loss", "grad_norm", "rewards/margins", "logps/chosen", "logps/rejected"):  # the evaluations'
            if key in one_row:  # 33 pairs too
                assert fsdp_row[key] == pytest.approx(one_row[key], rel=1e-5, abs=1e-6), (key, one_row["step"])
    one = load_file(folder / "one/model.safetensors")
    saved = AutoModelForCausalLM.from_pretrained(folder / run).state_dict()
    for name in one:
        assert saved[name].dtype == torch.float32
        torch.testing.assert_close(saved[name], one[name], rtol=0, atol=1e-4)
    assert (folder / run / "generation_config.json").read_text() == (folder / "one/generation_config.json").read_text()


def test_under_fsdp_process_0_alone_reads_the_weights_once(two_ranks):
    """Both models are built on the meta device and filled from process 0's one read of --model (the reference
    being --model); resuming, the policy's shards come from the checkpoint, so --model is read for the
    reference alone. DDP reads both models on every process (resumed: the checkpoint's policy). The FSDP runs equal
    one process's (above), so the rotary frequencies, which are not in the weights' files, are right on every
    process."""
    _, _, counted = two_ranks
    model = str(TINY_MODEL)
    for run in ("fsdp-whole", "fsdp-hidden", "fsdp-bf16", "fsdp-resumed"):
        assert [process["models_read"] for process in counted[run]] == [[model], []], run
    assert [process["models_read"] for process in counted["ddp-whole"]] == [[model, model]] * 2
    checkpoint = two_ranks[0] / "one-on-two/checkpoint-5"
    assert [process["models_read"] for process in counted["one-on-two"]] == [[str(checkpoint), model]] * 2


def test_under_fsdp_sampling_gathers_each_unit_once_per_evaluation(two_ranks):
    """generate() runs the policy once per new token; under FSDP every unit (2 layers and the root) would be
    all-gathered at every call, 3 × up to 8 per generate() here. sharding.gathered_once keeps them gathered
    through an evaluation's samples: each unit at most once in its first generate() (the root may still be
    gathered from the evaluation's loss), none in its second. Two evaluations, each 17 prompts a rank in
    batches of 16 and 1."""
    folder, _, counted = two_ranks
    for run in ("fsdp-whole", "fsdp-hidden", "fsdp-bf16"):
        for process in counted[run]:
            first, second, third, fourth = process["all_gathers_per_generate"]
            assert 1 <= first <= 3 and 1 <= third <= 3 and second == fourth == 0, (run, process)
    # criterion.png under FSDP, from hidden states
    assert json.loads((folder / "fsdp-hidden/summary.json").read_text())["criterion"]["pairs"] == 8
    assert (folder / "fsdp-hidden/criterion.png").exists()


def test_fsdp_stopped_by_sigterm_resumes_to_the_run_never_stopped(two_ranks):
    """A scheduler's SIGTERM to every process of the job: one sharded checkpoint, which the run resumes from."""
    folder, printed, counted = two_ranks
    stdout, stderr = printed
    assert [process["exit_status"] for process in counted["fsdp"]] == [128 + signal.SIGTERM] * 2
    (checkpoint,) = (folder / "fsdp").glob("checkpoint-*")
    step = int(checkpoint.name.split("-")[1])
    assert 1 <= step < 10 and "second signal" not in stderr
    assert (
        f"stopped by signal 15 (SIGTERM) after step {step}; checkpoint written: torchrun --nproc_per_node 2 train.py "
        f"--resume {folder / 'fsdp'} continues the run" in stdout
    )
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
        "trainer_state.pt",
    ]
    assert "optimizer" not in torch.load(checkpoint / "trainer_state.pt", weights_only=True)  # it is in the shards
    assert read_metrics(folder / "fsdp") == read_metrics(folder / "fsdp-whole")
    whole, resumed = load_file(folder / "fsdp-whole/model.safetensors"), load_file(folder / "fsdp/model.safetensors")
    assert all(torch.equal(whole[name], resumed[name]) for name in whole)


def test_under_fsdp_each_rank_holds_half_of_the_state_and_checkpoint(two_ranks):
    folder, _, _ = two_ranks
    one, ddp, fsdp = (
        json.loads((folder / run / "summary.json").read_text())["bytes_held_by_rank_0"]
        for run in ("one", "ddp-whole", "fsdp-whole")
    )
    assert one["parameters"] == 86_080 * 4 and ddp == one  # DDP: a whole copy on every rank
    for kind in ("parameters", "gradients", "optimizer", "reference"):
        assert fsdp[kind] == pytest.approx(one[kind] / 2, rel=0.01), kind
    # bench.py --memory's computed bytes are these measured ones (less AdamW's step counts, 4 bytes a tensor)
    from training import bench_memory

    with torch.device("meta"):
        computed = bench_memory.bytes_per_gpu(
            AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_MODEL)), gpus=2
        )
    assert computed["ddp"]["policy"] == pytest.approx(one["parameters"] + one["gradients"] + one["optimizer"], abs=100)
    assert computed["fsdp"]["policy"] == pytest.approx(
        fsdp["parameters"] + fsdp["gradients"] + fsdp["optimizer"], abs=100
    )
    shards = [(folder / "fsdp-whole/checkpoint-10" / f"__{rank}_0.distcp").stat().st_size for rank in (0, 1)]
    assert all(0.45 < shard / sum(shards) < 0.55 for shard in shards)
    assert sorted(p.name for p in (folder / "fsdp-whole").glob("checkpoint-*")) == ["checkpoint-10", "checkpoint-5"]


def test_fsdp_in_bf16_with_gradient_checkpointing_starts_at_the_reference(two_ranks):
    """bf16 weights gathered for compute, float32 shards and reductions: at the start the reference (stored
    in bf16) computes the policy's logits bit for bit, so every s is 0 and the loss is log 2; then, with
    layers recomputed in backward, it trains as float32 does within bf16's rounding."""
    folder, _, counted = two_ranks
    assert all(process["losses_from_hidden"] > 0 for process in counted["fsdp-bf16"])  # from hidden states
    bf16_rows, float32_rows = read_metrics(folder / "fsdp-bf16"), read_metrics(folder / "fsdp-whole")
    start, first_step = bf16_rows[0], bf16_rows[1]
    assert (start["rewards/margins"], start["s/weaker"], start["s/stronger"]) == (0.0, 0.0, 0.0)
    assert start["loss"] == float32_rows[0]["loss"] == float(torch.tensor(math.log(2)))
    assert (first_step["split"], first_step["s/weaker"], first_step["s/stronger"]) == ("train", 0.0, 0.0)
    for bf16_row, float32_row in zip(bf16_rows[1:4], float32_rows[1:4], strict=True):
        assert bf16_row["loss"] == pytest.approx(float32_row["loss"], abs=2**-7)


def test_a_cut_shard_resumes_the_sharded_checkpoint_before_it(two_ranks, tmp_path, capsys):
    output_dir = copy_of(two_ranks[0] / "fsdp-whole", tmp_path)
    shard = output_dir / "checkpoint-10/__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:1000])
    folder, state = checkpoints.latest_checkpoint(output_dir)
    assert (folder, state["step"]) == (output_dir / "checkpoint-5", 5)
    assert (
        f"note: {output_dir / 'checkpoint-10'} cannot be resumed from (ValueError: __1_0.distcp is cut short)"
        in capsys.readouterr().out
    )


def test_an_empty_model_takes_its_shards_and_refuses_another_models(tmp_path):
    """models.empty_model has its weights on the meta device and the buffers from_pretrained computes (rotary
    frequencies; Gemma-2's embedding scale; Llama-3.1's scaled rotary frequencies). In a process group of one
    (gloo), in this process: sharded, it takes a sharded checkpoint's weights (sharding.load_sharded_weights, as
    a resumed FSDP run does), and another model's shards give one line."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from training import sharding

    llama_3_1 = {
        "rope_type": "llama3",
        "rope_theta": 5e5,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    }
    for kind, config in [
        ("gemma2", {"head_dim": 8}),
        ("mixtral", {}),
        ("qwen2", {}),
        ("llama", {"rope_parameters": llama_3_1}),
    ]:
        folder = tiny_model_folder(tmp_path / kind, kind=kind, **config)
        loaded, empty = (
            AutoModelForCausalLM.from_pretrained(folder),
            models.empty_model(folder, trust_remote_code=False),
        )
        assert [(n, b.tolist()) for n, b in empty.named_buffers()] == [
            (n, b.tolist()) for n, b in loaded.named_buffers()
        ], kind
    loaded = AutoModelForCausalLM.from_pretrained(TINY_MODEL)
    empty = models.empty_model(str(TINY_MODEL), trust_remote_code=False)
    assert {p.device.type for p in empty.parameters()} == {"meta"}
    assert [(n, b.tolist()) for n, b in empty.named_buffers()] == [(n, b.tolist()) for n, b in loaded.named_buffers()]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        dcp.save({"model": get_model_state_dict(sharding.shard(loaded))}, checkpoint_id=tmp_path / "checkpoint-1")
        other = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_MODEL, vocab_size=70))
        dcp.save({"model": get_model_state_dict(sharding.shard(other))}, checkpoint_id=tmp_path / "checkpoint-2")
        policy = sharding.allocate_shards(sharding.shard(empty), torch.device("cpu"))
        sharding.load_sharded_weights(policy, tmp_path / "checkpoint-1")
        expected = load_file(TINY_MODEL / "model.safetensors")
        assert all(torch.equal(sharding.local(policy.get_parameter(name)), expected[name]) for name in expected)
        with pytest.raises(
            errors.ReportedError, match=f"{tmp_path / 'checkpoint-2'}: its shards do not load into this model"
        ):
            sharding.load_sharded_weights(policy, tmp_path / "checkpoint-2")
    finally:
        dist.destroy_process_group()


def criterion_pairs():
    """Five pairs of random ids, every other one marked noisy."""
    generator = torch.Generator().manual_seed(3)

    def ids(length):
        return torch.randint(1, 64, (length,), generator=generator).tolist()

    return [
        {
            "prompt_ids": ids(3 + i % 3),
            "chosen_ids": ids(4 + i % 4),
            "rejected_ids": ids(2 + i % 5),
            "noisy": i % 2 == 0,
        }
        for i in range(5)
    ]


def measure_the_criterion(rank=0, folder=None):
    """criterion_measures on two tiny models (the loss from hidden states), counting the policy's forward passes; on
    rank `rank` of a 2-process gloo group when folder is given, where rank 1 alone finds no room to keep units
    gathered (sharding's answer for this rank, replaced here)."""
    import torch.distributed as dist

    if folder is not None:
        dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
        sharding._fits_on_this_rank = lambda model, device: rank == 0  # this child process's own module
    try:
        fits = sharding.gathered_fits(torch.nn.Linear(1, 1), torch.device("cpu"))
        policy, reference = tiny_llama(seed=1), tiny_llama(seed=0)
        head, why = models.linear_head(policy, torch.tensor([[1, 2, 3]]))
        assert head is not None, why
        forwards = []
        policy.register_forward_pre_hook(lambda module, args: forwards.append(1))
        run_models = types.SimpleNamespace(policy=policy, reference=reference, head=head)
        run_args = types.SimpleNamespace(epsilon=0.1, eval_batch_size=2, batch_size=2)
        measured = evaluation.criterion_measures(run_models, criterion_pairs(), 0, run_args)
        result = {"fits": fits, "forwards": len(forwards), **{k: measured[k] for k in ("h", "delta_k", "s", "noise")}}
        if folder is not None:
            torch.save(result, f"{folder}/rank{rank}.pt")
        return result
    finally:
        if folder is not None:
            dist.destroy_process_group()


def test_ranks_decide_as_one_and_share_the_criterions_pairs(tmp_path):
    """Two gloo ranks: rank 1 alone has no room to keep units gathered, and both then answer no (one decision, else
    their all-gathers would not match). The criterion's measures of 5 pairs: each rank computes its share (3 and
    2, padded to 3: 2 batches of 2, then the curves' batch), and both get all 5 back in order, as one process
    computes them (4 batches with the curves'), each batch running the policy once (twice before: the loss, then
    the KL)."""
    import torch.multiprocessing

    alone = measure_the_criterion()
    assert alone["fits"] and alone["forwards"] == 3 + 1
    torch.multiprocessing.start_processes(measure_the_criterion, (tmp_path,), nprocs=2, start_method="fork")
    for rank in (0, 1):
        shared = torch.load(tmp_path / f"rank{rank}.pt")
        assert shared["fits"] is False and shared["forwards"] == 2 + 1
        assert shared["noise"].tolist() == alone["noise"].tolist() == [2.0, 1.0, 2.0, 1.0, 2.0]
        assert shared["s"].tolist() == alone["s"].tolist() and alone["s"].abs().sum() > 0
        for name in ("h", "delta_k"):
            torch.testing.assert_close(shared[name], alone[name], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# What one rank does, seen in this process


def test_under_torchrun_rank_0_alone_reports_a_refusal_others_exit_quietly(tmp_path, monkeypatch, capsys):
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "notes.txt").write_text("mine")
    args, _ = parse_args(["--output-dir", str(output_dir)])
    verdicts = []
    monkeypatch.setattr(
        output_folder.dist, "broadcast", lambda tensor, src: verdicts.append(tensor.item()) or tensor.fill_(1)
    )
    with pytest.raises(SystemExit) as exit_info:  # rank 1 learns that rank 0 refused
        with output_folder.claim_on_rank_zero(output_dir, args, 1, 2, torch.device("cpu")):
            pass
    assert exit_info.value.code == 1 and verdicts == [0]
    with pytest.raises(errors.ReportedError, match="is not empty"):
        with output_folder.claim_on_rank_zero(output_dir, args, 0, 2, torch.device("cpu")):
            pass
    assert verdicts == [0, 1]
    monkeypatch.setenv("RANK", "1")  # and a rank other than 0 prints nothing
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--output-dir", str(output_dir), "--max-steps", "1"])
    assert exit_info.value.code == 1 and capsys.readouterr().err == ""


class _Reduced(Exception):
    """Raised by a fake all_reduce once it has seen the tensor it was given."""


def test_the_beta_update_under_nccl_reduces_on_the_device_of_s(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    reduced_on = []

    def all_reduce(tensor):
        reduced_on.append(tensor.device)
        raise _Reduced  # a fake tensor has no values to go on with

    def current_device():
        raise AssertionError("torch.cuda.current_device() is GPU 0 on every rank that never called set_device")

    monkeypatch.setattr(epsdpo.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(epsdpo.dist, "get_backend", lambda: "nccl")
    monkeypatch.setattr(epsdpo.dist, "all_reduce", all_reduce)
    monkeypatch.setattr(torch.cuda, "current_device", current_device)
    with FakeTensorMode(allow_non_fake_inputs=True):  # rank 3's GPU, without a GPU
        baseline = epsdpo.BaselineBeta(0.1, 0.1)
        baseline.observe(torch.tensor([1, 0, -1]).to("cuda:3"))
        with pytest.raises(_Reduced):
            baseline.step()
        with pytest.raises(_Reduced):  # nothing observed: the device it was given
            epsdpo.BaselineBeta(0.1, 0.1, device="cuda:2").step()
    assert reduced_on == [torch.device("cuda:3"), torch.device("cuda:2")]
    with pytest.raises(ValueError, match=r"^under nccl the counts must be on this rank's GPU"):
        epsdpo.BaselineBeta(0.1, 0.1).step()  # on the CPU: refused, not moved to GPU 0
