"""eval.py: pure metrics on hand-made inputs, the balanced critique set, --compare / --plot on a run dir,
the JSON schema of an end-to-end eval of a tiny random model, and the bad-input cases."""
import json

import pytest

import eval as ev
import report
import reward
import rollout
from conftest import SHARED, make_model, make_tokenizer, script_sampler

# ----------------------------------------------------------------------------- pure metrics


def test_classification_metrics_hand_counted():
    # idx:       0        1        2        3        4        5     6        7
    verdicts = ["right", "right", "right", "wrong", "wrong", None, "wrong", "wrong"]
    labels = [True, True, False, True, False, True, False, False]
    m = reward.classification_metrics(verdicts, labels)
    # tp = {0,1}, fp = {2}, tn = {4,6,7}, fn = {3,5} (no verdict on a right response is a miss)
    assert (m["tp"], m["fp"], m["tn"], m["fn"], m["n"]) == (2, 1, 3, 2, 8)
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 4)
    assert m["f1"] == pytest.approx(4 / 7)  # 2PR/(P+R) = (2/3)/(7/6)
    assert m["format_rate"] == pytest.approx(7 / 8)
    assert m["wrong_rate"] == pytest.approx(4 / 8)
    assert m["undefined"] == {}


def test_classification_metrics_never_a_verdict():
    m = reward.classification_metrics([None] * 4, [True, False, True, False])
    assert m["format_rate"] == 0.0 and m["wrong_rate"] == 0.0
    assert m["accuracy"] == 0.0  # no verdict counts as a wrong call
    assert m["precision"] is None and "precision" in m["undefined"]  # 0/0 -> null, not ZeroDivisionError
    assert m["recall"] == 0.0  # 0 of 2 right responses called right
    assert m["f1"] is None and "f1" in m["undefined"]


def test_classification_metrics_zero_division_cases():
    # no right responses: recall 0/0
    m = reward.classification_metrics(["wrong", "right"], [False, False])
    assert m["recall"] is None and "recall" in m["undefined"] and m["precision"] == 0.0 and m["accuracy"] == 0.5
    # always inverted: P = R = 0, F1 = 0/0
    m = reward.classification_metrics(["wrong", "right"], [True, False])
    assert m["precision"] == 0.0 and m["recall"] == 0.0 and m["f1"] is None and "f1" in m["undefined"]
    assert reward.classification_metrics(["wrong"], [True])["f1"] is None
    # empty input: everything null, no crash
    e = reward.classification_metrics([], [])
    assert e["accuracy"] is None and e["format_rate"] is None
    with pytest.raises(ValueError):
        reward.classification_metrics(["maybe"], [True])
    with pytest.raises(ValueError):
        reward.classification_metrics(["right"], [True, False])


def test_majority_vote():
    # votes use reward.normalize_answer (tests/test_reward.py), the verifier's own reading of an answer
    assert ev.majority_vote(["18", "18 dollars", "17", "17"]) == ("18", 0)  # 2-2 tie: first seen; "18 dollars" is 18
    assert ev.majority_vote(["17", "$1,000", "1000.0", "1,000"]) == ("1000", 1)
    assert ev.majority_vote(["1/2", "0.5", "\\frac{1}{2}", "2"]) == ("1/2", 0)
    assert ev.majority_vote(["Even", "odd", "\\text{even}"]) == ("even", 0)  # text answers are case-folded
    assert ev.majority_vote(["32,\\! 349", "32349", "7"]) == ("32349", 0)
    assert ev.majority_vote(["7", "18", "$18.00", None, None, None, "7"]) == ("7", 0)  # tie 2-2: first seen
    assert ev.majority_vote([None, "3", "4", "4"]) == ("4", 2)  # None casts no vote (3 Nones would not win)
    assert ev.majority_vote([None, None]) == (None, None)
    assert ev.majority_vote([]) == (None, None)


def test_critique_guided_select_constructed_votes():
    answers = ["5", "7", "7.0", "9"]
    assert ev.critique_guided_select(answers, [1, 2, 0, 2]) == 1  # 2-2 tie: "7" has the bigger cluster
    assert ev.critique_guided_select(answers, [3, 1, 1, 1]) == 0  # votes beat the majority
    assert ev.critique_guided_select(answers, [0, 0, 0, 0]) == 1  # no votes: majority vote, first of cluster
    assert ev.critique_guided_select(["4", "5"], [1, 1]) == 0  # full tie: earlier sample
    assert ev.critique_guided_select([None, "3"], [1, 1]) == 1  # no answer = cluster size 0
    assert ev.critique_guided_select([None, "3"], [2, 1]) == 0  # but votes still win
    assert ev.critique_guided_select([], []) is None
    with pytest.raises(ValueError):
        ev.critique_guided_select(["1"], [])


def _r(answer, correct, votes=0, length=10, truncated=False):
    return dict(answer=answer, correct=correct, right_votes=votes, boxed=answer is not None, length=length,
                truncated=truncated)


def test_selection_metrics_constructed():
    groups = [
        [_r("5", False, 0), _r("7", False, 1), _r("7", False, 1), _r("9", True, 3)],  # votes pick the right one
        [_r("3", True, 0), _r("3", True, 0), _r("4", False, 0)],  # no votes: majority (right)
        [_r(None, False, 0), _r(None, False, 0)],  # nobody answers
        [_r("8", True, 1), _r("6", False, 0)],  # 1-1 vote tie in answers, votes pick the right one
    ]
    s = ev.selection_metrics(groups)
    assert s["n_questions"] == 4 and s["k"] == 4
    assert s["pass_at_1"] == pytest.approx(4 / 11)
    assert s["majority_at_k"] == pytest.approx(2 / 4)  # q0 majority "7" wrong, q1 right, q2 none, q3 "8" (first)
    assert s["critique_selected"] == pytest.approx(3 / 4)
    assert s["pass_at_k"] == pytest.approx(3 / 4)


def test_generation_metrics_constructed():
    greedy = [_r("1", True, length=4), _r(None, False, length=8, truncated=True), _r("3", False, length=6)]
    samples = [[_r("1", True), _r("2", False)], [_r("5", True), _r("5", True)], [_r(None, False), _r("3", False)]]
    g = ev.generation_metrics(greedy, samples)
    assert g["n_questions"] == 3 and g["k"] == 2
    assert g["accuracy"] == pytest.approx(1 / 3)
    assert g["boxed_rate"] == pytest.approx(2 / 3) and g["answer_rate"] == pytest.approx(2 / 3)
    assert g["mean_length"] == pytest.approx(6) and g["truncation_rate"] == pytest.approx(1 / 3)
    assert g["mean_accuracy"] == pytest.approx(3 / 6)
    assert g["majority_accuracy"] == pytest.approx(2 / 3)  # q0 tie -> "1" (right), q1 "5", q2 "3" wrong
    assert g["pass_at_k"] == pytest.approx(2 / 3)
    assert ev.generation_metrics(greedy)["mean_accuracy"] is None


def test_critique_metrics_block_with_denoise_bonus():
    crits = [dict(verdict="right", label=True, bonus=0.1, length=5, truncated=False),
             dict(verdict="wrong", label=False, bonus=0.7, length=7, truncated=False),
             dict(verdict="wrong", label=True, bonus=0.0, length=9, truncated=True),
             dict(verdict=None, label=False, bonus=0.0, length=3, truncated=True)]
    pairs = [dict(label=True), dict(label=False)]
    b = ev.critique_metrics(crits, pairs, "x", c=2, k_ref=1)
    assert tuple(b) == ev.CRIT_KEYS
    assert b["accuracy"] == 0.5 and b["reward"] == pytest.approx(0.35)  # two right calls x 0.7 / 4
    assert b["denoised_reward"] == pytest.approx((0.7 + 0.1 + 0.7 + 0.7) / 4)
    assert b["precision"] == 1.0 and b["recall"] == 0.5 and b["format_rate"] == 0.75 and b["wrong_rate"] == 0.5
    assert b["n_right"] == b["n_wrong"] == 1 and b["n_critiques"] == 4 and b["truncation_rate"] == 0.5
    assert ev.critique_metrics(crits, pairs, "x", c=2, k_ref=0)["denoised_reward"] is None
    assert b["collapsed"] is False  # "wrong" on 2 of 4


@pytest.mark.parametrize("n_wrong,n_right,flag", [(19, 1, True), (18, 2, False), (0, 20, True), (1, 19, True),
                                                 (10, 0, False)])
def test_collapse_flag_on_hand_made_verdicts(n_wrong, n_right, flag):
    """A critic giving one verdict to >= 95% of the critiques has collapsed (no verdict counts for neither)."""
    verdicts = ["wrong"] * n_wrong + ["right"] * n_right + [None] * (20 - n_wrong - n_right)
    crits = [dict(verdict=v, label=i % 2 == 0, length=1, truncated=False) for i, v in enumerate(verdicts)]
    assert ev.critique_metrics(crits, [dict(label=True), dict(label=False)], "x", c=10)["collapsed"] is flag
    assert ev.critique_metrics([], [], "x", c=1)["collapsed"] is None


# ----------------------------------------------------------------------------- balanced critique sets


def test_balanced_pairs_synthetic():
    rows = ([dict(question="q1", response=f"a{i}", label=i < 2) for i in range(3)]
            + [dict(question="q2", response=f"b{i}", label=True) for i in range(3)]  # all right: dropped
            + [dict(question="q3", response=f"c{i}", label=False) for i in range(2)]  # all wrong: dropped
            + [dict(question="q4", response=f"d{i}", label=i == 0) for i in range(3)])
    pairs = ev.balanced_pairs(rows, seed=3)
    assert [p["question"] for p in pairs] == ["q1", "q1", "q4", "q4"]
    assert [p["label"] for p in pairs] == [True, False, True, False]
    assert pairs[0]["response"] in ("a0", "a1") and pairs[1]["response"] == "a2" and pairs[2]["response"] == "d0"
    assert ev.balanced_pairs(pairs, seed=9) == pairs  # already balanced: unchanged
    assert ev.balanced_pairs([r for r in rows if r["question"] in ("q2", "q3")]) == []


def _raw_labels(path):
    """question -> set of is_correct labels, read straight from the gsm8k model-solutions file."""
    out = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        out[row["question"]] = {v["is_correct"] for v in row.values() if isinstance(v, dict) and "is_correct" in v}
    return out


def test_gsm8k_solutions_balanced_set_is_one_to_one():
    path = SHARED / "model_solutions_dev.jsonl"
    pairs = ev.load_critique_set(f"gsm8k-solutions:{path}", seed=0)
    raw = _raw_labels(path)
    both = {q for q, labels in raw.items() if labels == {True, False}}
    assert len(pairs) == 2 * len(both) > 0
    per_q = {}
    for p in pairs:
        per_q.setdefault(p["question"].strip(), []).append(p["label"])
    assert set(per_q) == {q.strip() for q in both}  # only questions with both labels, all of them
    assert all(sorted(v) == [False, True] for v in per_q.values())  # exactly one right and one wrong each
    assert sum(p["label"] for p in pairs) == len(pairs) // 2
    assert ev.load_critique_set(f"gsm8k-solutions:{path}", seed=0, limit=5) == pairs[:10]


# ----------------------------------------------------------------------------- --compare and --plot


def _fake_result(label, data, gen_acc, crit_acc, source=None, denoised=None):
    return {"model": f"runs/{label}/final", "data": data, "critique_data": None, "label": label,
            "generation": dict(ev.null_block(ev.GEN_KEYS, None), accuracy=gen_acc, majority_accuracy=gen_acc),
            "critique": dict(ev.null_block(ev.CRIT_KEYS, None), source=source or f"self:{data}", accuracy=crit_acc,
                             denoised_reward=denoised),
            "selection": ev.null_block(ev.SEL_KEYS, "skipped"), "config": {}}


METRIC_ROWS = [
    {"step": 1, "reward/response": 0.1, "acc/response": 0.1, "reward/critique": 0.35, "critic/precision": 0.5,
     "critic/recall": 0.4, "critic/wrong_rate": 0.6, "len/response": 50, "len/critique": 80, "kl": 0.0,
     "frac_reward_zero_std": 0.5},
    {"step": 2, "reward/response": 0.3, "acc/response": 0.3, "reward/critique": 0.45, "critic/precision": 0.6,
     "critic/recall": 0.5, "critic/wrong_rate": 0.5, "len/response": 48, "len/critique": 70, "kl": 0.01,
     "frac_reward_zero_std": 0.25, "time/rollout1": 3.0, "time/update": 2.0, "eval/acc/response": 0.2},
]


def _fake_run(tmp_path, name, rows, results):
    run = tmp_path / name
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    for i, res in enumerate(results):
        (run / f"eval-{i}.json").write_text(json.dumps(res))
    return run


def test_compare_table_from_run_dirs(tmp_path, capsys):
    gc = _fake_run(tmp_path, "gc", METRIC_ROWS, [_fake_result("GC-RL", "arith", 0.5, 0.75, denoised=0.9),
                                                  _fake_result("GC-RL", "gsm8k:/x/test_dev.jsonl", 0.25, 0.625)])
    g = _fake_run(tmp_path, "g", METRIC_ROWS, [_fake_result("G-RL", "arith", 0.375, None)])
    loose = tmp_path / "sft.json"
    loose.write_text(json.dumps(_fake_result(None, "arith", 0.125, 0.5)))
    assert ev.main(["--compare", str(g), str(gc), str(loose)]) == 0
    out = capsys.readouterr().out
    assert "**Generation accuracy (greedy, %)**" in out and "**Critique accuracy (balanced, %)**" in out
    assert "| method | arith | gsm8k:test_dev | Avg |" in out
    assert "| GC-RL | 50.0 | 25.0 | 37.5 |" in out
    assert "| G-RL | 37.5 | – | – |" in out  # missing dataset: no average
    assert "| sft | 12.5 | – | – |" in out  # row label from the file name when the JSON has none
    crit = out.split("**Critique accuracy")[1].split("**")[1]
    assert "| GC-RL | 75.0 | 62.5 | 68.8 |" in crit and "G-RL" not in crit  # a row with no critique numbers is left out
    assert "**Denoised critique reward (Table 5)**" in out and "| GC-RL | 0.900 |\n" in out  # columns per block
    assert "selection" not in out.lower()  # every selection value null: block left out


def test_plot_run_dir(tmp_path, capsys):
    run = _fake_run(tmp_path, "gc", METRIC_ROWS + ["{not json"], [])
    assert ev.main(["--plot", str(run)]) == 0
    pngs = {p.name for p in (run / "plots").glob("*.png")}
    assert {"reward.png", "critic.png", "length.png", "kl.png", "frac_zero_std.png", "time.png", "eval.png"} <= pngs
    assert all((run / "plots" / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in pngs)
    assert "skipped 1 unreadable line" in capsys.readouterr().out
    g_rows = [{k: v for k, v in r.items() if "critic" not in k} for r in METRIC_ROWS]  # a G-RL run
    written = report.plot_run(_fake_run(tmp_path, "g", g_rows, []))
    assert "critic.png" not in {p.name for p in written} and "reward.png" in {p.name for p in written}


# ----------------------------------------------------------------------------- end to end + bad input


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    tok = make_tokenizer()
    make_model(vocab_size=len(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    return d


FAST = ["--max-new-tokens", "6", "--critique-max-new-tokens", "6", "--batch", "16"]


def test_end_to_end_json_schema(tiny_dir, tmp_path, capsys):
    out = tmp_path / "res.json"
    argv = ["--model", str(tiny_dir), "--data", "arith", "--limit", "4", "--k", "2", "--out", str(out)] + FAST
    assert ev.main(argv) == 0
    res = json.loads(out.read_text())
    assert set(res) >= {"model", "data", "generation", "critique", "selection", "config"}
    assert res["model"] == str(tiny_dir) and res["data"] == "arith"
    assert tuple(res["generation"]) == ev.GEN_KEYS
    assert tuple(res["critique"]) == ev.CRIT_KEYS and tuple(res["selection"]) == ev.SEL_KEYS
    g = res["generation"]
    assert g["n_questions"] == 4 and g["k"] == 2 and 0 <= g["accuracy"] <= 1 and 1 <= g["mean_length"] <= 6
    # a random model gets nothing right: no question has both labels -> empty set, null metrics with a reason
    assert res["critique"]["accuracy"] is None and "empty balanced critique set" in res["critique"]["reason"]
    s = res["selection"]
    assert s["n_questions"] == 4 and s["k"] == 2 and s["critique_samples"] == 1 and s["reason"] is None
    assert res["config"]["limit"] == 4 and res["config"]["model_path"] == str(tiny_dir)
    printed = capsys.readouterr().out
    assert "-- generation" in printed and "empty balanced critique set" in printed


def test_model_that_never_emits_a_verdict(tiny_dir, tmp_path):
    """A random model on a real (balanced) critique set: format rate 0, accuracy 0, precision null."""
    import critique
    rows = [dict(question=f"What is {i} + 1?", response=f"{i} + 1 = {i + 1 + (j % 2)}. \\boxed{{{i + 1 + (j % 2)}}}",
                 label=j % 2 == 0) for i in range(2) for j in range(2)]
    path = tmp_path / "crit.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(critique.load_critique_data(f"jsonl:{path}")) == 4
    out = tmp_path / "res.json"
    argv = ["--model", str(tiny_dir), "--data", "arith", "--limit", "2", "--k", "0", "--critique-data",
            f"jsonl:{path}", "--out", str(out)] + FAST
    assert ev.main(argv) == 0
    c = json.loads(out.read_text())["critique"]
    assert c["n_pairs"] == 4 and c["n_right"] == c["n_wrong"] == 2 and c["reason"] is None
    assert c["format_rate"] == 0.0 and c["accuracy"] == 0.0 and c["precision"] is None and "precision" in c["undefined"]
    assert c["recall"] == 0.0 and c["reward"] == 0.0


def test_batch_size_changes_no_outcome(tiny_dir, tmp_path):
    """--batch is speed only (experiment.py runs evals at 256 rows): the same seed gives the same items and the
    same per-item outcomes and metrics at 3 rows a chunk as at 64 (samples, critiques and refinements drawn
    per row, prompts prefilled packed or alone)."""
    rows = [dict(question=f"What is {i} + 1?", response=f"{i} + 1 = {i + 1 + (j % 2)}. \\boxed{{{i + 1 + (j % 2)}}}",
                 label=j % 2 == 0, answer=str(i + 1)) for i in range(3) for j in range(2)]
    crit = tmp_path / "crit.jsonl"
    crit.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = {}
    for batch in ("3", "64"):
        out = tmp_path / f"b{batch}.json"
        argv = ["--model", str(tiny_dir), "--data", "arith", "--limit", "5", "--k", "3", "--critique-data",
                f"jsonl:{crit}", "--k-ref", "2", "--critique-samples", "2", "--out", str(out)] + FAST[:4]
        assert ev.main(argv + ["--batch", batch, "--save-samples", str(tmp_path / f"s{batch}.jsonl")]) == 0
        res[batch] = json.loads(out.read_text())
    texts = [[json.loads(x)["text"] for x in (tmp_path / f"s{b}.jsonl").read_text().splitlines()] for b in ("3", "64")]
    assert texts[0] == texts[1] and len(texts[0]) == 5 + 5 * 3 and len(set(texts[0][5:])) > 5  # really sampled
    a, b = res["3"], res["64"]
    assert a["items"] == b["items"] and len(a["items"]["critique"]) == 12 and len(a["items"]["samples"][0]) == 3
    for block in ("generation", "critique", "selection"):
        assert a[block] == b[block]
    assert a["generation"]["mean_length"] > 1 and a["critique"]["n_pairs"] == 6


def test_not_a_model_dir(tmp_path, capsys):
    bad = tmp_path / "not_a_model"
    bad.mkdir()
    (bad / "notes.txt").write_text("hi")
    with pytest.raises(rollout.ModelError, match="not_a_model: not a model directory"):
        rollout.resolve_model(str(bad))
    assert ev.main(["--model", str(bad), "--limit", "1"]) == 2
    assert str(bad) in capsys.readouterr().err
    assert rollout.resolve_model("someone/some-model") == "someone/some-model"  # hub ids pass through
    (bad / "config.json").write_text("{not json")  # a dir that looks like a model but does not load
    assert ev.main(["--model", str(bad), "--limit", "1"]) == 2
    assert "could not load a model from it" in capsys.readouterr().err


def test_resolve_run_and_checkpoint_dirs(tmp_path):
    for sub in ("checkpoint-2/model", "checkpoint-10/model"):
        (tmp_path / "run" / sub).mkdir(parents=True)
        (tmp_path / "run" / sub / "config.json").write_text("{}")
    assert rollout.resolve_model(str(tmp_path / "run")) == str(tmp_path / "run" / "checkpoint-10" / "model")
    assert rollout.resolve_model(str(tmp_path / "run" / "checkpoint-2")) == str(tmp_path / "run/checkpoint-2/model")
    (tmp_path / "run" / "final").mkdir()
    (tmp_path / "run" / "final" / "config.json").write_text("{}")
    assert rollout.resolve_model(str(tmp_path / "run")) == str(tmp_path / "run" / "final")


def test_plot_and_compare_bad_dirs(tmp_path, capsys):
    assert ev.main(["--plot", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text("")
    assert ev.main(["--plot", str(tmp_path)]) == 2
    assert "no metric rows" in capsys.readouterr().err
    assert ev.main(["--compare", str(tmp_path)]) == 2
    assert "no eval*.json" in capsys.readouterr().err
    (tmp_path / "eval.json").write_text(json.dumps({"hello": 1}))
    assert ev.main(["--compare", str(tmp_path)]) == 2
    assert "not an eval.py result" in capsys.readouterr().err


# ----------------------------------------------------------------------------- evaluate() wiring, scripted model


@pytest.fixture
def scripted(monkeypatch):
    """The sampler replaced by scripted responses (generate_many: greedy n=1, samples n=3; a critique request's
    rows say "critique") and critiques: the critic says "right" exactly when the response contains "sure".
    Yields (recs, requests seen by generate_many, critic calls (pairs, m, k_ref, pre-sampled critiques or None))."""
    import critique
    import data
    recs = data.load_data("arith", split="test", limit=2)
    g0, g1 = int(recs[0]["answer"]), int(recs[1]["answer"])
    scripts = {1: [["\\boxed{%d}" % g0], ["no answer"]],  # greedy: q0 right, q1 unanswered
               3: [["\\boxed{%d} sure" % g0, "\\boxed{%d}" % (g0 + 1), "\\boxed{%d}" % (g0 + 1)],
                   ["\\boxed{%d} sure" % (g1 + 2), "\\boxed{%d}" % g1, "\\boxed{%d} sure" % (g1 + 5)]]}
    index = {r["question"]: q for q, r in enumerate(recs)}

    def respond(prompt, request, j):
        if prompt[0] == "critique":
            return "critique"
        assert (request["temperature"] == 0.0) == (request["n"] == 1)
        return scripts[request["n"]][index[prompt]][j]

    seen, calls = script_sampler(monkeypatch, respond), []

    def fake_critic(sampler, tok, pairs, m, scheme="plain", k_ref=0, critiques=None, **gen):
        calls.append((len(pairs), m, k_ref, critiques and [x["text"] for x in critiques]))
        out = []
        for i, p in enumerate(pairs):
            for _ in range(m):
                v = "right" if "sure" in p["response"] else "wrong"
                out.append(dict(pair_index=i, verdict=v, label=p["label"], length=5, truncated=False,
                                bonus=0.1 * k_ref if v == "right" else 0.0))
        return out

    monkeypatch.setattr(critique, "second_order_rollout", fake_critic)
    yield recs, seen, calls


def test_evaluate_wiring_with_a_scripted_model(scripted):
    """evaluate() with the sampler replaced by scripted responses and critiques: every number is hand-known."""
    recs, seen, calls = scripted
    args = ev.build_parser().parse_args(["--data", "arith", "--limit", "2", "--k", "3"])
    res = ev.evaluate(None, None, args, log=lambda *a: None)
    g, c, s = res["generation"], res["critique"], res["selection"]
    assert g["accuracy"] == 0.5 and g["answer_rate"] == 0.5 and g["mean_accuracy"] == pytest.approx(2 / 6)
    assert g["majority_accuracy"] == 0.0 and g["pass_at_k"] == 1.0  # q0 majority g0+1; q1 1-1-1 tie -> first
    assert [[(r["n"], r["seed"]) for r in reqs] for reqs in seen] == [[(1, 0), (3, 1)]]  # greedy, samples: one call
    assert calls == [(6, 1, 0, None)]  # one critique pass over all samples; the self set reuses it
    # self set: q0 right "sure" -> right (TP), q0 wrong -> wrong (TN); q1 right (no "sure") -> wrong (FN),
    # q1 wrong (both "sure") -> right (FP)
    assert c["source"] == "self:arith" and c["n_pairs"] == 4 and c["n_right"] == 2
    assert (c["accuracy"], c["precision"], c["recall"], c["wrong_rate"]) == (0.5, 0.5, 0.5, 0.5)
    assert c["reward"] == pytest.approx(0.35) and c["denoised_reward"] is None
    # votes: q0 [1,0,0] -> the right answer; q1 [1,0,1] -> tie, equal clusters -> first (wrong)
    assert (s["pass_at_1"], s["majority_at_k"], s["critique_selected"], s["pass_at_k"]) == \
        (pytest.approx(2 / 6), 0.0, 0.5, 1.0)
    assert s["greedy"] == 0.5 and s["critique_samples"] == 1
    # per-item outcomes behind those numbers (experiment.py's paired statistics)
    it = res["items"]
    assert it["question_ids"] == [r["id"] for r in recs] and it["greedy"] == [1, 0] and it["majority"] == [0, 0]
    assert it["samples"] == [[1, 0, 0], [0, 1, 0]]
    assert sorted((x["label"], x["verdict"], x["correct"]) for x in it["critique"]) == \
        [(False, "right", 0), (False, "wrong", 1), (True, "right", 1), (True, "wrong", 0)]
    assert [x["question"] for x in it["critique"]] == [recs[0]["question"]] * 2 + [recs[1]["question"]] * 2
    assert [x["pair"] for x in it["critique"]] == [0, 1, 2, 3]
    assert sum(x["correct"] for x in it["critique"]) / 4 == c["accuracy"] and "denoised" not in it["critique"][0]

    calls.clear()
    args = ev.build_parser().parse_args(["--limit", "2", "--k", "3", "--k-ref", "2", "--critique-samples", "2"])
    c = ev.evaluate(None, None, args, log=lambda *a: None)["critique"]
    assert calls == [(6, 2, 0, None), (4, 2, 2, None)]  # denoising needs its own pass with refinements
    assert c["n_critiques"] == 8 and c["samples_per_pair"] == 2
    assert c["denoised_reward"] == pytest.approx((2 * 0.9 + 2 * 0.7 + 0 + 2 * 0.2) / 8)


def test_critique_file_joins_the_first_call(scripted, tmp_path):
    """A --critique-data set needs no earlier output: its critiques are sampled in the generate_many call of the
    greedy answers and samples (the critique budget, temperature and seed), then only judged and refined."""
    recs, seen, calls = scripted
    path = tmp_path / "set.jsonl"
    path.write_text("".join(json.dumps(dict(question=f"q{i}", response=r, label=lab, answer="3")) + "\n"
                            for i in range(2) for r, lab in (("\\boxed{3} sure", True), ("\\boxed{4}", False))))
    args = ev.build_parser().parse_args(["--limit", "2", "--k", "3", "--k-ref", "1", "--no-selection",
                                         "--critique-data", f"jsonl:{path}", "--critique-max-new-tokens", "77"])
    c = ev.evaluate(None, None, args, log=lambda *a: None)["critique"]
    (reqs,) = seen  # one sampler call before the critic
    assert [(r["n"], r["seed"], r["temperature"], r["max_new_tokens"]) for r in reqs] == \
        [(1, 0, 0.0, 256), (3, 1, 1.0, 256), (1, 2, 0.0, 77)]
    assert calls == [(4, 1, 1, ["critique"] * 4)]  # the 4 pairs' critiques from that call, refined once
    assert c["n_pairs"] == 4 and c["accuracy"] == 1.0 and c["denoised_reward"] == pytest.approx((2 * 0.8 + 2 * 0.7) / 4)


def test_empty_critique_file_gives_null_metrics(tiny_dir, tmp_path, capsys):
    path = tmp_path / "all_right.jsonl"
    path.write_text("".join(json.dumps(dict(question=f"q{i}", response="\\boxed{1}", label=True)) + "\n"
                            for i in range(3)))
    out = tmp_path / "res.json"
    argv = ["--model", str(tiny_dir), "--limit", "1", "--k", "0", "--critique-data", f"jsonl:{path}",
            "--out", str(out), "--dtype", "bf16"] + FAST
    assert ev.main(argv) == 0
    res = json.loads(out.read_text())
    c = res["critique"]
    assert c["n_pairs"] == 0 and c["accuracy"] is None and c["precision"] is None
    assert "no question has both" in c["reason"] and tuple(c) == ev.CRIT_KEYS
    assert res["selection"]["reason"].startswith("needs --k >= 2")
    assert "critique metrics are null" in capsys.readouterr().out
    assert res["config"]["dtype"] == "bf16" and res["generation"]["n_questions"] == 1


def test_prompt_style_reaches_every_generation_call(scripted, monkeypatch):
    """--prompt-style picks the generation prompt of the greedy and the sampled responses (plain by default)."""
    import rollout
    recs, seen, _ = scripted
    styles = []
    monkeypatch.setattr(rollout, "generation_prompts", lambda tok, records, style: styles.append(style) or [
        r["question"] for r in records])
    for argv, style in (([], "plain"), (["--prompt-style", "oneshot"], "oneshot")):
        seen.clear(), styles.clear()
        args = ev.build_parser().parse_args(["--limit", "2", "--k", "3", "--no-critique"] + argv)
        assert ev.evaluate(None, None, args, log=lambda *a: None)["generation"]["accuracy"] == 0.5
        assert styles == [style]  # one prompt set, for the greedy answers and the samples
        assert [[r["prompts"] for r in reqs] for reqs in seen] == [[[r["question"] for r in recs]] * 2]
    with pytest.raises(SystemExit):
        ev.build_parser().parse_args(["--prompt-style", "fewshot"])
