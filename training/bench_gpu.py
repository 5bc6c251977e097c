"""The GPU check: what a training step costs on one GPU at Llama-3-8B's width, for four losses, in one command.

    python bench.py --gpu                # on CUDA: 2 decoder layers of Llama-3-8B's width, a few minutes on an H100
    python bench.py --gpu --reduced      # the same check at a reduced shape (the tests run it on the CPU)

The model: a Llama of 2 layers with Llama-3-8B's widths (H 4,096, intermediate 14,336, V 128,256, 32 heads, 8 of
keys and values), its reference a copy whose product weights are stored in bf16 (models.frozen_weights_in_bf16), a
batch of 4 pairs × 1,024 tokens (768 of them completion), float32 master weights under a bf16 autocast, fused
AdamW: train.py's setting. The same training step (both models' forward passes, the loss, backward, the AdamW step
and one read of the loss on the host, as train.py reads a step's sums once) with four losses:

    hidden     ε-DPO from the last hidden states (epsdpo_chunked.epsilon_dpo_loss_from_hidden): train.py at scale
    chunked    ε-DPO on the logits in chunks (epsdpo_chunked.epsilon_dpo_loss)
    full       ε-DPO on the full logits (epsdpo.epsilon_dpo_loss): the method as written
    dpo        plain DPO on the logits (epsdpo_chunked.sequence_logps of both models, epsdpo.dpo_loss)

For each: the median step time (after warm-up steps, compiling included in those), the peak memory above what is
allocated before a step (models, AdamW state), the host synchronizations in a step, and the graphs torch.compile
made. On CUDA the synchronizations are torch's own count (torch.cuda.set_sync_debug_mode); on a CPU,
bench_counts.HostSyncs follows the step as a GPU would run it, and there is no peak memory to read.
"""

import copy
import dataclasses
import statistics
import time
import warnings

import torch

import epsdpo
import epsdpo_chunked
from training import batches, bench_counts, models

BETA, EPSILON = 0.1, 0.01
LOSSES = {
    "hidden": "ε-DPO from hidden states",
    "chunked": "ε-DPO on chunked logits",
    "full": "ε-DPO on full logits",
    "dpo": "plain DPO on logits",
}


@dataclasses.dataclass
class Shape:
    vocab: int
    width: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    pairs: int
    length: int
    completion: int


LLAMA_3_8B_WIDTH = Shape(128_256, 4096, 14_336, 2, 32, 8, 4, 1024, 768)
REDUCED = Shape(512, 64, 224, 2, 4, 2, 2, 64, 48)


def models_and_batch(shape, device):
    """(policy, reference, batch): a random Llama of the shape, built on the device, its reference a copy with its
    product weights in bf16 (under autocast it computes the policy's logits), and a right-padded batch of random ids
    (batches.collate: on the device without waiting, the ids and mask also kept on the host)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.width,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        max_position_embeddings=shape.length,
    )
    with torch.device(device):  # initialized where it runs: seconds, not minutes, at 1.5 B weights
        policy = LlamaForCausalLM(config).eval()
    reference = models.frozen_weights_in_bf16(copy.deepcopy(policy).requires_grad_(False))
    generator = torch.Generator().manual_seed(0)
    prompt = shape.length - shape.completion

    def ids(length):
        return torch.randint(1, shape.vocab, (length,), generator=generator).tolist()

    pairs = [
        {"prompt_ids": ids(prompt), "chosen_ids": ids(shape.completion), "rejected_ids": ids(shape.completion - 8)}
        for _ in range(shape.pairs)
    ]
    return policy, reference, batches.collate(pairs, 0, device)


def loss_of_step(name, policy, reference, batch):
    """The loss of one micro-batch for loss `name` (a scalar to backward)."""
    inputs = dict(batches.model_inputs(batch.input_ids), use_cache=False)
    on_host = (batch.host_input_ids, batch.host_completion_mask)
    if name == "hidden":
        hidden, weight = models.last_hidden_states(policy, inputs)
        with torch.no_grad():
            ref_hidden, ref_weight = models.last_hidden_states(reference, inputs)
        return epsdpo_chunked.epsilon_dpo_loss_from_hidden(
            hidden, weight, ref_hidden, ref_weight, *on_host, BETA, EPSILON
        ).loss
    logits = policy(**inputs).logits  # (2B, T, V)
    with torch.no_grad():
        ref_logits = reference(**inputs).logits
    if name == "chunked":
        return epsdpo_chunked.epsilon_dpo_loss(logits, ref_logits, *on_host, BETA, EPSILON).loss
    if name == "full":  # epsdpo.py checks its inputs where they are: on the device
        return epsdpo.epsilon_dpo_loss(logits, ref_logits, batch.input_ids, batch.completion_mask, BETA, EPSILON).loss
    logps = epsdpo_chunked.sequence_logps(logits, *on_host)
    with torch.no_grad():
        ref_logps = epsdpo_chunked.sequence_logps(ref_logits, *on_host)
    half = len(logps) // 2
    losses, _, _ = epsdpo.dpo_loss(logps[:half], logps[half:], ref_logps[:half], ref_logps[half:], BETA)
    return losses.mean()


def training_step(name, policy, reference, batch, optimizer, autocast):
    with autocast:
        loss = loss_of_step(name, policy, reference, batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach().float().cpu()  # the one read a step, as train.py reads its sums


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def syncs_of_a_step(device, step, models_used, batch):
    """Host synchronizations in one step(batch): torch's own count on CUDA; on a CPU, those HostSyncs finds when the
    models and the batch's device tensors are taken as on a GPU (copies: on a CPU collate's device tensors are its
    host tensors)."""
    if device.type == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step(batch)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)
    on_device = ("input_ids", "attention_mask", "completion_mask", "noise")
    batch = dataclasses.replace(batch, **{name: getattr(batch, name).clone() for name in on_device})
    syncs = bench_counts.HostSyncs()
    for model in models_used:
        syncs.mark([*model.parameters(), *model.buffers()])
    syncs.mark([getattr(batch, name) for name in on_device])
    with syncs:
        step(batch)
    return len(syncs.syncs)


def compiled_graphs():
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def measure(name, shape, device, warmup, repeats):
    """{median_s, peak_above_models_mib (None on a CPU), syncs, graphs} of loss `name`, or {error} when it does not
    fit on the device."""
    policy, reference, batch = models_and_batch(shape, device)
    optimizer = models.make_optimizer(list(policy.parameters()), _Args(), device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)

    def step(batch=batch):
        return training_step(name, policy, reference, batch, optimizer, autocast)

    graphs_before = compiled_graphs()
    try:
        for _ in range(warmup):  # AdamW's state, compiling
            step()
        times = []
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            times.append(time.perf_counter() - start)
        peak = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            step()
            peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20
        syncs = syncs_of_a_step(device, step, (policy, reference), batch)
    except torch.OutOfMemoryError as error:
        return {"error": f"out of memory ({str(error).splitlines()[0][:120]})"}
    return {
        "median_s": statistics.median(times),
        "peak_above_models_mib": peak,
        "syncs": syncs,
        "graphs": compiled_graphs() - graphs_before,
    }


@dataclasses.dataclass
class _Args:  # what make_optimizer reads of train.py's arguments
    lr: float = 1e-6
    weight_decay: float = 0.0


def gpu_check(device, shape=LLAMA_3_8B_WIDTH, warmup=2, repeats=5, losses=tuple(LOSSES)):
    """Measure every loss on `device` at `shape` and print a table; returns {loss: figures}."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"GPU check on {name} (torch {torch.__version__}): a {shape.layers}-layer Llama, H {shape.width:,}, "
        f"intermediate {shape.intermediate:,}, V {shape.vocab:,};\n{shape.pairs} pairs × {shape.length:,} tokens "
        f"({shape.completion:,} completion); float32 master weights, bf16 autocast, "
        f"{'fused ' if device.type == 'cuda' else ''}AdamW; median of {repeats} steps after {warmup}"
    )
    print(f"{'loss':28}{'median step':>14}{'peak above the models':>24}{'host syncs a step':>20}{'graphs':>8}")
    results = {}
    for loss in losses:
        figures = results[loss] = measure(loss, shape, device, warmup, repeats)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the loss's models and optimizer are gone: their memory too
        if "error" in figures:
            print(f"{LOSSES[loss]:28}  {figures['error']}")
            continue
        peak = "–" if figures["peak_above_models_mib"] is None else f"{figures['peak_above_models_mib']:,.0f} MiB"
        print(
            f"{LOSSES[loss]:28}{figures['median_s'] * 1000:>11,.1f} ms{peak:>24}{figures['syncs']:>20}"
            f"{figures['graphs']:>8}"
        )
    logits_mib = 2 * shape.pairs * shape.length * shape.vocab * 4 / 2**20
    print(f"(one float32 (2B, T, V) logits tensor of this batch: {logits_mib:,.1f} MiB)")
    return results


def default_device():
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def run(device=None, reduced=False):
    """bench.py --gpu: the check on CUDA when present; a CPU runs it at the reduced shape only."""
    device = torch.device(device) if device else default_device()
    if device.type != "cuda" and not reduced:
        print("No GPU: the check runs at the reduced shape (--reduced) on the CPU.")
        reduced = True
    return gpu_check(device, REDUCED if reduced else LLAMA_3_8B_WIDTH, *((1, 2) if reduced else (2, 5)))
