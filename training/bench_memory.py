"""Memory of ε-DPO training at the sizes it is for: computed from public models' shapes, and measured on the CPU.

    python bench.py --memory             # computed: the bf16 reference, DDP against FSDP per GPU (--gpus 8), full
                                         # fine-tuning against LoRA (and that table measured on tiny_data); a minute
    python bench.py --hidden-memory      # measured: python train.py at a 131,072-word vocabulary (criterion.png
                                         # included), the loss from hidden states against from logits, and each loss
                                         # alone at 128k words; minutes on 2 cores

bench.py (step times, operations and peaks of the losses) runs these; this module holds them.
"""

import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import epsdpo_chunked
from training import adapters, arguments, batches, data, models
from training.bench_counts import cpu_memory_kib, glibc_malloc_option
from training.loss import micro_batch_loss

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The loss alone: (vocabulary, hidden size, pairs, tokens per sequence, completion tokens), bench.py's realistic-128k.
LOSS_SHAPE = (128256, 256, 4, 384, 256)


# ----------------------------------------------------------------------------------------------------
# Public models' shapes, for the computed memory tables


# Their config.json numbers, written here (no Hub access); the models are made on the meta device: no weights.
PUBLIC_MODELS = {
    "Qwen2.5-0.5B": (
        "qwen2",
        dict(
            vocab_size=151936,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        ),
    ),
    "Llama-3.2-1B": (
        "llama",
        dict(
            vocab_size=128256,
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            tie_word_embeddings=True,
        ),
    ),
    "Gemma-2-2B": (
        "gemma2",
        dict(
            vocab_size=256000,
            hidden_size=2304,
            intermediate_size=9216,
            num_hidden_layers=26,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=256,
            tie_word_embeddings=True,
        ),
    ),
    "Mistral-7B-v0.1": (
        "mistral",
        dict(
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            tie_word_embeddings=False,
        ),
    ),
    "Llama-3-8B": (
        "llama",
        dict(
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            tie_word_embeddings=False,
        ),
    ),
    "Mixtral-8x7B": (
        "mixtral",
        dict(
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            num_local_experts=8,
            num_experts_per_tok=2,
            tie_word_embeddings=False,
        ),
    ),
}
FINE_TUNED_MODELS = ("Gemma-2-2B", "Mistral-7B-v0.1", "Llama-3-8B")  # the tables of full fine-tuning and LoRA
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
            parameters = list(model.parameters())  # a tied weight counts once
            rows.append(
                {
                    "model": name + (f" ({experts} experts)" if experts else ""),
                    "parameters": weight_count(parameters),
                    "float32_gib": before / GIB,
                    "bf16_gib": weight_bytes(model) / GIB,
                    "fraction_bf16": weight_count(p for p in parameters if p.dtype == torch.bfloat16)
                    / weight_count(parameters),
                }
            )
    print(f"{'model':34}{'parameters':>12}{'float32':>10}{'--dtype bfloat16':>18}{'in bf16':>9}")
    for row in rows:
        print(
            f"{row['model']:34}{row['parameters'] / 1e9:>11.2f}B{row['float32_gib']:>7.2f} GiB{row['bf16_gib']:>14.2f} "
            "GiB"
            f"{row['fraction_bf16']:>9.0%}"
        )
    return rows


# ----------------------------------------------------------------------------------------------------
# Computed: full fine-tuning's bytes on each GPU, DDP against FSDP
#
# Counted, per GPU, in mixed precision as train.py runs it:
#   policy      float32 weights, float32 gradients and AdamW's two float32 moments: 16 bytes a weight
#   reference   DDP: its linear layers in bf16, embeddings and norms in float32 (models.frozen_weights_in_bf16);
#               FSDP: all of it in bf16 (models.setup_sharded_models)
#   gathered    FSDP only: the largest unit (a decoder layer, or the root: embeddings, final norm, output
#               layer) whole in bf16, as it is while it computes
# Not counted: activations (they follow the batch and the length), the logits, the CUDA context. The measured
# bytes of a run are in its summary.json (bytes_held_by_rank_0).


def bytes_per_gpu(model, gpus):
    """{"ddp": {...}, "fsdp": {...}}: bytes on each of `gpus` GPUs (FSDP's shards rounded up, as it pads them)."""
    weights = weight_count(model.parameters())
    per_shard = sum(-(-p.numel() // gpus) for p in model.parameters())  # dim 0 split in `gpus`, padded
    names = set(model._no_split_modules)
    layers = [m for m in model.modules() if type(m).__name__ in names]
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    root = weight_count(p for p in model.parameters() if id(p) not in in_layers)
    reference = weight_bytes(models.frozen_weights_in_bf16(model.requires_grad_(False)))  # meta: nothing stored
    return {
        "ddp": {"policy": 16 * weights, "reference": reference},
        "fsdp": {
            "policy": 16 * per_shard,
            "reference": 2 * per_shard,
            "gathered": 2 * max(root, *(weight_count(layer.parameters()) for layer in layers)),
        },
        "weights": weights,
    }


def ddp_fsdp_table(gpus):
    lines = [
        f"| model | weights | DDP: policy + reference | FSDP on {gpus}: policy + reference (+ one unit gathered) |",
        "|---|---:|---:|---:|",
    ]
    for name in FINE_TUNED_MODELS:
        b = bytes_per_gpu(meta_model(name), gpus)
        ddp, fsdp = b["ddp"], b["fsdp"]
        lines.append(
            f"| {name} | {b['weights'] / 1e9:.2f} B | {ddp['policy'] / GIB:.1f} + {ddp['reference'] / GIB:.1f} = "
            f"**{(ddp['policy'] + ddp['reference']) / GIB:.1f} GiB** | {fsdp['policy'] / GIB:.1f} + "
            f"{fsdp['reference'] / GIB:.1f} = **{(fsdp['policy'] + fsdp['reference']) / GIB:.1f} GiB** "
            f"(+ {fsdp['gathered'] / GIB:.2f}) |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Computed and measured: full fine-tuning against LoRA, weights + gradients + optimizer state on one GPU
#
# Computed, as `--dtype bfloat16` runs them, by train.py's own functions (adapters.add_lora,
# models.frozen_weights_in_bf16):
#   full fine-tuning  the policy's float32 weights, float32 gradients and AdamW's two float32 moments
#                     (16 bytes a parameter), and the reference beside it: linear layers in bf16, the rest float32;
#   LoRA              the base once (linear layers in bf16, the rest float32) and the float32 adapters,
#                     their gradients and their two moments.
# Measured: the same on tiny_data after one real training step on the CPU, counted from the tensors that exist
# (weights, .grad, the optimizer's state). Activations are not counted: they depend on the batch.


def lora_args(rank, model_name="base"):
    """The settings of a LoRA run of rank `rank` on model_name, as train.py's defaults give them."""
    return arguments.RunConfig(lora_r=rank, model=model_name)


def lora_computed(rank=16):
    """{model: (parameters, trainable with LoRA, {mode: (weights, gradients, optimizer state) in bytes})}."""
    rows = {}
    for name in FINE_TUNED_MODELS:
        policy, reference, base = meta_model(name), meta_model(name), meta_model(name)
        models.frozen_weights_in_bf16(reference.requires_grad_(False))
        parameters = weight_count(policy.parameters())
        full = (weight_bytes(policy) + weight_bytes(reference), 4 * parameters, 8 * parameters)
        with torch.device("meta"):  # as setup_models: base in bf16, then adapters
            lora = adapters.add_lora(models.frozen_weights_in_bf16(base.requires_grad_(False)), lora_args(rank))
        trainable = weight_count(p for p in lora.parameters() if p.requires_grad)
        rows[name] = (parameters, trainable, {"full": full, "lora": (weight_bytes(lora), 4 * trainable, 8 * trainable)})
    return rows


def lora_measured(rank=8):
    """The same on tiny_data, from the tensors after one training step: {mode: (weights, gradients, state)}."""
    rows, trainable_fraction = {}, None
    for mode, flags in (("full", []), ("lora", ["--lora-r", str(rank)])):
        args, _ = arguments.parse_args(["--dtype", "bfloat16", *flags])
        tokenizer = data.load_tokenizer(adapters.tokenizer_name(args.model))
        rows_read, _, _ = data.load_splits(args.dataset, "train", "test", 0.05, 0)
        pairs, _, _ = data.tokenize_rows(rows_read[:16], tokenizer, args.max_length, args.max_prompt_length)
        torch.manual_seed(0)
        built = models.setup_models(args, torch.device("cpu"), 1, True, tokenizer, pairs)
        weights = [p for p in built.policy.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(weights, lr=args.lr)
        with models.precision("bfloat16", torch.device("cpu")):
            out = micro_batch_loss(
                built.trained,
                built.reference,
                batches.collate(pairs, tokenizer.pad_token_id, torch.device("cpu")),
                args.beta,
                args.epsilon,
            )
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
    lines = [
        f"| model | mode | weights | gradients | optimizer state | total ({unit}) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, by_mode in rows.items():
        for mode, (weights, gradients, state) in by_mode.items():
            cells = [
                f"{x / scale:,.2f}" if scale > 1 else f"{x:,}"
                for x in (weights, gradients, state, weights + gradients + state)
            ]
            lines.append(f"| {name} | {'full fine-tuning' if mode == 'full' else 'LoRA'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def print_lora_memory():
    rows = lora_computed()
    print(
        "Computed from the shapes (meta device), --dtype bfloat16, LoRA r = 16 on every linear layer of the decoder:\n"
    )
    print(lora_table({name: by_mode for name, (_, _, by_mode) in rows.items()}, "GiB", GIB))
    print()
    for name, (parameters, trainable, _) in rows.items():
        print(
            f"{name}: {parameters / 1e9:.2f} B parameters; LoRA r = 16 trains {trainable:,} "
            f"({trainable / parameters:.2%})"
        )
    tiny, (trainable, total) = lora_measured()
    print("\nMeasured on tiny_data after one step (CPU, --dtype bfloat16, LoRA r = 8 on every linear layer):\n")
    print(lora_table({"tiny_data": tiny}, "bytes", 1))
    print(
        f"\ntiny_data, LoRA r = 8: {trainable:,} of {total:,} parameters trained ({trainable / total:.1%}); "
        f"the base alone has {total - trainable:,}"
    )


def print_memory(gpus):
    """--memory: the three tables above, one after the other."""
    print("## The bf16 reference (computed)\n")
    reference_memory()
    print(f"\n## Full fine-tuning per GPU, DDP against FSDP on {gpus} (computed)\n")
    print(ddp_fsdp_table(gpus))
    print("\n## Full fine-tuning against LoRA (computed, then measured on tiny_data)\n")
    print_lora_memory()


# ----------------------------------------------------------------------------------------------------
# Measured: the peak memory of the loss from hidden states against the loss from logits (CPU): a whole train.py run,
# evaluation and criterion.png included, and each loss alone


HIDDEN_RUN_VOCAB, HIDDEN_RUN_PAIRS, HIDDEN_RUN_LENGTH = 131_072, 4, 512


def make_131k_model_and_data(folder):
    """A tied 2-layer Llama (hidden size 64) with a 131,072-word vocabulary, and 12 pairs of ~300-token completions."""
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=HIDDEN_RUN_VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=HIDDEN_RUN_LENGTH,
            tie_word_embeddings=True,
        )
    ).save_pretrained(folder / "model")
    AutoTokenizer.from_pretrained(arguments.TINY_MODEL).save_pretrained(folder / "model")
    words = "the price is great and the fit is good but the lamp is poor".split()
    rows = [
        {
            "prompt": f"Review {i}:",
            "chosen": " " + " ".join(words[(i + j) % len(words)] for j in range(300)),
            "rejected": " " + " ".join(words[(i + 2 * j) % len(words)] for j in range(280)),
        }
        for i in range(12)
    ]
    (folder / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


def train_arguments_131k(folder, from_hidden):
    """train.py's arguments for two steps on that model, evaluation and criterion.png (every train pair) included;
    --full-logits for the loss from the full logits."""
    return [
        "--model",
        str(folder / "model"),
        "--dataset",
        str(folder / "pairs.jsonl"),
        "--eval-fraction",
        "0.2",
        "--batch-size",
        str(HIDDEN_RUN_PAIRS),
        "--max-steps",
        "2",
        "--eval-every",
        "1000",
        "--max-length",
        str(HIDDEN_RUN_LENGTH),
        "--max-prompt-length",
        "16",
        "--output-dir",
        str(folder / f"out-{from_hidden}"),
        *([] if from_hidden else ["--full-logits"]),
    ]


def run_train_131k(folder, from_hidden):
    """python train.py on that model, as a user runs it, in a process of its own: its peak resident memory (the
    kernel's count for the finished process, os.wait4), and whether it drew criterion.png."""
    argv = train_arguments_131k(folder, from_hidden)
    with tempfile.TemporaryFile("w+") as output:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), *argv],
            stdout=output,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        _, status, usage = os.wait4(process.pid, 0)  # waited for here, not by Popen: the child's own rusage
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode:
            output.seek(0)
            raise SystemExit(output.read()[-3000:])
    return {"maxrss_kib": usage.ru_maxrss, "criterion_png": (folder / f"out-{from_hidden}/criterion.png").exists()}


def batch_shapes_131k(folder):
    """(rows, tokens) of a training micro-batch and of criterion.png's batch (every train pair at once, as
    --eval-batch-size allows), from the pairs train.py reads, tokenized by the project's own data functions."""
    args, _ = arguments.parse_args(train_arguments_131k(folder, True))
    tokenizer = data.load_tokenizer(str(folder / "model"))
    pairs = data.load_pairs(
        args.dataset, "train", None, args.eval_fraction, args.seed, tokenizer, args.max_length, args.max_prompt_length
    )["pairs"]["train"]
    longest = max(len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"])) for p in pairs)
    return (2 * HIDDEN_RUN_PAIRS, longest), (2 * min(len(pairs), args.eval_batch_size), longest)


def train_peak_memory_131k():
    """Peak memory of a train.py run at a 131,072-word vocabulary, loss from hidden states against from logits,
    beside one float32 (2B, T, V) logits tensor of its batches."""
    with tempfile.TemporaryDirectory() as folder:
        folder = pathlib.Path(folder)
        make_131k_model_and_data(folder)
        training, largest = batch_shapes_131k(folder)
        peaks = {}
        for from_hidden in (True, False):
            figures = run_train_131k(folder, from_hidden)
            peak_mib = peaks[from_hidden] = figures["maxrss_kib"] / 1024
            print(
                f"{'hidden states' if from_hidden else 'full logits':14} peak RSS {peak_mib:5.0f} MiB; criterion.png "
                f"written: {figures['criterion_png']}"
            )
            # From the logits, criterion.png takes --batch-size pairs at a time, as training does.
            figure_batch = largest if from_hidden else training
            for name, (rows, length) in (("criterion.png's batch", figure_batch), ("a training micro-batch", training)):
                logits_mib = rows * length * HIDDEN_RUN_VOCAB * 4 / 2**20
                print(
                    f"    {name}, {rows} × {length} tokens: one float32 (2B, T, V) logits tensor {logits_mib:5.0f} "
                    f"MiB; peak RSS {peak_mib / logits_mib:.2f} × it"
                )
        print(f"from full logits the run peaks {peaks[False] - peaks[True]:,.0f} MiB higher")


def loss_peak_memory_128k():
    """The peak memory one ε-DPO loss adds (forward + backward) at the realistic-128k shape, from hidden states and
    from logits (made from the same hidden states inside the measured region, as a head would); each twice."""
    glibc_malloc_option(-3, 64 * 1024)  # M_MMAP_THRESHOLD: freed blocks go back, RSS follows what is alive
    vocab, hidden_size, pairs, length, completion = LOSS_SHAPE
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2 * pairs, length, hidden_size, generator=g).requires_grad_()
    ref_hidden = hidden.detach() + 0.01 * torch.randn(2 * pairs, length, hidden_size, generator=g)
    weight = (torch.randn(vocab, hidden_size, generator=g) / 16).requires_grad_()
    ref_weight = weight.detach() + 0.001 * torch.randn(vocab, hidden_size, generator=g)
    ids = torch.randint(0, vocab, (2 * pairs, length), generator=g)
    mask = torch.zeros(2 * pairs, length, dtype=torch.long)
    mask[:, length - completion :] = 1

    def from_hidden():
        return epsdpo_chunked.epsilon_dpo_loss_from_hidden(
            hidden, weight, ref_hidden, ref_weight, ids, mask, 0.1, 0.01
        ).loss

    def from_logits():
        logits = hidden @ weight.T
        with torch.no_grad():
            ref_logits = ref_hidden @ ref_weight.T
        return epsdpo_chunked.epsilon_dpo_loss(logits, ref_logits, ids, mask, 0.1, 0.01).loss

    logits_mib = 2 * pairs * length * vocab * 4 / 2**20
    for name, loss in (("hidden", from_hidden), ("logits", from_logits)) * 2:
        hidden.grad = weight.grad = None
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak (VmHWM) to the current RSS
        before = cpu_memory_kib("VmRSS") / 1024
        start = time.perf_counter()
        loss().backward()
        seconds = time.perf_counter() - start
        extra = cpu_memory_kib("VmHWM") / 1024 - before  # grads of hidden and weight included (also in a real step)
        print(
            f"{name}: {seconds:.2f} s, peak {extra:.0f} MiB above the start = {extra / logits_mib:.3f} × one (2B, T, "
            "V) "
            f"float32 logits ({logits_mib:.0f} MiB); grads {(hidden.numel() + weight.numel()) * 4 / 2**20:.0f} MiB of "
            "it",
            flush=True,
        )


def hidden_memory():
    """--hidden-memory: both measurements, one after the other."""
    print("## A train.py run at a 131,072-word vocabulary\n")
    train_peak_memory_131k()
    print("\n## The loss alone at bench.py's realistic-128k shape\n")
    loss_peak_memory_128k()
