"""reproduce.py end to end at a toy size: every stage runs as its real command, every output
file is written with the expected rows, and a rerun skips finished work."""

import json
import os

import numpy as np
import pytest
import torch

import reproduce
from reproduce import ReproduceConfig
from study import plan as study

pytestmark = pytest.mark.slow  # integration: real training runs, subprocesses

TOY = dict(max_iters=8, sft_lrs="1e-3", sft_epochs=1, eval_limit=16)


def rows_of_markdown(path):
    lines = open(path).read().splitlines()
    return [line for line in lines if line.startswith("| ") and not line.startswith("| Scheduler")]


def test_experiment_1_writes_tables_figures_json_and_reruns_nothing(tmp_path, monkeypatch):
    cfg = ReproduceConfig(schedules="wso,cosine_a0.1", runs_dir=str(tmp_path / "runs"),
                          out_dir=str(tmp_path / "results"), **TOY)
    results = reproduce.main(cfg)

    out = tmp_path / "results"
    for name in ["table1.md", "results.json", "fig1_schedules.png", "fig2_midtraining.png",
                 "fig3_sharpness_pretrain.png", "fig3_sharpness_sft.png", "fig4_sharpness_vs_sft.png",
                 "fig4_sharpness_train_vs_sft.png"]:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    rows = {r["run"]: r for r in results["rows"]}
    assert sorted(rows) == ["cosine_a0.1", "wso"] and all(r["seed"] == 0 for r in rows.values())
    for r in rows.values():
        for key in ("valid_loss", "task_avg", "sft_task_avg", "sft_val_loss", "sharpness_pretrain", "sharpness_sft",
                    "sharpness_train"):
            assert isinstance(r[key], float), (r["run"], key)
        assert [step for step, *_ in r["sharpness_curve"]] == [8]  # sharpness_interval 50 > 8: the end only
    assert (rows["wso"]["schedule"], rows["wso"]["alpha_pre"]) == ("wso", 1.0)
    assert (rows["cosine_a0.1"]["schedule"], rows["cosine_a0.1"]["alpha_pre"]) == ("cosine", 0.1)
    saved = json.load(open(out / "results.json"))
    assert saved["rows"] == json.loads(json.dumps(results["rows"]))
    assert set(saved["pearson_r"]) == {"sharpness_pretrain", "sharpness_train", "sharpness_pretrain_interval",
                                      "sharpness_train_interval"}  # 2 points: r = +-1; one seed: no interval

    # Table 1 layout: 2 relative rows + 2 absolute rows; the reference (the only decay-based
    # run) has differences 0, WSO its own difference from it.
    table = rows_of_markdown(out / "table1.md")
    assert len(table) == 4 and table[0].startswith("| WSO | 1.0 |") and table[1].startswith("| Cosine | 0.1 |")
    delta = rows["wso"]["valid_loss"] - rows["cosine_a0.1"]["valid_loss"]
    assert f"{delta:+.3f}" in table[0] and "+0.000" in table[1]

    # A rerun finds every stage done: nothing runs, the same numbers come out.
    monkeypatch.setattr(reproduce, "run_stage", lambda *a: pytest.fail(f"finished stage rerun: {a[:2]}"))
    assert reproduce.main(cfg)["rows"] == results["rows"]

    # An unfinished stage (a lost SFT summary) is the only one rerun.
    os.remove(tmp_path / "runs" / "seed0" / "wso" / "sft" / "summary.json")
    ran = []
    monkeypatch.setattr(reproduce, "run_stage", lambda kind, run_dir, *a: ran.append((kind, run_dir)))
    with pytest.raises(FileNotFoundError):  # the fake stage wrote nothing, so the report cannot be made
        reproduce.main(cfg)
    assert ran == [("SFT", str(tmp_path / "runs" / "seed0" / "wso"))]


def test_decay_free_branches_and_merges_one_wso_run(tmp_path):
    cfg = ReproduceConfig(experiment="decay-free", schedules="wso_cooldown,wso_merge_linear",
                          runs_dir=str(tmp_path / "runs"), out_dir=str(tmp_path / "results"), **{**TOY, "max_iters": 20})
    results = reproduce.main(cfg)
    seed = tmp_path / "runs" / "seed0"
    # M = 5 cooldown steps from step 15; checkpoints kept every step over the last 5
    assert sorted(p.name for p in (seed / "wso_kept").glob("ckpt_*.pt")) == [f"ckpt_{s:06d}.pt" for s in range(1, 21)]
    rows = {r["run"]: r for r in results["rows"]}
    assert rows["wso_cooldown"]["schedule"] == "wso+cooldown" and rows["wso_cooldown"]["alpha_pre"] == 0.0
    assert rows["wso_merge_linear"]["schedule"] == "wso+merge linear"
    for r in rows.values():
        assert isinstance(r["sharpness_pretrain"], float) and isinstance(r["sft_task_avg"], float)
        assert isinstance(r["sharpness_train"], float)
    table = rows_of_markdown(tmp_path / "results" / "table_decay_free.md")
    assert [line.split(" | ")[0] for line in table] == ["| WSO + cooldown", "| WSO + merge (linear)"] * 2
    assert (tmp_path / "results" / "results_decay_free.json").is_file()


def test_bad_arguments_say_what_to_do():
    with pytest.raises(ValueError, match="choose one of pre, mid, over, decay-length, decay-free"):
        ReproduceConfig(experiment="post")
    with pytest.raises(ValueError, match="comma-separated integers"):
        ReproduceConfig(seeds="zero")
    with pytest.raises(SystemExit, match="the grid has"):
        reproduce.plan(ReproduceConfig(schedules="wso,adam"))


def test_experiment_2_plan_shares_each_pre_training_run():
    """Table 2's grid: WSO, WSD, Linear and Cosine pre-training (alpha_pre 1.0 for WSO, else 0.1),
    each continued by mid-training with alpha_mid 1.0 and 0.0 from that run's checkpoint; then
    evaluation and SFT of each. The pre-training runs are Experiment 1's (the same commands)."""
    stages = reproduce.plan(ReproduceConfig(experiment="mid", runs_dir="r", max_iters=100))
    pre = [(run_dir, cmd) for kind, run_dir, cmd, _ in stages if kind in ("pre-train", "decay")]
    mid = [(run_dir, cmd) for kind, run_dir, cmd, _ in stages if kind == "mid-train"]
    sources = ("wso", "wsd_a0.1", "linear_a0.1", "cosine_a0.1")
    assert [d for d, _ in pre] == [os.path.join("r", "seed0", n) for n in sources]
    assert [d for d, _ in mid] == [os.path.join("r", "seed0", f"{n}_mid_a{m}") for n in sources for m in (1, 0)]
    experiment_1 = {run_dir: cmd for kind, run_dir, cmd, _ in
                    reproduce.plan(ReproduceConfig(runs_dir="r", max_iters=100)) if kind in ("pre-train", "decay")}
    assert all(experiment_1[d] == cmd for d, cmd in pre)
    for run_dir, cmd in mid:
        source = os.path.basename(run_dir).split("_mid_")[0]
        assert f"--init_from={os.path.join('r', 'seed0', source, 'ckpt.pt')}" in cmd
        assert "--stage=mid" in cmd and "--max_iters=45" in cmd and "--dataset=testbed_mid" in cmd
    assert {d for kind, d, *_ in stages if kind == "SFT"} == {d for d, _ in mid}


def test_wsd_runs_branch_from_the_wso_run_at_t_stable_unless_it_passed_that_step_unkept(tmp_path):
    """Each seed's WSD runs (Table 6's stable_ratio) are cooldowns of its WSO run from its
    checkpoint at T_stable, which the WSO run keeps with AdamW's state; runs with another decay
    length, other schedules, and studies whose WSO run passed T_stable without keeping it, train
    from scratch."""
    runs = tmp_path / "r"
    stages = reproduce.plan(ReproduceConfig(runs_dir=str(runs), max_iters=100))
    t_stable = 10 + round(0.75 * 90)  # warmup 10 (a tenth), 78
    seed = runs / "seed0"
    kinds = {os.path.basename(d): (kind, cmd) for kind, d, cmd, _ in stages if kind in ("pre-train", "decay")}
    assert {n for n, (kind, _) in kinds.items() if kind == "decay"} == {"wsd_a0", "wsd_a0.1"}
    assert f"--keep_every={t_stable}" in kinds["wso"][1] and "--keep_optimizer=true" in kinds["wso"][1]
    branch = kinds["wsd_a0.1"][1]
    assert {f"--init_from={seed / 'wso' / f'ckpt_{t_stable:06d}.pt'}", "--stage=cooldown", "--alpha=0.1",
            f"--max_iters={100 - t_stable}", "--schedule=wso"} <= set(branch)
    assert not any("--keep_every" in a for n, (_, cmd) in kinds.items() if n != "wso" for a in cmd)
    deps = reproduce.dependencies(stages)
    assert [stages[j][1] for j in deps[[s[1] for s in stages].index(str(seed / "wsd_a0.1"))]] == [str(seed / "wso")]
    # without WSO in the plan, or with another decay length, from scratch
    alone = reproduce.plan(ReproduceConfig(runs_dir=str(runs), max_iters=100, schedules="wsd_a0"))
    assert [kind for kind, *_ in alone if kind in ("pre-train", "decay")] == ["pre-train"]
    lengths = reproduce.plan(ReproduceConfig(runs_dir=str(runs), max_iters=100, experiment="decay-length"))
    assert "decay" not in {kind for kind, *_ in lengths}
    # a WSO run that passed T_stable without keeping it (a study begun before branching)
    (seed / "wso").mkdir(parents=True)
    torch.save({"step": 100, "config": {}}, seed / "wso" / "ckpt.pt")
    again = reproduce.plan(ReproduceConfig(runs_dir=str(runs), max_iters=100))
    assert "decay" not in {kind for kind, *_ in again}


def test_sharpness_sizes_and_mid_training_length_come_from_the_scale():
    """Defect: sharpness.py ran with 4 batches x 20 probes at every scale, GPU included."""
    for scale, want in (("cpu", {"--num_batches=4", "--num_samples=20"}),
                        ("gpu", {"--num_batches=4096", "--num_samples=50", "--seq_len=1024", "--batch_size=1"})):
        commands = [command for kind, _, command, _ in reproduce.plan(ReproduceConfig(scale=scale, schedules="wso"))
                    if kind.startswith("sharpness")]
        assert commands and all(want <= set(command) for command in commands), (scale, commands)
    for scale, max_iters, mid_iters in (("cpu", 0, 270), ("cpu", 200, 90), ("gpu", 0, 450)):
        stages = reproduce.plan(ReproduceConfig(scale=scale, experiment="mid", max_iters=max_iters))
        mid_stages = [(command, steps) for kind, _, command, steps in stages if kind == "mid-train"]
        assert mid_stages and all(steps == mid_iters and f"--max_iters={mid_iters}" in command
                                  for command, steps in mid_stages)  # Table 21's 36k after Table 6's 80k


def test_jobs_2_gives_the_numbers_of_jobs_1(tmp_path):
    """--jobs=2 runs independent stages side by side, each single-threaded; the study's
    numbers are those of one stage at a time with the same threads."""
    results = {}
    for jobs in (1, 2):
        cfg = ReproduceConfig(schedules="wso", runs_dir=str(tmp_path / f"runs{jobs}"),  # evaluate, sharpness
                              out_dir=str(tmp_path / f"results{jobs}"), jobs=jobs, threads=1, **TOY)  # and SFT at once
        results[jobs] = [{k: v for k, v in row.items() if k != "run_dir"} for row in reproduce.main(cfg)["rows"]]
    assert results[1] == results[2]


def test_dependencies_follow_the_checkpoints_each_stage_reads():
    cfg = ReproduceConfig(experiment="decay-free", max_iters=20)
    stages = reproduce.plan(cfg)
    deps = reproduce.dependencies(stages)
    index = {(kind, os.path.basename(run_dir)): i for i, (kind, run_dir, _, _) in enumerate(stages)}
    wso = index["pre-train", "wso_kept"]
    assert deps[index["cooldown", "wso_cooldown"]] == {wso}  # branched from a kept checkpoint
    assert deps[index["merge", "wso_merge_linear"]] == {wso}
    assert deps[index["SFT", "wso_merge_linear"]] == {index["merge", "wso_merge_linear"]}
    assert deps[index["evaluate", "wso_cooldown"]] == {index["cooldown", "wso_cooldown"]}
    assert deps[wso] == set()


def test_run_dag_respects_dependencies_and_runs_the_rest_side_by_side():
    import threading
    import time

    from study.jobs import run_dag
    log, lock = [], threading.Lock()

    def run(stage):
        with lock:
            log.append(("start", stage))
        time.sleep(0.05)
        if stage == "bad":
            raise SystemExit("bad failed")
        with lock:
            log.append(("end", stage))

    stages = ["a", "b", "c", "d"]  # c needs a; d needs b and c
    deps = {0: [], 1: [], 2: [0], 3: [1, 2]}
    run_dag(stages, deps.get, run, jobs=2)
    order = list(log)
    assert order.index(("start", "c")) > order.index(("end", "a"))
    assert order.index(("start", "d")) > max(order.index(("end", "b")), order.index(("end", "c")))
    assert order[:2] == [("start", "a"), ("start", "b")]  # two at once
    log.clear()
    with pytest.raises(SystemExit, match="bad failed"):
        run_dag(["bad", "x", "y"], {0: [], 1: [], 2: [0]}.get, run, jobs=2)
    assert ("start", "y") not in log and ("end", "x") in log  # x ran on; y, which needed bad, never started


def test_makespan_simulates_run_dag_and_counts_the_stages_that_run_alone():
    """Defect: the study's estimate was the total cost / jobs, as though both cores were busy to
    the end; a stage that waits on a long one runs alone after it."""
    from study.jobs import makespan
    no_deps = {0: [], 1: [], 2: [], 3: []}.get
    assert makespan([4, 1, 1, 1], no_deps, jobs=1) == 7
    assert makespan([4, 1, 1, 1], no_deps, jobs=2) == 4  # 1, 2, 3 run one after another beside 0
    assert makespan([4, 1, 1, 1], {0: [], 1: [], 2: [], 3: [0]}.get, jobs=2) == 5  # 3 waits for 0, then alone
    assert makespan([1, 1, 1, 1], {0: [], 1: [0], 2: [1], 3: [2]}.get, jobs=2) == 4  # a chain never overlaps
    with pytest.raises(RuntimeError, match="wait on stages"):
        makespan([1, 1], {0: [], 1: [5]}.get, jobs=2)


def test_figure_4_redraws_from_a_published_results_json_alone(tmp_path):
    """A published results*.json is enough to redraw Figure 4 (its runs need not be kept), with
    the same r as the numbers give."""
    per_seed = {("wso", "wso", 1.0): ([300.0, 310.0, 400.0], [40.0, 41.0, 60.0]),  # (sharpness, score) per seed
                ("wsd_a0", "wsd", 0.0): ([200.0, 205.0, 210.0], [50.0, 49.0, 51.0]),
                ("linear_a0", "linear", 0.0): ([500.0, 480.0, 700.0], [45.0, 30.0, 44.0])}
    rows = [{"run": run, "seed": seed, "schedule": schedule, "alpha_pre": alpha, "alpha_mid": None,
             "sharpness_pretrain": None, "sharpness_train": sharp[seed], "sft_task_avg": score[seed],
             "run_dir": str(tmp_path / "gone" / run)}
            for (run, schedule, alpha), (sharp, score) in per_seed.items() for seed in (0, 1, 2)]
    written = reproduce.figure4(json.loads(json.dumps(rows)), str(tmp_path), "_x")
    assert os.path.isfile(tmp_path / "fig4_sharpness_train_vs_sft_x.png") and "fig4_sharpness_vs_sft" not in written
    means = np.array([(np.mean(sharp), np.mean(score)) for sharp, score in per_seed.values()])
    assert written["pearson_r_sharpness_train"] == pytest.approx(np.corrcoef(means[:, 0], means[:, 1])[0, 1])


def test_a_partial_rerun_never_overwrites_the_published_results(tmp_path):
    cfg = ReproduceConfig(out_dir=str(tmp_path / "results"), runs_dir=str(tmp_path / "runs"))
    rows = [{"run": run, "seed": seed} for run in ("wso", "cosine_a0.1") for seed in (0, 1, 2)]
    assert reproduce.output_dir(cfg, rows[:1], "") == cfg.out_dir  # nothing published yet
    os.makedirs(cfg.out_dir)
    with open(tmp_path / "results" / "results.json", "w") as f:
        json.dump({"rows": rows}, f)
    assert reproduce.output_dir(cfg, rows, "") == cfg.out_dir  # the same set (or more) replaces it
    assert reproduce.output_dir(cfg, [r for r in rows if r["seed"] == 0], "") == str(tmp_path / "runs" / "report")
    assert reproduce.output_dir(cfg, [r for r in rows if r["run"] == "wso"], "") == str(tmp_path / "runs" / "report")


def test_study_eta_recovers_from_a_pause(capsys):
    """Defect: the ETA divided all wall time since the start by the work done, so a pause
    (SIGSTOP while CI ran) kept inflating it to the end; now the last WINDOW finishes set the pace."""
    now = [0.0]
    todo = [("evaluate", f"run{k}", [], None) for k in range(30)]
    progress = reproduce.StudyProgress(todo, 600, clock=lambda: now[0])
    cost = study.COST["evaluate"]
    for k, stage in enumerate(todo[:20]):
        now[0] += 10.0 + (3600.0 if k == 2 else 0.0)  # one stage took an hour of pause
        progress.done(None, stage, 10.0)
    assert progress.eta() == reproduce.format_duration(10.0 / cost * cost * 10)  # 10 stages left at 10 s each
    assert capsys.readouterr().out.splitlines()[3].endswith("study ETA " + reproduce.format_duration(
        (3640.0) / 4 * 26))  # right after the pause, the window still holds it


def test_study_estimate_weighs_training_by_its_steps():
    """Defect: every pre-training stage cost 1.0, so Experiment 3's 4x pre-training runs were
    estimated at the time of Experiment 1's (2h for a plan of about 6h)."""
    over, pre = (study.plan(ReproduceConfig(experiment=e, seeds="0")) for e in ("over", "pre"))
    cost = lambda stages, kind: sum(study.stage_cost(s, 600) for s in stages if s[0] == kind)  # noqa: E731
    assert cost(over, "pre-train") == 4 * 7
    # Experiment 1's two WSD runs are branches of WSO's: their last quarter alone
    assert (cost(pre, "pre-train"), cost(pre, "decay")) == (5, 2 * 0.25)
    mid = study.plan(ReproduceConfig(experiment="mid", seeds="0"))
    assert {study.stage_cost(s, 600) for s in mid if s[0] == "mid-train"} == {270 / 600}
    assert study.stage_cost(("SFT", "r", [], None), 600) == study.COST["SFT"]


def test_decay_length_labels_each_fraction_and_draws_figure_5(tmp_path, monkeypatch):
    """Defect: the WSD runs of every fraction shared one label, so Figure 4 (and its Pearson r)
    merged them into one point and the table's rows could not be told apart."""
    plotted, plot = [], reproduce.plot_sharpness_vs_score
    monkeypatch.setattr(reproduce, "plot_sharpness_vs_score", lambda points, *a, **k: (plotted.append(sorted(points)),
                                                                                      plot(points, *a, **k))[1])
    cfg = ReproduceConfig(experiment="decay-length", schedules="wsd_a0_decay0.1,wsd_a0",
                          runs_dir=str(tmp_path / "runs"), out_dir=str(tmp_path / "results"), **TOY)
    results = reproduce.main(cfg)
    assert {r["run"]: r["decay_fraction"] for r in results["rows"]} == {"wsd_a0_decay0.1": 0.1, "wsd_a0": 0.25}
    table = rows_of_markdown(tmp_path / "results" / "table_decay_length.md")
    assert [line.split(" | ")[:3] for line in table] == [["| WSD", "0.0", "0.1"], ["| WSD", "0.0", "0.25"]] * 2
    assert (tmp_path / "results" / "fig5_decay_length.png").stat().st_size > 0
    assert plotted and all(labels == ["WSD a=0 decay 0.1", "WSD a=0 decay 0.25"] for labels in plotted)


def test_stages_run_on_avx2_kernels_where_torch_would_pick_avx512(tmp_path, monkeypatch):
    """AVX-512 kernels add in another order than AVX2's, so an AVX-512 machine gave the same seed
    another trajectory; run_stage pins the stage's kernels to AVX2 there, and an explicit choice
    in the environment wins."""
    import torch

    script = tmp_path / "capability.py"
    script.write_text("import sys, torch\nopen(sys.argv[1], 'w').write(torch.backends.cpu.get_cpu_capability())\n")
    here = torch.backends.cpu.get_cpu_capability()

    def capability_of_a_stage():
        out = tmp_path / "capability.txt"
        reproduce.run_stage("evaluate", str(tmp_path / "run"), [str(script), str(out)], 0, verbose=False)
        return out.read_text()

    assert capability_of_a_stage() == ("AVX2" if here == "AVX512" else here)
    log = (tmp_path / "run" / "evaluate.log").read_text()
    assert ("$ ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 python " in log) == (here == "AVX512")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "default")
    assert capability_of_a_stage() == "DEFAULT"
    assert "$ ATEN_CPU_CAPABILITY" not in (tmp_path / "run" / "evaluate.log").read_text().split("\n")[-2]


def test_quick_hmm_study_measures_the_mechanism_and_the_frontier_and_pairs_the_seeds(tmp_path, monkeypatch):
    """reproduce.py --quick (--scale=hmm) at a toy size on a small HMM language: each trained model gets a held-out
    sharpness stage with the AdamW-preconditioned trace, each sweep its forgetting per LR; the
    rows carry both, the frontier figure is drawn, and the table pairs each seed's WSD with its
    WSO (the numbers in results.json are the rows' own differences)."""
    from data.hmm import prepare as hmm
    from study.tables import paired
    data = tmp_path / "hmm"
    hmm.prepare(data, seed=0, train_tokens=30_000, val_tokens=6_000, exposures=3, n_people=40)
    scale = study.SCALES["hmm"]
    monkeypatch.setitem(scale, "train", {**scale["train"], "dataset": str(data / "pretrain"), "sharpness_batches": 2,
                                         "sharpness_samples": 2})
    monkeypatch.setitem(scale, "sft", {**scale["sft"], "dataset": str(data)})
    monkeypatch.setitem(scale, "sharpness", {"num_batches": 2, "num_samples": 2})
    # --quick: the hmm scale, WSO and WSD to 0, seeds 0 and 1, two stages at a time; the sizes given win
    cfg = ReproduceConfig(quick=True, runs_dir=str(tmp_path / "runs"), out_dir=str(tmp_path / "results"), **TOY)
    quick = study.quick_config(cfg)
    assert (quick.scale, quick.schedules, quick.seeds, quick.jobs, quick.max_iters) == ("hmm", "wso,wsd_a0", "0,1", 2, 8)
    results = reproduce.main(cfg)
    rows = {(r["run"], r["seed"]): r for r in results["rows"]}
    assert sorted(rows) == [("wsd_a0", 0), ("wsd_a0", 1), ("wso", 0), ("wso", 1)]
    for r in rows.values():
        assert isinstance(r["sharpness_preconditioned"], float) and r["sharpness_preconditioned_stderr"] >= 0
        assert len(r["sft_frontier"]) == 1 and r["sft_frontier"][0][2] == 1e-3  # one LR: (forgetting, score, lr)
        assert r["sft_task_avg_over_lrs"] == r["sft_frontier"][0][1]  # the mean over a sweep of one LR
    out = tmp_path / "results"
    assert (out / "fig_frontier.png").stat().st_size > 0 and (out / "fig_frontier_paired.png").stat().st_size > 0
    drawn = {}
    monkeypatch.setattr(reproduce, "plot_paired_by_lr", lambda pairs, reference, path: drawn.update(pairs) or path)
    reproduce.paired_frontier_figure(results["rows"], str(tmp_path / "x.png"))
    (label, by), = drawn.items()  # WSD against WSO at the one LR both swept, seed by seed
    for i, key in enumerate(("forgetting", "score")):
        assert by[key][1e-3] == pytest.approx([rows[("wsd_a0", s)]["sft_frontier"][0][i]
                                               - rows[("wso", s)]["sft_frontier"][0][i] for s in (0, 1)])
    table = (out / "table1.md").read_text()
    assert "Tr(D^-1 H) held-out" in table and "wsd_a0 / wso" in table and "wsd_a0 - wso" in table
    saved = json.load(open(out / "results.json"))["paired_vs_wso"]
    want = [rows[("wsd_a0", s)]["valid_loss"] - rows[("wso", s)]["valid_loss"] for s in (0, 1)]
    assert saved["wsd_a0 valid_loss"]["per_seed"] == pytest.approx(want)
    assert saved["wsd_a0 valid_loss"]["mean"] == pytest.approx(paired(want)["mean"])
    ratio = [rows[("wsd_a0", s)]["sharpness_preconditioned"] / rows[("wso", s)]["sharpness_preconditioned"]
             for s in (0, 1)]
    assert saved["wsd_a0 sharpness_preconditioned"]["per_seed"] == pytest.approx(ratio)
    # study.answers scores the selected checkpoints again: the same numbers as the sweep's, by attribute too
    from study import answers
    again = answers.main(answers.AnswersConfig(runs=str(tmp_path / "runs"), out=str(out / "answers.md")))
    for a in again:
        summary = json.load(open(tmp_path / "runs" / f"seed{a['seed']}" / a["run"] / "sft" / "summary.json"))
        best = next(r for r in summary["runs"] if r["lr"] == summary["best_lr"])
        assert (a["exact_match"], a["choice"], a["type_match"]) == pytest.approx(
            (best["sft_test_exact_match"], best["sft_test_choice"], best["sft_test_type_match"]))
        for attribute, marks in best["sft_test_by_attribute"].items():
            assert a["by_attribute"][attribute] == pytest.approx(marks)
        assert len(a["answers"]) == a["n"] and os.path.exists(os.path.join(best["run_dir"], "answers_test.json"))
    assert "wsd_a0 - wso" in (out / "answers.md").read_text()


def test_quick_settings_yield_to_the_options_a_command_gives():
    from nanowso.common import parse_args
    cfg = study.quick_config(parse_args(ReproduceConfig, ["--quick", "--seeds=0,1,2", "--jobs=1"]))
    assert (cfg.scale, cfg.seeds, cfg.jobs, cfg.max_iters, cfg.out_dir) == ("hmm", "0,1,2", 1, 0, "results/quick")
    assert study.quick_config(ReproduceConfig()) == ReproduceConfig()  # off: untouched
