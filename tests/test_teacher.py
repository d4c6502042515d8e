"""The cold-start program teacher (teacher.py): synthetic solutions, step-by-step critiques, the SFT file."""
import json
import random

import pytest

import reward
import teacher
from data import DataError, load_data


def test_teacher_critiques_parse_to_the_right_verdict():
    records = load_data("arith", limit=300)
    rng = random.Random(0)
    counts = {"right": 0, "wrong": 0, "flagged": 0}
    for r in records:
        assert teacher.synth_response(r, rng, right=True, style="program") == r["solution"]
        cases = [(teacher.synth_response(r, rng, right=True, style=st), True) for st in teacher.STYLES]
        cases += [(teacher.synth_response(r, rng, right=False, kind=kd), False) for kd in teacher.WRONG_KINDS]
        cases += [("I do not know.", False), (f"The answer is \\boxed{{{int(r['answer']) + 1}}}.", False),
                  (f"The answer is \\boxed{{{r['answer']}}}.", True)]
        for text, label in cases:
            assert reward.is_correct(text, r["answer"]) == label, text
            crit = teacher.teacher_critique(r, text)
            assert crit.endswith(f"Conclusion: {'right' if label else 'wrong'} [END]")
            assert reward.extract_verdict(crit) == ("right" if label else "wrong"), (text, crit)
            assert crit.count("Conclusion") == 1 and f"Step {len(r['steps'])}:" in crit
            counts["right" if label else "wrong"] += 1
            counts["flagged"] += "This step is wrong" in crit
            if label:
                assert "wrong" not in crit.lower()
    assert counts["right"] == 4 * 300 and counts["wrong"] == 5 * 300
    assert counts["flagged"] > 300  # corrupted steps get pointed out, not just the final answer


def test_teacher_points_out_first_wrong_step():
    rec = dict(question="Ava has 10 coins. ...", answer="24",
               steps=[["10 + 2 = 12", 12], ["12 * 2 = 24", 24]], solution="Step 1: 10 + 2 = 12.\nStep 2: 12 * 2 = 24.\n"
               "So Ava has 24 coins. The answer is \\boxed{24}.")
    crit = teacher.teacher_critique(rec, "10 + 2 = 13\n13 * 2 = 26\nAnswer: \\boxed{26}")
    lines = crit.split("\n")
    assert "10 + 2 = 13, but 10 + 2 = 12" in lines[1] and "This step is wrong" in lines[1]
    assert "solution" not in lines[2] and lines[-1] == "Conclusion: wrong [END]"
    crit = teacher.teacher_critique(rec, "10 + 2 = 12\n12 x 3 = 36\nAnswer: \\boxed{36}")  # wrong number used
    assert "12 * 3 = 36 instead" in crit.split("\n")[2]
    with pytest.raises(DataError, match="steps"):
        teacher.teacher_critique(dict(question="Q", answer="1"), "x")


def test_cold_start_data_synthetic(tmp_path):
    records = load_data("arith", limit=60)
    out = tmp_path / "cold.jsonl"
    info = teacher.cold_start_data(records, out, seed=0, n_wrong=2)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    crit = [r for r in rows if "critique" in r]
    gen = [r for r in rows if "critique" not in r]
    assert len(crit) == 240 and sum(r["label"] for r in crit) == 120
    assert info == dict(path=str(out), n_critique=240, n_right=120, n_wrong=120, n_generation=60, n_policy=0)
    by_q = {r["question"]: r for r in records}
    assert sorted(r["response"] for r in gen) == sorted(r["solution"] for r in records)
    assert all(set(r) == {"question", "response"} for r in gen)
    for r in crit:
        assert set(r) == {"question", "response", "critique", "label"}
        assert reward.is_correct(r["response"], by_q[r["question"]]["answer"]) == r["label"]
        assert reward.extract_verdict(r["critique"]) == ("right" if r["label"] else "wrong")
    again = tmp_path / "again.jsonl"
    teacher.cold_start_data(records, again, seed=0, n_wrong=2)
    assert again.read_text() == out.read_text()  # seeded


def test_cold_start_data_policy_responses_are_topped_up(tmp_path):
    records = load_data("arith", limit=10)
    responses = [[f"\\boxed{{{int(r['answer']) + 1}}}", "no idea"] for r in records]  # 20 wrong, 0 right
    responses[0] = [f"The answer is \\boxed{{{records[0]['answer']}}}"] + responses[0]  # 1 right
    info = teacher.cold_start_data(records, tmp_path / "c.jsonl", responses=responses, generation=False)
    rows = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert info["n_policy"] == 21 and info["n_right"] == info["n_wrong"] == 20 and len(rows) == 40
    assert sum("no idea" == r["response"] for r in rows) == 10
    with pytest.raises(DataError, match="steps"):
        teacher.cold_start_data([dict(id="x", question="Q", answer="1")], tmp_path / "x.jsonl")


# ----------------------------------------------------------------------------- critique evaluation data


def test_critique_test_set_tops_up_with_program_pairs(tmp_path):
    import critique
    from conftest import make_model, make_tokenizer
    tok, model_dir = make_tokenizer(), tmp_path / "tiny"
    make_model(vocab_size=len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    out = tmp_path / "crit.jsonl"
    argv = ["--model", str(model_dir), "--data", "arith:1", "--limit", "3", "--k", "2", "--max-new-tokens", "4",
            "--out", str(out)]
    n = teacher.critique_test_set(argv)  # a random tiny model answers nothing right: every pair is program-written
    pairs = critique.load_pairs(out)
    recs = {r["question"]: r for r in load_data("arith:1", split="test", limit=3)}
    assert n == len(pairs) == 6 and [p["label"] for p in pairs] == [True, False] * 3
    for p in pairs:
        assert p["answer"] == recs[p["question"]]["answer"]
        assert reward.is_correct(p["response"], p["answer"]) == p["label"]
    with pytest.raises(DataError, match="--out"):
        teacher.critique_test_set(argv[:-2])
