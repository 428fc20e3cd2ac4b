"""
Checkpoint merging, "WSO + merge" (WSM, Tian et al., 2025, Theorem 3.1): the weighted mean
sum_j c_j theta_{n+j} of checkpoints theta_n..theta_{n+k} kept by one constant-LR run equals
taking the updates between them with a decayed LR, so a WSO run gets the effect of a decay
without training one. The weights c_j of each decay shape are schedules.merge_weights.

    python train.py --keep_every=100 --out_dir=out     # keeps out/ckpt_000100.pt, out/ckpt_000200.pt, ...
    python tools/merge.py --ckpts=out/ckpt_000500.pt,out/ckpt_000600.pt --out=out-merge/ckpt.pt  # their mean
    python tools/merge.py --ckpts=out --last=4 --shape=1-sqrt --out=out-merge/ckpt.pt  # the last 5 kept
    python evaluate.py --ckpt=out-merge/ckpt.pt        # likewise sft.py and sharpness.py

The merge is computed in float64 and stored in the checkpoints' dtype. The written file is
the newest source checkpoint with its weights replaced by the merge, plus a "merge" entry
{ckpts, steps, shape, weights}: the same keys as train.py's ckpt.pt. Its data position and
RNG states are the newest source's, and so is its optimizer state where the sources hold one
(train.py --keep_optimizer=true), so mid-training can start from it; train.py refuses to
branch a cooldown from it, as the merge already emulates a decay.
"""

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

# Runnable as `python tools/<name>.py` (or `python -m tools.<name>`): the repo root on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import schedules
from nanowso.checkpoint import load_checkpoint, prepare_out_dir, save_checkpoint
from nanowso.common import parse_args
from nanowso.start import RESUMABLE_CHANGES


@dataclass
class MergeConfig:
    ckpts: str = ""  # comma-separated checkpoints theta_n..theta_{n+k} in step order, or a train.py out_dir
    last: int = 0  # with a directory: merge its last k+1 kept ckpt_<step>.pt (k = --last >= 1)
    shape: str = "linear"  # the emulated decay: linear (the uniform mean) | cosine | 1-sqrt | inverse-sqrt
    weights: str = ""  # explicit c_0..c_k, comma-separated, instead of --shape
    out: str = ""  # where to write the merged checkpoint, in its own directory (e.g. out-merge/ckpt.pt)
    overwrite: bool = False  # --out's directory holds a checkpoint: delete it (and the results beside it) first

    def __post_init__(self):
        if self.shape not in schedules.MERGE_SHAPES:
            raise ValueError(f"shape={self.shape!r} is not one of {schedules.MERGE_SHAPES}")
        if self.last < 0:
            raise ValueError(f"last={self.last} must be >= 0")


def source_paths(cfg):
    """The checkpoints to merge: the --ckpts list, or the last --last + 1 kept in a directory."""
    if os.path.isdir(cfg.ckpts):
        if cfg.last < 1:
            raise SystemExit(f"error: --ckpts={cfg.ckpts} is a directory; pass --last=k to merge its last k+1 "
                             f"kept checkpoints")
        kept = {int(m.group(1)): m.group(0) for m in map(re.compile(r"ckpt_(\d+)(\.pt|_sharded)").fullmatch,
                                                                  os.listdir(cfg.ckpts))
                if m}
        if len(kept) < cfg.last + 1:
            raise SystemExit(f"error: {cfg.ckpts} holds {len(kept)} kept checkpoints (ckpt_<step>.pt), fewer than "
                             f"--last+1={cfg.last + 1}; train with --keep_every=N")
        return [os.path.join(cfg.ckpts, kept[step]) for step in sorted(kept)[-(cfg.last + 1):]]
    if cfg.last:
        if "," not in cfg.ckpts and not os.path.exists(cfg.ckpts):
            raise SystemExit(f"error: --ckpts={cfg.ckpts}: no such directory (with --last=k, --ckpts is a training "
                             f"run's --out_dir holding ckpt_<step>.pt from --keep_every=N)")
        raise SystemExit("error: --last=k takes a directory as --ckpts; with a list, the list says what to merge")
    paths = [p for p in cfg.ckpts.split(",") if p]
    if len(paths) < 2:
        raise SystemExit(f"error: --ckpts={cfg.ckpts!r}: merging needs at least two checkpoints (comma-separated) "
                         f"or a directory with --last=k")
    return paths


def weights_of(cfg, k):
    """c_0..c_k: --weights if given, else the weights that emulate --shape; non-negative, summing to 1."""
    if not cfg.weights:
        return schedules.merge_weights(k, cfg.shape)
    try:
        weights = [float(c) for c in cfg.weights.split(",")]
    except ValueError:
        raise SystemExit(f"error: --weights={cfg.weights} is not a comma-separated list of numbers") from None
    if len(weights) != k + 1:
        raise SystemExit(f"error: --weights has {len(weights)} values for {k + 1} checkpoints")
    if not all(c >= 0 for c in weights) or abs(sum(weights) - 1) > 1e-9:
        raise SystemExit(f"error: --weights={cfg.weights} must be non-negative and sum to 1 "
                         f"(they sum to {sum(weights)})")
    return weights


def trajectory_of(ckpt):
    """What every point of one training trajectory shares. WSO's max_iters may grow when a
    run is extended; a decaying schedule's LR, and so its trajectory, depends on it."""
    config = ckpt["config"]
    constant = config["stage"] == "pre" and config["schedule"] == "wso"
    ignored = RESUMABLE_CHANGES if constant else RESUMABLE_CHANGES - {"max_iters"}
    return {"config": {k: v for k, v in config.items() if k not in ignored}, "model_config": ckpt["model_config"],
            "tokenizer": ckpt["tokenizer"], "branch": ckpt.get("branch", ckpt.get("mid"))}  # "mid": older name


def refuse_other_trajectories(path, trajectory, first_path, first_trajectory):
    if trajectory == first_trajectory:
        return
    a, b = first_trajectory["config"], trajectory["config"]
    lines = [f"  --{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    lines += [f"  {key} differs" for key in ("model_config", "tokenizer", "branch")
              if first_trajectory[key] != trajectory[key]]
    raise SystemExit(f"error: {path} is not from the same run as {first_path}:\n" + "\n".join(lines) +
                     "\nmerge checkpoints kept by one train.py run (--keep_every)")


def merge(paths, weights):
    """sum_j c_j theta_{n+j}, accumulated in float64 one checkpoint at a time; returns the
    newest checkpoint holding the merged weights, and the source steps."""
    steps = []
    for j, (path, c) in enumerate(zip(paths, weights)):
        ckpt = load_checkpoint(path)
        if "merge" in ckpt:
            raise SystemExit(f"error: {path} is itself a merge; merge the checkpoints train.py kept")
        if j == 0:
            first_trajectory = trajectory_of(ckpt)
            total = {name: torch.zeros_like(v, dtype=torch.float64) for name, v in ckpt["model"].items()}
        refuse_other_trajectories(path, trajectory_of(ckpt), paths[0], first_trajectory)
        if steps and ckpt["step"] <= steps[-1]:
            raise SystemExit(f"error: {path} is at step {ckpt['step']}, not after {steps[-1]}; list the "
                             f"checkpoints in strictly increasing step order")
        steps.append(ckpt["step"])
        odd = [f"{name} {tuple(v.shape)} vs {tuple(total[name].shape)}" for name, v in ckpt["model"].items()
               if name not in total or v.shape != total[name].shape]
        odd += [f"{name} missing" for name in total if name not in ckpt["model"]]
        if odd:
            raise SystemExit(f"error: {path}'s weights do not have the shapes of {paths[0]}'s ({'; '.join(odd[:3])}); "
                             f"merge checkpoints of one model")
        for name, v in ckpt["model"].items():
            total[name] += c * v.double()
    ckpt["model"] = {name: total[name].to(v.dtype) for name, v in ckpt["model"].items()}
    return ckpt, steps


def main(cfg: MergeConfig):
    if not cfg.out:
        raise SystemExit("error: pass --out=<path of the merged checkpoint>, e.g. out-merge/ckpt.pt")
    paths = source_paths(cfg)
    out_dir = os.path.dirname(os.path.abspath(cfg.out))
    if out_dir in {os.path.dirname(os.path.abspath(p)) for p in paths}:
        raise SystemExit(f"error: --out={cfg.out} is beside the checkpoints it merges; write it to its own directory "
                         f"(evaluate.py and sft.py write their results beside it), e.g. out-merge/ckpt.pt")
    weights = weights_of(cfg, len(paths) - 1)
    if os.path.exists(cfg.out) and not cfg.overwrite:
        raise SystemExit(f"error: {cfg.out} exists; pass another --out, or --overwrite=true to replace it "
                         f"(and the results beside it)")
    prepare_out_dir(out_dir, overwrite=cfg.overwrite, what="a checkpoint", new=True)
    ckpt, steps = merge(paths, weights)
    shape = "custom" if cfg.weights else cfg.shape
    ckpt["merge"] = {"ckpts": [os.path.abspath(p) for p in paths], "steps": steps, "shape": shape, "weights": weights}
    save_checkpoint(cfg.out, ckpt)
    print(f"merged steps {', '.join(map(str, steps))} ({shape}) with weights "
          f"{', '.join(f'{c:.4f}' for c in weights)} -> {cfg.out}")
    return ckpt


if __name__ == "__main__":
    main(parse_args(MergeConfig, description=__doc__))
