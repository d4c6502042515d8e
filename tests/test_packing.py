"""Shared-prompt packing (grpo.collate with share=True): a GRPO group's prompt is computed once, in one row
[prompt, c_1, ..., c_n] with restarted position ids and a 4-D mask. It must give the same per-token log-probs
and the same gradients as one row per sequence, on all four architectures the sampler runs, and one training
step with it must end at the same parameters as without it."""
import random
from types import SimpleNamespace

import pytest
import torch

import grpo
import runtime
from conftest import make_model

ARCHS = {  # small sliding windows, so that the packed mask's window is exercised (rows are up to ~30 positions)
    "llama": {}, "mistral": dict(sliding_window=6), "qwen3": {},
    "qwen2": dict(use_sliding_window=True, sliding_window=6, max_window_layers=1),  # layer 0 full, layer 1 windowed
}


def groups_batch(seed=0):
    """Sequences of 4 groups: one of a single completion, one with completions of length 1, one whose prompt is
    much longer than the others; shuffled, so packing has to find the groups."""
    rng = random.Random(seed)
    spec = [(5, [4, 7, 2, 9]), (3, [1, 1, 6]), (22, [3, 5]), (8, [6])]  # (prompt length, completion lengths)
    seqs = []
    for plen, lens in spec:
        prompt = [rng.randrange(250) for _ in range(plen)]
        seqs += [grpo.Completion(prompt_ids=prompt, tokens=[rng.randrange(250) for _ in range(n)]) for n in lens]
    rng.shuffle(seqs)
    return seqs


def logprobs(model, seqs, share, grad=False):
    pol = grpo.Policy(model)
    inputs, mask = grpo.collate(seqs, 258, "cpu", share=share, windows=grpo.mask_windows(model))
    with torch.set_grad_enabled(grad):
        logp, _ = pol(**inputs, temperature=0.8)
    return logp, mask, inputs


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_packed_logprobs_and_grads_equal_unpacked(arch):
    model = make_model(arch, **ARCHS[arch])
    seqs = groups_batch()
    (lp0, m0, in0), (lp1, m1, in1) = logprobs(model, seqs, False), logprobs(model, seqs, True)
    assert in0["input_ids"].shape[0] == len(seqs) and in1["input_ids"].shape[0] == 4  # one row per group
    assert in1["input_ids"].numel() < in0["input_ids"].numel()
    assert torch.equal(m0, m1)
    assert float(((lp0 - lp1).abs() * m0).max()) <= 1e-5
    # the same loss has the same gradient
    adv = torch.linspace(-1, 1, len(seqs))
    grads = []
    for share in (False, True):
        model.zero_grad()
        lp, mask, _ = logprobs(model, seqs, share, grad=True)
        loss, _ = grpo.grpo_loss(lp, lp.detach(), None, adv, mask)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert float((grads[0] - grads[1]).abs().max()) <= 1e-6 * max(1.0, float(grads[0].abs().max()))


def test_packed_mask_is_what_the_docstring_says():
    """Row [p0 p1 | a0 | b0 b1] for prompt p, completions a (2 tokens), b (3 tokens), plus a one-token completion
    (no input token of its own): each completion sees the prompt and itself, positions restart at 2."""
    seqs = [grpo.Completion(prompt_ids=[10, 11], tokens=t) for t in ([20, 21], [30, 31, 32], [40])]
    inputs, mask = grpo.collate(seqs, 0, "cpu", share=True)
    assert inputs["input_ids"].tolist() == [[10, 11, 20, 30, 31]]
    assert inputs["position_ids"].tolist() == [[0, 1, 2, 2, 3]]
    allowed = inputs["attention_mask"][0, 0].int().tolist()
    assert allowed == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 0, 1, 0], [1, 1, 0, 1, 1]]
    # targets are predicted from: the prompt's last position, then the completion's own positions
    assert inputs["index"].tolist() == [[1, 2, 0], [1, 3, 4], [1, 0, 0]]
    assert inputs["targets"].tolist() == [[20, 21, 0], [30, 31, 32], [40, 0, 0]]
    assert mask.tolist() == [[1, 1, 0], [1, 1, 1], [1, 0, 0]]


def test_packed_bf16_autocast_close_to_unpacked():
    """Under bf16 autocast the two layouts round differently; the log-probs stay within 0.05 nats per token."""
    model = make_model("llama")
    seqs = groups_batch(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (lp0, m0, _), (lp1, _, _) = logprobs(model, seqs, False), logprobs(model, seqs, True)
    assert float(((lp0 - lp1).abs() * m0).max()) <= 0.05


def best_split(lengths, n):
    """Brute force: the smallest biggest-run size (rows x the run's longest row) of any split of ascending
    `lengths` into at most n contiguous runs."""
    if not lengths:
        return 0
    if n <= 1:  # no run left for a non-empty rest: impossible
        return len(lengths) * lengths[-1] if n == 1 else float("inf")
    return min(max(j * lengths[j - 1], best_split(lengths[j:], n - 1)) for j in range(1, len(lengths) + 1))


def test_balanced_cap_is_the_best_split():
    rng = random.Random(0)
    for _ in range(300):
        lengths = sorted(rng.randrange(1, 60) for _ in range(rng.randrange(0, 9)))
        n = rng.randrange(1, 6)
        cap = grpo.balanced_cap(lengths, n)
        assert cap == best_split(lengths, n)
        starts = grpo.runs_at(lengths, cap) + [len(lengths)]
        assert len(starts) - 1 <= n and (starts == sorted(set(starts)) or not lengths)
        assert all((b - a) * lengths[b - 1] <= cap for a, b in zip(starts, starts[1:]) if b > a)


def test_micro_batches_keep_groups_whole_and_make_the_biggest_small():
    seqs = groups_batch()  # packed rows of 8, 13, 23 and 28 tokens; one row per sequence: 3, 3, 6, 8, 8, 11, 13, ...
    packed, singles = [8, 13, 23, 28], sorted(grpo.row_length(seqs, [i]) for i in range(len(seqs)))
    assert singles == [3, 3, 6, 8, 8, 11, 13, 13, 24, 26]
    for G, share, want in [(1, True, [112]), (2, True, [26, 56]), (8, True, [26, 23, 28]), (2, False, [91, 78])]:
        micro = grpo.plan_micro_batches(seqs, G, share)
        # padded tokens of each micro-batch: its rows x its longest row (what collate builds)
        sizes = [len(grpo.pack(mb, share)) * max((grpo.row_length(mb, r) for r in grpo.pack(mb, share)), default=0)
                 for mb in micro]
        assert sizes == want
        lengths = packed if share else singles
        assert max(sizes) == best_split(lengths, G)  # the biggest is the smallest any split into G can give,
        assert best_split(lengths, len(micro) - 1) > max(sizes)  # in the fewest passes
        assert sorted(map(id, sum(micro, []))) == sorted(map(id, seqs))
        for mb in micro:  # a packed group (same prompt) never split across micro-batches
            for other in micro:
                if share and other is not mb:
                    assert not {tuple(s.prompt_ids) for s in mb} & {tuple(s.prompt_ids) for s in other}


def test_micro_batch_count_every_rank_the_same():
    """Every rank runs as many micro-batches as the busiest one (their backward calls are collectives); DeepSpeed
    runs the count of its config (its engine divides by it and steps at its boundary)."""
    for deepspeed, busiest, want in ((False, 3, 3), (False, 5, 5), (True, 3, 8)):
        fake = SimpleNamespace(deepspeed=deepspeed, all_max=lambda n, b=busiest: max(n, b),
                               accelerator=SimpleNamespace(gradient_accumulation_steps=8))
        assert runtime.Runtime.micro_batch_count(fake, 3) == want
