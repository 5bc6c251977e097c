"""What an ε-DPO training step costs over a DPO step, measured side by side.

    python bench.py                      # every shape, CPU (and CUDA when present); slow on a CPU: realistic-128k
                                         # alone, with --repeats 2, took 9 minutes on 2 cores
    python bench.py --quick              # smaller shapes and fewer steps, under a minute: a smoke test
    python bench.py --json bench.json    # also write every figure to a file
    python bench.py --costs              # only the losses' operations and extra peaks at scale (below); seconds
    python bench.py --memory             # memory computed from public models' shapes: the bf16 reference, DDP
                                         # against FSDP per GPU (--gpus 8), full fine-tuning against LoRA
                                         # (and that table measured on tiny_data); about a minute (bench_memory.py)
    python bench.py --hidden-memory      # peak memory of the loss from hidden states against from logits at
                                         # 128k words (a train.py run with criterion.png, and the loss alone);
                                         # minutes on 2 cores (bench_memory.py)
    python bench.py --shape realistic-128k --repeats 3   # one shape, fewer steps
    python bench.py --gpu                # the GPU check (bench_gpu.py): one training step at Llama-3-8B's width
                                         # (2 layers) for ε-DPO from hidden states, on chunked logits, on full logits
                                         # and plain DPO: step time, peak memory, host syncs, compiled graphs; a few
                                         # minutes on one H100; --reduced: at a small shape, as the tests run it

The same training step (forward, loss, backward, AdamW step), on the same model, batch and seed, six ways:
  dpo              DPO through epsdpo.py, the reference's logits computed live (as ε-DPO needs them)
  epsilon-dpo      ε-DPO through epsdpo_chunked.epsilon_dpo_loss (from logits in chunks)
  hidden           ε-DPO through epsdpo_chunked.epsilon_dpo_loss_from_hidden, as train.py runs it: never (2B, T, V)
  backbone         no loss at all: both models' last hidden states, a zero loss on them, backward through the policy;
                   what a step costs before any loss, so that peak − backbone's peak is what a loss adds
  naive            ε-DPO the way the authors' trainer does it: perturbed logits for the whole (2B, T, V)
                   tensor, in the model's dtype, inside the autograd graph, log-softmax over everything
  dpo-precomputed  DPO with the reference's log-probabilities computed once beforehand (no reference forward
                   in the step): what ε-DPO gives up, since its criterion needs the reference's logits
and the inherent extra work of ε-DPO: one subtraction and two float32 logsumexps over
(completion positions × vocabulary), the least any implementation must add to a DPO step.

Per variant: the median step time after warm-up, and the step's peak memory: on CUDA
torch.cuda.max_memory_allocated; on CPU the growth of the process's peak resident memory over one step,
each variant in its own process (forked, so that no two share a high-water mark).

Then, for both ε-DPO losses at scale (from logits in chunks, and from hidden states), what one forward and backward
costs a GPU at 4 pairs × 1,024 tokens (768 of them completion) and V = 128,256, in bf16 as train.py runs them: the
torch operations dispatched (each a kernel launch or more) and the extra peak memory, counted on FakeTensors by
bench_counts.loss_costs (shapes without memory: a CPU counts them in seconds); also at twice T and twice V, and the
loss from hidden states at Llama-3-8B's and Llama-3-70B's hidden sizes (4,096 and 8,192).
"""

import argparse
import contextlib
import copy
import json
import multiprocessing
import os
import pathlib
import platform
import statistics
import time

import torch
import torch.nn.functional as F
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import epsdpo
import epsdpo_chunked
from training import arguments, batches, bench_counts, bench_gpu, bench_memory, data, models
from training.bench_counts import cpu_memory_kib, glibc_malloc_option, glibc_release_free_memory

transformers.utils.logging.disable_progress_bar()

BETA, EPSILON = 0.1, 0.01
VARIANTS = ("dpo", "epsilon-dpo", "hidden", "backbone", "naive", "dpo-precomputed")
# name: (vocabulary, hidden size, layers, pairs, tokens per sequence, completion tokens); None = the tiny_data model
SHAPES = {"tiny_data": None, "realistic": (32000, 256, 2, 4, 384, 256), "realistic-128k": (128256, 256, 2, 4, 384, 256)}
# The naive variant keeps about ten (2B, T, V) float32 tensors: beyond this vocabulary it is left out (15 GB at 128k).
NAIVE_LARGEST_VOCAB = 64000
QUICK_SHAPES = {"tiny_data": None, "realistic-small": (8000, 128, 2, 1, 128, 64)}


# ----------------------------------------------------------------------------------------------------
# The models and the batch


def make_models_and_batch(shape, device):
    """(policy, reference, input_ids, attention_mask, completion_mask), the same for every variant."""
    torch.manual_seed(0)
    if shape is None:
        defaults, _ = arguments.parse_args([])  # train.py's defaults: 16 pairs
        reference = AutoModelForCausalLM.from_pretrained(arguments.TINY_MODEL)
        tokenizer = AutoTokenizer.from_pretrained(arguments.TINY_MODEL)
        rows = [json.loads(line) for line in open(arguments.TINY_DATASET / "train.jsonl")][: defaults.batch_size]
        pairs = [data.tokenize_pair(row, tokenizer, defaults.max_length, defaults.max_prompt_length) for row in rows]
        batch = batches.collate(pairs, tokenizer.pad_token_id, torch.device("cpu"))
        input_ids, attention_mask, completion_mask = batch.input_ids, batch.attention_mask, batch.completion_mask
    else:
        vocab, hidden, layers, pairs, length, completion = shape
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=4 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=length,
        )
        reference = LlamaForCausalLM(config)
        input_ids = torch.randint(0, vocab, (2 * pairs, length))
        attention_mask = torch.ones_like(input_ids)
        completion_mask = torch.zeros_like(input_ids)
        completion_mask[:, length - completion :] = 1
    # As train.py runs them: the policy in float32; on a GPU with bf16, the reference's product weights stored in
    # bf16 and every forward pass under autocast (mixed precision).
    reference = reference.to(device).eval().requires_grad_(False)
    policy = copy.deepcopy(reference).requires_grad_(True)
    with torch.no_grad():  # a policy a little away from the reference, so s is not all 0
        for parameter in policy.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    if models.precision("auto", device):
        models.frozen_weights_in_bf16(reference)
    return policy, reference, input_ids.to(device), attention_mask.to(device), completion_mask.to(device)


# ----------------------------------------------------------------------------------------------------
# The four training steps


def naive_logps(logits, input_ids, completion_mask):
    """Sequence log-probabilities the common way: a full-vocabulary log-softmax in the model's dtype."""
    token_logps = torch.gather(logits[:, :-1].log_softmax(-1), 2, input_ids[:, 1:, None]).squeeze(2)
    return (token_logps * completion_mask[:, 1:]).sum(-1)


def naive_epsilon_dpo_loss(logits, ref_logits, input_ids, completion_mask, baseline_beta):
    """ε-DPO as the authors' trainer computes it: the perturbed logits of the whole (2B, T, V) tensor, in the
    model's dtype, inside the autograd graph, every intermediate kept alive until backward."""
    half = input_ids.shape[0] // 2
    logps = naive_logps(logits, input_ids, completion_mask)
    ref_logps = naive_logps(ref_logits, input_ids, completion_mask)
    weaker_logps = naive_logps(ref_logits + (1 + EPSILON) * (logits - ref_logits), input_ids, completion_mask)
    stronger_logps = naive_logps(ref_logits + (1 - EPSILON) * (logits - ref_logits), input_ids, completion_mask)
    z_theta, z_weaker, z_stronger = (x[:half] - x[half:] for x in (logps, weaker_logps, stronger_logps))
    s = ((z_weaker > z_theta) & (z_theta > z_stronger)).long() - ((z_weaker < z_theta) & (z_theta < z_stronger)).long()
    baseline_beta.observe(s)
    margins = z_theta - (ref_logps[:half] - ref_logps[half:])
    return -F.logsigmoid(baseline_beta.value / (1 + EPSILON * s) * margins).mean()


def make_step(variant, policy, reference, input_ids, attention_mask, completion_mask):
    """A closure that runs one training step of the variant: forward, loss, backward, AdamW step."""
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    autocast = models.precision("auto", input_ids.device) or contextlib.nullcontext()
    baseline_beta = epsdpo.BaselineBeta(BETA, EPSILON)
    half = input_ids.shape[0] // 2
    model_inputs = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    with torch.no_grad(), autocast:
        precomputed_ref_logps = epsdpo_chunked.sequence_logps(
            reference(**model_inputs).logits, input_ids, completion_mask
        )

    def mean_dpo_loss(logps, ref_logps):
        losses, _, _ = epsdpo.dpo_loss(logps[:half], logps[half:], ref_logps[:half], ref_logps[half:], BETA)
        return losses.mean()

    def loss_of_step():
        if variant in ("hidden", "backbone"):
            hidden, weight = models.last_hidden_states(policy, model_inputs)
            with torch.no_grad():
                ref_hidden, ref_weight = models.last_hidden_states(reference, model_inputs)
            if variant == "backbone":
                return (hidden * 0).sum()
            out = epsdpo_chunked.epsilon_dpo_loss_from_hidden(
                hidden, weight, ref_hidden, ref_weight, input_ids, completion_mask, baseline_beta.value, EPSILON
            )
            baseline_beta.observe(out.s)
            return out.loss
        logits = policy(**model_inputs).logits
        if variant == "dpo-precomputed":
            return mean_dpo_loss(
                epsdpo_chunked.sequence_logps(logits, input_ids, completion_mask), precomputed_ref_logps
            )
        with torch.no_grad():
            ref_logits = reference(**model_inputs).logits
        if variant == "dpo":
            return mean_dpo_loss(
                epsdpo_chunked.sequence_logps(logits, input_ids, completion_mask),
                epsdpo_chunked.sequence_logps(ref_logits, input_ids, completion_mask),
            )
        if variant == "epsilon-dpo":
            out = epsdpo_chunked.epsilon_dpo_loss(
                logits, ref_logits, input_ids, completion_mask, baseline_beta.value, EPSILON
            )
            baseline_beta.observe(out.s)
            return out.loss
        return naive_epsilon_dpo_loss(logits, ref_logits, input_ids, completion_mask, baseline_beta)

    def step():
        with autocast:  # the forward passes, as train.py runs them
            loss = loss_of_step()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        baseline_beta.step()

    return step


# ----------------------------------------------------------------------------------------------------
# Measuring


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_step_times(shape, device, warmup, repeats, variants):
    """Step times of every variant. DPO and ε-DPO alternate in rounds of four steps (DPO, ε-DPO, ε-DPO, DPO),
    so that the machine's drift falls on both alike; each round gives one difference between them."""
    if device.type == "cpu":
        # Keep freed memory for reuse, as PyTorch's CUDA caching allocator does: the times then measure the
        # computation, not the kernel handing out fresh zeroed pages (which made steps vary by ±20 % here).
        glibc_malloc_option(-4, 0)  # M_MMAP_MAX: no mmap
        glibc_malloc_option(-1, 2**30)  # M_TRIM_THRESHOLD: keep 1 GiB
    setup = make_models_and_batch(shape, device)
    steps = {variant: make_step(variant, copy.deepcopy(setup[0]), *setup[1:]) for variant in variants}

    def timed(variant):
        _synchronize(device)
        start = time.perf_counter()
        steps[variant]()
        _synchronize(device)
        return time.perf_counter() - start

    times = {variant: [] for variant in variants}
    extra_times = []  # ε-DPO minus DPO, one per round
    for round_ in range(warmup + repeats):
        dpo_first, epsilon_first, epsilon_second, dpo_second = (
            timed(v) for v in ("dpo", "epsilon-dpo", "epsilon-dpo", "dpo")
        )
        others = {variant: timed(variant) for variant in variants[2:]}
        if round_ >= warmup:
            times["dpo"] += [dpo_first, dpo_second]
            times["epsilon-dpo"] += [epsilon_first, epsilon_second]
            for variant, seconds in others.items():
                times[variant].append(seconds)
            extra_times.append((epsilon_first + epsilon_second - dpo_first - dpo_second) / 2)
    return times, extra_times


def measure_step_memory(shape, variant, device):
    """The peak memory one training step adds to what is alive before it (after a warm-up step)."""
    if device.type == "cpu":
        # Every allocation of 64 KiB or more gets pages of its own, returned when freed, so resident memory
        # follows what is alive rather than what the allocator keeps for later. (Not in the timing process:
        # the page faults cost time.)
        glibc_malloc_option(-3, 64 * 1024)  # M_MMAP_THRESHOLD
    step = make_step(variant, *make_models_and_batch(shape, device))
    step()  # allocates AdamW's state
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    glibc_release_free_memory()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    before = cpu_memory_kib("VmRSS")
    step()
    return (cpu_memory_kib("VmHWM") - before) / 1024


def measure_extra_work(shape, device, warmup, repeats):
    """The inherent extra work of ε-DPO: one subtraction and two float32 logsumexps over
    (completion positions × vocabulary); and the time epsdpo.py's decision takes on the step's logits."""
    if device.type == "cpu":  # as for the steps
        glibc_malloc_option(-4, 0)
        glibc_malloc_option(-1, 2**30)
    policy, reference, input_ids, attention_mask, completion_mask = make_models_and_batch(shape, device)
    positions, vocab = int(completion_mask[:, 1:].sum()), policy.config.vocab_size
    policy_rows, ref_rows, weaker_rows, stronger_rows = torch.randn(4, positions, vocab, device=device)
    # Timed two ways, on the whole tensors and a chunk of epsdpo_chunked.CHUNK_BYTES at a time; the faster counts.
    chunk = max(1, epsdpo_chunked.CHUNK_BYTES // (4 * vocab))
    ways = {"whole_s": [slice(None)], "chunked_s": [slice(i, i + chunk) for i in range(0, positions, chunk)]}
    medians = {}
    for way, parts in ways.items():
        times = []
        for _ in range(warmup + repeats):
            _synchronize(device)
            start = time.perf_counter()
            for part in parts:
                torch.sub(policy_rows[part], ref_rows[part])
                torch.logsumexp(weaker_rows[part], -1)
                torch.logsumexp(stronger_rows[part], -1)
            _synchronize(device)
            times.append(time.perf_counter() - start)
        medians[way] = statistics.median(times[warmup:])
    del policy_rows, ref_rows, weaker_rows, stronger_rows

    # What epsdpo.py adds to a DPO step, alone and so without the noise of a whole step: the decision
    # (criterion, given the policy's log-probabilities the step has already computed).
    with torch.no_grad(), models.precision("auto", device) or contextlib.nullcontext():
        logits = policy(input_ids=input_ids, attention_mask=attention_mask).logits
        ref_logits = reference(input_ids=input_ids, attention_mask=attention_mask).logits
    times = []
    for _ in range(warmup + repeats):
        _synchronize(device)
        start = time.perf_counter()
        epsdpo_chunked.criterion(logits, ref_logits, input_ids, completion_mask, EPSILON)
        _synchronize(device)
        times.append(time.perf_counter() - start)

    ref_logits_bytes = ref_logits.numel() * ref_logits.element_size()
    return {
        "median_s": min(medians.values()),
        **medians,
        "decision_s": statistics.median(times[warmup:]),
        "positions": positions,
        "vocab": vocab,
        "ref_logits_mib": ref_logits_bytes / 2**20,
    }


def _in_own_process(function, *args):
    """function(*args) in a child process; its result. Children of a CUDA run are spawned, others forked
    (they inherit the imports, so they start at once)."""
    context = multiprocessing.get_context("spawn" if any(getattr(a, "type", None) == "cuda" for a in args) else "fork")
    results = context.Queue()
    process = context.Process(target=_child, args=(results, function, args))
    process.start()
    result = results.get()
    process.join()
    if isinstance(result, BaseException):
        raise result
    return result


def _child(results, function, args):
    try:
        results.put(function(*args))
    except BaseException as error:  # reported by the parent
        results.put(error)
        raise


def run(shapes, devices, warmup, repeats):
    report = {
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name() if "cuda" in map(str, devices) else None,
        },
        "runs": [],
    }
    for device in devices:
        for name, shape in shapes.items():
            variants = [v for v in VARIANTS if v != "naive" or shape is None or shape[0] <= NAIVE_LARGEST_VOCAB]
            times, extra_times = _in_own_process(measure_step_times, shape, device, warmup, repeats, variants)
            run_report = {
                "device": str(device),
                "shape": name,
                "extra_times_s": extra_times,
                "variants": {
                    variant: {
                        "median_s": statistics.median(times[variant]),
                        "times_s": times[variant],
                        "peak_mib": _in_own_process(measure_step_memory, shape, variant, device),
                    }
                    for variant in variants
                },
            }
            run_report["inherent"] = _in_own_process(measure_extra_work, shape, device, warmup, repeats)
            run_report["ratios"] = ratios(run_report)
            print_run(run_report)
            report["runs"].append(run_report)
    return report


def ratios(run_report):
    v, inherent = run_report["variants"], run_report["inherent"]
    # The extra time of a step: the median over the rounds of the difference between ε-DPO and DPO steps.
    extra_time = statistics.median(run_report["extra_times_s"])
    quartiles = statistics.quantiles(run_report["extra_times_s"], n=4)
    run_report["extra_time_s"], run_report["extra_time_middle_half_s"] = extra_time, [quartiles[0], quartiles[2]]
    logits_mib, backbone_mib = inherent["ref_logits_mib"], v["backbone"]["peak_mib"]
    figures = {
        "epsilon_dpo_over_dpo_time": (v["dpo"]["median_s"] + extra_time) / v["dpo"]["median_s"],
        "extra_time_over_inherent_work": extra_time / inherent["median_s"],
        "decision_time_over_inherent_work": inherent["decision_s"] / inherent["median_s"],
        "extra_memory_over_ref_logits": (v["epsilon-dpo"]["peak_mib"] - v["dpo"]["peak_mib"]) / logits_mib,
        # What each ε-DPO loss adds to the step's peak, in (2B, T, V) logits tensors of the model's dtype.
        "logits_loss_memory_over_logits": (v["epsilon-dpo"]["peak_mib"] - backbone_mib) / logits_mib,
        "hidden_loss_memory_over_logits": (v["hidden"]["peak_mib"] - backbone_mib) / logits_mib,
        "hidden_over_epsilon_dpo_time": v["hidden"]["median_s"] / v["epsilon-dpo"]["median_s"],
    }
    if "naive" in v:
        figures["naive_over_epsilon_dpo_time"] = v["naive"]["median_s"] / v["epsilon-dpo"]["median_s"]
        figures["naive_over_epsilon_dpo_memory"] = v["naive"]["peak_mib"] / v["epsilon-dpo"]["peak_mib"]
    return figures


def print_run(run_report):
    inherent = run_report["inherent"]
    print(
        f"\n{run_report['shape']} on {run_report['device']}: {inherent['positions']} completion positions × "
        f"{inherent['vocab']} vocabulary; reference logits {inherent['ref_logits_mib']:.0f} MiB"
    )
    print(f"{'variant':18}{'median step':>14}{'peak memory':>14}")
    for variant, figures in run_report["variants"].items():
        print(f"{variant:18}{figures['median_s'] * 1000:>11.1f} ms{figures['peak_mib']:>10.0f} MiB")
    print(f"{'inherent extra':18}{inherent['median_s'] * 1000:>11.1f} ms   (one subtraction, two logsumexps)")
    print(f"{'ε-DPO decision':18}{inherent['decision_s'] * 1000:>11.1f} ms   (epsdpo_chunked.criterion alone)")
    low, high = run_report["extra_time_middle_half_s"]
    print(
        f"{'ε-DPO − DPO step':18}{run_report['extra_time_s'] * 1000:>11.1f} ms   "
        f"(median over rounds; middle half {low * 1000:.0f} to {high * 1000:.0f} ms)"
    )
    for name, value in run_report["ratios"].items():
        print(f"  {name:34}{value:7.3f}")


# ----------------------------------------------------------------------------------------------------
# The losses at scale: operations and extra peak memory of one forward + backward, on FakeTensors

# (pairs, tokens, completion tokens, vocabulary, hidden size): 4 pairs × 1,024 tokens at Llama-3-8B's vocabulary, then
# twice T, then twice V, at the bench's hidden size; then at real ones, Llama-3-8B's and Llama-3-70B's (the logits
# path does not depend on it: it takes the logits).
COST_SHAPES = [
    (4, 1024, 768, 128_256, 256),
    (4, 2048, 1536, 128_256, 256),
    (4, 1024, 768, 256_000, 256),
    (4, 1024, 768, 128_256, 4096),
    (4, 1024, 768, 128_256, 8192),
]


def loss_costs(shapes):
    """{shape: {path: bench_counts.loss_costs(path, ...)}}, printed as a table (extra peaks in float32 logits
    tensors)."""
    print(
        "\nThe losses at scale, one forward + backward in bf16 (FakeTensors): torch operations and extra peak in "
        "float32 (2B, T, V) logits tensors, the returned gradients left out (with them)"
    )
    print(f"{'pairs × tokens (completion), V, H':36}{'from logits in chunks':>34}{'from hidden states':>34}")
    costs = {}
    for pairs, length, completion, vocab, width in shapes:
        shape = f"{pairs} × {length:,} ({completion:,}), {vocab:,}, {width:,}"
        paths = ("logits", "hidden") if width == shapes[0][4] else ("hidden",)  # the logits path takes no H
        costs[shape] = {
            path: bench_counts.loss_costs(path, pairs, length, completion, vocab, width=width) for path in paths
        }
        cells = [
            f"{c['operations']:>6,} ops {c['extra_peak'] / c['logits']:6.3f} "
            f"({c['extra_peak_with_gradients'] / c['logits']:.3f})"
            for c in costs[shape].values()
        ]
        print(f"{shape:36}" + "".join(f"{cell:>34}" for cell in ([""] * (2 - len(cells)) + cells)))
    return costs


# ----------------------------------------------------------------------------------------------------
# Command line


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--memory",
        action="store_true",
        help="only the memory tables computed from public models' shapes (and LoRA's row measured on tiny_data)",
    )
    parser.add_argument("--gpus", type=int, default=8, help="with --memory: GPUs FSDP shards across (default 8)")
    parser.add_argument(
        "--hidden-memory",
        action="store_true",
        help="only the peak memory of the loss from hidden states against from logits at 128k words (CPU)",
    )
    parser.add_argument(
        "--costs", action="store_true", help="only the losses' operations and extra peaks at scale (FakeTensors)"
    )
    parser.add_argument(
        "--gpu",
        action="store_true",
        help="only the GPU check: a training step at Llama-3-8B's width for four losses (bench_gpu.py)",
    )
    parser.add_argument("--reduced", action="store_true", help="with --gpu: at a small shape (a CPU runs only this)")
    parser.add_argument("--quick", action="store_true", help="smaller shapes, fewer steps (a smoke test)")
    parser.add_argument("--json", metavar="PATH", help="write every figure to this file")
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        action="append",
        help="measure on this device (default: cpu, and cuda when present)",
    )
    parser.add_argument("--shape", choices=list(SHAPES), action="append", help="measure this shape only (default: all)")

    def rounds(text):
        if not text.isdigit() or int(text) < 2:
            raise argparse.ArgumentTypeError(f"{text!r}: at least 2 rounds (the quartiles need two)")
        return int(text)

    parser.add_argument(
        "--repeats", type=rounds, help="rounds measured after one round of warm-up (default: 15 after 3)"
    )
    args = parser.parse_args()
    if args.memory:
        return bench_memory.print_memory(args.gpus)
    if args.hidden_memory:
        return bench_memory.hidden_memory()
    if args.costs:
        return loss_costs(COST_SHAPES)
    if args.gpu:
        results = bench_gpu.run(args.device[-1] if args.device else None, args.reduced)
        if args.json:
            pathlib.Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        return results
    devices = [torch.device(d) for d in (args.device or ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))]
    shapes, warmup, repeats = (QUICK_SHAPES, 1, 3) if args.quick else (SHAPES, 3, 15)
    if args.shape:
        shapes = {name: SHAPES[name] for name in args.shape}
    if args.repeats:
        warmup, repeats = 1, args.repeats
    report = run(shapes, devices, warmup, repeats)
    report["loss_costs"] = loss_costs(COST_SHAPES[:1] if args.quick else COST_SHAPES)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
