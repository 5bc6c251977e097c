"""EpsilonDPOTrainer (epsdpo_trl.py) against itself on 2 processes, against train.py, and the docs' example run.

    2 processes (torchrun's launcher, gloo on the CPU) train with the β and weights of 1 with the same global batch
    train.py and EpsilonDPOTrainer, on the same pairs in the same order, log the same losses, s and β for 3 steps
    docs/trl_example.py trains on tiny_data, offline

In the test process of test_trl.py (the xdist group "trl"), which imports TRL once; each test imports what it needs
of it, so that the other test process, which collects this file without running it, never does.
"""

import importlib.util
import json
import os
import pathlib

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tiny_data is local: nothing may reach for the Hub
pytestmark = pytest.mark.xdist_group("trl")

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY_MODEL = str(ROOT / "tiny_data" / "model")


def tiny_rows(split, count):
    lines = (ROOT / "tiny_data" / "data" / f"{split}.jsonl").read_text().splitlines()[:count]
    return [json.loads(line) for line in lines]


def as_dataset(rows):
    from datasets import Dataset

    return Dataset.from_list([{key: row[key] for key in ("prompt", "chosen", "rejected")} for row in rows])


def train_logs(log_history):
    return [row for row in log_history if "loss" in row and "train_runtime" not in row]


# ----------------------------------------------------------------------------------------------------
# 2 processes against 1


def run_three_steps(output_dir, per_device):
    """3 steps of ε = 0.1 on 12 pairs, 2 micro-batches of per_device pairs a step on each process (DDP over gloo when
    launched on several): the log of the steps, the number of processes and the trained weights."""
    from epsdpo_trl import EpsilonDPOConfig, EpsilonDPOTrainer

    args = EpsilonDPOConfig(
        output_dir=output_dir,
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=2,
        max_steps=3,
        epsilon=0.1,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,
        gradient_checkpointing=False,
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    trainer = EpsilonDPOTrainer(TINY_MODEL, args=args, train_dataset=as_dataset(tiny_rows("train", 12)))
    trainer.train()
    weights = trainer.accelerator.unwrap_model(trainer.model).state_dict()
    return {"log": trainer.state.log_history, "processes": trainer.accelerator.num_processes, "weights": weights}


def test_two_processes_give_the_beta_and_weights_of_one_process(tmp_path, monkeypatch):
    """Launched as torchrun launches (torch.distributed.run calls elastic_launch: 2 processes on one node, c10d
    rendezvous, RANK, WORLD_SIZE, MASTER_ADDR... in their environment), the processes forked from this one, which
    has imported TRL already: about 1 s of CPU instead of 17 for two fresh interpreters."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # the tokenizer's threads do not survive a fork
    launch = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=2,
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        start_method="fork",
        max_restarts=0,
        monitor_interval=0.1,
    )
    two = elastic_launch(launch, run_three_steps)(str(tmp_path / "two"), 1)[0]  # the first process's return value
    one = run_three_steps(str(tmp_path / "one"), 2)  # the same 4 pairs a step in one process
    assert two["processes"] == 2 and one["processes"] == 1
    rows, two_rows = train_logs(one["log"]), train_logs(two["log"])
    for name in ("beta", "s/weaker", "s/stronger"):  # s counts added exactly across the processes: β bit for bit
        assert [row[name] for row in two_rows] == [row[name] for row in rows]
    loss_difference = max(abs(row["loss"] - two_row["loss"]) for row, two_row in zip(rows, two_rows, strict=True))
    assert loss_difference < 1e-6  # 6e-8 measured
    assert rows[2]["beta"] != rows[0]["beta"]  # β moved: the comparison is not of a constant
    weights = one["weights"]
    assert max((weights[name] - weight).abs().max().item() for name, weight in two["weights"].items()) < 1e-5
    # 2.9e-6 measured: DDP averages the two processes' gradients, in another order of float32 additions


# ----------------------------------------------------------------------------------------------------
# train.py against EpsilonDPOTrainer


def test_train_py_and_the_trainer_log_the_same_losses_s_and_beta(tmp_path):
    """The same 6 pairs in the same order, 2 micro-batches of 1 pair a step, lr 1e-3 decaying linearly to 0 over
    3 steps without warmup, AdamW, gradients clipped to norm 1, β = 0.1, ε = 0.1. Tokenization agrees (both tokenize
    prompt + completion as one text, EOS once at the end); the losses differ by float32 rounding (train.py: epsdpo.py
    on full logits at this size; the trainer: from hidden states)."""
    import train
    from epsdpo_trl import EpsilonDPOConfig, EpsilonDPOTrainer

    data, train_rows = tmp_path / "data", tiny_rows("train", 6)
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in train_rows))
    (data / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in tiny_rows("test", 2)))
    hyperparameters = "--max-steps 3 --batch-size 1 --grad-accum 2 --lr 1e-3 --beta 0.1 --epsilon 0.1 --seed 0"
    run = "--warmup-ratio 0 --criterion-pairs 0 --eval-batch-size 2 --device cpu"
    train.main(
        [*hyperparameters.split(), *run.split(), "--dataset", str(data), "--output-dir", str(tmp_path / "train_py")]
    )
    metrics = [json.loads(line) for line in (tmp_path / "train_py" / "metrics.jsonl").read_text().splitlines()]
    train_py_rows = [row for row in metrics if row["split"] == "train"]

    # train.py's order of the pairs (batches.micro_batches): the first epoch's randperm of the seed; the trainer
    # takes them as they come ("sequential"): the same pair each micro-batch.
    order = torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(0)).tolist()
    args = EpsilonDPOConfig(
        output_dir=str(tmp_path / "trl"),
        per_device_train_batch_size=1,
        gradient_accumulation_steps=2,
        max_steps=3,
        epsilon=0.1,
        learning_rate=1e-3,
        lr_scheduler_type="linear",
        warmup_steps=0,
        max_grad_norm=1.0,
        train_sampling_strategy="sequential",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,
        gradient_checkpointing=False,
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    trainer = EpsilonDPOTrainer(TINY_MODEL, args=args, train_dataset=as_dataset([train_rows[i] for i in order]))
    trainer.train()
    rows = train_logs(trainer.state.log_history)
    assert len(rows) == len(train_py_rows) == 3
    for row, train_py_row in zip(rows, train_py_rows, strict=True):
        assert row["loss"] == pytest.approx(train_py_row["loss"], abs=1e-6)  # 3e-8 measured
        for name in ("h", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
            assert row[name] == pytest.approx(train_py_row[name], abs=1e-5)  # the rewards with each pair's β̃
        assert (row["beta"], row["s/weaker"], row["s/stronger"]) == tuple(
            train_py_row[name] for name in ("beta", "s/weaker", "s/stronger")
        )
    assert rows[2]["beta"] != 0.1 and rows[1]["s/weaker"] > 0  # s and β moved: the comparison is not of constants


# ----------------------------------------------------------------------------------------------------
# The docs' example


def test_the_docs_example_trains_on_tiny_data_offline(tmp_path):
    spec = importlib.util.spec_from_file_location("trl_example", ROOT / "docs" / "trl_example.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    trainer = example.main(
        ["--max_steps", "3", "--eval_steps", "3", "--per_device_eval_batch_size", "300", "--output_dir", str(tmp_path)]
    )
    evaluation = next(row for row in trainer.state.log_history if "eval_loss" in row)
    assert trainer.state.global_step == 3 and evaluation["eval_beta"] == trainer.baseline_beta.value
    assert (tmp_path / "model.safetensors").exists() and trainer.loss_path.from_hidden
