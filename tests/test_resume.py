"""Long runs lose little: experiment.py checkpoints every run by default (every 5% of its steps) and a rerun of the
same command resumes a killed run (the cold start's SFT too), tried with `kill -9` on a real grid of a tiny model."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import experiment as ex
from conftest import make_model, make_tokenizer


def parse(root, *argv):
    return ex.build_parser().parse_args([str(root)] + list(argv))


def test_save_every_defaults_to_five_percent(tmp_path):
    args = parse(tmp_path, "--rl-steps", "250", "--sft-steps", "120")
    rl, sft = ex.rl_argv(args, "gc", 0), ex.sft_argv(args)
    assert rl[rl.index("--save-every") + 1] == "13" and sft[sft.index("--save-every") + 1] == "6"
    args = parse(tmp_path, "--rl-steps", "10")  # the demo's size: every 5 steps, not every step
    assert ex.rl_argv(args, "gc", 0)[ex.rl_argv(args, "gc", 0).index("--save-every") + 1] == "5"
    args = parse(tmp_path, "--save-every", "0")  # only at the end, as before
    assert ex.rl_argv(args, "gc", 0)[ex.rl_argv(args, "gc", 0).index("--save-every") + 1] == "0"
    args = parse(tmp_path, "--launch", "accelerate launch --num_processes 2")
    assert ex.rl_argv(args, "g", 0)[:4] == ["accelerate", "launch", "--num_processes", "2"]


def test_a_checkpointed_cold_start_resumes(tmp_path):
    (tmp_path / "sft" / "checkpoint-4").mkdir(parents=True)
    steps = {s["name"]: s for s in ex.plan(parse(tmp_path, "--methods", "g"))}
    assert steps["sft train"]["argv"][-2:] == ["--resume", "auto"] and not steps["sft train"]["done"]


def checkpoints(run):  # the steps of the finished checkpoints (checkpoint-N.tmp is one being written)
    return [int(p.name[11:]) for p in run.glob("checkpoint-*") if p.name[11:].isdigit()]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    tok = make_tokenizer()
    make_model(vocab_size=len(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_kill_9_during_rl_then_rerun_resumes(tiny_dir, tmp_path):
    root = tmp_path / "grid"
    argv = [sys.executable, str(ex.HERE / "experiment.py"), str(root), "--model", str(tiny_dir), "--methods", "gc",
            "--seeds", "0", "--train-limit", "8", "--cold-start-n", "2", "--sft-steps", "1", "--sft-batch", "2",
            "--rl-steps", "12", "--questions", "2", "--num-generations", "2", "--pairs-per-step", "2",
            "--critiques-per-pair", "2", "--max-new-tokens", "4", "--critique-max-new-tokens", "4", "--limit", "2",
            "--critique-questions", "2", "--k", "2", "--k-ref", "0", "--grad-accum", "1", "--mixed-precision", "no",
            "--dtype", "fp32", "--eval-batch", "16", "--save-every", "2", "--train-args", "--sampler-batch", "16",
            "--log-every", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = root / "gc" / "seed0"
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)  # its own process group: the kill reaches its children only
    try:
        deadline = time.time() + 600
        while not checkpoints(run) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # kill -9, the runner and the train.py it started
        except ProcessLookupError:
            pass
        proc.wait()
    assert checkpoints(run) and not (run / "final").exists(), "killed before the first checkpoint, or too late"
    done = max(checkpoints(run))
    res = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "skip sft train: done" in res.stdout and "--resume auto" in res.stdout
    assert f"resumed from {run / f'checkpoint-{done}'} at step {done}" in (run / "train.log").read_text()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13)) and (run / "final" / "config.json").is_file()
    assert json.loads((run / "run.json").read_text())["train"]["rc"] == 0
