"""
Measure the sharpness of a checkpoint, Tr(H) by Hutchinson's estimator (Section 6,
Definition 6.1; Appendix H, Eq. 12 and Table 23), or draw Figures 3-4 from training runs.
The estimator itself, with its equations, is sharpness.py.

    python sharpness.py --ckpt=out/ckpt.pt                 # pretrain val + SFT held-out
    python sharpness.py --ckpt=out/ckpt.pt --datasets=sft --num_batches=64
    python sharpness.py --ckpt=out/ckpt.pt --pretrain_split=train   # on the training text itself
    python sharpness.py --ckpt=out/ckpt.pt --compile        # long measurements: compiles once
    torchrun --nproc_per_node=8 sharpness.py --ckpt=...      # the batches split over 8 processes
    python sharpness.py --figures=out-wso,out-wsd,out-cos     # Figures 3-4 from runs of
                                                            # train.py --sharpness_interval=N
    python sharpness.py --help

The paper's settings (Table 23): seq_len 1024, batch size 1, 50 probes, up to 4096
batches per data set, measured every 4000 steps:
    python sharpness.py --ckpt=... --seq_len=1024 --batch_size=1 --num_samples=50 --num_batches=4096 --compile
The defaults here suit the testbed. Writes sharpness.json beside the checkpoint (--out):
{ckpt, step, settings, results: {pretrain | sft: hessian.model_sharpness's numbers, data}}.
"""

import json
import os
from dataclasses import asdict, dataclass

import torch.distributed as dist

from data.formats import Tokenizer, load_meta, read_jsonl, write_atomic
from data.loaders import pretrain_batches, resolve_dataset, sft_batches, testbed_of
from nanowso.checkpoint import load_checkpoint, load_model
from nanowso.common import Eta, format_duration, parse_args
from nanowso.hessian import LOSS_NORMALIZATION, model_sharpness
from nanowso.runtime import setup_distributed
from schedules import wsd_t_stable
from study.figures import plot_sharpness_curves, plot_sharpness_vs_score


@dataclass
class SharpnessConfig:
    ckpt: str = "out/ckpt.pt"  # checkpoint written by train.py
    datasets: str = "pretrain,sft"  # comma list: pretrain (val split) and/or sft (held-out conversations)
    pretrain_data: str = ""  # prepared data dir; empty: the checkpoint's training data set
    pretrain_split: str = "val"  # val: held-out text (the paper) | train: the training text itself
    sft_data: str = ""  # jsonl of {"messages": [...]}; empty: the testbed's sft_select.jsonl (held-out people)
    seq_len: int = 0  # tokens per sequence; 0: the checkpoint's training seq_len (the paper: 1024)
    batch_size: int = 1  # sequences per batch (the paper: 1)
    num_batches: int = 8  # batches per data set (the paper: up to 4096)
    num_samples: int = 50  # Hutchinson probes per batch (the paper: 50)
    seed: int = 0  # batch b uses probe seed seed + b
    probes_per_call: int = 0  # probes vmapped per HVP call; 0: auto (auto_probes_per_call)
    compile: bool = False  # torch.compile the HVP: faster per probe, after a compile of a minute or more
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    out: str = ""  # JSON path; empty: sharpness.json next to the checkpoint
    figures: str = ""  # comma list of train.py run dirs: draw Figures 3-4 from them instead of measuring
    figures_dir: str = "."  # where the figures go

    def __post_init__(self):
        if self.probes_per_call < 0:
            raise ValueError(f"probes_per_call={self.probes_per_call} must be >= 0 (0: auto)")
        if self.pretrain_split not in ("val", "train"):
            raise ValueError(f"pretrain_split={self.pretrain_split!r}: use val or train")
        for name in ("batch_size", "num_batches", "num_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        unknown = set(self.datasets.split(",")) - {"pretrain", "sft"}
        if unknown or not self.datasets:
            raise ValueError(f"datasets={self.datasets!r}: use pretrain, sft or pretrain,sft")


def data_sources(cfg, ckpt):
    """{"pretrain": prepared dir, "sft": jsonl path} for the requested data sets. By default
    the pre-training data is the checkpoint's, and the SFT data its testbed's held-out
    conversations (sft_select.jsonl of data.loaders.testbed_of)."""
    requested = cfg.datasets.split(",")
    pretrain_dir = cfg.pretrain_data
    if not pretrain_dir and ("pretrain" in requested or not cfg.sft_data):
        pretrain_dir = resolve_dataset(ckpt["config"]["dataset"])
    sources = {}
    if "pretrain" in requested:
        try:
            data_tokenizer = Tokenizer.from_dict(load_meta(pretrain_dir)["tokenizer"])
        except (OSError, KeyError, ValueError) as e:
            raise SystemExit(f"error: cannot use pre-training data {pretrain_dir}: {e}") from None
        if data_tokenizer != Tokenizer.from_dict(ckpt["tokenizer"]):
            raise SystemExit(f"error: {pretrain_dir} was tokenized with another vocabulary than the checkpoint "
                             f"(re-prepared since?); measure on the data the model was trained on")
        sources["pretrain"] = pretrain_dir
    if "sft" in requested:
        testbed = testbed_of(pretrain_dir) if not cfg.sft_data else None
        path = cfg.sft_data or (testbed and os.path.join(testbed, "sft_select.jsonl"))
        if not path or not os.path.isfile(path):
            where = path or f"the testbed of {pretrain_dir}"
            raise SystemExit(f"error: no SFT data at {where}; pass --sft_data=<jsonl with a \"messages\" field> "
                             f"or --datasets=pretrain")
        sources["sft"] = path
    return sources


def main(cfg):
    if cfg.figures:
        written = draw_figures(cfg.figures.split(","), cfg.figures_dir)
        for key, value in written.items():
            print(f"{key}: {value}")
        return written
    ckpt = load_checkpoint(cfg.ckpt)
    rt = setup_distributed(cfg.device)  # under torchrun: one process group, the batches split over it
    device = rt.device
    seq_len = cfg.seq_len or ckpt["config"]["seq_len"]
    model = load_model(ckpt, device)
    tokenizer = Tokenizer.from_dict(ckpt["tokenizer"])
    results = {}
    for name, path in data_sources(cfg, ckpt).items():
        try:
            if name == "pretrain":
                batches = pretrain_batches(path, seq_len, cfg.batch_size, cfg.num_batches, cfg.pretrain_split)
            else:
                batches = sft_batches(path, tokenizer, seq_len, cfg.batch_size, cfg.num_batches)
        except (OSError, ValueError, KeyError) as e:
            raise SystemExit(f"error: cannot use the {name} data at {path}: {e}") from None
        split = f" over {rt.world_size} processes" if rt.distributed else ""
        rt.log(f"{name}: {len(batches)} batches of {cfg.batch_size} x <= {seq_len} tokens from {path}, "
               f"{cfg.num_samples} probes each{split}")
        eta = Eta(len(range(rt.rank, len(batches), rt.world_size)))

        def progress(done, total, record):
            rt.log(f"  {name} batch {record['batch'] + 1}/{len(batches)}: Tr(H) {record['trace']:.4g} +- "
                   f"{record['stderr']:.2g} (loss {record['loss']:.3f}, {record['tokens']} tokens) | ETA {eta(done)}")

        eta(0)
        results[name] = model_sharpness(model, batches, cfg.num_samples, cfg.seed, progress, cfg.probes_per_call,
                                        cfg.compile, rt.rank, rt.world_size)
        results[name]["data"] = path if name == "sft" else f"{path} ({cfg.pretrain_split} split)"
        r = results[name]
        rt.log(f"{name}: sharpness Tr(H) = {r['trace']:.4g} +- {r['stderr']:.2g} (stderr over {r['stderr_over']}; "
              f"{format_duration(r['seconds'])})")
    out = cfg.out or os.path.join(os.path.dirname(os.path.abspath(cfg.ckpt)), "sharpness.json")
    settings = {**asdict(cfg), "seq_len": seq_len, "device": device, "loss_normalization": LOSS_NORMALIZATION}
    report = {"ckpt": os.path.abspath(cfg.ckpt), "step": ckpt.get("step"), "settings": settings, "results": results}
    if rt.master:
        write_atomic(out, (json.dumps(report, indent=1) + "\n").encode())
        print(f"wrote {out}")
    if rt.distributed:
        dist.destroy_process_group()
    return results


# ------------------------------------------------------------------------ figures

def draw_figures(run_dirs, out_dir):
    """Figures 3 and 4 from train.py runs made with --sharpness_interval: Figure 3 per data
    set from each run's log.jsonl; Figure 4 from each run's last pre-training sharpness and
    the sft_task_avg of sft.py's summary (run_dir/sft/summary.json), where present."""
    curves, final, t_stable, scores = {}, {}, None, {}
    for run_dir in run_dirs:
        config_path, log_path = os.path.join(run_dir, "config.json"), os.path.join(run_dir, "log.jsonl")
        if not (os.path.isfile(config_path) and os.path.isfile(log_path)):
            raise SystemExit(f"error: {run_dir} is not a train.py run directory (no config.json or log.jsonl)")
        with open(config_path) as f:
            cfg = json.load(f)["train"]
        label = "WSO" if cfg["schedule"] == "wso" else f"{cfg['schedule'].upper()} a={cfg['alpha']}"
        if cfg["schedule"] == "wsd":  # the paper draws WSD's decay start
            t_stable = wsd_t_stable(warmup_iters=cfg["warmup_iters"], max_iters=cfg["max_iters"],
                                    stable_ratio=cfg["stable_ratio"])
        records = [r for r in read_jsonl(log_path) if any(k.startswith("sharpness_") for k in r)]
        if not records:
            raise SystemExit(f"error: {log_path} has no sharpness records; train with --sharpness_interval=N")
        for name in ("pretrain", "sft"):
            points = [(r["step"], r[f"sharpness_{name}"], r[f"sharpness_{name}_stderr"])
                      for r in records if f"sharpness_{name}" in r]
            if points:
                curves.setdefault(name, {})[label] = points
        final[label] = records[-1].get("sharpness_pretrain")
        summary = os.path.join(run_dir, "sft", "summary.json")
        if os.path.isfile(summary):
            with open(summary) as f:
                scores[label] = json.load(f).get("sft_task_avg")
    os.makedirs(out_dir, exist_ok=True)
    written = {}
    for name, runs in curves.items():
        written[f"fig3_{name}"] = plot_sharpness_curves(runs, t_stable, os.path.join(out_dir, f"fig3_sharpness_{name}.png"))
    points = {k: (final[k], v) for k, v in scores.items() if v is not None and final[k] is not None}
    if len(points) >= 2:
        path = os.path.join(out_dir, "fig4_sharpness_vs_sft.png")
        written["fig4"], written["pearson_r"] = path, plot_sharpness_vs_score(points, path)
    else:
        print(f"note: Figure 4 needs sft/summary.json (python sft.py) in at least 2 runs; found {len(points)}")
    return written


if __name__ == "__main__":
    main(parse_args(SharpnessConfig, description=__doc__))
