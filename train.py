"""GC-RL training: one policy learns to answer (generation) and to judge answers (critique) with GRPO.

    python train.py --mode gc --model smollm2-135m --data arith --out runs/gc          # GC-RL
    python train.py --mode g  ...                                                      # G-RL (vanilla GRPO)
    python train.py --mode c  ...  [--static-pairs PAIRS.jsonl]                        # C-RL (static pairs)
    python train.py --mode sft --data jsonl:cold_start.jsonl --out runs/sft            # cold start
    accelerate launch --multi_gpu --num_processes 2 train.py --mode gc ...             # DDP (CPU too: runtime.py)
    python train.py ... --resume auto                                                  # continue the latest checkpoint

One GC-RL step (arXiv 2602.22765 §3, Figure 2) is `Trainer.rl_step`, top to bottom, one call per step:
  generation half (`generation_half`)
  1. draw Q questions; first-order rollout: n responses each              rollout.first_order_rollout
  2. score responses: R(r) = 1 if the verified answer matches, else 0     reward.response_reward (Eq. 1)
  3. label-balance filter: one right + one wrong response per mixed       critique.pairs_from_rollout
     question, into the question-response cache                           critique.QRCache.push
  critique half (`critique_half`)
  4. pop P pairs (no replacement); second-order rollout: m critiques each critique.sample_critiques
  5. score critiques: 0.7 when the verdict matches the label (Eq. 2;      reward.critique_rewards
     --critique-reward: Eq. 3 / 5 / 6; --denoise K: + the Eq. 4 bonus     (critique.sample_refinements)
     of K self-corrections)
  update (`update`)
  6. GRPO advantages per group (default: a question's responses and the  grpo.grpo_advantages
     critiques of its pairs, §3 "mixed into the same group"), A = (r -    (groups: Trainer.group_of)
     mean) / (std + eps); groups with equal rewards get A = 0, are
     counted, and left out of the loss
  7. ONE clipped-ratio loss over responses and critiques together (+ k3   grpo.grpo_loss
     KL to the starting policy): per micro-batch a forward and backward,  Trainer.optimizer_update
     then one clip and one optimizer step
Modes (config.Plan): gc = all of it; g = steps 1, 2, 6, 7; c = steps 4-7 on a static pair set built once from the
starting policy or --static-pairs; sft = cross-entropy on {question, response, critique?}. The paper's ablations
are flags: --pair-filter random (Table 2), --pairs static|dynamic (§5.3), --critique-reward (Eq. 3, 5, 6; §5.4),
--denoise K (Eq. 4, §5.2).

Distributed (runtime.py): each rank samples whole groups of its own questions and pairs, keeps its own QRCache,
and divides by counts summed over ranks: N ranks make the update of one process on the same global batch. The
sampler reads the model's own parameters (no copy); the trainer recomputes log-probs with the HF forward.
Not done, on purpose: no value model, no reward model, no vLLM; refinement tokens (--denoise) are never trained.
"""
import functools
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

import config
import critique
import data
import grpo
import models
import reward
import rollout
import sft
from grpo import Completion
from runtime import Metrics, Runtime, Stream, find_checkpoint, full_weights, seed_for, stop_signals

ADV_EPS = 1e-4  # eps in A = (r - mean) / (std + eps), as TRL
ACC_EMA = 0.9  # decay of the running first-order accuracy E[R(r)] that Eq. 3 reweights with
CACHE_CAPACITY = 4096  # QRCache pairs per process; the oldest are evicted (a step pops a few, pushes <= Q)


class Trainer:
    """A run's state: runtime (accelerator, rank), policy and optimizer, sampler, data streams, cache. `rl_step` does
    one GC-RL step and returns its Metrics (sft.step one SFT step); `save` / `load` write and read checkpoints."""

    def __init__(self, args):
        from accelerate.utils import set_seed
        self.args, self.out, self.step = args, Path(args.out), 0
        self.runtime = Runtime(args)
        self.plan = config.plan(args, self.runtime.world)  # every flag checked here, before anything loads
        set_seed(args.seed)
        # every random pick but the question order: sampling, filter, cache, mini-batch order. A nonzero
        # --sampling-seed-offset redraws all of them and keeps the questions: the A/A control of experiment.py
        off = args.sampling_seed_offset
        self.sample_seed = seed_for(args.seed, "sampling", off) if off else args.seed
        if self.runtime.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        self.runtime.accelerator.wait_for_everyone()
        self.model, self.optimizer, self.reference, self.tokenizer = models.trainer_models(args, self.runtime)
        # auto: sample in the precision the trainer computes in (None: the model's own, fp32)
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16,
                 "auto": torch.bfloat16 if args.mixed_precision == "bf16" else None}[args.sampler_dtype]
        self.sampler = rollout.Sampler(self.lm(), max_batch=args.sampler_batch, max_len=args.max_seq_len, dtype=dtype)
        # the sampler's settings of a response (with its prompt style) and of a critique
        gen = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                   stop_ids=rollout.default_stop_ids(self.tokenizer))
        style = {} if args.prompt_style == "plain" else {"style": args.prompt_style}
        self.sampling = dict(response=dict(gen, max_new_tokens=args.max_completion_length, **style),
                             critique=dict(gen, max_new_tokens=args.max_critique_length))
        self.temperature = args.temperature if args.temperature > 0 else 1.0  # greedy sampling: log-probs at T=1
        self.share_prompts = models.packs_prompts(self.lm(), args.share_prompts, self.runtime.print)
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.collate = functools.partial(grpo.collate, pad_id=pad_id, device=self.runtime.device,  # Policy's inputs
                                         share=self.share_prompts, windows=grpo.mask_windows(self.lm()))
        self.cache = critique.QRCache(capacity=CACHE_CAPACITY, balanced=args.pair_filter == "balance",
                                      seed=seed_for(self.sample_seed, "cache", self.runtime.rank),
                                      together=args.group_mode == "question")
        self.accuracy_ema = None  # running first-order accuracy E[R(r)] (Eq. 3)
        self.records = self.examples = self.static_pairs = self.pair_units = self.pair_stream = None
        self.eval_records = None
        if args.mode == "sft":
            self.examples = sft.examples(args.data, self.tokenizer, args.prompt_style,
                                         max(args.max_completion_length, args.max_critique_length))
        else:
            self.records = data.load_data(args.data, split="train", limit=args.limit, seed=args.seed)
        self.stream = Stream(len(self.examples or self.records), seed_for(args.seed, "data"))
        if args.eval_every and args.mode != "sft":
            self.eval_records = data.load_data(args.eval_data or args.data, split="test", limit=args.eval_limit,
                                               seed=args.seed)

    def lm(self):
        """The HF model under DDP / Accelerate wrappers: what the sampler reads (inside full_weights)."""
        return self.runtime.unwrap(self.model).lm

    def seed(self, *phase):
        """The seed of a random phase of the coming step on this rank: stateless, so a resumed run redraws it."""
        return seed_for(self.sample_seed, self.step + 1, self.runtime.rank, *phase)

    def set_lr(self):
        """The LR of the coming step, a pure function of it (no scheduler state to checkpoint): linear warm-up over
        --warmup-steps, then constant. Returns it."""
        warmup = self.args.warmup_steps
        lr = self.args.learning_rate * (min(1.0, (self.step + 1) / warmup) if warmup > 0 else 1.0)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    # ------------------------------------------------------------------------ one GC-RL step
    def rl_step(self):
        """Steps 1-7 of the module docstring on this rank's share of the step; returns its Metrics."""
        metrics, t_step = Metrics(), time.perf_counter()
        self.lm().eval()  # sampling: eval mode, no grad (the Sampler runs under inference_mode)
        with full_weights(self.model, self.runtime.accelerator):  # sharded: one gather for the whole step's sampling
            responses = self.generation_half(metrics) if self.plan.responses else []  # steps 1-3
            critiques = self.critique_half(metrics) if self.plan.critiques else []  # steps 4-5
        self.sampler.release()  # the KV cache is not kept through the backward; the next rollout reallocates it
        t0 = time.perf_counter()
        self.update((responses if self.plan.train_responses else []) + critiques, metrics)  # steps 6-7
        metrics.add("time/update", time.perf_counter() - t0)
        dt = time.perf_counter() - t_step
        metrics.add("time/step", dt)
        # generated tokens per second of the whole step (summed over ranks)
        metrics.add("tokens_per_s", sum(c.length for c in responses + critiques) / dt)
        return metrics

    def generation_half(self, metrics):
        """Steps 1-3 on this rank's questions: sample n responses to each, score them (Eq. 1), and with dynamic
        pairs filter them into the cache. Returns the responses (--mode c: scored and cached, never trained)."""
        args = self.args
        records = [self.records[i] for i in self.runtime.share(self.stream.take(args.questions_per_step))]
        t0 = time.perf_counter()
        samples = rollout.first_order_rollout(self.sampler, self.tokenizer, records, args.num_generations,  # 1.
                                              seed=self.seed("rollout1"), **self.sampling["response"])
        metrics.add("time/rollout1", time.perf_counter() - t0)
        t0 = time.perf_counter()
        responses = [Completion.sampled(s, "response", s["q_index"], records[s["q_index"]]["question"])
                     for s in samples]
        for r in responses:  # 2. Eq. 1
            r.reward = reward.response_reward(r.text, records[r.source]["answer"])
        self.track_accuracy(responses, metrics)
        if self.plan.pairs == "dynamic":  # 3. label-balance filter (or --pair-filter random) -> cache
            rng = random.Random(self.seed("balance"))
            rewards = [r.reward for r in responses]
            self.cache.push(critique.pairs_from_rollout(samples, records, rewards, rng, self.plan.pair_filter))
        metrics.add("time/score", time.perf_counter() - t0)
        reward.completion_metrics(metrics, "response", responses)
        self.dump([dict(kind="response", prompt=r.prompt_ids, text=r.text, reward=r.reward,
                        answer=records[r.source]["answer"]) for r in responses[:args.log_samples]])
        return responses

    def track_accuracy(self, responses, metrics):
        """E[R(r)] of Eq. 3: a running mean (decay ACC_EMA) of the step's first-order accuracy over all ranks."""
        n_right, n_all = self.runtime.all_sum([sum(r.reward > 0.5 for r in responses), len(responses)])
        step_acc, ema = n_right / max(n_all, 1), self.accuracy_ema
        self.accuracy_ema = step_acc if ema is None else ACC_EMA * ema + (1 - ACC_EMA) * step_acc
        metrics.add("acc/response_ema", self.accuracy_ema)  # the same on every rank

    def critique_half(self, metrics):
        """Steps 4-5 on this rank's pairs: sample m critiques of each, score them (Eq. 2-6; with --denoise K,
        sample K self-corrections per critique for the Eq. 4 bonus). Returns the critiques."""
        args, tok = self.args, self.tokenizer
        pairs, p_correct = self.next_pairs(metrics)
        if not pairs:
            return []
        t0, seed, kw = time.perf_counter(), self.seed("rollout2"), self.sampling["critique"]
        samples = critique.sample_critiques(self.sampler, tok, pairs, args.critiques_per_pair, seed=seed, **kw)  # 4.
        critiques = [Completion.sampled(s, "critique", s["pair_index"], pairs[s["pair_index"]]["question"], s["label"])
                     for s in samples]
        verdicts = [reward.extract_verdict(c.text) for c in critiques]  # 5.
        refinements = (critique.sample_refinements(self.sampler, tok, pairs, samples, verdicts, args.denoise,
                                                   seed=seed + 1, **kw) if args.denoise else None)
        golds = [pairs[c.source].get("answer") for c in critiques]
        rewards, bonuses, _ = reward.critique_rewards(verdicts, [c.label for c in critiques], args.critique_reward,
                                                      p_correct, args.denoise, refinements, golds)
        for c, v, r, b in zip(critiques, verdicts, rewards, bonuses):
            c.verdict, c.reward, c.bonus = v, r, b
        metrics.add("time/rollout2", time.perf_counter() - t0)
        reward.completion_metrics(metrics, "critique", critiques)
        self.dump([dict(kind="critique", prompt=c.prompt_ids, text=c.text, verdict=c.verdict, label=c.label,
                        reward=c.reward) for c in critiques[:args.log_samples]])
        return critiques

    def next_pairs(self, metrics):
        """Step 4's pairs on this rank: popped from its cache (dynamic) or the next of the static set; and the
        E[R] of Eq. 3 that scores their critiques (the running accuracy; static: the set's share of right)."""
        if self.plan.pairs == "dynamic":
            pairs = self.cache.pop(self.args.pairs_per_step // self.runtime.world)
            metrics.add("cache/size", len(self.cache))
            p_correct = self.accuracy_ema
        else:  # the stream runs over units: single pairs, or (--group-mode question) a question's pairs
            per_unit = 2 if self.args.group_mode == "question" else 1
            units = self.runtime.share(self.pair_stream.take(self.args.pairs_per_step // per_unit))
            pairs = [self.static_pairs[i] for u in units for i in self.pair_units[u]]
            p_correct = sum(p["label"] for p in self.static_pairs) / len(self.static_pairs)
        metrics.mean_of("pairs/right_frac", [bool(p["label"]) for p in pairs])  # label share of the critiqued pairs
        return pairs, p_correct

    def group_of(self, completion):
        """Step 6's GRPO group of a completion, assigned here only (on this rank). question: its question's
        responses and the critiques of that question's pairs, together; per-prompt: its question's n responses,
        or its pair's m critiques; shared: every completion of the step, all ranks."""
        mode = self.args.group_mode
        if mode == "question":
            return completion.question
        return "step" if mode == "shared" else (completion.kind, completion.source)

    def advantages(self, batch, metrics):
        """Step 6: each completion's group and advantage; counts frac_reward_zero_std. Returns the completions the
        loss learns from: their group's rewards differ (and not truncated, with --mask-truncated)."""
        args = self.args
        for c in batch:
            c.group = self.group_of(c)
        if args.group_mode == "shared":  # one group over every rank's samples: gather, normalise, take ours
            every = self.runtime.gather([[c.reward for c in batch]])
            start, rewards = sum(map(len, every[:self.runtime.rank])), [r for part in every for r in part]
            adv, zero = grpo.grpo_advantages(rewards, ["step"] * len(rewards), args.scale_rewards, ADV_EPS)
            adv, zero = adv[start:start + len(batch)], zero[start:start + len(batch)]
            metrics.add("frac_reward_zero_std", float(zero.all()) if batch else 0.0, 1 if batch else 0)
        else:
            groups = [c.group for c in batch]
            adv, zero = grpo.grpo_advantages([c.reward for c in batch], groups, args.scale_rewards, ADV_EPS)
            first = {}
            for g, z in zip(groups, zero.tolist()):
                first.setdefault(g, z)
            metrics.mean_of("frac_reward_zero_std", first.values())
        metrics.mean_of("critic/unanimous_groups", grpo.unanimous_groups(batch))
        for c, a in zip(batch, adv.tolist()):
            c.advantage = a
        return [c for c, z in zip(batch, zero.tolist()) if not z and not (args.mask_truncated and c.truncated)]

    def update(self, batch, metrics):
        """Steps 6-7: advantages, the log-probs before the update, then --ppo-epochs passes over the completions
        with a nonzero advantage, in mini-batches of --mini-batch-size: one optimizer update each."""
        args = self.args
        learn = self.advantages(batch, metrics)  # 6.
        metrics.add("update/seqs", len(learn))
        metrics.add("lr", self.set_lr())
        busiest = self.runtime.all_max(len(learn))  # every rank makes as many updates as the busiest
        if busiest == 0:  # every group uniform on every rank: nothing to learn from this step
            return
        n_mb = math.ceil(busiest / (args.mini_batch_size or busiest))
        fresh = args.ppo_epochs == 1 and n_mb == 1  # one update on fresh samples: old = current log-probs, detached
        self.logprobs_before(learn, fresh)
        size, losses = args.mini_batch_size or len(learn), []
        for epoch in range(args.ppo_epochs):
            order = list(range(len(learn)))
            if n_mb > 1:
                random.Random(self.seed("minibatch", epoch)).shuffle(order)
            chunks = [[learn[i] for i in order[k * size:(k + 1) * size]] for k in range(n_mb)]
            # each update's normalisers, once: its tokens and sequences summed over ranks, so that the losses of
            # its micro-batches (on every rank) add up to the loss of the whole update (grpo_loss's num_tokens)
            norms = self.runtime.all_sum([[sum(c.length for c in chunk), len(chunk)] for chunk in chunks])
            for chunk, (n_tok, n_seq) in zip(chunks, norms):  # 7.
                loss_of = functools.partial(self.micro_loss, metrics=metrics, n_tok=n_tok, n_seq=n_seq,
                                            first=epoch == 0, fresh=fresh)
                losses.append(self.optimizer_update(chunk, loss_of, metrics, self.temperature))
        metrics.add("loss", sum(losses) / len(losses))  # Metrics.SUM_KEYS: this rank's share of the global loss

    def logprobs_before(self, learn, fresh):
        """What the loss compares the policy with, before the update (no grad): `old_logprobs` under the policy
        (fresh: none, the loss takes its own detached) and `ref_logprobs` under the reference (--beta > 0)."""
        with torch.no_grad(), self.runtime.accelerator.autocast():
            if not fresh:
                for c, lp in zip(learn, self.logprobs(self.runtime.unwrap(self.model), learn)):
                    c.old_logprobs = lp
            if self.reference is not None:
                for c, lp in zip(learn, self.logprobs(self.reference, learn)):
                    c.ref_logprobs = lp

    def micro_loss(self, micro, inputs, logp, entropy, mask, *, metrics, n_tok, n_seq, first, fresh):
        """Step 7 on one micro-batch: the clipped loss, normalised by its update's global counts, and its metrics
        (an empty micro-batch's dummy row adds nothing: Metrics.add skips a count of 0)."""
        args = self.args
        old = logp.detach() if fresh else grpo.per_token(micro, [c.old_logprobs for c in micro], logp)
        ref = grpo.per_token(micro, [c.ref_logprobs for c in micro], logp) if self.reference is not None else None
        adv = torch.tensor([c.advantage for c in micro] or [0.0], device=logp.device)
        max_len = max(args.max_completion_length, args.max_critique_length)  # Dr. GRPO's constant: the longest
        loss, stats = grpo.grpo_loss(logp, old, ref, adv, mask, args.epsilon, args.epsilon_high, args.beta,
                                     args.loss_type, max_len, n_tok, n_seq)
        metrics.add("clip_ratio", stats["clipped"], int(stats["tokens"]))
        if args.beta:
            metrics.add("kl", stats["kl"], int(stats["tokens"]))
        if first:  # once per rollout: the forward's input tokens (padding included), entropy, sampler gap
            metrics.add("update/tokens", inputs["input_ids"].numel(), len(micro))
            metrics.add("entropy", float((entropy * mask).sum()), int(stats["tokens"]))
            gap = (grpo.per_token(micro, [c.logprobs for c in micro], logp) - old).abs() * mask
            metrics.add("logprob_gap", float(gap.sum()), int(mask.sum()))
        return loss

    def optimizer_update(self, seqs, loss_of, metrics, temperature):
        """One optimizer update on `seqs` (GRPO's and SFT's): a forward and a backward per micro-batch, then one
        clip and one optimizer step. loss_of(micro, inputs, logp, entropy, mask) -> the micro-batch's share of the
        update's loss (normalised by the counts of the whole update). Returns this rank's summed loss."""
        runtime, total = self.runtime, 0.0
        micros = grpo.plan_micro_batches(seqs, self.args.grad_accum, self.share_prompts)
        # every rank runs as many as the busiest (DeepSpeed: its fixed count), the extra ones on a dummy row
        micros += [[] for _ in range(runtime.micro_batch_count(len(micros)) - len(micros))]
        metrics.add("update/micro_batches", len(micros))
        self.model.train()
        for i, micro in enumerate(micros):
            last = i == len(micros) - 1
            with runtime.gradient_sync(self.model, now=last):  # DDP: one all-reduce, in the last micro-batch
                inputs, mask = self.collate(micro)
                logp, entropy = self.model(**inputs, temperature=temperature)  # (N, C) each
                loss = loss_of(micro, inputs, logp, entropy, mask)
                runtime.backward(loss, last)
            total += float(loss.detach())
        norm = runtime.step(self.model, self.optimizer, self.args.max_grad_norm)
        metrics.mean_of("grad_norm", [float(norm)] if norm is not None else [])
        self.model.eval()
        return total

    def logprobs(self, policy, seqs):
        """Per-sequence log-probs of `policy` (no grad; the caller sets autocast), packed rows of up to
        --logprob-batch sequences per forward: a list of (len(tokens),) tensors. Under FSDP / ZeRO-3 the trained
        model's forward is a collective (it gathers each layer), so every rank runs as many forwards as the
        busiest one, the extra ones on collate's zero-weight dummy row."""
        pieces = grpo.logprob_batches(seqs, max(1, self.args.logprob_batch), self.share_prompts)
        if self.runtime.sharding and policy is not self.reference:  # the reference: a plain module on every rank
            pieces += [[] for _ in range(self.runtime.all_max(len(pieces)) - len(pieces))]
        out = [None] * len(seqs)
        for piece in pieces:
            inputs, _ = self.collate([seqs[i] for i in piece])
            logp, _ = policy(**inputs, temperature=self.temperature)
            for r, i in enumerate(piece):
                out[i] = logp[r, :seqs[i].length]
        return out

    # ------------------------------------------------------------------------ samples
    def dump(self, rows):
        """A few samples of the step (rank 0) into samples.jsonl: the prompt's text, the completion, its reward."""
        if not self.runtime.is_main or not rows:
            return
        with open(self.out / "samples.jsonl", "a", encoding="utf-8") as f:
            for row in rows:
                row = dict(step=self.step + 1, **dict(row, prompt=self.tokenizer.decode(row["prompt"])))
                f.write(json.dumps(row, ensure_ascii=False) + "\n")


def evaluate(trainer, metrics):
    """Greedy accuracy on --eval-data (this rank's share), into the step's metrics as eval/*."""
    records = trainer.eval_records[trainer.runtime.rank::trainer.runtime.world]
    trainer.lm().eval()
    with full_weights(trainer.model, trainer.runtime.accelerator):
        outs = rollout.first_order_rollout(trainer.sampler, trainer.tokenizer, records, 1, seed=0,
                                           **dict(trainer.sampling["response"], temperature=0.0))
    metrics.mean_of("eval/acc/response", [reward.response_reward(o["text"], records[o["q_index"]]["answer"]) > 0.5
                                          for o in outs])
    metrics.mean_of("eval/len/response", [o["length"] for o in outs])


def static_pairs(trainer):
    """Static pairs (C-RL; GC-RL with --pairs static): --static-pairs, else OUT/static_pairs.jsonl (a resumed run),
    else built once from the starting policy (each rank samples a share of the questions) and saved there."""
    args, runtime, saved = trainer.args, trainer.runtime, trainer.out / "static_pairs.jsonl"
    if args.static_pairs:
        spec = args.static_pairs  # a pairs jsonl, or a critique SPEC (jsonl:PATH, gsm8k-solutions:PATH)
        is_spec = spec.startswith(("jsonl:", "gsm8k-solutions:"))
        pairs = critique.load_critique_data(spec) if is_spec else critique.load_pairs(spec)
        where = f"--static-pairs {spec}"
    elif saved.is_file():
        pairs, where = critique.load_pairs(saved), str(saved)
    else:
        records = trainer.records[:args.static_questions] if args.static_questions else trainer.records
        trainer.lm().eval()
        with full_weights(trainer.model, runtime.accelerator):
            seed = seed_for(trainer.sample_seed, "static", runtime.rank)
            mine = records[runtime.rank::runtime.world]
            pairs = critique.build_static_pairs(trainer.sampler, trainer.tokenizer, mine, k=args.static_k, seed=seed,
                                                **trainer.sampling["response"])
        pairs = runtime.gather(pairs)
        where = f"the starting policy ({len(records)} questions x {args.static_k} responses)"
        if pairs and runtime.is_main:
            critique.save_pairs(saved, pairs)
        runtime.accelerator.wait_for_everyone()
    if not pairs:
        raise config.ConfigError(f"--mode c: no critique pairs from {where}: every question's responses were all right "
                                 f"or all wrong. Pass --static-pairs PATH (jsonl of {{question, response, label}}), "
                                 f"more --static-questions / --static-k, or an easier --data")
    runtime.print(f"[gcrl] C-RL static pairs: {len(pairs)} from {where}")
    return pairs


def save(trainer, final=False):
    """OUT/checkpoint-STEP (runtime.save_checkpoint) with the run's state: the step, the data position, the
    running accuracy and every rank's QRCache. Every sampling / filter / mini-batch seed derives from (--seed,
    step, rank), so these fix them; the global RNG states are in Accelerate's save_state files."""
    args, runtime, pairs = trainer.args, trainer.runtime, trainer.pair_stream
    state = dict(step=trainer.step, mode=args.mode, seed=args.seed, num_processes=runtime.world,
                 data=trainer.stream.state(), pairs=pairs.state() if pairs else None, acc_ema=trainer.accuracy_ema)
    return runtime.save_checkpoint(trainer.out, trainer.step, trainer.model, trainer.tokenizer, state,
                                   dict(cache=trainer.cache.state_dict()), args.save_total_limit, final)


def load(trainer, path):
    """Continue from checkpoint `path`: the weights, optimizer and RNG (runtime.load_checkpoint), the step, the data
    position, the running accuracy and this rank's QRCache."""
    state, mine = trainer.runtime.load_checkpoint(path)
    trainer.step, d, stream = state["step"], state["data"], trainer.stream
    if d["n"] != stream.n:
        raise config.ConfigError(f"--resume {path}: the checkpoint's data has {d['n']} items, --data now gives "
                                 f"{stream.n}: resume with the same --data / --limit")
    stream.epoch, stream.pos = d["epoch"], d["pos"]
    if trainer.pair_stream and state.get("pairs"):
        trainer.pair_stream.epoch, trainer.pair_stream.pos = state["pairs"]["epoch"], state["pairs"]["pos"]
    trainer.accuracy_ema = state.get("acc_ema")
    if mine is not None:
        trainer.cache.load_state_dict(mine["cache"])
    if state.get("mode") != trainer.args.mode:
        trainer.runtime.print(f"[gcrl] warning: checkpoint is from --mode {state.get('mode')}, continuing as "
                              f"--mode {trainer.args.mode}")


def start_run(trainer):
    """Static pairs, --resume, and the run files: metrics / samples cut back to the checkpoint's step (or
    cleared), train_config.json, the tracker."""
    args, runtime, out = trainer.args, trainer.runtime, trainer.out
    if trainer.plan.pairs == "static":
        trainer.static_pairs = static_pairs(trainer)
        trainer.pair_units = ([[i] for i in range(len(trainer.static_pairs))] if args.group_mode != "question" else
                              critique.question_units(trainer.static_pairs))
        trainer.pair_stream = Stream(len(trainer.pair_units), seed_for(args.seed, "pairs"))
    resume = find_checkpoint(args.resume, out, runtime.print)
    if resume:
        load(trainer, resume)
        runtime.print(f"[gcrl] resumed from {resume} at step {trainer.step}")
    runtime.open_run_files(args, out, trainer.step if resume else None)


def main(argv=None):
    """Train; returns the run dir (OUT). Ctrl-C / SIGTERM: finish the step, save a checkpoint, return."""
    from tqdm import tqdm
    args = config.build_parser().parse_args(argv)
    trainer = Trainer(args)
    runtime = trainer.runtime
    start_run(trainer)
    bar = tqdm(total=args.max_steps, initial=trainer.step, desc=f"gcrl {args.mode}", disable=not runtime.is_main,
               dynamic_ncols=True)
    runtime.print(f"[gcrl] mode {args.mode}, {runtime.world} process(es) on {runtime.device}, out {trainer.out}")
    try:
        with stop_signals(lambda: trainer.step + 1) as stop:
            while trainer.step < args.max_steps:
                metrics = trainer.rl_step() if args.mode != "sft" else sft.step(trainer)
                trainer.step += 1
                if trainer.eval_records and (trainer.step % args.eval_every == 0 or trainer.step == args.max_steps):
                    evaluate(trainer, metrics)
                runtime.log_metrics(trainer.out, trainer.step, metrics, bar, args.log_every, args.report_to != "none")
                stopping = runtime.all_sum([1.0 if stop["sig"] else 0.0])[0] > 0  # a signal on any rank
                done = trainer.step == args.max_steps
                if stopping or done or (args.save_every and trainer.step % args.save_every == 0):
                    ck = save(trainer, final=done)
                    if stopping:
                        runtime.print(f"[gcrl] stopped by {stop['sig'] or 'a signal on another rank'} after step "
                                      f"{trainer.step}; checkpoint: {ck} (continue with --resume auto)")
                        break
    finally:
        bar.close()
        runtime.close(trackers=args.report_to != "none", ok=sys.exc_info()[0] is None)
    if trainer.step == args.max_steps:
        runtime.print(f"[gcrl] done: {args.max_steps} steps; model in {trainer.out / 'final'}")
    return str(trainer.out)


if __name__ == "__main__":
    try:
        main()
    except (config.ConfigError, data.DataError, models.ModelError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)
