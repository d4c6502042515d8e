"""The trainer's update against an independent computation of it (arXiv 2602.22765 §3, Eq. 1-7).

Every other end-to-end test compares the trainer with itself (packed vs unpacked, 1 vs 2 processes, resumed vs
straight). Here a run of train.main on a tiny model samples from a scripted sampler (canned texts, some groups
uniform, some mixed) and records, at each optimizer step, the parameters and the gradient the optimizer is about
to apply (a global optimizer pre-step hook: no trainer internals are touched). The test then recomputes each
update on its own from what was sampled: rewards from the equations (Eq. 1-6, with the refinements of Eq. 4),
groups from the prompts, advantages and the zero-spread filter by hand, log-probs (current, old, reference) by a
plain HF forward of one sequence at a time, and the loss and gradient of `grpo_loss` on all of it at once, with
the whole batch's counts. The trainer's gradient and its logged loss must agree with those to float noise, for
GRPO and SFT, packed and unpacked, --grad-accum 1 and 3, every --loss-type, 1 and 2 processes. A flipped
advantage sign or advantages attached to the wrong sequences fails (the last tests show that the check does).

This file is also the per-rank driver of the 2-process runs: `accelerate launch ... tests/test_update.py OUT ARGS`
runs train.main(ARGS) with the recording sampler and hook and saves the rank's events to OUT/events{RANK}.pt.
"""
import json
import os
import re
import sys
import zlib
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[0:0] = [str(ROOT), str(ROOT / "tests")]

import config  # noqa: E402
import grpo  # noqa: E402
import rollout  # noqa: E402
import train  # noqa: E402
from test_train import ScriptedSampler  # noqa: E402

RIGHT, WRONG = "\\boxed{7}", "3 + 4 = 8. The answer is \\boxed{8}."  # every question's answer is 7


def _hash(prompt):
    return zlib.crc32(bytes(str(list(prompt)), "utf-8"))


class RecordingSampler(ScriptedSampler):
    """ScriptedSampler whose groups are uniform for a third of the prompts (all right answers; all "wrong"
    verdicts) and mixed otherwise, and which records every generate call in EVENTS."""
    EVENTS = []

    def text(self, prompt, j):
        h, p = _hash(prompt), self.tok.decode(prompt)
        if "#Critique#" in p:  # a refinement (Eq. 4)
            return RIGHT if (h + j) % 2 else WRONG
        if "Conclusion:" in p:  # a critique
            return f"Checked.\nConclusion: {'right' if h % 3 and (h + j) % 2 else 'wrong'} [END]"
        return RIGHT if h % 3 == 0 or (h + j) % 2 else WRONG

    def generate(self, prompts, n=1, **kw):
        out = super().generate(prompts, n=n, **kw)
        self.EVENTS.append(("generate", [list(p) for p in prompts], [list(o["tokens"]) for o in out], n))
        return out


def record_updates(events):
    """A global optimizer pre-step hook: each AdamW step appends ("update", params, grads) to `events`."""
    def hook(opt, args, kwargs):
        if isinstance(opt, torch.optim.AdamW):
            ps = [p for g in opt.param_groups for p in g["params"]]
            events.append(("update", [p.detach().clone() for p in ps],
                           [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in ps]))
    from torch.optim.optimizer import register_optimizer_step_pre_hook
    return register_optimizer_step_pre_hook(hook)


if __name__ == "__main__":  # the driver, one per rank
    torch.set_num_threads(1)
    rollout.Sampler = RecordingSampler
    record_updates(RecordingSampler.EVENTS)
    out, argv = sys.argv[1], sys.argv[2:]
    train.main(argv)
    torch.save(RecordingSampler.EVENTS, Path(out) / f"events{os.environ.get('RANK', '0')}.pt")
    sys.exit(0)

import test_train  # noqa: E402
from conftest import make_tokenizer  # noqa: E402
from test_multiprocess import _free_port  # noqa: E402
from test_train import base_args, metrics, write_questions  # noqa: E402

tiny_dir, one_thread = test_train.tiny_dir, test_train.one_thread  # fixtures

TOK = make_tokenizer()


@pytest.fixture(scope="module")
def qspec(tmp_path_factory):
    return write_questions(tmp_path_factory.mktemp("data") / "q.jsonl", n=16)


def run(tmp_path, argv, monkeypatch, processes=1):
    """train.main(argv) with the recording sampler and hook: the events of each rank, and the metrics rows."""
    out = Path(argv[argv.index("--out") + 1])
    if processes == 1:
        events = []
        monkeypatch.setattr(rollout, "Sampler", RecordingSampler)
        monkeypatch.setattr(RecordingSampler, "EVENTS", events)
        handle = record_updates(events)
        try:
            train.main(argv)
        finally:
            handle.remove()
        return [events], metrics(out)
    import subprocess
    out.mkdir(parents=True, exist_ok=True)
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes",
           str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()), __file__, str(out)] + argv
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return [torch.load(out / f"events{r}.pt") for r in range(processes)], metrics(out)


def steps_of(events, updates_per_step):
    """One rank's events -> per step: (generate events, [(params, grads)] of its optimizer updates)."""
    steps, gens = [], []
    for ev in events:
        if ev[0] == "generate":
            if steps and len(steps[-1][1]) < updates_per_step:
                raise AssertionError("a generate call inside a step's updates")
            gens.append(ev)
        else:
            if gens:
                steps.append((gens, []))
                gens = []
            steps[-1][1].append((ev[1], ev[2]))
    return steps


# ----------------------------------------------------------------------------- the equations, by hand

def field(prompt_text, name):
    """A field of a critique / refinement prompt: #Question#, #Solution#, #Critique#."""
    return re.search(rf"#{name}#:\n(.*?)\n\n#", prompt_text, re.S).group(1)


def pair_of(prompt_text):
    return field(prompt_text, "Question"), field(prompt_text, "Solution")


def completions(gens, args, accuracy):
    """What one step trains on, rewards by the equations: dicts {prompt, tokens, reward, group}."""
    out, critiques, refinements = [], [], {}
    for _, prompts, outs, n in gens:
        for i, toks in enumerate(outs):
            prompt = prompts[i // n]
            p, text = TOK.decode(prompt), TOK.decode(toks, skip_special_tokens=True)
            if "#Critique#" in p:  # refinement of (question, response, critique): correct or not
                key = (*pair_of(p), field(p, "Critique"))
                refinements.setdefault(key, []).append(RIGHT in text)
            elif "Conclusion:" in p:
                critiques.append(dict(prompt=prompt, tokens=toks, text=text, label=RIGHT in field(p, "Solution")))
            elif args["mode"] in ("g", "gc"):
                out.append(dict(prompt=prompt, tokens=toks, reward=1.0 if RIGHT in text else 0.0, group=("r", *prompt)))
    for c in critiques:
        says_right = "Conclusion: right" in c["text"]
        p = min(max(accuracy, 0.05), 0.95)
        r = {"plain": (0.7, 0.7), "precision": (0.6, 0.8), "recall": (0.8, 0.6),  # Eq. 2, 5, 6
             "reweight": (0.35 / p, 0.35 / (1 - p))}[args["critique_reward"]]  # Eq. 3
        reward = (r[0] if c["label"] else r[1]) if says_right == c["label"] else 0.0
        if args["denoise"]:  # Eq. 4: 0.1 k/K after "right", 0.7 k/K after "wrong"
            ks = refinements[(*pair_of(TOK.decode(c["prompt"])), c["text"].strip())]
            assert len(ks) % args["denoise"] == 0  # (equal critiques of one pair: the same refinements)
            reward += (0.1 if says_right else 0.7) * sum(ks) / len(ks)
        out.append(dict(prompt=c["prompt"], tokens=c["tokens"], reward=reward, group=("c", *c["prompt"])))
    return out


def advantages(batch, args):
    """Eq. (GRPO): A = (r - mean) / (std + 1e-4) per group (unbiased std; no std with --scale-rewards false);
    groups with equal rewards are left out. Returns the kept completions with their advantage."""
    groups = {}
    for c in batch:  # question: a question's responses and the critiques of its pairs; per-prompt: c["group"]
        key = {"shared": 0, "question": re.search(r"What is -?\d+ \+ -?\d+\?", TOK.decode(c["prompt"])).group(0)}
        groups.setdefault(key.get(args["group_mode"], c["group"]), []).append(c)
    kept = []
    for members in groups.values():
        r = torch.tensor([c["reward"] for c in members], dtype=torch.float64)
        if len(members) < 2 or float(r.max() - r.min()) <= 1e-9:
            continue
        a = (r - r.mean()) / (r.std() + 1e-4) if args["scale_rewards"] else r - r.mean()
        kept += [dict(c, adv=float(x)) for c, x in zip(members, a)]
    return kept


def load_params(model_dir, params):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir).float()
    ps = list(model.parameters())
    assert [p.shape for p in ps] == [p.shape for p in params]
    with torch.no_grad():
        for p, v in zip(ps, params):
            p.copy_(v)
    return model


def seq_logprobs(model, batch, temperature=1.0):
    """(B, C) log-probs of each completion's tokens, one plain forward per sequence, and the (B, C) mask."""
    C = max(len(c["tokens"]) for c in batch)
    logp, mask = torch.zeros(len(batch), C), torch.zeros(len(batch), C)
    rows = []
    for c in batch:
        ids = torch.tensor([list(c["prompt"]) + list(c["tokens"])])
        logits = model(ids).logits[0, len(c["prompt"]) - 1:-1].float() / temperature
        rows.append(torch.log_softmax(logits, -1).gather(-1, torch.tensor(c["tokens"])[:, None])[:, 0])
    logp = torch.stack([torch.nn.functional.pad(r, (0, C - len(r))) for r in rows])
    for i, c in enumerate(batch):
        mask[i, :len(c["tokens"])] = 1
    return logp, mask


def expected_update(model_dir, params, batch, old_params, ref_params, args):
    """The loss and gradient of grpo_loss on the whole batch at `params` (old / reference log-probs at theirs)."""
    model = load_params(model_dir, params)
    with torch.no_grad():
        old, _ = seq_logprobs(load_params(model_dir, old_params), batch)
        ref = seq_logprobs(load_params(model_dir, ref_params), batch)[0] if args["beta"] else None
    logp, mask = seq_logprobs(model, batch)
    adv = torch.tensor([c["adv"] for c in batch])
    loss, _ = grpo.grpo_loss(logp, old, ref, adv, mask, args["epsilon"], None, args["beta"], args["loss_type"],
                              max(args["max_completion_length"], args["max_critique_length"]))
    loss.backward()
    return float(loss.detach()), [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def grad_error(got, want):
    """max |got - want| over all parameters, relative to the largest entry of `want`."""
    scale = max(float(w.abs().max()) for w in want)
    return max(float((g - w).abs().max()) for g, w in zip(got, want)) / scale


def check_grpo(model_dir, ranks, rows, args, tol=1e-4):
    """Every optimizer update of the run against expected_update; returns the largest relative gradient error
    (and asserts the logged loss). Sequences of all ranks make one batch, as the trainer's normalisers do."""
    upe = args["ppo_epochs"]
    per_rank = [steps_of(ev, upe) for ev in ranks]
    assert len({len(s) for s in per_rank}) == 1 and len(per_rank[0]) == len(rows)
    worst, accuracy, saw_uniform = 0.0, None, False
    for s, row in enumerate(rows):
        gens = [g for steps in per_rank for g in steps[s][0]]
        responses = [(p, o) for _, ps, outs, n in gens for i, o in enumerate(outs)
                     for p in [TOK.decode(ps[i // n])] if "Conclusion:" not in p and "#Critique#" not in p]
        if responses:  # E[R] of Eq. 3: running mean of first-order accuracy (decay 0.9), updated before critiques
            acc = sum(RIGHT in TOK.decode(o) for _, o in responses) / len(responses)
            accuracy = acc if accuracy is None else 0.9 * accuracy + 0.1 * acc
        batch = completions(gens, args, accuracy)
        kept = advantages(batch, args)
        saw_uniform |= len(kept) < len(batch)
        updates = [u for steps in per_rank for u in steps[s][1]]
        assert len(updates) == len(ranks) * upe
        losses = []
        for e in range(upe):
            params, grads = per_rank[0][s][1][e]
            old = per_rank[0][s][1][0][0]  # the parameters the step sampled with (before its first update)
            loss, want = expected_update(model_dir, params, kept, old, ref_params(model_dir), args)
            losses.append(loss)
            for r in range(len(ranks)):  # DDP: every rank applies the same, all-reduced gradient
                worst = max(worst, grad_error(per_rank[r][s][1][e][1], want))
        assert row["loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-4, abs=1e-6), s
        if any(c["group"][0] == "c" for c in batch):
            crit = [c["reward"] for c in batch if c["group"][0] == "c"]
            assert row["reward/critique"] == pytest.approx(sum(crit) / len(crit), abs=1e-6)
    assert saw_uniform or args["group_mode"] == "shared", "no zero-spread group: the filter is not exercised"
    return worst


_REF = {}


def ref_params(model_dir):
    if model_dir not in _REF:
        from transformers import AutoModelForCausalLM
        _REF[model_dir] = [p.detach().clone() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters()]
    return _REF[model_dir]


GRPO = {"--mode": "gc", "--num-generations": 3, "--critiques-per-pair": 3, "--max-steps": 2, "--questions-per-step": 4,
        "--max-grad-norm": 1e9}  # no clipping: the optimizer sees the raw gradient


def grpo_args(argv):
    a = config.build_parser().parse_args(argv)
    return dict(mode=a.mode, critique_reward=a.critique_reward, denoise=a.denoise, group_mode=a.group_mode,
                scale_rewards=a.scale_rewards, beta=a.beta, epsilon=a.epsilon, loss_type=a.loss_type,
                max_completion_length=a.max_completion_length, max_critique_length=a.max_critique_length,
                ppo_epochs=a.ppo_epochs)


# ----------------------------------------------------------------------------- GRPO, one process

@pytest.mark.parametrize("loss_type", ["token-mean", "seq-mean", "dr-grpo"])
@pytest.mark.parametrize("accum", [1, 3])
@pytest.mark.parametrize("share", ["true", "false"])
def test_grpo_update_is_the_equations(monkeypatch, tiny_dir, qspec, tmp_path, share, accum, loss_type):
    argv = base_args(tiny_dir, qspec, tmp_path / "run", **{**GRPO, "--share-prompts": share, "--grad-accum": accum,
                                                                   "--loss-type": loss_type})
    ranks, rows = run(tmp_path, argv, monkeypatch)
    assert all(r["update/micro_batches"] >= (2 if accum > 1 else 1) for r in rows)
    assert check_grpo(tiny_dir, ranks, rows, grpo_args(argv)) < 1e-4


def test_grpo_old_and_reference_logprobs(monkeypatch, tiny_dir, qspec, tmp_path):
    """Two passes over each rollout (old log-probs from before the first, a clip that bites) and a k3 KL to the
    starting policy."""
    argv = base_args(tiny_dir, qspec, tmp_path / "run", **{**GRPO, "--ppo-epochs": 2, "--beta": 0.1,
                                                                   "--epsilon": 0.05, "--grad-accum": 2})
    ranks, rows = run(tmp_path, argv, monkeypatch)
    assert all(r["clip_ratio"] > 0 for r in rows)
    assert check_grpo(tiny_dir, ranks, rows, grpo_args(argv)) < 1e-4


@pytest.mark.parametrize("over", [
    {"--critique-reward": "reweight", "--questions-per-step": 3},  # Eq. 3 with E[R] != 1/2
    {"--critique-reward": "precision"},  # Eq. 5
    {"--critique-reward": "recall", "--denoise": 2},  # Eq. 6 + Eq. 4
    {"--denoise": 1, "--group-mode": "shared"},  # Eq. 2 + Eq. 4, one group for the step
    {"--critique-reward": "precision", "--group-mode": "per-prompt"},  # Eq. 5 in per-pair critique groups
])
def test_critique_rewards_fed_to_the_loss(monkeypatch, tiny_dir, qspec, tmp_path, over):
    """The rewards each step trains on are those of the equations: without the std (Dr. GRPO) an advantage
    keeps its reward's scale, so the gradient shows a wrong constant, E[R] or bonus."""
    argv = base_args(tiny_dir, qspec, tmp_path / "run", **{**GRPO, "--scale-rewards": "false", **over})
    ranks, rows = run(tmp_path, argv, monkeypatch)
    assert all("reward/critique" in r for r in rows)
    assert check_grpo(tiny_dir, ranks, rows, grpo_args(argv)) < 1e-4


# ----------------------------------------------------------------------------- SFT

SFT_ROWS = [dict(question="What is 3 + 4?", response="3 + 4 = 7. \\boxed{7}",
                 critique="Fine.\nConclusion: right [END]"),
            dict(question="What is 3 + 4?", response="3 + 4 = 8. \\boxed{8}",
                 critique="No.\nConclusion: wrong [END]"),
            dict(question="What is 2 + 5?", response="2 + 5 = 7. \\boxed{7}"),
            dict(question="What is 1 + 1?", response="2. \\boxed{2}")]


def sft_batch():
    import critique
    import data
    out = []
    for r in SFT_ROWS:
        prompt = (critique.critique_prompt(TOK, r["question"], r["response"]) if "critique" in r
                  else data.gen_prompt(TOK, r["question"]))
        target = r.get("critique", r["response"])
        out.append(dict(prompt=prompt, tokens=TOK(target, add_special_tokens=False)["input_ids"] + [TOK.eos_token_id]))
    return out


def check_sft(model_dir, ranks, rows):
    """Each SFT update: cross-entropy summed over every target token of the global batch / their count."""
    worst = 0.0
    updates = [[ev for ev in events if ev[0] == "update"] for events in ranks]
    assert len(updates[0]) == len(rows)
    for s, row in enumerate(rows):
        model = load_params(model_dir, updates[0][s][1])
        logp, mask = seq_logprobs(model, sft_batch())
        loss = -(logp * mask).sum() / mask.sum()
        loss.backward()
        want = [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
        for r in range(len(ranks)):
            worst = max(worst, grad_error(updates[r][s][2], want))
        assert row["loss"] == pytest.approx(float(loss), rel=1e-5), s
    return worst


def sft_argv(tiny_dir, tmp_path, **over):
    path = tmp_path / "cold.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in SFT_ROWS))
    kw = {"--mode": "sft", "--model": tiny_dir, "--data": f"jsonl:{path}", "--out": str(tmp_path / "sft"),
          "--questions-per-step": len(SFT_ROWS), "--max-steps": 2, "--learning-rate": 1e-3, "--log-every": 0,
          "--max-grad-norm": 1e9, **over}
    return [x for k, v in kw.items() for x in ([k] if v is True else [k, str(v)])]


@pytest.mark.parametrize("accum", [1, 3])
@pytest.mark.parametrize("share", ["true", "false"])
def test_sft_update_is_cross_entropy(monkeypatch, tiny_dir, tmp_path, share, accum):
    ranks, rows = run(tmp_path, sft_argv(tiny_dir, tmp_path, **{"--share-prompts": share, "--grad-accum": accum}),
                      monkeypatch)
    assert check_sft(tiny_dir, ranks, rows) < 1e-4


# ----------------------------------------------------------------------------- two processes

def test_two_processes_grpo_is_the_equations(monkeypatch, tiny_dir, qspec, tmp_path):
    """2 ranks, each its own questions, cache and pairs: every rank applies the gradient of the loss over both
    ranks' sequences (global token count), with packed rows in 2 micro-batches."""
    argv = base_args(tiny_dir, qspec, tmp_path / "run", **{**GRPO, "--questions-per-step": 4, "--pairs-per-step": 4,
                                                                   "--grad-accum": 2, "--loss-type": "token-mean"})
    ranks, rows = run(tmp_path, argv, monkeypatch, processes=2)
    assert check_grpo(tiny_dir, ranks, rows, grpo_args(argv)) < 1e-4


def test_two_processes_seq_mean_and_sft(monkeypatch, tiny_dir, qspec, tmp_path):
    """seq-mean (global sequence count) unpacked over 2 ranks, and SFT over 2 ranks (global token count)."""
    over = {"--questions-per-step": 4, "--pairs-per-step": 4, "--loss-type": "seq-mean", "--share-prompts": "false",
            "--grad-accum": 3}
    argv = base_args(tiny_dir, qspec, tmp_path / "run", **{**GRPO, **over})
    ranks, rows = run(tmp_path, argv, monkeypatch, processes=2)
    assert check_grpo(tiny_dir, ranks, rows, grpo_args(argv)) < 1e-4
    ranks, rows = run(tmp_path, sft_argv(tiny_dir, tmp_path, **{"--grad-accum": 2}), monkeypatch, processes=2)
    assert check_sft(tiny_dir, ranks, rows) < 1e-4


# ----------------------------------------------------------------------------- the check has teeth

def _mutated(kind):
    real = grpo.grpo_advantages

    def wrong(rewards, groups, *args, **kw):
        adv, zero = real(rewards, groups, *args, **kw)
        if kind == "sign":  # one advantage's sign flipped
            i = int((adv != 0).nonzero()[0])
            adv = adv.clone()
            adv[i] = -adv[i]
        else:  # every advantage moved to the next sequence
            adv = torch.roll(adv, 1)
        return adv, zero
    return wrong


@pytest.mark.parametrize("kind", ["sign", "position"])
def test_the_check_catches_a_wrong_advantage(monkeypatch, tiny_dir, qspec, tmp_path, kind):
    monkeypatch.setattr(grpo, "grpo_advantages", _mutated(kind))
    argv = base_args(tiny_dir, qspec, tmp_path / "run", **GRPO)
    ranks, rows = run(tmp_path, argv, monkeypatch)
    with pytest.raises(AssertionError):
        assert check_grpo(tiny_dir, ranks, rows, grpo_args(argv)) < 1e-4
