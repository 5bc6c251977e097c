"""What the tests of tests/ share: data and model folders made for a test, reading a run's metrics, running
train.py to its one-line error, and the one torchrun launch of the multi-process runs."""

import io
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import train
from training import evaluation, loss, models, reports
from training.arguments import ROOT, TINY_DATASET, TINY_MODEL
from training.output_folder import write_atomically


def _one_pixel_png():
    image = io.BytesIO()
    Image.new("RGB", (1, 1), "white").save(image, format="PNG")
    return image.getvalue()


ONE_PIXEL_PNG = _one_pixel_png()


def save_laid_out(figure, path):
    """reports._save_figure in the test processes (tests/conftest.py's figures_laid_out_not_drawn) and the torchrun
    launch's: the figure, laid out whole by reports.plot_curves or plot_criterion (every panel, line, label and
    title), written atomically as a PNG of one pixel rather than drawn. Drawing the panels into pixels took 0.5 s
    of a 1 s run on tiny_data, a sixth of the suite's CPU time."""
    write_atomically(pathlib.Path(path), ONE_PIXEL_PNG)
    reports._pyplot().close(figure)


# Small batches, short samples, no criterion figure: for runs whose evaluations are not what a test checks.
QUICK = ["--batch-size", "4", "--eval-batch-size", "32", "--max-new-tokens", "8", "--criterion-pairs", "0"]


def read_metrics(output_dir):
    """The rows of a run's metrics.jsonl, one dict per evaluation or training step."""
    return [json.loads(line) for line in open(output_dir / "metrics.jsonl")]


def read_metrics_if_any(output_dir):
    """read_metrics of a run that may not have written its first row yet, or is writing one."""
    try:
        return read_metrics(output_dir)
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def write_jsonl(path, rows):
    """rows written to path as JSON Lines; path."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def tiny_data_cut(folder, train_rows, test_rows):
    """tiny_data's first train_rows and test_rows pairs, as a dataset folder of their own."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", train_rows), ("test", test_rows)):
        lines = (TINY_DATASET / f"{split}.jsonl").read_text().splitlines()[:rows]
        (folder / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def reviews(num_pairs):
    """num_pairs (prompt, chosen, rejected) texts of product reviews in tiny_data's words."""
    for i in range(num_pairs):
        product = ("kettle", "lamp", "chair")[i % 3]
        yield f"Review of the {product}:", " The price is great.", " The price is very awful and the fit is poor."


def good_rows(num_pairs=12):
    """reviews as standard JSONL rows."""
    return [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in reviews(num_pairs)]


def run_expecting_error(arguments, main=train.main):
    """train.main's (or compare.main's) message when it stops on bad input: it exits with one line, no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main(arguments)
    assert isinstance(exit_info.value.code, str) and "\n" not in exit_info.value.code, exit_info.value.code
    return exit_info.value.code


def copy_of(run, tmp_path, dot_files=True):
    """A copy of a run's output folder, tmp_path/out, that a test may resume or break; without dot_files, as
    `cp -r out/* new/` makes it (no .train.files)."""
    shutil.copytree(run, tmp_path / "out", ignore=shutil.ignore_patterns(".train.lock", *([] if dot_files else [".*"])))
    return tmp_path / "out"


def train_steps(output_dir):
    """The steps of a run's training rows in metrics.jsonl."""
    return [row["step"] for row in read_metrics(output_dir) if row["split"] == "train"]


def ctrl_c_at_training_micro_batch(monkeypatch, number):
    """A Ctrl-C during the number-th training micro-batch (from 1) of the runs made in this process."""
    real_loss, seen = train.micro_batch_loss, []

    def loss_then_ctrl_c(*args):
        if torch.is_grad_enabled():
            seen.append(1)
            if len(seen) == number:
                os.kill(os.getpid(), signal.SIGINT)
        return real_loss(*args)

    monkeypatch.setattr(train, "micro_batch_loss", loss_then_ctrl_c)


def without_gold_reward(arguments):
    """small_data's arguments without its gold reward: no sampling in evaluations, for tests that do not need it."""
    at = arguments.index("--gold-reward")
    return arguments[:at] + arguments[at + 2 :]


def tiny_model_folder(folder, vocab_size=60, tokenizer_changes=None, kind="llama", **config):
    """A small model of the kind's configuration (Llama unless asked) with the tiny_data tokenizer, saved to a
    folder: vocabulary, configuration and tokenizer as asked."""
    config = AutoConfig.for_model(
        kind,
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        **config,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    for name, value in (tokenizer_changes or {}).items():
        setattr(tokenizer, name, value)
    tokenizer.save_pretrained(folder)
    return str(folder)


def tiny_llama(vocab=64, width=16, layers=1, seed=0):
    """A small Llama of random weights (seeded), in eval mode, with 64 positions."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(
        "llama",
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return AutoModelForCausalLM.from_config(config).eval()


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def one_launch(runs, rendezvous):
    """What each process of two_ranks' torchrun launch runs: train.main on each run's argv in turn. Each run joins a
    process group of its own (train.main ends it): torchrun's would be joined again by a rank that starts the next
    run while the other still finishes the last, and meet that rank's old connection. A run with "from_hidden" takes
    the loss from hidden states whatever its size (loss.PLAIN_LOSS_BYTES = 0). Each process writes, per run, how
    often that loss ran, the all-gathers of each generate() call, the models it read whole (models.load_model) and
    how often the loss left a sharded reference's root gathered, to RENDEZVOUS-I-RANK.json; and its process id
    to RENDEZVOUS-RANK.pid. A run with "stop" is stopped by a signal (train.main exits with its status, counted too):
    the next one follows. The figures are laid out, not drawn (save_laid_out)."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from transformers import GenerationMixin

    import epsdpo_chunked
    from training import sharding

    counts, real_all_gather, real_generate = {}, dist.all_gather_single, GenerationMixin.generate
    real_loss, plain_loss_bytes = epsdpo_chunked.epsilon_dpo_loss_from_hidden, loss.PLAIN_LOSS_BYTES

    def all_gather_single(*args, **kwargs):  # what FSDP2 gathers a unit's weights with
        counts["all_gathers"] += 1
        return real_all_gather(*args, **kwargs)

    def generate(self, *args, **kwargs):
        before = counts["all_gathers"]
        try:
            return real_generate(self, *args, **kwargs)
        finally:
            counts["all_gathers_per_generate"].append(counts["all_gathers"] - before)

    def loss_from_hidden(*args, **kwargs):
        counts["losses_from_hidden"] += 1
        return real_loss(*args, **kwargs)

    def load_model(name, *args, **kwargs):
        counts["models_read"].append(str(name))
        return real_load_model(name, *args, **kwargs)

    def forward(policy, reference, *args, **kwargs):
        out = real_forward(policy, reference, *args, **kwargs)
        if sharding.sharded(reference):  # its root is gathered only for the loss
            counts["reference_root_left_whole"] += not isinstance(reference.get_output_embeddings().weight, DTensor)
        return out

    real_load_model, real_forward = models.load_model, loss.micro_batch_loss
    dist.all_gather_single, GenerationMixin.generate, epsdpo_chunked.epsilon_dpo_loss_from_hidden = (
        all_gather_single,
        generate,
        loss_from_hidden,
    )
    models.load_model, train.micro_batch_loss, evaluation.micro_batch_loss = load_model, forward, forward
    reports._save_figure = save_laid_out
    pathlib.Path(f"{rendezvous}-{os.environ['RANK']}.pid").write_text(str(os.getpid()))
    for i, run in enumerate(json.loads(runs)):
        counts.update(
            all_gathers=0,
            all_gathers_per_generate=[],
            losses_from_hidden=0,
            models_read=[],
            reference_root_left_whole=0,
            exit_status=0,
        )
        loss.PLAIN_LOSS_BYTES = 0 if run.get("from_hidden") else plain_loss_bytes
        dist.init_process_group(
            "gloo",
            init_method=f"file://{rendezvous}-{i}",
            rank=int(os.environ["RANK"]),
            world_size=int(os.environ["WORLD_SIZE"]),
        )
        started = time.time()
        try:
            train.main(run["argv"])
        except SystemExit as stopped:
            if not run.get("stop"):
                raise
            counts["exit_status"] = stopped.code
        pathlib.Path(f"{rendezvous}-{i}-{os.environ['RANK']}.json").write_text(json.dumps(counts))
        if os.environ["RANK"] == "0":
            print(f"run {i}: {time.time() - started:.1f} s")


def launch(runs, rendezvous):
    """One torchrun launch of 2 CPU processes (gloo) running one_launch on each run's argv in turn: (its stdout and
    stderr, what each process counted in each run). A run with "stop" is stopped once it has logged a step: "sigterm",
    by a SIGTERM to each process, as a cluster's scheduler sends it to every process of a job it preempts, and the
    launch goes on; "ctrl-c" (the last run), by a Ctrl-C: SIGINT to the whole process group, so that each rank gets
    it two or three times within milliseconds (torchrun passes it on too), which ends the launch."""
    script = "import sys; from tests import helpers; helpers.one_launch(sys.argv[1], sys.argv[2])"
    process = subprocess.Popen(
        [*TORCHRUN, "--no-python", sys.executable, "-c", script, json.dumps(list(runs.values())), str(rendezvous)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        start_new_session=True,
    )
    for run in runs.values():
        if run.get("stop"):
            output_dir, deadline = pathlib.Path(run["argv"][1]), time.time() + 240
            while (
                not any(row["split"] == "train" for row in read_metrics_if_any(output_dir)) and time.time() < deadline
            ):
                time.sleep(0.01)  # a step takes tens of milliseconds: signal in the first ones
            if run["stop"] == "ctrl-c":
                os.killpg(process.pid, signal.SIGINT)
            else:
                for rank in (0, 1):
                    os.kill(int(pathlib.Path(f"{rendezvous}-{rank}.pid").read_text()), signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0 or list(runs.values())[-1].get("stop") == "ctrl-c", stderr[-3000:]
    counted = {
        name: [json.loads(pathlib.Path(f"{rendezvous}-{i}-{rank}.json").read_text()) for rank in (0, 1)]
        for i, name in enumerate(runs)
        if runs[name].get("stop") != "ctrl-c"
    }
    return (stdout, stderr), counted


class RunInThisProcess:
    """What compare.start_run returns (a train.py run under way), for the run made in this process by train.main."""

    def __init__(self, arguments, environment, quiet):
        self.status, self.line = 0, ""
        try:
            train.main(arguments)
        except SystemExit as exit_info:
            self.status = exit_info.code if isinstance(exit_info.code, int) else 1
            self.line = exit_info.code if isinstance(exit_info.code, str) else ""

    def poll(self):
        return self.status

    wait = poll

    def send_signal(self, number):
        pass

    def kill(self):
        pass

    def last_line(self):
        return self.line
