"""The runs several test files read, each made once per test session (conftest.py at the top keeps the tests
that read one in the same test process)."""

import contextlib
import shutil
import time

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

import train
from tests.helpers import QUICK, ctrl_c_at_training_micro_batch, launch, save_laid_out, tiny_data_cut
from training import reports
from training.arguments import TINY_GOLD_REWARD, TINY_MODEL

DRAW_FIGURE = reports._save_figure


@pytest.fixture(scope="session", autouse=True)
def figures_laid_out_not_drawn():
    """The runs made in the test processes lay their figures out and write them, but do not draw them
    (helpers.save_laid_out), as do the torchrun launch's. The demo's run (tiny_run, below) and the runs of python
    train.py and compare.py in processes of their own draw theirs."""
    reports._save_figure = save_laid_out
    yield
    reports._save_figure = DRAW_FIGURE


@contextlib.contextmanager
def figures_drawn():
    """Figures drawn as a user's run draws them, within figures_laid_out_not_drawn."""
    laid_out, reports._save_figure = reports._save_figure, DRAW_FIGURE
    try:
        yield
    finally:
        reports._save_figure = laid_out


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """Arguments for tiny_data cut to 200 train and 32 held-out pairs, with its gold reward: for the tests
    where the size of the data does not matter, so that their evaluations are quick."""
    folder = tiny_data_cut(tmp_path_factory.mktemp("small-data"), 200, 32)
    return ["--dataset", str(folder), "--gold-reward", str(TINY_GOLD_REWARD), *QUICK]


@pytest.fixture(scope="session")
def local_model(tmp_path_factory):
    """The tiny model saved to a folder of its own, its tokenizer given a chat template."""
    folder = tmp_path_factory.mktemp("model")
    AutoModelForCausalLM.from_pretrained(TINY_MODEL).save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    # Every message ends with EOS, as many chat templates do (so train.py must not add a second one).
    tokenizer.chat_template = (
        "{% for message in messages %}{{ message['role'] }} : {{ message['content'] }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}assistant :{% endif %}"
    )
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """Three steps of ε-DPO on tiny_data with two micro-batches per step and a large ε, so β moves."""
    output_dir = tmp_path_factory.mktemp("tiny")
    with figures_drawn():
        train.main(
            [
                "--output-dir",
                str(output_dir),
                "--max-steps",
                "3",
                "--eval-every",
                "2",
                "--grad-accum",
                "2",
                "--epsilon",
                "0.3",
                "--lr",
                "1e-3",
                *QUICK,
                "--criterion-pairs",
                "64",
            ]
        )
    return output_dir


@pytest.fixture(scope="session")
def two_checkpoints(tmp_path_factory, small_data):
    """A run of 2 steps with a checkpoint after each, to copy and break."""
    output_dir = tmp_path_factory.mktemp("two-checkpoints") / "out"
    train.main(
        [
            "--output-dir",
            str(output_dir),
            "--max-steps",
            "2",
            "--save-every",
            "1",
            "--keep-checkpoints",
            "2",
            "--eval-every",
            "1000",
            *small_data,
        ]
    )
    return output_dir


@pytest.fixture(scope="session")
def stopped_run(tmp_path_factory, small_data):
    """A run of 3 steps stopped by a Ctrl-C in its second: checkpoint-1 (--save-every 1) and checkpoint-2. Its
    samples are scored by a copy of tiny_data's gold reward beside its folder (gold_reward.py), which a test edits."""
    folder = tmp_path_factory.mktemp("stopped")
    gold = shutil.copy(TINY_GOLD_REWARD, folder / "gold_reward.py")
    at = small_data.index("--gold-reward")
    arguments = [*small_data[:at], "--gold-reward", str(gold), *small_data[at + 2 :]]
    with pytest.MonkeyPatch.context() as monkeypatch:
        ctrl_c_at_training_micro_batch(monkeypatch, 2)
        with pytest.raises(SystemExit):
            train.main(["--output-dir", str(folder / "out"), "--max-steps", "3", "--save-every", "1", *arguments])
    assert sorted(p.name for p in (folder / "out").glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    return folder / "out"


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory, small_data):
    """Arguments and output of 4 steps of 8 pairs with LoRA adapters of rank 4, a checkpoint every 2 steps,
    without a gold reward (no sampling), so that it is quick."""
    data_only = small_data[: small_data.index("--gold-reward")] + small_data[small_data.index("--gold-reward") + 2 :]
    arguments = [
        "--lora-r",
        "4",
        "--max-steps",
        "4",
        "--save-every",
        "2",
        "--eval-every",
        "1000",
        "--epsilon",
        "0.3",
        "--lr",
        "1e-2",
        *data_only,
    ]
    output_dir = tmp_path_factory.mktemp("lora") / "one"
    train.main(["--output-dir", str(output_dir), *arguments, "--batch-size", "8"])
    return arguments, output_dir


@pytest.fixture(scope="session")
def two_ranks(tmp_path_factory, lora_run):
    """One process with 8 pairs per step, and 2 CPU processes (gloo) with 4 pairs each: with DDP (the loss from hidden
    states), and with FSDP in two micro-batches of 2: in float32 from logits and from hidden states, and in bf16 from
    hidden states with gradient checkpointing; lora_run's LoRA run with DDP; the one-process run resumed on 2
    processes. An FSDP run stopped by a SIGTERM, then resumed; a DDP run stopped by a Ctrl-C. 33 held-out pairs: the
    ranks' shares differ by one. One torchrun launch (a launch costs seconds to start), ended by the Ctrl-C. Returns
    (folder, what the launch printed, what each process counted in each run)."""
    folder = tmp_path_factory.mktemp("two-ranks")
    arguments = [
        "--dataset",
        str(tiny_data_cut(folder / "data", 200, 33)),
        "--gold-reward",
        str(TINY_GOLD_REWARD),
        "--max-new-tokens",
        "8",
        "--eval-batch-size",
        "16",
        "--max-steps",
        "10",
        "--eval-every",
        "1000",
        "--save-every",
        "1000",
        "--epsilon",
        "0.3",
        "--lr",
        "1e-3",
        "--criterion-pairs",
        "0",
    ]
    train.main(["--output-dir", str(folder / "one"), *arguments, "--batch-size", "8", "--save-every", "5"])
    ddp, fsdp = [*arguments, "--batch-size", "4"], [*arguments, "--fsdp", "--batch-size", "2", "--grad-accum", "2"]
    lora_arguments, _ = lora_run
    shutil.copytree(
        folder / "one", folder / "one-on-two", ignore=shutil.ignore_patterns(".train.lock", "checkpoint-10")
    )
    runs = {
        "ddp-whole": dict(argv=["--output-dir", str(folder / "ddp-whole"), *ddp], from_hidden=True),
        "fsdp-whole": dict(argv=["--output-dir", str(folder / "fsdp-whole"), *fsdp, "--save-every", "5"]),
        "fsdp-hidden": dict(
            argv=["--output-dir", str(folder / "fsdp-hidden"), *fsdp, "--criterion-pairs", "8"], from_hidden=True
        ),
        "fsdp-bf16": dict(
            argv=["--output-dir", str(folder / "fsdp-bf16"), *fsdp, "--dtype", "bfloat16", "--gradient-checkpointing"],
            from_hidden=True,
        ),
        "lora": dict(
            argv=["--output-dir", str(folder / "lora"), *lora_arguments, "--batch-size", "4"], from_hidden=True
        ),
        "one-on-two": dict(argv=["--resume", str(folder / "one-on-two"), "--gold-reward", str(TINY_GOLD_REWARD)]),
        "fsdp": dict(argv=["--output-dir", str(folder / "fsdp"), *fsdp], stop="sigterm"),
        "fsdp-resumed": dict(argv=["--resume", str(folder / "fsdp"), "--gold-reward", str(TINY_GOLD_REWARD)]),
        "ddp": dict(argv=["--output-dir", str(folder / "ddp"), *ddp], from_hidden=True, stop="ctrl-c"),
    }
    started = time.time()
    printed, counted = launch(runs, folder / "rendezvous")
    print(
        f"{len(runs)} runs in one launch of 2 processes: {time.time() - started:.1f} s ("
        + ", ".join(line for line in printed[0].splitlines() if line.startswith("run "))
        + ")"
    )
    return folder, printed, counted
