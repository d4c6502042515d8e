"""A CPU stand-in for flash-attn's `flash_attn_with_kvcache`, written from its documented semantics, so the
sampler's flash-attn branch runs (and is tested) on machines without CUDA.

What it does, as the real kernel (no paged KV, no rotary, no alibi / softcap / cache_batch_idx):
  - q (B, Sq, H, D); k_cache / v_cache (B_cache >= B, T, Hkv, D); H a multiple of Hkv (GQA: query head h
    reads kv head h // (H / Hkv)).
  - k / v (B, Sn, Hkv, D), if given, are written into the caches *in place* at positions
    cache_seqlens[b] .. cache_seqlens[b] + Sn - 1; row b then holds Lk = cache_seqlens[b] + Sn keys.
  - query i of row b sits at position i + Lk - Sq (the causal mask is aligned bottom-right) and sees key j
    iff j <= that position (causal) and, with window_size (left, right) != (-1, -1),
    position - left <= j <= position + right (-1: unbounded on that side). A query that sees no key outputs 0.
  - softmax_scale defaults to D ** -0.5; the output has q's dtype and shape.
Numerics as the kernel's: scores and the softmax in fp32, probabilities rounded to the input dtype before
the P @ V product (accumulated in fp32), the output rounded once to the input dtype.

Input checks as the kernel's (its Python wrapper asserts on the caches' last stride and makes q / k / v
contiguous; the C++ side raises RuntimeError): fp16 / bf16 only, every tensor in q's dtype, int32
cache_seqlens of shape (B,), contiguous last dimension of the caches and of q / k / v, shapes. One more
than the kernel checks: the new keys must fit in the cache (the kernel would write out of bounds).
"""
import torch

calls = []  # (q shape, window_size) of every call: tests check the sampler really went through here


def _check(cond, msg):
    if not cond:
        raise RuntimeError(msg)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    assert k_cache.stride(-1) == 1, "k_cache must have contiguous last dimension"
    assert v_cache.stride(-1) == 1, "v_cache must have contiguous last dimension"
    unsupported = dict(rotary_cos=rotary_cos, rotary_sin=rotary_sin, cache_batch_idx=cache_batch_idx,
                       cache_leftpad=cache_leftpad, block_table=block_table, alibi_slopes=alibi_slopes)
    if any(x is not None for x in unsupported.values()) or softcap or return_softmax_lse:
        raise NotImplementedError(f"stand-in: only {', '.join(unsupported)} = None, softcap = 0, no lse")
    _check(q.dtype in (torch.float16, torch.bfloat16), "FlashAttention only support fp16 and bf16 data type")
    _check(k_cache.dtype == q.dtype, "query and key must have the same dtype")
    _check(v_cache.dtype == q.dtype, "query and value must have the same dtype")
    _check(q.stride(-1) == 1, "Input tensor must have contiguous last dimension")
    B, Sq, H, D = q.shape
    Bc, T, Hkv = k_cache.shape[:3]
    _check(B > 0, "batch size must be positive")
    _check(D <= 256, "FlashAttention forward only supports head dimension at most 256")
    _check(H % Hkv == 0, "Number of heads in key/value must divide number of heads in query")
    _check(k_cache.shape == (Bc, T, Hkv, D), "kcache must have shape (batch_size_c, seqlen_k, num_heads_k, head_size)")
    _check(v_cache.shape == (Bc, T, Hkv, D), "vcache must have shape (batch_size_c, seqlen_k, num_heads_k, head_size)")
    _check(Bc >= B, "stand-in: the cache needs at least batch_size rows (no cache_batch_idx)")
    if cache_seqlens is None:
        cache_seqlens = torch.full((B,), T, dtype=torch.int32, device=q.device)  # the whole cache
    elif isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((B,), cache_seqlens, dtype=torch.int32, device=q.device)
    _check(cache_seqlens.dtype == torch.int32, "seqlens_k must have dtype int32")
    _check(cache_seqlens.is_contiguous(), "seqlens_k must be contiguous")
    _check(cache_seqlens.shape == (B,), "seqlens_k must have shape (batch_size)")
    Sn = 0
    if k is not None:
        _check(v is not None, "If key is supplied, value must also be passed in")
        _check(Sq <= T, "If key is supplied, it must have seqlen <= the seqlen of the KV cache")
        _check(k.dtype == q.dtype, "Key must have the same dtype as query")
        _check(v.dtype == q.dtype, "Value must have the same dtype as query")
        _check(k.stride(-1) == 1, "Key tensor must have contiguous last dimension")
        _check(v.stride(-1) == 1, "Value tensor must have contiguous last dimension")
        Sn = k.shape[1]
        _check(k.shape == (B, Sn, Hkv, D), "k must have shape (batch_size, seqlen_knew, num_heads_k, head_size_og)")
        _check(v.shape == (B, Sn, Hkv, D), "v must have shape (batch_size, seqlen_knew, num_heads_k, head_size_og)")
    lens = cache_seqlens.long() + Sn  # keys per row after the append
    _check(bool((lens <= T).all()), "stand-in: cache_seqlens + seqlen_new exceeds the cache length")
    calls.append((tuple(q.shape), tuple(window_size)))
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    left, right = window_size
    if causal:  # causal = a window with nothing on the right
        right = 0
    out = torch.empty_like(q)
    for b in range(B):
        L = int(lens[b])
        if Sn:
            s0 = int(cache_seqlens[b])
            k_cache[b, s0:L], v_cache[b, s0:L] = k[b], v[b]
        kb = k_cache[b, :L].float().repeat_interleave(H // Hkv, dim=1)  # (L, H, D)
        vb = v_cache[b, :L].float().repeat_interleave(H // Hkv, dim=1)
        s = torch.einsum("qhd,khd->hqk", q[b].float(), kb) * scale  # (H, Sq, L) fp32
        pos = torch.arange(Sq, device=q.device)[:, None] + L - Sq  # each query's position among the keys
        j = torch.arange(L, device=q.device)[None, :]
        seen = torch.ones(Sq, L, dtype=torch.bool, device=q.device)
        if left >= 0:
            seen &= j >= pos - left
        if right >= 0:
            seen &= j <= pos + right
        s = s.masked_fill(~seen, -torch.inf)
        m = s.amax(-1, keepdim=True).clamp(min=-torch.finfo(torch.float32).max)  # all-masked rows: p = 0
        p = torch.exp(s - m)
        denom = p.sum(-1, keepdim=True)
        o = torch.einsum("hqk,khd->qhd", p.to(q.dtype).float(), vb) / denom.transpose(0, 1).clamp(min=1e-30)
        out[b] = o.to(q.dtype)
    return out
