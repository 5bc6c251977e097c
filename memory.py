"""What full fine-tuning with train.py holds on each GPU, DDP against FSDP, computed from the models' shapes.

    python memory.py                     # the table of docs/multi-gpu.md: 8 GPUs
    python memory.py --gpus 4

The models are built on the meta device (shapes, no weights, nothing downloaded) from the configs below.
Counted, per GPU, in mixed precision as train.py runs it:
  policy      float32 weights, float32 gradients and AdamW's two float32 moments: 16 bytes a weight
  reference   DDP: its linear layers in bf16, embeddings and norms in float32 (models.frozen_weights_in_bf16);
              FSDP: all of it in bf16 (models.setup_models)
  gathered    FSDP only: the largest unit (a decoder layer, or the root: embeddings, final norm, output
              layer) whole in bf16, as it is while it computes
Not counted: activations (they follow the batch and the length), the logits, the CUDA context. Computed, not
measured: the measured bytes of a run are in its summary.json (bytes_held_by_rank_0).
"""

import argparse

import torch
import transformers

import models

# The published shapes, written out here so that nothing is downloaded.
CONFIGS = {
    "Gemma-2-2B": transformers.Gemma2Config(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                                            num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                                            vocab_size=256_000, tie_word_embeddings=True),
    "Mistral-7B-v0.1": transformers.MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                                  num_attention_heads=32, num_key_value_heads=8, vocab_size=32_000,
                                                  tie_word_embeddings=False),
    "Llama-3-8B": transformers.LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                           num_attention_heads=32, num_key_value_heads=8, vocab_size=128_256,
                                           tie_word_embeddings=False),
}


def count(tensors):
    return sum(t.numel() for t in tensors)


def bytes_per_gpu(model, gpus):
    """{"ddp": {...}, "fsdp": {...}}: bytes on each of `gpus` GPUs (FSDP's shards rounded up, as it pads them)."""
    weights = count(model.parameters())
    per_shard = sum(-(-p.numel() // gpus) for p in model.parameters())   # dim 0 split in `gpus`, padded
    names = set(model._no_split_modules)
    layers = [m for m in model.modules() if type(m).__name__ in names]
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    root = count(p for p in model.parameters() if id(p) not in in_layers)
    bf16_reference = models.frozen_weights_in_bf16(model.requires_grad_(False))   # on the meta device: nothing stored
    reference = sum(p.numel() * p.element_size() for p in bf16_reference.parameters())
    return {"ddp": {"policy": 16 * weights, "reference": reference},
            "fsdp": {"policy": 16 * per_shard, "reference": 2 * per_shard,
                     "gathered": 2 * max(root, *(count(layer.parameters()) for layer in layers))},
            "weights": weights}


def table(gpus):
    gib = 2**30
    lines = [f"| model | weights | DDP: policy + reference | FSDP on {gpus}: policy + reference (+ one unit gathered) |",
             "|---|---:|---:|---:|"]
    for name, config in CONFIGS.items():
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)
        b = bytes_per_gpu(model, gpus)
        ddp, fsdp = b["ddp"], b["fsdp"]
        lines.append(f"| {name} | {b['weights'] / 1e9:.2f} B | {ddp['policy'] / gib:.1f} + {ddp['reference'] / gib:.1f} = "
                     f"**{(ddp['policy'] + ddp['reference']) / gib:.1f} GiB** | {fsdp['policy'] / gib:.1f} + "
                     f"{fsdp['reference'] / gib:.1f} = **{(fsdp['policy'] + fsdp['reference']) / gib:.1f} GiB** "
                     f"(+ {fsdp['gathered'] / gib:.2f}) |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=8, help="GPUs the model is sharded across")
    print(table(parser.parse_args().gpus))
