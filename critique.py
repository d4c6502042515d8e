"""Second-order rollout (arXiv 2602.22765 §3, Figure 2; setup §4): the policy critiques its own answers.

    pairs = pairs_from_rollout(samples, records, rewards, rng)  # label-balance filter: 1 right + 1 wrong / question
    cache.push(pairs)                                           # QRCache: always exactly 1:1 right:wrong
    crits = sample_critiques(sampler, tok, cache.pop(P), m)     # m critiques per pair (unscored: reward.py scores)
    crits = second_order_rollout(sampler, tok, pairs, m)        # sampled and scored: Eq. 2 (+ Eq. 4 with k_ref)

Also: critique / refinement prompts (CFT style, the paper's Figure 6 fields; never the reference answer), C-RL's
static pairs (§4) and critique evaluation sets; the cold-start data's program teacher is `teacher.py`. As in the
paper, refinement tokens are never trained and a critique's steps are not verified (outcome reward). `rollout`
(so torch) is imported only by the functions that sample.
"""
import random
import re
from pathlib import Path

import reward
from data import DataError, chat_ids, read_jsonl, require_field, write_jsonl

# ----------------------------------------------------------------------------- prompts

# The critique prompt: the fields of the paper's cold-start distillation prompt (Figure 6). It shows the question
# and the response only, never the reference answer.
CRITIQUE_TEMPLATE = ("#Question#:\n{question}\n\n#Solution#:\n{response}\n\n#Instruction#:\n"
                     "Verify the solution step by step: check the reasoning and the arithmetic of every step. Then "
                     "judge whether the solution is correct. End your answer with the line \"Conclusion: right [END]\" "
                     "if the solution is correct, or \"Conclusion: wrong [END]\" if it is wrong.")

# Self-correction prompt for denoising (Eq. 4); the paper prints none.
REFINE_TEMPLATE = ("#Question#:\n{question}\n\n#Solution#:\n{response}\n\n#Critique#:\n{critique}\n\n#Instruction#:\n"
                   "If the critique found an error, write a corrected solution step by step. If it found none, "
                   "restate the solution. Give the final answer as \\boxed{{number}}.")


def critique_text(question, response):  # the user turn, before the chat template
    return CRITIQUE_TEMPLATE.format(question=question.strip(), response=response.strip())


def critique_prompt(tokenizer, question, response):
    """Token ids of the critique prompt (chat template around critique_text)."""
    return chat_ids(tokenizer, critique_text(question, response))


def refine_prompt(tokenizer, question, response, critique):
    """Token ids of the self-correction prompt (Eq. 4): fix the solution if the critique found an error."""
    return chat_ids(tokenizer, REFINE_TEMPLATE.format(question=question.strip(), response=response.strip(),
                                                      critique=critique.strip()))


# ----------------------------------------------------------------------------- the question-response cache

class QRCache:
    """The question-response data cache (§3, Figure 2): <question, response, label> pairs that passed the label-
    balance filter, sampled without replacement for second-order rollout. Always as many right as wrong: `push`
    takes balanced lists only; `pop(k)` returns k//2 right and k//2 wrong (fewer if fewer are held), drawn at
    random, interleaved right, wrong, ...; over `capacity` the oldest right and oldest wrong pair go together.
    balanced=False (`--pair-filter random`, Table 2's "random sampling"): any pairs, in one pool (`right`),
    `pop(k)` draws k among all, oldest-first eviction. together=True (`--group-mode question`): a question's pairs
    leave together, so its critique group sees both labels: `pop(k)` draws k//2 questions (balanced: the same indices
    of both pools, which `push` keeps aligned: right[i] and wrong[i] judge one question). `state_dict()` is JSON-
    serialisable."""

    def __init__(self, capacity=4096, seed=0, balanced=True, together=False):
        if capacity < 2:
            raise ValueError(f"QRCache capacity must be >= 2, got {capacity}")
        self.capacity, self.balanced, self.rng = int(capacity), bool(balanced), random.Random(seed)
        self.together = bool(together)
        self.right, self.wrong = [], []  # in push order, oldest first (balanced=False: all in right)
        self.pushed = self.popped = self.evicted = 0

    def __len__(self):
        return len(self.right) + len(self.wrong)

    def push(self, pairs):  # dicts {question, response, label: bool, answer}
        pairs = list(pairs)
        right = [p for p in pairs if not self.balanced or p["label"]]
        wrong = [p for p in pairs if self.balanced and not p["label"]]
        if self.balanced and len(right) != len(wrong):
            raise ValueError(f"QRCache.push needs as many right as wrong pairs (the balance filter's output); "
                             f"got {len(right)} right, {len(wrong)} wrong")
        if self.balanced and self.together and any(r["question"] != w["question"] for r, w in zip(right, wrong)):
            raise ValueError("QRCache(together=True).push needs each question's right and wrong pair in the same "
                             "order (the balance filter's output)")
        self.right += right
        self.wrong += wrong
        self.pushed += len(pairs)
        while len(self) > self.capacity:  # evict the oldest pair of each pool (balanced: one right, one wrong)
            for pool in (p for p in (self.right, self.wrong) if p):
                pool.pop(0)
                self.evicted += 1

    def _take(self, pool, idx):
        """Remove and return the pairs at positions `idx` of `pool`, in that order (push order kept for the rest)."""
        chosen, gone = [pool[i] for i in idx], set(idx)
        pool[:] = [p for i, p in enumerate(pool) if i not in gone]
        return chosen

    def _draw(self, pool, k):  # k random positions of pool, no repeats
        return self.rng.sample(range(len(pool)), k)

    def pop(self, k):
        k = max(int(k), 0)
        if not self.balanced:
            if self.together:  # k//2 questions at random, all of each one's pairs
                units = question_units(self.right)
                chosen = self._take(self.right, [i for u in self.rng.sample(units, min(k // 2, len(units))) for i in u])
            else:
                chosen = self._take(self.right, self._draw(self.right, min(k, len(self.right))))
            self.popped += len(chosen)
            return chosen
        h = min(k // 2, len(self.right))
        if self.together:  # the same positions of both pools: each question's right and wrong pair
            idx = self._draw(self.right, h)
            right, wrong = self._take(self.right, idx), self._take(self.wrong, idx)
        else:
            right = self._take(self.right, self._draw(self.right, h))
            wrong = self._take(self.wrong, self._draw(self.wrong, h))
        self.popped += 2 * h
        return [p for rw in zip(right, wrong) for p in rw]

    def state_dict(self):
        version, internal, gauss = self.rng.getstate()
        return dict(capacity=self.capacity, balanced=self.balanced, together=self.together, right=list(self.right),
                    wrong=list(self.wrong), rng=[version, list(internal), gauss], pushed=self.pushed,
                    popped=self.popped, evicted=self.evicted)

    def load_state_dict(self, state):
        self.capacity, self.balanced = int(state["capacity"]), bool(state.get("balanced", True))
        self.together = bool(state.get("together", False))
        self.right, self.wrong = [dict(p) for p in state["right"]], [dict(p) for p in state["wrong"]]
        if self.balanced and len(self.right) != len(self.wrong):
            raise ValueError("QRCache state is not balanced (corrupt checkpoint?)")
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.pushed, self.popped, self.evicted = state["pushed"], state["popped"], state["evicted"]


# ----------------------------------------------------------------------------- first -> second order

PAIR_FILTERS = ("balance", "random")
GROUP_MODES = ("question", "per-prompt", "shared")  # train.py --group-mode (Trainer.group_of)


def question_units(pairs):
    """Positions of `pairs` by question, in first-seen order: [[i, j, ...], ...] (pairs of one question together)."""
    units = {}
    for i, p in enumerate(pairs):
        units.setdefault(p["question"], []).append(i)
    return list(units.values())


def pairs_from_rollout(samples, records, rewards, rng, pair_filter="balance"):
    """First-order samples (rollout.first_order_rollout) and their Eq. 1 rewards -> pairs {question, response,
    label, answer, id}. balance: reward.balance, the paper's filter. random (Table 2's "random sampling"): two
    per question too, drawn uniformly among its responses, uniform questions included: only the balance differs."""
    if len(samples) != len(rewards):
        raise ValueError(f"{len(samples)} samples but {len(rewards)} rewards")
    if pair_filter not in PAIR_FILTERS:
        raise ValueError(f"unknown pair filter {pair_filter!r}; valid: {', '.join(PAIR_FILTERS)}")
    by_q = {}  # q_index -> its sample indices, in first-seen order
    for i, s in enumerate(samples):
        by_q.setdefault(s["q_index"], []).append(i)
    qs, idx = list(by_q), list(by_q.values())
    scores = [[rewards[i] for i in ix] for ix in idx]
    chosen = (reward.balance(scores, rng) if pair_filter == "balance" else
              [(gi, ri, g[ri] > 0.5) for gi, g in enumerate(scores)
               for ri in rng.sample(range(len(g)), min(2, len(g)))])
    pairs = []
    for gi, ri, label in chosen:
        rec = records[qs[gi]]
        pairs.append(dict(question=rec["question"], response=samples[idx[gi][ri]]["text"], label=bool(label),
                          answer=str(rec["answer"]), id=f"{rec['id']}#r{ri}"))
    return pairs


def sample_critiques(sampler, tokenizer, pairs, m, stop_ids=None, **gen_kwargs):
    """Step 4: `m` critiques of each pair from the policy's Sampler (one `generate` call, prompt-major). One dict per
    critique {pair_index, pair_id, prompt_ids, tokens, logprobs, text, truncated, length, label}: unscored."""
    if not pairs:
        return []
    if stop_ids is None:
        from rollout import default_stop_ids
        stop_ids = default_stop_ids(tokenizer)
    prompts = critique_prompts(tokenizer, pairs)
    outs = sampler.generate(prompts, n=m, stop_ids=stop_ids, **gen_kwargs)
    return critique_outputs(tokenizer, pairs, prompts, outs, m)


def critique_prompts(tokenizer, pairs):
    return [critique_prompt(tokenizer, p["question"], p["response"]) for p in pairs]


def critique_outputs(tokenizer, pairs, prompts, outs, m):
    """sample_critiques' dicts from the Sampler's outputs for `prompts` (critique_prompts of `pairs`), m each."""
    if len(outs) != len(pairs) * m:
        raise RuntimeError(f"sampler returned {len(outs)} critiques for {len(pairs)} pairs x m={m}")
    return [dict(pair_index=o["prompt_index"], pair_id=pairs[o["prompt_index"]].get("id"),
                 prompt_ids=prompts[o["prompt_index"]], tokens=o["tokens"], logprobs=o["logprobs"],
                 text=tokenizer.decode(o["tokens"], skip_special_tokens=True), truncated=o["truncated"],
                 length=o["length"], label=bool(pairs[o["prompt_index"]]["label"])) for o in outs]


def sample_refinements(sampler, tokenizer, pairs, critiques, verdicts, k_ref, stop_ids=None, **gen_kwargs):
    """Denoising's self-corrections (Eq. 4): `k_ref` refinements of the judged response given each critique that has
    a verdict (one `generate` call; refine_prompt). Returns their texts, one list per critique ([] without a
    verdict). critiques: dicts with pair_index and text (sample_critiques)."""
    if any(p.get("answer") is None for p in pairs):
        raise ValueError("denoising (k_ref > 0) needs every pair's gold 'answer' to verify refinements")
    todo = [i for i, v in enumerate(verdicts) if v is not None]
    texts = [[] for _ in critiques]
    if not todo:
        return texts
    if stop_ids is None:
        from rollout import default_stop_ids
        stop_ids = default_stop_ids(tokenizer)
    prompts = [refine_prompt(tokenizer, pairs[critiques[i]["pair_index"]]["question"],
                             pairs[critiques[i]["pair_index"]]["response"], critiques[i]["text"]) for i in todo]
    for r in sampler.generate(prompts, n=k_ref, stop_ids=stop_ids, **gen_kwargs):
        texts[todo[r["prompt_index"]]].append(tokenizer.decode(r["tokens"], skip_special_tokens=True))
    return texts


def second_order_rollout(sampler, tokenizer, pairs, m, scheme="plain", p_correct=None, k_ref=0, stop_ids=None,
                         critiques=None, **gen_kwargs):
    """Steps 4-5 in one call (what eval.py measures critics with): sample_critiques (or take `critiques`, sampled
    with these gen_kwargs elsewhere, e.g. in one Sampler.generate_many call with other work), then each critique's
    verdict and reward.critique_rewards (Eq. 2 / 3 / 5 / 6; k_ref > 0: plus the Eq. 4 bonus from
    sample_refinements, seed + 1). One dict per critique: sample_critiques' keys and verdict, reward (bonus
    included), bonus, and with k_ref > 0 `refine_correct` (k) for a critique with a verdict."""
    if k_ref > 0 and any(p.get("answer") is None for p in pairs):
        raise ValueError("denoising (k_ref > 0) needs every pair's gold 'answer' to verify refinements")
    crits = sample_critiques(sampler, tokenizer, pairs, m, stop_ids=stop_ids, **gen_kwargs) if critiques is None \
        else critiques
    verdicts = [reward.extract_verdict(c["text"]) for c in crits]
    refinements = None
    if k_ref > 0 and crits:
        seed = gen_kwargs.get("seed")  # + 1: a different stream from the critiques'
        kw = dict(gen_kwargs, **({} if seed is None else {"seed": seed + 1}))
        refinements = sample_refinements(sampler, tokenizer, pairs, crits, verdicts, k_ref, stop_ids=stop_ids, **kw)
    golds = [pairs[c["pair_index"]].get("answer") for c in crits]
    rewards, bonuses, ks = reward.critique_rewards(verdicts, [c["label"] for c in crits], scheme, p_correct, k_ref,
                                                   refinements, golds)
    for c, v, r, b, k in zip(crits, verdicts, rewards, bonuses, ks):
        c.update(verdict=v, reward=r, bonus=b, **({"refine_correct": k} if k is not None else {}))
    return crits


# ----------------------------------------------------------------------------- static pairs (C-RL)

def build_static_pairs(sampler, tokenizer, records, k=10, seed=0, **gen):
    """C-RL's static pairs (§4): k responses per question sampled once from the starting policy, balance-filtered."""
    from rollout import first_order_rollout
    gen.setdefault("seed", seed)
    samples = first_order_rollout(sampler, tokenizer, records, k, **gen)
    rewards = [reward.response_reward(s["text"], records[s["q_index"]]["answer"]) for s in samples]
    pairs = pairs_from_rollout(samples, records, rewards, random.Random(seed))
    print(f"[critique] static pairs: {len(pairs)} from {len(records)} questions x {k} responses "
          f"(accuracy {sum(r > 0.5 for r in rewards) / max(len(rewards), 1):.3f})")
    return pairs


save_pairs = write_jsonl  # pairs as jsonl, atomically; load_pairs reads them back (train.py, eval.py use it)


_LABELS = {"right": True, "correct": True, "true": True, "1": True,
           "wrong": False, "incorrect": False, "false": False, "0": False}


def _pair(row, where, default_id):  # one jsonl row -> a pair, or a DataError naming `where`
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key in ("question", "response"):
        require_field(row, key, where)
    label = row.get("label")
    if not isinstance(label, bool):
        label = _LABELS.get(str(label).strip().lower()) if isinstance(label, (str, int)) else None
    if label is None:
        raise DataError(f"{where}: 'label' must be true/false (or right/wrong), got {row.get('label')!r}")
    answer = row.get("answer")
    return dict(row, label=label, answer=None if answer is None else str(answer), id=str(row.get("id", default_id)))


def load_pairs(path):
    """Pairs from a jsonl of {question, response, label[, answer, id]}; DataError naming file and row."""
    return [_pair(row, f"{path} row {i}", f"{Path(path).stem}-{i}")
            for i, row in enumerate(read_jsonl(path, "pairs"), 1)]


# ----------------------------------------------------------------------------- critique evaluation data

def _gsm8k_solutions(path, seed=0, limit=None):
    """Balanced pairs from a GSM8K model-solutions jsonl: one right, one wrong solution per question with both."""
    rng = random.Random(seed)
    stem, pairs = Path(path).stem, []
    for i, row in enumerate(read_jsonl(path, "gsm8k-solutions"), 1):
        where = f"{path} row {i}"
        require_field(row, "question", where)
        match = re.search(r"(?:^|\n)\s*A:\s*(.+?)\s*$", str(row.get("ground_truth", "")))
        if not match:
            raise DataError(f"{where}: 'ground_truth' does not end with an 'A: x' line")
        sols = {k: v for k, v in row.items() if isinstance(v, dict)}
        if not sols:
            raise DataError(f"{where}: no model solutions (dicts with 'is_correct' and 'solution')")
        right, wrong = [], []
        for name, s in sols.items():
            if not isinstance(s.get("is_correct"), bool) or not isinstance(s.get("solution"), str):
                raise DataError(f"{where}: solution {name!r} needs a bool 'is_correct' and a str 'solution'")
            (right if s["is_correct"] else wrong).append((name, s["solution"]))
        if right and wrong:
            for label, (name, text) in ((True, rng.choice(right)), (False, rng.choice(wrong))):
                pairs.append(dict(question=row["question"].strip(), response=text, label=label,
                                  answer=match.group(1).replace(",", ""), id=f"{stem}-{i - 1}:{name}"))
            if limit and len(pairs) >= 2 * limit:
                break
    if not pairs:
        raise DataError(f"{path}: no question has both a right and a wrong solution")
    return pairs


def load_critique_data(spec, seed=0, limit=None):
    """Critique evaluation pairs {question, response, label, answer, id} for a SPEC:
        gsm8k-solutions:PATH.jsonl   balanced: one right + one wrong model solution per question that has both
        jsonl:PATH                   rows {question, response, label[, answer, id]}
    `limit` caps the number of questions (gsm8k-solutions) or rows (jsonl)."""
    kind, _, arg = str(spec).partition(":")
    if kind == "gsm8k-solutions" and arg:
        return _gsm8k_solutions(arg, seed, limit)
    if kind == "jsonl" and arg:
        return load_pairs(arg)[:limit or None]
    raise DataError(f"unknown critique data spec {spec!r}; expected gsm8k-solutions:PATH.jsonl or jsonl:PATH")
