"""`umtrain sweep`: validation before any write, idempotent re-runs, refusal of a different sweep, the SLURM array
script (run with fake srun/scontrol/python), and a local sweep whose summary matches its checkpoints."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import yaml

from tests.checkpoint.helpers import saved_losses, tree_digest
from tests.distributed import tiny_config
from tests.launch.test_launch_scripts import fake_bin
from umtrain.checkpoint import REQUEUE_EXIT_CODE
from umtrain.cli import sweep as sweep_cli
from umtrain.cli.main import main

GRID = ["--grid", "optimizer.lr=[1e-3,3e-4]", "--grid", "training.seed=[1,2]"]


@pytest.fixture
def base_yaml(tmp_path: Path) -> Path:
    config = tiny_config(training={"train_iters": 2})
    config["run_name"] = "tiny"
    path = tmp_path / "base.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def sweep(base_yaml: Path, out: Path, *extra: str) -> int:
    return main(["sweep", "--config", str(base_yaml), *GRID, "--out", str(out), *extra])


@pytest.mark.parametrize("grid, words", [
    ("model.memry.topk=[4,8]", "model.memry: unknown key (did you mean 'memory'?)"),
    ("training.train_iters=[2,0]", "training.train_iters: must be >= 1 (sweep point 'train-iters0'"),
])
def test_a_bad_key_or_value_is_named_before_anything_is_written(base_yaml, tmp_path, capsys, grid, words):
    out = tmp_path / "sweep"
    assert main(["sweep", "--config", str(base_yaml), "--grid", grid, "--out", str(out)]) == 2
    assert words in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("args, words", [
    (["--grid", "optimizer.lr=[1e-3,3e-4]", "optimizer={lr: 1e-2}"],
     "optimizer.lr: is both swept and fixed by an override (optimizer.lr and optimizer (whose value sets "
     "optimizer.lr) overlap)"),
    (["--grid", "optimizer=[{lr: 1e-3},{lr: 3e-4}]", "--grid", "optimizer.lr=[1e-2,1e-1]"],
     "optimizer.lr: is swept twice"),
    (["--grid", "optimizer.lr=[1e-3,3e-4]", "checkpoint={save: /tmp/x}"],
     "checkpoint: sets checkpoint.save, which is set per run by the sweep"),
])
def test_a_section_mapping_overlapping_a_swept_key_is_refused(base_yaml, tmp_path, capsys, args, words):
    out = tmp_path / "sweep"
    assert main(["sweep", "--config", str(base_yaml), *args, "--out", str(out)]) == 2
    assert words in capsys.readouterr().err
    assert not out.exists()


def test_files_and_idempotent_rerun(base_yaml, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert sweep(base_yaml, out, "training.eval_iters=2") == 0
    record = json.loads((out / "sweep.json").read_text())
    names = ["lr1e-3_seed1", "lr1e-3_seed2", "lr3e-4_seed1", "lr3e-4_seed2"]
    assert [r["name"] for r in record["runs"]] == names
    assert [r["point"] for r in record["runs"]] == [{"optimizer.lr": lr, "training.seed": s}
                                                    for lr in (1e-3, 3e-4) for s in (1, 2)]
    for name in names:
        config = yaml.safe_load((out / name / "config.yaml").read_text())
        assert config["run_name"] == f"tiny-{name}" and config["training"]["eval_iters"] == 2
        assert config["checkpoint"]["save"] == str(out / name / "checkpoints")
    commands = (out / "commands.txt").read_text().splitlines()
    assert commands == [f"umtrain train --config {out / name / 'config.yaml'}" for name in names]
    assert "umtrain train --config" in capsys.readouterr().out

    before = tree_digest(out)
    assert sweep(base_yaml, out, "training.eval_iters=2") == 0          # the same sweep again: nothing changes
    assert tree_digest(out) == before

    assert sweep(base_yaml, out, "training.eval_iters=3") == 2          # a different sweep: refused, untouched
    assert "holds a different sweep" in capsys.readouterr().err
    assert tree_digest(out) == before


def test_a_directory_that_is_not_a_sweep_is_refused(base_yaml, tmp_path, capsys):
    out = tmp_path / "results"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert sweep(base_yaml, out) == 2
    assert "not a sweep directory" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_the_unlabelled_zip_group_keeps_its_command_names_and_order(base_yaml, tmp_path):
    """A sweep written before zip groups existed is still the same sweep: same runs, same sweep.json command."""
    out = tmp_path / "sweep"
    assert main(["sweep", "--config", str(base_yaml), "--grid", "training.eval_iters=[1,2]",
                 "--zip", "optimizer.lr=[1e-3,3e-4]", "--zip", "training.seed=[1,2]", "--out", str(out)]) == 0
    record = json.loads((out / "sweep.json").read_text())
    assert [r["name"] for r in record["runs"]] == ["eval-iters1_lr1e-3_seed1", "eval-iters1_lr3e-4_seed2",
                                                   "eval-iters2_lr1e-3_seed1", "eval-iters2_lr3e-4_seed2"]
    assert record["command"] == (f"umtrain sweep --config {base_yaml} --grid 'training.eval_iters=[1,2]' "
                                 f"--zip 'optimizer.lr=[0.001,0.0003]' --zip 'training.seed=[1,2]' --out {out}")


def test_independent_zip_groups(base_yaml, tmp_path, capsys):
    out = tmp_path / "sweep"
    command = ["sweep", "--config", str(base_yaml), "--zip", "sched:optimizer.lr=[1e-3,3e-4]",
               "--zip", "data:training.seed=[1,2,3]", "--zip", "sched:optimizer.min_lr=[1e-4,3e-5]",
               "--zip", "data:training.eval_iters=[1,2,3]", "--out", str(out)]
    assert main(command) == 0
    record = json.loads((out / "sweep.json").read_text())
    assert [r["point"] for r in record["runs"]] == [
        {"optimizer.lr": lr, "optimizer.min_lr": min_lr, "training.seed": seed, "training.eval_iters": seed}
        for lr, min_lr in ((1e-3, 1e-4), (3e-4, 3e-5)) for seed in (1, 2, 3)]
    assert record["runs"][0]["name"] == "lr1e-3_min-lr1e-4_seed1_eval-iters1"
    assert "--zip 'sched:optimizer.min_lr=[0.0001,3e-05]' --zip 'data:training.seed=[1,2,3]'" in record["command"]
    for entry in record["runs"]:
        config = yaml.safe_load(Path(entry["config"]).read_text())
        assert config["optimizer"]["min_lr"] == entry["point"]["optimizer.min_lr"]
        assert config["training"]["eval_iters"] == config["training"]["seed"] == entry["point"]["training.seed"]

    before = tree_digest(out)
    regrouped = [*command[:5], *command[7:9], *command[5:7], *command[9:]]    # group by group
    assert regrouped != command and main(regrouped) == 0             # the same groups given in another order
    assert tree_digest(out) == before

    other = tmp_path / "other"
    assert main([*command[:-2], "--zip", "data:training.train_iters=[2,3]", "--out", str(other)]) == 2
    assert ("zip group 'data' must have the same number of values (training.seed has 3, training.eval_iters has 3, "
            "training.train_iters has 2)") in capsys.readouterr().err
    assert not other.exists()


def fake_checkpoints(out: Path, commons: dict[str, dict], monkeypatch) -> None:
    """Each named run gets a `latest` checkpoint whose common state is `commons[name]`."""
    from umtrain.checkpoint import convert

    for name in commons:
        (out / name / "checkpoints" / "iter_0000150").mkdir(parents=True)
        (out / name / "checkpoints" / "latest").write_text("iter_0000150\n")
    monkeypatch.setattr(convert, "read_megatron_common", lambda path: commons[path.parent.parent.name])


def test_summary_ranks_by_the_best_validation_loss(base_yaml, tmp_path, monkeypatch, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", "--config", str(base_yaml), "--grid", "training.seed=[1,2,3,4,5,6]", "--out", str(out)]) == 0
    valid = {"seed1": {50: 4.5, 100: 4.2, 150: 4.3},       # best 4.2@100, last 4.3
             "seed2": {50: 4.4, 100: 4.25},                  # a better last than seed1's, a worse best
             "seed3": {},                                    # trained, never validated
             "seed5": {100: 4.6, 50: 4.2, 150: 4.2},         # best 4.2 ties seed1's; its last 4.2 ranks it first
             "seed6": {50: math.nan}}
    fake_checkpoints(out, {name: {"iteration": 2, "history": {"loss": [5.0, 4.0 + i], "valid_loss": losses}}
                           for i, (name, losses) in enumerate(valid.items())}, monkeypatch)
    capsys.readouterr()
    assert main(["sweep", "--summarize", str(out)]) == 0
    runs = json.loads((out / "summary.json").read_text())["runs"]
    assert [r["name"] for r in runs] == ["seed5", "seed1", "seed2", "seed6", "seed3", "seed4"]
    by_name = {r["name"]: r for r in runs}
    assert {k: by_name["seed1"][k] for k in ("valid_loss", "valid_iteration", "best_valid_loss",
                                             "best_valid_iteration", "train_loss", "status")} == \
        {"valid_loss": 4.3, "valid_iteration": 150, "best_valid_loss": 4.2, "best_valid_iteration": 100,
         "train_loss": 4.0, "status": "done"}
    assert (by_name["seed5"]["best_valid_iteration"], by_name["seed5"]["valid_iteration"]) == (50, 150)
    assert by_name["seed3"]["best_valid_loss"] is None and by_name["seed3"]["train_loss"] == 6.0
    assert by_name["seed4"]["status"] == "not started" and by_name["seed4"]["best_valid_iteration"] is None
    table = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[1:7]}
    assert table["seed1"] == ["done", "2/2", "4.0000", "4.3000", "4.2000@100"]
    assert table["seed3"][-2:] == ["-", "-"] and table["seed6"][-1] == "nan@50"


def test_summary_of_runs_not_started(base_yaml, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert sweep(base_yaml, out) == 0
    assert main(["sweep", "--summarize", str(out)]) == 0
    runs = json.loads((out / "summary.json").read_text())["runs"]
    assert [r["status"] for r in runs] == ["not started"] * 4 and runs[0]["train_loss"] is None
    assert "not started" in capsys.readouterr().out


def run_array_task(tmp_path: Path, script: Path, task: int, exit_code: int) -> tuple[int, list[list[str]], str]:
    """The generated sbatch file as SLURM would run array task `task` (fake python, srun and scontrol)."""
    task_dir = tmp_path / f"task{task}"
    task_dir.mkdir()
    bin_dir = fake_bin(task_dir, exit_code)
    log, requeues = bin_dir.parent / "args.log", bin_dir.parent / "scontrol.log"
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "ARGS_LOG": str(log), "SCONTROL_LOG": str(requeues),
           "SLURM_ARRAY_TASK_ID": str(task), "SLURM_ARRAY_JOB_ID": "77", "SLURM_JOB_NODELIST": "node-a"}
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return proc.returncode, calls, requeues.read_text() if requeues.exists() else ""


def test_slurm_array_script(base_yaml, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert sweep(base_yaml, out, "--launch", "slurm", "--nproc-per-node", "2") == 0
    script = out / "sweep.sbatch"
    assert f"sbatch {script}" in capsys.readouterr().out
    text = script.read_text()
    assert "#SBATCH --array=0-3\n" in text and not re.search(r"@[A-Z_]{2,}@", text)
    configs = [r["config"] for r in json.loads((out / "sweep.json").read_text())["runs"]]
    assert f"CONFIGS=({' '.join(configs)})" in text

    rc, calls, requeued = run_array_task(tmp_path, script, task=2, exit_code=0)
    assert rc == 0 and requeued == "" and len(calls) == 1
    args = calls[0]
    assert args[args.index("--nproc-per-node") + 1] == "2"
    assert args[-5:] == ["-m", "umtrain.cli.main", "train", "--config", configs[2]]

    rc, calls, requeued = run_array_task(tmp_path, script, task=3, exit_code=REQUEUE_EXIT_CODE)
    assert rc == 0 and requeued == "requeue 77_3\n" and calls[0][-1] == configs[3]


def test_local_launch_goes_on_after_a_failed_run(base_yaml, tmp_path, monkeypatch, capsys):
    out = tmp_path / "sweep"
    started = []

    def fake_train(command, log):
        started.append(command[command.index("--config") + 1])
        return (1 if len(started) == 1 else 0), False

    monkeypatch.setattr(sweep_cli, "run_training", fake_train)
    assert sweep(base_yaml, out, "--launch", "local") == 1
    assert len(started) == 4
    statuses = {r["name"]: r["status"] for r in json.loads((out / "summary.json").read_text())["runs"]}
    assert statuses == {"lr1e-3_seed1": "failed (exit 1)", "lr1e-3_seed2": "not started",
                        "lr3e-4_seed1": "not started", "lr3e-4_seed2": "not started"}


@pytest.mark.slow
def test_local_sweep_summary_matches_the_checkpoints(base_yaml, tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["sweep", "--config", str(base_yaml), "--grid", "optimizer.lr=[3e-3,1e-4]", "--out", str(out),
            "--launch", "local"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())["runs"]
    expected = []
    for name in ("lr3e-3", "lr1e-4"):
        latest = out / name / "checkpoints" / "iter_0000002"
        common = torch.load(latest / "common.pt", weights_only=False)
        valid = common["history"]["valid_loss"][2]              # one validation: the last step's
        expected.append({"name": name, "status": "done", "iteration": 2, "train_loss": saved_losses(latest)[-1],
                         "valid_loss": valid, "best_valid_loss": valid, "best_valid_iteration": 2})
    expected.sort(key=lambda r: r["valid_loss"])
    assert [{k: r[k] for k in expected[0]} for r in summary] == expected
    assert expected[0]["valid_loss"] < expected[1]["valid_loss"]
    table = capsys.readouterr().out.split("run ", 1)[1].splitlines()
    assert [line.split()[0] for line in table[1:3]] == [r["name"] for r in expected]

    assert main(args) == 0                                              # re-run: both done, nothing trains
    assert capsys.readouterr().out.count("already done") == 2


def _signal_self_once_both_handlers_are_set(sig: int, ready: Path, before, stop: threading.Event,
                                            dispositions: dict) -> None:
    """Send `sig` to this process once the child has its handlers (it wrote `ready`) and run_training has its own (a
    signal before either would end the child, or this process, on the default action); `dispositions`: this
    process's handlers of SIGHUP and the stop signals at that moment."""
    while not stop.wait(0.01):
        if ready.exists() and signal.getsignal(sig) != before:
            dispositions.update({s: signal.getsignal(s) for s in (signal.SIGHUP, *sweep_cli.STOP_SIGNALS)})
            os.kill(os.getpid(), sig)
            return


# stands for a training run: SIGTERM checkpoints and exits with the requeue code, SIGINT aborts (exit 1); it writes
# its process group to `ready` once both handlers are set
TRAINING_LIKE_CHILD = ("import os, pathlib, signal, sys, time\n"
                       "signal.signal(signal.SIGTERM, lambda *_: sys.exit(42))\n"
                       "signal.signal(signal.SIGINT, lambda *_: sys.exit(1))\n"
                       "pathlib.Path(sys.argv[1]).write_text(str(os.getpgid(0)))\n"
                       "time.sleep(60)\n")


def run_training_signalled(sig: int, tmp_path: Path) -> tuple[tuple[int, bool], int, dict]:
    """run_training of TRAINING_LIKE_CHILD while this process gets `sig`: its result, the child's process group and
    this process's signal handlers while the run trained."""
    ready = tmp_path / "child_ready"
    before = signal.getsignal(sig)
    stop = threading.Event()
    dispositions: dict = {}
    sender = threading.Thread(target=_signal_self_once_both_handlers_are_set,
                              args=(sig, ready, before, stop, dispositions))
    sender.start()
    try:
        with open(tmp_path / "train.log", "w") as log:
            result = sweep_cli.run_training([sys.executable, "-c", TRAINING_LIKE_CHILD, str(ready)], log)
    finally:
        stop.set()
        sender.join()
    assert signal.getsignal(sig) == before
    return result, int(ready.read_text()), dispositions


def test_a_stop_signal_reaches_the_training_process(tmp_path):
    """A SIGTERM to the sweep (scancel, a supervisor) is passed on to the run it trains, which exits (with the
    requeue code, as training does after its checkpoint) instead of training on alone."""
    assert run_training_signalled(signal.SIGTERM, tmp_path)[0] == (42, True)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP], ids=["SIGINT", "SIGHUP"])
def test_ctrl_c_and_hangup_reach_the_run_as_sigterm_and_only_through_the_sweep(tmp_path, sig):
    """SIGINT is an abort to training (no checkpoint): the sweep passes it on as SIGTERM, and the run has its own
    process group, so that a terminal's Ctrl-C (sent to the foreground group) does not reach it directly; nor does
    the terminal's hang-up, which the sweep passes on as SIGTERM too."""
    result, child_group, _ = run_training_signalled(sig, tmp_path)
    assert result == (42, True)
    assert child_group != os.getpgrp()


def test_a_run_killed_by_a_signal_reports_128_plus_its_number(tmp_path):
    with open(tmp_path / "train.log", "w") as log:
        result = sweep_cli.run_training([sys.executable, "-c", "import os; os.kill(os.getpid(), 9)"], log)
    assert result == (128 + 9, False)


def test_a_slurm_sweep_needs_the_launch_files_of_a_source_checkout(base_yaml, tmp_path, monkeypatch, capsys):
    """An installed (non-editable) umtrain has no launch/ directory: a clear error, and nothing written."""
    missing = tmp_path / "site" / "launch" / "sweep.sbatch"
    monkeypatch.setattr(sweep_cli, "SBATCH_TEMPLATE", missing)
    out = tmp_path / "sweep"
    assert sweep(base_yaml, out, "--launch", "slurm") == 2
    err = capsys.readouterr().err
    assert f"--launch slurm needs {missing}" in err and "pip install -e ." in err
    assert not out.exists()


def test_a_local_sweep_checks_the_layout_against_its_process_count(base_yaml, tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["sweep", "--config", str(base_yaml), "--grid", "optimizer.lr=[1e-3]", "--out", str(out),
            "--launch", "local", "parallel.tensor_model_parallel_size=2"]
    assert main(args) == 2
    assert "world size 1 is not divisible by TP x PP = 2 x 1" in capsys.readouterr().err
    assert not out.exists()


def test_a_sweep_started_under_nohup_keeps_ignoring_hangups(tmp_path):
    """`nohup umtrain sweep ...` must survive the logout: an ignored SIGHUP stays ignored while a run trains."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        result, _, dispositions = run_training_signalled(signal.SIGTERM, tmp_path)
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert dispositions[signal.SIGHUP] is signal.SIG_IGN and result == (42, True)
