"""
Where a training run starts and what may change when it continues: the fields a resume may
change (RESUMABLE_CHANGES, RECORDED_CHANGES), the refusals that keep a resumed run the same
run (check_resume), and the command that resumes one. Nothing here runs on its own.
"""


from dataclasses import asdict

# train.py's config fields that may differ between two points of one run (a resume, the
# checkpoints tools/merge.py merges): they change what is printed or where, not the training
# trajectory. max_iters may grow: for WSO that extends a finished run exactly.
RESUMABLE_CHANGES = frozenset({"out_dir", "init_from", "log_interval", "eval_interval", "eval_tokens",
                               "checkpoint_interval", "keep_every", "keep_optimizer", "compile", "max_iters", "sharpness_interval",
                               "sharpness_batches", "sharpness_samples"})
# Fields a resume may change although the trajectory then differs from the resumed step on: the
# remedy for a loss that went to NaN. train.py prints and records them (log.jsonl, config.json,
# the checkpoint's "changes"). learning_rate only for stage=pre: mid-training and cooldowns take
# their LR from the pre-training checkpoint.
RECORDED_CHANGES = frozenset({"learning_rate", "grad_clip"})


def refuse_config_changes(saved, cfg, may_differ, action):
    """Exit naming every field of dataclass `cfg` outside `may_differ` that differs from the
    saved config."""
    mismatched = {k: (saved[k], v) for k, v in asdict(cfg).items()
                  if k not in may_differ and k in saved and saved[k] != v}
    if mismatched:
        lines = "\n".join(f"  --{k}: checkpoint has {a!r}, this run has {b!r}" for k, (a, b) in mismatched.items())
        raise SystemExit(f"error: cannot {action}, the config differs from the checkpoint's:\n{lines}\n"
                         f"pass the checkpoint's values (or start a new run in another --out_dir)")


def check_resume(ckpt, cfg, world_size):
    """train.py resuming checkpoint `ckpt` with TrainConfig `cfg`: refuse what would silently
    change the run, warn about a new max_iters, return the RECORDED_CHANGES it makes
    ({field: [old, new]}), printed here."""
    saved = ckpt["config"]
    recorded = RECORDED_CHANGES if cfg.stage == "pre" else RECORDED_CHANGES - {"learning_rate"}
    refuse_config_changes(saved, cfg, RESUMABLE_CHANGES | recorded, "resume")
    changed = {k: [saved[k], getattr(cfg, k)] for k in sorted(recorded) if k in saved and saved[k] != getattr(cfg, k)}
    for k, (old, new) in changed.items():
        print(f"note: --{k} changes from {old:g} to {new:g} from step {ckpt['step'] + 1} on (recorded in log.jsonl, "
              f"config.json and the checkpoint)")
    saved_world = ckpt.get("world_size", world_size)  # older checkpoints do not say
    if cfg.tokens_per_step == 0 and saved_world != world_size:
        raise SystemExit(f"error: cannot resume: the checkpoint was trained by {saved_world} processes and this run "
                         f"has {world_size}; with tokens_per_step=0 (one micro-batch per process) that changes the "
                         f"global batch. Resume with {saved_world} processes, or fix the global batch with "
                         f"--tokens_per_step in a new run")
    if cfg.stage == "cooldown":
        decay, decays_over_max_iters = "the cooldown", True
    elif cfg.stage == "mid":
        decay, decays_over_max_iters = f"Eq. 11 with alpha_mid={cfg.alpha_mid}", cfg.alpha_mid < 1
    else:
        decay, decays_over_max_iters = f"schedule={cfg.schedule}", cfg.schedule != "wso"
    if cfg.max_iters < saved["max_iters"] or (decays_over_max_iters and cfg.max_iters != saved["max_iters"]):
        print(f"warning: max_iters {saved['max_iters']} -> {cfg.max_iters} changes the LR of steps already "
              f"taken for {decay}; only a constant LR (WSO, or alpha_mid=1) extends a run exactly")
    return changed


def resume_command(argv, init_from="resume"):
    """This process's arguments with --init_from=<init_from> in place of any --init_from."""
    return [a for a in argv if not a.startswith("--init_from=")] + [f"--init_from={init_from}"]
