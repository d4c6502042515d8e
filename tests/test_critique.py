"""critique.py: prompts, the 1:1 question-response cache, second-order rollout and its rewards (real Sampler
and a scripted one), denoising, static pairs, critique eval sets."""
import inspect
import json
import random

import pytest

import critique
import reward
import teacher
from conftest import SHARED, make_model
from critique import QRCache
from data import DataError, load_data

SECRET = "987654321"  # a gold answer that appears nowhere else


def pair(i, label, answer=SECRET):
    v = 2 * i if label else 2 * i + 1
    return dict(question=f"q{i}: what is {i} + {i}?", response=f"{i} + {i} = {v}. The answer is \\boxed{{{v}}}.",
                label=label, answer=answer, id=f"p{i}{label}")


def couple(i):
    return [pair(i, True), pair(i, False)]


def stats(cache):  # QRCache's counters, for the tests (the core reads only len() and state_dict())
    return dict(size=len(cache), n_right=len(cache.right), n_wrong=len(cache.wrong), pushed=cache.pushed,
                popped=cache.popped, evicted=cache.evicted)


class ScriptedSampler:
    """Stands in for rollout.Sampler: `script(prompt_text, prompt_index, sample_index) -> completion text`,
    tokenized by the tokenizer (+ eos). Records every call."""

    def __init__(self, tokenizer, script):
        self.tok, self.script, self.calls = tokenizer, script, []

    def generate(self, prompts, n=1, max_new_tokens=256, temperature=1.0, top_p=1.0, top_k=0, stop_ids=None,
                 seed=None):
        self.calls.append(dict(prompts=[self.tok.decode(p) for p in prompts], n=n, seed=seed, stop_ids=stop_ids))
        out = []
        for i, p in enumerate(prompts):
            for j in range(n):
                ids = self.tok(self.script(self.calls[-1]["prompts"][i], i, j), add_special_tokens=False)["input_ids"]
                ids = ids + [self.tok.eos_token_id]
                out.append(dict(prompt_index=i, tokens=ids, logprobs=[-0.5] * len(ids), length=len(ids),
                                truncated=False))
        return out


# ----------------------------------------------------------------------------- prompts

def test_critique_prompt_format_and_no_reference_answer(tokenizer):
    assert "answer" not in inspect.signature(critique.critique_prompt).parameters
    p = pair(3, False)
    text = tokenizer.decode(critique.critique_prompt(tokenizer, p["question"], p["response"]))
    assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_start|>assistant\n")
    assert p["question"] in text and p["response"] in text and SECRET not in text
    assert "Conclusion: right [END]" in text and "Conclusion: wrong [END]" in text
    text = critique.critique_text("Q?", "R.")
    assert text.index("#Question#") < text.index("Q?") < text.index("#Solution#") < text.index("R.")
    assert "#Instruction#" in text and "step by step" in text


def test_second_order_prompts_never_show_gold(tokenizer):
    recs = load_data("arith", limit=40)
    rng = random.Random(0)
    pairs = []
    for r in recs:
        for right in (True, False):
            pairs.append(dict(question=r["question"], response=teacher.synth_response(r, rng, right=right),
                              label=right, answer=SECRET))
    s = ScriptedSampler(tokenizer, lambda p, i, j: "Looks fine.\nConclusion: wrong [END]")
    critique.second_order_rollout(s, tokenizer, pairs, m=1, k_ref=1, stop_ids=[257])
    assert len(s.calls) == 2  # critiques, then refinements (given question, response, critique)
    assert all(SECRET not in p for call in s.calls for p in call["prompts"])
    assert all("#Critique#" in p and "Conclusion: wrong [END]" in p for p in s.calls[1]["prompts"])


# ----------------------------------------------------------------------------- the cache

def test_cache_stays_balanced_and_never_repeats():
    rng = random.Random(1)
    cache, seen, nxt = QRCache(capacity=40, seed=3), set(), 0
    for _ in range(400):
        if rng.random() < 0.55:
            batch = [p for _ in range(rng.randint(0, 6)) for p in couple(nxt + _)]
            nxt += 6
            cache.push(batch)
        else:
            k = rng.randint(0, 15)
            got = cache.pop(k)
            ids = [p["id"] for p in got]
            assert len(got) == min(k // 2, stats(cache)["n_right"] + len(got) // 2) * 2
            assert sum(p["label"] for p in got) == len(got) // 2  # k//2 right, k//2 wrong
            assert not (set(ids) & seen) and len(set(ids)) == len(ids)
            seen |= set(ids)
        st = stats(cache)
        assert st["n_right"] == st["n_wrong"] and st["size"] == len(cache) <= 40
    # emptying it returns every held pair exactly once
    rest = cache.pop(10 ** 6)
    assert len(cache) == 0 and not ({p["id"] for p in rest} & seen)
    st = stats(cache)
    assert st["pushed"] == st["popped"] + st["evicted"]


def test_cache_pop_shapes_and_push_checks():
    cache = QRCache(capacity=100, seed=0)
    cache.push([p for i in range(5) for p in couple(i)])
    assert cache.pop(1) == [] and cache.pop(0) == []
    got = cache.pop(3)  # odd k -> k//2 of each
    assert [p["label"] for p in got] == [True, False]
    assert len(cache.pop(100)) == 8 and len(cache) == 0
    with pytest.raises(ValueError, match="as many right as wrong"):
        cache.push([pair(0, True)])
    with pytest.raises(ValueError):
        QRCache(capacity=1)


def test_cache_evicts_oldest_couples_first():
    cache = QRCache(capacity=7, seed=0)  # effective capacity 6: three couples
    for i in range(10):
        cache.push(couple(i))
    assert stats(cache) == dict(size=6, n_right=3, n_wrong=3, pushed=20, popped=0, evicted=14)
    assert sorted(p["id"] for p in cache.pop(6)) == sorted(p["id"] for i in (7, 8, 9) for p in couple(i))
    # eviction after a pop still goes by push order
    for i in range(3):
        cache.push(couple(10 + i))
    cache.pop(2)
    cache.push(couple(20))
    cache.push(couple(21))
    kept = {p["id"] for p in cache.pop(100)}
    assert {p["id"] for p in couple(21)} <= kept and {p["id"] for p in couple(10)}.isdisjoint(kept)


def test_cache_state_round_trip():
    a = QRCache(capacity=50, seed=7)
    for i in range(20):
        a.push(couple(i))
    a.pop(6)
    state = json.loads(json.dumps(a.state_dict()))  # must be JSON-serialisable
    b = QRCache(capacity=2, seed=123)
    b.load_state_dict(state)
    assert stats(b) == stats(a)
    for k in (4, 2, 10, 6):
        assert a.pop(k) == b.pop(k)
        a.push(couple(100 + k))
        b.push(couple(100 + k))
    assert a.state_dict() == b.state_dict()


# ----------------------------------------------------------------------------- first-order -> pairs

def test_pairs_from_rollout_balance():
    records = [dict(id=f"r{i}", question=f"Q{i}", answer=str(i)) for i in range(4)]
    rewards_by_q = {0: [1, 0, 0], 1: [1, 1, 1], 2: [0, 0, 0], 3: [0, 1, 0]}
    samples, rewards = [], []
    for q, rs in rewards_by_q.items():
        for j, r in enumerate(rs):
            samples.append(dict(q_index=q, id=f"r{q}", text=f"resp {q}.{j} {'ok' if r else 'bad'}"))
            rewards.append(float(r))
    pairs = critique.pairs_from_rollout(samples, records, rewards, random.Random(0))
    assert len(pairs) == 4 and sum(p["label"] for p in pairs) == 2
    assert {p["question"] for p in pairs} == {"Q0", "Q3"}
    for p in pairs:
        assert p["response"].endswith("ok" if p["label"] else "bad")
        assert p["answer"] == p["question"][1:] and p["id"].startswith(f"r{p['answer']}#")
        assert set(p) == {"question", "response", "label", "answer", "id"}
    with pytest.raises(ValueError):
        critique.pairs_from_rollout(samples, records, rewards[:-1], random.Random(0))


# ----------------------------------------------------------------------------- second-order rollout

def test_second_order_rollout_real_sampler(tokenizer):
    from rollout import Sampler
    model = make_model(vocab_size=len(tokenizer))
    pairs = [pair(1, True), pair(1, False), pair(2, True)]  # default template: ~380 prompt tokens
    crits = critique.second_order_rollout(Sampler(model, max_len=512), tokenizer, pairs, m=3, k_ref=1,
                                          max_new_tokens=6, temperature=1.0, seed=0)
    assert len(crits) == 9
    assert [c["pair_index"] for c in crits] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for c in crits:
        p = pairs[c["pair_index"]]
        assert c["label"] == p["label"] and c["pair_id"] == p["id"]
        assert c["prompt_ids"] == critique.critique_prompt(tokenizer, p["question"], p["response"])
        assert 1 <= c["length"] == len(c["tokens"]) == len(c["logprobs"]) <= 6
        assert c["text"] == tokenizer.decode(c["tokens"], skip_special_tokens=True)
        assert c["verdict"] == reward.extract_verdict(c["text"])
        base = reward.critique_reward(c["verdict"], p["label"])
        assert c["reward"] == pytest.approx(base + c["bonus"])
        assert set(c) >= {"pair_index", "prompt_ids", "tokens", "logprobs", "text", "verdict", "reward",
                          "bonus", "truncated", "length", "label"}
    assert critique.second_order_rollout(None, tokenizer, [], m=3) == []


VERDICT_TEXT = {"right": "Step 1 checks out.\nConclusion: right [END]",
                "wrong": "Step 1 is off by one.\n**Conclusion:** wrong [END]",
                None: "I am not sure what to say."}


@pytest.mark.parametrize("scheme,p_correct", [("plain", None), ("reweight", 0.25), ("precision", None),
                                              ("recall", None)])
def test_second_order_rewards_scripted(tokenizer, scheme, p_correct):
    verdicts = ["right", "wrong", None]
    s = ScriptedSampler(tokenizer, lambda p, i, j: VERDICT_TEXT[verdicts[j]])
    pairs = [pair(1, True), pair(2, False)]
    crits = critique.second_order_rollout(s, tokenizer, pairs, m=3, scheme=scheme, p_correct=p_correct,
                                          stop_ids=[257], max_new_tokens=32, seed=5)
    assert len(s.calls) == 1 and s.calls[0]["n"] == 3 and s.calls[0]["seed"] == 5
    assert s.calls[0]["stop_ids"] == [257]
    expected = {  # (label, verdict) -> Eq. 2 / 3 / 5 / 6
        "plain": {(True, "right"): 0.7, (False, "wrong"): 0.7},
        "reweight": {(True, "right"): 0.35 / 0.25, (False, "wrong"): 0.35 / 0.75},
        "precision": {(True, "right"): 0.6, (False, "wrong"): 0.8},
        "recall": {(True, "right"): 0.8, (False, "wrong"): 0.6}}[scheme]
    for c in crits:
        assert c["verdict"] == verdicts[crits.index(c) % 3]
        assert c["reward"] == pytest.approx(expected.get((c["label"], c["verdict"]), 0.0))
        assert c["reward"] == reward.critique_reward(c["verdict"], c["label"], scheme, p_correct)
        assert c["bonus"] == 0.0 and "refine_correct" not in c


def test_default_stop_ids(tokenizer):
    s = ScriptedSampler(tokenizer, lambda p, i, j: "x")
    critique.second_order_rollout(s, tokenizer, [pair(1, True)], m=1)
    from rollout import default_stop_ids
    assert s.calls[0]["stop_ids"] == default_stop_ids(tokenizer)


def test_denoise_bonus_wiring(tokenizer):
    # critique j of each pair: verdict cycles right, wrong, none; refinement r of a critique is right when
    # r < (number of right refinements scripted for that critique)
    verdicts = ["right", "wrong", None, "wrong"]
    k_right = {0: 2, 1: 3, 2: 1, 3: 0}  # by critique index within its pair
    n_ref = 3

    def script(prompt, i, j):
        if "#Critique#" not in prompt:
            return VERDICT_TEXT[verdicts[j]] + f" (c{j})"
        cj = int(prompt.split("(c")[1][0])
        return f"Fixed. The answer is \\boxed{{{SECRET if j < k_right[cj] else 5}}}"

    s = ScriptedSampler(tokenizer, script)
    pairs = [pair(1, True), pair(2, False)]
    crits = critique.second_order_rollout(s, tokenizer, pairs, m=4, k_ref=n_ref, stop_ids=[257], seed=11)
    assert len(s.calls) == 2 and s.calls[1]["n"] == n_ref and s.calls[1]["seed"] == 12
    assert len(s.calls[1]["prompts"]) == 6  # critiques without a verdict are not refined
    for idx, c in enumerate(crits):
        j = idx % 4
        weight = {"right": 0.1, "wrong": 0.7, None: 0.0}[c["verdict"]]
        k = k_right[j] if c["verdict"] else 0
        assert c["bonus"] == pytest.approx(weight * k / n_ref)
        assert c["bonus"] == reward.denoise_bonus(c["verdict"], k, n_ref)
        assert c["reward"] == pytest.approx(reward.critique_reward(c["verdict"], c["label"]) + c["bonus"])
        if c["verdict"]:
            assert c["refine_correct"] == k
    # a right response judged right with 2/3 good refinements: 0.7 + 0.1 * 2/3
    assert crits[0]["reward"] == pytest.approx(0.7 + 0.1 * 2 / 3)
    # a wrong response judged wrong with 3/3 good refinements: 0.7 + 0.7
    assert crits[5]["reward"] == pytest.approx(1.4)
    with pytest.raises(ValueError, match="gold"):
        critique.second_order_rollout(s, tokenizer, [pair(1, True, answer=None)], m=1, k_ref=1)


# ----------------------------------------------------------------------------- static pairs

def _first_order_script(records):
    gold = {r["question"]: r["answer"] for r in records}

    def script(prompt, i, j):
        q = next(q for q in gold if q in prompt)
        if i % 3 == 0:  # all right -> dropped by the filter
            return f"\\boxed{{{gold[q]}}}"
        return f"I think it is \\boxed{{{gold[q] if j % 4 == 1 else int(gold[q]) + 1}}}"
    return script


def test_static_pairs_round_trip(tokenizer, tmp_path):
    records = load_data("arith", limit=9)
    s = ScriptedSampler(tokenizer, _first_order_script(records))
    pairs = critique.build_static_pairs(s, tokenizer, records, k=10, seed=0, max_new_tokens=16)
    assert s.calls[0]["n"] == 10 and s.calls[0]["seed"] == 0
    assert len(pairs) == 12 and sum(p["label"] for p in pairs) == 6
    for p in pairs:
        assert reward.is_correct(p["response"], p["answer"]) == p["label"]
    path = tmp_path / "sub" / "pairs.jsonl"
    critique.save_pairs(path, pairs)
    assert critique.load_pairs(path) == pairs == critique.load_critique_data(f"jsonl:{path}")
    assert [p.name for p in path.parent.iterdir()] == ["pairs.jsonl"]  # no tmp file left behind


def test_load_pairs_bad_rows(tmp_path):
    good = dict(question="Q", response="R", label=True)
    cases = [(dict(good, question=""), "question"), (dict(good, response=None), "response"),
             (dict(good, label="maybe"), "label"), ("[1, 2]", "JSON object"), ("{not json", "not valid JSON")]
    for row, msg in cases:
        path = tmp_path / "bad.jsonl"
        path.write_text(json.dumps(good) + "\n" + (row if isinstance(row, str) and row.startswith("{") else
                                                    json.dumps(row) if not isinstance(row, str) else row) + "\n")
        with pytest.raises(DataError, match=msg) as e:
            critique.load_pairs(path)
        assert str(path) in str(e.value) and "2" in str(e.value)
    path.write_text(json.dumps(dict(good, label="wrong", answer=7)) + "\n")
    assert critique.load_pairs(path) == [dict(question="Q", response="R", label=False, answer="7", id="bad-1")]


# ----------------------------------------------------------------------------- cold start

def test_gsm8k_solutions_balanced():
    path = SHARED / "model_solutions_dev.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    pairs = critique.load_critique_data(f"gsm8k-solutions:{path}")
    mixed = [r for r in rows if len({v["is_correct"] for v in r.values() if isinstance(v, dict)}) == 2]
    assert len(pairs) == 2 * len(mixed) and sum(p["label"] for p in pairs) == len(mixed)
    assert [p["question"] for p in pairs[::2]] == [r["question"].strip() for r in mixed]
    by_q = {r["question"].strip(): r for r in mixed}
    for p in pairs:
        r = by_q[p["question"]]
        name = p["id"].split(":")[-1]
        assert r[name]["is_correct"] == p["label"] and r[name]["solution"] == p["response"]
        assert r["ground_truth"].strip().split("A:")[-1].strip().replace(",", "") == p["answer"]
        assert reward.is_correct(p["response"], p["answer"], markers=("A:",)) == p["label"]
    assert len({p["id"] for p in pairs}) == len(pairs)
    assert critique.load_critique_data(f"gsm8k-solutions:{path}") == pairs  # seeded
    assert critique.load_critique_data(f"gsm8k-solutions:{path}", seed=1) != pairs
    assert len(critique.load_critique_data(f"gsm8k-solutions:{path}", limit=5)) == 10


def test_gsm8k_solutions_bad_rows(tmp_path):
    ok = dict(question="Q", ground_truth="1+1=2\nA: 2", a=dict(is_correct=True, solution="A: 2"),
              b=dict(is_correct=False, solution="A: 3"))
    for bad, msg in [(dict(ok, ground_truth="2"), "A: x"), (dict(ok, question=None), "question"),
                     (dict(ok, b=dict(is_correct="no", solution="x")), "is_correct"),
                     (dict(question="Q", ground_truth="A: 1"), "no model solutions")]:
        path = tmp_path / "sol.jsonl"
        path.write_text(json.dumps(ok) + "\n" + json.dumps(bad) + "\n")
        with pytest.raises(DataError, match=msg) as e:
            critique.load_critique_data(f"gsm8k-solutions:{path}")
        assert f"{path} row 2" in str(e.value)
    path.write_text(json.dumps(dict(ok, b=dict(is_correct=True, solution="A: 2"))) + "\n")
    with pytest.raises(DataError, match="both"):
        critique.load_critique_data(f"gsm8k-solutions:{path}")
    with pytest.raises(DataError, match="unknown critique data spec"):
        critique.load_critique_data("arith")
