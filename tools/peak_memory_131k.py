"""Peak memory of a train.py run on a tiny model with a 131,072-word vocabulary and completions of a few
hundred tokens, the loss from hidden states against the loss from logits, beside the size of one float32
(2B, T, V) logits tensor of its batch.

    python tools/peak_memory_131k.py         # two runs of 2 steps each, a few minutes on 2 busy cores

Each run is a process of its own; its peak is the process's maximum resident memory (ru_maxrss), also given
above the resident memory just before the first loss (libraries, models and data loaded).
"""

import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent.parent
VOCAB, PAIRS, MAX_LENGTH = 131_072, 2, 512


def make_model_and_data(folder):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=MAX_LENGTH,
                                 tie_word_embeddings=True)).save_pretrained(folder / "model")
    AutoTokenizer.from_pretrained(HERE / "tiny_data/model").save_pretrained(folder / "model")
    words = "the price is great and the fit is good but the lamp is poor".split()
    rows = [{"prompt": f"Review {i}:", "chosen": " " + " ".join(words[(i + j) % len(words)] for j in range(300)),
             "rejected": " " + " ".join(words[(i + 2 * j) % len(words)] for j in range(280))} for i in range(12)]
    (folder / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


CHILD = """
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


def run(folder, from_hidden):
    argv = ["--model", str(folder / "model"), "--dataset", str(folder / "pairs.jsonl"), "--eval-fraction", "0.2",
            "--batch-size", str(PAIRS), "--max-steps", "2", "--eval-every", "1000", "--max-length", str(MAX_LENGTH),
            "--max-prompt-length", "16", "--output-dir", str(folder / f"out-{from_hidden}")]
    code = CHILD.format(here=str(HERE), from_hidden=from_hidden, argv=argv)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise SystemExit(result.stderr[-3000:])
    return json.loads(lines[-1][len("RESULT "):])


def main():
    with tempfile.TemporaryDirectory() as folder:
        folder = pathlib.Path(folder)
        make_model_and_data(folder)
        for from_hidden in (True, False):
            figures = run(folder, from_hidden)
            rows, length = max(figures["shapes"], key=lambda shape: shape[0] * shape[1])
            logits_mib = rows * length * VOCAB * 4 / 2**20
            print(f"{'hidden states' if from_hidden else 'full logits':14} peak RSS {figures['maxrss_kib'] / 1024:5.0f} MiB, "
                  f"{(figures['maxrss_kib'] - figures['before_kib']) / 1024:5.0f} MiB above the RSS before the first loss; "
                  f"largest batch {rows} × {length} tokens: one float32 (2B, T, V) logits tensor {logits_mib:.0f} MiB")


if __name__ == "__main__":
    main()
