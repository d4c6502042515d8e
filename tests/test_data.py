"""Data SPECs, the arith generator and its split, prompts, and the bad-input errors."""
import json

import pytest

import data
from data import DataError, load_data


def write_jsonl(path, rows):  # rows may be raw lines (bad JSON on purpose), unlike data.write_jsonl
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_arith_records_are_exact_and_reproducible():
    recs = load_data("arith", limit=300)
    assert len(recs) == 300 and len({r["id"] for r in recs}) == 300
    assert {r["level"] for r in recs} == {1, 2, 3}
    for r in recs:
        for text, value in r["steps"]:  # re-evaluate every step the program wrote
            lhs, rhs = text.split(" = ")
            assert eval(lhs.replace("/", "//")) == int(rhs) == value >= 0
        assert r["answer"] == str(r["steps"][-1][1])
        assert r["solution"].endswith(f"\\boxed{{{r['answer']}}}.")
        assert len(r["steps"]) == r["level"]
    assert load_data("arith", limit=300) == recs
    assert load_data("arith", limit=300, seed=1) != recs


@pytest.mark.parametrize("level", [1, 2, 3])
def test_arith_levels(level):
    recs = load_data(f"arith:{level}", limit=50)
    assert all(r["level"] == level and r["id"].startswith(f"arith{level}-train") for r in recs)


def test_arith_split_never_leaks():
    test_q = {r["question"] for r in load_data("arith", split="test", limit=2000)}
    for seed in range(3):
        train_q = {r["question"] for r in load_data("arith", split="train", limit=5000, seed=seed)}
        assert not (train_q & test_q)
    # the split is a property of the text: any question is assigned to exactly one side
    assert all(data._split_of(q) == "test" for q in test_q)


def test_gsm8k_local_file(tmp_path):
    p = write_jsonl(tmp_path / "g.jsonl", [
        {"question": "A has 2 and gets 3. Total?", "answer": "2+3=<<2+3=5>>5\n#### 5"},
        {"question": "Big?", "answer": "so\n#### 1,250"}])
    recs = load_data(f"gsm8k:{p}")
    assert [r["answer"] for r in recs] == ["5", "1250"]
    assert recs[0]["question"] == "A has 2 and gets 3. Total?" and recs[0]["id"] == "g-0"


def test_real_gsm8k_dev_file():
    f = __import__("conftest").SHARED / "test_dev.jsonl"
    recs = load_data(f"gsm8k:{f}")
    assert len(recs) == 800 and recs[0]["answer"] == "18"


def test_jsonl_with_field_names_and_limit(tmp_path):
    p = write_jsonl(tmp_path / "x.jsonl",
                    [{"id": 7, "problem": "1+1?", "solution": 2}, {"problem": "2+2?", "solution": "4"}])
    recs = load_data(f"jsonl:{p}", fields=("problem", "solution"))
    assert recs == [{"id": "7", "question": "1+1?", "answer": "2"}, {"id": "x-1", "question": "2+2?", "answer": "4"}]
    assert len(load_data(f"jsonl:{p}", fields=("problem", "solution"), limit=1)) == 1


def test_hf_spec_reads_a_local_dataset_dir(tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    write_jsonl(d / "train.jsonl", [{"question": "q1", "answer": "1"}, {"question": "q2", "answer": "2"}])
    recs = load_data(f"hf:{d}:train")
    assert [r["answer"] for r in recs] == ["1", "2"]


def test_hub_failure_is_one_clear_error(monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("no network")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="Offline\\? Use a local file"):
        load_data("gsm8k")


@pytest.mark.parametrize("spec,match", [
    ("nope", "unknown data spec 'nope'"),
    ("jsonl:", "unknown data spec"),
    ("arith:9", "unknown level 9"),
    ("arith:x", "LEVEL must be one of"),
    ("jsonl:/no/such/file.jsonl", "file not found: /no/such/file.jsonl"),
])
def test_bad_specs(spec, match):
    with pytest.raises(DataError, match=match):
        load_data(spec)


def test_bad_rows_name_file_and_row(tmp_path):
    p = write_jsonl(tmp_path / "bad.jsonl", [{"question": "ok", "answer": "1"}, {"question": "no answer"}])
    with pytest.raises(DataError, match=r"bad.jsonl row 2: missing or empty 'answer'"):
        load_data(f"jsonl:{p}")
    p2 = write_jsonl(tmp_path / "bad2.jsonl", [{"answer": "1"}])
    with pytest.raises(DataError, match=r"row 1: missing or empty 'question'"):
        load_data(f"jsonl:{p2}")
    p3 = write_jsonl(tmp_path / "bad3.jsonl", ['{"question": "a", "answer": "1"}', "{oops"])
    with pytest.raises(DataError, match=r"bad3.jsonl:2: not valid JSON"):
        load_data(f"jsonl:{p3}")
    p4 = write_jsonl(tmp_path / "g.jsonl", [{"question": "q", "answer": "no marker"}])
    with pytest.raises(DataError, match=r"row 1: GSM8K answer has no '#### x' line"):
        load_data(f"gsm8k:{p4}")


def test_skip_bad_rows_reports_count(tmp_path, capsys):
    p = write_jsonl(tmp_path / "mixed.jsonl", [{"question": "a", "answer": "1"}, {"question": ""}, {"answer": 3}])
    recs = load_data(f"jsonl:{p}", skip_bad=True)
    assert len(recs) == 1 and "skipped 2 bad row(s) of 3" in capsys.readouterr().out


def test_empty_dataset_is_an_error(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("\n")
    with pytest.raises(DataError, match="gave no records"):
        load_data(f"jsonl:{p}")


def test_generation_prompt_uses_chat_template(tokenizer):
    ids = data.gen_prompt(tokenizer, "What is 2 + 3?")
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>user\nWhat is 2 + 3?") and "\\boxed{" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert "Example solution" in tokenizer.decode(data.gen_prompt(tokenizer, "q", style="oneshot"))
    with pytest.raises(DataError, match="unknown prompt style"):
        data.gen_prompt(tokenizer, "q", style="fancy")


def test_prompt_without_chat_template(tokenizer):
    import copy
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    assert tok.decode(data.gen_prompt(tok, "2+2?")).endswith("\nAnswer:")


def test_json_writers_round_trip_atomically(tmp_path):
    rows = [{"question": "Zoë has 2 €?", "answer": 2}, {"id": "x", "steps": [["1 + 1 = 2", 2]]}]
    path = tmp_path / "sub" / "rows.jsonl"
    data.write_jsonl(path, rows)  # creates the directory
    assert data.read_jsonl(path) == rows and "Zoë" in path.read_text(encoding="utf-8")
    data.write_json(tmp_path / "sub" / "res.json", {"acc": 0.5, "items": rows})
    assert json.loads((tmp_path / "sub" / "res.json").read_text(encoding="utf-8")) == {"acc": 0.5, "items": rows}
    with pytest.raises(TypeError):  # a row that is not JSON: the old file stays whole, no tmp file is left
        data.write_jsonl(path, [{"ok": 1}, {"bad": object()}])
    assert data.read_jsonl(path) == rows
    assert sorted(p.name for p in path.parent.iterdir()) == ["res.json", "rows.jsonl"]


def test_require_field():
    assert data.require_field({"question": " q "}, "question", "f row 1") == " q "
    assert data.require_field({"answer": 72}, "answer", "f row 1", text=False) == 72  # answers may be numbers
    for row in ({}, {"question": "  "}, {"question": None}, {"question": 3}, ["question"]):
        with pytest.raises(DataError, match=r"f row 1: missing or empty 'question'"):
            data.require_field(row, "question", "f row 1")
    with pytest.raises(DataError, match="missing or empty 'answer'"):
        data.require_field({"answer": ""}, "answer", "f row 1", text=False)
