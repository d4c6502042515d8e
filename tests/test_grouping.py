"""GRPO grouping of responses and critiques (arXiv 2602.22765 §3, "mixed into the same group"): which samples
share a group under each --group-mode, the cache handing out a question's two pairs together, which critique-reward
options can act under which grouping (and the refusal where none can), and the all-agree share of critique groups."""
import itertools
from types import SimpleNamespace

import pytest
import torch

import config
import critique
import grpo
import reward
import train
from grpo import Completion


def completion(kind, question, source, reward_=0.0, label=None, verdict=None):
    return Completion(prompt_ids=[1], tokens=[2], kind=kind, question=question, source=source, reward=reward_,
                      label=label, verdict=verdict)


def hand_step(scheme="plain"):
    """One hand-built GC-RL step. Question A: 4 responses (2 right) and its two pairs from the cache (right: pair 0,
    wrong: pair 1), 3 critiques each; question B: no responses this step, its two pairs (2, 3) from an earlier
    step. Verdicts are mixed in every pair; rewards by Eq. 2 / 3 / 5 / 6 (reward.critique_reward)."""
    batch = [completion("response", "A", 0, r) for r in (1.0, 0.0, 1.0, 0.0)]
    pairs = [("A", True), ("A", False), ("B", True), ("B", False)]
    verdicts = {0: ["right", "right", "wrong"], 1: ["wrong", "right", "wrong"],
                2: ["right", "wrong", "wrong"], 3: ["wrong", "wrong", "right"]}
    for i, (q, label) in enumerate(pairs):
        for v in verdicts[i]:
            batch.append(completion("critique", q, i, reward.critique_reward(v, label, scheme, p_correct=0.3),
                                    label, v))
    return batch


def groups_of(batch, mode):
    trainer = SimpleNamespace(args=SimpleNamespace(group_mode=mode))
    return [train.Trainer.group_of(trainer, c) for c in batch]


def test_question_groups_mix_responses_and_critiques():
    batch = hand_step()
    g = groups_of(batch, "question")
    assert len(set(g[:4] + g[4:10])) == 1  # A's responses and the critiques of both A pairs: one group
    assert len(set(g[10:16])) == 1 and g[10] != g[0]  # B's two pairs: one group of their own
    p = groups_of(batch, "per-prompt")
    assert len(set(p)) == 5  # A's responses, then one group per pair
    assert len(set(p[4:7])) == 1 and p[4] != p[7] and p[4] != p[0]
    assert set(groups_of(batch, "shared")) == {"step"}


def advantages(batch, mode, scale):
    adv, _ = grpo.grpo_advantages([c.reward for c in batch], groups_of(batch, mode), scale)
    return adv


@pytest.mark.parametrize("mode,scale", itertools.product(critique.GROUP_MODES, (True, False)))
def test_which_reward_options_act_under_which_grouping(mode, scale):
    """Eq. 3 / 5 / 6 against Eq. 2's advantages on the same verdicts: identical exactly where config refuses them
    (per-pair groups, std scaling: every critique group is 0 or one constant), different everywhere else."""
    plain = advantages(hand_step("plain"), mode, scale)
    for scheme in ("reweight", "precision", "recall"):
        adv = advantages(hand_step(scheme), mode, scale)
        same = torch.allclose(adv, plain, atol=1e-3)
        args = SimpleNamespace(group_mode=mode, scale_rewards=scale, critique_reward=scheme)
        assert same == bool(config.inert_reward_flags(args)), (mode, scale, scheme)
    if mode == "question":  # Eq. 2's 0.7 against a response's 1.0 acts too: 1.0 for critiques is another update
        ones = hand_step()
        for c in ones[4:]:
            c.reward = 1.0 if c.reward else 0.0
        assert not torch.allclose(advantages(ones, mode, scale), plain, atol=1e-3)


def parse(*flags):
    return config.build_parser().parse_args(["--mode", "gc", *flags])


def test_inert_reward_options_are_refused_naming_the_flags():
    for scheme in ("reweight", "precision", "recall"):
        with pytest.raises(config.ConfigError) as e:
            config.plan(parse("--group-mode", "per-prompt", "--critique-reward", scheme))
        msg = str(e.value)
        assert f"--critique-reward {scheme}" in msg and "--group-mode question" in msg and "--scale-rewards" in msg
        config.plan(parse("--group-mode", "per-prompt", "--critique-reward", scheme, "--scale-rewards", "false"))
        config.plan(parse("--critique-reward", scheme))  # the default grouping: question
        config.plan(parse("--group-mode", "shared", "--critique-reward", scheme))
    config.plan(parse("--group-mode", "per-prompt", "--denoise", "1"))  # Eq. 4's bonus varies within a pair
    with pytest.raises(config.ConfigError, match="--pairs-per-step 3 with --group-mode question"):
        config.plan(parse("--pairs-per-step", "3"))
    with pytest.raises(config.ConfigError, match="--pairs-per-step 6 with --group-mode question"):
        config.plan(parse("--pairs-per-step", "6", "--questions-per-step", "4"), world=2)
    assert parse().group_mode == "question"


def couple(q):
    return [dict(question=q, response=f"{q} right", label=True), dict(question=q, response=f"{q} wrong", label=False)]


def test_cache_together_pops_both_pairs_of_a_question():
    cache = critique.QRCache(seed=3, together=True)
    for q in "ABCDEFGH":
        cache.push(couple(q))
    seen = []
    while len(cache):
        out = cache.pop(4)
        assert len(out) == 4
        for right, wrong in zip(out[::2], out[1::2]):  # right, wrong of ONE question, each time
            assert right["question"] == wrong["question"] and right["label"] and not wrong["label"]
            seen.append(right["question"])
        assert len(cache.right) == len(cache.wrong)
        assert all(r["question"] == w["question"] for r, w in zip(cache.right, cache.wrong))  # still aligned
    assert sorted(seen) == list("ABCDEFGH")
    loose = critique.QRCache(seed=3)  # the per-pair cache draws right and wrong independently
    for q in "ABCDEFGH":
        loose.push(couple(q))
    out = [loose.pop(2) for _ in range(4)]
    assert any(a["question"] != b["question"] for a, b in out)
    with pytest.raises(ValueError, match="same order"):  # right [A, B] against wrong [B, A]: misaligned
        cache.push([couple("A")[0], couple("B")[0], couple("B")[1], couple("A")[1]])


def test_cache_together_random_filter_and_round_trip():
    cache = critique.QRCache(seed=1, balanced=False, together=True)
    for q in "ABCD":  # --pair-filter random: two pairs per question, labels as drawn
        cache.push([dict(question=q, response=f"{q}1", label=True), dict(question=q, response=f"{q}2", label=True)])
    state = cache.state_dict()
    out = cache.pop(4)
    assert len(out) == 4 and len({p["question"] for p in out}) == 2
    assert all(sum(p["question"] == q for p in out) == 2 for q in {p["question"] for p in out})
    back = critique.QRCache()
    back.load_state_dict(state)
    assert back.together and back.pop(4) == out  # a resumed run pops the same questions


def test_static_pairs_stream_by_question():
    pairs = couple("A") + couple("B") + couple("C")
    assert critique.question_units(pairs) == [[0, 1], [2, 3], [4, 5]]


def test_unanimous_groups_on_hand_made_verdicts():
    batch = hand_step()
    for c, g in zip(batch, groups_of(batch, "per-prompt")):
        c.group = g
    assert grpo.unanimous_groups(batch) == [False] * 4  # every pair's verdicts are mixed
    for c in batch[4:7] + batch[10:13]:
        c.verdict = "wrong"
    assert grpo.unanimous_groups(batch) == [True, False, True, False]
    for c, g in zip(batch, groups_of(batch, "question")):
        c.group = g
    assert grpo.unanimous_groups(batch) == [False, False]  # pair 1 still says "right" once; so does pair 3
    for c in batch[4:]:
        c.verdict = "wrong"
    assert grpo.unanimous_groups(batch) == [True, True]  # a collapsed critic
    assert grpo.unanimous_groups(batch[:4]) == []  # no critiques, no critique groups
