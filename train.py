"""GC-RL training: one policy learns to answer (generation) and to judge answers (critique) with GRPO.

    python train.py --mode gc --model smollm2-135m --data arith --out runs/gc          # GC-RL
    python train.py --mode g  ...                                                      # G-RL (vanilla GRPO)
    python train.py --mode c  ...  [--static-pairs PAIRS.jsonl]                        # C-RL (static pairs)
    python train.py --mode sft --data jsonl:cold_start.jsonl --out runs/sft            # cold start
    accelerate launch --multi_gpu --num_processes 2 train.py --mode gc ...             # DDP (CPU too: see below)
    python train.py ... --resume auto                                                  # continue the latest checkpoint

One GC-RL step (arXiv 2602.22765 §3, Figure 2; `Trainer.rl_step` follows it line by line):
  1. draw Q questions; first-order rollout: n responses each (one GRPO group per question)
  2. score responses: R(r) = 1 if the verified answer matches, else 0                            (Eq. 1)
  3. label-balance filter -> one right + one wrong response per mixed question -> the QRCache
  4. pop P pairs from the cache (no replacement); second-order rollout: m critiques each (a group per pair)
  5. score critiques: 0.7 when the verdict matches the label (Eq. 2; --critique-reward reweight / precision /
     recall: Eq. 3 / 5 / 6; --denoise K adds the self-correction bonus of Eq. 4)
  6. GRPO advantages per group A = (r - mean) / (std + eps) (--scale-rewards off: Dr. GRPO, no std);
     groups with equal rewards get A = 0, are counted in frac_reward_zero_std and left out of the loss
  7. ONE clipped-ratio loss over responses and critiques together, optional k3 KL to the starting policy
Modes: gc = all of it; g = steps 1, 2, 6, 7; c = steps 4-7 on a static pair set built once from the starting
policy or --static-pairs; sft = cross-entropy on {question, response, critique?}. The paper's ablations are
flags: --pair-filter random (Table 2), --pairs static|dynamic (§5.3), --critique-reward (Eq. 3, 5, 6; §5.4),
--denoise K (Eq. 4, §5.2).

Distributed (Accelerate): each rank samples whole groups of its own questions and pairs and keeps its own
QRCache; the loss normalisers are all-reduced, so N ranks make the same update as one process on the same
global batch. On a machine without GPUs `accelerate launch --multi_gpu --num_processes N` runs N CPU
processes over gloo; set OMP_NUM_THREADS so that processes x threads <= cores (oversubscribed OpenMP threads
slow CPU matmuls down 100x). Sharded (configs/accelerate/fsdp2.yaml, zero3.yaml): `full_weights` gathers the
model once per step for the sampler, every rank runs as many forwards as the busiest, and checkpoints hold a
full HF model/ written by rank 0.

Sampling runs rollout.Sampler over the model's own parameters under inference_mode (no weight copy). The
trainer recomputes log-probs with the HF forward and an fp32 LM head, each prompt once per group
(--share-prompts, `collate`). Not done, on purpose: no value model, no reward model, no vLLM; refinement
tokens (--denoise) are scored, never trained.
"""
import argparse
import contextlib
import functools
import hashlib
import importlib.util
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import critique
import data
import reward
import rollout


class ConfigError(ValueError):
    """Bad flags or inputs; the message names the flag."""


TRACKER_MODULES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}  # --report-to needs one
ADV_EPS = 1e-4  # eps in A = (r - mean) / (std + eps), as TRL
ACC_EMA = 0.9  # decay of the running first-order accuracy E[R(r)] that Eq. 3 reweights with
CACHE_CAPACITY = 4096  # QRCache pairs per process; the oldest are evicted (a step pops a few, pushes <= Q)


# ============================================================================ GRPO: advantages and loss (pure)

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
        a = rg - rg.mean()
        adv[idx] = a / (rg.std() + eps) if scale else a
    return adv.float(), zero


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
    counts all-reduced over ranks and micro-batches, so summing the losses of all pieces gives the loss of the
    whole batch. Returns (loss, stats) with stats = dict of floats: tokens, clipped (tokens where the clip is
    active), kl (sum of k3 over tokens)."""
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    mask = mask.to(logp.dtype)
    a = adv[:, None]
    ratio = torch.exp(logp - old_logp)
    per_tok = -torch.min(ratio * a, torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high) * a)
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
        clipped = ((ratio < 1 - epsilon) & (a < 0)) | ((ratio > 1 + epsilon_high) & (a > 0))
        stats = dict(tokens=float(mask.sum()), clipped=float((clipped * mask).sum()),
                     kl=float((kl * mask).sum()) if kl is not None else 0.0)
    return loss, stats


# ============================================================================ trainer-side log-probs

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


def pack(seqs, share=True):
    """Rows of a packed batch: lists of positions in `seqs`, those with the same prompt in one row (first-seen
    order); share=False: one sequence per row."""
    if not share:
        return [[i] for i in range(len(seqs))]
    rows = {}
    for i, s in enumerate(seqs):
        rows.setdefault(tuple(s["prompt_ids"]), []).append(i)
    return list(rows.values())


def row_length(seqs, row):
    """Input tokens of a packed row: the prompt once, then each completion but its last token (which only ever
    is a target)."""
    return len(seqs[row[0]]["prompt_ids"]) + sum(max(len(seqs[i]["tokens"]) - 1, 0) for i in row)


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


def mask_windows(lm):
    """How `lm`'s HF forward takes a custom attention mask: {layer type: sliding window or None} for models that
    read a dict of masks per layer type (Qwen2, Qwen3), else {None: window} for one mask (Llama, Mistral)."""
    cfg = lm.config
    if getattr(cfg, "model_type", "") in ("qwen2", "qwen3"):
        return {t: (cfg.sliding_window if t == "sliding_attention" else None) for t in set(cfg.layer_types)}
    return {None: getattr(cfg, "sliding_window", None)}


def collate(seqs, pad_id, device, share=True, windows=None):
    """Sequences {prompt_ids, tokens} -> the keyword arguments of Policy.forward, plus `mask` (N, C).

    share=True packs the sequences that share a prompt (a GRPO group) into one row
        [prompt, c_1[:-1], c_2[:-1], ...]   with position ids 0..P-1, then P, P+1, ... again for every c_i,
    and a 4-D attention mask in which every completion sees the prompt and its own earlier tokens only: the
    same log-probs and gradients as one row per sequence, with the prompt computed once. The first target of
    every completion is predicted from the prompt's last position. Rows are right-padded; a padded position
    attends to itself only. Rows holding one sequence each need no mask (plain causal attention).
    Output row n of index / targets / mask is seqs[n], whatever the packing. windows: mask_windows(lm)."""
    rows = pack(seqs, share)
    R, T = len(rows), max(row_length(seqs, r) for r in rows)
    C = max(max(len(s["tokens"]) for s in seqs), 1)
    ids = torch.full((R, T), pad_id, dtype=torch.long)
    pos = torch.zeros((R, T), dtype=torch.long)
    seg = torch.full((R, T), -2, dtype=torch.long)  # -1 prompt, k >= 0 the row's k-th completion, -2 padding
    index = torch.zeros((len(seqs), C), dtype=torch.long)
    targets = torch.zeros((len(seqs), C), dtype=torch.long)
    mask = torch.zeros((len(seqs), C))
    for r, row in enumerate(rows):
        prompt = list(seqs[row[0]]["prompt_ids"])
        P = len(prompt)
        ids[r, :P], pos[r, :P], seg[r, :P] = torch.tensor(prompt), torch.arange(P), -1
        off = P
        for k, i in enumerate(row):
            tok = list(seqs[i]["tokens"])
            L = len(tok)
            if L == 0:
                continue
            body = L - 1
            ids[r, off:off + body] = torch.tensor(tok[:-1], dtype=torch.long)
            pos[r, off:off + body], seg[r, off:off + body] = P + torch.arange(body), k
            index[i, :L] = r * T + torch.tensor([P - 1] + list(range(off, off + body)))
            targets[i, :L], mask[i, :L] = torch.tensor(tok, dtype=torch.long), 1
            off += body
    attn = None
    if any(len(row) > 1 for row in rows):
        q, kk = seg[:, :, None], seg[:, None, :]  # (R, T, 1), (R, 1, T)
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        allowed = causal & (kk != -2) & ((kk == -1) | (kk == q))
        allowed |= torch.eye(T, dtype=torch.bool) & (q == -2)  # padding: itself (a query with no key gives NaN)
        dist = pos[:, :, None] - pos[:, None, :]  # (R, T, T) query position - key position

        def windowed(w):  # HF semantics: key j visible from query i iff i - j < window
            return (allowed if w is None else allowed & (dist < w))[:, None].to(device)  # (R, 1, T, T)
        windows = windows or {None: None}
        attn = windowed(windows[None]) if None in windows else {t: windowed(w) for t, w in windows.items()}
    return dict(input_ids=ids.to(device), position_ids=pos.to(device), attention_mask=attn, index=index.to(device),
                targets=targets.to(device), valid=mask.bool().to(device)), mask.to(device)


def _stack(seqs, key, like):
    """(N, C) like `like`: each sequence's per-token values under `key` (old / ref / sampler log-probs),
    zero-padded to C; a dummy batch (no sequences) gives `like` detached."""
    if not seqs:
        return like.detach()
    out = torch.zeros_like(like)
    for n, s in enumerate(seqs):
        v = torch.as_tensor(s[key], dtype=like.dtype)[:like.shape[1]]
        out[n, :len(v)] = v.to(like.device)
    return out


# ============================================================================ sharded weights (FSDP, ZeRO-3)

def sharding(accelerator):
    """How the prepared model's parameters are split over ranks: "fsdp2", "fsdp1", "zero3", or None when every
    rank holds them whole (one process, DDP, ZeRO-1/2)."""
    from accelerate.utils import DistributedType
    t = accelerator.distributed_type
    if t == DistributedType.FSDP:
        return "fsdp2" if accelerator.is_fsdp2 else "fsdp1"
    if t == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage == 3:
        return "zero3"
    return None


@contextlib.contextmanager
def full_weights(model, accelerator):
    """Inside: every parameter of the prepared `model` whole on every rank, for the sampler, which reads them
    directly and never calls a module's forward (so FSDP's and ZeRO-3's forward hooks never gather for it).
    One all-gather on entry, freed on exit: wrap a whole rollout, never a token. A collective: every rank must
    enter it the same number of times. Under DDP (or one process) it does nothing."""
    kind = sharding(accelerator)
    if kind == "fsdp2":  # FSDPModule.unshard / reshard are per module, not recursive: every unit, root first
        from torch.distributed.fsdp import FSDPModule
        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for u in units:
            u.unshard()  # MixedPrecisionPolicy(param_dtype=bf16): gathered in bf16, no second cast
        try:
            yield
        finally:
            for u in reversed(units):
                u.reshard()
    elif kind == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        with FSDP.summon_full_params(model, writeback=False):
            yield
    elif kind == "zero3":
        import deepspeed
        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            yield
    else:
        yield


# ============================================================================ small helpers

def seed_for(*parts):
    """A stable 63-bit seed from any values (no PYTHONHASHSEED dependence)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


class Stream:
    """An endless stream of indices 0..n-1, a fresh seeded permutation per epoch. Its position
    (epoch, pos) is the data position saved in checkpoints."""

    def __init__(self, n, seed, epoch=0, pos=0):
        self.n, self.seed, self.epoch, self.pos = n, seed, epoch, pos
        self._perm = None

    def perm(self):
        if self._perm is None or self._perm[0] != self.epoch:
            p = list(range(self.n))
            random.Random(seed_for(self.seed, self.epoch)).shuffle(p)
            self._perm = (self.epoch, p)
        return self._perm[1]

    def take(self, k):
        out = []
        while len(out) < k:
            step = min(k - len(out), self.n - self.pos)
            out += self.perm()[self.pos:self.pos + step]
            self.pos += step
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
        return out

    def state(self):
        return dict(epoch=self.epoch, pos=self.pos, n=self.n)


class Metrics(dict):
    """key -> [sum, count]. add(key, total, count): a mean over items, reduced exactly across ranks by
    summing numerators and denominators. Keys in SUM_KEYS report the global sum instead of a mean."""
    SUM_KEYS = ("cache/size", "tokens_per_s", "loss", "update/seqs", "update/tokens")

    def add(self, key, total, count=1):
        if count:
            s = self.setdefault(key, [0.0, 0])
            s[0] += float(total)
            s[1] += count

    def mean_of(self, key, values):
        values = list(values)
        self.add(key, sum(values), len(values))

    def reduce(self, accelerator):
        from accelerate.utils import gather_object
        parts = gather_object([dict(self)]) if accelerator.num_processes > 1 else [dict(self)]
        total = {}
        for part in parts:
            for k, (s, c) in part.items():
                t = total.setdefault(k, [0.0, 0])
                t[0] += s
                t[1] += c
        return {k: (s if k in self.SUM_KEYS else s / c) for k, (s, c) in sorted(total.items())}


def peak_memory(device):
    """Peak memory of this process so far, in GiB: resident (Linux: VmHWM) and, on CUDA, allocated by torch.
    {"mem/peak_rss_gib", "mem/peak_cuda_gib"}; what a platform cannot tell is left out. Never reset here: the
    kernel's counter is what `/usr/bin/time -v` and the benchmarks read too."""
    out = {}
    if device.type == "cuda":
        out["mem/peak_cuda_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    with contextlib.suppress(OSError, StopIteration), open("/proc/self/status") as f:  # not Linux: no RSS figure
        out["mem/peak_rss_gib"] = next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM:")) / 2**20
    return out


def _truncate_jsonl(path, last_step):
    """Keep only rows with step <= last_step (a resumed run rewrites what came after its checkpoint; a line
    cut short by a kill is dropped too), rewritten atomically."""
    if not Path(path).is_file():
        return
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    data.write_jsonl(path, [r for r in rows if r.get("step", 0) <= last_step])


def _checkpoints(out):
    cks = [p for p in Path(out).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(cks, key=lambda p: int(p.name.split("-")[-1]))


def load_sft_rows(spec, tokenizer, prompt_style="plain", max_len=None):
    """SFT / cold-start jsonl (`jsonl:PATH` or PATH) -> examples {prompt_ids, tokens, kind}. A row with
    `critique` trains the critique turn, a row without it the generation turn; targets end with eos."""
    path = spec.split(":", 1)[1] if spec.startswith("jsonl:") else spec
    rows = data.read_jsonl(path, "--data (sft)")
    eos = tokenizer.eos_token_id
    out = []
    for i, row in enumerate(rows, 1):
        where = f"--data {path} row {i}"
        if not isinstance(row, dict):
            raise data.DataError(f"{where}: expected a JSON object")
        for key in ("question", "response"):
            data.require_field(row, key, f"{where} (sft rows are {{question, response, critique?}})")
        crit = row.get("critique")
        if crit is not None and (not isinstance(crit, str) or not crit.strip()):
            raise data.DataError(f"{where}: 'critique' must be a non-empty string when present")
        if crit is not None:
            prompt, target, kind = critique.critique_prompt(tokenizer, row["question"], row["response"]), crit, "critique"
        else:
            prompt, target, kind = data.gen_prompt(tokenizer, row["question"], prompt_style), row["response"], "response"
        tokens = tokenizer(target, add_special_tokens=False)["input_ids"][:(max_len - 1) if max_len else None]
        out.append(dict(prompt_ids=prompt, tokens=tokens + [eos], kind=kind))
    if not out:
        raise data.DataError(f"--data {path}: no rows")
    return out


def make_accelerator(a):
    """The Accelerator for the flags; under FSDP / ZeRO-3 (set by the launch config) also its sharding settings."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    report = None if a.report_to in (None, "none") else a.report_to
    if report and not any(importlib.util.find_spec(m) for m in TRACKER_MODULES[report]):
        raise ConfigError(f"--report-to {report}: the package is not installed (pip install {report})")
    # a fresh AcceleratorState, so that main() can run again in the same process with other settings (tests);
    # the distributed process group (PartialState) is kept
    AcceleratorState._reset_state()
    # launched as N processes on a machine without CUDA: Accelerate needs cpu=True to form the gloo group, else
    # it quietly runs N independent single-process trainings
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    cpu = a.cpu or (world_env > 1 and not torch.cuda.is_available())
    acc = Accelerator(mixed_precision=a.mixed_precision, gradient_accumulation_steps=a.grad_accum,
                      log_with=report, project_dir=a.out, cpu=cpu)
    if acc.num_processes != world_env:
        raise ConfigError(f"launched with WORLD_SIZE={world_env} but Accelerate formed {acc.num_processes} "
                          f"process(es) on {acc.device}; check the launcher (--cpu forces the CPU)")
    if sharding(acc):  # reduce-scatter every micro-batch: no_sync would keep a whole fp32 gradient on every rank
        acc.gradient_state.plugin_kwargs["sync_each_batch"] = True
    if sharding(acc) == "fsdp2" and a.mixed_precision == "bf16":
        from torch.distributed.fsdp import MixedPrecisionPolicy
        # bf16 compute and gathers (the sampler's full weights too), fp32 gradient reduction; no output cast:
        # Policy.forward returns fp32 log-probs
        acc.state.fsdp_plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                                            reduce_dtype=torch.float32)
    return acc


# ============================================================================ the trainer

class Trainer:
    """Holds the run: accelerator, policy, optimizer, sampler, data streams, cache. `rl_step` / `sft_step`
    do one step and return its metrics; `save` / `load` handle checkpoints."""

    def __init__(self, args):
        from accelerate.utils import set_seed
        self.args = a = args
        self.out = Path(a.out)
        self.acc = acc = make_accelerator(a)
        self.rank, self.world, self.sharding = acc.process_index, acc.num_processes, sharding(acc)
        self._validate()
        set_seed(a.seed)
        # every random pick but the question order: sampling, filter, cache, mini-batch order. A nonzero
        # --sampling-seed-offset redraws all of them and keeps the questions: the A/A control of experiment.py
        off = a.sampling_seed_offset
        self.sample_seed = seed_for(a.seed, "sampling", off) if off else a.seed
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        self._models()
        self.step = 0
        self.records, self.examples, self.static_pairs, self.pair_stream, self.eval_records = (None,) * 5
        # critique pairs: dynamic = the policy's own fresh responses through the filter and the cache (gc default);
        # static = a set built once from the starting policy (c default; the paper's static-vs-dynamic ablation)
        self.pairs = a.pairs or {"gc": "dynamic", "c": "static"}.get(a.mode)
        self.cache = critique.QRCache(capacity=CACHE_CAPACITY, seed=seed_for(self.sample_seed, "cache", self.rank),
                                      balanced=a.pair_filter == "balance")
        self.acc_ema = None  # running first-order accuracy E[R(r)] (Eq. 3)
        if a.mode == "sft":
            self.examples = load_sft_rows(a.data, self.tok, a.prompt_style,
                                          max(a.max_completion_length, a.max_critique_length))
        else:
            self.records = data.load_data(a.data, split="train", limit=a.limit, seed=a.seed)
        self.stream = Stream(len(self.examples or self.records), seed_for(a.seed, "data"))
        if a.eval_every and a.mode != "sft":
            self.eval_records = data.load_data(a.eval_data or a.data, split="test", limit=a.eval_limit, seed=a.seed)

    def _models(self):
        """The policy (trainable, prepared with its optimizer), the frozen reference (--beta > 0), the sampler."""
        a, acc = self.args, self.acc
        # FSDP2 cpu-RAM-efficient loading (fsdp_cpu_ram_efficient_loading): rank 0 reads the checkpoint, onto the
        # CPU; the other ranks build it empty; prepare shards it and broadcasts rank 0's weights to every rank
        lazy = self.sharding == "fsdp2" and acc.state.fsdp_plugin.cpu_ram_efficient_loading
        lm, self.tok = rollout.load_policy(a.model, dtype=torch.float32, device="cpu" if lazy else acc.device,
                                           empty=lazy and not acc.is_main_process)
        lm.config.use_cache = False
        if a.gradient_checkpointing:
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        policy = Policy(lm)
        opt = torch.optim.AdamW(policy.parameters(), lr=a.learning_rate, betas=(a.adam_beta1, a.adam_beta2),
                                weight_decay=a.weight_decay)
        self.model, self.opt = acc.prepare(policy, opt)
        if self.sharding == "zero3":  # Policy.forward reads the LM head's weight without calling the head's forward
            import deepspeed
            head = self.lm().get_output_embeddings().weight
            deepspeed.zero.register_external_parameter(acc.unwrap_model(self.model), head)
        self.ref = None
        if a.beta and a.mode != "sft":
            # sharded runs are for models too large for a second fp32 copy on every rank: the frozen one in bf16
            ref_dtype = torch.bfloat16 if self.sharding and a.mixed_precision == "bf16" else torch.float32
            # never prepared, so nothing broadcasts into it: every rank reads its real weights (load_policy)
            ref_lm, _ = rollout.load_policy(a.model, dtype=ref_dtype, device=acc.device)
            self.ref = Policy(ref_lm).eval().requires_grad_(False)
        # auto: sample in the precision the trainer computes in (None: the model's own, fp32)
        sdt = {"fp32": torch.float32, "bf16": torch.bfloat16,
               "auto": torch.bfloat16 if a.mixed_precision == "bf16" else None}[a.sampler_dtype]
        self.sampler = rollout.Sampler(self.lm(), max_batch=a.sampler_batch, max_len=a.max_seq_len, dtype=sdt)
        # shared-prompt packing needs an attention that takes a custom 4-D mask (HF's sdpa / eager; not
        # flash_attention_2, whose varlen path would need per-completion sequence boundaries instead)
        impl = getattr(lm.config, "_attn_implementation", "sdpa")
        self.share_prompts = a.share_prompts and impl in ("sdpa", "eager")
        if a.share_prompts and not self.share_prompts:
            acc.print(f"[gcrl] --share-prompts: attn_implementation {impl!r} takes no 4-D mask; training one row per "
                      f"sequence (load the model with attn_implementation='sdpa' to pack groups)")
        self.windows = mask_windows(lm)
        self.stop_ids = rollout.default_stop_ids(self.tok)
        self.temperature = a.temperature if a.temperature > 0 else 1.0  # greedy sampling: log-probs at T=1

    # -- setup helpers
    def lm(self):
        """The HF model under DDP / Accelerate wrappers: what the sampler reads (inside full_weights)."""
        return self.acc.unwrap_model(self.model).lm

    def _validate(self):
        a, W = self.args, self.world
        if a.questions_per_step % W:
            raise ConfigError(f"--questions-per-step {a.questions_per_step} must be divisible by the number of "
                              f"processes ({W}): each rank samples whole groups of its own questions")
        if a.pairs and a.mode not in ("gc", "c"):
            raise ConfigError(f"--pairs {a.pairs} is for --mode gc / c (--mode {a.mode} critiques nothing)")
        if a.pair_filter != "balance" and (a.mode not in ("gc", "c") or (a.pairs or ("dynamic" if a.mode == "gc" else
                                                                                      "static")) != "dynamic"):
            raise ConfigError(f"--pair-filter {a.pair_filter} filters the dynamic pairs of --mode gc / c "
                              f"(with --pairs dynamic); the static set is always balanced")
        if a.mode in ("gc", "c") and a.pairs_per_step % W:
            raise ConfigError(f"--pairs-per-step {a.pairs_per_step} must be divisible by the number of processes ({W})")

    def setup_static_pairs(self):
        """Static pairs (C-RL; GC-RL with --pairs static): the set: --static-pairs, else OUT/static_pairs.jsonl (a resumed run), else built
        once from the starting policy (each rank samples a share of the questions) and saved there."""
        a, acc = self.args, self.acc
        saved = self.out / "static_pairs.jsonl"
        if a.static_pairs:
            spec = a.static_pairs
            pairs = (critique.load_critique_data(spec) if spec.startswith(("jsonl:", "gsm8k-solutions:"))
                     else critique.load_pairs(spec))
            where = f"--static-pairs {spec}"
        elif saved.is_file():
            pairs, where = critique.load_pairs(saved), str(saved)
        else:
            from accelerate.utils import gather_object
            recs = self.records[:a.static_questions] if a.static_questions else self.records
            self.lm().eval()
            with full_weights(self.model, self.acc):
                seed = seed_for(self.sample_seed, "static", self.rank)
                pairs = critique.build_static_pairs(self.sampler, self.tok, recs[self.rank::self.world], k=a.static_k,
                                                    seed=seed, **self.gen_kwargs())
            pairs = gather_object(pairs) if self.world > 1 else pairs
            where = f"the starting policy ({len(recs)} questions x {a.static_k} responses)"
            if pairs and acc.is_main_process:
                critique.save_pairs(saved, pairs)
            acc.wait_for_everyone()
        if not pairs:
            raise ConfigError(f"--mode c: no critique pairs from {where}: every question's responses were all right or "
                              f"all wrong. Pass --static-pairs PATH (jsonl of {{question, response, label}}), more "
                              f"--static-questions / --static-k, or an easier --data")
        self.static_pairs = pairs
        self.pair_stream = Stream(len(pairs), seed_for(a.seed, "pairs"))
        acc.print(f"[gcrl] C-RL static pairs: {len(pairs)} from {where}")

    def gen_kwargs(self, critique_turn=False):
        a = self.args
        kw = dict(max_new_tokens=a.max_critique_length if critique_turn else a.max_completion_length,
                  temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, stop_ids=self.stop_ids)
        if a.prompt_style != "plain" and not critique_turn:
            kw["style"] = a.prompt_style
        return kw

    def all_sum(self, values):
        """A (nested) list of numbers summed over ranks, as float64: global counts and normalisers."""
        t = torch.tensor(values, dtype=torch.float64, device=self.acc.device)
        return (self.acc.reduce(t, "sum") if self.world > 1 else t).tolist()

    def all_max(self, n):
        """An int's maximum over ranks: the busiest rank's count, which every rank must match in collectives."""
        return int(self.acc.gather(torch.tensor([n], device=self.acc.device)).max()) if self.world > 1 else n

    def set_lr(self):
        """The LR of the coming step: linear warm-up over --warmup-steps, then constant. A pure function of the
        step (no scheduler state to checkpoint). Returns it."""
        a = self.args
        lr = a.learning_rate * (min(1.0, (self.step + 1) / a.warmup_steps) if a.warmup_steps > 0 else 1.0)
        for group in self.opt.param_groups:
            group["lr"] = lr
        return lr

    # -- one RL step
    def rl_step(self):
        """Steps 1-7 of the module docstring on this rank's share; returns the Metrics."""
        m, t_step = Metrics(), time.perf_counter()
        self.lm().eval()  # sampling: eval mode, no grad (the Sampler runs under inference_mode)
        with full_weights(self.model, self.acc):  # FSDP / ZeRO-3: one gather for all of the step's sampling
            seqs, gen_tokens = self.rollouts(m)
        self.sampler.release()  # the KV cache is not kept through the backward; the next rollout reallocates it
        # 6-7. advantages and the update
        t0 = time.perf_counter()
        self.update(seqs, m)
        m.add("time/update", time.perf_counter() - t0)
        dt = time.perf_counter() - t_step
        m.add("time/step", dt)
        m.add("tokens_per_s", gen_tokens / dt)  # generated tokens per second of the whole step (summed over ranks)
        return m

    def rollouts(self, m):
        """Steps 1-5: sample, score, filter, cache, critique. Returns (the rollout batch, generated tokens)."""
        a, step = self.args, self.step + 1
        seqs = []  # the rollout batch: {prompt_ids, tokens, logprobs, reward, group, truncated, kind}
        gen_tokens = 0

        if a.mode in ("g", "gc") or self.pairs == "dynamic":
            # 1. first-order rollout on this rank's questions (whole groups)
            recs = [self.records[i] for i in self.my_share(self.stream.take(a.questions_per_step))]
            t0 = time.perf_counter()
            samples = rollout.first_order_rollout(self.sampler, self.tok, recs, a.num_generations,
                                                  seed=seed_for(self.sample_seed, step, self.rank, "rollout1"),
                                                  **self.gen_kwargs())
            m.add("time/rollout1", time.perf_counter() - t0)
            # 2. Eq. 1 rewards; the responses are trained in g / gc only (c + dynamic pairs: scored and cached only)
            t0 = time.perf_counter()
            rewards = [reward.response_reward(s["text"], recs[s["q_index"]]["answer"]) for s in samples]
            if a.mode in ("g", "gc"):
                seqs += [dict(s, reward=r, group=("q", s["q_index"]), kind="response") for s, r in zip(samples, rewards)]
            m.mean_of("reward/response", rewards)
            m.mean_of("acc/response", [r > 0.5 for r in rewards])
            m.mean_of("len/response", [s["length"] for s in samples])
            m.mean_of("trunc/response", [s["truncated"] for s in samples])
            gen_tokens += sum(s["length"] for s in samples)
            n_right, n_all = self.all_sum([sum(r > 0.5 for r in rewards), len(rewards)])
            batch_acc = n_right / max(n_all, 1)
            self.acc_ema = batch_acc if self.acc_ema is None else ACC_EMA * self.acc_ema + (1 - ACC_EMA) * batch_acc
            m.add("acc/response_ema", self.acc_ema)  # E[R(r)] of Eq. 3 (the same on every rank)
            # 3. label-balance filter (or --pair-filter random) -> cache (dynamic pairs only)
            if self.pairs == "dynamic":
                rng = random.Random(seed_for(self.sample_seed, step, self.rank, "balance"))
                self.cache.push(critique.pairs_from_rollout(samples, recs, rewards, rng, a.pair_filter))
            m.add("time/score", time.perf_counter() - t0)
            self._dump(step, [dict(kind="response", prompt=s["prompt_ids"], text=s["text"], reward=r,
                                   answer=recs[s["q_index"]]["answer"]) for s, r in zip(samples[:a.log_samples], rewards)])

        if a.mode in ("gc", "c"):
            # 4. pairs: popped from the cache (dynamic) or the next of the static set (static)
            if self.pairs == "dynamic":
                pairs = self.cache.pop(a.pairs_per_step // self.world)
                m.add("cache/size", len(self.cache))
                p_correct = self.acc_ema
            else:
                pairs = [self.static_pairs[i] for i in self.my_share(self.pair_stream.take(a.pairs_per_step))]
                p_correct = sum(p["label"] for p in self.static_pairs) / len(self.static_pairs)
            m.mean_of("pairs/right_frac", [bool(p["label"]) for p in pairs])  # label share of the critiqued pairs
            if pairs:
                # 4-5. second-order rollout, scored inside (Eq. 2-6; the Eq. 4 bonus is included in "reward")
                t0 = time.perf_counter()
                crits = critique.second_order_rollout(
                    self.sampler, self.tok, pairs, a.critiques_per_pair, scheme=a.critique_reward,
                    p_correct=p_correct, k_ref=a.denoise,
                    seed=seed_for(self.sample_seed, step, self.rank, "rollout2"),
                    **self.gen_kwargs(critique_turn=True))
                m.add("time/rollout2", time.perf_counter() - t0)
                seqs += [dict(c, group=("p", c["pair_index"]), kind="critique") for c in crits]
                self._critique_metrics(m, crits)
                gen_tokens += sum(c["length"] for c in crits)
                self._dump(step, [dict(kind="critique", prompt=c["prompt_ids"], text=c["text"], verdict=c["verdict"],
                                       label=c["label"], reward=c["reward"]) for c in crits[:a.log_samples]])
        return seqs, gen_tokens

    def my_share(self, items):
        """This rank's contiguous share of a list drawn for all ranks (whole groups: questions, pairs)."""
        k = len(items) // self.world
        return items[self.rank * k:(self.rank + 1) * k]

    @staticmethod
    def _critique_metrics(m, crits):
        k = reward.classification_metrics([c["verdict"] for c in crits], [c["label"] for c in crits])  # counts
        m.mean_of("reward/critique", [c["reward"] for c in crits])
        m.add("acc/critique", k["tp"] + k["tn"], k["n"])
        m.add("critic/precision", k["tp"], k["tp"] + k["fp"])  # "right" is the positive class (§5.4)
        m.add("critic/recall", k["tp"], k["tp"] + k["fn"])
        m.add("critic/wrong_rate", k["wrong"], k["n"])
        m.add("critic/format_rate", k["formatted"], k["n"])
        m.mean_of("len/critique", [c["length"] for c in crits])
        m.mean_of("trunc/critique", [c["truncated"] for c in crits])

    def advantages(self, seqs, m):
        """Step 6: GRPO advantages per group (or one shared group over all ranks' samples of the step)."""
        a = self.args
        rewards = [s["reward"] for s in seqs]
        if a.group_mode == "shared":
            from accelerate.utils import gather_object
            every = gather_object([rewards]) if self.world > 1 else [rewards]
            adv, zero = grpo_advantages([r for part in every for r in part], [0] * sum(map(len, every)),
                                        a.scale_rewards, ADV_EPS)
            start = sum(len(part) for part in every[:self.rank])
            adv, zero = adv[start:start + len(seqs)], zero[start:start + len(seqs)]
            m.add("frac_reward_zero_std", float(zero.all()) if len(seqs) else 0.0, 1 if len(seqs) else 0)
        else:
            groups = [s["group"] for s in seqs]
            adv, zero = grpo_advantages(rewards, groups, a.scale_rewards, ADV_EPS)
            first = {}
            for g, z in zip(groups, zero.tolist()):
                first.setdefault(g, z)
            m.mean_of("frac_reward_zero_std", first.values())
        return adv, zero

    def update(self, seqs, m):
        """Steps 6-7: advantages, then --ppo-epochs passes over the loss batch in mini-batches of
        --mini-batch-size sequences, one optimizer update each (`optimize`)."""
        a = self.args
        batch, n_mb = self.loss_batch(seqs, m)
        m.add("lr", self.set_lr())
        if not n_mb:  # every group uniform on every rank: nothing to learn from this step
            return
        mb, fresh, losses = a.mini_batch_size or len(batch), a.ppo_epochs == 1 and n_mb == 1, []
        for epoch in range(a.ppo_epochs):
            order = list(range(len(batch)))
            if n_mb > 1:
                random.Random(seed_for(self.sample_seed, self.step + 1, self.rank, "minibatch", epoch)).shuffle(order)
            chunks = [[batch[i] for i in order[k * mb:(k + 1) * mb]] for k in range(n_mb)]
            # global normalisers of each mini-batch: tokens and sequences, summed over ranks
            norms = self.all_sum([[sum(s["length"] for s in c), len(c)] for c in chunks])
            for chunk, (n_tok, n_seq) in zip(chunks, norms):
                loss_fn = functools.partial(self.grpo_micro_loss, m=m, n_tok=n_tok, n_seq=n_seq, first=epoch == 0,
                                            fresh=fresh)
                losses.append(self.optimize(chunk, m, self.temperature, loss_fn))
        m.add("loss", sum(losses) / len(losses))  # SUM_KEYS: this rank's share of the global loss

    def loss_batch(self, seqs, m):
        """Step 6 and what the loss needs besides the policy's own log-probs: the sequences with a nonzero
        advantage (`adv`), their log-probs before the update (`old`, unless one update on fresh samples makes
        them the detached current ones) and under the reference (`ref`, --beta > 0). Returns (batch, the number
        of mini-batches: the same on every rank, which must make the same number of updates; 0: no update)."""
        a, acc = self.args, self.acc
        adv, zero = self.advantages(seqs, m)
        keep = [i for i, s in enumerate(seqs) if not zero[i] and not (a.mask_truncated and s["truncated"])]
        m.add("update/seqs", len(keep))
        busiest = self.all_max(len(keep))  # the largest loss batch of any rank
        if busiest == 0:
            return [], 0
        n_mb = math.ceil(busiest / (a.mini_batch_size or busiest))
        batch = [dict(seqs[i], adv=float(adv[i])) for i in keep]
        fresh = a.ppo_epochs == 1 and n_mb == 1
        with torch.no_grad(), acc.autocast():
            for key, policy in (("old", None if fresh else acc.unwrap_model(self.model)), ("ref", self.ref)):
                for s, lp in zip(batch, self._logprobs(policy, batch) if policy is not None else []):
                    s[key] = lp
        return batch, n_mb

    def grpo_micro_loss(self, micro, inputs, logp, ent, mask, *, m, n_tok, n_seq, first, fresh):
        """Eq. 7's clipped loss of one micro-batch, normalised by the mini-batch's global counts, and its metrics
        (an empty micro-batch's dummy row adds nothing: Metrics.add skips a count of 0)."""
        a = self.args
        old_lp = logp.detach() if fresh else _stack(micro, "old", logp)
        ref_lp = _stack(micro, "ref", logp) if self.ref is not None else None
        adv = torch.tensor([s["adv"] for s in micro] or [0.0], device=logp.device)
        max_len = max(a.max_completion_length, a.max_critique_length)  # Dr. GRPO's constant: the longest completion
        loss, st = grpo_loss(logp, old_lp, ref_lp, adv, mask, a.epsilon, a.epsilon_high, a.beta, a.loss_type,
                             max_len, n_tok, n_seq)
        m.add("clip_ratio", st["clipped"], int(st["tokens"]))
        if a.beta:
            m.add("kl", st["kl"], int(st["tokens"]))
        if first:  # once per rollout: the forward's input tokens (padding included), entropy, sampler gap
            m.add("update/tokens", inputs["input_ids"].numel(), len(micro))
            m.add("entropy", float((ent * mask).sum()), int(st["tokens"]))
            m.add("logprob_gap", float(((_stack(micro, "logprobs", logp) - old_lp).abs() * mask).sum()),
                  int(mask.sum()))
        return loss

    def optimize(self, rows, m, temperature, loss_fn):
        """One optimizer update on `rows`, in the micro-batches of `micro_batches`; shared by GRPO and SFT.
        loss_fn(micro, inputs, logp, ent, mask) -> the micro-batch's part of the globally normalised loss.
        Returns this rank's summed loss."""
        acc, total = self.acc, 0.0
        micros = self.micro_batches(rows)
        # their number varies with packing: accumulate() then syncs and steps on the last one
        acc.gradient_accumulation_steps, acc.step = len(micros), 0
        m.add("update/micro_batches", len(micros))
        self.model.train()
        for micro in micros:
            with acc.accumulate(self.model):
                inputs, mask = self.collate(micro)
                logp, ent = self.model(**inputs, temperature=temperature)  # (N, C) each
                loss = loss_fn(micro, inputs, logp, ent, mask)
                # DDP averages gradients over ranks and accelerator.backward divides by the micro-batch count:
                # undo both, so the gradient is that of the globally normalised loss
                acc.backward(loss * self.world * len(micros))
                total += float(loss.detach())
                if acc.sync_gradients:  # DeepSpeed clips by its config and may report no norm
                    norm = acc.clip_grad_norm_(self.model.parameters(), self.args.max_grad_norm)
                    m.mean_of("grad_norm", [float(norm)] if norm is not None else [])
                self.opt.step()
                self.opt.zero_grad()
        self.model.eval()
        return total

    def collate(self, seqs):
        """Policy.forward's inputs and the target mask for `seqs`; an empty list (a rank with nothing to learn
        this micro-batch, which must still join DDP's collectives) becomes one zero-weight dummy row."""
        if not seqs:
            inputs, mask = collate([dict(prompt_ids=[self.pad_id], tokens=[self.pad_id])], self.pad_id, self.acc.device)
            return inputs, mask * 0
        return collate(seqs, self.pad_id, self.acc.device, self.share_prompts, self.windows)

    def micro_batches(self, seqs):
        """The update's micro-batches: the packed rows (a group never split) sorted by length and cut into at most
        --grad-accum G runs whose biggest (padded tokens: rows x the longest row) is as small as can be, every run
        filled up to that size: each holds a share of the activations and little padding, and no pass is spent
        on less. Every rank makes as many as the busiest (the same backward calls; some maybe empty);
        DeepSpeed's config fixes the count at G."""
        G = self.args.grad_accum
        rows = sorted(((row_length(seqs, r), r) for r in pack(seqs, self.share_prompts)), key=lambda x: x[0])
        lengths = [k for k, _ in rows]
        starts = runs_at(lengths, balanced_cap(lengths, G)) + [len(rows)]
        out = [[seqs[i] for _, row in rows[a:b] for i in row] for a, b in zip(starts, starts[1:])]
        n = G if self.sharding == "zero3" else self.all_max(len(out))
        return out + [[] for _ in range(n - len(out))]

    def _logprobs(self, policy, seqs):
        """Per-sequence log-probs of `policy` (no grad; the caller sets autocast), packed rows of up to
        --logprob-batch sequences per forward: a list of (len(tokens),) tensors. Under FSDP / ZeRO-3 the trained
        model's forward is a collective (it gathers each layer), so every rank runs as many forwards as the
        busiest one, the extra ones on collate's zero-weight dummy row."""
        bs, pieces = max(1, self.args.logprob_batch), [[]]  # pieces: lists of positions in seqs
        for row in pack(seqs, self.share_prompts):
            if pieces[-1] and len(pieces[-1]) + len(row) > bs:
                pieces.append([])
            pieces[-1] += row
        pieces = [p for p in pieces if p]
        if self.sharding and policy is not self.ref:  # the reference model is a plain module on every rank
            pieces += [[] for _ in range(self.all_max(len(pieces)) - len(pieces))]
        out = [None] * len(seqs)
        for piece in pieces:
            inputs, _ = self.collate([seqs[i] for i in piece])
            logp, _ = policy(**inputs, temperature=self.temperature)
            for r, i in enumerate(piece):
                out[i] = logp[r, :len(seqs[i]["tokens"])]
        return out

    # -- one SFT step
    def sft_step(self):
        """Cross-entropy (token-mean over the global batch) on the next --questions-per-step examples."""
        m, t_step = Metrics(), time.perf_counter()
        rows = [self.examples[i] for i in self.my_share(self.stream.take(self.args.questions_per_step))]
        (n_tok,) = self.all_sum([sum(len(r["tokens"]) for r in rows)])
        m.add("lr", self.set_lr())

        def loss_fn(micro, inputs, logp, ent, mask):
            m.add("entropy", float((ent * mask).sum()), int(mask.sum()))
            return -(logp * mask).sum() / n_tok

        m.add("loss", self.optimize(rows, m, 1.0, loss_fn))
        for kind in ("response", "critique"):
            m.mean_of(f"len/{kind}", [len(r["tokens"]) for r in rows if r["kind"] == kind])
        dt = time.perf_counter() - t_step
        m.add("time/update", dt)
        m.add("time/step", dt)
        m.add("tokens_per_s", sum(len(r["tokens"]) for r in rows) / dt)  # trained tokens per second
        return m

    # -- eval, samples
    def evaluate(self, m):
        """Greedy accuracy on --eval-data (this rank's share), into the step's metrics as eval/*."""
        recs = self.eval_records[self.rank::self.world]
        self.lm().eval()
        with full_weights(self.model, self.acc):
            outs = rollout.first_order_rollout(self.sampler, self.tok, recs, 1, seed=0,
                                               **dict(self.gen_kwargs(), temperature=0.0))
        m.mean_of("eval/acc/response", [reward.response_reward(o["text"], recs[o["q_index"]]["answer"]) > 0.5
                                        for o in outs])
        m.mean_of("eval/len/response", [o["length"] for o in outs])

    def _dump(self, step, rows):
        """A few samples of the step (rank 0) into samples.jsonl: the prompt text, the completion, its reward."""
        if not self.acc.is_main_process or not rows:
            return
        with open(self.out / "samples.jsonl", "a", encoding="utf-8") as f:
            for row in rows:
                row = dict(step=step, **dict(row, prompt=self.tok.decode(row["prompt"])))
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

    # -- checkpoints
    def save(self, final=False):
        """OUT/checkpoint-STEP/: model/ (HF, from_pretrained + tokenizer, written whole by rank 0), accelerate
        save_state files (weights, optimizer, every rank's RNG; sharded under FSDP), trainer_state.json (step, data position, running
        accuracy, every rank's QRCache). Written to checkpoint-STEP.tmp, then renamed."""
        from accelerate.utils import gather_object
        acc, a = self.acc, self.args
        ck = self.out / f"checkpoint-{self.step}"
        tmp = self.out / f"checkpoint-{self.step}.tmp"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        mine = dict(cache=self.cache.state_dict())  # what differs per rank
        ranks = gather_object([mine]) if self.world > 1 else [mine]
        # the whole model on rank 0 (a collective under FSDP / ZeRO-3, which gather it; the module's own otherwise)
        full = acc.get_state_dict(self.model)
        if acc.is_main_process:
            sd = {k.removeprefix("lm."): v for k, v in full.items()}  # HF names, without the Policy wrapper's
            first = {}  # a gathered dict holds tied weights (lm_head = embeddings) as copies: one tensor, saved once
            for name, p in self.lm().named_parameters(remove_duplicate=False):
                sd[name] = sd[first.setdefault(id(p), name)]
            self.lm().save_pretrained(tmp / "model", state_dict=sd, safe_serialization=True)
            self.tok.save_pretrained(tmp / "model")
            # RNG: every sampling / filter / mini-batch seed is derived from (--seed, step, rank), so the step
            # and the data position fix them; the global RNG states are in random_states_*.pkl (save_state)
            state = dict(step=self.step, mode=a.mode, seed=a.seed, num_processes=self.world,
                         data=self.stream.state(), pairs=self.pair_stream.state() if self.pair_stream else None,
                         acc_ema=self.acc_ema, ranks=ranks)
            data.write_json(tmp / "trainer_state.json", state)
            if ck.exists():
                shutil.rmtree(ck)
            os.replace(tmp, ck)
            if a.save_total_limit > 0:
                for old in _checkpoints(self.out)[:-a.save_total_limit]:
                    shutil.rmtree(old, ignore_errors=True)
            if final:
                fin, ftmp = self.out / "final", self.out / "final.tmp"
                shutil.rmtree(ftmp, ignore_errors=True)
                shutil.copytree(ck / "model", ftmp)
                shutil.rmtree(fin, ignore_errors=True)
                os.replace(ftmp, fin)
        acc.wait_for_everyone()
        return ck

    def load(self, path):
        acc = self.acc
        state = json.loads((Path(path) / "trainer_state.json").read_text())
        acc.load_state(str(path))
        self.step = state["step"]
        d = state["data"]
        if d["n"] != self.stream.n:
            raise ConfigError(f"--resume {path}: the checkpoint's data has {d['n']} items, --data now gives "
                              f"{self.stream.n}: resume with the same --data / --limit")
        self.stream.epoch, self.stream.pos = d["epoch"], d["pos"]
        if self.pair_stream and state.get("pairs"):
            self.pair_stream.epoch, self.pair_stream.pos = state["pairs"]["epoch"], state["pairs"]["pos"]
        self.acc_ema = state.get("acc_ema")
        ranks = state["ranks"]
        if len(ranks) != self.world:
            acc.print(f"[gcrl] warning: checkpoint written by {len(ranks)} processes, now {self.world}: "
                      f"ranks without a saved cache start with an empty one (not an exact continuation)")
        if self.rank < len(ranks):
            self.cache.load_state_dict(ranks[self.rank]["cache"])
        if state.get("mode") != self.args.mode:
            acc.print(f"[gcrl] warning: checkpoint is from --mode {state.get('mode')}, continuing as --mode {self.args.mode}")


# ============================================================================ CLI and main loop

def _flag(s):
    v = str(s).strip().lower()
    if v in ("1", "true", "yes", "on", "group"):
        return True
    if v in ("0", "false", "no", "off", "none"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def build_parser():
    p = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--mode", choices=("sft", "g", "c", "gc"), default="gc",
      help="gc: GC-RL (responses + critiques of cached pairs); g: vanilla GRPO; c: critique-only on static pairs; "
           "sft: cross-entropy cold start on {question, response, critique?} jsonl")
    a("--model", default="smollm2-135m", help="alias, HF hub id, model dir, checkpoint dir or run dir (e.g. the --out of an sft run)")
    a("--data", default="arith", help=f"data SPEC ({data.SPECS}); --mode sft: jsonl:PATH of "
                                      "{question, response, critique?} rows")
    a("--limit", type=int, default=None, help="use the first N records of --data (arith: generate N)")
    a("--out", default="runs/train", help="run dir: train_config.json, metrics.jsonl, samples.jsonl, checkpoint-N/, final/")
    a("--prompt-style", choices=sorted(data.PROMPT_STYLES), default="plain",
      help="generation prompt (data.PROMPT_STYLES) of sft rows and of first-order rollouts")
    g = p.add_argument_group("rollout (first order)")
    g.add_argument("--questions-per-step", "--questions", type=int, default=8,
                   help="questions per step over all processes (sft: examples per step); divisible by #processes")
    g.add_argument("--num-generations", type=int, default=4, help="responses per question (GRPO group size, paper: 5)")
    g.add_argument("--max-completion-length", type=int, default=256, help="max new tokens per response")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (log-probs use it too)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling")
    g.add_argument("--top-k", type=int, default=0, help="top-k sampling (0 = off)")
    g.add_argument("--sampler-batch", type=int, default=64, help="sampler rows per chunk (KV cache rows)")
    g.add_argument("--max-seq-len", type=int, default=2048, help="sampler max prompt + completion tokens")
    g.add_argument("--sampler-dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="sampling precision (auto: bf16 with --mixed-precision bf16, else fp32); the trainer "
                        "recomputes old log-probs itself, so this changes which samples are drawn, not the loss")
    g = p.add_argument_group("critique (second order)")
    g.add_argument("--pairs-per-step", type=int, default=4, help="<question, response> pairs critiqued per step "
                                                                 "over all processes")
    g.add_argument("--critiques-per-pair", type=int, default=4, help="critiques per pair (its GRPO group size)")
    g.add_argument("--max-critique-length", type=int, default=256, help="max new tokens per critique")
    g.add_argument("--critique-reward", choices=tuple(reward.CRITIQUE_REWARDS), default="plain",
                   help="plain: Eq. 2 (0.7 if the verdict matches); reweight: Eq. 3 with E[R] = running first-order "
                        "accuracy; precision: Eq. 5 (0.6 / 0.8); recall: Eq. 6 (0.8 / 0.6)")
    g.add_argument("--denoise", type=int, default=0, metavar="K_REF",
                   help="Eq. 4: K_REF self-corrections per critique, bonus 0.1 k/K ('right') or 0.7 k/K ('wrong')")
    g.add_argument("--pairs", choices=("dynamic", "static"), default=None,
                   help="critique pairs: dynamic = this run's fresh responses through --pair-filter and the cache "
                        "(--mode c: responses are scored and cached, never trained); static = a balanced set built "
                        "once from the starting policy (--static-k responses per question). Default: gc dynamic, "
                        "c static (the paper's C-RL)")
    g.add_argument("--pair-filter", choices=critique.PAIR_FILTERS, default="balance",
                   help="dynamic pairs: balance = drop all-right / all-wrong questions, keep one right + one wrong "
                        "(the paper's filter); random = two responses per question drawn uniformly (Table 2's "
                        "random sampling; with --critique-reward reweight its middle row)")
    g.add_argument("--static-pairs", default=None, help="static pairs: jsonl {question, response, label} "
                                                        "(or jsonl:PATH / gsm8k-solutions:PATH) instead of building them")
    g.add_argument("--static-k", type=int, default=10, help="static pairs: responses per question when building them")
    g.add_argument("--static-questions", type=int, default=0, help="static pairs: questions used to build them (0 = all)")
    g = p.add_argument_group("GRPO loss")
    g.add_argument("--group-mode", choices=("per-prompt", "shared"), default="per-prompt",
                   help="per-prompt: a group per question and per pair; shared: all samples of a step in one group")
    g.add_argument("--scale-rewards", type=_flag, default=True, metavar="{true,false}",
                   help="divide advantages by the group std (false: Dr. GRPO; TRL's 'group' / 'none' work too)")
    g.add_argument("--loss-type", choices=LOSS_TYPES, default="token-mean",
                   help="token-mean: over all tokens of the global batch (DAPO); seq-mean: per sequence, then mean "
                        "(GRPO); dr-grpo: token sum / (sequences x max length)")
    g.add_argument("--epsilon", type=float, default=0.2, help="lower clip: ratio >= 1 - epsilon")
    g.add_argument("--epsilon-high", type=float, default=None, help="upper clip: ratio <= 1 + epsilon_high "
                                                                    "(default: --epsilon)")
    g.add_argument("--beta", type=float, default=0.0, help="k3 KL coefficient to the starting policy (paper 1e-3; "
                                                           "0 loads no reference model)")
    g.add_argument("--mask-truncated", action="store_true", help="leave completions that hit the length limit out "
                                                                 "of the loss")
    g = p.add_argument_group("optimisation")
    g.add_argument("--learning-rate", "--lr", type=float, default=1e-6, help="AdamW learning rate (paper 1e-6)")
    g.add_argument("--warmup-steps", type=int, default=0, help="linear LR warm-up steps, then constant")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--adam-beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--adam-beta2", type=float, default=0.999, help="AdamW beta2")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping")
    g.add_argument("--ppo-epochs", "--num-iterations", type=int, default=1,
                   help="passes over each rollout (old log-probs from the trainer)")
    g.add_argument("--mini-batch-size", type=int, default=0,
                   help="sequences per optimizer update per process (0: the whole rollout, one update per pass)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per update, at most (forward/backward pieces "
                   "of similar length): divides the update's activation memory, same update")
    g.add_argument("--logprob-batch", type=int, default=16, help="sequences per no-grad old / reference log-prob pass")
    g.add_argument("--share-prompts", type=_flag, default=True, metavar="{true,false}",
                   help="train each prompt once per group: [prompt, completion_1, ..., completion_n] in one row with a "
                        "4-D mask (same loss and gradients, about half the tokens); false: one row per sequence")
    g.add_argument("--mixed-precision", choices=("no", "bf16"), default="no",
                   help="bf16 autocast for the trainer's forward/backward (CPU and GPU)")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    g.add_argument("--cpu", action="store_true", help="train on CPU even when a GPU is present")
    g = p.add_argument_group("run")
    g.add_argument("--max-steps", "--steps", type=int, default=20, help="total training steps")
    g.add_argument("--seed", type=int, default=0, help="seed of data order, sampling, filter and cache")
    g.add_argument("--sampling-seed-offset", type=int, default=0,
                   help="nonzero: redraw sampling, filter, cache and mini-batch randomness, same question order (A/A)")
    g.add_argument("--eval-every", type=int, default=0, help="greedy eval on --eval-data every N steps (0 = never)")
    g.add_argument("--eval-data", default=None, help="eval SPEC (default: --data, test split)")
    g.add_argument("--eval-limit", type=int, default=64, help="eval questions")
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (always at the end)")
    g.add_argument("--save-total-limit", type=int, default=2, help="keep the last N checkpoints (0 = all)")
    g.add_argument("--resume", default=None, help="checkpoint dir, or 'auto' = the latest checkpoint in --out")
    g.add_argument("--report-to", choices=("none", "tensorboard", "wandb"), default="none",
                   help="Accelerate tracker for the metrics (besides metrics.jsonl)")
    g.add_argument("--log-every", type=int, default=10, help="print a metrics line every N steps")
    g.add_argument("--log-samples", type=int, default=2, help="responses and critiques per step in samples.jsonl")
    return p


# progress bar: metric -> short name; printed lines (--log-every) show these and a few more
BAR = {"reward/response": "rew", "acc/response": "acc", "reward/critique": "c_rew", "acc/critique": "c_acc",
       "loss": "loss"}
SHOW = tuple(BAR) + ("critic/wrong_rate", "frac_reward_zero_std", "eval/acc/response", "time/step")


def check_flags(args):
    """The flag errors that need no model: before anything loads."""
    for flag, v in (("--num-generations", args.num_generations), ("--questions-per-step", args.questions_per_step),
                    ("--max-steps", args.max_steps), ("--grad-accum", args.grad_accum),
                    ("--ppo-epochs", args.ppo_epochs), ("--critiques-per-pair", args.critiques_per_pair)):
        if v < 1:
            raise ConfigError(f"{flag} must be >= 1, got {v}")
    if args.mode in ("g", "gc") and args.num_generations < 2 and args.group_mode == "per-prompt":
        raise ConfigError("--num-generations must be >= 2 for per-prompt GRPO groups (or use --group-mode shared)")
    if args.static_pairs and (args.mode, args.pairs) not in (("c", None), ("c", "static"), ("gc", "static")):
        raise ConfigError("--static-pairs is for static pairs only (--mode c, or --mode gc --pairs static)")
    if args.resume not in (None, "auto") and not (Path(args.resume) / "trainer_state.json").is_file():
        raise ConfigError(f"--resume {args.resume}: not a checkpoint dir (no trainer_state.json)")


def start_run(tr):
    """Static pairs, --resume, and the run files: metrics / samples cut back to the checkpoint's step (or
    cleared), train_config.json, the tracker."""
    args, acc, out = tr.args, tr.acc, tr.out
    if tr.pairs == "static":
        tr.setup_static_pairs()
    resume = args.resume
    if resume == "auto":
        cks = _checkpoints(out)
        resume = str(cks[-1]) if cks else None
        if resume is None:
            acc.print(f"[gcrl] --resume auto: no checkpoint in {out}, starting fresh")
    if resume:
        tr.load(resume)
        acc.print(f"[gcrl] resumed from {resume} at step {tr.step}")
    if acc.is_main_process:
        for f in ("metrics.jsonl", "samples.jsonl"):
            if resume:
                _truncate_jsonl(out / f, tr.step)
            else:
                (out / f).unlink(missing_ok=True)
        cfg = dict(vars(args), num_processes=tr.world, device=str(acc.device), torch=torch.__version__)
        data.write_json(out / "train_config.json", cfg)  # not config.json: that name marks an HF model dir
    if args.report_to != "none":
        acc.init_trackers("gcrl", config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))})


@contextlib.contextmanager
def stop_signals(step_of):
    """Inside: Ctrl-C / SIGTERM set stop["sig"] (the loop finishes the step, checkpoints, exits); a second
    signal exits at once. step_of() names the step being run."""
    stop, old = {"sig": None}, {}

    def on_signal(signum, frame):
        stop["sig"] = signal.Signals(signum).name
        print(f"\n[gcrl] {stop['sig']}: finishing step {step_of()}, then saving a checkpoint "
              f"(send it again to exit at once)", file=sys.stderr, flush=True)
        signal.signal(signum, old.get(signum, signal.SIG_DFL))

    try:
        for s in (signal.SIGINT, signal.SIGTERM):
            old[s] = signal.signal(s, on_signal)
    except ValueError:  # not the main thread: no signal handling
        old = {}
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def log_step(tr, m, bar):
    """The step's metrics, reduced over ranks, into metrics.jsonl, the progress bar and the tracker."""
    args, acc = tr.args, tr.acc
    row = dict(step=tr.step, **m.reduce(acc), **peak_memory(acc.device))  # memory: this rank's, so far
    if acc.is_main_process:
        with open(tr.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        bar.update(1)
        bar.set_postfix({short: f"{row[k]:.3g}" for k, short in BAR.items() if k in row})
        if args.log_every and tr.step % args.log_every == 0:
            bar.write(" ".join(f"{k}={row[k]:.4g}" for k in ("step",) + SHOW if k in row))
    if args.report_to != "none":
        acc.log(row, step=tr.step)


def main(argv=None):
    """Train; returns the run dir (OUT). Ctrl-C / SIGTERM: finish the step, save a checkpoint, return."""
    from tqdm import tqdm
    args = build_parser().parse_args(argv)
    check_flags(args)
    tr = Trainer(args)
    acc = tr.acc
    start_run(tr)
    bar = tqdm(total=args.max_steps, initial=tr.step, desc=f"gcrl {args.mode}", disable=not acc.is_main_process,
               dynamic_ncols=True)
    acc.print(f"[gcrl] mode {args.mode}, {tr.world} process(es) on {acc.device}, out {tr.out}")
    try:
        with stop_signals(lambda: tr.step + 1) as stop:
            while tr.step < args.max_steps:
                m = tr.rl_step() if args.mode != "sft" else tr.sft_step()
                tr.step += 1
                if tr.eval_records and (tr.step % args.eval_every == 0 or tr.step == args.max_steps):
                    tr.evaluate(m)
                log_step(tr, m, bar)
                flag = torch.tensor([1.0 if stop["sig"] else 0.0], device=acc.device)
                stopping = bool(acc.reduce(flag, "sum") > 0) if tr.world > 1 else stop["sig"] is not None
                if stopping or tr.step == args.max_steps or (args.save_every and tr.step % args.save_every == 0):
                    ck = tr.save(final=tr.step == args.max_steps)
                    if stopping:
                        acc.print(f"[gcrl] stopped by {stop['sig'] or 'a signal on another rank'} after step "
                                  f"{tr.step}; checkpoint: {ck} (continue with --resume auto)")
                        break
    finally:
        bar.close()
        if args.report_to != "none":
            acc.end_training()
    if tr.step == args.max_steps:
        acc.print(f"[gcrl] done: {args.max_steps} steps; model in {tr.out / 'final'}")
    return str(tr.out)


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, data.DataError, rollout.ModelError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)
