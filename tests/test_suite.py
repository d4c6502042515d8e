"""suite.py: the five benchmarks as one eval (Table 1's layout) on fixture benchmarks with a tiny model and with a
scripted one, the critique benchmark's filter and 1:1 balance on scripted responses, and the recipes' commands."""
import json
from pathlib import Path

import pytest

import data
import eval as ev
import experiment as ex
import reward
import suite
from conftest import make_model, make_tokenizer, script_sampler

FIX = Path(__file__).resolve().parent / "data"
SUITE = f"suite:{FIX}"
FAST = ["--max-new-tokens", "6", "--critique-max-new-tokens", "6", "--batch", "16"]
N = dict(math500=4, gsm8k=3, minerva=3, amc23=4, olympiadbench=4)  # fixture questions per benchmark


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    tok = make_tokenizer()
    make_model(vocab_size=len(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def suite_records():
    return {n: data.load_data(s, split="test") for n, s in suite.benchmark_specs(SUITE).items()}


def test_benchmark_specs_local_and_hub(tmp_path):
    specs = suite.benchmark_specs(SUITE)
    assert list(specs) == ["math500", "gsm8k", "minerva", "amc23", "olympiadbench"]
    assert specs["olympiadbench"] == f"olympiadbench:{FIX / 'olympiadbench' / 'train.jsonl'}"  # its only split
    assert specs["gsm8k"] == f"gsm8k:{FIX / 'gsm8k' / 'test.jsonl'}"
    assert suite.benchmark_specs("suite") == {n: n for n in specs}
    assert {n: len(r) for n, r in suite_records().items()} == N
    with pytest.raises(data.DataError, match=r"no local copy of math500; looked for .*math500/test.jsonl"):
        suite.benchmark_specs(f"suite:{tmp_path}")
    assert suite.is_suite("suite") and suite.is_suite(SUITE) and not suite.is_suite("suites")


def scripted_samples():
    """Responses to every fixture question: per (benchmark, question) a right boxed, a wrong boxed and an unboxed
    response, except: a first question with only right answers, a second with no boxed answer."""
    out = []
    for b, recs in suite_records().items():
        for i, r in enumerate(recs):
            right, wrong = f"So \\boxed{{{r['answer']}}}.", "So \\boxed{123456}."
            texts = [right, right] if i == 0 else ["no box here"] if i == 1 else [right, wrong, "The answer is 7"]
            out += [dict(benchmark=b, id=r["id"], question=r["question"], answer=r["answer"], model=f"m{j % 2}",
                         text=t) for j, t in enumerate(texts)]
    return out


def test_critique_bench_filter_and_balance():
    pairs, counts = suite.critique_bench_pairs(scripted_samples(), seed=0)
    for b, n in N.items():
        mixed = n - 2  # questions from the 3rd on have a right and a wrong boxed response
        assert counts[b] == dict(questions=n, responses=2 + 1 + 3 * mixed, unboxed=1 + mixed, no_boxed=1,
                                 all_right=1, all_wrong=0, pairs=2 * mixed), b
    assert len(pairs) == 2 * sum(n - 2 for n in N.values())
    assert [p["label"] for p in pairs] == [True, False] * (len(pairs) // 2)  # one right, one wrong per question
    for p in pairs:
        assert reward.extract_answer(p["response"], ()) is not None  # only boxed responses
        assert reward.is_correct(p["response"], p["answer"], strict=True) == p["label"]
        assert p["benchmark"] in suite.BENCHMARKS and p["id"].startswith(p["benchmark"] + "/")
    assert suite.critique_bench_pairs(scripted_samples(), seed=0)[0] == pairs  # seeded
    # one right and one wrong response from different models make a pair too
    two = [dict(benchmark="amc23", id=i, question=f"q{i}", answer="22", model=m, text=t)
           for i, m, t in (("0", "a", "\\boxed{22}"), ("0", "b", "\\boxed{21}"), ("1", "a", "\\boxed{2}"),
                           ("1", "b", "\\boxed{3}"))]  # q1: all wrong, dropped
    assert [(p["model"], p["label"]) for p in suite.critique_bench_pairs(two)[0]] == [("a", True), ("b", False)]
    assert "| amc23 | 2 | 4 | 0 | 0 / 0 / 1 | 2 |" in suite.counts_table(suite.critique_bench_pairs(two)[1])


def write_critique_bench(path):
    pairs, _ = suite.critique_bench_pairs(scripted_samples())
    data.write_jsonl(path, pairs)
    return pairs


def test_suite_eval_on_a_tiny_model(tiny_dir, tmp_path, capsys):
    crit = tmp_path / "crit.jsonl"
    pairs = write_critique_bench(crit)
    out = tmp_path / "res.json"
    argv = ["--model", str(tiny_dir), "--data", SUITE, "--k", "0", "--critique-data", f"jsonl:{crit}",
            "--label", "tiny", "--out", str(out)] + FAST
    assert ev.main(argv) == 0
    res = json.loads(out.read_text())
    assert list(res["benchmarks"]) == list(suite.BENCHMARKS)
    for b, r in res["benchmarks"].items():
        assert r["generation"]["n_questions"] == N[b] and tuple(r["generation"]) == ev.GEN_KEYS
        assert r["critique"]["n_pairs"] == 2 * (N[b] - 2) and r["critique"]["source"] == f"jsonl:{crit}[{b}]"
    g, c = res["generation"], res["critique"]
    assert g["n_questions"] == sum(N.values()) and g["averaged_over"] == list(suite.BENCHMARKS)
    assert g["accuracy"] == pytest.approx(sum(r["generation"]["accuracy"] for r in res["benchmarks"].values()) / 5)
    assert c["n_pairs"] == len(pairs) and 0 <= c["accuracy"] <= 1
    it = res["items"]
    assert len(it["question_ids"]) == len(it["greedy"]) == sum(N.values()) and it["samples"] is None
    assert it["question_ids"][0] == "math500/test/prealgebra/1001.json"
    assert [x["pair"] for x in it["critique"]] == list(range(len(pairs)))  # offset: one index per pair overall
    head = "| model | M500 | GSM8k | Minerva | AMC23 | Olymp | Avg |"
    assert res["table"].count(head) == 2 and "| tiny |" in res["table"]
    printed = capsys.readouterr().out
    assert head in printed and "Critique accuracy" in printed


def test_suite_table_numbers_with_a_scripted_model(monkeypatch, tmp_path):
    """The policy answers MATH-500 and AMC23 right and nothing else, the critic always says "right": Table 1's
    generation row is 100 / 0 / 0 / 100 / 0, Avg 40.0, and every critique cell 50.0."""
    import critique
    recs = suite_records()
    gold = {r["question"]: r["answer"] for b in ("math500", "amc23") for r in recs[b]}

    def fake_critic(sampler, tok, pairs, m, k_ref=0, **gen):
        return [dict(pair_index=i, verdict="right", label=p["label"], length=4, truncated=False, bonus=0.0)
                for i, p in enumerate(pairs) for _ in range(m)]

    script_sampler(monkeypatch, lambda question, request, j: f"\\boxed{{{gold.get(question, 'zzz')}}}")
    monkeypatch.setattr(critique, "second_order_rollout", fake_critic)
    crit = tmp_path / "crit.jsonl"
    write_critique_bench(crit)
    args = ev.build_parser().parse_args(["--data", SUITE, "--k", "0", "--critique-data", f"jsonl:{crit}"])
    res = suite.combine(suite.evaluate_suite(None, None, args, log=lambda *a: None))
    res["benchmarks"] = suite.evaluate_suite(None, None, args, log=lambda *a: None)
    table = suite.table1({"scripted": res})
    assert "| scripted | 100.0 | 0.0 | 0.0 | 100.0 | 0.0 | 40.0 |" in table
    assert "| scripted | 50.0 | 50.0 | 50.0 | 50.0 | 50.0 | 50.0 |" in table
    assert res["generation"]["accuracy"] == pytest.approx(0.4) and res["critique"]["accuracy"] == pytest.approx(0.5)
    assert res["critique"]["collapsed"] is True  # "right" to every critique of every benchmark
    # a benchmark the critique set lacks: its critique cell is null, Avg over the others, marked
    data.write_jsonl(crit, [p for p in data.read_jsonl(crit) if p["benchmark"] != "minerva"])
    res = dict(benchmarks=suite.evaluate_suite(None, None, args, log=lambda *a: None))
    assert "| scripted | 50.0 | 50.0 | – | 50.0 | 50.0 | 50.0 (4/5) |" in suite.table1({"scripted": res})
    # a critique file without benchmark names is refused, naming the row
    data.write_jsonl(crit, [dict(question="q", response="r", label=True)])
    with pytest.raises(data.DataError, match=r"crit.jsonl row 1: 'benchmark' must be one of"):
        suite.evaluate_suite(None, None, args)


def test_critique_bench_cli_resumes_per_model(monkeypatch, tmp_path):
    import rollout
    sampled = []

    def fake_rollout(sampler, tok, records, n, **gen):
        sampled.append(len(records))
        return [dict(q_index=q, id=r["id"], text=f"\\boxed{{{r['answer'] if j == 0 else 'zzz'}}}", length=3,
                     truncated=False, tokens=[], logprobs=[], prompt_ids=[]) for q, r in enumerate(records)
                for j in range(n)]

    monkeypatch.setattr(ev, "load_model", lambda args: (None, None, "cpu"))
    monkeypatch.setattr(rollout, "Sampler", lambda *a, **k: None)
    monkeypatch.setattr(rollout, "first_order_rollout", fake_rollout)
    out = tmp_path / "bench.jsonl"
    argv = ["critique-bench", "--models", "org/a,b", "--data", SUITE, "--k", "2", "--out", str(out)]
    assert suite.main(argv) == 0
    assert sampled == list(N.values()) * 2  # every benchmark, for each model
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.counts.json", "bench.jsonl",
                                                          "bench.samples-b.jsonl", "bench.samples-org_a.jsonl"]
    pairs, counts = data.read_jsonl(out), json.loads((tmp_path / "bench.counts.json").read_text())
    assert len(pairs) == 2 * sum(N.values()) and counts["gsm8k"]["pairs"] == 2 * N["gsm8k"]
    sampled.clear()
    assert suite.main(argv) == 0 and sampled == []  # both models' samples are kept: nothing is sampled again
    assert data.read_jsonl(out) == pairs


# ----------------------------------------------------------------------------- recipes


def dry(capsys, root, *argv):
    assert ex.main([str(root), "--dry-run"] + list(argv)) == 0
    lines = capsys.readouterr().out.splitlines()
    return [ln[2:] for ln in lines if ln.startswith("$ ")]


def test_recipe_dry_run_commands(tmp_path, capsys):
    cmds = dry(capsys, tmp_path / "r", "--recipe", "qwen2.5-0.5b")
    assert len(cmds) == 10 and not (tmp_path / "r").exists()
    distill, sft, crit, sft_eval, g_train = cmds[:5]
    assert "teacher.py distill --model Qwen/Qwen2.5-0.5B --teacher Qwen/Qwen2.5-7B-Instruct --data dapo-cold" in distill
    assert f"--out {tmp_path / 'r' / 'cold_start.jsonl'}" in distill
    assert "train.py --mode sft --model Qwen/Qwen2.5-0.5B" in sft and "--save-every 6" in sft
    assert "suite.py critique-bench --models Qwen/Qwen2.5-1.5B-Instruct,Qwen/Qwen2.5-7B-Instruct --data suite" in crit
    assert "--k 10" in crit and "--limit 0" in crit
    assert "eval.py --model" in sft_eval and "--data suite --critique-data jsonl:" in sft_eval
    assert "--prompt-style qwen-boxed" in sft_eval and "--limit 0" in sft_eval
    assert "--mode g " in g_train and "--data dapo-rl --limit 0" in g_train and "--save-every 13" in g_train
    assert g_train.endswith("--beta 1e-3 --sampler-batch 320 --max-seq-len 8192")
    assert not any("accelerate launch" in c for c in cmds)
    # 7B: train.py under accelerate launch with FSDP2 on 8 GPUs, the data steps and evals plain python
    cmds = dry(capsys, tmp_path / "r7", "--recipe", "qwen2.5-7b")
    launch = f"accelerate launch --config_file {ex.HERE / 'configs/accelerate/fsdp2.yaml'} --num_processes 8 "
    assert [c.startswith(launch) for c in cmds] == [False, True, False, False] + [True, False] * 3
    assert "--questions-per-step 512" in cmds[4] and "--gradient-checkpointing" in cmds[4]
    # flags after the recipe win; --train-args are merged, the user's last
    cmds = dry(capsys, tmp_path / "r2", "--recipe", "qwen2.5-1.5b", "--rl-steps", "4", "--methods", "gc",
               "--train-args", "--beta", "0")
    assert len(cmds) == 6 and "--max-steps 4" in cmds[4] and cmds[4].endswith("--gradient-checkpointing --beta 0")
    with pytest.raises(SystemExit):
        ex.main([str(tmp_path), "--recipe", "gpt-9"])


def test_teacher_data_follows_the_rl_data(tmp_path, capsys):
    cmds = dry(capsys, tmp_path / "r", "--recipe", "qwen2.5-0.5b", "--data", "dapo-rl:/data/dapo.parquet")
    assert "--data dapo-cold:/data/dapo.parquet" in cmds[0] and "--data dapo-rl:/data/dapo.parquet" in cmds[4]
    with pytest.raises(SystemExit, match="--teacher-data"):
        ex.main([str(tmp_path / "x"), "--dry-run", "--data", "math500", "--teacher", "T"])


def test_estimates_from_shapes():
    params = {m: round(suite.n_params(s) / 1e9, 2) for m, s in suite.SHAPES.items()}
    assert params == {"Qwen/Qwen2.5-0.5B": 0.49, "Qwen/Qwen2.5-1.5B": 1.54, "Qwen/Qwen2.5-7B": 7.62}
    for name in suite.RECIPES:
        e = suite.estimate(name)
        assert 0 < e["memory_gib"] < 80 and e["step_s"] > 0 and e["tokens_trained"] < e["tokens_sampled"]
    e = suite.estimate("qwen2.5-0.5b")
    # 128 questions x 5 responses (250 + 600 tokens) + 64 pairs x 5 critiques (850 + 500): 0.976 M tokens sampled
    assert e["tokens_sampled"] == 128 * 5 * 850 + 64 * 5 * 1350
    assert e["sample_s"] == round(2 * suite.n_params(suite.SHAPES["Qwen/Qwen2.5-0.5B"]) * e["tokens_sampled"]
                                  / (989e12 * 0.05))
    assert suite.estimate_table().count("\n") == 1 + len(suite.RECIPES)
