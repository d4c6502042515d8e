"""train.py under DDP: two CPU processes (`accelerate launch`, gloo) against one process on the same global batch.

This file is also the per-rank driver: `accelerate launch --multi_gpu --num_processes 2
tests/test_multiprocess.py ARGS` installs the batch-invariant ScriptedSampler of test_train.py in each rank,
runs train.main(ARGS) and saves the rank's final parameters to OUT/rank{R}.pt.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":  # the driver, one per rank
    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(1)
    import rollout
    import train
    from test_train import ScriptedSampler

    rollout.Sampler = ScriptedSampler
    if os.environ.get("GCRL_TEST_EMPTY_RANK") == os.environ.get("RANK"):  # this rank: every response wrong
        import reward
        reward.response_reward = lambda text, gold, **kw: 0.0
    save = train.save

    def save_and_dump(trainer, final=False):
        ck = save(trainer, final)
        if final:
            torch.save(trainer.lm().state_dict(), trainer.out / f"rank{trainer.runtime.rank}.pt")
        return ck

    train.save = save_and_dump
    train.main(sys.argv[1:])
    sys.exit(0)

import test_train  # noqa: E402
import train  # noqa: E402
from test_train import base_args, install_scripted, metrics  # noqa: E402

tiny_dir, qspec, one_thread = test_train.tiny_dir, test_train.qspec, test_train.one_thread  # fixtures


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(tmp_path, argv, **env_over):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **env_over)
    launcher = Path(sys.executable).parent / "accelerate"
    cmd = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1",
           "--main_process_port", str(_free_port()), __file__] + argv
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


def test_a_rank_with_nothing_to_learn(tiny_dir, qspec, tmp_path):
    """Rank 1's groups are all uniform (every response wrong), rank 0's are not: with old log-probs (ppo-epochs 2)
    and a reference model (beta > 0) rank 1 computes nothing for them and still joins every collective; the
    ranks stay in lockstep and the update is rank 0's alone."""
    out = tmp_path / "empty"
    launch(tmp_path, base_args(tiny_dir, qspec, out, **{"--mode": "g", "--questions-per-step": 4, "--beta": 0.1,
                                                        "--ppo-epochs": 2, "--mini-batch-size": 2}),
           GCRL_TEST_EMPTY_RANK="1")
    r0, r1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    (row,) = metrics(out)
    assert row["update/seqs"] == 4 and row["frac_reward_zero_std"] == 0.5  # rank 0: 2 mixed groups of 2


def test_two_processes_match_one(monkeypatch, tiny_dir, qspec, tmp_path):
    """2 GC-RL steps on 2 ranks (2 questions each, per-rank caches) == the same 2 steps on one process with 4
    questions: identical parameters on both ranks, and the same update and metrics as one process. Every pair
    of the step is popped (--pairs-per-step = all of them), so both runs critique the same pairs; ppo-epochs 2,
    grad-accum 2 and beta > 0 take the old-log-prob, no_sync and reference paths through DDP."""
    over = {"--mode": "gc", "--questions-per-step": 4, "--pairs-per-step": 8, "--max-steps": 2, "--beta": 0.1,
            "--ppo-epochs": 2, "--grad-accum": 2}
    two, one = tmp_path / "two", tmp_path / "one"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    # the launcher users type. On a machine without CUDA, `--multi_gpu` is what starts N processes (torchrun
    # underneath; `--cpu --num_processes 2` runs one process, as accelerate's simple launcher only forks via
    # mpirun); train.py sees WORLD_SIZE=2 without CUDA and forms a gloo group.
    launcher = Path(sys.executable).parent / "accelerate"
    cmd = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_ip", "127.0.0.1",
           "--main_process_port", str(_free_port()), __file__] + base_args(tiny_dir, qspec, two, **over)
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    install_scripted(monkeypatch)
    train.main(base_args(tiny_dir, qspec, one, **over))

    r0, r1 = torch.load(two / "rank0.pt"), torch.load(two / "rank1.pt")
    assert all(torch.equal(r0[k], r1[k]) for k in r0)  # DDP kept the ranks in lockstep
    from transformers import AutoModelForCausalLM
    start = AutoModelForCausalLM.from_pretrained(tiny_dir).state_dict()
    single = AutoModelForCausalLM.from_pretrained(one / "final").state_dict()
    m2, m1 = metrics(two), metrics(one)
    assert [r["step"] for r in m2] == [1, 2]
    state = json.loads((two / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2 and len(state["ranks"]) == 2
    for a, b in zip(m2, m1):
        for k in ("reward/response", "acc/critique", "critic/precision", "frac_reward_zero_std", "cache/size",
                  "len/critique", "update/seqs", "clip_ratio"):
            assert a[k] == b[k], k
        # the global loss and the all-reduced gradient norm (before clipping) agree to float-summation noise:
        # a wrong normaliser on either side would show here (Adam would hide it in the parameters)
        for k, rel in (("loss", 1e-4), ("grad_norm", 1e-4), ("kl", 1e-3), ("entropy", 1e-4)):
            assert a[k] == pytest.approx(b[k], rel=rel), k
    # parameters: the same update up to that noise, which Adam amplifies where a gradient is ~0 (4 steps of
    # lr 1e-3 move each weight by <= 4e-3; the ranks differ from one process by < 1e-4)
    for k in single:
        moved = float((single[k] - start[k]).abs().max())
        assert torch.allclose(r0[k], single[k], rtol=0, atol=0.05 * moved), k
    assert any(not torch.equal(single[k], start[k]) for k in single)
