"""compare.py: DPO and ε-DPO side by side, the frontier over β (--betas), and figures that compare like with like."""

import json
import math
import pathlib
import signal
import types

import pytest
from transformers import AutoModelForCausalLM

import compare
from tests.helpers import (
    RunInThisProcess,
    ctrl_c_at_training_micro_batch,
    read_metrics,
    run_expecting_error,
    tiny_data_cut,
    train_steps,
    without_gold_reward,
)
from training import data, evaluation
from training.arguments import TINY_MODEL


def test_compare_trains_dpo_and_epsilon_dpo_side_by_side(tmp_path, capsys, small_data, monkeypatch):
    """The runs made in this process (compare.start_run); python compare.py and its python train.py runs as a user
    starts them: tests/test_signals.py's Ctrl-C of a frontier."""
    monkeypatch.setattr(compare, "start_run", RunInThisProcess)
    compare.main(["--output-dir", str(tmp_path), "--max-steps", "2", "--epsilon", "0.3", *small_data])
    dpo = json.loads((tmp_path / "dpo/summary.json").read_text())
    epsilon_dpo = json.loads((tmp_path / "epsilon-dpo/summary.json").read_text())
    assert (dpo["args"]["epsilon"], epsilon_dpo["args"]["epsilon"]) == (0.0, 0.3)
    assert dpo["final_beta"] == 0.1
    assert (tmp_path / "compare.png").exists()
    printed = capsys.readouterr().out
    assert "DPO end" in printed and "ε-DPO end" in printed


def test_a_comparison_resumes_each_run_and_redraws_a_finished_one(tmp_path, monkeypatch, capsys, small_data):
    """compare.py --resume DIR goes on with a stopped comparison, each run with its own arguments (the comparison's
    data and batch, not the defaults): the stopped one from its checkpoint, which stays, the one that never
    started from the start; a flag a resumed comparison cannot change is refused in one line; on a finished
    comparison it draws compare.png again and trains nothing. The runs are made in this process
    (compare.start_run); in processes of their own: tests/test_signals.py's Ctrl-C of python compare.py."""
    monkeypatch.setattr(compare, "start_run", RunInThisProcess, raising=False)
    ctrl_c_at_training_micro_batch(monkeypatch, 1)
    arguments = ["--output-dir", str(tmp_path), "--max-steps", "2", "--eval-every", "1000", "--seed", "3"]
    with pytest.raises(SystemExit) as exit_info:
        compare.main([*arguments, *without_gold_reward(small_data)])  # no samples to wait for
    assert exit_info.value.code == 128 + signal.SIGINT
    assert [p.name for p in (tmp_path / "dpo").glob("checkpoint-*")] == ["checkpoint-1"]
    assert f"python compare.py --resume {tmp_path} goes on" in capsys.readouterr().out

    assert run_expecting_error(["--resume", str(tmp_path), "--beta", "0.2"], compare.main).startswith(
        f"error: --resume {tmp_path}: --beta given; a resumed comparison keeps its arguments"
    )
    compare.main(["--resume", str(tmp_path)])
    printed = capsys.readouterr().out
    assert f"resuming from {tmp_path / 'dpo/checkpoint-1'} at step 2" in printed
    assert (tmp_path / "dpo/checkpoint-1").is_dir()  # nothing deleted a stopped run's checkpoint
    for run in ("dpo", "epsilon-dpo"):
        assert train_steps(tmp_path / run) == [1, 2]
        saved = json.loads((tmp_path / run / "summary.json").read_text())["args"]
        assert (saved["dataset"], saved["batch_size"], saved["seed"]) == (small_data[1], 4, 3)
    assert "DPO end" in printed and "ε-DPO end" in printed

    (tmp_path / "compare.png").unlink()

    def no_run(*arguments):
        raise AssertionError("a finished comparison trained a run")

    monkeypatch.setattr(compare, "start_run", no_run)
    compare.main(["--resume", str(tmp_path)])
    assert (tmp_path / "compare.png").exists() and "side by side" in capsys.readouterr().out


class FailedRun(RunInThisProcess):
    """A run of train.py that failed at once, with its one line."""

    def __init__(self, arguments, environment, quiet):
        self.status, self.line = 1, "error: --dataset /d: no such file or folder"


def test_a_comparison_whose_run_fails_stops_naming_it_and_how_to_go_on(tmp_path, monkeypatch):
    """A run that fails stops the comparison (the others would be stopped with their checkpoints), in one line."""
    monkeypatch.setattr(compare, "start_run", FailedRun)
    assert run_expecting_error(["--output-dir", str(tmp_path), "--max-steps", "2"], compare.main) == (
        f"error: the run in {tmp_path / 'dpo'} failed: --dataset /d: no such file or folder; 0 of 2 runs finished, 0 "
        f"stopped with a checkpoint, 2 did not start: python compare.py --resume {tmp_path} goes on"
    )


def test_every_panel_compares_like_with_like(tiny_run, tmp_path, monkeypatch):
    """compare.png has no loss (it moves with β) and leaves DPO, whose s is 0 throughout, out of the s panels;
    criterion.png zooms on [1 − 2ε, 1 + 2ε], where z(1 − ε), z(1), z(1 + ε) of each pair are the dots s
    compares."""

    from training import reports

    figures = []
    monkeypatch.setattr(reports, "_save_figure", lambda figure, path: figures.append(figure))
    row = dict(
        split="train",
        beta=0.1,
        h=1.0,
        loss=0.6,
        **{"rewards/accuracies": 0.5, "logps/chosen": -9.0, "logps/rejected": -9.5, "gold_reward": 0.0, "kl": 0.0},
    )

    def s(weaker, stronger):
        return {
            "s/weaker/clean": weaker,
            "s/stronger/clean": stronger,
            "s/weaker/noisy": stronger,
            "s/stronger/noisy": weaker,
        }

    runs = {
        "DPO": [dict(row, step=step, **s(0.0, 0.0)) for step in (1, 2)],
        "ε-DPO": [dict(row, step=step, **s(0.75, 0.25)) for step in (1, 2)],
    }
    reports.plot_curves(runs, tmp_path / "compare.png")
    titles = {axis.get_title(): axis for axis in figures[0].axes}
    assert not any("loss" in title for title in titles)
    s_panels = [axis for title, axis in titles.items() if title.startswith("fraction s")]
    assert len(s_panels) == 2 and all("DPO: s = 0 throughout, not drawn" in axis.get_title() for axis in s_panels)
    assert {line.get_color() for axis in s_panels for line in axis.lines} == {"tab:red"}  # ε-DPO's colour only

    folder = tiny_data_cut(tmp_path / "data", 8, 2)
    tokenizer = data.load_tokenizer(str(TINY_MODEL))
    pairs = data.load_pairs(str(folder), "train", None, 0.05, 0, tokenizer, 512, 256)["pairs"]["train"][:4]
    policy, reference = (AutoModelForCausalLM.from_pretrained(path).eval() for path in (tiny_run, TINY_MODEL))
    epsilon = 0.01
    run_models = types.SimpleNamespace(policy=policy, reference=reference, head=None)  # from full logits
    run_args = types.SimpleNamespace(epsilon=epsilon, eval_batch_size=64, batch_size=64)
    measured = evaluation.criterion_measures(run_models, pairs, tokenizer.pad_token_id, run_args)
    assert {1 - epsilon, 1.0, 1 + epsilon} <= set(measured["lambdas"])
    reports.plot_criterion(measured, epsilon, tmp_path / "criterion.png")
    left, middle, right = figures[1].axes[:3]
    assert middle.get_xlim() == pytest.approx((1 - 2 * epsilon, 1 + 2 * epsilon))
    dots = [line for line in middle.lines if line.get_marker() == "o"]
    assert len(dots) == len(measured["curves"])
    for line in dots:
        assert list(line.get_xdata()) == [1 - epsilon, 1.0, 1 + epsilon] and line.get_ydata()[1] == 0


@pytest.mark.slow
def test_compare_betas_draws_the_frontier_of_three_methods_with_lora(tmp_path, capsys, small_data, monkeypatch):
    """Its runs train LoRA adapters, as every run of a comparison takes the --lora-* arguments (the full
    fine-tuning of a comparison is tested above). One seed: the means over seeds are tested below; the 6 runs
    one after another, each in this process (the runs in processes of their own: the test above)."""
    monkeypatch.setattr(compare, "start_run", RunInThisProcess)
    compare.main(
        [
            "--betas",
            "0.1",
            "0.3",
            "--seeds",
            "1",
            "--seed",
            "1",
            "--workers",
            "1",
            "--output-dir",
            str(tmp_path),
            "--max-steps",
            "2",
            "--epsilon",
            "0.3",
            "--lora-r",
            "4",
            *small_data,
        ]
    )
    points = json.loads((tmp_path / "frontier.json").read_text())
    assert [(p["method"], p["beta"], p["seed"]) for p in points] == [
        (method, beta, 1) for beta in (0.1, 0.3) for method in ("DPO", "ε-DPO", "ε-DPO, fixed baseline β")
    ]
    for p in points:
        assert {
            "method",
            "beta",
            "epsilon",
            "seed",
            "gold_reward",
            "kl",
            "rewards/accuracies",
            "final_beta",
        } <= p.keys()
        assert math.isfinite(p["gold_reward"]) and p["kl"] >= 0
        assert (p["final_beta"] == p["beta"]) == (p["method"] != "ε-DPO")  # only ε-DPO moves its baseline β
        assert p["epsilon"] == (0.0 if p["method"] == "DPO" else 0.3)
        rows = read_metrics(pathlib.Path(p["output_dir"]))
        assert [r["step"] for r in rows if r["split"] == "eval"] == [0, 2]  # evaluated at the start and the end
        assert (pathlib.Path(p["output_dir"]) / "adapter_model.safetensors").exists()
    same_start = [p for p in points if p["beta"] == 0.1]
    assert len({read_metrics(pathlib.Path(p["output_dir"]))[0]["loss"] for p in same_start}) == 1
    assert (tmp_path / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "ε-DPO, fixed baseline β" in printed and "gold reward" in printed


def test_the_frontier_is_the_mean_over_seeds_with_lowest_and_highest(tmp_path, capsys):
    """frontier.json's points from the runs' summaries (mean s over every pair seen), and the frontier's table and
    figure from them: per method and β the mean over seeds, with the lowest and highest seed."""
    from training import reports

    def summary(method, beta, seed):
        gold, kl = {"DPO": 1.0, "ε-DPO": 2.0, "ε-DPO, fixed baseline β": 3.0}[method] + seed, 10 * beta + 2 * seed
        groups = {
            "clean": {"pairs": 30, "weaker": 0.5, "stronger": 0.2},
            "noisy": {"pairs": 10, "weaker": 0.1, "stronger": 0.5},
        }
        return {
            "label": method,
            "args": {
                "beta": beta,
                "epsilon": 0.01,
                "fixed_baseline_beta": False,
                "seed": seed,
                "output_dir": f"{method}-{beta}-{seed}",
            },
            "final": {"gold_reward": gold, "kl": kl, "rewards/accuracies": 0.5 + seed / 10},
            "final_beta": beta * (1 + seed),
            "s_by_noise": groups,
        }

    points = reports.frontier_points(
        [
            summary(method, beta, seed)
            for beta in (0.1, 0.2)
            for seed in (0, 1)
            for method in ("DPO", "ε-DPO", "ε-DPO, fixed baseline β")
        ]
    )
    assert len(points) == 12 and points[0]["mean_s"] == pytest.approx((30 * 0.3 + 10 * -0.4) / 40)
    reports.print_frontier(points)
    lines = capsys.readouterr().out.splitlines()
    dpo = next(line for line in lines if line.startswith("DPO") and " 0.2 " in line)
    assert dpo.split() == [
        "DPO",
        "0.2",
        "+1.50",
        "(+1.00–+2.00)",
        "3.00",
        "(2.00–4.00)",
        "0.550",
        "(0.500–0.600)",
        "0.3000",
        "+0.125",
    ]
    reports.plot_frontier(points, tmp_path / "frontier.png")
    assert (tmp_path / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
