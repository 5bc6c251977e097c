"""What a run shows: the lines it prints, and its figures (curves.png, criterion.png, compare.png, frontier.png).

Nothing here runs a model: train.py and evaluation.py compute, this module draws and prints.
"""

import pathlib

import torch

from training.evaluation import s_fractions
from training.models import precision_note
from training.output_folder import write_atomically

# ----------------------------------------------------------------------------------------------------
# What the user sees


def run_label(args):
    """What a run is called in its lines and figures: DPO at ε = 0, else ε-DPO (with a fixed baseline β or not)."""
    return "DPO" if args.epsilon == 0 else "ε-DPO, fixed baseline β" if args.fixed_baseline_beta else "ε-DPO"


def quiet_libraries():
    """The libraries' own progress bars (loading weights, mapping rows) off: a run shows one bar, its training's."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def progress_bar(steps, args, rank):
    """tqdm over the steps, shown by rank 0 alone."""
    from tqdm.auto import tqdm

    return tqdm(steps, desc=run_label(args), disable=None if rank == 0 else True)


def print_start(args, checkpoint, first_step, total_steps, data, world_size, device, models):
    """The line a run starts with: what it trains, on what, how; and what resuming does."""
    train_pairs, eval_pairs = len(data["pairs"]["train"]), len(data["pairs"]["eval"])
    policy, loss_note = models.policy, models.loss_note
    trained_weights = [weight for weight in policy.parameters() if weight.requires_grad]
    if checkpoint:
        print(
            f"resuming from {checkpoint[0]} at step {first_step}"
            if first_step <= total_steps
            else f"{checkpoint[0]} is the run's last step; its final save did not complete: saving it"
        )
    lora = (
        (
            f", LoRA r = {args.lora_r}: {sum(w.numel() for w in trained_weights):,} of "
            f"{sum(w.numel() for w in policy.parameters()):,} weights train"
        )
        if args.lora_r
        else ""
    )
    print(
        f"{run_label(args)}: {train_pairs} train pairs, {eval_pairs} held out, {total_steps} steps of "
        f"{args.batch_size * args.grad_accum * world_size} pairs on {world_size} × {device_name(device)}"
        f"{precision_note(device)}, β = {args.beta}, ε = {args.epsilon}{lora}"
        + (f"\nthe loss from full (2B, T, V) logits: {loss_note}" if loss_note else "")
    )


def device_name(device):
    """The device, and on a CPU the vector instructions torch's kernels use ("cpu (AVX512)"): the last digits of
    a run depend on them, as on the GPU's model and the torch version."""
    if device.type == "cpu":
        return f"cpu ({torch.backends.cpu.get_cpu_capability()})"
    return f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)


def print_data_report(notes, skipped, boundary_moved):
    """What the data preparation left out or changed, by split: nothing is dropped silently."""
    for note in notes:
        print(f"note: {note}")
    for split, reasons in skipped.items():
        for reason, count in reasons.items():
            print(f"skipped {count} {split} rows: {reason}")
    if sum(boundary_moved.values()):
        print(
            f"note: in {boundary_moved['train']} train and {boundary_moved['eval']} held-out pairs the tokenizer "
            "merges "
            f"tokens across the prompt/completion boundary; the prompt is the part both sequences share"
        )


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(figure, path):
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=110, format="png")
    write_atomically(pathlib.Path(path), buffer.getvalue())  # the figure appears whole
    _pyplot().close(figure)


def _rolling_mean(points, window=10):
    """(steps, values) -> (steps, the mean of each value with the window - 1 before it)."""
    steps, values = zip(*points, strict=True)
    return steps, [sum(values[max(0, i - window + 1) : i + 1]) / min(i + 1, window) for i in range(len(values))]


def plot_curves(runs, path):
    """One panel per quantity; each run (label -> metric rows) a colour, training a thin line, evaluations dots.

    Every panel holds quantities that mean the same in every run: no loss, since −log σ(β̃ h) moves with β, which
    differs between runs and drifts within one (compare runs by h). The log-probabilities and the fractions of s in
    training: a mean over 10 steps; for s, clean pairs solid and mislabelled ones dashed where marked, and a run
    whose s is 0 throughout (DPO, ε = 0) is left out."""
    plt = _pyplot()
    every_row = [row for rows in runs.values() for row in rows]

    def s_keys(kind):
        marked = [f"s/{kind}/clean", f"s/{kind}/noisy"]
        return marked if any(marked[0] in row for row in every_row) else [f"s/{kind}"]

    s_is_zero = {
        label
        for label, rows in runs.items()
        if not any(value for row in rows for key, value in row.items() if key.startswith(("s/weaker", "s/stronger")))
    }
    marked = "solid: clean pairs, dashed: mislabelled" if s_keys("weaker")[0].endswith("clean") else ""
    panels = [
        ("log π_θ(y|x): solid chosen y_w, dashed rejected y_l", ["logps/chosen", "logps/rejected"]),
        ("reward accuracy: how often h > 0", ["rewards/accuracies"]),
        ("margin h = z_θ − γ", ["h"]),
        ("baseline β (the β of each step)", ["beta"]),
        ("fraction s = +1: weaker penalty β/(1+ε)", s_keys("weaker")),
        ("fraction s = −1: stronger penalty β/(1−ε)", s_keys("stronger")),
        ("gold reward of samples", ["gold_reward"]),
        ("KL(π_θ ‖ π_ref) along samples", ["kl"]),
    ]
    if not any("gold_reward" in row for row in every_row):
        panels = panels[:6]
    figure, axes = plt.subplots(2, len(panels) // 2, figsize=(4 * len(panels) // 2, 6.5), squeeze=False)
    for (title, keys), axis in zip(panels, axes.flat, strict=True):
        s_panel, smoothed = keys[0].startswith("s/"), keys[0].startswith(("s/", "logps/"))
        for color, (label, rows) in zip(("tab:blue", "tab:red", "tab:green"), runs.items(), strict=False):
            if s_panel and label in s_is_zero:
                continue
            for key, linestyle in zip(keys, ("-", "--"), strict=False):
                train = [(r["step"], r[key]) for r in rows if r["split"] == "train" and key in r]
                evals = [(r["step"], r[key]) for r in rows if r["split"] == "eval" and key in r]
                first = key == keys[0]  # one legend entry per run and kind
                if train:
                    axis.plot(
                        *(_rolling_mean(train) if smoothed else zip(*train, strict=True)),
                        color=color,
                        linestyle=linestyle,
                        linewidth=0.8,
                        alpha=0.7,
                        label=f"{label} train" if first else None,
                    )
                if evals:
                    axis.plot(
                        *zip(*evals, strict=True),
                        color=color,
                        marker="o",
                        linestyle=":" if first else (0, (1, 3)),
                        markerfacecolor=color if first else "white",
                        label=f"{label} held-out" if first else None,
                    )
        if s_panel:
            notes = [marked] + [f"{', '.join(sorted(s_is_zero))}: s = 0 throughout, not drawn"] * bool(s_is_zero)
            axis.set_title(title + "".join(f"\n{note}" for note in notes if note), fontsize=9)
        else:
            axis.set_title(title, fontsize=9 if len(title) > 45 else 10)
        axis.set_xlabel("optimizer step")
    axes.flat[0].legend(fontsize=7)
    # Margins set, not measured: tight_layout would lay out every label once more before the figure is drawn,
    # 0.5 s of a run's 2 on tiny_data.
    figure.subplots_adjust(left=0.2 / len(axes[0]), right=0.99, bottom=0.08, top=0.93, wspace=0.25, hspace=0.62)
    _save_figure(figure, path)


def plot_criterion(measured, epsilon, path):
    """criterion.png: what s measures on the final policy (evaluation.criterion_measures gave `measured`).

    Left: z(λ) − z(1) of a few train pairs over λ ∈ [0, 2]. Middle: the same, zoomed on [1 − 2ε, 1 + 2ε], with
    the three points the criterion compares (z⁺ at 1 − ε, z_θ at 1, z⁻ at 1 + ε). Right: h against ΔK for
    every pair."""
    h, delta_k, s, noise = (measured[key] for key in ("h", "delta_k", "s", "noise"))
    curves, lambdas, agreement = measured["curves"], measured["lambdas"], measured["agreement"]
    plt = _pyplot()
    figure, (left, middle, right) = plt.subplots(1, 3, figsize=(17, 5), gridspec_kw={"width_ratios": [1.1, 1, 1.1]})
    colors = {1.0: "tab:blue", -1.0: "tab:red", 0.0: "tab:gray"}
    zoom = [i for i, lam in enumerate(lambdas) if abs(lam - 1) <= 2 * epsilon * (1 + 1e-9)]
    compared = [
        min(range(len(lambdas)), key=lambda i: abs(lambdas[i] - lam)) for lam in (1 - epsilon, 1.0, 1 + epsilon)
    ]
    for axis in (left, middle):
        axis.axvspan(1 - epsilon, 1 + epsilon, color="gold", alpha=0.35, label=f"[1 − ε, 1 + ε], ε = {epsilon:g}")
    for i, z in curves.items():
        z_at_1, color = z[lambdas.index(1.0)], colors[s[i].item()]
        linestyle = "--" if noise[i] == 2 else "-"
        relative = [value - z_at_1 for value in z]
        left.plot(
            lambdas,
            relative,
            color=color,
            linestyle=linestyle,
            label=f"pair {i}{', mislabelled' if noise[i] == 2 else ''}: s = {s[i]:+.0f}",
        )
        middle.plot([lambdas[j] for j in zoom], [relative[j] for j in zoom], color=color, linestyle=linestyle)
        middle.plot(
            [lambdas[j] for j in compared], [relative[j] for j in compared], color=color, marker="o", linestyle="none"
        )
        slope = (h[i] - delta_k[i]).item()  # the first-order line, dz/dλ = h − ΔK
        middle.plot(
            [1 - 2 * epsilon, 1 + 2 * epsilon],
            [-2 * epsilon * slope, 2 * epsilon * slope],
            color="black",
            linewidth=0.6,
            linestyle=":",
        )
    for axis in (left, middle):
        axis.axhline(0, color="black", linewidth=0.5)
        axis.set_ylabel("z(λ) − z(1)")
    left.set_xlabel("λ: the policy estimated for β/λ (λ = 0: the reference, 1: the policy)")
    left.set_title("z(λ) of a few train pairs, λ from 0 to 2 (the gold band: zoomed in the middle)", fontsize=10)
    left.legend(fontsize=7)
    middle.set_xlim(1 - 2 * epsilon, 1 + 2 * epsilon)
    middle.set_xlabel("λ near 1; dots: z⁺ at 1 − ε, z_θ at 1, z⁻ at 1 + ε")
    middle.set_title(
        "zoomed on [1 − 2ε, 1 + 2ε]: s compares the three dots of a pair\n(dotted, under the curves: "
        "slope h − ΔK, the first-order estimate)",
        fontsize=10,
    )
    for value, name in ((1.0, "s = +1"), (-1.0, "s = −1"), (0.0, "s = 0")):
        for flag, marker, kind in ((1, "o", "clean"), (0, "o", ""), (2, "x", "mislabelled")):
            chosen = (s == value) & (noise == flag)
            if chosen.any():
                right.scatter(
                    delta_k[chosen], h[chosen], s=10, marker=marker, color=colors[value], label=f"{name} {kind}".strip()
                )
    low, high = min(h.min(), delta_k.min()).item(), max(h.max(), delta_k.max()).item()
    right.plot([low, high], [low, high], color="black", linewidth=0.8, label="h = K_w − K_l")
    right.set_xlabel("K_w − K_l: KL(π_θ‖π_ref) along the chosen minus along the rejected")
    right.set_ylabel("margin h = z_θ − γ")
    right.set_title(
        f"{len(s)} train pairs: s = sign(h − ΔK) for {agreement['s = sign(h − ΔK)']:.1%},\n"
        f"s = sign(h) for {agreement['s = sign(h)']:.1%}",
        fontsize=10,
    )
    right.legend(fontsize=7)
    figure.tight_layout()
    _save_figure(figure, path)


def run_summary(args, device, total_steps, data, final_beta, rows, s_by_noise, measured, seconds, held):
    """What summary.json holds: the run's arguments and data, its first and last evaluation, β, the s counts and
    what the criterion measured, its time and the bytes rank 0 held."""
    evaluations = [row for row in rows if row["split"] == "eval"]
    return {
        "label": run_label(args),
        "args": vars(args),
        "device": device_name(device),
        "torch": torch.__version__,  # with the device, what the digits of the figures depend on
        "steps": total_steps,
        "train_pairs": len(data["pairs"]["train"]),
        "eval_pairs": len(data["pairs"]["eval"]),
        "skipped": data["skipped"],
        "boundary_moved": data["boundary_moved"],
        "final_beta": final_beta,
        "start": evaluations[0],
        "final": evaluations[-1],
        "s_by_noise": s_fractions(s_by_noise),
        "criterion": measured and measured["agreement"],
        "seconds": round(seconds, 1),
        "bytes_held_by_rank_0": held,
    }


def print_summary(summaries):
    """A table of the held-out numbers at the start and the end of each run."""
    rows = [
        ("held-out reward accuracy", "rewards/accuracies", "{:.3f}"),
        ("held-out margin h", "h", "{:.3f}"),
        ("held-out loss", "loss", "{:.4f}"),
        ("gold reward of samples", "gold_reward", "{:+.3f}"),
        ("KL(π_θ‖π_ref) along samples", "kl", "{:.3f}"),
    ]
    header = (
        f"{'':28}"
        + "".join(f"{'start':>10}{s['label'] + ' end':>16}" for s in summaries[:1])
        + "".join(f"{s['label'] + ' end':>16}" for s in summaries[1:])
    )
    print("\n" + header)
    for name, key, fmt in rows:
        if key in summaries[0]["final"]:
            cells = [fmt.format(summaries[0]["start"][key])] + [fmt.format(s["final"][key]) for s in summaries]
            print(f"{name:28}{cells[0]:>10}" + "".join(f"{c:>16}" for c in cells[1:]))
    print(
        f"{'baseline β':28}{summaries[0]['args']['beta']:>10.4f}"
        + "".join(f"{s['final_beta']:>16.4f}" for s in summaries)
    )
    for s in summaries:
        for group, f in s["s_by_noise"].items():
            print(
                f"{s['label']}, {group} train pairs ({f['pairs']} seen): s = +1 {f['weaker']:.1%}, s = −1 "
                f"{f['stronger']:.1%}"
            )
        if s.get("criterion"):
            c = s["criterion"]
            print(
                f"{s['label']}, final policy, {c['pairs']} train pairs: s = sign(h − ΔK) for "
                f"{c['s = sign(h − ΔK)']:.1%}, "
                f"s = sign(h) for {c['s = sign(h)']:.1%}"
            )
        print(f"{s['label']}: {s['seconds']} s, written to {s['args']['output_dir']}")


def frontier_points(summaries):
    """One point per run of a frontier: what frontier.json holds."""
    points = []
    for s in summaries:
        groups = s["s_by_noise"].values()
        pairs = sum(group["pairs"] for group in groups)
        points.append(
            {
                "method": s["label"],
                "beta": s["args"]["beta"],
                "epsilon": s["args"]["epsilon"],
                "fixed_baseline_beta": s["args"]["fixed_baseline_beta"],
                "seed": s["args"]["seed"],
                "gold_reward": s["final"]["gold_reward"],
                "kl": s["final"]["kl"],
                "rewards/accuracies": s["final"]["rewards/accuracies"],
                "final_beta": s["final_beta"],
                "mean_s": sum(g["pairs"] * (g["weaker"] - g["stronger"]) for g in groups) / pairs,
                "output_dir": s["args"]["output_dir"],
            }
        )
    return points


def _by_method_and_beta(points):
    """{method: {β: [points over seeds]}}, in the order the points came."""
    grouped = {}
    for point in points:
        grouped.setdefault(point["method"], {}).setdefault(point["beta"], []).append(point)
    return grouped


def plot_frontier(points, path):
    """Gold reward against KL: per method and β the mean over seeds (a dot), with bars from the lowest to the
    highest seed; a line joins each method's frontier, its means that no other mean of it beats with less KL.
    The KL axis ends a little past the largest mean; a bar beyond it is cut there and labelled with its end,
    so that one seed far out does not squeeze every other point."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(8, 5.5))
    grouped = _by_method_and_beta(points)
    means = {
        (method, beta): (sum(p["kl"] for p in runs) / len(runs), sum(p["gold_reward"] for p in runs) / len(runs))
        for method, by_beta in grouped.items()
        for beta, runs in by_beta.items()
    }
    kl_end = 1.15 * max(x for x, _ in means.values())
    for index, (color, (method, by_beta)) in enumerate(
        zip(("tab:blue", "tab:red", "tab:green"), grouped.items(), strict=False)
    ):
        for beta, runs in by_beta.items():
            (x, y), kls, golds = means[method, beta], [p["kl"] for p in runs], [p["gold_reward"] for p in runs]
            axis.errorbar(
                x,
                y,
                xerr=[[x - min(kls)], [min(max(kls), kl_end) - x]],
                yerr=[[y - min(golds)], [max(golds) - y]],
                color=color,
                capsize=3,
                linewidth=0.7,
                alpha=0.45,
                marker="o",
                markersize=6,
                markeredgewidth=0,
            )
            if max(kls) > kl_end:
                axis.annotate(
                    f"{max(kls):.1f} →",
                    (kl_end, y),
                    xytext=(-34, 3),
                    textcoords="offset points",
                    fontsize=7,
                    color=color,
                )
            axis.annotate(
                f"β={beta:g}",
                (x, y),
                textcoords="offset points",
                fontsize=7,
                color=color,
                xytext=((4, -12), (-34, 6), (4, 6))[index % 3],
            )  # each method its side: labels apart
        frontier = []
        for x, y in sorted(means[method, beta] for beta in by_beta):
            if not frontier or y > frontier[-1][1]:
                frontier.append((x, y))
        axis.plot(*zip(*frontier, strict=True), marker="o", color=color, label=method)
    seeds = max(len(runs) for by_beta in grouped.values() for runs in by_beta.values())
    axis.set_xlim(0, kl_end)
    axis.set_xlabel("KL(π_θ ‖ π_ref) along samples (nats per review)")
    axis.set_ylabel("gold reward of samples")
    axis.set_title(
        f"reward–KL frontier, mean of {seeds} seed(s); bars: lowest to highest seed; "
        f"lines: each method's best gold reward at a KL",
        fontsize=9,
    )
    axis.legend(fontsize=8)
    figure.tight_layout()
    _save_figure(figure, path)


def print_frontier(points):
    """The frontier as a table: per method and β, the mean over seeds and (lowest–highest)."""

    def cell(values, fmt):
        mean = sum(values) / len(values)
        spread = f" ({fmt.format(min(values))}–{fmt.format(max(values))})" if len(values) > 1 else ""
        return fmt.format(mean) + spread

    print(f"\n{'method':25}{'β':>5}  {'gold reward':<21}{'KL':<21}{'reward accuracy':<21}{'final β':>8}{'mean s':>8}")
    for method, by_beta in _by_method_and_beta(points).items():
        for beta, runs in sorted(by_beta.items()):
            print(
                f"{method:25}{beta:>5g}  {cell([p['gold_reward'] for p in runs], '{:+.2f}'):<21}"
                f"{cell([p['kl'] for p in runs], '{:.2f}'):<21}"
                f"{cell([p['rewards/accuracies'] for p in runs], '{:.3f}'):<21}"
                f"{sum(p['final_beta'] for p in runs) / len(runs):>8.4f}"
                f"{sum(p['mean_s'] for p in runs) / len(runs):>+8.3f}"
            )
