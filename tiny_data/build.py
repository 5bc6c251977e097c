"""Builds everything in tiny_data/: the preference data and the tiny reference model. Deterministic.

    python tiny_data/build.py          # about 12 s on a laptop CPU; rewrites data/ and model/

The task (see gold_reward.py): write a short review of a product; the gold reward is how positive it is.
1. Reviews are drawn from a small grammar: 1 to 3 clauses "the <aspect> is [very] <adjective>" joined by
   "and" / "but" / "while", each adjective positive, negative or neutral with equal chance.
2. A pair is two reviews of the same product with different gold rewards; the better one is "chosen".
   In the train split a fraction NOISE_FRACTION of pairs has its label flipped, as real annotators
   sometimes do; their "noisy" field is true. The test split is clean, so accuracy on it measures
   agreement with the gold reward.
3. The reference model is a small Llama trained by supervised fine-tuning on each train prompt followed
   by its chosen and by its rejected review, so it has seen both sides equally and starts indifferent.
"""

import json
import pathlib
import random
import sys

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from gold_reward import INTENSIFIER, NEGATIVE, NEUTRAL, POSITIVE, score  # noqa: E402

HERE = pathlib.Path(__file__).parent
SEED = 0
NUM_TRAIN, NUM_TEST = 2000, 300
NOISE_FRACTION = 0.2
PRODUCTS = (
    "kettle",
    "phone",
    "laptop",
    "blender",
    "camera",
    "backpack",
    "lamp",
    "chair",
    "watch",
    "toaster",
    "speaker",
    "bike",
)
ASPECTS = (
    "battery",
    "price",
    "design",
    "sound",
    "screen",
    "size",
    "build",
    "delivery",
    "handle",
    "color",
    "manual",
    "fit",
)
CONNECTORS = ("and", "but", "while")
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")


def prompt_for(product):
    return f"Review of the {product}:"


def random_review(rng):
    clauses = []
    for _ in range(rng.randint(1, 3)):
        adjective = rng.choice(rng.choice((POSITIVE, NEGATIVE, NEUTRAL)))
        very = f"{INTENSIFIER} " if rng.random() < 0.3 else ""
        clauses.append(f"the {rng.choice(ASPECTS)} is {very}{adjective}")
    review = clauses[0]
    for clause in clauses[1:]:
        review += f" {rng.choice(CONNECTORS)} {clause}"
    return " " + review[0].upper() + review[1:] + "."


def preference_pairs(rng, num_pairs, noise_fraction):
    rows = []
    while len(rows) < num_pairs:
        prompt = prompt_for(rng.choice(PRODUCTS))
        first, second = random_review(rng), random_review(rng)
        if score(prompt, first) == score(prompt, second):
            continue  # no preference to learn
        chosen, rejected = sorted((first, second), key=lambda review: -score(prompt, review))
        noisy = rng.random() < noise_fraction
        if noisy:
            chosen, rejected = rejected, chosen
        rows.append(
            {
                "prompt": prompt,
                "chosen": chosen,
                "rejected": rejected,
                "noisy": noisy,
                "score_chosen": score(prompt, chosen),
                "score_rejected": score(prompt, rejected),
            }
        )
    return rows


def build_tokenizer():
    words = [
        "review",
        "of",
        "the",
        ":",
        ".",
        "is",
        INTENSIFIER,
        *PRODUCTS,
        *ASPECTS,
        *CONNECTORS,
        *POSITIVE,
        *NEGATIVE,
        *NEUTRAL,
    ]
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def supervised_fine_tuning(model, tokenizer, texts, epochs=6, batch_size=64, lr=3e-3):
    """Next-token training on whole texts (prompt and review), padding ignored."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(SEED)
    total_steps = epochs * ((len(texts) + batch_size - 1) // batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total_steps, pct_start=0.1)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(texts), generator=generator).tolist()
        for start in range(0, len(texts), batch_size):
            batch = tokenizer([texts[i] for i in order[start : start + batch_size]], padding=True, return_tensors="pt")
            labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
            loss = model(**batch, labels=labels).loss
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        print(f"  epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}")
    return model.eval()


def main():
    rng = random.Random(SEED)
    torch.manual_seed(SEED)
    train_rows = preference_pairs(rng, NUM_TRAIN, NOISE_FRACTION)
    test_rows = preference_pairs(rng, NUM_TEST, 0.0)
    (HERE / "data").mkdir(exist_ok=True)
    for name, rows in (("train", train_rows), ("test", test_rows)):
        with open(HERE / "data" / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    print(f"data: {len(train_rows)} train pairs ({sum(r['noisy'] for r in train_rows)} noisy), {len(test_rows)} test")

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    texts = [row["prompt"] + row[side] + tokenizer.eos_token for row in train_rows for side in ("chosen", "rejected")]
    print(f"reference model: {sum(p.numel() for p in model.parameters()):,} parameters, SFT on {len(texts)} texts")
    supervised_fine_tuning(model, tokenizer, texts)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(HERE / "model")
    tokenizer.save_pretrained(HERE / "model")
    print(f"saved to {HERE / 'data'} and {HERE / 'model'}")


if __name__ == "__main__":
    main()
