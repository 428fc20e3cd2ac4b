"""
Figures 3 and 4 of the paper (Section 6): sharpness during pre-training, and the score
after SFT against the sharpness SFT started from. Plain functions of numbers, drawn with
matplotlib; sharpness.py --figures and reproduce.py feed them. Nothing here runs on its own.
"""

import numpy as np

def plot_sharpness_curves(runs, t_stable=None, path="sharpness_curves.png"):
    """Figure 3: sharpness against step, one line with error bars per schedule.
    runs: {label: [(step, trace, stderr), ...]}; t_stable draws WSD's decay start."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in runs.items():
        steps, traces, stderrs = zip(*sorted(points))
        ax.errorbar(steps, traces, yerr=stderrs, marker="o", markersize=3, capsize=2, label=label)
    if t_stable is not None:
        ax.axvline(t_stable, color="gray", linestyle="--", label=r"$T_{\mathrm{stable}}$")
    ax.set_xlabel("step")
    ax.set_ylabel(r"Sharpness $= \mathrm{Tr}(\mathbf{H})$")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def plot_sharpness_vs_score(points, path="sharpness_vs_score.png", xlabel="pre-training val"):
    """Figure 4: one point per schedule, SFT score against pre-training sharpness.
    points: {label: (sharpness, score)}. Returns Pearson's r (nan for < 2 points or
    no spread), also printed on the plot."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(points)
    sharpness = np.array([points[k][0] for k in labels], dtype=float)
    score = np.array([points[k][1] for k in labels], dtype=float)
    defined = len(labels) > 1 and sharpness.std() > 0 and score.std() > 0
    r = float(np.corrcoef(sharpness, score)[0, 1]) if defined else float("nan")
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter(sharpness, score)
    for label, sx, sy in zip(labels, sharpness, score):
        ax.annotate(label, (sx, sy), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_title(f"Pearson r = {r:.3f}")
    ax.set_xlabel(f"sharpness ({xlabel})")
    ax.set_ylabel("score after SFT")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return r
