"""A hand-written batched KV-cache sampler over the policy's own parameters, and the first-order rollout.

    model, tok = models.load_policy("smollm2-135m")    # or any HF id / local checkpoint dir
    sampler = Sampler(model, max_batch=64, max_len=1024)
    out = sampler.generate([ids_a, ids_b], n=4, max_new_tokens=128, temperature=1.0,
                           stop_ids=default_stop_ids(tok), seed=0)
    # prompt-major: out[0..3] are prompt a's samples, out[4..7] prompt b's
    greedy, samples = sampler.generate_many([dict(prompts=[ids_a], n=1, temperature=0),
                                             dict(prompts=[ids_a], n=4, seed=1)])  # a prefilled once for both

Why not `model.generate`? RL samples many completions of few prompts with weights the trainer updates every
step. The `Sampler` runs the decoder itself, over the HF module's parameters in place (no copy, no weight sync):
  - its `KVCache` is one preallocated (L, B, T, Hkv, D) tensor per K and V, reused across calls until `release()`;
  - each distinct prompt is prefilled once into its n rows, a head common to all prompts once for all rows;
    no padding: rows hold their tokens at positions 0..len-1, decode uses per-row positions and a mask;
  - finished rows leave the batch at once (`RowState.keep`), so the decode batch shrinks;
  - decode attention is `flash_attn_with_kvcache` on CUDA with flash-attn installed, else SDPA with a mask;
    on CPU a prompt's n rows attend to its shared prompt KV at once (`Sampler.share_prompts`).
Supported: Llama-family decoders (llama, mistral, qwen2, qwen3) with RoPE whose frequencies are static.
Not done: CUDA graphs / torch.compile, speculative decoding, paged KV.
"""
import contextlib
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from models import ModelError, load_policy, resolve_model  # noqa: F401  (re-exported: eval.py loads through here)

try:  # optional fast attention on CUDA (requirements-gpu.txt)
    from flash_attn import flash_attn_with_kvcache
    FLASH_ERROR = None
except ImportError as e:  # CPU, or CUDA without flash-attn (or a build for another torch / CUDA): SDPA
    flash_attn_with_kvcache, FLASH_ERROR = None, f"{type(e).__name__}: {e}"
FLASH_DEVICES = {"cuda"}  # where decode calls flash_attn_with_kvcache; tests add "cpu" (tests/flash_stub.py)
_FLASH_CPU = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")  # see _attention

# ----------------------------------------------------------------------------- stop tokens


def default_stop_ids(tokenizer):
    """eos plus the end-of-turn tokens the tokenizer knows (`<|im_end|>`, `<|endoftext|>`, ...)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    vocab = tokenizer.get_vocab()
    ids += [vocab[t] for t in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>", "</s>")
            if t in vocab]
    return sorted(set(ids))


# ----------------------------------------------------------------------------- the model, as we read it

ARCHS = ("llama", "mistral", "qwen2", "qwen3")  # model_type values the Sampler runs


def _spec(model):
    """What the forward needs to know about `model` (an HF *ForCausalLM) beyond its weights."""
    cfg = model.config
    mt = getattr(cfg, "model_type", type(model).__name__)
    if mt not in ARCHS or not hasattr(model, "model") or not hasattr(model.model, "layers"):
        raise NotImplementedError(f"Sampler supports model types {', '.join(ARCHS)} (Llama-family decoders); "
                                  f"got '{mt}'")
    rope, attn = model.model.rotary_emb, model.model.layers[0].self_attn
    rope_type = getattr(rope, "rope_type", "default")
    if "dynamic" in str(rope_type) or rope_type == "longrope":
        raise NotImplementedError(f"Sampler supports RoPE whose frequencies are static; got rope_type '{rope_type}'")
    if rope.inv_freq.numel() * 2 != attn.head_dim:
        raise NotImplementedError("Sampler does not support partial rotary embeddings")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise NotImplementedError(f"Sampler supports SwiGLU (hidden_act 'silu'); got '{cfg.hidden_act}'")
    # per-layer sliding window (None = full attention), HF semantics: key j visible from query i iff i - j < window
    windows = ([cfg.sliding_window] * cfg.num_hidden_layers if mt == "mistral" else
               [getattr(layer.self_attn, "sliding_window", None) for layer in model.model.layers])
    return dict(model_type=mt, n_layers=cfg.num_hidden_layers, n_heads=cfg.num_attention_heads,
                n_kv=cfg.num_key_value_heads, head_dim=attn.head_dim, scale=attn.scaling,
                qk_norm=hasattr(attn, "q_norm"), windows=windows,
                rope_scaling=float(getattr(rope, "attention_scaling", 1.0)))


def _rope(x, cos, sin):
    """HF's x * cos + rotate_half(x) * sin, the sign folded into `sin`. x (N, H, D); cos/sin (N, 1, D)."""
    half = x.shape[-1] // 2
    return torch.addcmul(x * cos, torch.cat((x[..., half:], x[..., :half]), dim=-1), sin)


def _inverse_cdf(probs, u, block=256):
    """One sample per row of `probs` (A, V) by inverse CDF in two levels, in fp64: a block of `block` tokens, then a
    token inside it; `u` (A,) fp64 in [0, 1): each row's uniform. Accurate to fp32 rounding (one fp32 cumsum over V
    would drop tokens below ~1e-7 of the mass), never a zero-probability token: ~20x faster than torch.multinomial
    on CPU."""
    A, V = probs.shape
    nb = -(-V // block)
    if nb * block != V:
        probs = F.pad(probs, (0, nb * block - V))
    pb = probs.view(A, nb, block)
    cb = pb.sum(-1).double().cumsum(-1)  # (A, nb): mass up to and including each block
    u = u[:, None] * cb[:, -1:]
    b = torch.searchsorted(cb, u, right=True).clamp_(max=nb - 1)  # (A, 1): first block with cdf > u
    lo = torch.where(b > 0, cb.gather(1, (b - 1).clamp(min=0)), 0.0)
    frac = (u - lo) / (cb.gather(1, b) - lo)  # in [0, 1): where u falls inside block b
    cw = pb[torch.arange(A, device=probs.device), b[:, 0]].double().cumsum(-1)  # (A, block)
    i = torch.searchsorted(cw, frac * cw[:, -1:], right=True).clamp_(max=block - 1)
    return (b * block + i)[:, 0]


def _additive(allowed, dtype):
    """bool mask (N, T) -> additive mask (N, 1, 1, T) for SDPA (0 where allowed, -inf elsewhere)."""
    out = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, -math.inf)
    return out[:, None, None]


def _attention(q, k, v, mask, scale):
    """Decode attention on CPU: softmax(q k^T * scale + mask) v and each query's fp32 log-sum-exp (to merge two
    softmaxes), by torch's CPU flash kernel, else matmuls. q (B, H, M, D); k/v (B, H, T, D); mask (B, 1, 1, T)."""
    if _FLASH_CPU and q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=mask,
                                                                          scale=scale)
    s = torch.matmul(q, k.transpose(-1, -2)).float().mul_(scale).add_(mask)  # (B, H, M, T) fp32
    lse = torch.logsumexp(s, -1)
    return torch.matmul(torch.exp(s - lse[..., None]).to(v.dtype), v), lse


def _sample(logits, temperature, top_p, top_k, u):
    """logits (A, V) fp32 -> (tokens (A,), log-probs (A,) fp32): log_softmax(logits / T) of the chosen token,
    before top-k / top-p filtering; greedy (T = 0) reports them at T = 1. `temperature`: one float for every row, or
    (A,) per row (a generate_many chunk mixing requests). `u()`: each row's uniform (A,) fp64, drawn only to sample."""
    if not torch.is_tensor(temperature):
        return _greedy(logits) if temperature == 0 else _draw(logits, temperature, top_p, top_k, u())
    tok, lp = torch.empty_like(temperature, dtype=torch.long), torch.empty_like(temperature)
    greedy = temperature == 0
    if bool(greedy.any()):
        tok[greedy], lp[greedy] = _greedy(logits[greedy])
    if not bool(greedy.all()):
        s = ~greedy
        tok[s], lp[s] = _draw(logits[s], temperature[s][:, None], top_p, top_k, u()[s])
    return tok, lp


def _greedy(logits):
    tok = logits.argmax(-1)
    return tok, torch.log_softmax(logits, -1).gather(1, tok[:, None])[:, 0]


def _draw(logits, temperature, top_p, top_k, u):
    """One sampled token per row at `temperature` (a float or (A, 1)), `u` (A,) the rows' uniforms."""
    logits = logits / temperature if torch.is_tensor(temperature) or temperature != 1 else logits
    probs, filt = torch.softmax(logits, -1), logits  # (A, V) fp32
    if 0 < top_k < logits.shape[-1]:
        filt = filt.masked_fill(filt < torch.topk(logits, top_k, dim=-1).values[:, -1:], -math.inf)
    if top_p < 1.0:  # keep the smallest prefix (by probability) whose mass reaches top_p
        srt, idx = torch.sort(filt, dim=-1, descending=True)
        p = torch.softmax(srt, -1)
        drop = (p.cumsum(-1) - p) >= top_p
        filt = filt.masked_fill(torch.zeros_like(drop).scatter_(1, idx, drop), -math.inf)
    tok = _inverse_cdf(probs if filt is logits else torch.softmax(filt, -1), u)
    return tok, torch.log(probs.gather(1, tok[:, None]))[:, 0]


def _shared_attention(q, kc, vc, masks, share, scale):
    """A prompt's n rows hold the same prompt KV: their queries (n * G per kv head) attend to one copy at once
    (4x less KV read at n = 4), each row's own tokens apart, the two softmaxes merged by their log-sum-exps.
    q (A, Hkv, G, D); kc/vc (A, T', Hkv, D) -> (A, Hkv, G, D)."""
    _, Hkv, G, D = q.shape
    ng, nmax, lead, at, Pmin, Pmax = (share[x] for x in ("ng", "nmax", "lead", "at", "pmin", "pmax"))
    T = Pmin + masks["s"].shape[-1]
    qg = q.new_zeros(ng * nmax, Hkv, G, D).index_copy_(0, at, q)
    qg = qg.view(ng, nmax, Hkv, G, D).transpose(1, 2).reshape(ng, Hkv, nmax * G, D)
    kp, vp = kc[lead, :Pmax].transpose(1, 2), vc[lead, :Pmax].transpose(1, 2)  # (ng, Hkv, Pmax, D)
    o1, lse1 = _attention(qg, kp, vp, masks["p"], scale)  # (ng, Hkv, nmax * G, D), (ng, Hkv, nmax * G)
    o1 = o1.view(ng, Hkv, nmax, G, D).transpose(1, 2).reshape(ng * nmax, Hkv, G, D)[at]  # back to rows
    lse1 = lse1.view(ng, Hkv, nmax, G).transpose(1, 2).reshape(ng * nmax, Hkv, G)[at]
    o2, lse2 = _attention(q, kc[:, Pmin:T].transpose(1, 2), vc[:, Pmin:T].transpose(1, 2), masks["s"], scale)
    w1 = torch.sigmoid(lse1 - lse2)[..., None]  # = e^lse1 / (e^lse1 + e^lse2)
    return torch.lerp(o2.float(), o1.float(), w1).to(q.dtype)  # o2 + w1 (o1 - o2)


def _share_groups(group, plen):
    """The live rows' prompt groups for shared-prompt attention (group (A,): each row's prompt; plen (A,): its
    length): how many, their rows' slots, a lead row per group; None when every prompt has one row."""
    uniq, gi, counts = torch.unique(group, return_inverse=True, return_counts=True)
    nmax, ng = int(counts.max()), len(uniq)
    if nmax == 1:
        return None
    order = torch.argsort(gi, stable=True)
    first = torch.cumsum(counts, 0) - counts  # index into `order` of each group's first row
    pos = torch.empty_like(gi)
    pos[order] = torch.arange(len(gi), device=gi.device) - first[gi[order]]
    lead = order[first]  # one row per group (its rows all hold the prompt's KV)
    gplen = plen[lead]
    if torch.equal(lead, torch.arange(ng, device=lead.device) * nmax):  # e.g. before any row finished:
        lead = slice(0, ng * nmax, nmax)  # a strided view of the cache instead of a gather
    return dict(ng=ng, nmax=nmax, lead=lead, at=gi * nmax + pos, gplen=gplen, plen=plen,
                pmin=int(plen.min()), pmax=int(gplen.max()))


def _packed_layout(lengths, rows, start, dev):
    """Where the tokens of prompts prefilled in one pass go (Sampler._prefill_packed): `lengths` of the prompts
    (after a common prefix of `start` tokens), `rows` [(r0, r1)] each prompt's cache rows. Returns pos (N,) each
    packed token's position; tok_i, row_i (M = sum of P_i x rows_i): the token and the cache row of each k/v write
    (every row of its prompt); bounds [(a, b)] each prompt's slice of the packed tokens; ends (n,) their ends."""
    lens = torch.tensor(lengths, device=dev)
    seg = torch.repeat_interleave(torch.arange(len(lengths), device=dev), lens)  # (N,): each token's prompt
    ends = torch.cumsum(lens, 0)
    pos = torch.arange(len(seg), device=dev) - (ends - lens)[seg] + start  # (N,) positions
    n_rows = torch.tensor([r1 - r0 for r0, r1 in rows], device=dev)
    r0 = torch.tensor([r0 for r0, _ in rows], device=dev)
    tok_i = torch.repeat_interleave(torch.arange(len(seg), device=dev), n_rows[seg])  # (M,)
    row_i = r0[seg[tok_i]] + (torch.arange(len(tok_i), device=dev)
                              - torch.repeat_interleave(torch.cumsum(n_rows[seg], 0) - n_rows[seg], n_rows[seg]))
    return pos, tok_i, row_i, list(zip((ends - lens).tolist(), ends.tolist())), ends


# ----------------------------------------------------------------------------- generate_many's requests


def _requests(requests, max_len):
    """generate_many's requests with generate's defaults filled in, checked, and a seed each (drawn from torch's
    generator where None, so torch.manual_seed reproduces it)."""
    reqs = [dict(dict(n=1, max_new_tokens=256, temperature=1.0, seed=None), **r) for r in requests]
    for r in reqs:
        if r["temperature"] < 0 or r["max_new_tokens"] < 1 or r["n"] < 1:
            raise ValueError("need temperature >= 0, max_new_tokens >= 1, n >= 1")
        for p in r["prompts"]:
            if not 0 < len(p) < max_len:
                raise ValueError(f"prompt length {len(p)} must be in 1..{max_len - 1} (Sampler max_len)")
        if r["seed"] is None:
            r["seed"] = int(torch.randint(0, 2**62, (1,)))
    return reqs


def _plan(reqs, max_batch):
    """(the distinct prompts, chunks): every row as (distinct prompt, request, its row index there), a distinct
    prompt's rows together (first seen first), whole prompts per chunk of <= max_batch rows where they fit."""
    uniq, blocks = {}, []
    for q, r in enumerate(reqs):
        for p, ids in enumerate(r["prompts"]):
            g = uniq.setdefault(tuple(ids), len(uniq))
            if g == len(blocks):
                blocks.append([])
            blocks[g] += [(g, q, p * r["n"] + j) for j in range(r["n"])]
    chunks = [[]]
    for block in blocks:
        for i in range(0, len(block), max_batch):  # a prompt with more rows than max_batch is split
            piece = block[i:i + max_batch]
            if chunks[-1] and len(chunks[-1]) + len(piece) > max_batch:
                chunks.append([])
            chunks[-1] += piece
    return [list(ids) for ids in uniq], chunks


def _uniforms(reqs, req, draw, t):
    """Decode step t's uniform (A,) fp64 of rows from requests `req` (A,) with row indices `draw` (A,) there:
    U(seed, t)[j] of the row's request, so a row draws the same whatever else shares its call or chunk."""
    u = torch.zeros(len(req), dtype=torch.float64, device=req.device)
    for q in req.unique().tolist():
        r, mine = reqs[q], req == q
        gen = torch.Generator().manual_seed(hash((r["seed"], t)) & (2**63 - 1))  # tuples of ints: stable hashes
        u[mine] = torch.rand(len(r["prompts"]) * r["n"], dtype=torch.float64, generator=gen)[draw[mine].cpu()].to(
            req.device)
    return u


# ----------------------------------------------------------------------------- the sampler

# prompt tokens per prefill pass: a pass has a fixed cost (~600 small ops) that short prompts do not amortise;
# beyond ~512 tokens a pass is compute-bound anyway (SmolLM2-135M on a 2-core CPU)
PREFILL_TOKENS = 512


class KVCache:
    """K and V of every layer, `k`/`v` (L, B, T, Hkv, D), zero-filled once (a masked-out NaN would leak through the
    softmax-weighted sum as 0 * NaN); during a decode, `seqlens` (A,): tokens held by live rows 0..A-1."""

    def __init__(self, shape, dtype, device):
        # memory order: as is on CUDA (what flash-attn reads); head-major (L, B, Hkv, T, D) on CPU, so attention
        # reads each head's keys contiguously (8% faster per bf16 decode step, BENCHMARKS.md). Its own inverse.
        order = (0, 1, 2, 3, 4) if device.type == "cuda" else (0, 1, 3, 2, 4)
        self.k, self.v = (torch.zeros([shape[d] for d in order], dtype=dtype, device=device).permute(order)
                          for _ in "kv")
        self.seqlens = None

    def compact(self, holes, movers, n):
        """Move rows `movers` into rows `holes` (M,), then keep rows 0..n-1."""
        if holes.numel():
            used = int(self.seqlens[movers].max())
            for layer in (*self.k, *self.v):  # one layer at a time: the gathered temporary is one layer's rows
                layer[holes, :used] = layer[movers, :used]
            self.seqlens[holes] = self.seqlens[movers]
        self.seqlens = self.seqlens[:n]


class RowState:
    """The R rows of a chunk while they decode. By output row: `tokens`, `logprobs` (R, max_new), `length`,
    `stopped` (R,). By cache row, for the A live rows, always rows 0..A-1 of `cache`: `row` (the output row),
    `tok` (the last sampled token), `limit` (the new-token budget), `group` (the prompt), `plen` (its length).
    `max_new` (R,): each row's budget (rows of a generate_many call may differ)."""
    SLOTS = ("row", "tok", "limit", "group", "plen")

    def __init__(self, cache, group, plen, max_new, max_len):
        R, dev = len(group), group.device
        self.cache, self.group, self.plen, self.tok = cache, group, plen, None
        cache.seqlens = plen.clone()  # the rows' KV: their prompts
        width = int(max_new.max())
        self.tokens = torch.zeros(R, width, dtype=torch.long, device=dev)
        self.logprobs = torch.zeros(R, width, dtype=torch.float32, device=dev)
        self.length = torch.zeros(R, dtype=torch.long, device=dev)
        self.stopped = torch.zeros(R, dtype=torch.bool, device=dev)
        self.row, self.limit = torch.arange(R, device=dev), torch.minimum(max_len - plen, max_new)

    def record(self, t, tok, lp, stop):
        """Store decode step t's tokens and log-probs (A,); a row finishes on a stop token or at its budget.
        Returns the finished rows' mask (A,), or None if none finished."""
        self.tokens[self.row, t], self.logprobs[self.row, t] = tok, lp
        self.tok = tok
        hit_stop = torch.isin(tok, stop) if stop.numel() else torch.zeros_like(tok, dtype=torch.bool)
        done = hit_stop | (t + 1 >= self.limit)
        if not bool(done.any()):
            return None
        self.length[self.row[done]] = t + 1
        self.stopped[self.row[hit_stop]] = True
        return done

    def keep(self, keep):
        """Keep the live rows where `keep` (A,), as rows 0..A'-1: the last kept rows move into the dropped rows
        below A', with their KV (so only the moved rows are copied). Returns A'."""
        A = int(keep.sum())
        holes = torch.nonzero(~keep[:A])[:, 0]
        movers = torch.nonzero(keep[A:])[:, 0] + A
        self.cache.compact(holes, movers, A)
        for name in self.SLOTS:
            x = getattr(self, name)
            if holes.numel():
                x[holes] = x[movers]
            setattr(self, name, x[:A])
        return A

    def results(self, prompt_index):
        toks, lps, lens, stp = self.tokens.tolist(), self.logprobs.tolist(), self.length.tolist(), self.stopped.tolist()
        return [dict(prompt_index=p, tokens=toks[i][:lens[i]], logprobs=lps[i][:lens[i]], length=lens[i],
                     truncated=not stp[i]) for i, p in enumerate(prompt_index)]


class Sampler:
    """Batched sampling over `model`'s own parameters (see module doc). `model`: the plain HF *ForCausalLM
    (unwrapped); it may change between calls (an optimizer step, a dtype or device move): only KV memory is kept.
    `max_batch`: rows decoded at once (more run in chunks); `max_len`: prompt + completion tokens per row (then
    truncated). `dtype`: compute in it, not the model's (bf16 from fp32 master weights: each call casts the weights
    once, a copy freed when it returns). `stats` after each generate(): prefill_s, decode_s, tokens, rows."""

    def __init__(self, model, max_batch=64, max_len=1024, dtype=None):
        self.model, self.spec = model, _spec(model)
        self.max_batch, self.max_len = max_batch, max_len
        self.dtype = dtype  # compute dtype; None: the model's own
        self._cast = {}  # during a call: id(parameter) -> its copy in the compute dtype (see _weights)
        self.share_prompts = True  # shared-prompt decode attention on CPU (see _shared_attention)
        self.cache = None  # a KVCache
        self.stats = {}
        self._told = False  # attention_path() printed (once, at the first generate)

    compute_dtype = property(lambda self: self.dtype or self.model.lm_head.weight.dtype)

    def attention_path(self):
        """Which decode attention this sampler runs, in words (a failed flash-attn install shows here)."""
        device = self.model.lm_head.weight.device
        if self._use_flash():
            return f"{device.type.upper()}: flash_attn_with_kvcache"
        if device.type != "cuda":
            kernel = "torch's CPU flash kernel" if _FLASH_CPU else "matmul softmax"
            return f"CPU: SDPA prefill, decode with {kernel}" + (" over shared prompts" if self.share_prompts else "")
        if flash_attn_with_kvcache is None:
            return f"CUDA: SDPA with a mask (flash-attn not importable: {FLASH_ERROR})"
        return f"CUDA: SDPA with a mask (flash-attn takes fp16 / bf16 only; sampling in {self.compute_dtype})"

    def _use_flash(self):
        """flash_attn_with_kvcache importable, on a device it runs on, and a dtype it takes (fp16 / bf16)."""
        return (flash_attn_with_kvcache is not None and self.model.lm_head.weight.device.type in FLASH_DEVICES
                and self.compute_dtype in (torch.float16, torch.bfloat16))

    def release(self):
        """Free the KV cache (a trainer calls this after sampling, so it is not held through the update)."""
        self.cache = None

    def _ensure_cache(self, batch, length):
        """Allocate (or grow, to the max of old and new needs) the cache to hold `batch` rows of `length` tokens."""
        dtype, device, s = self.compute_dtype, self.model.lm_head.weight.device, self.spec
        if self.cache is not None:
            k = self.cache.k
            if k.shape[1] >= batch and k.shape[2] >= length and k.dtype == dtype and k.device == device:
                return
            batch, length = max(batch, k.shape[1]), max(length, k.shape[2])
        self.cache = None  # freed before the new one is allocated
        length = min(self.max_len, -(-length // 64) * 64)  # round up: fewer reallocations
        self.cache = KVCache((s["n_layers"], batch, length, s["n_kv"], s["head_dim"]), dtype, device)

    @contextlib.contextmanager
    def _weights(self):
        """Around one call: copies of the parameters not in the compute dtype (none: read in place), freed after."""
        dtype = self.compute_dtype
        self._cast = {id(t): t.detach().to(dtype) for t in self.model.parameters()
                      if t.is_floating_point() and t.dtype != dtype}
        try:
            yield
        finally:
            self._cast = {}

    def _rope_table(self, length, dtype, device):
        """cos, sin (length, D) for positions 0..length-1, computed like HF (fp32, then cast)."""
        inv_freq = self.model.model.rotary_emb.inv_freq.to(device=device, dtype=torch.float32)
        freqs = torch.arange(length, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]
        emb, scale = torch.cat((freqs, freqs), dim=-1), self.spec["rope_scaling"]
        sin = emb.sin() * scale
        sin[:, :sin.shape[1] // 2] *= -1  # rotate_half's sign, folded in (see _rope)
        return (emb.cos() * scale).to(dtype), sin.to(dtype)

    # -- the transformer
    def _forward(self, ids, cos, sin, attend):
        """The decoder on `ids` (N,), RoPE `cos`/`sin` (N, D) -> final hidden states (N, hidden). `attend(layer, q, k,
        v)` (q (N, Hq, D), k/v (N, Hkv, D)) stores k/v in the cache and returns the attention output (N, Hq, D)."""
        m, D = self.model.model, self.spec["head_dim"]
        W = lambda t: None if t is None else self._cast.get(id(t), t)  # noqa: E731  (a missing bias: None)
        # HF's RMSNorm rounding: normalize (fp32 inside the kernel), cast back, scale by the weight
        norm = lambda x, n: W(n.weight) * F.rms_norm(x, x.shape[-1:], eps=n.variance_epsilon)  # noqa: E731
        lin = lambda x, p: F.linear(x, W(p.weight), W(p.bias))  # noqa: E731
        cos, sin = cos[:, None, :], sin[:, None, :]
        x = F.embedding(ids, W(m.embed_tokens.weight))  # (N, hidden)
        for i, layer in enumerate(m.layers):
            a, mlp = layer.self_attn, layer.mlp
            h = norm(x, layer.input_layernorm)
            q, k, v = (lin(h, p).view(x.shape[0], -1, D) for p in (a.q_proj, a.k_proj, a.v_proj))
            if self.spec["qk_norm"]:
                q, k = norm(q, a.q_norm), norm(k, a.k_norm)
            x = x + lin(attend(i, _rope(q, cos, sin), _rope(k, cos, sin), v).flatten(1), a.o_proj)
            h = norm(x, layer.post_attention_layernorm)
            x = x + lin(F.silu(lin(h, mlp.gate_proj)).mul_(lin(h, mlp.up_proj)), mlp.down_proj)
        return norm(x, m.norm)

    def _logits(self, h):
        """fp32 logits (N, V) from final hidden states; lm_head in the model's dtype, as HF."""
        w = self.model.lm_head.weight
        return F.linear(h, self._cast.get(id(w), w)).float()

    def _prefill(self, ids, start, rows, cos, sin):
        """Prefill `ids` (P,) at positions start..end-1 into cache rows rows[0]..rows[1]-1 (computed once, written to
        each); positions < start must be in those rows already (a common prefix). -> hidden states (P, hidden)."""
        s, c, (r0, r1), end = self.spec, self.cache, rows, start + ids.shape[0]

        def attend(i, q, k, v):  # q (P, Hq, D), k/v (P, Hkv, D): causal over positions 0..end-1
            c.k[i, r0:r1, start:end], c.v[i, r0:r1, start:end] = k, v  # broadcast to every row
            if start > 0:  # keys 0..end-1 from the cache: the common prefix + the new tokens
                k, v = c.k[i, r0, :end], c.v[i, r0, :end]
            qt, kt, vt = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]  # (1, H, P, D)
            w, kw = s["windows"][i], dict(scale=s["scale"], enable_gqa=True)
            if start == 0 and (w is None or w >= end):
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, **kw)[0].transpose(0, 1)
            p, j = torch.arange(start, end, device=q.device)[:, None], torch.arange(end, device=q.device)[None, :]
            mask = (j <= p) & (j > p - w) if w is not None else j <= p  # query p sees keys j <= p (and p - j < w)
            return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, **kw)[0].transpose(0, 1)

        return self._forward(ids, cos[start:end], sin[start:end], attend)

    def _prefill_packed(self, rests, start, rows, cos, sin):
        """Prefill several prompts in one pass: `rests` (each (P_i,)) at positions start..start+P_i-1 into cache
        rows rows[i][0]..rows[i][1]-1, after a common prefix already at positions < start of every row. The tokens
        go packed, each seeing the prefix and its own earlier tokens (a block-causal mask) -> the hidden state of
        each prompt's last token (n_prompts, hidden)."""
        c, dev = self.cache, rests[0].device
        pos, tok_i, row_i, bounds, ends = _packed_layout([len(x) for x in rests], rows, start, dev)
        kw = dict(scale=self.spec["scale"], enable_gqa=True)
        masks = [None if start == 0 else  # query p sees keys j <= p: the prefix and its own earlier tokens
                 torch.arange(start + b - a, device=dev)[None, :]
                 <= torch.arange(start, start + b - a, device=dev)[:, None] for a, b in bounds]

        def attend(i, q, k, v):  # q (N, Hq, D), k/v (N, Hkv, D)
            c.k[i, row_i, pos[tok_i]], c.v[i, row_i, pos[tok_i]] = k[tok_i], v[tok_i]
            # attention prompt by prompt, over its row of the cache, exactly as one prompt per pass would (the
            # same kernel on the same shapes: a packed pass changes no token); the matmuls around it are shared
            out = torch.empty_like(q)
            for (a, b), (r0, _), mask in zip(bounds, rows, masks):
                qt = q[a:b].transpose(0, 1)[None]  # (1, Hq, P, D)
                kt, vt = (x[i, r0, :start + b - a].transpose(0, 1)[None] for x in (c.k, c.v))  # (1, Hkv, end, D)
                o = (F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, **kw) if mask is None else
                     F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, **kw))
                out[a:b] = o[0].transpose(0, 1)
            return out

        return self._forward(torch.cat(rests), cos[pos], sin[pos], attend)[ends - 1]

    def _decode(self, tok, cos, sin, share=None):
        """One decode step of the A live rows: token `tok` (A,) goes to position cache.seqlens (A,) of its row, which
        grows by one. `share`: see _share_info (None: plain attention). Returns fp32 logits (A, V)."""
        s, c = self.spec, self.cache
        A, seqlens, windows = tok.shape[0], c.seqlens, s["windows"]
        if self.flash:
            seqlens32 = seqlens.to(torch.int32)

            def attend(i, q, k, v):  # writes k/v at cache_seqlens and attends, in one kernel
                win = (windows[i] - 1, 0) if windows[i] is not None else (-1, -1)
                return flash_attn_with_kvcache(q[:, None], c.k[i, :A], c.v[i, :A], k=k[:, None], v=v[:, None],
                                               cache_seqlens=seqlens32, softmax_scale=s["scale"], causal=True,
                                               window_size=win)[:, 0]
        else:  # additive masks over the used part of the cache, once per step
            slots, T, dtype = torch.arange(A, device=tok.device), int(seqlens.max()) + 1, c.k.dtype
            j = torch.arange(T, device=tok.device)[None, :]
            own = j <= seqlens[:, None]  # (A, T): the row's tokens, incl. the new one
            if share is None:  # one mask per distinct sliding window (None: full)
                masks = {w: _additive(own & (j > seqlens[:, None] - w) if w else own, dtype) for w in set(windows)}
            else:  # prompt part: positions [0, P) of a group's lead row; own part: [P, seqlen] of each row
                Pmin = share["pmin"]
                masks = dict(p=_additive(j[:, :share["pmax"]] < share["gplen"][:, None], dtype),
                             s=_additive(own[:, Pmin:] & (j[:, Pmin:] >= share["plen"][:, None]), dtype))

            def attend(i, q, k, v):  # q (A, Hq, D), k/v (A, Hkv, D)
                kc, vc = c.k[i, :A], c.v[i, :A]  # (A, T', Hkv, D) views
                kc[slots, seqlens], vc[slots, seqlens] = k, v  # row a's new k/v at position seqlens[a]
                # one query token: the G query heads of a kv head go into the "query length" axis, so K/V are read
                # once per kv head (no repeat_kv). q (A, Hkv, G, D), K/V (A, Hkv, T, D)
                q = q.view(A, s["n_kv"], -1, s["head_dim"])
                if share is not None:
                    return _shared_attention(q, kc, vc, masks, share, s["scale"]).reshape(A, s["n_heads"], -1)
                kt, vt = kc[:, :T].transpose(1, 2), vc[:, :T].transpose(1, 2)
                if q.is_cuda:  # CUDA without flash-attn
                    o = F.scaled_dot_product_attention(q, kt, vt, attn_mask=masks[windows[i]], scale=s["scale"])
                else:
                    o = _attention(q, kt, vt, masks[windows[i]], s["scale"])[0]
                return o.reshape(A, s["n_heads"], -1)

        h = self._forward(tok, cos[seqlens], sin[seqlens], attend)
        c.seqlens = seqlens + 1
        return self._logits(h)

    def _share_info(self, group, plen, T):
        """Bookkeeping for shared-prompt attention over the live rows (`_share_groups`), or None where it does not
        apply (CUDA, flash-attn, a window shorter than T)."""
        windows = self.spec["windows"]
        if group.is_cuda or self.flash or not self.share_prompts or any(w is not None and w < T for w in windows):
            return None
        return _share_groups(group, plen)

    # -- the API
    def generate(self, prompts, n=1, max_new_tokens=256, temperature=1.0, top_p=1.0, top_k=0, stop_ids=None,
                 seed=None, progress=None):
        """Sample `n` completions of each prompt (lists of token ids). Returns one dict per completion, prompt-major:
        {"prompt_index", "tokens", "logprobs", "length", "truncated"}; `tokens` include a sampled stop token,
        `truncated` = no stop token within max_new_tokens (or max_len). Rows beyond max_batch run in chunks, whole
        prompts per chunk where n allows; `progress(rows_done, rows_total)` is called before and after each."""
        request = dict(prompts=prompts, n=n, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
        return self.generate_many([request], top_p=top_p, top_k=top_k, stop_ids=stop_ids, progress=progress)[0]

    @torch.inference_mode()
    def generate_many(self, requests, top_p=1.0, top_k=0, stop_ids=None, progress=None):
        """Several generate() calls in one: `requests` are dicts of generate's `prompts`, `n`, `max_new_tokens`,
        `temperature`, `seed` (the defaults as there); returns one output list per request, each what generate()
        would return. Why: an eval's greedy answers, its samples and its critiques of a fixed set are independent;
        in one call a prompt asked for by several requests is prefilled once (its rows share its KV), and the rows
        decode in bigger batches. Row j of a request draws the uniforms generate() would give it (U(seed, t)[j])."""
        reqs = _requests(requests, self.max_len)
        if not 0 < top_p <= 1 or top_k < 0:
            raise ValueError("need 0 < top_p <= 1, top_k >= 0")
        device = self.model.lm_head.weight.device
        stop = torch.tensor(sorted(set(stop_ids or [])), dtype=torch.long, device=device)
        prompts, chunks = _plan(reqs, self.max_batch)
        self.stats = dict(prefill_s=0.0, decode_s=0.0, tokens=0, rows=sum(map(len, chunks)))
        self.flash = self._use_flash()  # decided once per call, not per decode step
        if not self._told and os.environ.get("RANK", "0") == "0":  # once, on one rank
            print(f"[gcrl] sampler attention: {self.attention_path()}", file=sys.stderr)
            self._told = True
        outs = [[None] * (len(r["prompts"]) * r["n"]) for r in reqs]
        total, done = self.stats["rows"], 0
        if progress:
            progress(0, total)
        with self._weights():
            for chunk in chunks:
                for (_, q, j), o in zip(chunk, self._generate_chunk(prompts, chunk, reqs, top_p, top_k, stop)):
                    outs[q][j] = dict(o, prompt_index=j // reqs[q]["n"])
                done += len(chunk)
                if progress:
                    progress(done, total)
        return outs

    def _generate_chunk(self, prompts, chunk, reqs, top_p, top_k, stop):
        """Prefill, then decode the chunk's rows (`chunk`: (prompt, request, row index there) of each) until all have
        finished. Row j of request q draws its t-th token from the uniform U(seed_q, t)[j]: the same samples whatever
        the chunking (--batch), which rows are still live, or which other requests share the call."""
        device = self.model.lm_head.weight.device
        group = torch.tensor([g for g, _, _ in chunk], device=device)
        req = torch.tensor([q for _, q, _ in chunk], device=device)
        draw = torch.tensor([j for _, _, j in chunk], device=device)
        temps = [reqs[q]["temperature"] for _, q, _ in chunk]  # one value (generate(), RL): a float, no per-row work
        temps = temps[0] if len(set(temps)) == 1 else torch.tensor(temps, dtype=torch.float32, device=device)
        max_new = torch.tensor([reqs[q]["max_new_tokens"] for _, q, _ in chunk], device=device)
        plen = torch.tensor([len(prompts[g]) for g, _, _ in chunk], device=device)
        T = min(self.max_len, int((plen + max_new).max()))
        self._ensure_cache(len(chunk), T)
        cos, sin = self._rope_table(T, self.compute_dtype, device)
        t0 = time.perf_counter()
        logits = self._prefill_chunk(prompts, group.tolist(), cos, sin)
        t1 = time.perf_counter()
        state = RowState(self.cache, group, plen, max_new, self.max_len)
        share = self._share_info(state.group, state.plen, T)
        for t in range(int(max_new.max())):
            def uniforms(t=t):  # (A,) fp64 of the live rows, drawn only when some row samples
                return _uniforms(reqs, req[state.row], draw[state.row], t)
            tok, lp = _sample(logits, temps[state.row] if torch.is_tensor(temps) else temps, top_p, top_k, uniforms)
            done = state.record(t, tok, lp, stop)
            if done is not None:  # drop the finished rows from the batch
                if state.keep(~done) == 0:
                    break
                share = self._share_info(state.group, state.plen, T)
            logits = self._decode(state.tok, cos, sin, share)
        self.stats["prefill_s"] += t1 - t0
        self.stats["decode_s"] += time.perf_counter() - t1
        self.stats["tokens"] += int(state.length.sum())
        return state.results(group.tolist())

    def _prefill_chunk(self, prompts, rows, cos, sin):
        """Prefill a chunk (a prompt's rows are contiguous): a prefix common to all its prompts once into every row,
        then each prompt's rest (incl. its last token: the first logits) once into its rows -> fp32 logits (R, V)."""
        device = self.model.lm_head.weight.device
        starts = [r for r in range(len(rows)) if r == 0 or rows[r] != rows[r - 1]]
        spans = [(rows[r0], r0, r1) for r0, r1 in zip(starts, starts[1:] + [len(rows)])]  # (prompt, first, end row)
        ids = [torch.tensor(prompts[p], dtype=torch.long, device=device) for p, _, _ in spans]
        common = min(len(os.path.commonprefix([prompts[p] for p, _, _ in spans])), min(len(x) for x in ids) - 1)
        common = common if len(spans) > 1 and common >= 16 else 0  # not worth a pass below that
        if common:
            self._prefill(ids[0][:common], 0, (0, len(rows)), cos, sin)
        if any(w is not None for w in self.spec["windows"]):  # sliding windows: one prompt per pass
            last = torch.stack([self._prefill(x[common:], common, (r0, r1), cos, sin)[-1]
                                for x, (_, r0, r1) in zip(ids, spans)])
        else:  # many prompts per pass: a pass over a 30-token prompt costs about what a 500-token one does
            packs, size = [[]], 0
            for i, x in enumerate(ids):
                if packs[-1] and size + len(x) - common > PREFILL_TOKENS:
                    packs, size = packs + [[]], 0
                packs[-1].append(i)
                size += len(x) - common
            last = torch.cat([self._prefill_packed([ids[i][common:] for i in pack], common,
                                                   [spans[i][1:] for i in pack], cos, sin) for pack in packs])
        counts = torch.tensor([r1 - r0 for _, r0, r1 in spans], device=device)
        return self._logits(last).repeat_interleave(counts, 0)


# ----------------------------------------------------------------------------- first-order rollout


def first_order_rollout(sampler, tokenizer, records, n, style="plain", **gen_kwargs):
    """Sample `n` responses to each record's question (first-order rollout, arXiv 2602.22765 §3, Figure 2). One dict
    per response, question-major: {"q_index", "id", "prompt_ids", "tokens", "logprobs", "text", "truncated", "length"}.
    `style`: the generation prompt (data.PROMPT_STYLES); stop_ids default to default_stop_ids(tokenizer)."""
    prompts = generation_prompts(tokenizer, records, style)
    gen_kwargs.setdefault("stop_ids", default_stop_ids(tokenizer))
    return rollout_outputs(tokenizer, records, prompts, sampler.generate(prompts, n=n, **gen_kwargs))


def generation_prompts(tokenizer, records, style="plain"):
    from data import gen_prompt
    return [gen_prompt(tokenizer, r["question"], style) for r in records]


def rollout_outputs(tokenizer, records, prompts, outs):
    """first_order_rollout's dicts from the Sampler's outputs for `prompts` (generation_prompts of `records`)."""
    return [dict(q_index=o["prompt_index"], id=records[o["prompt_index"]]["id"], prompt_ids=prompts[o["prompt_index"]],
                 tokens=o["tokens"], logprobs=o["logprobs"],
                 text=tokenizer.decode(o["tokens"], skip_special_tokens=True), truncated=o["truncated"],
                 length=o["length"]) for o in outs]
