"""The bytes one GPU holds for weights, gradients and optimizer state: full fine-tuning against LoRA.

    python lora_memory.py            # the table of docs/lora.md: computed for three models, measured on tiny_data

Computed: Gemma-2-2B, Mistral-7B-v0.1 and Llama-3-8B, built on the meta device from their shapes (written
out below: nothing is downloaded), set up by train.py's own functions (models.add_lora, models.frozen_weights_in_bf16)
as `--dtype bfloat16` runs them:
  full fine-tuning  the policy's float32 weights, float32 gradients and AdamW's two float32 moments
                    (16 bytes a parameter), and the reference beside it: linear layers in bf16, the rest float32;
  LoRA              the base once (linear layers in bf16, the rest float32) and the float32 adapters,
                    their gradients and their two moments.
Measured: the same on tiny_data after one real training step on the CPU, counted from the tensors that exist
(weights, .grad, the optimizer's state). Activations are not counted: they depend on the batch.
"""

import argparse

import torch

import data
import models
import train

GIB = 2**30
# Shapes from the models' config.json files (Hub), written out here so that nothing is downloaded.
SHAPES = {
    "Gemma-2-2B": ("Gemma2", dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                                  num_key_value_heads=4, head_dim=256, vocab_size=256_000, tie_word_embeddings=True)),
    "Mistral-7B-v0.1": ("Mistral", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                                        num_key_value_heads=8, vocab_size=32_000, tie_word_embeddings=False)),
    "Llama-3-8B": ("Llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                                 num_key_value_heads=8, vocab_size=128_256, tie_word_embeddings=False)),
}


def lora_args(rank, model_name="base"):
    return argparse.Namespace(lora_r=rank, lora_alpha=16.0, lora_target=["all-linear"], model=model_name)


def weight_bytes(*modules):
    """Bytes of the distinct parameters of these modules (a tied weight once)."""
    seen = {id(p): p for module in modules for p in module.parameters()}
    return sum(p.numel() * p.element_size() for p in seen.values())


def computed(rank=16):
    """{model: (parameters, trainable with LoRA, {mode: (weights, gradients, optimizer state) in bytes})}."""
    import transformers

    rows = {}
    for name, (family, shape) in SHAPES.items():
        config = getattr(transformers, f"{family}Config")(**shape)
        model_class = getattr(transformers, f"{family}ForCausalLM")
        with torch.device("meta"):
            policy, reference, base = model_class(config), model_class(config), model_class(config)
        models.frozen_weights_in_bf16(reference.requires_grad_(False))
        parameters = sum(p.numel() for p in policy.parameters())
        full = (weight_bytes(policy) + weight_bytes(reference), 4 * parameters, 8 * parameters)
        with torch.device("meta"):                                      # as setup_models: base in bf16, then adapters
            lora = models.add_lora(models.frozen_weights_in_bf16(base.requires_grad_(False)), lora_args(rank))
        trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
        rows[name] = (parameters, trainable, {"full": full, "lora": (weight_bytes(lora), 4 * trainable, 8 * trainable)})
    return rows


def measured(rank=8):
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
            trainable_fraction = (sum(p.numel() for p in weights), sum(p.numel() for p in built.policy.parameters()))
    return rows, trainable_fraction


def table(rows, unit, scale):
    lines = [f"| model | mode | weights | gradients | optimizer state | total ({unit}) |", "|---|---|---:|---:|---:|---:|"]
    for name, by_mode in rows.items():
        for mode, (weights, gradients, state) in by_mode.items():
            cells = [f"{x / scale:,.2f}" if scale > 1 else f"{x:,}" for x in (weights, gradients, state, weights + gradients + state)]
            lines.append(f"| {name} | {'full fine-tuning' if mode == 'full' else 'LoRA'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    rows = computed()
    print("Computed from the shapes (meta device), --dtype bfloat16, LoRA r = 16 on every linear layer of the decoder:\n")
    print(table({name: by_mode for name, (_, _, by_mode) in rows.items()}, "GiB", GIB))
    print()
    for name, (parameters, trainable, _) in rows.items():
        print(f"{name}: {parameters / 1e9:.2f} B parameters; LoRA r = 16 trains {trainable:,} ({trainable / parameters:.2%})")
    tiny, (trainable, total) = measured()
    print("\nMeasured on tiny_data after one step (CPU, --dtype bfloat16, LoRA r = 8 on every linear layer):\n")
    print(table({"tiny_data": tiny}, "bytes", 1))
    print(f"\ntiny_data, LoRA r = 8: {trainable:,} of {total:,} parameters trained ({trainable / total:.1%}); "
          f"the base alone has {total - trainable:,}")
