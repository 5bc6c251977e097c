"""What an ε-DPO training step costs over a DPO step, measured side by side.

    python bench.py                      # both shapes, CPU (and CUDA when present), ~6 minutes on 2 cores
    python bench.py --quick              # smaller shapes and fewer steps, under a minute: a smoke test
    python bench.py --json bench.json    # also write every figure to a file
    python bench.py --memory             # memory computed from public models' shapes: the bf16 reference, DDP
                                         # against FSDP per GPU (--gpus 8), full fine-tuning against LoRA
                                         # (and that table measured on tiny_data); about a minute
    python bench.py --hidden-memory      # peak memory of the loss from hidden states against from logits at
                                         # 128k words (a train.py run, and the loss alone); minutes on 2 cores
    python bench.py --shape realistic-128k --repeats 3   # one shape, fewer steps

The same training step (forward, loss, backward, AdamW step), on the same model, batch and seed, six ways:
  dpo              DPO through epsdpo.py, the reference's logits computed live (as ε-DPO needs them)
  epsilon-dpo      ε-DPO through epsdpo_chunked.epsilon_dpo_loss (from logits in chunks)
  hidden           ε-DPO through epsdpo_chunked.epsilon_dpo_loss_from_hidden, as train.py runs it: never a (2B, T, V) tensor
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
"""

import argparse
import contextlib
import copy
import ctypes
import json
import multiprocessing
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import data
import epsdpo
import epsdpo_chunked
import models
import train

transformers.utils.logging.disable_progress_bar()

HERE = pathlib.Path(__file__).resolve().parent
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
        arguments, _ = train.parse_args([])                             # train.py's defaults: 16 pairs
        reference = AutoModelForCausalLM.from_pretrained(train.TINY_MODEL)
        tokenizer = AutoTokenizer.from_pretrained(train.TINY_MODEL)
        rows = [json.loads(line) for line in open(train.TINY_DATASET / "train.jsonl")][: arguments.batch_size]
        pairs = [data.tokenize_pair(row, tokenizer, arguments.max_length, arguments.max_prompt_length) for row in rows]
        batch = data.collate(pairs, tokenizer.pad_token_id, torch.device("cpu"))
        input_ids, attention_mask, completion_mask = batch.input_ids, batch.attention_mask, batch.completion_mask
    else:
        vocab, hidden, layers, pairs, length, completion = shape
        config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=length)
        reference = LlamaForCausalLM(config)
        input_ids = torch.randint(0, vocab, (2 * pairs, length))
        attention_mask = torch.ones_like(input_ids)
        completion_mask = torch.zeros_like(input_ids)
        completion_mask[:, length - completion :] = 1
    # As train.py runs them: the policy in float32; on a GPU with bf16, the reference's product weights stored in
    # bf16 and every forward pass under autocast (mixed precision).
    reference = reference.to(device).eval().requires_grad_(False)
    policy = copy.deepcopy(reference).requires_grad_(True)
    with torch.no_grad():                       # a policy a little away from the reference, so s is not all 0
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
        precomputed_ref_logps = epsdpo_chunked.sequence_logps(reference(**model_inputs).logits, input_ids, completion_mask)

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
            out = epsdpo_chunked.epsilon_dpo_loss_from_hidden(hidden, weight, ref_hidden, ref_weight, input_ids, completion_mask,
                                                      baseline_beta.value, EPSILON)
            baseline_beta.observe(out.s)
            return out.loss
        logits = policy(**model_inputs).logits
        if variant == "dpo-precomputed":
            return mean_dpo_loss(epsdpo_chunked.sequence_logps(logits, input_ids, completion_mask), precomputed_ref_logps)
        with torch.no_grad():
            ref_logits = reference(**model_inputs).logits
        if variant == "dpo":
            return mean_dpo_loss(epsdpo_chunked.sequence_logps(logits, input_ids, completion_mask),
                                 epsdpo_chunked.sequence_logps(ref_logits, input_ids, completion_mask))
        if variant == "epsilon-dpo":
            out = epsdpo_chunked.epsilon_dpo_loss(logits, ref_logits, input_ids, completion_mask, baseline_beta.value, EPSILON)
            baseline_beta.observe(out.s)
            return out.loss
        return naive_epsilon_dpo_loss(logits, ref_logits, input_ids, completion_mask, baseline_beta)

    def step():
        with autocast:                                                  # the forward passes, as train.py runs them
            loss = loss_of_step()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        baseline_beta.step()

    return step


# ----------------------------------------------------------------------------------------------------
# Measuring


def _cpu_memory_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _glibc_malloc_option(option, value):
    """Set a glibc malloc option in this process (no-op where there is no glibc)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(option, value)
    except OSError:
        pass


def measure_step_times(shape, device, warmup, repeats, variants):
    """Step times of every variant. DPO and ε-DPO alternate in rounds of four steps (DPO, ε-DPO, ε-DPO, DPO),
    so that the machine's drift falls on both alike; each round gives one difference between them."""
    if device.type == "cpu":
        # Keep freed memory for reuse, as PyTorch's CUDA caching allocator does: the times then measure the
        # computation, not the kernel handing out fresh zeroed pages (which made steps vary by ±20 % here).
        _glibc_malloc_option(-4, 0)                                     # M_MMAP_MAX: no mmap
        _glibc_malloc_option(-1, 2**30)                                 # M_TRIM_THRESHOLD: keep 1 GiB
    setup = make_models_and_batch(shape, device)
    steps = {variant: make_step(variant, copy.deepcopy(setup[0]), *setup[1:]) for variant in variants}

    def timed(variant):
        _synchronize(device)
        start = time.perf_counter()
        steps[variant]()
        _synchronize(device)
        return time.perf_counter() - start

    times = {variant: [] for variant in variants}
    extra_times = []                                                    # ε-DPO minus DPO, one per round
    for round_ in range(warmup + repeats):
        dpo_first, epsilon_first, epsilon_second, dpo_second = (timed(v) for v in ("dpo", "epsilon-dpo", "epsilon-dpo", "dpo"))
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
        _glibc_malloc_option(-3, 64 * 1024)                             # M_MMAP_THRESHOLD
    step = make_step(variant, *make_models_and_batch(shape, device))
    step()                                                              # allocates AdamW's state
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                                    # reset the peak (VmHWM) to the current RSS
    before = _cpu_memory_kib("VmRSS")
    step()
    return (_cpu_memory_kib("VmHWM") - before) / 1024


def measure_extra_work(shape, device, warmup, repeats):
    """The inherent extra work of ε-DPO: one subtraction and two float32 logsumexps over
    (completion positions × vocabulary); and the time epsdpo.py's decision takes on the step's logits."""
    if device.type == "cpu":                                            # as for the steps
        _glibc_malloc_option(-4, 0)
        _glibc_malloc_option(-1, 2**30)
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
        logps = epsdpo_chunked.sequence_logps(logits, input_ids, completion_mask)
    times = []
    for _ in range(warmup + repeats):
        _synchronize(device)
        start = time.perf_counter()
        epsdpo_chunked.criterion(logits, ref_logits, input_ids, completion_mask, EPSILON)
        _synchronize(device)
        times.append(time.perf_counter() - start)

    ref_logits_bytes = ref_logits.numel() * ref_logits.element_size()
    return {"median_s": min(medians.values()), **medians, "decision_s": statistics.median(times[warmup:]),
            "positions": positions, "vocab": vocab, "ref_logits_mib": ref_logits_bytes / 2**20}


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
    except BaseException as error:                                      # reported by the parent
        results.put(error)
        raise


def run(shapes, devices, warmup, repeats):
    report = {"machine": {"processor": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                          "cuda": torch.cuda.get_device_name() if "cuda" in map(str, devices) else None},
              "runs": []}
    for device in devices:
        for name, shape in shapes.items():
            variants = [v for v in VARIANTS if v != "naive" or shape is None or shape[0] <= NAIVE_LARGEST_VOCAB]
            times, extra_times = _in_own_process(measure_step_times, shape, device, warmup, repeats, variants)
            run_report = {"device": str(device), "shape": name, "extra_times_s": extra_times, "variants": {
                variant: {"median_s": statistics.median(times[variant]), "times_s": times[variant],
                          "peak_mib": _in_own_process(measure_step_memory, shape, variant, device)}
                for variant in variants
            }}
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
    print(f"\n{run_report['shape']} on {run_report['device']}: {inherent['positions']} completion positions × "
          f"{inherent['vocab']} vocabulary; reference logits {inherent['ref_logits_mib']:.0f} MiB")
    print(f"{'variant':18}{'median step':>14}{'peak memory':>14}")
    for variant, figures in run_report["variants"].items():
        print(f"{variant:18}{figures['median_s'] * 1000:>11.1f} ms{figures['peak_mib']:>10.0f} MiB")
    print(f"{'inherent extra':18}{inherent['median_s'] * 1000:>11.1f} ms   (one subtraction, two logsumexps)")
    print(f"{'ε-DPO decision':18}{inherent['decision_s'] * 1000:>11.1f} ms   (epsdpo_chunked.criterion alone)")
    low, high = run_report["extra_time_middle_half_s"]
    print(f"{'ε-DPO − DPO step':18}{run_report['extra_time_s'] * 1000:>11.1f} ms   "
          f"(median over rounds; middle half {low * 1000:.0f} to {high * 1000:.0f} ms)")
    for name, value in run_report["ratios"].items():
        print(f"  {name:34}{value:7.3f}")


# ----------------------------------------------------------------------------------------------------
# Public models' shapes, for the computed memory tables


# Their config.json numbers, written here (no Hub access); the models are made on the meta device: no weights.
PUBLIC_MODELS = {
    "Qwen2.5-0.5B": ("qwen2", dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                   num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)),
    "Llama-3.2-1B": ("llama", dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                   num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True)),
    "Gemma-2-2B": ("gemma2", dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                                  num_attention_heads=8, num_key_value_heads=4, head_dim=256, tie_word_embeddings=True)),
    "Mistral-7B-v0.1": ("mistral", dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                        num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)),
    "Llama-3-8B": ("llama", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False)),
    "Mixtral-8x7B": ("mixtral", dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                     num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
                                     num_experts_per_tok=2, tie_word_embeddings=False)),
}
FINE_TUNED_MODELS = ("Gemma-2-2B", "Mistral-7B-v0.1", "Llama-3-8B")     # the tables of full fine-tuning and LoRA
GIB = 2**30


def meta_model(name, **options):
    """The public model `name` on the meta device: its shapes, no weights stored, nothing downloaded."""
    model_type, shape = PUBLIC_MODELS[name]
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(model_type, **shape), **options)


def weight_count(tensors):
    return sum(t.numel() for t in tensors)


def weight_bytes(*modules):
    """Bytes of the distinct parameters of these modules (a tied weight once)."""
    seen = {id(p): p for module in modules for p in module.parameters()}
    return sum(p.numel() * p.element_size() for p in seen.values())


# ----------------------------------------------------------------------------------------------------
# Computed: the bf16 reference's memory


def reference_memory():
    """Per model: parameters, the reference's bytes in float32 and with frozen_weights_in_bf16, and the
    fraction of its parameters stored in bf16. Mixtral twice: transformers' default experts (grouped_mm,
    which autocast does not cast, so they stay float32) and "eager" experts (F.linear, cast)."""
    rows = []
    for name, (_, shape) in PUBLIC_MODELS.items():
        for experts in ("grouped_mm", "eager") if "num_local_experts" in shape else (None,):
            model = meta_model(name, **({"experts_implementation": experts} if experts else {}))
            before = weight_bytes(model)
            models.frozen_weights_in_bf16(model.requires_grad_(False))
            parameters = list(model.parameters())                       # a tied weight counts once
            rows.append({"model": name + (f" ({experts} experts)" if experts else ""),
                         "parameters": weight_count(parameters), "float32_gib": before / GIB,
                         "bf16_gib": weight_bytes(model) / GIB,
                         "fraction_bf16": weight_count(p for p in parameters if p.dtype == torch.bfloat16)
                         / weight_count(parameters)})
    print(f"{'model':34}{'parameters':>12}{'float32':>10}{'--dtype bfloat16':>18}{'in bf16':>9}")
    for row in rows:
        print(f"{row['model']:34}{row['parameters'] / 1e9:>11.2f}B{row['float32_gib']:>7.2f} GiB{row['bf16_gib']:>14.2f} GiB"
              f"{row['fraction_bf16']:>9.0%}")
    return rows


# ----------------------------------------------------------------------------------------------------
# Computed: full fine-tuning's bytes on each GPU, DDP against FSDP
#
# Counted, per GPU, in mixed precision as train.py runs it:
#   policy      float32 weights, float32 gradients and AdamW's two float32 moments: 16 bytes a weight
#   reference   DDP: its linear layers in bf16, embeddings and norms in float32 (models.frozen_weights_in_bf16);
#               FSDP: all of it in bf16 (models.setup_models)
#   gathered    FSDP only: the largest unit (a decoder layer, or the root: embeddings, final norm, output
#               layer) whole in bf16, as it is while it computes
# Not counted: activations (they follow the batch and the length), the logits, the CUDA context. The measured
# bytes of a run are in its summary.json (bytes_held_by_rank_0).


def bytes_per_gpu(model, gpus):
    """{"ddp": {...}, "fsdp": {...}}: bytes on each of `gpus` GPUs (FSDP's shards rounded up, as it pads them)."""
    weights = weight_count(model.parameters())
    per_shard = sum(-(-p.numel() // gpus) for p in model.parameters())   # dim 0 split in `gpus`, padded
    names = set(model._no_split_modules)
    layers = [m for m in model.modules() if type(m).__name__ in names]
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    root = weight_count(p for p in model.parameters() if id(p) not in in_layers)
    reference = weight_bytes(models.frozen_weights_in_bf16(model.requires_grad_(False)))   # meta: nothing stored
    return {"ddp": {"policy": 16 * weights, "reference": reference},
            "fsdp": {"policy": 16 * per_shard, "reference": 2 * per_shard,
                     "gathered": 2 * max(root, *(weight_count(layer.parameters()) for layer in layers))},
            "weights": weights}


def ddp_fsdp_table(gpus):
    lines = [f"| model | weights | DDP: policy + reference | FSDP on {gpus}: policy + reference (+ one unit gathered) |",
             "|---|---:|---:|---:|"]
    for name in FINE_TUNED_MODELS:
        b = bytes_per_gpu(meta_model(name), gpus)
        ddp, fsdp = b["ddp"], b["fsdp"]
        lines.append(f"| {name} | {b['weights'] / 1e9:.2f} B | {ddp['policy'] / GIB:.1f} + {ddp['reference'] / GIB:.1f} = "
                     f"**{(ddp['policy'] + ddp['reference']) / GIB:.1f} GiB** | {fsdp['policy'] / GIB:.1f} + "
                     f"{fsdp['reference'] / GIB:.1f} = **{(fsdp['policy'] + fsdp['reference']) / GIB:.1f} GiB** "
                     f"(+ {fsdp['gathered'] / GIB:.2f}) |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Computed and measured: full fine-tuning against LoRA, weights + gradients + optimizer state on one GPU
#
# Computed, as `--dtype bfloat16` runs them, by train.py's own functions (models.add_lora,
# models.frozen_weights_in_bf16):
#   full fine-tuning  the policy's float32 weights, float32 gradients and AdamW's two float32 moments
#                     (16 bytes a parameter), and the reference beside it: linear layers in bf16, the rest float32;
#   LoRA              the base once (linear layers in bf16, the rest float32) and the float32 adapters,
#                     their gradients and their two moments.
# Measured: the same on tiny_data after one real training step on the CPU, counted from the tensors that exist
# (weights, .grad, the optimizer's state). Activations are not counted: they depend on the batch.


def lora_args(rank, model_name="base"):
    return argparse.Namespace(lora_r=rank, lora_alpha=16.0, lora_target=["all-linear"], model=model_name)


def lora_computed(rank=16):
    """{model: (parameters, trainable with LoRA, {mode: (weights, gradients, optimizer state) in bytes})}."""
    rows = {}
    for name in FINE_TUNED_MODELS:
        policy, reference, base = meta_model(name), meta_model(name), meta_model(name)
        models.frozen_weights_in_bf16(reference.requires_grad_(False))
        parameters = weight_count(policy.parameters())
        full = (weight_bytes(policy) + weight_bytes(reference), 4 * parameters, 8 * parameters)
        with torch.device("meta"):                                      # as setup_models: base in bf16, then adapters
            lora = models.add_lora(models.frozen_weights_in_bf16(base.requires_grad_(False)), lora_args(rank))
        trainable = weight_count(p for p in lora.parameters() if p.requires_grad)
        rows[name] = (parameters, trainable, {"full": full, "lora": (weight_bytes(lora), 4 * trainable, 8 * trainable)})
    return rows


def lora_measured(rank=8):
    """The same on tiny_data, from the tensors after one training step: {mode: (weights, gradients, state)}."""
    rows, trainable_fraction = {}, None
    for mode, flags in (("full", []), ("lora", ["--lora-r", str(rank)])):
        args, _ = train.parse_args(["--dtype", "bfloat16", *flags])
        tokenizer = data.load_tokenizer(models.tokenizer_name(args.model))
        rows_read, _, _ = data.load_splits(args.dataset, "train", "test", 0.05, 0)
        pairs, _, _ = data.tokenize_rows(rows_read[:16], tokenizer, args.max_length, args.max_prompt_length)
        torch.manual_seed(0)
        built = models.setup_models(args, torch.device("cpu"), 1, True, tokenizer, pairs)
        weights = [p for p in built.policy.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(weights, lr=args.lr)
        with models.precision("bfloat16", torch.device("cpu")):
            out = train.forward(built.trained, built.reference, data.collate(pairs, tokenizer.pad_token_id, torch.device("cpu")),
                                args.beta, args.epsilon)
        out.loss.backward()
        optimizer.step()
        reference = [] if isinstance(built.reference, models.AdaptersOff) else [built.reference]
        gradients = sum(p.grad.numel() * p.grad.element_size() for p in weights)
        state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if t.dim())
        rows[mode] = (weight_bytes(built.policy, *reference), gradients, state)
        if mode == "lora":
            trainable_fraction = (weight_count(weights), weight_count(built.policy.parameters()))
    return rows, trainable_fraction


def lora_table(rows, unit, scale):
    lines = [f"| model | mode | weights | gradients | optimizer state | total ({unit}) |", "|---|---|---:|---:|---:|---:|"]
    for name, by_mode in rows.items():
        for mode, (weights, gradients, state) in by_mode.items():
            cells = [f"{x / scale:,.2f}" if scale > 1 else f"{x:,}" for x in (weights, gradients, state, weights + gradients + state)]
            lines.append(f"| {name} | {'full fine-tuning' if mode == 'full' else 'LoRA'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_lora_memory():
    rows = lora_computed()
    print("Computed from the shapes (meta device), --dtype bfloat16, LoRA r = 16 on every linear layer of the decoder:\n")
    print(lora_table({name: by_mode for name, (_, _, by_mode) in rows.items()}, "GiB", GIB))
    print()
    for name, (parameters, trainable, _) in rows.items():
        print(f"{name}: {parameters / 1e9:.2f} B parameters; LoRA r = 16 trains {trainable:,} ({trainable / parameters:.2%})")
    tiny, (trainable, total) = lora_measured()
    print("\nMeasured on tiny_data after one step (CPU, --dtype bfloat16, LoRA r = 8 on every linear layer):\n")
    print(lora_table({"tiny_data": tiny}, "bytes", 1))
    print(f"\ntiny_data, LoRA r = 8: {trainable:,} of {total:,} parameters trained ({trainable / total:.1%}); "
          f"the base alone has {total - trainable:,}")


def print_memory(gpus):
    """--memory: the three tables above, one after the other."""
    print("## The bf16 reference (computed)\n")
    reference_memory()
    print(f"\n## Full fine-tuning per GPU, DDP against FSDP on {gpus} (computed)\n")
    print(ddp_fsdp_table(gpus))
    print("\n## Full fine-tuning against LoRA (computed, then measured on tiny_data)\n")
    print_lora_memory()


# ----------------------------------------------------------------------------------------------------
# Measured: the peak memory of the loss from hidden states against the loss from logits (CPU)


HIDDEN_RUN_VOCAB, HIDDEN_RUN_PAIRS, HIDDEN_RUN_LENGTH = 131_072, 4, 512

# One train.py run in a process of its own; it prints its peak and the resident memory before the first loss.
HIDDEN_RUN_CHILD = """
import resource, sys, json
sys.path.insert(0, {here!r})
import models, train
models.FROM_HIDDEN_STATES = {from_hidden}
real_forward = train.forward
shapes, before = [], []
def forward(policy, reference, batch, *rest):
    if not before:                      # resident memory once everything is loaded, before the first loss
        before.append(int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0]))
    shapes.append(tuple(batch.input_ids.shape))
    return real_forward(policy, reference, batch, *rest)
train.forward = forward
train.main({argv!r})
print("RESULT", json.dumps({{"maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "before_kib": before[0], "shapes": shapes}}))
"""


def make_131k_model_and_data(folder):
    """A tied 2-layer Llama (hidden size 64) with a 131,072-word vocabulary, and 12 pairs of ~300-token completions."""
    LlamaForCausalLM(LlamaConfig(vocab_size=HIDDEN_RUN_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=HIDDEN_RUN_LENGTH,
                                 tie_word_embeddings=True)).save_pretrained(folder / "model")
    AutoTokenizer.from_pretrained(train.TINY_MODEL).save_pretrained(folder / "model")
    words = "the price is great and the fit is good but the lamp is poor".split()
    rows = [{"prompt": f"Review {i}:", "chosen": " " + " ".join(words[(i + j) % len(words)] for j in range(300)),
             "rejected": " " + " ".join(words[(i + 2 * j) % len(words)] for j in range(280))} for i in range(12)]
    (folder / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def run_train_131k(folder, from_hidden):
    """Two steps of train.py on that model, in a process of its own: its peak RSS and its RSS before the first loss."""
    argv = ["--model", str(folder / "model"), "--dataset", str(folder / "pairs.jsonl"), "--eval-fraction", "0.2",
            "--batch-size", str(HIDDEN_RUN_PAIRS), "--max-steps", "2", "--eval-every", "1000",
            "--max-length", str(HIDDEN_RUN_LENGTH), "--max-prompt-length", "16", "--output-dir", str(folder / f"out-{from_hidden}"),
            "--criterion-pairs", "0"]       # the training's memory: criterion.png's example curves take one pair's full logits
    code = HIDDEN_RUN_CHILD.format(here=str(HERE), from_hidden=from_hidden, argv=argv)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise SystemExit(result.stderr[-3000:])
    return json.loads(lines[-1][len("RESULT "):])


def train_peak_memory_131k():
    """Peak memory of a train.py run at a 131,072-word vocabulary, loss from hidden states against from logits,
    beside one float32 (2B, T, V) logits tensor of its batch."""
    with tempfile.TemporaryDirectory() as folder:
        folder = pathlib.Path(folder)
        make_131k_model_and_data(folder)
        for from_hidden in (True, False):
            figures = run_train_131k(folder, from_hidden)
            rows, length = max(figures["shapes"], key=lambda shape: shape[0] * shape[1])
            logits_mib = rows * length * HIDDEN_RUN_VOCAB * 4 / 2**20
            print(f"{'hidden states' if from_hidden else 'full logits':14} peak RSS {figures['maxrss_kib'] / 1024:5.0f} MiB, "
                  f"{(figures['maxrss_kib'] - figures['before_kib']) / 1024:5.0f} MiB above the RSS before the first loss; "
                  f"largest batch {rows} × {length} tokens: one float32 (2B, T, V) logits tensor {logits_mib:.0f} MiB")


def loss_peak_memory_128k():
    """The peak memory one ε-DPO loss adds (forward + backward) at the realistic-128k shape, from hidden states and
    from logits (made from the same hidden states inside the measured region, as a head would); each twice."""
    _glibc_malloc_option(-3, 64 * 1024)             # M_MMAP_THRESHOLD: freed blocks go back, RSS follows what is alive
    vocab, hidden_size, _, pairs, length, completion = SHAPES["realistic-128k"]
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2 * pairs, length, hidden_size, generator=g).requires_grad_()
    ref_hidden = hidden.detach() + 0.01 * torch.randn(2 * pairs, length, hidden_size, generator=g)
    weight = (torch.randn(vocab, hidden_size, generator=g) / 16).requires_grad_()
    ref_weight = weight.detach() + 0.001 * torch.randn(vocab, hidden_size, generator=g)
    ids = torch.randint(0, vocab, (2 * pairs, length), generator=g)
    mask = torch.zeros(2 * pairs, length, dtype=torch.long)
    mask[:, length - completion :] = 1

    def from_hidden():
        return epsdpo_chunked.epsilon_dpo_loss_from_hidden(hidden, weight, ref_hidden, ref_weight, ids, mask, 0.1, 0.01).loss

    def from_logits():
        logits = hidden @ weight.T
        with torch.no_grad():
            ref_logits = ref_hidden @ ref_weight.T
        return epsdpo_chunked.epsilon_dpo_loss(logits, ref_logits, ids, mask, 0.1, 0.01).loss

    logits_mib = 2 * pairs * length * vocab * 4 / 2**20
    for name, loss in (("hidden", from_hidden), ("logits", from_logits)) * 2:
        hidden.grad = weight.grad = None
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                                                # reset the peak (VmHWM) to the current RSS
        before = _cpu_memory_kib("VmRSS") / 1024
        start = time.perf_counter()
        loss().backward()
        seconds = time.perf_counter() - start
        extra = _cpu_memory_kib("VmHWM") / 1024 - before   # grads of hidden and weight included (also in a real step)
        print(f"{name}: {seconds:.2f} s, peak {extra:.0f} MiB above the start = {extra / logits_mib:.3f} × one (2B, T, V) "
              f"float32 logits ({logits_mib:.0f} MiB); grads {(hidden.numel() + weight.numel()) * 4 / 2**20:.0f} MiB of it",
              flush=True)


# ----------------------------------------------------------------------------------------------------
# Command line


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory", action="store_true",
                        help="only the memory tables computed from public models' shapes (and LoRA's row measured on tiny_data)")
    parser.add_argument("--gpus", type=int, default=8, help="with --memory: GPUs FSDP shards across (default 8)")
    parser.add_argument("--hidden-memory", action="store_true",
                        help="only the peak memory of the loss from hidden states against from logits at 128k words (CPU)")
    parser.add_argument("--quick", action="store_true", help="smaller shapes, fewer steps (a smoke test)")
    parser.add_argument("--json", metavar="PATH", help="write every figure to this file")
    parser.add_argument("--device", choices=("cpu", "cuda"), action="append",
                        help="measure on this device (default: cpu, and cuda when present)")
    parser.add_argument("--shape", choices=list(SHAPES), action="append", help="measure this shape only (default: all)")
    def rounds(text):
        if not text.isdigit() or int(text) < 2:
            raise argparse.ArgumentTypeError(f"{text!r}: at least 2 rounds (the quartiles need two)")
        return int(text)

    parser.add_argument("--repeats", type=rounds, help="rounds measured after one round of warm-up (default: 15 after 3)")
    args = parser.parse_args()
    if args.memory:
        return print_memory(args.gpus)
    if args.hidden_memory:
        print("## A train.py run at a 131,072-word vocabulary\n")
        train_peak_memory_131k()
        print("\n## The loss alone at the realistic-128k shape\n")
        return loss_peak_memory_128k()
    devices = [torch.device(d) for d in (args.device or ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))]
    shapes, warmup, repeats = (QUICK_SHAPES, 1, 3) if args.quick else (SHAPES, 3, 15)
    if args.shape:
        shapes = {name: SHAPES[name] for name in args.shape}
    if args.repeats:
        warmup, repeats = 1, args.repeats
    report = run(shapes, devices, warmup, repeats)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
