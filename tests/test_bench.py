"""What a step costs at scale, counted on the CPU: torch operations per loss (each one a kernel launch on a GPU),
host synchronizations and collectives per optimizer step; and bench.py --quick, which reports them."""

import inspect
import json
import math
import pathlib
import sys

import pytest
import torch

import bench
import epsdpo
import epsdpo_chunked
import train
from tests.helpers import tiny_data_cut
from training import batches, bench_counts, evaluation, loss, models, output_folder, sharding
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


@pytest.mark.parametrize("width", [4096, 8192])  # Llama-3-8B's, Llama-3-70B's
def test_the_hidden_loss_adds_under_a_tenth_of_the_logits_at_real_widths(width):
    """4 pairs × 1,024 tokens (768 scored) at V = 128,256, bf16 hidden states (the policy's with a gradient), the
    policy's output weight in float32 (mixed precision's master copy) and the reference's in bf16, forward and backward
    under a bf16 autocast, counted on FakeTensors: the storages alive at once beyond the inputs and the two gradients
    the loss returns stay under 0.1 × one float32 (2B, T, V) logits tensor. So no (V, H) buffer besides the weight's
    own gradient: a bf16 copy of the weight alone would be 0.25 × at H = 4,096 and 0.5 × at 8,192."""
    costs = bench_counts.loss_costs("hidden", width=width)
    assert costs["extra_peak"] <= 0.1 * costs["logits"], costs["extra_peak"] / costs["logits"]
    # The weight's gradient is the one (V, H) buffer: with it and h's gradient counted, under 0.1 × more.
    gradients = 128_256 * width * 4 + 8 * 1024 * width * 2
    assert costs["extra_peak_with_gradients"] <= costs["extra_peak"] + gradients


# ----------------------------------------------------------------------------------------------------
# Host synchronizations and collectives per optimizer step


def patch_everywhere(monkeypatch, function, wrapper):
    """Replace `function` by `wrapper` in every module of this project that holds it (scripts import names)."""
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None) or ""
        if str(ROOT) in path and getattr(module, function.__name__, None) is function:
            monkeypatch.setattr(module, function.__name__, wrapper)


class Waits(bench_counts.HostSyncs):
    """HostSyncs that records which library waits: the first frame outside torch, by its file's name ("transformers"
    for any of transformers' files)."""

    def record(self, what):
        if self.paused:
            return
        for frame in inspect.stack()[2:]:
            if not bench_counts._in_torch(frame.filename) and frame.filename != bench_counts.__file__:
                path = pathlib.Path(frame.filename)
                library = "transformers" if "transformers" in path.parts else path.name
                self.syncs.append((what, library))
                return


def waits_and_collectives_per_step(tmp_path, monkeypatch, arguments, in_a_group):
    """Each optimizer step's waits for the device and collectives in a real train.py run, followed as a GPU runs it:
    the models' weights and every batch copied to the device are device tensors (bench_counts.HostSyncs), and every
    library's waits are recorded (transformers', torch's under this project's calls). in_a_group: the run is rank 0 of
    a gloo process group of one, and makes the collectives of a multi-process run. [(waits, collectives)] per step,
    waits as (what, where); evaluation, the criterion's figure and saving are left out, and so is everything before
    the first training batch (loading)."""
    import torch.distributed as dist

    waits, collectives, steps, depth = Waits(), [], [], [0]
    waits.paused = True  # until the first training batch

    def mark_models(*args, **kwargs):
        built = real_setup(*args, **kwargs)
        for model in (built.policy, built.reference):
            waits.mark([*model.parameters(), *model.buffers()])
        return built

    def paused(function):
        def run_paused(*args, **kwargs):
            depth[0], waits.paused = depth[0] + 1, True
            try:
                return function(*args, **kwargs)
            finally:
                depth[0] -= 1

        return run_paused

    def collate(*args, **kwargs):
        waits.paused = waits.paused if depth[0] else False  # a training batch: its step is followed
        return real_collate(*args, **kwargs)

    def append_metrics(output_dir, row):
        if row["split"] == "train":
            steps.append((list(waits.syncs), list(collectives)))
            waits.syncs.clear(), collectives.clear()
        return real_append(output_dir, row)

    def counted(name):
        real = getattr(dist, name)

        def collective(*args, **kwargs):
            if not waits.paused:
                collectives.append(name)
            return real(*args, **kwargs)

        return collective

    collective_names = ("all_gather", "all_reduce", "all_gather_object", "broadcast", "broadcast_object_list")
    for name in (*collective_names, "barrier", "reduce_scatter"):
        monkeypatch.setattr(dist, name, counted(name))
    real_setup, real_collate, real_append = models.setup_models, batches.collate, output_folder.append_metrics
    patch_everywhere(monkeypatch, models.setup_models, mark_models)
    patch_everywhere(monkeypatch, batches.to_device, lambda tensors, device: waits.mark([t.clone() for t in tensors]))
    patch_everywhere(monkeypatch, batches.collate, collate)
    patch_everywhere(monkeypatch, output_folder.append_metrics, append_metrics)
    for function in (evaluation.evaluate, evaluation.criterion_measures, sharding.gathered_state_dict):
        patch_everywhere(monkeypatch, function, paused(function))
    if in_a_group:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        with waits:
            train.main(["--output-dir", str(tmp_path / "out"), "--eval-every", "1000", *arguments])  # ends the group
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert not waits.syncs and not collectives  # nothing after the last step's metrics
    return steps


@pytest.mark.parametrize("grad_accum, in_a_group", [(1, False), (3, False), (3, True)])
def test_a_step_at_scale_waits_once_and_makes_one_collective_whatever_g(tmp_path, monkeypatch, grad_accum, in_a_group):
    """At scale (loss.PLAIN_LOSS_BYTES = 0: the loss from hidden states), an optimizer step of G micro-batches waits
    for the device once, whatever G: this project's reading of the step's sums (evaluation.gather_from_every_rank's
    .cpu()), not once per micro-batch; none in transformers (right-padded rows are given no attention mask, whose
    causal-mask builder waited 4 times a micro-batch) nor in torch's code under this project's. In a process group
    the step makes one collective, the all_gather of those sums; alone, none."""
    monkeypatch.setattr(loss, "PLAIN_LOSS_BYTES", 0)
    arguments = ["--dataset", str(tiny_data_cut(tmp_path / "data", 24, 4)), "--batch-size", "2", "--max-steps", "2"]
    steps = waits_and_collectives_per_step(
        tmp_path, monkeypatch, [*arguments, "--grad-accum", str(grad_accum), "--criterion-pairs", "0"], in_a_group
    )
    assert steps == [([("Tensor.cpu", "evaluation.py")], ["all_gather"] if in_a_group else [])] * 2


def test_the_gpu_check_runs_every_loss_at_a_reduced_shape_waiting_once(capsys):
    """bench.py --gpu's measurements, on the CPU at a reduced shape: every loss trains a step; a step waits once (its
    one read of the loss) but for the method as written on full logits, whose input checks wait once more; nothing is
    compiled on a CPU."""
    from training import bench_gpu

    results = bench_gpu.gpu_check(torch.device("cpu"), bench_gpu.REDUCED, warmup=0, repeats=1)
    assert {name: figures["syncs"] for name, figures in results.items()} == {
        "hidden": 1,
        "chunked": 1,
        "full": 2,
        "dpo": 1,
    }
    assert all(figures["graphs"] == 0 and figures["median_s"] > 0 for figures in results.values())
    printed = capsys.readouterr().out
    assert "GPU check on CPU" in printed and all(label in printed for label in bench_gpu.LOSSES.values())


# ----------------------------------------------------------------------------------------------------
# bench.py


@pytest.mark.slow
def test_the_quick_benchmark_runs_and_reports_every_figure(tmp_path, monkeypatch, capsys):
    """python bench.py --quick --device cpu --json PATH, run in this process: its variants run in processes forked
    from it, as from bench.py's own (a fresh interpreter would add seconds of imports, and measure nothing more)."""
    report_path = tmp_path / "bench.json"
    monkeypatch.setattr(sys, "argv", ["bench.py", "--quick", "--device", "cpu", "--json", str(report_path)])
    bench.main()
    report = json.loads(report_path.read_text())
    assert [run["shape"] for run in report["runs"]] == ["tiny_data", "realistic-small"]
    for run in report["runs"]:
        assert set(run["variants"]) == {"dpo", "epsilon-dpo", "hidden", "backbone", "naive", "dpo-precomputed"}
        for figures in run["variants"].values():
            assert figures["median_s"] > 0 and math.isfinite(figures["peak_mib"]) and len(figures["times_s"]) >= 3
        assert len(run["extra_times_s"]) == 3  # --quick: three rounds
        assert run["inherent"]["median_s"] > 0 and all(math.isfinite(value) for value in run["ratios"].values())
    # The reference's logits, (2B, T, V) float32 at realistic-small's 1 pair × 128 tokens and V = 8,000, and what
    # ε-DPO adds to a DPO step's peak: under half of them (the README: no more memory than DPO)
    inherent, ratios = report["runs"][1]["inherent"], report["runs"][1]["ratios"]
    assert inherent["ref_logits_mib"] == 2 * 1 * 128 * 8000 * 4 / 2**20 and inherent["vocab"] == 8000
    assert ratios["extra_memory_over_ref_logits"] < 0.5, ratios
    realistic = report["runs"][1]["variants"]
    # Keeping the perturbed full-vocabulary tensors in the graph costs memory that epsdpo.py does not spend.
    assert realistic["naive"]["peak_mib"] > 1.5 * realistic["epsilon-dpo"]["peak_mib"]
    # And the loss from hidden states adds less to the step's peak than the loss from logits.
    assert realistic["hidden"]["peak_mib"] < realistic["epsilon-dpo"]["peak_mib"]
    assert "extra_time_over_inherent_work" in capsys.readouterr().out
    # Both losses at scale (4 pairs × 1,024 tokens, V = 128,256): operations and extra peak, counted on FakeTensors.
    (costs,) = report["loss_costs"].values()
    assert costs["hidden"]["operations"] <= 1000 and costs["hidden"]["extra_peak"] <= 0.1 * costs["hidden"]["logits"]
    assert costs["logits"]["operations"] > 0 and costs["logits"]["extra_peak"] > costs["hidden"]["extra_peak"]


def test_a_cpu_step_peak_counts_memory_freed_before_the_fork():
    """bench.py measures each variant in a process forked from its own; forked from one whose heap holds freed
    memory (a pytest worker after other tests), a step reused it unseen and its peak read 0 MiB."""
    blocks = [bytearray(3000) for _ in range(100_000)]  # 300 MB of small blocks in malloc's heap,
    kept = blocks[::100]  # one in a hundred kept, so that the freed ones stay in the heap between them
    del blocks
    shape = bench.QUICK_SHAPES["tiny_data"]
    assert bench._in_own_process(bench.measure_step_memory, shape, "dpo", torch.device("cpu")) > 1
    del kept
