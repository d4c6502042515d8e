"""The distilled cold start (teacher.py distill): the format / verdict / 1:1 filter and its counts with a scripted
teacher, the orchestration (unboxed responses never reach the teacher), and the CLI writing rows train.py reads."""
import json
from pathlib import Path

import pytest

import reward
import teacher
from data import DataError, load_data

FIX = Path(__file__).resolve().parent / "data"
RECORDS = [dict(id=f"q{i}", question=f"What is {i} + {i}?", answer=str(2 * i)) for i in range(6)]


def right(i):
    return f"{i} + {i} = {2 * i}, so \\boxed{{{2 * i}}}."


def wrong(i):
    return f"{i} + {i} = {2 * i + 1}, so \\boxed{{{2 * i + 1}}}."


def crit(verdict, tail=""):
    return f"Step 1 checks out.\nConclusion: {verdict} [END]{tail}"


def test_critique_format_is_strict():
    assert teacher.critique_format(crit("right")) == "right"
    assert teacher.critique_format(crit("wrong", "\n\nextra words after the end")) == "wrong"  # cut at [END]
    assert teacher.critique_format("  Conclusion:wrong[END]  ") == "wrong"
    for bad in ("Conclusion: right", "Conclusion: correct [END]", "**Conclusion:** right [END]",
                "Conclusion: right, mostly [END]", "the answer is right [END]", "", None):
        assert teacher.critique_format(bad) is None, bad
    assert reward.extract_verdict("Conclusion: right") == "right"  # the RL reward is more lenient than this filter


def test_distill_rows_filter_balance_and_counts():
    # 8 right and 4 wrong responses; the teacher: 2 bad formats, 2 wrong verdicts, 8 kept (5 right, 3 wrong)
    samples = [(i, right(i)) for i in range(6)] + [(0, right(0)), (1, right(1))] + [(i, wrong(i)) for i in range(4)]
    critiques = ([crit("right")] * 4 + ["Conclusion: right", "no conclusion"] + [crit("wrong")] * 2  # 4 kept
                 + [crit("wrong"), crit("right")] + [crit("wrong")] * 2)  # wrong responses: 1 misjudged, 3 kept
    critiques[6] = crit("right")  # a right response judged right: 5 right kept
    critiques[7] = crit("wrong")
    rows, counts = teacher.distill_rows(RECORDS, samples, critiques, seed=0)
    assert counts == dict(critiques=12, format_ok=10, verdict_ok=8, right=3, wrong=3, kept=6, generation=6)
    crit_rows = [r for r in rows if "critique" in r]
    assert len(crit_rows) == 6 and sum(r["label"] for r in crit_rows) == 3
    by_q = {r["question"]: r["answer"] for r in RECORDS}
    for r in crit_rows:
        assert set(r) == {"question", "response", "critique", "label"}
        assert reward.is_correct(r["response"], by_q[r["question"]], strict=True) == r["label"]
        assert teacher.critique_format(r["critique"]) == ("right" if r["label"] else "wrong")
        assert r["critique"].endswith("[END]")
    gen = [r for r in rows if "critique" not in r]
    assert sorted(r["response"] for r in gen) == sorted(right(i) for i in range(6))  # one verified right each
    assert teacher.distill_rows(RECORDS, samples, critiques, seed=0)[0] == rows  # seeded
    assert teacher.distill_rows(RECORDS, samples, critiques, seed=1)[0] != rows
    rows, counts = teacher.distill_rows(RECORDS, samples, critiques, generation=False)
    assert counts["generation"] == 0 and all("critique" in r for r in rows)
    with pytest.raises(ValueError, match="12 responses but 11 critiques"):
        teacher.distill_rows(RECORDS, samples, critiques[:-1])


def test_distill_orchestration_with_a_scripted_teacher():
    seen = {}

    def policy(records, k):
        assert k == 3
        return [[right(i), wrong(i), "I think it is 7."] for i in range(len(records))]

    def scripted_teacher(pairs, records):  # judges by recomputing the answer, as a good teacher would
        seen["pairs"] = list(pairs)
        texts = []
        for q, resp in pairs:
            i = int(q.split()[2])
            texts.append(crit("right" if reward.is_correct(resp, str(2 * i), strict=True) else "wrong"))
        sols = [f"Teacher: \\boxed{{{2 * i}}}" if i % 2 == 0 else "Teacher: no idea" for i in range(len(records))]
        return texts, sols

    rows, counts = teacher.distill(RECORDS, policy, scripted_teacher, k=3, seed=0)
    assert len(seen["pairs"]) == 12 and all("boxed" in r for _, r in seen["pairs"])  # unboxed never reach it
    assert counts == dict(questions=6, responses=18, unboxed=6, critiques=12, format_ok=12, verdict_ok=12, right=6,
                          wrong=6, kept=12, generation=6)
    gen = {r["question"]: r["response"] for r in rows if "critique" not in r}
    assert gen["What is 0 + 0?"].startswith("Teacher:") and gen["What is 1 + 1?"] == right(1)  # teacher's first


def test_distill_cli_writes_rows_train_reads(monkeypatch, tmp_path, tokenizer):
    """The CLI with scripted models: dapo-cold questions, the policy's responses, the teacher's critiques; the file
    is what `train.py --mode sft` reads (sft.examples), with the counts beside it."""
    import critique
    import data
    import eval as ev
    import rollout
    import sft
    monkeypatch.setattr(data, "DAPO_COLD", 4)
    recs = load_data(f"dapo-cold:{FIX / 'dapo' / 'train.jsonl'}")
    loaded = []

    def fake_load(args):
        loaded.append(args.model)
        return args.model, None, "cpu"

    def fake_rollout(sampler, tok, records, n, **gen):
        return [dict(q_index=q, id=r["id"], text=f"\\boxed{{{r['answer'] if j == 0 else '0'}}}", length=3,
                     truncated=False, tokens=[], logprobs=[], prompt_ids=[]) for q, r in enumerate(records)
                for j in range(n)]

    def fake_critic(sampler, tok, pairs, m, **gen):
        assert sampler == "T" and m == 1 and gen["temperature"] == 0.0
        gold = {r["question"]: r["answer"] for r in recs}
        return [dict(text=crit("right" if reward.is_correct(p["response"], gold[p["question"]]) else "wrong"))
                for p in pairs]

    monkeypatch.setattr(ev, "load_model", fake_load)
    monkeypatch.setattr(rollout, "Sampler", lambda model, **k: model)
    monkeypatch.setattr(rollout, "first_order_rollout", fake_rollout)
    monkeypatch.setattr(critique, "second_order_rollout", fake_critic)
    out = tmp_path / "cold.jsonl"
    counts = teacher.distill_main(["--model", "P", "--teacher", "T", "--data",
                                   f"dapo-cold:{FIX / 'dapo' / 'train.jsonl'}", "--out", str(out)])
    assert loaded == ["P", "T"]  # the policy first, then the teacher (one at a time)
    assert counts == dict(questions=4, responses=8, unboxed=0, critiques=8, format_ok=8, verdict_ok=8, right=4,
                          wrong=4, kept=8, generation=4)
    assert json.loads((tmp_path / "cold.counts.json").read_text()) == counts
    rows = sft.examples(f"jsonl:{out}", tokenizer)
    assert len(rows) == 12 and sum(r.kind == "critique" for r in rows) == 8
    with pytest.raises(DataError, match="--out"):
        teacher.distill_main(["--model", "P", "--teacher", "T", "--data", "arith"])


def test_distill_cli_on_a_tiny_model_names_an_empty_result(tmp_path):
    """Real models end to end: a random tiny model boxes nothing, so no critique survives: one clear error."""
    from conftest import make_model, make_tokenizer
    tok, d = make_tokenizer(), tmp_path / "tiny"
    make_model(vocab_size=len(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    argv = ["--model", str(d), "--teacher", str(d), "--data", "arith:1", "--limit", "2", "--max-new-tokens", "4",
            "--critique-max-new-tokens", "4", "--out", str(tmp_path / "c.jsonl")]
    with pytest.raises(DataError, match="no critique passed the filter .*'unboxed': 4"):
        teacher.distill_main(argv)
    assert not (tmp_path / "c.jsonl").exists()
