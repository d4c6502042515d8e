"""experiment.py: the method table's train.py command lines, resuming a grid, the report from hand-written run
dirs, the statistics against hand-computed values, and one tiny grid through real subprocesses."""
import json
import shutil
import sys

import pytest

import experiment as ex
from conftest import make_model, make_tokenizer

PY, TRAIN, EVAL = sys.executable, str(ex.HERE / "train.py"), str(ex.HERE / "eval.py")
SIZES = ["--mixed-precision", "bf16", "--num-generations", "4", "--pairs-per-step", "4", "--critiques-per-pair", "4",
         "--max-completion-length", "96", "--max-critique-length", "128", "--static-questions", "32",
         "--static-k", "4", "--grad-accum", "4", "--prompt-style", "plain"]


def parse(root, *argv):  # bf16 spelled out: "auto" depends on the machine (test_auto_precision below)
    return ex.build_parser().parse_args([str(root), "--dtype", "bf16", "--mixed-precision", "bf16"] + list(argv))


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_only_where_the_hardware_has_it(tmp_path, monkeypatch, capsys, native):
    """On a CPU without AVX512-BF16 / AMX, bf16 is emulated (~30x slower than fp32): auto means fp32 there.
    Explicit flags are kept; a grid run in bf16 is not continued in fp32 (its settings say which)."""
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    args = ex.build_parser().parse_args([str(tmp_path)])
    assert (args.dtype, args.mixed_precision) == ("auto", "auto")
    ex.resolve_auto_precision(args)
    assert (args.dtype, args.mixed_precision) == (("bf16", "bf16") if native else ("fp32", "no"))
    explicit = ex.build_parser().parse_args([str(tmp_path), "--dtype", "bf16", "--mixed-precision", "bf16"])
    ex.resolve_auto_precision(explicit)
    assert (explicit.dtype, explicit.mixed_precision) == ("bf16", "bf16")
    write(tmp_path / "grid.json", json.dumps({"settings": {k: v for k, v in vars(explicit).items()
                                                           if k not in ex.NOT_SETTINGS}}))
    rc = ex.main([str(tmp_path), "--methods", "gc", "--dry-run"])
    if native:
        assert rc == 0
    else:
        assert rc == 1 and "--dtype 'bf16' then, 'fp32' now" in capsys.readouterr().err


# ----------------------------------------------------------------------------- command lines


def test_method_table_gives_the_documented_train_commands(tmp_path):
    args = parse(tmp_path, "--methods", "gc-random-reweight,c", "--seeds", "3", "--train-args", "--beta", "1e-3")
    start = str(tmp_path / "sft" / "final")
    common = ["--model", start, "--data", "arith:1", "--limit", "256"]
    rest = ["--max-steps", "12", "--questions-per-step", "4", "--lr", "5e-06"]
    assert ex.rl_argv(args, "gc-random-reweight", 3) == (
        [PY, TRAIN, "--mode", "gc", "--pair-filter", "random", "--critique-reward", "reweight", "--group-mode",
         "question"] + common
        + ["--seed", "3"] + rest + ["--out", str(tmp_path / "gc-random-reweight" / "seed3")] + SIZES
        + ["--save-every", "5", "--beta", "1e-3"])  # a checkpoint every 5% of the steps, at least 5 apart
    assert ex.rl_argv(args, "c-dynamic", 0, resume=True) == (
        [PY, TRAIN, "--mode", "c", "--pairs", "dynamic", "--group-mode", "question"] + common + ["--seed", "0"] + rest
        + ["--out", str(tmp_path / "c-dynamic" / "seed0")] + SIZES
        + ["--save-every", "5", "--resume", "auto", "--beta", "1e-3"])
    assert ex.METHODS["gc-denoise"] == ["--mode", "gc", "--denoise", "1"]
    # the A/A control: GC-RL's command with the same --seed (question order) and other sampling seeds
    gc, aa = ex.rl_argv(args, "gc", 3), ex.rl_argv(args, "gc-aa", 3)
    gc[gc.index("--out") + 1] = str(tmp_path / "gc-aa" / "seed3")
    assert aa == gc[:4] + ["--sampling-seed-offset", "1"] + gc[4:]
    assert ex.METHODS["gc-precision"][-2:] == ["--critique-reward", "precision"]
    # the grouping finding: a method's own --group-mode, else the grid's (--group-mode, default question)
    assert ex.rl_argv(args, "gc-per-prompt", 3)[2:6] == ["--mode", "gc", "--group-mode", "per-prompt"]
    assert ex.rl_argv(args, "gc-shared", 3).count("--group-mode") == 1
    pp = parse(tmp_path, "--group-mode", "per-prompt")
    assert ex.rl_argv(pp, "gc", 3)[2:6] == ["--mode", "gc", "--group-mode", "per-prompt"]
    # the cold start: one SFT run, the shared seed; every eval: the same flags and seed
    assert ex.sft_argv(args) == [PY, TRAIN, "--mode", "sft", "--model", "smollm2-135m", "--data",
                                 f"jsonl:{tmp_path / 'cold_start.jsonl'}", "--out", str(tmp_path / "sft"),
                                 "--max-steps", "24", "--questions-per-step", "8", "--lr", "5e-05", "--seed", "0"] \
        + SIZES + ["--save-every", "5", "--beta", "1e-3"]
    out = tmp_path / "c" / "seed3" / "eval.json"
    assert ex.eval_argv(args, tmp_path / "c" / "seed3" / "final", "c/seed3", out) == [
        PY, EVAL, "--model", str(tmp_path / "c" / "seed3" / "final"), "--data", "arith:1",
        "--critique-data", f"jsonl:{tmp_path / 'critique_test.jsonl'}", "--limit", "256", "--k", "2",
        "--max-new-tokens", "96", "--critique-max-new-tokens", "128", "--k-ref", "1", "--dtype", "bf16",
        "--seed", "0", "--batch", "256", "--prompt-style", "plain", "--no-selection", "--label", "c/seed3",
        "--out", str(out)]
    # the refinements of the denoised reward: only in the evals of the methods a claim reads it of
    g_eval = ex.eval_argv(args, tmp_path / "g" / "seed3" / "final", "g/seed3", out)
    assert g_eval[g_eval.index("--k-ref") + 1] == "0" and "g" not in ex.READS_DENOISED
    # --static-pairs reaches static C-RL only
    (tmp_path / "p.jsonl").write_text("")
    args = parse(tmp_path, "--static-pairs", str(tmp_path / "p.jsonl"))
    assert "--static-pairs" in ex.rl_argv(args, "c", 0) and "--static-pairs" in ex.rl_argv(args, "c-denoise", 0)
    assert "--static-pairs" not in ex.rl_argv(args, "c-dynamic", 0) + ex.rl_argv(args, "gc", 0)


def test_plan_order_and_critique_set(tmp_path):
    args = parse(tmp_path, "--methods", "g,gc", "--seeds", "0,1", "--with-base", "--critique-questions", "64")
    names = [s["name"] for s in ex.plan(args)]
    assert names == ["sft train", "critique test set", "sft eval", "base eval", "g/seed0 train", "g/seed0 eval",
                     "gc/seed0 train", "gc/seed0 eval", "g/seed1 train", "g/seed1 eval", "gc/seed1 train",
                     "gc/seed1 eval"]
    crit = ex.plan(args)[1]["argv"]
    assert crit[:4] == [PY, str(ex.HERE / "teacher.py"), "--out", str(tmp_path / "critique_test.jsonl")]
    assert crit[crit.index("--limit") + 1] == "64"
    assert crit[crit.index("--model") + 1] == str(tmp_path / "sft" / "final")


def test_bad_flags_name_themselves(tmp_path, capsys):
    with pytest.raises(SystemExit):
        ex.main([str(tmp_path), "--methods", "gc,grl"])
    err = capsys.readouterr().err
    assert "--methods" in err and "grl" in err and "gc-random-reweight" in err  # lists the valid names
    with pytest.raises(SystemExit):
        ex.main([str(tmp_path), "--seeds", "0,x"])
    assert "--seeds" in capsys.readouterr().err
    assert ex.main([str(tmp_path / "none"), "--report"]) == 1
    assert "no such directory" in capsys.readouterr().err


def test_dry_run_prints_commands_and_runs_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ex, "launch", lambda *a: pytest.fail("--dry-run launched a run"))
    root = tmp_path / "grid"
    assert ex.main([str(root), "--methods", "gc-static", "--seeds", "0", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "--mode gc --pairs static" in out and "teacher.py --out" in out and "cold_start.jsonl" in out
    assert not root.exists()


# ----------------------------------------------------------------------------- resuming


def fake_eval(greedy, crit, denoised=None, **gen):
    """A hand-written eval.json: greedy 0/1 per question; crit (label, verdict) per critique."""
    correct = [int(v == ("right" if y else "wrong")) for y, v in crit]
    tp = sum(1 for y, v in crit if y and v == "right")
    called = sum(1 for _, v in crit if v == "right")
    pos = sum(1 for y, _ in crit if y)
    prec, rec = (tp / called if called else None), (tp / pos if pos else None)
    f1 = 2 * prec * rec / (prec + rec) if prec and rec else None
    g = dict(accuracy=sum(greedy) / len(greedy), mean_accuracy=None, majority_accuracy=None)
    g.update(gen)
    items = dict(question_ids=[f"q{i}" for i in range(len(greedy))], greedy=greedy, samples=None, majority=None,
                 critique=[dict(pair=i, question=f"q{i // 2}", label=y, verdict=v, correct=c)
                           for i, ((y, v), c) in enumerate(zip(crit, correct))])
    if denoised is not None:
        for x, d in zip(items["critique"], denoised):
            x["denoised"] = d
    c = dict(accuracy=sum(correct) / len(crit), precision=prec, recall=rec, f1=f1,
             wrong_rate=sum(v == "wrong" for _, v in crit) / len(crit),
             denoised_reward=sum(denoised) / len(denoised) if denoised else None)
    return dict(model="m", data="arith:1", generation=g, critique=c, selection={}, items=items)


def write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)


CRIT4 = [(True, "right"), (False, "wrong"), (True, "wrong"), (False, "wrong")]


def test_resumed_grid_skips_finished_runs_and_evals(tmp_path, monkeypatch, capsys):
    root = tmp_path / "grid"
    for f in ("cold_start.jsonl", "critique_test.jsonl", "sft/final/config.json", "g/seed0/final/config.json"):
        write(root / f, "{}")
    for d in ("sft", "g/seed0"):
        write(root / d / "eval.json", fake_eval([1, 0], CRIT4))
    (root / "gc" / "seed0" / "checkpoint-2").mkdir(parents=True)  # gc: interrupted after step 2
    launched = []

    def fake_launch(argv, log, label):
        launched.append((label, argv))
        return dict(rc=0, wall_s=2.0, peak_rss_mib=512.0, interrupted=False)

    monkeypatch.setattr(ex, "launch", fake_launch)
    assert ex.main([str(root), "--methods", "g,gc", "--seeds", "0"]) == 0
    assert [label for label, _ in launched] == ["gc/seed0 train", "gc/seed0 eval"]
    assert launched[0][1][-2:] == ["--resume", "auto"]  # continued from its checkpoint
    assert json.loads((root / "gc" / "seed0" / "run.json").read_text())["train"]["attempts"] == 1
    out = capsys.readouterr().out
    assert "skip sft train: done" in out and "skip g/seed0 eval: done" in out
    assert (root / "results.md").is_file()
    # a second invocation with one more seed runs only that seed
    launched.clear()
    write(root / "gc/seed0/final/config.json", "{}")
    write(root / "gc/seed0/eval.json", fake_eval([1, 1], CRIT4))
    assert ex.main([str(root), "--methods", "g,gc", "--seeds", "0,1"]) == 0
    assert [label for label, _ in launched] == ["g/seed1 train", "g/seed1 eval", "gc/seed1 train", "gc/seed1 eval"]
    assert "--resume" not in launched[0][1]
    # a run with its final model and every eval needs no checkpoint any more: pruned (it kept 2 GiB each), final kept
    assert not list((root / "gc" / "seed0").glob("checkpoint-*")) and (root / "gc/seed0/final/config.json").is_file()
    grid = json.loads((root / "grid.json").read_text())
    assert grid["methods"] == {"g": [0, 1], "gc": [0, 1]} and len(grid["commands"]) == 2
    # other sizes on the same dir would mix incomparable runs: refused, naming the flag
    assert ex.main([str(root), "--methods", "gc", "--rl-steps", "5"]) == 1
    assert "--rl-steps 12 then, 5 now" in capsys.readouterr().err


def test_a_fresh_clone_with_only_the_results_resumes(tmp_path, monkeypatch):
    """What a clone carries: evals and data, no models. Finished runs are not retrained; the cold start is
    retrained only when a run still needs it."""
    root = tmp_path / "grid"
    for f in ("cold_start.jsonl", "critique_test.jsonl"):
        write(root / f, "{}")
    for d in ("sft", "g/seed0", "gc/seed0"):
        write(root / d / "eval.json", fake_eval([1, 0], CRIT4))
    launched = []
    monkeypatch.setattr(ex, "launch", lambda argv, log, label: launched.append(label) or
                        dict(rc=0, wall_s=1.0, peak_rss_mib=1.0, interrupted=False))
    assert ex.main([str(root), "--methods", "g,gc", "--seeds", "0"]) == 0
    assert launched == []
    assert ex.main([str(root), "--methods", "g,gc", "--seeds", "0,1"]) == 0
    assert launched == ["sft train", "g/seed1 train", "g/seed1 eval", "gc/seed1 train", "gc/seed1 eval"]


def test_a_retrained_cold_start_that_differs_stops_the_grid(tmp_path, monkeypatch, capsys):
    """A clone retrains the cold start for a new seed; on another machine it can come out different (bf16
    kernels differ), and runs from it would be paired with runs from the old one. Its SFT losses must equal the
    committed ones, or the grid stops before any run uses it, keeping the old record."""
    root = tmp_path / "grid"
    for f in ("cold_start.jsonl", "critique_test.jsonl"):
        write(root / f, "{}")
    for d in ("sft", "gc/seed0"):
        write(root / d / "eval.json", fake_eval([1, 0], CRIT4))
    committed = '{"step": 1, "loss": 1.677729, "grad_norm": 6.78}\n{"step": 2, "loss": 1.17, "grad_norm": 4.8}\n'
    write(root / "sft/metrics.jsonl", committed)
    retrain = {"text": committed}
    launched = []

    def fake_launch(argv, log, label):
        launched.append(label)
        if label == "sft train":
            write(root / "sft/metrics.jsonl", retrain["text"])
            write(root / "sft/final/config.json", "{}")
        return dict(rc=0, wall_s=1.0, peak_rss_mib=1.0, interrupted=False)

    monkeypatch.setattr(ex, "launch", fake_launch)
    # the same losses: the same cold start, the grid goes on
    assert ex.main([str(root), "--methods", "gc", "--seeds", "0,1"]) == 0
    assert launched == ["sft train", "gc/seed1 train", "gc/seed1 eval"]
    # other losses at step 1: stopped before gc/seed2 trains, naming the step; old record kept, new weights gone
    shutil.rmtree(root / "sft/final")
    launched.clear()
    retrain["text"] = committed.replace("1.677729", "1.677953")
    assert ex.main([str(root), "--methods", "gc", "--seeds", "0,1,2"]) == 1
    err = capsys.readouterr().err
    assert launched == ["sft train"]
    assert "not the one this grid's results came from" in err and "(1, 1.677729, 6.78)" in err
    assert "(1, 1.677953, 6.78)" in err and "new DIR" in err
    assert (root / "sft/metrics.jsonl").read_text() == committed
    assert "1.677953" in (root / "sft/metrics.retrained.jsonl").read_text()
    assert not (root / "sft/final").exists()


def test_failed_run_stops_the_grid_naming_its_log(tmp_path, monkeypatch, capsys):
    root = tmp_path / "grid"
    write(root / "cold_start.jsonl", "{}")
    calls = []

    def failing(argv, log, label):
        calls.append(label)
        write(log, "Traceback ...\nValueError: boom\n")
        return dict(rc=3, wall_s=1.0, peak_rss_mib=100.0, interrupted=False)

    monkeypatch.setattr(ex, "launch", failing)
    assert ex.main([str(root), "--methods", "gc"]) == 1
    err = capsys.readouterr().err
    assert calls == ["sft train"]
    assert f"sft train failed (exit code 3); its log: {root / 'sft' / 'train.log'}" in err and "boom" in err
    assert json.loads((root / "sft" / "run.json").read_text())["train"]["rc"] == 3


def test_launch_logs_output_and_measures_the_child(tmp_path):
    log = tmp_path / "x" / "train.log"
    res = ex.launch([sys.executable, "-c", "import sys; print('hello'); sys.exit(3)"], log, "x")
    assert res["rc"] == 3 and res["wall_s"] >= 0 and res["peak_rss_mib"] > 0 and not res["interrupted"]
    text = log.read_text()
    assert text.startswith("\n$ ") and "hello" in text


# ----------------------------------------------------------------------------- the report


def test_report_from_hand_written_run_dirs(tmp_path, capsys):
    root = tmp_path / "grid"
    grid = dict(methods={"g": [0, 1, 2], "gc": [0, 1, 2], "c": [0, 1, 2], "gc-static": [0]},
                commands=["python experiment.py grid --methods g,gc,c,gc-static --seeds 0,1,2"])
    write(root / "grid.json", grid)
    ten = lambda k: [1] * k + [0] * (10 - k)  # noqa: E731  10 questions, k right
    right = [(True, "right"), (False, "wrong")] * 2  # 4 critiques, all correct
    wrong = [(True, "wrong"), (False, "right")] * 2  # all incorrect
    write(root / "sft" / "eval.json", fake_eval(ten(2), wrong))
    for s, k in ((0, 4), (1, 5), (2, 6)):
        write(root / "g" / f"seed{s}" / "eval.json", fake_eval(ten(k), wrong))
    for s, k in ((0, 5), (1, 7)):  # gc seed 2 never ran
        write(root / "gc" / f"seed{s}" / "eval.json", fake_eval(ten(k), right, denoised=[0.8, 0.7, 0.8, 0.7]))
        rows = [{"step": i + 1, "critic/wrong_rate": w} for i, w in enumerate([[1.0, 0.8, 0.6], [0.9, 0.7, 0.5]][s])]
        write(root / "gc" / f"seed{s}" / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    for s, k in ((0, 3), (1, 4), (2, 5)):
        write(root / "c" / f"seed{s}" / "eval.json", fake_eval(ten(k), wrong, denoised=[0.0, 0.0, 0.0, 0.0]))
    write(root / "gc" / "seed0" / "run.json", {"train": dict(wall_s=60.0, peak_rss_mib=2048.0, attempts=1),
                                               "eval": dict(wall_s=30.0, peak_rss_mib=1024.0, attempts=1)})
    assert ex.main([str(root), "--report"]) == 0
    md = (root / "results.md").read_text()
    assert "python experiment.py grid --methods g,gc,c,gc-static --seeds 0,1,2" in md.split("## ")[0]
    table1 = md.split("## Table 1")[1].split("\n## ")[0]
    cells = [[c.strip() for c in line.strip().strip("|").split(" | ")] for line in table1.splitlines()
             if line.startswith("| ")]
    rows = {c[0]: c[1:] for c in cells}
    # generation greedy: g 0.4/0.5/0.6 -> 50.0 ± 4.303 * 0.1 / sqrt 3; gc 0.5/0.7 of 3 seeds -> 60.0 ± 12.706 * 0.1
    assert rows["G-RL"][0] == "50.0 ± 24.8 (3 seeds)"
    assert rows["GC-RL"][0] == "60.0 ± 127.1 (2/3 seeds; missing 2)"
    assert rows["C-RL"][0] == "40.0 ± 24.8 (3 seeds)"
    assert rows["w/o RL (cold start)"][0] == "20.0"
    assert rows["GC-RL"][3] == "100.0 ± 0.0 (2/3 seeds; missing 2)"  # critique accuracy
    assert rows["C-RL"][4].startswith("– (0/3 seeds")  # F1 undefined (precision 0)
    assert rows["GC-RL"][6] == "0.750 ± 0.000 (2/3 seeds; missing 2)"  # denoised reward (Table 5)
    claims = {line.split(" | ")[0].strip("| "): line for line in md.splitlines() if "(Table" in line or "(§" in line}
    cols = lambda line: [c.strip() for c in line.strip().strip("|").split(" | ")][3:]  # noqa: E731
    # per seed, mean [CI], seeds used, verdict, MDE, the paper's effect, seeds for it
    gen = cols(claims["GC-RL generates better than G-RL (Table 1)"])  # seeds 0, 1: 0.5 - 0.4, 0.7 - 0.5
    assert gen[:4] == ["+10.0, +20.0", "+15.0 [-48.5, +78.5]", "2: 0, 1 (one method only: 2)",
                       "too few seeds (2 usable, 3 needed)"]  # 15 +- 12.706 * 0.0707: never a verdict on 2
    assert gen[5] == "+2.2" and int(gen[6]) > 3  # the paper's Table 1 gain and the seeds this spread needs
    one = cols(claims["C-RL generates better than the cold start (Table 1)"])  # 3, 4, 5 vs 2 of 10 right
    assert one[:4] == ["+10.0, +20.0, +30.0", "+20.0 [-4.8, +44.8]", "3: 0, 1, 2", "inconclusive"]
    assert float(one[4]) > 24.8  # the MDE beside an inconclusive claim: above the CI half-width
    crit = cols(claims["GC-RL critiques better than C-RL (Table 1)"])
    assert crit[0] == "+100.0, +100.0" and crit[3].startswith("too few seeds")
    den = cols(claims["GC-RL's denoised critique reward is above C-RL's (Table 5)"])  # 0.75 on both seeds
    assert den == ["+0.750, +0.750", "+0.750 [+0.750, +0.750]", "2: 0, 1 (one method only: 2)",
                   "too few seeds (2 usable, 3 needed)", "–", "+0.019", "–"]  # no spread: no MDE to give
    assert "not run: GC-RL, static pairs" in claims["GC-RL: dynamic pairs beat static ones (critique) (§5.3, Fig. 4)"]
    untested = [line for line in md.splitlines() if line.startswith("Not tested by this grid")][0]
    assert "the filter beats random sampling (generation) (Table 2)" in untested and "Eq. 5 raises" in untested
    assert "GC-RL critiques better" not in untested and "A/A control" in untested
    # static vs dynamic: gc-static is in the grid, so the section is there; its training "wrong" rate columns
    static = md.split("## Static vs dynamic")[1].split("\n## ")[0]
    assert "| GC-RL, static pairs | not run | not run | not run | not run | not run |" in static
    static_gc = [line for line in static.splitlines() if line.startswith("| GC-RL |")][0]
    assert static_gc.endswith("| 95.0 ± 63.5 (2/3 seeds; missing 2) | 55.0 ± 63.5 (2/3 seeds; missing 2) |")
    assert rows["GC-RL"][-1] == "0/2" and rows["C-RL"][-1] == "0/3" and rows["w/o RL (cold start)"][-1] == "no"
    assert "## Table 2" not in md and "## Reward steering" not in md  # no such method in the grid
    assert "Grid total: 1.5 min" in md and "2.0 GiB" in md
    assert sorted(p.name for p in (root / "plots").iterdir()) == ["static_vs_dynamic.png", "table1.png"]
    assert "## Table 1" in capsys.readouterr().out


# ----------------------------------------------------------------------------- eval progress bars


def test_progress_callback_does_not_change_samples(tokenizer):
    """The eval's progress bars hang on rollout.Sampler.generate's callback: the samples are the same."""
    import rollout
    model = make_model(vocab_size=len(tokenizer))
    sampler = rollout.Sampler(model, max_batch=4, max_len=64)
    prompts = [tokenizer.encode(f"q{i}") for i in range(5)]
    plain = sampler.generate(prompts, n=2, max_new_tokens=5, seed=3)
    seen = []
    again = sampler.generate(prompts, n=2, max_new_tokens=5, seed=3, progress=lambda d, t: seen.append((d, t)))
    assert [o["tokens"] for o in again] == [o["tokens"] for o in plain]
    assert seen == [(0, 10), (4, 10), (8, 10), (10, 10)]


# ----------------------------------------------------------------------------- a tiny grid, real subprocesses


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    tok = make_tokenizer()
    make_model(vocab_size=len(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_tiny_grid_end_to_end(tiny_dir, tmp_path, monkeypatch, capsys):
    """Cold-start data, SFT, the critique test set, one G-RL step and both evals, each a real train.py /
    eval.py process; then the report; then a rerun that launches nothing."""
    import data
    root = tmp_path / "grid"
    argv = [str(root), "--model", str(tiny_dir), "--methods", "g", "--seeds", "0", "--train-limit", "4",
            "--cold-start-n", "2", "--sft-steps", "1", "--sft-batch", "2", "--rl-steps", "1", "--questions", "2",
            "--num-generations", "2", "--pairs-per-step", "2", "--critiques-per-pair", "2", "--max-new-tokens", "4",
            "--critique-max-new-tokens", "4", "--limit", "2", "--critique-questions", "2", "--k", "2",
            "--grad-accum", "1", "--mixed-precision", "no", "--dtype", "fp32", "--eval-batch", "16",
            "--train-args", "--sampler-batch", "16", "--log-every", "0"]
    assert ex.main(argv) == 0, capsys.readouterr()
    cold = [json.loads(x) for x in (root / "cold_start.jsonl").read_text().splitlines()]
    assert {r["question"] for r in cold}.isdisjoint({r["question"] for r in data.load_data("arith:1", limit=4)})
    for run in (root / "sft", root / "g" / "seed0"):
        assert (run / "final" / "config.json").is_file() and (run / "train.log").is_file()
        res = json.loads((run / "eval.json").read_text())
        assert res["critique"]["n_pairs"] == 4 and len(res["items"]["greedy"]) == 2  # 2 questions, 1 right + 1 wrong
        # --k-ref 1 is asked for, but no claim reads the cold start's or G-RL's denoised reward: no refinements
        assert len(res["items"]["critique"]) == 4 and "denoised" not in res["items"]["critique"][0]
        rec = json.loads((run / "run.json").read_text())
        assert rec["train"]["rc"] == 0 and rec["train"]["peak_rss_mib"] > 0 and rec["eval"]["wall_s"] > 0
    cfg = json.loads((root / "g" / "seed0" / "train_config.json").read_text())
    assert cfg["mode"] == "g" and cfg["seed"] == 0 and cfg["model"] == str(root / "sft" / "final")
    assert len((root / "critique_test.jsonl").read_text().splitlines()) == 4
    md = (root / "results.md").read_text()
    assert "| G-RL | " in md and "(1 seed, no CI)" in md
    out = capsys.readouterr().out
    assert f"$ {sys.executable} {TRAIN} --mode g" in out  # every command printed before it runs
    monkeypatch.setattr(ex, "launch", lambda *a: pytest.fail("a finished grid launched a run"))
    assert ex.main(argv) == 0
