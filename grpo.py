"""GRPO's math and the layout of its update (arXiv 2602.22765 §3 steps 6-7; GRPO, DAPO, Dr. GRPO): pure functions
of tensors and token lists, no Accelerate, no rollout.

    Completion          one sampled sequence and everything the update reads of it (defined once, here)
    grpo_advantages     step 6: A = (r - mean) / (std + eps) per group; groups with equal rewards flagged
    grpo_loss           step 7: the clipped-ratio loss, k3 KL, token-mean / seq-mean / dr-grpo normalisation
    pack, collate       the rows of one forward: each prompt once per group (--share-prompts), a 4-D mask
    plan_micro_batches  an update's rows cut into at most --grad-accum micro-batches of similar length
    logprob_batches     the no-grad forwards of old / reference log-probs: up to --logprob-batch sequences each
    Policy              the HF model + an fp32 LM head on the completion positions: log-probs of collate's rows

A packed row, worked. One prompt p = [p0 p1] with three completions of its group: a = [a0 a1], b = [b0 b1 b2],
c = [c0]. Each completion's last token is only ever a target, so the row holds the prompt once and every
completion but its last token:

    input_ids      p0  p1  a0  b0  b1          (c has no input token of its own)
    position_ids    0   1   2   2   3          (every completion restarts after the prompt)
    attends to     p0: p0 | p1: p0 p1 | a0: p0 p1 a0 | b0: p0 p1 b0 | b1: p0 p1 b0 b1
    targets        a: a0 a1 predicted at p1 a0;  b: b0 b1 b2 at p1 b0 b1;  c: c0 at p1

Output row n of collate (`index`, `targets`, `mask`) is completion n whatever the packing: the same log-probs
and gradients as one row per sequence, with the prompt computed once (tests/test_packing.py).
"""
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class Completion:
    """One sampled sequence on its way through a step; each field is set by the phase that knows it.

    sampled (steps 1, 4): prompt_ids, tokens (incl. a stop token), logprobs (the sampler's, per token: only for the
        `logprob_gap` check), text, truncated (no stop token within the budget), kind ("response" | "critique"),
        source (its question's / pair's index among this rank's of the step), question (the text of the question
        it answers or whose answer it judges), label (critiques: the judged response is right)
    scored (steps 2, 5): reward (Eq. 1; Eq. 2 / 3 / 5 / 6 plus the Eq. 4 bonus), verdict and bonus (critiques)
    step 6: group (the key of its GRPO group), advantage
    step 7: old_logprobs, ref_logprobs: per token, before the update and under the reference model (--beta)
    """
    prompt_ids: list
    tokens: list
    kind: str = "response"
    logprobs: list = field(default_factory=list)
    text: str = ""
    truncated: bool = False
    source: int = 0
    question: str = ""
    label: bool | None = None
    reward: float = 0.0
    verdict: str | None = None
    bonus: float = 0.0
    group: object = None
    advantage: float = 0.0
    old_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None

    @property
    def length(self):
        return len(self.tokens)

    @classmethod
    def sampled(cls, sample, kind, source, question, label=None):
        """From a sample dict of rollout.first_order_rollout / critique.sample_critiques."""
        return cls(prompt_ids=sample["prompt_ids"], tokens=sample["tokens"], kind=kind, logprobs=sample["logprobs"],
                   text=sample["text"], truncated=sample["truncated"], source=source, question=question, label=label)


# ============================================================================ step 6: advantages

def grpo_advantages(rewards, groups, scale=True, eps=1e-4):
    """GRPO advantages. rewards (N,), groups (N,) hashable group keys.
    A_i = (r_i - mean_g) / (std_g + eps) over the samples of i's group g (std: unbiased, as TRL and verl);
    scale=False gives Dr. GRPO's A_i = r_i - mean_g. A group whose rewards are all equal (or that has one
    sample) gets A = 0 and is flagged. Returns (adv (N,) float32, zero_std (N,) bool)."""
    r = torch.as_tensor(rewards, dtype=torch.float64)
    adv = torch.zeros_like(r)
    zero = torch.zeros(len(r), dtype=torch.bool)
    members = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    for idx in members.values():
        idx = torch.tensor(idx)
        rg = r[idx]
        if len(idx) < 2 or float(rg.max() - rg.min()) <= 1e-9:
            zero[idx] = True
            continue
        centred = rg - rg.mean()
        adv[idx] = centred / (rg.std() + eps) if scale else centred
    return adv.float(), zero


def unanimous_groups(completions):
    """Per GRPO group holding critiques (`group` set): True when all its critiques gave one verdict. Under per-pair
    groups such a group has zero spread and gives no gradient: a collapsing critic stops learning."""
    verdicts = {}
    for c in completions:
        if c.kind == "critique":
            verdicts.setdefault(c.group, set()).add(c.verdict)
    return [len(v) == 1 for v in verdicts.values()]


# ============================================================================ step 7: the loss

LOSS_TYPES = ("token-mean", "seq-mean", "dr-grpo")


def grpo_loss(logp, old_logp, ref_logp, adv, mask, epsilon=0.2, epsilon_high=None, beta=0.0,
              loss_type="token-mean", max_completion_length=None, num_tokens=None, num_seqs=None):
    """The clipped GRPO objective on (B, C) per-token log-probs.

        rho      = exp(logp - old_logp)
        per_tok  = -min(rho * A, clip(rho, 1 - epsilon, 1 + epsilon_high) * A) + beta * k3
        k3       = exp(ref - logp) - (ref - logp) - 1          (Schulman's k3 KL estimate; only when beta > 0)
        token-mean: sum(per_tok * mask) / num_tokens                       (DAPO; num_tokens = global count)
        seq-mean:   sum_i [sum_t per_tok * mask / len_i] / num_seqs        (original GRPO)
        dr-grpo:    sum(per_tok * mask) / (num_seqs * max_completion_length)

    adv (B,), mask (B, C) 0/1. num_tokens / num_seqs default to this batch's own counts; the trainer passes
    the counts of the whole update (all ranks, all micro-batches), so summing the losses of all pieces gives the
    loss of the whole batch. Returns (loss, stats) with stats = dict of floats: tokens, clipped (tokens where the
    clip is active), kl (sum of k3 over tokens)."""
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    mask = mask.to(logp.dtype)
    A = adv[:, None]  # (B, 1)
    ratio = torch.exp(logp - old_logp)
    per_tok = -torch.min(ratio * A, torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high) * A)
    kl = None
    if beta:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        per_tok = per_tok + beta * kl
    if loss_type == "token-mean":
        n = mask.sum() if num_tokens is None else num_tokens
        loss = (per_tok * mask).sum() / max(float(n), 1.0)
    elif loss_type == "seq-mean":
        n = mask.shape[0] if num_seqs is None else num_seqs
        loss = ((per_tok * mask).sum(1) / mask.sum(1).clamp(min=1)).sum() / max(float(n), 1.0)
    elif loss_type == "dr-grpo":
        if not max_completion_length:
            raise ValueError("loss_type 'dr-grpo' needs max_completion_length")
        n = mask.shape[0] if num_seqs is None else num_seqs
        loss = (per_tok * mask).sum() / (max(float(n), 1.0) * max_completion_length)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
    with torch.no_grad():
        clipped = ((ratio < 1 - epsilon) & (A < 0)) | ((ratio > 1 + epsilon_high) & (A > 0))
        stats = dict(tokens=float(mask.sum()), clipped=float((clipped * mask).sum()),
                     kl=float((kl * mask).sum()) if kl is not None else 0.0)
    return loss, stats


def per_token(seqs, values, like):
    """(N, C) like `like`: `values` (one list or 1-D tensor per sequence: old / reference / sampler log-probs)
    zero-padded to C; a dummy batch (no sequences) gives `like` detached."""
    if not seqs:
        return like.detach()
    out = torch.zeros_like(like)
    for n, v in enumerate(values):
        v = torch.as_tensor(v, dtype=like.dtype)[:like.shape[1]]
        out[n, :len(v)] = v.to(like.device)
    return out


# ============================================================================ packing: the rows of a forward

def pack(seqs, share=True):
    """Rows of a packed batch: lists of positions in `seqs`, those with the same prompt in one row (first-seen
    order); share=False: one sequence per row."""
    if not share:
        return [[i] for i in range(len(seqs))]
    rows = {}
    for i, s in enumerate(seqs):
        rows.setdefault(tuple(s.prompt_ids), []).append(i)
    return list(rows.values())


def row_length(seqs, row):
    """Input tokens of a packed row: the prompt once, then each completion but its last token (which only ever
    is a target)."""
    return len(seqs[row[0]].prompt_ids) + sum(max(len(seqs[i].tokens) - 1, 0) for i in row)


def mask_windows(lm):
    """How `lm`'s HF forward takes a custom attention mask: {layer type: sliding window or None} for models that
    read a dict of masks per layer type (Qwen2, Qwen3), else {None: window} for one mask (Llama, Mistral)."""
    cfg = lm.config
    if getattr(cfg, "model_type", "") in ("qwen2", "qwen3"):
        return {t: (cfg.sliding_window if t == "sliding_attention" else None) for t in set(cfg.layer_types)}
    return {None: getattr(cfg, "sliding_window", None)}


def collate(seqs, pad_id, device, share=True, windows=None):
    """Completions (prompt_ids, tokens) -> the keyword arguments of Policy.forward, plus `mask` (N, C).

    share=True packs the sequences that share a prompt (a GRPO group) into one row, as in the module docstring:
    position ids restart after the prompt for every completion, and a 4-D attention mask lets each completion see
    the prompt and its own earlier tokens only. Rows are right-padded; a padded position attends to itself only.
    Rows holding one sequence each need no mask (plain causal attention). windows: mask_windows(lm). No sequences
    (a rank with nothing to learn in a forward that must still join the collectives): one zero-weight dummy row."""
    if not seqs:
        inputs, mask = collate([Completion(prompt_ids=[pad_id], tokens=[pad_id])], pad_id, device)
        return inputs, mask * 0
    rows = pack(seqs, share)
    R, T = len(rows), max(row_length(seqs, r) for r in rows)
    C = max(max(len(s.tokens) for s in seqs), 1)
    ids = torch.full((R, T), pad_id, dtype=torch.long)
    pos = torch.zeros((R, T), dtype=torch.long)
    seg = torch.full((R, T), -2, dtype=torch.long)  # -1 prompt, k >= 0 the row's k-th completion, -2 padding
    index = torch.zeros((len(seqs), C), dtype=torch.long)
    targets = torch.zeros((len(seqs), C), dtype=torch.long)
    mask = torch.zeros((len(seqs), C))
    for r, row in enumerate(rows):
        prompt = list(seqs[row[0]].prompt_ids)
        P = len(prompt)
        ids[r, :P], pos[r, :P], seg[r, :P] = torch.tensor(prompt), torch.arange(P), -1
        off = P
        for k, i in enumerate(row):
            tok = list(seqs[i].tokens)
            L = len(tok)
            if L == 0:
                continue
            body = L - 1
            ids[r, off:off + body] = torch.tensor(tok[:-1], dtype=torch.long)
            pos[r, off:off + body], seg[r, off:off + body] = P + torch.arange(body), k
            index[i, :L] = r * T + torch.tensor([P - 1] + list(range(off, off + body)))
            targets[i, :L], mask[i, :L] = torch.tensor(tok, dtype=torch.long), 1
            off += body
    attn = _packed_mask(seg, pos, windows, device) if any(len(row) > 1 for row in rows) else None
    return dict(input_ids=ids.to(device), position_ids=pos.to(device), attention_mask=attn, index=index.to(device),
                targets=targets.to(device), valid=mask.bool().to(device)), mask.to(device)


def _packed_mask(seg, pos, windows, device):
    """The 4-D boolean mask (R, 1, T, T) of packed rows (seg: each position's segment, pos: its position id), or
    a dict of them per layer type (mask_windows)."""
    T = seg.shape[1]
    q, kk = seg[:, :, None], seg[:, None, :]  # (R, T, 1), (R, 1, T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    allowed = causal & (kk != -2) & ((kk == -1) | (kk == q))
    allowed |= torch.eye(T, dtype=torch.bool) & (q == -2)  # padding: itself (a query with no key gives NaN)
    dist = pos[:, :, None] - pos[:, None, :]  # (R, T, T) query position - key position

    def windowed(w):  # HF semantics: key j visible from query i iff i - j < window
        return (allowed if w is None else allowed & (dist < w))[:, None].to(device)  # (R, 1, T, T)
    windows = windows or {None: None}
    return windowed(windows[None]) if None in windows else {t: windowed(w) for t, w in windows.items()}


# ============================================================================ forwards of an update

def logprob_batches(seqs, size, share=True):
    """The no-grad log-prob forwards of `seqs` (old / reference log-probs): lists of positions in `seqs`, whole
    packed rows (a group never split), up to `size` sequences each (one row may hold more)."""
    pieces = [[]]
    for row in pack(seqs, share):
        if pieces[-1] and len(pieces[-1]) + len(row) > size:
            pieces.append([])
        pieces[-1] += row
    return [p for p in pieces if p]


def runs_at(lengths, cap):
    """Start indices of the fewest runs (micro-batches) of ascending row `lengths` whose padded size, rows x the
    run's longest row, is at most cap (a row over it goes alone): fill each run greedily."""
    out = [0]
    for j, n_tok in enumerate(lengths):
        if (j + 1 - out[-1]) * n_tok > cap and j > out[-1]:
            out.append(j)
    return out


def balanced_cap(lengths, n):
    """The smallest cap at which runs_at(lengths, cap) needs at most n runs (binary search)."""
    lo, hi = max(lengths, default=0), len(lengths) * max(lengths, default=0)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if len(runs_at(lengths, mid)) <= n else (mid + 1, hi)
    return lo


def plan_micro_batches(seqs, n, share=True):
    """An update's micro-batches: the packed rows (a group never split) sorted by length and cut into at most n
    runs whose biggest (padded tokens: rows x the longest row) is as small as can be, every run filled up to that
    size: each holds a share of the activations and little padding, and no pass is spent on less."""
    rows = sorted(((row_length(seqs, r), r) for r in pack(seqs, share)), key=lambda x: x[0])
    lengths = [k for k, _ in rows]
    starts = runs_at(lengths, balanced_cap(lengths, n)) + [len(rows)]
    return [[seqs[i] for _, row in rows[a:b] for i in row] for a, b in zip(starts, starts[1:])]


# ============================================================================ the trainer's log-probs

class Policy(torch.nn.Module):
    """The HF causal LM plus the trainer's log-prob head: what DDP wraps. forward() returns the fp32
    log-probs (N, C) of the completion tokens under temperature-scaled logits, and their entropy (N, C), one row
    per sequence of `collate`'s input (0 where `valid` is False). The LM head runs in fp32 outside autocast on
    the real completion positions only: never on the prompt, never on padding."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm
        self._no_split_modules = getattr(lm, "_no_split_modules", None)  # FSDP wraps (shards) one decoder layer each

    def tie_weights(self):
        """The LM's (head = embeddings). FSDP2's cpu-RAM-efficient prepare calls it after moving the model to meta
        and after loading rank 0's weights, both of which untie; without it the head becomes a second, untrained
        parameter."""
        self.lm.tie_weights()

    def forward(self, input_ids, index, targets, valid, temperature=1.0, position_ids=None, attention_mask=None):
        h = self.lm.model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                          use_cache=False).last_hidden_state  # (R, T, D)
        h = h.reshape(-1, h.shape[-1])[index[valid]]  # (M, D): the states that predict the M real targets
        head = self.lm.get_output_embeddings()
        with torch.autocast(device_type=h.device.type, enabled=False):
            bias = None if head.bias is None else head.bias.float()
            logits = F.linear(h.float(), head.weight.float(), bias) / temperature  # (M, V) fp32: no padding
            lse = torch.logsumexp(logits, -1)  # (M,)
            lp = logits.gather(-1, targets[valid][:, None])[:, 0] - lse
            with torch.no_grad():
                ent = lse - (torch.softmax(logits, -1) * logits).sum(-1)
        logp, entropy = lp.new_zeros(valid.shape), lp.new_zeros(valid.shape)  # (N, C), zero where not valid
        logp[valid], entropy[valid] = lp, ent
        return logp, entropy
