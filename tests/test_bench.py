"""What a step costs at scale, counted on the CPU: torch operations per loss (each one a kernel launch on a GPU),
host synchronizations and collectives per optimizer step; and bench.py --quick, which reports them."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import epsdpo
import epsdpo_chunked
import train
from training import batches, bench_counts, evaluation, loss
from training.arguments import ROOT

# ----------------------------------------------------------------------------------------------------
# Torch operations per loss: on a GPU each is a kernel launch, so their number must follow the batch


class _CountOperations(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the torch operations dispatched while it is on."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def operations_of_a_step(vocab, dtype, completion_tokens=256, num_pairs=4, impl=epsdpo_chunked):
    """Torch operations one epsilon_dpo_loss forward + backward dispatches for a batch of pairs."""
    generator = torch.Generator().manual_seed(0)
    length = 44 + completion_tokens
    ref_logits = torch.randn(2 * num_pairs, length, vocab, generator=generator).to(dtype)
    policy_logits = (ref_logits + 0.1 * torch.randn(ref_logits.shape, generator=generator).to(dtype)).requires_grad_()
    input_ids = torch.randint(0, vocab, (2 * num_pairs, length), generator=generator)
    completion_mask = torch.zeros(2 * num_pairs, length, dtype=torch.long)
    completion_mask[:, 44:] = 1
    with _CountOperations() as counter:
        impl.epsilon_dpo_loss(policy_logits, ref_logits, input_ids, completion_mask, 0.1, 0.01).loss.backward()
    return counter.count


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_operations_follow_the_rows_not_the_vocabulary_or_length(dtype):
    operations = operations_of_a_step(16, dtype)
    assert operations <= 500
    assert operations_of_a_step(2048, dtype) == operations  # vocabulary × 128
    assert operations_of_a_step(16, dtype, completion_tokens=512) == operations
    assert operations_of_a_step(16, dtype, num_pairs=8) > operations  # rows: more operations
    # What the counts above stand for: with the real chunk budget, each of the 8 rows of 4 pairs × 256
    # completion tokens is one chunk up to a 262,144-word vocabulary, and is split only beyond it.
    completion_mask = torch.zeros(8, 300, dtype=torch.long)
    completion_mask[:, 44:] = 1
    input_ids = torch.zeros(8, 300, dtype=torch.long)
    assert (
        len(
            epsdpo_chunked._scored_positions(
                input_ids, completion_mask, torch.empty(0, 0, 262_144, device="meta")
            ).chunks
        )
        == 8
    )
    assert (
        len(
            epsdpo_chunked._scored_positions(
                input_ids, completion_mask, torch.empty(0, 0, 262_145, device="meta")
            ).chunks
        )
        == 16
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_plain_loss_is_a_few_operations_whatever_the_batch(dtype):
    operations = operations_of_a_step(16, dtype, impl=epsdpo)
    assert operations <= 160
    for shape in (dict(vocab=2048), dict(vocab=16, completion_tokens=512), dict(vocab=16, num_pairs=8)):
        assert operations_of_a_step(dtype=dtype, impl=epsdpo, **shape) == operations


def test_the_hidden_state_loss_takes_under_1000_operations_at_any_size():
    """At 4 pairs × 1,024 tokens (768 of them completion) and V = 128,256, as train.py runs it in bf16: at most 1,000
    torch operations forward and backward, and an extra peak of at most 0.1 × one float32 logits tensor; the same
    count at twice the length and twice the vocabulary (MAX_CHUNKS chunks, however large). It runs on FakeTensors,
    which cannot be read: no host read of a device value. FakeTensors count as real ones (checked small)."""

    def operations(**shape):
        return bench_counts.loss_costs("hidden", **shape)["operations"]

    small = dict(length=64, completion=40, vocab=300, width=8)
    assert operations(**small) == operations(**small, fake=False)
    costs = bench_counts.loss_costs("hidden")  # 4 pairs × 1,024 tokens, V = 128,256
    assert costs["operations"] <= 1000 and costs["extra_peak"] <= 0.1 * costs["logits"], costs
    assert operations(vocab=256_000) == operations(length=2048, completion=1536) == costs["operations"]
    # Before the cap the number of chunks follows the scored float32 logits: fewer operations, not more.
    assert operations(vocab=32_000, length=512, completion=256) < costs["operations"]


# ----------------------------------------------------------------------------------------------------
# Host synchronizations and collectives per optimizer step


def syncs_and_collectives_per_step(tmp_path, monkeypatch, arguments):
    """Each optimizer step's host synchronizations and collectives in a real train.py run on one gloo rank, followed as
    a GPU would run it (bench_counts.HostSyncs): the models' weights and every batch copied to the device are device
    tensors. [(syncs, collectives)] per step: syncs as (what, where); evaluation left out (it runs every --eval-every
    steps), and everything before the first training batch and after the last step (loading, saving)."""
    import torch.distributed as dist
    from torch.utils._python_dispatch import _disable_current_modes as disable_current_modes

    syncs, collectives, steps = bench_counts.HostSyncs(), [], []
    syncs.paused = True  # until the first training batch

    def wrap(module, name, before=None, pause=False):
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            if before:
                before(*args)
            if not pause:
                return real(*args, **kwargs)
            paused, syncs.paused = syncs.paused, True
            try:
                with disable_current_modes():  # not followed: it runs at full speed
                    return real(*args, **kwargs)
            finally:
                syncs.paused = paused

        monkeypatch.setattr(module, name, wrapper)

    def end_of_step(output_dir, row):
        if row["split"] == "train":
            steps.append((list(syncs.syncs), list(collectives)))
            syncs.syncs.clear(), collectives.clear()

    for name in (
        "all_gather",
        "all_reduce",
        "all_gather_object",
        "broadcast",
        "broadcast_object_list",
        "barrier",
        "reduce_scatter",
    ):
        wrap(dist, name, before=lambda *_, name=name: None if syncs.paused else collectives.append(name))

    def copy(tensors, device):  # to the device, not waiting
        return syncs.mark([tensor.clone() for tensor in tensors])

    monkeypatch.setattr(batches, "to_device", copy)
    monkeypatch.setattr(evaluation, "to_device", copy)  # the step's flags, in evaluation.gather_step
    real_setup = train.setup_models

    def setup_on_the_device(*args):
        built = real_setup(*args)
        for model in (built.policy, built.reference):
            syncs.mark([*model.parameters(), *model.buffers()])
        return built

    monkeypatch.setattr(train, "setup_models", setup_on_the_device)
    wrap(train, "collate", before=lambda *_: setattr(syncs, "paused", False))  # the training loop's batches
    wrap(train, "evaluate", pause=True)
    wrap(train, "criterion_measures", pause=True)
    wrap(train, "append_metrics", before=end_of_step)
    wrap(train, "gathered_state_dict", before=lambda *_: setattr(syncs, "paused", True))  # saving, after the last step
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        with syncs:
            train.main(
                ["--output-dir", str(tmp_path / "out"), "--eval-every", "1000", *arguments]
            )  # main ends the group
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert not syncs.syncs and not collectives  # nothing after the last step's metrics
    return steps


def test_an_optimizer_step_at_scale_makes_one_collective_and_one_host_sync(tmp_path, monkeypatch, small_data):
    """At scale (loss.PLAIN_LOSS_BYTES = 0: the loss from hidden states), each optimizer step of 3 micro-batches
    makes one collective, the all_gather of the step's sums, and one host synchronization of this project's, reading
    them back: not one per micro-batch. The models' forward passes no longer wait in transformers' causal-mask builder:
    right-padded rows are given no attention mask (batches.model_inputs)."""
    monkeypatch.setattr(loss, "PLAIN_LOSS_BYTES", 0)
    grad_accum = 3
    steps = syncs_and_collectives_per_step(
        tmp_path, monkeypatch, ["--max-steps", "2", "--grad-accum", str(grad_accum), *small_data]
    )
    assert len(steps) == 2
    for syncs, collectives in steps:
        assert collectives == ["all_gather"]
        ours = [sync for sync in syncs if not sync[1].startswith("masking_utils.py")]
        assert [where.split(":")[0] for _, where in ours] == ["evaluation.py"], ours  # gather_from_every_rank: .cpu()
        assert [what for what, _ in syncs if (what, _) not in ours] == []  # no mask: transformers reads none


# ----------------------------------------------------------------------------------------------------
# bench.py


@pytest.mark.slow
def test_the_quick_benchmark_runs_and_reports_every_figure(tmp_path):
    report_path = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "bench.py", "--quick", "--device", "cpu", "--json", str(report_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(report_path.read_text())
    assert [run["shape"] for run in report["runs"]] == ["tiny_data", "realistic-small"]
    for run in report["runs"]:
        assert set(run["variants"]) == {"dpo", "epsilon-dpo", "hidden", "backbone", "naive", "dpo-precomputed"}
        for figures in run["variants"].values():
            assert figures["median_s"] > 0 and math.isfinite(figures["peak_mib"]) and len(figures["times_s"]) >= 3
        assert len(run["extra_times_s"]) == 3  # --quick: three rounds
        assert run["inherent"]["median_s"] > 0 and all(math.isfinite(value) for value in run["ratios"].values())
    # The reference's logits, (2B, T, V) float32 at realistic-small's 1 pair × 128 tokens and V = 8,000, and what ε-DPO
    # adds to a DPO step's peak: under half of them (the README: no more memory than DPO)
    inherent, ratios = report["runs"][1]["inherent"], report["runs"][1]["ratios"]
    assert inherent["ref_logits_mib"] == 2 * 1 * 128 * 8000 * 4 / 2**20 and inherent["vocab"] == 8000
    assert ratios["extra_memory_over_ref_logits"] < 0.5, ratios
    realistic = report["runs"][1]["variants"]
    # Keeping the perturbed full-vocabulary tensors in the graph costs memory that epsdpo.py does not spend.
    assert realistic["naive"]["peak_mib"] > 1.5 * realistic["epsilon-dpo"]["peak_mib"]
    # And the loss from hidden states adds less to the step's peak than the loss from logits.
    assert realistic["hidden"]["peak_mib"] < realistic["epsilon-dpo"]["peak_mib"]
    assert "extra_time_over_inherent_work" in result.stdout
    # Both losses at scale (4 pairs × 1,024 tokens, V = 128,256): operations and extra peak, counted on FakeTensors.
    (costs,) = report["loss_costs"].values()
    assert costs["hidden"]["operations"] <= 1000 and costs["hidden"]["extra_peak"] <= 0.1 * costs["hidden"]["logits"]
    assert costs["logits"]["operations"] > 0 and costs["logits"]["extra_peak"] > costs["hidden"]["extra_peak"]
