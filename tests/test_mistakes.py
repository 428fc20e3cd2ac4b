"""What a user does by mistake, and faults of the machine: each case ends in one line that names
the cause and what to do, a non-zero exit where nothing was done, and nothing lost or left
behind (no .tmp file, the last good checkpoint intact). Every test here failed on the code
before these checks (a traceback, a wrong message, or a run silently replaced)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import evaluate
import sft
import train
from nanowso import checkpoint
from nanowso.checkpoint import load_checkpoint
from nanowso.common import parse_args, truncate_log
from sft import SFTConfig
from tools import merge
from train import TrainConfig

pytestmark = pytest.mark.slow  # integration: real (tiny) training runs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(preset="tiny", batch_size=4, seq_len=32, warmup_iters=2, log_interval=1, eval_interval=4,
            eval_tokens=1024, compile=False, device="cpu")


def run(testbed, out_dir, argv=(), **overrides):
    """train.py as a command would run it: parse_args records which flags were given."""
    flags = {"dataset": str(testbed / "pretrain"), "out_dir": str(out_dir), "max_iters": 8, **TINY, **overrides}
    return train.main(parse_args(TrainConfig, [f"--{k}={v}" for k, v in flags.items()] + list(argv)))


def error_of(call):
    with pytest.raises(SystemExit) as e:
        call()
    assert isinstance(e.value.code, str) and e.value.code.startswith("error: "), e.value.code
    return e.value.code


@pytest.fixture(scope="module")
def finished(testbed, tmp_path_factory):
    """A finished 8-step WSO run that kept ckpt_000004.pt (with AdamW's state) and has an eval.json."""
    out = tmp_path_factory.mktemp("finished")
    run(testbed, out, keep_every=4, keep_optimizer=True)
    with open(out / "eval.json", "w") as f:
        json.dump({"tasks": {}}, f)
    return out


def copy_run(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


# ------------------------------------------------------------------ a run is never overwritten by accident

def test_a_new_run_into_a_directory_holding_one_is_refused_and_nothing_changes(testbed, finished, tmp_path):
    out = copy_run(finished, tmp_path)
    before = {name: (out / name).read_bytes() for name in ("ckpt.pt", "log.jsonl", "config.json")}
    message = error_of(lambda: run(testbed, out, max_iters=5))
    assert "already holds a training run" in message and "--init_from=resume" in message
    assert "--overwrite=true" in message and "another --out_dir" in message
    assert {name: (out / name).read_bytes() for name in before} == before


def test_overwrite_removes_the_old_runs_files_so_the_directory_never_mixes_two_runs(testbed, finished, tmp_path):
    out = copy_run(finished, tmp_path)
    (out / "notes.txt").write_text("mine")
    run(testbed, out, ["--overwrite=true"], max_iters=5)
    assert sorted(os.listdir(out)) == ["ckpt.pt", "config.json", "log.jsonl", "notes.txt"]
    assert load_checkpoint(str(out / "ckpt.pt"))["step"] == 5


def test_overwrite_refuses_to_delete_the_checkpoint_it_starts_from(testbed, finished, tmp_path):
    out = copy_run(finished, tmp_path)
    message = error_of(lambda: run(testbed, out, ["--overwrite=true", "--stage=cooldown", f"--init_from={out}/ckpt.pt",
                                                   "--alpha=0.0"], max_iters=4))
    assert "would delete" in message and "another --out_dir" in message


def test_an_out_dir_that_is_a_file_is_refused(testbed, tmp_path):
    (tmp_path / "out").write_text("")
    assert "is a file, not a directory" in error_of(lambda: run(testbed, tmp_path / "out"))


def test_an_out_dir_the_os_will_not_let_us_write_is_named(tmp_path, monkeypatch):
    real_open = open

    def refusing_open(path, *args, **kwargs):  # what a read-only directory does (the tests may run as root)
        if ".write_test" in str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", refusing_open)
    message = error_of(lambda: checkpoint.prepare_out_dir(str(tmp_path / "out")))
    assert "would not let us write" in message and "Permission denied" in message and "writable --out_dir" in message


def test_merge_out_is_not_overwritten_without_asking(finished, tmp_path):
    cfg = dict(ckpts=f"{finished}/ckpt_000004.pt,{finished}/ckpt.pt", out=str(tmp_path / "m" / "ckpt.pt"))
    merge.main(merge.MergeConfig(**cfg))
    message = error_of(lambda: merge.main(merge.MergeConfig(**cfg)))
    assert "exists" in message and "--overwrite=true" in message
    (tmp_path / "m" / "eval.json").write_text("{}")
    merge.main(merge.MergeConfig(**cfg, overwrite=True))
    assert sorted(os.listdir(tmp_path / "m")) == ["ckpt.pt"]


def test_merging_checkpoints_of_different_shapes_names_the_tensors(finished, tmp_path):
    other = load_checkpoint(str(finished / "ckpt.pt"))
    other["model"]["tok_embeddings.weight"] = other["model"]["tok_embeddings.weight"][:-64]
    other["step"] += 1
    torch.save(other, tmp_path / "other.pt")
    message = error_of(lambda: merge.main(merge.MergeConfig(ckpts=f"{finished}/ckpt.pt,{tmp_path}/other.pt",
                                                            out=str(tmp_path / "m" / "ckpt.pt"))))
    assert "do not have the shapes" in message and "tok_embeddings.weight" in message


# ------------------------------------------------------------------ the recipes run as written

def test_a_cooldown_takes_the_warmup_and_settings_of_the_run_it_branches_from(testbed, tmp_path):
    # the WSO run used a non-default LR and the warmup by rule (a tenth of its 40 steps)
    pre = tmp_path / "wso"
    run(testbed, pre, ["--keep_every=20", "--keep_optimizer=true", "--learning_rate=0.002"], max_iters=40,
        warmup_iters=-1)
    cool = tmp_path / "cool"
    # as the README writes it: neither the warmup nor the LR repeated
    argv = ["--stage=cooldown", f"--init_from={pre}/ckpt_000020.pt", "--max_iters=10", "--alpha=0.0",
            f"--out_dir={cool}", "--compile=false", "--device=cpu"]
    train.main(parse_args(TrainConfig, argv))
    saved = load_checkpoint(str(cool / "ckpt.pt"))
    assert saved["step"] == 30 and saved["config"]["warmup_iters"] == 4 and saved["config"]["learning_rate"] == 0.002


def test_a_resume_takes_what_the_command_does_not_say_from_the_checkpoint(testbed, tmp_path, monkeypatch, capsys):
    out = tmp_path / "wsd"
    real_step, calls = train.optimizer_step, []

    def crash_at_update_9(*args, **kwargs):
        calls.append(1)
        if len(calls) == 9:
            raise KeyboardInterrupt  # a crash after the step-8 checkpoint
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train, "optimizer_step", crash_at_update_9)
    with pytest.raises(KeyboardInterrupt):
        run(testbed, out, ["--schedule=wsd", "--alpha=0.0", "--learning_rate=0.002", "--seed=3"], max_iters=12)
    monkeypatch.setattr(train, "optimizer_step", real_step)
    capsys.readouterr()
    # the README's bare resume: the data, schedule, LR, seed and batch are the checkpoint's
    train.main(parse_args(TrainConfig, ["--init_from=resume", f"--out_dir={out}"]))
    printed = capsys.readouterr().out
    assert "changes from" not in printed and "warning" not in printed and "steps 9..12" in printed
    saved = load_checkpoint(str(out / "ckpt.pt"))
    assert saved["step"] == 12 and saved["changes"] == []
    assert {k: saved["config"][k] for k in ("schedule", "learning_rate", "seed", "batch_size", "max_iters")} == {
        "schedule": "wsd", "learning_rate": 0.002, "seed": 3, "batch_size": 4, "max_iters": 12}


def test_resuming_a_finished_run_or_below_its_step_says_nothing_was_done(finished, tmp_path):
    out = copy_run(finished, tmp_path)
    message = error_of(lambda: train.main(parse_args(TrainConfig, ["--init_from=resume", f"--out_dir={out}"])))
    assert "nothing to do: the run is finished" in message and "last step, 8" in message
    assert "larger --max_iters" in message
    message = error_of(lambda: train.main(parse_args(TrainConfig, ["--init_from=resume", f"--out_dir={out}",
                                                                   "--max_iters=5"])))
    assert "holds step 8, past --max_iters=5" in message


def test_a_bare_boolean_flag_means_true():
    assert parse_args(TrainConfig, ["--compile"]).compile is True
    assert "expected --key=value" in error_of(lambda: parse_args(TrainConfig, ["--out_dir"]))


def test_help_shows_the_declared_defaults(capsys):
    with pytest.raises(SystemExit):
        parse_args(TrainConfig, ["--help"])
    assert "--warmup_iters=-1 " in capsys.readouterr().out


def test_help_examples_keep_their_line_continuations(capsys):
    with pytest.raises(SystemExit):
        parse_args(SFTConfig, ["--help"], description=sft.__doc__)
    text = capsys.readouterr().out
    assert "--global_batch_size=128 \\\n" in text


def test_train_says_where_the_checkpoint_is(finished, capsys, testbed, tmp_path):
    run(testbed, tmp_path / "r", max_iters=3)
    assert f"done: {tmp_path / 'r' / 'ckpt.pt'} holds step 3" in capsys.readouterr().out


# ------------------------------------------------------------------ faults of the machine

def test_a_full_disk_while_saving_leaves_the_last_checkpoint_and_no_tmp(finished, tmp_path, monkeypatch):
    out = copy_run(finished, tmp_path)
    before = (out / "ckpt.pt").read_bytes()

    def full_disk(state, f):  # what torch.save does on ENOSPC: some bytes, then its zip writer's error
        f.write(b"x" * 1000)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 6144 vs 5984")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    message = error_of(lambda: checkpoint.save_checkpoint(str(out / "ckpt.pt"), {"step": 9}))
    assert "would not let us write" in message and "unexpected pos" in message
    assert "the previous ckpt.pt is intact" in message and "Free some space" in message
    assert (out / "ckpt.pt").read_bytes() == before and not os.path.exists(out / "ckpt.pt.tmp")


def test_a_log_line_cut_short_by_a_full_disk_does_not_stop_a_resume(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    truncate_log(str(log), 2)
    assert log.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'


# ------------------------------------------------------------------ files that are not what they should be

@pytest.mark.parametrize("script", ["evaluate.py", "sharpness.py", "sample.py", "sft.py"])
def test_a_foreign_torch_file_is_named_as_such(script, tmp_path):
    torch.save({"a": 1}, tmp_path / "foreign.pt")
    flag = "--init_from" if script == "sft.py" else "--ckpt"
    done = subprocess.run([sys.executable, script, f"{flag}={tmp_path}/foreign.pt"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "is a torch file but not a checkpoint of this project" in done.stderr and "'a'" in done.stderr


def test_a_directory_given_as_the_checkpoint_points_to_the_file_in_it(finished):
    message = error_of(lambda: load_checkpoint(str(finished)))
    assert "is a directory, not a checkpoint" in message and f"pass {finished}/ckpt.pt" in message


def test_an_sft_row_whose_messages_are_not_a_list_is_named(finished, tmp_path):
    rows = tmp_path / "chats.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    rows.write_text("\n".join(json.dumps(r) for r in [good, good, {"messages": "hello"}]) + "\n")
    message = error_of(lambda: sft.main(SFTConfig(init_from=str(finished / "ckpt.pt"), dataset=str(rows),
                                                  out_dir=str(tmp_path / "sft"), device="cpu")))
    assert "row 3" in message and "must be a list" in message and '"hello"' in message


def test_conversations_without_an_assistant_turn_are_not_blamed_on_seq_len(finished, tmp_path, capsys, monkeypatch):
    rows = tmp_path / "chats.jsonl"
    answered = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    unanswered = {"messages": [{"role": "user", "content": "hi"}]}
    rows.write_text("\n".join(json.dumps(r) for r in [answered] * 38 + [unanswered] * 2) + "\n")
    cfg = SFTConfig(init_from=str(finished / "ckpt.pt"), dataset=str(rows), out_dir=str(tmp_path / "sft"),
                    learning_rate=1e-3, epochs=1, global_batch_size=8, batch_size=8, warmup_iters=0, device="cpu")
    sft.main(cfg)
    out = capsys.readouterr().out
    assert "have no assistant turn" in out and "cuts the whole answer" not in out


def diverge(*args):
    raise FloatingPointError("loss=nan")


def test_a_sweep_where_every_lr_diverged_fails(testbed, finished, tmp_path, monkeypatch):
    monkeypatch.setattr(sft, "train_step", diverge)
    cfg = SFTConfig(init_from=str(finished / "ckpt.pt"), dataset=str(testbed), out_dir=str(tmp_path / "sft"),
                    lrs="1e-3,1e-2", epochs=1, device="cpu")
    message = error_of(lambda: sft.main(cfg))
    assert "every one diverged: 0.001 at update 1, 0.01 at update 1" in message and "--lrs" in message
    with open(tmp_path / "sft" / "summary.json") as f:
        assert json.load(f)["best_lr"] is None  # the record is written all the same


def test_an_sft_sweep_of_other_settings_is_not_mixed_into_an_out_dir(testbed, finished, tmp_path, monkeypatch):
    monkeypatch.setattr(sft, "train_step", diverge)
    base = dict(init_from=str(finished / "ckpt.pt"), dataset=str(testbed), out_dir=str(tmp_path / "sft"), epochs=1,
                device="cpu")
    with pytest.raises(SystemExit):
        sft.main(SFTConfig(**base, learning_rate=1e-3))
    message = error_of(lambda: sft.main(SFTConfig(**base, learning_rate=1e-3, warmup_iters=3)))
    assert "already holds an SFT sweep of other settings" in message and "--overwrite=true" in message


@pytest.mark.parametrize("flags, words", [(["--tasks="], "names no task"), (["--limit=-5"], "must be >= 0")])
def test_evaluate_refuses_options_that_would_do_nothing(flags, words):
    assert words in error_of(lambda: parse_args(evaluate.EvalConfig, flags))


def test_the_exported_weights_are_as_readable_as_their_siblings(finished, tmp_path):
    from tools import export_hf
    export_hf.export(str(finished / "ckpt.pt"), str(tmp_path / "hf"))
    modes = {name: os.stat(tmp_path / "hf" / name).st_mode & 0o777 for name in os.listdir(tmp_path / "hf")}
    assert modes["model.safetensors"] == modes["config.json"], modes


def test_a_negative_trace_is_explained(finished, monkeypatch, capsys, tmp_path):
    import sharpness
    monkeypatch.setattr(sharpness, "model_sharpness", lambda *a: {"trace": -6146.0, "stderr": 900.0,
                                                                  "stderr_over": "2 batches", "seconds": 1.0})
    sharpness.main(sharpness.SharpnessConfig(ckpt=str(finished / "ckpt.pt"), datasets="sft", num_batches=1,
                                             num_samples=1, out=str(tmp_path / "s.json")))
    assert "not near a minimum of the loss on the sft data" in capsys.readouterr().out
