"""The paper's data specs (data.py): DAPO-Math-17k, MATH-500, GSM8K, Minerva, AMC23, OlympiadBench, each on a fixture
in tests/data/<set>/ written after its dataset card (including the awkward rows), from the hub (mocked) and from
local jsonl / parquet copies; the cold-start / RL split; the bad-row errors; the Qwen2.5 harness prompts."""
import json
from pathlib import Path

import pytest

import data
import reward
from data import DataError, load_data

FIX = Path(__file__).resolve().parent / "data"
DAPO_GOLDS = ["24", "58", "27", "11", "21", "2", "8", "13"]


def rows_of(path):
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------- DAPO-Math-17k


def test_dapo_dedupes_and_strips_the_answer_wrapper():
    raw = rows_of(FIX / "dapo" / "train.jsonl")
    assert len(raw) == 24 and all(isinstance(r["prompt"], list) for r in raw)  # 8 problems, repeated 3 times
    recs = load_data(f"dapo:{FIX / 'dapo' / 'train.jsonl'}")
    assert [r["answer"] for r in recs] == DAPO_GOLDS
    assert recs[0]["question"] == "Find the number of positive divisors of $360$."
    for r in recs:
        assert "Answer:" not in r["question"] and "Remember" not in r["question"]
        assert r["question"] == r["question"].strip()
    assert recs[0]["id"] == raw[0]["extra_info"]["index"]  # the first copy's id
    assert len({r["question"] for r in recs}) == 8
    # the deduplicated copy (open-r1/DAPO-Math-17k-Processed: `prompt` a string, `solution` the gold) reads the same
    processed = load_data(f"dapo:{FIX / 'dapo' / 'processed.jsonl'}")
    assert [(r["question"], r["answer"], r["id"]) for r in processed] == [(r["question"], r["answer"], r["id"])
                                                                          for r in recs]


def test_dapo_cold_start_and_rl_split(monkeypatch, tmp_path):
    monkeypatch.setattr(data, "DAPO_COLD", 3)
    path = FIX / "dapo" / "train.jsonl"
    cold, rl, every = (load_data(f"{k}:{path}") for k in ("dapo-cold", "dapo-rl", "dapo"))
    assert len(cold) == 3 and len(rl) == 5
    assert not {r["question"] for r in cold} & {r["question"] for r in rl}  # disjoint
    assert {r["question"] for r in cold + rl} == {r["question"] for r in every}
    # the split hangs on the problem text: the same from another copy with its rows in another order, any seed
    shuffled = write(tmp_path / "shuffled.jsonl", rows_of(path)[::-1])
    def qa(recs):
        return ([(r["question"], r["answer"]) for r in recs])  # ids: each copy's first row's
    assert qa(load_data(f"dapo-cold:{shuffled}", seed=7)) == qa(cold)
    assert load_data(f"dapo-rl:{FIX / 'dapo' / 'processed.jsonl'}") == rl
    assert [r["question"] for r in load_data(f"dapo-rl:{path}", limit=2)] == [r["question"] for r in rl[:2]]
    monkeypatch.setattr(data, "DAPO_COLD", 1000)  # the paper's 1k: a set this small is all cold start
    with pytest.raises(DataError, match="gave no records"):
        load_data(f"dapo-rl:{path}")


def test_dapo_copies_that_disagree_on_the_gold_are_dropped(tmp_path, capsys):
    rows = rows_of(FIX / "dapo" / "train.jsonl")
    rows[9]["reward_model"]["ground_truth"] = "59"  # a copy of problem 2 with another answer
    recs = load_data(f"dapo:{write(tmp_path / 'd.jsonl', rows)}")
    assert [r["answer"] for r in recs] == [g for g in DAPO_GOLDS if g != "58"]
    assert "dropped 1 problem(s) whose copies disagree" in capsys.readouterr().out


def test_dapo_bad_rows_are_named(tmp_path):
    rows = rows_of(FIX / "dapo" / "train.jsonl")[:3]
    rows[1]["prompt"] = [{"role": "system", "content": "x"}]
    path = write(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=r"dapo: .*bad.jsonl row 2: no user turn"):
        load_data(f"dapo:{path}")
    del rows[1]["reward_model"]
    rows[1]["prompt"] = rows[0]["prompt"][:1]
    rows[1]["prompt"] = [{"role": "user", "content": "Another problem."}]
    with pytest.raises(DataError, match=r"row 2: missing or empty 'reward_model.ground_truth' / 'solution'"):
        load_data(f"dapo:{write(tmp_path / 'bad2.jsonl', rows)}")
    assert len(load_data(f"dapo:{tmp_path / 'bad2.jsonl'}", skip_bad=True)) == 2


# ----------------------------------------------------------------------------- the benchmarks


def test_math500_fixture():
    recs = load_data(f"math500:{FIX / 'math500' / 'test.jsonl'}")
    assert [r["answer"] for r in recs] == ["\\frac{14}{3}", "\\left( 3, \\frac{\\pi}{2} \\right)", "\\text{(D)}",
                                            "5\\sqrt{2}"]
    assert recs[0]["id"] == "test/prealgebra/1001.json" and recs[0]["question"].startswith("What is the value")
    assert reward.is_correct("so \\boxed{\\dfrac{14}{3}}", recs[0]["answer"], strict=True)
    assert reward.is_correct("\\boxed{(3, \\frac{\\pi}{2})}", recs[1]["answer"], strict=True)
    assert reward.is_correct("\\boxed{D}", recs[2]["answer"], strict=True)


def test_gsm8k_fixture_with_thousands_separator():
    recs = load_data(f"gsm8k:{FIX / 'gsm8k' / 'test.jsonl'}")
    assert [r["answer"] for r in recs] == ["108", "1234", "70"]


def test_minerva_fixture():
    recs = load_data(f"minerva:{FIX / 'minerva' / 'test.jsonl'}")
    assert [r["answer"] for r in recs] == ["10", "9", "\\frac{1}{8}"] and recs[0]["id"] == "minerva-0"


def test_amc23_float_answers(tmp_path):
    raw = rows_of(FIX / "amc23" / "test.jsonl")
    assert all(isinstance(r["answer"], float) for r in raw)  # 27.0, as some copies store it
    recs = load_data(f"amc23:{FIX / 'amc23' / 'test.jsonl'}")
    assert [r["answer"] for r in recs] == ["22", "9", "23", "27"] and [r["id"] for r in recs] == ["0", "1", "2", "3"]
    # the same from a parquet copy (read through `datasets`)
    import datasets
    datasets.Dataset.from_list(raw).to_parquet(str(tmp_path / "amc23.parquet"))
    assert load_data(f"amc23:{tmp_path / 'amc23.parquet'}") == recs
    assert data._number_gold("27.0") == "27" and data._number_gold(2.5) == "2.5" and data._number_gold(-3.0) == "-3"


def test_olympiadbench_final_answer_lists():
    raw = rows_of(FIX / "olympiadbench" / "train.jsonl")
    assert all(isinstance(r["final_answer"], list) for r in raw)
    recs = load_data(f"olympiadbench:{FIX / 'olympiadbench' / 'train.jsonl'}")
    assert [r["answer"] for r in recs] == ["5", "3, 5", "(1,2,3)", "\\frac{1}{2}"]
    assert [r["id"] for r in recs] == ["1606", "1607", "1608", "1609"]
    assert reward.is_correct("\\boxed{3, 5}", recs[1]["answer"], strict=True)
    assert reward.is_correct("\\boxed{5, 3}", recs[1]["answer"], strict=True)
    assert not reward.is_correct("\\boxed{3}", recs[1]["answer"], strict=True)
    assert reward.is_correct("\\boxed{0.5}", recs[3]["answer"], strict=True)
    assert data._olympiad_gold(["$x=1$", "$x=2$"]) == "x=1, x=2"


def test_benchmark_bad_rows_are_named(tmp_path):
    rows = rows_of(FIX / "math500" / "test.jsonl")
    rows[1]["answer"] = "  "
    with pytest.raises(DataError, match=r"math500: .*m.jsonl row 2: missing or empty 'answer'"):
        load_data(f"math500:{write(tmp_path / 'm.jsonl', rows)}")
    rows = rows_of(FIX / "olympiadbench" / "train.jsonl")
    rows[2]["final_answer"] = []
    with pytest.raises(DataError, match=r"row 3: missing or empty 'final_answer'"):
        load_data(f"olympiadbench:{write(tmp_path / 'o.jsonl', rows)}")
    rows[2]["final_answer"] = ["$$"]
    with pytest.raises(DataError, match=r"row 3: empty gold answer after normalisation"):
        load_data(f"olympiadbench:{write(tmp_path / 'o.jsonl', rows)}")
    rows = rows_of(FIX / "amc23" / "test.jsonl")
    del rows[0]["question"]
    with pytest.raises(DataError, match=r"row 1: missing or empty 'question'"):
        load_data(f"amc23:{write(tmp_path / 'a.jsonl', rows)}")
    with pytest.raises(DataError, match="file not found"):
        load_data(f"minerva:{tmp_path / 'nope.jsonl'}")
    (tmp_path / "x.jsonl").write_text('{"question": "q", "answer": "1"}\n{oops\n')
    with pytest.raises(DataError, match=r"x.jsonl:2: not valid JSON"):
        load_data(f"minerva:{tmp_path / 'x.jsonl'}")


@pytest.mark.parametrize("spec,hub", [
    ("math500", ("HuggingFaceH4/MATH-500", None, "test")),
    ("minerva", ("math-ai/minervamath", None, "test")),
    ("amc23", ("math-ai/amc23", None, "test")),
    ("olympiadbench", ("Hothan/OlympiadBench", "OE_TO_maths_en_COMP", "train")),
    ("dapo-rl", ("BytedTsinghua-SIA/DAPO-Math-17k", None, "train")),
])
def test_hub_ids_and_splits(monkeypatch, spec, hub):
    """Without a PATH each set comes from its hub id, config and split (mocked: the fixture as the hub's rows)."""
    import datasets
    name = spec.split("-")[0]
    fixture = next((FIX / name).glob("t*.jsonl"))
    calls = []

    def fake(path, config=None, split=None, **kw):
        calls.append((path, config, split))
        return datasets.Dataset.from_list(rows_of(fixture))
    monkeypatch.setattr(datasets, "load_dataset", fake)
    monkeypatch.setattr(data, "DAPO_COLD", 3)
    assert load_data(spec, split="ignored") == load_data(f"{spec}:{fixture}")
    assert calls == [hub]


def test_hub_offline_error_says_what_to_do(monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("no network")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="Offline\\? Use a local file.*NAME:PATH"):
        load_data("math500")


# ----------------------------------------------------------------------------- the Qwen2.5 harness prompts


def test_qwen_harness_prompts(tokenizer):
    text = tokenizer.decode(data.gen_prompt(tokenizer, "What is 2 + 3?", style="qwen-boxed"))
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?\n"
                    "Please reason step by step, and put your final answer within \\boxed{}.<|im_end|>\n"
                    "<|im_start|>assistant\n")
    text = tokenizer.decode(data.gen_prompt(tokenizer, "What is 2 + 3?", style="qwen25-math-cot"))
    assert text == ("<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}."
                    "<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n")
    plain = tokenizer.decode(data.gen_prompt(tokenizer, "q"))  # the default style has no system turn
    assert plain.startswith("<|im_start|>user\nq")
