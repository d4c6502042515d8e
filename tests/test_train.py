"""train.py: the GRPO advantage / loss against hand-computed values, the trainer's log-probs against the
sampler's, and whole runs of train.main on a tiny model (one GC-RL step, a step without pairs, SFT, C-RL,
exact resume, SIGTERM). The 2-process test is in test_multiprocess.py.

A random tiny model never writes a right answer or a verdict, so the runs use one of two test doubles:
  - ScriptedSampler (stands in for rollout.Sampler): canned responses, right (short) or wrong (long), and critiques
    saying "right" or "wrong", chosen from the prompt and sample index only (batch-invariant, so any split
    over ranks samples the same texts); log-probs are the model's own, so the sampler-trainer gap is ~0.
    The real rewards, verdict parser, filter and cache then see mixed groups in both halves.
  - hash_rewards: the real Sampler, with reward.response_reward / reward.extract_verdict replaced by a hash
    of the text (mixed rewards from random text; exercises the sampler's seeding).
"""
import json
import math
import os
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import config
import critique
import data
import grpo
import reward
import rollout
import runtime
import train
from conftest import make_model, make_tokenizer

ROOT = Path(__file__).resolve().parents[1]
CONTRACT_KEYS = ["step", "reward/response", "acc/response", "reward/critique", "acc/critique", "critic/precision",
                 "critic/recall", "critic/wrong_rate", "critic/format_rate", "frac_reward_zero_std", "cache/size",
                 "len/response", "len/critique", "trunc/response", "trunc/critique", "entropy", "clip_ratio", "kl",
                 "grad_norm", "loss", "lr", "logprob_gap", "tokens_per_s", "time/rollout1", "time/rollout2",
                 "time/score", "time/update", "time/step", "mem/peak_rss_gib"]
NOISY = ("time/", "tokens_per_s", "mem/")  # wall-clock and memory metrics: never compared


# ----------------------------------------------------------------------------- test doubles and fixtures

class ScriptedSampler:
    """rollout.Sampler's interface with canned completions (see module docstring)."""

    def __init__(self, model, max_batch=64, max_len=1024, dtype=None):
        self.model, self.tok = model, make_tokenizer()
        self.stats = {}

    def release(self):  # no KV cache to free
        pass

    def text(self, prompt, j):
        h = zlib.crc32(bytes(str(prompt), "utf-8")) + j
        p = self.tok.decode(prompt)
        if "Conclusion:" in p and "#Critique#" not in p:  # a critique prompt (not a refinement)
            return f"Checked.\nConclusion: {'right' if h % 2 else 'wrong'} [END]"
        return "\\boxed{7}" if h % 2 else "3 + 4 = 8. The answer is \\boxed{8}."  # right ones are shorter

    @torch.no_grad()
    def generate(self, prompts, n=1, max_new_tokens=256, temperature=1.0, top_p=1.0, top_k=0, stop_ids=None,
                 seed=None):
        out = []
        for i, p in enumerate(prompts):
            for j in range(n):
                toks = self.tok(self.text(p, j), add_special_tokens=False)["input_ids"] + [self.tok.eos_token_id]
                trunc = len(toks) > max_new_tokens
                toks = toks[:max_new_tokens]
                logits = self.model(torch.tensor([list(p) + toks])).logits[0, len(p) - 1:-1].float()
                lp = torch.log_softmax(logits / (temperature or 1.0), -1).gather(-1, torch.tensor(toks)[:, None])
                out.append(dict(prompt_index=i, tokens=toks, logprobs=lp[:, 0].tolist(), length=len(toks),
                                truncated=trunc))
        return out


def install_scripted(monkeypatch):
    monkeypatch.setattr(rollout, "Sampler", ScriptedSampler)


def hash_rewards(monkeypatch):
    """Mixed Eq. 1 rewards and verdicts from random text: a hash decides."""
    monkeypatch.setattr(reward, "response_reward", lambda text, gold, **kw: float(zlib.crc32(text.encode()) % 2))
    monkeypatch.setattr(reward, "extract_verdict",
                        lambda text: ("right", "wrong")[zlib.crc32(text.encode()) % 2])


def write_questions(path, n=8):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"question": f"What is {i} + {7 - i}?", "answer": "7"}) + "\n")
    return f"jsonl:{path}"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Busy 2-core machine: oversubscribed OpenMP threads make tiny matmuls 100x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random llama + the byte tokenizer saved as a local HF dir (what --model takes)."""
    d = tmp_path_factory.mktemp("tiny") / "model"
    tok = make_tokenizer()
    make_model(vocab_size=len(tok)).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def qspec(tmp_path_factory):
    return write_questions(tmp_path_factory.mktemp("data") / "q.jsonl")


def base_args(tiny_dir, qspec, out, **over):
    kw = {"--model": tiny_dir, "--data": qspec, "--out": str(out), "--questions-per-step": 2,
          "--num-generations": 2, "--pairs-per-step": 2, "--critiques-per-pair": 2, "--max-completion-length": 48,
          "--max-critique-length": 48, "--learning-rate": 1e-3, "--max-steps": 1, "--log-every": 0}
    kw.update(over)
    argv = []
    for k, v in kw.items():
        argv += [k] if v is True else [k, str(v)]
    return argv


def metrics(out):
    return [json.loads(ln) for ln in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def params(path):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


# ----------------------------------------------------------------------------- advantages and loss, by hand

def test_advantages_per_group_hand_values():
    adv, zero = grpo.grpo_advantages([1, 0, 0, 1, 0.7, 0.7, 0.7, 0.7, 0.0], list("aaaabbbbc"))
    std = math.sqrt(4 * 0.25 / 3)  # unbiased std of [1, 0, 0, 1]
    a = 0.5 / (std + 1e-4)
    assert torch.allclose(adv, torch.tensor([a, -a, -a, a, 0, 0, 0, 0, 0]), atol=1e-6)
    assert zero.tolist() == [False] * 4 + [True] * 5  # b: all equal, c: one sample
    adv, _ = grpo.grpo_advantages([1, 0, 0, 1, 0.7, 0.0], list("aaaabb"), scale=False)  # Dr. GRPO: no std
    assert torch.allclose(adv, torch.tensor([0.5, -0.5, -0.5, 0.5, 0.35, -0.35]), atol=1e-6)


def test_advantages_shared_group():
    # --group-mode shared: responses (0/1) and critiques (0 / 0.7) in one normalisation group
    r = [1.0, 0.0, 0.7, 0.0]
    adv, zero = grpo.grpo_advantages(r, [0] * 4)
    t = torch.tensor(r, dtype=torch.float64)
    assert torch.allclose(adv, ((t - t.mean()) / (t.std() + 1e-4)).float(), atol=1e-6)
    assert not zero.any()
    assert grpo.grpo_advantages([0.7, 0.7], [0, 0])[1].all()


def _loss_example():
    # ratios [[2, 1], [0.5, 1]], A = [+1, -1], last token of row 1 masked
    logp = torch.log(torch.tensor([[0.4, 0.3], [0.1, 0.6]])).requires_grad_()
    old = torch.log(torch.tensor([[0.2, 0.3], [0.2, 0.6]]))
    return logp, old, torch.tensor([1.0, -1.0]), torch.tensor([[1.0, 1.0], [1.0, 0.0]])


def test_grpo_loss_hand_values():
    logp, old, adv, mask = _loss_example()
    # per token: row 0: ratio 2, A=+1 -> clipped at 1.28 -> -1.28; ratio 1 -> -1
    #            row 1: ratio .5, A=-1 -> clipped at .8 -> +0.8; (masked: ratio 1 -> +1)
    kw = dict(epsilon=0.2, epsilon_high=0.28)
    loss, st = grpo.grpo_loss(logp, old, None, adv, mask, loss_type="token-mean", **kw)
    assert loss.item() == pytest.approx((-1.28 - 1 + 0.8) / 3, abs=1e-6)
    assert st == dict(tokens=3.0, clipped=2.0, kl=0.0)
    loss.backward()  # clipped tokens carry no gradient; the unclipped one: d(-rho*A/3)/dlogp = -1/3
    assert torch.allclose(logp.grad, torch.tensor([[0.0, -1 / 3], [0.0, 0.0]]), atol=1e-6)
    loss, _ = grpo.grpo_loss(logp, old, None, adv, mask, loss_type="seq-mean", **kw)
    assert loss.item() == pytest.approx(((-1.28 - 1) / 2 + 0.8) / 2, abs=1e-6)
    loss, _ = grpo.grpo_loss(logp, old, None, adv, mask, loss_type="dr-grpo", max_completion_length=4, **kw)
    assert loss.item() == pytest.approx((-1.28 - 1 + 0.8) / (2 * 4), abs=1e-6)
    # symmetric clip (epsilon_high defaults to epsilon): row 0 clips at 1.2
    loss, _ = grpo.grpo_loss(logp, old, None, adv, mask, epsilon=0.2)
    assert loss.item() == pytest.approx((-1.2 - 1 + 0.8) / 3, abs=1e-6)
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo.grpo_loss(logp, old, None, adv, mask, loss_type="dr-grpo")


def test_grpo_loss_kl_k3():
    logp, old, adv, mask = _loss_example()
    d = torch.tensor([[0.5, -0.2], [0.1, 0.3]])  # ref - logp
    ref = logp.detach() + d
    k3 = torch.exp(d) - d - 1
    assert k3[0, 0].item() == pytest.approx(math.exp(0.5) - 1.5, abs=1e-7)
    base, _ = grpo.grpo_loss(logp, old, None, adv, mask, epsilon_high=0.28)
    loss, st = grpo.grpo_loss(logp, old, ref, adv, mask, epsilon_high=0.28, beta=0.1)
    kl_sum = float(k3[0, 0] + k3[0, 1] + k3[1, 0])
    assert st["kl"] == pytest.approx(kl_sum, abs=1e-6)
    assert loss.item() == pytest.approx(base.item() + 0.1 * kl_sum / 3, abs=1e-6)


@pytest.mark.parametrize("loss_type", grpo.LOSS_TYPES)
def test_grpo_loss_pieces_sum_to_whole(loss_type):
    """Micro-batches and ranks pass the global normalisers: the pieces' losses add up to the whole."""
    g = torch.Generator().manual_seed(0)
    logp, old = -torch.rand(5, 7, generator=g), -torch.rand(5, 7, generator=g)
    adv = torch.randn(5, generator=g)
    mask = (torch.arange(7)[None] < torch.tensor([7, 3, 5, 1, 6])[:, None]).float()
    kw = dict(loss_type=loss_type, max_completion_length=7, beta=0.05, ref_logp=old * 0.9)
    whole, _ = grpo.grpo_loss(logp, old, adv=adv, mask=mask, **kw)
    n_tok, n_seq = mask.sum(), 5
    parts = [grpo.grpo_loss(logp[s], old[s], adv=adv[s], mask=mask[s], num_tokens=n_tok, num_seqs=n_seq,
                             **dict(kw, ref_logp=kw["ref_logp"][s]))[0] for s in (slice(0, 2), slice(2, 5))]
    assert sum(parts).item() == pytest.approx(whole.item(), abs=1e-6)


def test_trainer_logprobs_match_sampler(tokenizer, tiny_model):
    """The trainer's right-padded forward gives the sampler's log-probs on the sampler's tokens."""
    prompts = [tokenizer("What is 2 + 2?")["input_ids"], tokenizer("Hi")["input_ids"]]
    outs = rollout.Sampler(tiny_model, max_len=128).generate(prompts, n=2, max_new_tokens=12, temperature=0.7,
                                                             seed=3, stop_ids=[tokenizer.eos_token_id])
    seqs = [grpo.Completion(prompt_ids=prompts[o["prompt_index"]], tokens=o["tokens"]) for o in outs]
    for share in (False, True):  # one row per sequence, and each prompt once with its 2 completions
        inputs, mask = grpo.collate(seqs, tokenizer.pad_token_id, "cpu", share=share)
        assert inputs["input_ids"].shape[0] == (2 if share else 4)
        with torch.no_grad():
            logp, ent = grpo.Policy(tiny_model)(**inputs, temperature=0.7)
        for r, o in enumerate(outs):
            assert torch.allclose(logp[r, :o["length"]], torch.tensor(o["logprobs"]), atol=1e-4)
        assert bool((ent[mask > 0] > 0).all())


def test_stream_is_a_seeded_permutation_per_epoch():
    s = runtime.Stream(5, seed=1)
    first = s.take(3) + s.take(2)
    assert sorted(first) == list(range(5)) and s.state() == dict(epoch=1, pos=0, n=5)
    nxt = s.take(7)  # epoch 1 in full, then 2 of epoch 2
    assert sorted(nxt[:5]) == list(range(5)) and s.state() == dict(epoch=2, pos=2, n=5)
    again = runtime.Stream(5, seed=1, epoch=1, pos=0)
    assert again.take(5) == nxt[:5]


# ----------------------------------------------------------------------------- whole runs of train.main

def test_gc_step_end_to_end(monkeypatch, tiny_dir, qspec, tmp_path):
    """One GC-RL step with signal in both halves: parameters move, every contract metric is logged and
    finite, samples and a loadable checkpoint are written. ppo-epochs 2 x 2 mini-batches (4 updates), grad-accum
    2 and beta > 0 exercise old log-probs from the trainer, the clip, the k3 KL and accumulation."""
    install_scripted(monkeypatch)
    out = tmp_path / "gc"
    train.main(base_args(tiny_dir, qspec, out, **{"--beta": 0.1, "--ppo-epochs": 2, "--mini-batch-size": 4,
                                                   "--grad-accum": 2, "--epsilon": 0.01, "--eval-every": 1,
                                                   "--eval-limit": 2, "--eval-data": qspec}))
    (row,) = metrics(out)
    assert row["eval/acc/response"] == 0.5  # greedy eval: the scripted sampler is right on one of 2 questions
    missing = [k for k in CONTRACT_KEYS if k not in row]
    assert not missing, missing
    assert all(math.isfinite(row[k]) for k in CONTRACT_KEYS)
    assert 0.05 < row["mem/peak_rss_gib"] < 64  # this process's peak so far: the torch runtime at least
    assert row["frac_reward_zero_std"] == 0.0 and row["critic/format_rate"] == 1.0
    assert row["logprob_gap"] < 1e-4  # the scripted sampler reports the model's own log-probs
    assert row["clip_ratio"] > 0 and row["kl"] > 0  # the second epoch moved off the old policy
    assert row["update/seqs"] == 2 * 2 + 2 * 2  # 2 questions x 2 responses + 2 pairs x 2 critiques
    before, after = params(tiny_dir), params(out / "final")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    kinds = {json.loads(ln)["kind"] for ln in (out / "samples.jsonl").read_text().splitlines()}
    assert kinds == {"response", "critique"}
    ck = out / "checkpoint-1"
    state = json.loads((ck / "trainer_state.json").read_text())
    assert state["step"] == 1 and state["data"]["pos"] == 2 and len(state["ranks"]) == 1
    assert not list(out.glob("*.tmp"))
    cfg = json.loads((out / "train_config.json").read_text())
    assert cfg["mode"] == "gc" and cfg["num_processes"] == 1


def test_step_without_pairs_runs_generation_half_alone(tiny_dir, qspec, tmp_path):
    """Real sampler, random model: every response is wrong, every group uniform -> nothing enters the
    cache, no critiques, no update; the step still runs and logs the generation half."""
    out = tmp_path / "nopairs"
    train.main(base_args(tiny_dir, qspec, out, **{"--mode": "gc", "--max-completion-length": 8}))
    (row,) = metrics(out)
    assert row["reward/response"] == 0.0 and row["frac_reward_zero_std"] == 1.0 and row["cache/size"] == 0
    assert "reward/critique" not in row and "loss" not in row and row["update/seqs"] == 0
    before, after = params(tiny_dir), params(out / "final")
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("flag,want", [("auto", torch.bfloat16), ("fp32", torch.float32)])
def test_bf16_training_samples_in_bf16(monkeypatch, tiny_dir, qspec, tmp_path, flag, want):
    """--mixed-precision bf16 keeps fp32 master weights and (by default) samples in bf16 from them."""
    made = []

    class Recording(rollout.Sampler):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            made.append(self)
            self.cache_dtypes = []

        def release(self):  # the cache is freed after each step's sampling: note its dtype first
            self.cache_dtypes.append(self.cache.k.dtype)
            super().release()

    monkeypatch.setattr(rollout, "Sampler", Recording)
    out = tmp_path / flag
    train.main(base_args(tiny_dir, qspec, out, **{"--mode": "g", "--mixed-precision": "bf16",
                                                  "--sampler-dtype": flag, "--max-completion-length": 8}))
    (s,) = made
    assert s.cache_dtypes == [want] and s.model.lm_head.weight.dtype == torch.float32
    (row,) = metrics(out)
    assert row["len/response"] > 0 and math.isfinite(row["reward/response"])


def test_kv_cache_is_freed_before_the_update(monkeypatch, tiny_dir, qspec, tmp_path):
    """The sampler's KV cache is freed after each step's sampling (none while the update runs) and allocated
    again by the next step's first rollout, which then samples exactly what a kept cache samples."""
    base, update = rollout.Sampler, train.Trainer.update

    def run(out, keep):
        made, samples, during_update = [], [], []

        class Recording(base):
            def __init__(self, *args, **kw):
                super().__init__(*args, **kw)
                made.append(self)

            def generate(self, *args, **kw):
                res = super().generate(*args, **kw)
                samples.append([(o["tokens"], o["logprobs"]) for o in res])
                return res

            def release(self):
                if not keep:
                    super().release()

        def recording_update(self, seqs, m):
            during_update.append(self.sampler.cache is None)
            return update(self, seqs, m)

        monkeypatch.setattr(rollout, "Sampler", Recording)
        monkeypatch.setattr(train.Trainer, "update", recording_update)
        train.main(base_args(tiny_dir, qspec, out, **{"--mode": "gc", "--max-completion-length": 8,
                                                      "--max-critique-length": 8, "--max-steps": 2}))
        return made[0], samples, during_update

    hash_rewards(monkeypatch)
    s, freed, during = run(tmp_path / "freed", keep=False)
    assert during == [True, True] and s.cache is None
    _, kept, during_kept = run(tmp_path / "kept", keep=True)
    assert during_kept == [False, False]
    assert len(freed) >= 3 and freed == kept  # step 2 sampled (from a new cache) exactly as from the kept one
    assert any("loss" in r for r in metrics(tmp_path / "freed"))  # step 1 did update the weights step 2 samples


def test_resume_continues_exactly(monkeypatch, tiny_dir, qspec, tmp_path):
    """4 steps straight == 2 steps, then --resume auto to 4: same parameters, same metrics."""
    hash_rewards(monkeypatch)
    monkeypatch.setattr(train, "CACHE_CAPACITY", 6)  # evictions happen, and must resume exactly too
    common = {"--mode": "gc", "--max-completion-length": 8, "--max-critique-length": 8, "--beta": 0.05,
              "--pairs-per-step": 2}
    a, b = tmp_path / "straight", tmp_path / "resumed"
    train.main(base_args(tiny_dir, qspec, a, **dict(common, **{"--max-steps": 4})))
    train.main(base_args(tiny_dir, qspec, b, **dict(common, **{"--max-steps": 2})))
    train.main(base_args(tiny_dir, qspec, b, **dict(common, **{"--max-steps": 4, "--resume": "auto"})))
    pa, pb = params(a / "final"), params(b / "final")
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    ma, mb = metrics(a), metrics(b)
    assert [r["step"] for r in mb] == [1, 2, 3, 4]
    strip = [{k: v for k, v in r.items() if not k.startswith(NOISY)} for r in ma + mb]
    assert strip[:4] == strip[4:]
    assert any("loss" in r for r in ma) and any("reward/critique" in r for r in ma)  # both halves trained
    assert sorted(p.name for p in b.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]


def test_sft_mode(tiny_dir, tmp_path):
    """SFT on critique rows and generation rows, bf16 autocast: the loss on a fixed batch goes down."""
    path = tmp_path / "cold.jsonl"
    rows = [dict(question="What is 3 + 4?", response="3 + 4 = 7. \\boxed{7}", critique="Fine.\nConclusion: right [END]",
                 label=True),
            dict(question="What is 3 + 4?", response="3 + 4 = 8. \\boxed{8}", critique="No.\nConclusion: wrong [END]",
                 label=False),
            dict(question="What is 2 + 5?", response="2 + 5 = 7. \\boxed{7}")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "sft"
    train.main(["--mode", "sft", "--model", tiny_dir, "--data", f"jsonl:{path}", "--out", str(out),
                "--questions-per-step", "3", "--max-steps", "4", "--learning-rate", "3e-3",
                "--mixed-precision", "bf16", "--log-every", "0"])
    ms = metrics(out)
    assert [r["step"] for r in ms] == [1, 2, 3, 4]
    assert ms[-1]["loss"] < ms[0]["loss"] and all(math.isfinite(r["grad_norm"]) for r in ms)
    assert "len/critique" in ms[0] and "len/response" in ms[0]
    assert (out / "final" / "config.json").is_file()


def test_mode_c_static_pairs_shared_groups(monkeypatch, tiny_dir, qspec, tmp_path):
    """C-RL from a pairs file, --group-mode shared, Dr. GRPO loss, bf16 autocast, gradient checkpointing:
    critiques only, no first-order rollout."""
    install_scripted(monkeypatch)
    pairs = tmp_path / "pairs.jsonl"
    critique.save_pairs(pairs, [dict(question="What is 3 + 4?", response=r, label=lab, answer="7")
                                for r, lab in (("\\boxed{7}", True), ("\\boxed{8}", False))] * 2)
    out = tmp_path / "c"
    train.main(base_args(tiny_dir, qspec, out, **{"--mode": "c", "--static-pairs": str(pairs), "--group-mode": "shared",
                                                  "--loss-type": "dr-grpo", "--scale-rewards": "false",
                                                  "--max-steps": 2, "--mixed-precision": "bf16",
                                                  "--gradient-checkpointing": True}))
    ms = metrics(out)
    assert len(ms) == 2 and all("reward/critique" in r and "loss" in r for r in ms)
    assert not any("reward/response" in r for r in ms)


def test_mask_truncated(monkeypatch, tiny_dir, qspec, tmp_path):
    """With a 20-token budget the scripted wrong answers are cut off: --mask-truncated keeps them out of the
    loss (they still count in the group statistics)."""
    install_scripted(monkeypatch)
    for flag, n in ((False, 4), (True, 2)):
        out = tmp_path / f"mask{flag}"
        train.main(base_args(tiny_dir, qspec, out, **{"--mode": "g", "--max-completion-length": 20,
                                                      **({"--mask-truncated": True} if flag else {})}))
        (row,) = metrics(out)
        assert row["trunc/response"] == 0.5 and row["acc/response"] == 0.5 and row["update/seqs"] == n


def test_bad_inputs_name_the_flag(tiny_dir, qspec, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "critique": "c"}) + "\n")
    with pytest.raises(data.DataError, match="row 1.*'response'"):
        train.main(["--mode", "sft", "--model", tiny_dir, "--data", f"jsonl:{bad}", "--out", str(tmp_path / "s")])
    with pytest.raises(config.ConfigError, match="--static-pairs"):
        train.main(base_args(tiny_dir, qspec, tmp_path / "g", **{"--mode": "g", "--static-pairs": str(bad)}))
    with pytest.raises(config.ConfigError, match="--num-generations"):
        train.main(base_args(tiny_dir, qspec, tmp_path / "g", **{"--num-generations": 1}))
    with pytest.raises(config.ConfigError, match="--resume"):
        train.main(base_args(tiny_dir, qspec, tmp_path / "g", **{"--resume": str(tmp_path)}))
    args = config.build_parser().parse_args(["--questions-per-step", "3", "--pairs-per-step", "4"])
    with pytest.raises(config.ConfigError, match=r"--questions-per-step 3 .*processes \(2\)"):
        config.plan(args, world=2)
    args.questions_per_step, args.pairs_per_step = 4, 3
    with pytest.raises(config.ConfigError, match="--pairs-per-step"):
        config.plan(args, world=2)
    # --mode c with no pairs: the random model's static rollout has no mixed question
    with pytest.raises(config.ConfigError, match="--mode c: no critique pairs.*--static-pairs"):
        train.main(base_args(tiny_dir, qspec, tmp_path / "c", **{"--mode": "c", "--static-k": 2,
                                                                 "--static-questions": 2,
                                                                 "--max-completion-length": 4}))


def test_model_flag_takes_a_run_dir_and_names_a_bad_one(tiny_dir, qspec, tmp_path):
    """--model resolves like eval.py's: a train.py run dir means its final/ model; a dir without a model is one
    clear error line (exit 2), not a traceback from transformers."""
    import shutil
    shutil.copytree(tiny_dir, tmp_path / "sft" / "final")
    first = train.main(base_args(tmp_path / "sft", qspec, tmp_path / "a", **{"--mode": "g"}))
    again = train.main(base_args(tiny_dir, qspec, tmp_path / "b", **{"--mode": "g"}))
    same = lambda row: {k: v for k, v in row.items() if not k.startswith(("time/", "mem/", "tokens_per_s"))}  # noqa: E731
    assert same(metrics(first)[0]) == same(metrics(again)[0]) and "len/response" in metrics(first)[0]  # same model
    bad = tmp_path / "empty"
    bad.mkdir()
    with pytest.raises(rollout.ModelError, match="empty: not a model directory"):
        train.main(base_args(bad, qspec, tmp_path / "c"))
    proc = subprocess.run([sys.executable, str(ROOT / "train.py")] + base_args(bad, qspec, tmp_path / "d"), cwd=ROOT,
                          capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 2 and "train.py: error:" in proc.stderr and "Traceback" not in proc.stderr


def test_sigterm_saves_a_loadable_checkpoint(tiny_dir, qspec, tmp_path):
    """train.py as a process: SIGTERM after it starts stepping -> it finishes the step, saves, exits 0."""
    out = tmp_path / "term"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py")]
                            + base_args(tiny_dir, qspec, out, **{"--mode": "g", "--max-steps": 100000,
                                                                 "--max-completion-length": 8}),
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while not ((out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().strip()):
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "train.py never logged a step"
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        log, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, log
    cks = runtime.checkpoints(out)
    assert len(cks) == 1 and "stopped by SIGTERM" in log and str(cks[0]) in log
    step = int(cks[0].name.split("-")[1])
    state = json.loads((cks[0] / "trainer_state.json").read_text())
    assert state["step"] == step == len(metrics(out)) and step < 100000
    from transformers import AutoModelForCausalLM, AutoTokenizer
    AutoModelForCausalLM.from_pretrained(cks[0] / "model")
    AutoTokenizer.from_pretrained(cks[0] / "model")
    assert not list(out.glob("*.tmp"))


def test_share_prompts_makes_the_same_update(monkeypatch, tiny_dir, qspec, tmp_path):
    """One GC-RL step (grad-accum 2, 2 mini-batches x 2 epochs, beta > 0: old and reference log-probs packed too)
    with each prompt trained once per group ends at the same parameters and metrics as one row per sequence."""
    install_scripted(monkeypatch)
    runs = {}
    for share in ("true", "false"):
        out = tmp_path / share
        train.main(base_args(tiny_dir, qspec, out, **{"--share-prompts": share, "--grad-accum": 2, "--beta": 0.1,
                                                       "--ppo-epochs": 2, "--mini-batch-size": 4,
                                                       "--learning-rate": 1e-4}))
        runs[share] = (params(out / "final"), metrics(out)[0])
    (pa, ma), (pb, mb) = runs["true"], runs["false"]
    before = params(tiny_dir)
    assert any(not torch.equal(before[k], pa[k]) for k in pa)
    assert max(float((pa[k] - pb[k]).abs().max()) for k in pa) <= 1e-6
    for k in ("loss", "kl", "clip_ratio", "entropy", "logprob_gap", "reward/critique", "grad_norm"):
        assert ma[k] == pytest.approx(mb[k], abs=1e-5), k


# ----------------------------------------------------------------------------- the paper's ablations as flags

def test_pair_filter_random_vs_balance():
    """balance: one right + one wrong of each mixed question, uniform questions dropped (1:1 always);
    random: two responses of every question drawn uniformly, uniform ones included (not 1:1 in general)."""
    import random as _random
    rewards_by_q = [[1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0]]  # accuracy 0.3, as early RL
    samples = [dict(q_index=q, text=f"q{q} r{j}") for q, g in enumerate(rewards_by_q) for j in range(4)]
    rewards = [float(r) for g in rewards_by_q for r in g]
    recs = [dict(id=f"q{q}", question=f"Q{q}", answer="1") for q in range(5)]
    bal = critique.pairs_from_rollout(samples, recs, rewards, _random.Random(0), "balance")
    assert [p["question"] for p in bal] == ["Q2", "Q2", "Q4", "Q4"] and [p["label"] for p in bal] == [True, False] * 2
    right_fracs = []
    for seed in range(20):
        rnd = critique.pairs_from_rollout(samples, recs, rewards, _random.Random(seed), "random")
        assert sorted(p["question"] for p in rnd) == sorted(f"Q{q}" for q in range(5) for _ in range(2))
        for p in rnd:  # each label is its response's own reward
            q, j = map(int, p["response"][1:].split(" r"))
            assert p["label"] == bool(rewards_by_q[q][j])
        assert len({p["response"] for p in rnd}) == 10  # without replacement within a question
        right_fracs.append(sum(p["label"] for p in rnd) / len(rnd))
    assert min(right_fracs) >= 0.2 and max(right_fracs) <= 0.4 and sum(right_fracs) / 20 < 0.45  # follows E[R], not 1:1
    cache = critique.QRCache(capacity=8, seed=0, balanced=False)
    cache.push(rnd)
    assert len(cache) == 8 and cache.evicted == 2  # oldest-first eviction; unbalanced pushes are accepted
    assert len(cache.pop(5)) == 5 and len(cache) == 3
    restored = critique.QRCache(seed=1)
    restored.load_state_dict(cache.state_dict())
    assert not restored.balanced and len(restored.pop(9)) == 3
    with pytest.raises(ValueError, match="as many right as wrong"):
        critique.QRCache().push([dict(question="Q", response="r", label=True)])  # the balanced cache still refuses


def test_gc_random_pair_filter_run(monkeypatch, tiny_dir, qspec, tmp_path):
    """--pair-filter random through a run: the cache takes two responses of every question, uniform ones too."""
    install_scripted(monkeypatch)
    out = tmp_path / "random"
    train.main(base_args(tiny_dir, qspec, out, **{"--pair-filter": "random", "--critique-reward": "reweight",
                                                   "--pairs-per-step": 2}))
    (row,) = metrics(out)
    assert row["cache/size"] == 2 * 2 - 2  # 2 questions x 2 pairs pushed, 2 popped
    assert 0 <= row["pairs/right_frac"] <= 1 and 0 <= row["acc/response_ema"] <= 1
    state = json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())
    assert state["ranks"][0]["cache"]["balanced"] is False


def test_c_dynamic_trains_critiques_of_this_steps_responses_only(monkeypatch, tiny_dir, qspec, tmp_path):
    """--mode c --pairs dynamic: the first-order rollout runs and fills the cache, its responses never enter the
    loss, and the pairs critiqued are this step's own responses."""
    install_scripted(monkeypatch)
    out = tmp_path / "cdyn"
    train.main(base_args(tiny_dir, qspec, out, **{"--mode": "c", "--pairs": "dynamic", "--log-samples": 100}))
    (row,) = metrics(out)
    assert "reward/response" in row and "reward/critique" in row and row["pairs/right_frac"] == 0.5
    assert row["update/seqs"] == 2 * 2  # 2 pairs x 2 critiques; the 2 x 2 responses are not trained
    samples = [json.loads(ln) for ln in (out / "samples.jsonl").read_text().splitlines()]
    responses = [s["text"] for s in samples if s["kind"] == "response"]
    crit_prompts = [s["prompt"] for s in samples if s["kind"] == "critique"]
    assert responses and crit_prompts
    assert all(any(r in p for r in responses) for p in crit_prompts)
    assert not (out / "static_pairs.jsonl").exists()


def test_gc_static_never_pushes_to_the_cache(monkeypatch, tiny_dir, qspec, tmp_path):
    """--mode gc --pairs static: generation trains on fresh rollouts, critiques on the static set built once from
    the starting policy; the cache stays empty."""
    install_scripted(monkeypatch)
    pushes = []
    monkeypatch.setattr(critique.QRCache, "push", lambda self, pairs: pushes.append(pairs))
    out = tmp_path / "gcstatic"
    train.main(base_args(tiny_dir, qspec, out, **{"--pairs": "static", "--static-k": 2, "--max-steps": 2}))
    rows = metrics(out)
    assert not pushes and (out / "static_pairs.jsonl").is_file()
    assert all(r["update/seqs"] == 2 * 2 + 2 * 2 and "cache/size" not in r for r in rows)
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    # the static stream runs over questions (--group-mode question: a question's two pairs together): 2 steps x 1
    assert state["ranks"][0]["cache"]["right"] == [] and state["pairs"]["pos"] == 2


def test_phase_plan_of_each_mode():
    """config.plan derives what a step runs from --mode, --pairs and --pair-filter (the table in config.Plan)."""
    def plan(*argv):
        p = config.plan(config.build_parser().parse_args(list(argv)))
        return p.responses, p.train_responses, p.critiques, p.pairs

    assert plan("--mode", "gc") == (True, True, True, "dynamic")
    assert plan("--mode", "gc", "--pairs", "static") == (True, True, True, "static")
    assert plan("--mode", "g") == (True, True, False, None)
    assert plan("--mode", "c") == (False, False, True, "static")
    assert plan("--mode", "c", "--pairs", "dynamic", "--pair-filter", "random") == (True, False, True, "dynamic")
    assert plan("--mode", "sft") == (False, False, False, None)


def test_ablation_flags_refuse_what_they_do_not_mean(tiny_dir, qspec, tmp_path):
    for over, msg in (({"--mode": "g", "--pairs": "static"}, "--pairs static is for --mode gc / c"),
                      ({"--mode": "c", "--pair-filter": "random"}, "--pair-filter random filters the dynamic"),
                      ({"--mode": "gc", "--static-pairs": "x.jsonl"}, "--static-pairs is for static pairs only")):
        with pytest.raises(config.ConfigError, match=msg):
            train.main(base_args(tiny_dir, qspec, tmp_path / "bad", **over))


def test_training_critic_metrics_are_evals():
    """The per-step critic metrics (train) and eval's come from one function: the same numbers on the same
    verdicts, including a missing verdict (no false positive, but a wrong call)."""
    import reward
    verdicts = ["right", "right", "wrong", None, "wrong", "right", None, "wrong"]
    labels = [True, False, False, True, True, True, False, False]
    crits = [grpo.Completion(prompt_ids=[1], tokens=[2], kind="critique", verdict=v, label=y)
             for v, y in zip(verdicts, labels)]
    m = runtime.Metrics()
    reward.completion_metrics(m, "critique", crits)
    got = m.reduce(SimpleNamespace(num_processes=1))
    want = reward.classification_metrics(verdicts, labels)
    assert got["acc/critique"] == want["accuracy"] == 4 / 8  # tp 2 (rows 0, 5), tn 2 (rows 2, 7)
    assert got["critic/precision"] == want["precision"] == 2 / 3
    assert got["critic/recall"] == want["recall"] == 2 / 4
    assert got["critic/wrong_rate"] == want["wrong_rate"] == 3 / 8
    assert got["critic/format_rate"] == want["format_rate"] == 6 / 8


def test_resume_cuts_metrics_back_to_the_checkpoint(tmp_path):
    """A run killed after step 3 with checkpoint-2: the resumed run rewrites steps 3+ (and drops a cut-short line)."""
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(dict(step=s, loss=0.1 * s)) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
    runtime.truncate_jsonl(path, 2)
    assert [json.loads(x) for x in path.read_text().splitlines()] == [dict(step=1, loss=0.1), dict(step=2, loss=0.2)]
    runtime.truncate_jsonl(tmp_path / "absent.jsonl", 2)  # nothing to cut: no file appears
    assert not (tmp_path / "absent.jsonl").exists()


def test_sampling_seed_offset_keeps_the_questions_and_redraws_the_samples(monkeypatch, tiny_dir, qspec, tmp_path):
    """The A/A control of experiment.py (`gc-aa`): the same --seed with --sampling-seed-offset sees the same
    questions in the same order and samples other responses; offset 0 is the plain run, sample for sample."""
    hash_rewards(monkeypatch)
    runs = {}
    for name, off in (("a", 0), ("b", 0), ("aa", 1)):
        out = tmp_path / name
        train.main(base_args(tiny_dir, qspec, out, **{"--mode": "g", "--max-steps": 2, "--max-completion-length": 8,
                                                       "--sampling-seed-offset": off, "--log-samples": 4}))
        runs[name] = [json.loads(ln) for ln in (out / "samples.jsonl").read_text().splitlines()]
    questions = {k: [r["prompt"] for r in rows] for k, rows in runs.items()}
    texts = {k: [r["text"] for r in rows] for k, rows in runs.items()}
    assert questions["a"] == questions["b"] == questions["aa"] and len(questions["a"]) == 2 * 2 * 2
    assert texts["a"] == texts["b"] and texts["a"] != texts["aa"]
