"""What the GPU paths promise at Llama-3-8B's width, checked on the CPU: the loss's extra peak at real hidden sizes,
one wait for the device per optimizer step (every library's counted), the eager fallback of the compiled tiles, one
decision for all ranks, the end of a run shared across ranks, loading in the stored dtype, and the GPU check of
bench.py run at a reduced shape."""

import inspect
import os
import pathlib
import sys
import types
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests never download anything

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import epsdpo_chunked
from training import batches, bench_counts, evaluation, models, output_folder, sharding
from training.arguments import TINY_DATASET

ROOT = pathlib.Path(__file__).resolve().parent.parent


def tiny_llama(vocab=64, width=16, layers=1, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


# ----------------------------------------------------------------------------------------------------
# 1. The extra peak at the real width


@pytest.mark.parametrize("width", [4096, 8192])  # Llama-3-8B's, Llama-3-70B's
def test_the_loss_from_hidden_states_adds_under_a_tenth_of_one_float32_logits_tensor_at_real_widths(width):
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
# 3. The compiled tiles fall back to eager


def test_tiles_that_fail_to_compile_run_eagerly_with_the_same_values_and_say_so_once(monkeypatch):
    """A backend that fails (as inductor without Triton does): the loss gives the eager values and gradients, and one
    warning for the whole process, however many calls and bodies."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(40, 8, generator=generator).requires_grad_()
    ref_weight = weight.detach() + 0.1 * torch.randn(40, 8, generator=generator)
    input_ids = torch.randint(0, 40, (4, 10), generator=generator)
    completion_mask = torch.zeros(4, 10, dtype=torch.long)
    completion_mask[:, 4:] = 1
    hidden, ref_hidden = torch.randn(2, 4, 10, 8, generator=generator)
    hidden.requires_grad_()

    def loss_and_gradients():
        out = epsdpo_chunked.epsilon_dpo_loss_from_hidden(
            hidden, weight, ref_hidden, ref_weight, input_ids, completion_mask, 0.5, 0.3
        )
        return out.losses, out.s, *torch.autograd.grad(out.loss, (hidden, weight))

    eager = loss_and_gradients()
    attempts = []

    def failing_backend(graph, example_inputs):
        attempts.append(graph)
        raise RuntimeError("Cannot find a working triton installation (forced by the test)")

    monkeypatch.setattr(epsdpo_chunked, "COMPILE_BACKENDS", {"cpu": failing_backend})
    monkeypatch.setattr(epsdpo_chunked, "_compiled", {})
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            for value, expected in zip(loss_and_gradients(), eager, strict=True):
                torch.testing.assert_close(value, expected, rtol=0, atol=0)
    said = [str(w.message) for w in caught if "epsdpo_chunked" in str(w.message)]
    assert len(said) == 1 and "run eagerly" in said[0] and "Cannot find a working triton" in said[0], said
    assert len(attempts) == 1  # after the first failure nothing is compiled again


# ----------------------------------------------------------------------------------------------------
# 2. The waits: right-padded rows need no attention mask, and a step waits once


def test_right_padded_rows_give_the_same_outputs_at_every_token_without_an_attention_mask():
    """Causal attention and padding only after each row's tokens: every position that is not padding sees the same
    tokens with or without the mask, so its logits are the same; only the padding's own differ (nothing reads them)."""
    model = tiny_llama()
    pairs = [
        {"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9, 10, 11, 12], "rejected_ids": [13, 14]},
        {"prompt_ids": [3] * 9, "chosen_ids": [4], "rejected_ids": [20, 21, 22]},
    ]
    batch = batches.collate(pairs, 0, torch.device("cpu"))
    with torch.no_grad():
        masked = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        unmasked = model(**batches.model_inputs(batch.input_ids)).logits
    tokens = batch.attention_mask.bool()
    assert (~tokens).any()  # there is padding to ignore
    torch.testing.assert_close(unmasked[tokens], masked[tokens], rtol=1e-5, atol=1e-6)


def patch_everywhere(monkeypatch, function, wrapper):
    """Replace `function` by `wrapper` in every module of this project that holds it (scripts import names)."""
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None) or ""
        if str(ROOT) in path and getattr(module, function.__name__, None) is function:
            monkeypatch.setattr(module, function.__name__, wrapper)


class Waits(bench_counts.HostSyncs):
    """HostSyncs that records which library waits: the first frame outside torch, by its file's path."""

    def record(self, what):
        if self.paused:
            return
        for frame in inspect.stack()[2:]:
            if not bench_counts._in_torch(frame.filename) and frame.filename != bench_counts.__file__:
                path = pathlib.Path(frame.filename)
                library = "transformers" if "transformers" in path.parts else path.name
                self.syncs.append((what, library))
                return


def waits_per_step(tmp_path, monkeypatch, arguments):
    """Each optimizer step's waits for the device in a real train.py run, followed as a GPU runs it: the models'
    weights and every batch copied to the device are device tensors (bench_counts.HostSyncs), and every library's
    waits are recorded (transformers', torch's under our calls). Evaluation, the criterion's figure and saving are
    left out."""
    import train

    waits, steps, depth = Waits(), [], [0]
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
            steps.append(list(waits.syncs))
            waits.syncs.clear()
        return real_append(output_dir, row)

    real_setup, real_collate, real_append = models.setup_models, batches.collate, output_folder.append_metrics
    patch_everywhere(monkeypatch, models.setup_models, mark_models)
    patch_everywhere(monkeypatch, batches.to_device, lambda tensors, device: waits.mark([t.clone() for t in tensors]))
    patch_everywhere(monkeypatch, batches.collate, collate)
    patch_everywhere(monkeypatch, output_folder.append_metrics, append_metrics)
    for function in (evaluation.evaluate, evaluation.criterion_measures, sharding.gathered_state_dict):
        patch_everywhere(monkeypatch, function, paused(function))
    with waits:
        train.main(["--output-dir", str(tmp_path / "out"), "--eval-every", "1000", *arguments])
    return steps


@pytest.mark.parametrize("grad_accum", [1, 3])
def test_an_optimizer_step_waits_for_the_device_once_counting_every_librarys_waits(tmp_path, monkeypatch, grad_accum):
    """At scale (the loss from hidden states), with G micro-batches a step: one wait a step, this project's reading
    the step's sums back (evaluation.gather_from_every_rank); none in transformers (no attention mask to inspect: it
    waited 4 times a micro-batch) nor in torch's code under ours, whatever G."""
    monkeypatch.setattr(sys.modules["training.loss"], "PLAIN_LOSS_BYTES", 0)
    folder = tmp_path / "data"
    folder.mkdir()
    for split, rows in (("train", 24), ("test", 4)):
        lines = (TINY_DATASET / f"{split}.jsonl").read_text().splitlines()[:rows]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    arguments = ["--dataset", str(folder), "--batch-size", "2", "--max-steps", "2", "--grad-accum", str(grad_accum)]
    steps = waits_per_step(tmp_path, monkeypatch, [*arguments, "--criterion-pairs", "0"])
    assert steps == [[("Tensor.cpu", "evaluation.py")]] * 2


# ----------------------------------------------------------------------------------------------------
# 4 and 5. One decision for all ranks; the criterion's figure shared across ranks, each model run once a batch


def criterion_pairs():
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


def test_ranks_take_one_decision_and_share_the_criterions_pairs_running_each_model_once_a_batch(tmp_path):
    """Two gloo ranks: rank 1 alone has no room to keep units gathered, and both then answer no (one decision, else
    their all-gathers would not match). The criterion's measures of 5 pairs: each rank computes its share (3 and 2,
    padded to 3: 2 batches of 2, then the curves' batch), and both get all 5 back in order, as one process computes
    them (4 batches with the curves'), each batch running the policy once (twice before: the loss, then the KL)."""
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
# 6. Loading: process 0 reads the weights in the dtype they are stored in


def test_process_zero_reads_weights_in_their_stored_dtype_whose_float32_upcast_is_a_float32_read(tmp_path):
    """A model saved in bf16 (as Llama-3's weights are): read_weights keeps bf16 (half the memory of a float32
    read), and their upcast is exactly what a float32 read gives, as each process casts its float32 shards."""
    tiny_llama().to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    stored = models.read_weights(str(tmp_path / "bf16"), False)
    float32 = models.load_model(str(tmp_path / "bf16"), torch.device("cpu"), False).state_dict()
    assert {value.dtype for value in stored.values() if value.is_floating_point()} == {torch.bfloat16}
    assert stored.keys() == float32.keys()
    for name, value in stored.items():
        assert torch.equal(value.float(), float32[name]) and float32[name].dtype == torch.float32, name


# ----------------------------------------------------------------------------------------------------
# 7. Long runs on real clusters: the collectives' timeout, the allocator, fused AdamW


def test_the_process_group_times_out_after_dist_timeout_and_the_allocator_grows_segments_unless_told(monkeypatch):
    import datetime

    import torch.distributed as dist

    from training.arguments import parse_args

    joined = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kwargs: joined.append((backend, kwargs)))
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    args, _ = parse_args(["--dist-timeout", "45"])
    assert models.init_distributed("cpu", args.dist_timeout) == (0, 2, torch.device("cpu"))
    assert joined == [("gloo", {"timeout": datetime.timedelta(minutes=45)})]
    assert parse_args([])[0].dist_timeout == models.DIST_TIMEOUT_MINUTES == 30  # torch's own: 10 minutes
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")  # a user's own setting stays
    models.init_distributed("cpu")
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:512"
    weights, args = [torch.nn.Parameter(torch.zeros(3))], parse_args([])[0]
    assert models.make_optimizer(weights, args, torch.device("cuda")).defaults["fused"] is True
    assert not models.make_optimizer(weights, args, torch.device("cpu")).defaults["fused"]  # foreach, as before


# ----------------------------------------------------------------------------------------------------
# 8. The GPU check, at a reduced shape on the CPU


def test_the_gpu_check_runs_every_loss_at_a_reduced_shape_and_counts_one_wait_a_step(capsys):
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
