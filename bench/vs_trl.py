"""gcrl vs TRL: the same vanilla GRPO work in `train.py --mode g` and in TRL's `GRPOTrainer`.

    pip install -r requirements-bench.txt  # trl==1.16.0
    python bench/vs_trl.py                  # fp32 and bf16, 6 steps per run, one run per tool and dtype
    python bench/vs_trl.py --dtype fp32 --steps 10 --repeats 2   # runs alternate gcrl / trl
    python bench/vs_trl.py --quick          # smoke test: 2 steps, 16 tokens, tiny cold start
    python bench/vs_trl.py --dtype bf16 --data arith:1 --steps 12   # a learning check on easy questions

The work, identical for both: SmolLM2-135M-Instruct after a short SFT cold start (`cold_start`, built once into
runs/bench/cold: the base model scores ~0 on arith, so GRPO would see no signal and, in gcrl, skip the update),
the `arith` task (`--data`), the same questions in the same order (gcrl's data stream for --seed 0 and --limit 256,
handed to TRL with shuffle_dataset=False), the same prompt (data.PROMPT_STYLES["plain"] as one user turn of the chat
template), 4 questions x 4 generations per step, max 128 new tokens, temperature 1, no top-p / top-k, reward
reward.response_reward, advantages (r - mean) / (std + 1e-4) per group, the clipped loss (epsilon 0.2) with
token-mean over the batch (TRL loss_type="dapo"), beta 0 (no reference model), one update per rollout,
AdamW at a constant --lr, grad clip 1.0, CPU; fp32, or bf16 autocast over fp32 weights (TRL bf16=True,
gcrl --mixed-precision bf16). TRL runs with gradient_checkpointing=False (its default is True, which costs
TRL a recompute gcrl does not do).
Known differences: gcrl leaves groups whose rewards are all equal out of the update (their advantage is 0),
TRL runs them through forward and backward and counts their tokens in the token-mean; TRL stops on eos only,
gcrl also on <|endoftext|>.

Each run is its own subprocess (memory and threads do not mix); per run: seconds per step (median of the steps
after the first: gcrl's time/step, TRL's on_step_begin..on_step_end), generated tokens per second of step time,
peak RSS, the training reward per step, and greedy accuracy on --eval-limit arith test questions of the final
model (rollout.Sampler, same for both) against the starting model's: that both learn.
The last line printed is one JSON object with ratio_fp32 / ratio_bf16 = gcrl step time / TRL step time.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0:0] = [str(ROOT)]
import torch  # noqa: E402

import data  # noqa: E402
import models  # noqa: E402
import reward  # noqa: E402
import rollout  # noqa: E402
import runtime  # noqa: E402
import train  # noqa: E402
from common import peak_mib, stats  # noqa: E402  (bench/common.py)

RUNS = ROOT / "runs" / "bench"
LIMIT = 256  # RL questions: the first 256 arith train records; the cold start uses the next 128


def cold_start(quick=False):
    """The bench's starting checkpoint: SFT of SmolLM2-135M on teacher.cold_start_data for 128 arith train
    questions disjoint from the RL ones (program solutions + teacher critiques; eval.py --experiment's recipe:
    48 steps x 8 rows, lr 2e-5). Built once into runs/bench/cold (--quick: 2 steps into cold-quick); returns
    the path of its final/ model."""
    import teacher
    out = RUNS / ("cold-quick" if quick else "cold")
    if not (out / "final" / "config.json").exists():
        recs = data.load_data("arith", split="train", limit=LIMIT + 128, seed=0)
        jsonl = RUNS / "cold_start.jsonl"
        RUNS.mkdir(parents=True, exist_ok=True)
        teacher.cold_start_data(recs[LIMIT:], jsonl, seed=0)
        train.main(["--mode", "sft", "--data", f"jsonl:{jsonl}", "--out", str(out), "--max-steps",
                    "2" if quick else "48", "--questions-per-step", "8", "--lr", "2e-5", "--seed", "0"])
    return str(out / "final")


def questions(steps, spec):
    """The questions gcrl --mode g draws from `spec` (seed 0, --limit LIMIT), in its order: 4 per step."""
    recs = data.load_data(spec, split="train", limit=LIMIT, seed=0)
    stream = runtime.Stream(len(recs), runtime.seed_for(0, "data"))
    return [recs[i] for i in stream.take(4 * steps)]


# ----------------------------------------------------------------------------- the two workers

def run_gcrl(a, out):
    train.main(["--mode", "g", "--model", a.start, "--data", a.data, "--limit", str(LIMIT), "--seed", "0",
                "--out", str(out), "--max-steps", str(a.steps), "--questions-per-step", "4", "--num-generations", "4",
                "--max-completion-length", str(a.max_new), "--lr", str(a.lr), "--beta", "0", "--loss-type",
                "token-mean", "--scale-rewards", "true", "--epsilon", "0.2", "--max-grad-norm", "1.0",
                "--mixed-precision", "bf16" if a.dtype == "bf16" else "no", "--log-every", "0", "--cpu"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return dict(step_s=[r["time/step"] for r in rows], tokens=[r["len/response"] * 16 for r in rows],
                reward=[r["reward/response"] for r in rows], final=str(out / "final"))


def run_trl(a, out):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    recs = questions(a.steps, a.data)
    ds = Dataset.from_list([dict(prompt=[{"role": "user", "content": data.PROMPT_STYLES["plain"].format(
        question=r["question"])}], answer=r["answer"]) for r in recs])
    log = dict(step_s=[], tokens=[], reward=[])

    def arith_reward(completions, answer, completion_ids, **kw):
        rs = [reward.response_reward(c[0]["content"], gold) for c, gold in zip(completions, answer)]
        log["tokens"].append(sum(map(len, completion_ids)))
        log["reward"].append(sum(rs) / len(rs))
        return rs

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            log["step_s"].append(time.perf_counter() - self.t)

    cfg = GRPOConfig(output_dir=str(out), use_cpu=True, bf16=a.dtype == "bf16", report_to=[], save_strategy="no",
                     logging_steps=1, per_device_train_batch_size=16, num_generations=4, generation_batch_size=16,
                     gradient_accumulation_steps=1, max_completion_length=a.max_new, max_steps=a.steps,
                     learning_rate=a.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                     max_grad_norm=1.0, beta=0.0, loss_type="dapo", scale_rewards="group", epsilon=0.2,
                     num_iterations=1, temperature=1.0, top_p=1.0, top_k=0, shuffle_dataset=False, seed=0,
                     gradient_checkpointing=False, disable_tqdm=True)
    model = AutoModelForCausalLM.from_pretrained(a.start, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(a.start)
    trainer = GRPOTrainer(model=model, reward_funcs=arith_reward, args=cfg, train_dataset=ds, processing_class=tok,
                          callbacks=[Timer()])
    trainer.train()
    trainer.save_model(str(out / "final"))
    return dict(log, final=str(out / "final"))


def worker(a):
    out = RUNS / "vs_trl" / f"{a.worker}-{a.dtype}-{a.rep}"
    out.mkdir(parents=True, exist_ok=True)
    t, load = time.perf_counter(), os.getloadavg()[0]
    res = (run_gcrl if a.worker == "gcrl" else run_trl)(a, out)
    res.update(wall_s=time.perf_counter() - t, peak_rss_mib=peak_mib(), threads=torch.get_num_threads(),
               load=[round(load, 2), round(os.getloadavg()[0], 2)])  # 1-min load average at start and end
    (out / "result.json").write_text(json.dumps(res))


# ----------------------------------------------------------------------------- the parent

def greedy_acc(model_path, recs, max_new):
    """Greedy accuracy on recs with the gcrl Sampler (the same judge for both tools' final models)."""
    model, tok = models.load_policy(model_path)
    outs = rollout.first_order_rollout(rollout.Sampler(model, max_batch=64, max_len=512), tok, recs, 1,
                                       max_new_tokens=max_new, temperature=0.0, seed=0)
    return sum(reward.response_reward(o["text"], recs[o["q_index"]]["answer"]) for o in outs) / len(outs)


def summary(runs):
    """Pool the runs of one tool and dtype: step time over the steps after each run's first."""
    steps = [s for r in runs for s in r["step_s"][1:]] or [s for r in runs for s in r["step_s"]]
    tps = [n / s for r in runs for n, s in list(zip(r["tokens"], r["step_s"]))[1:]]
    return dict(step_s=stats(steps), gen_tokens_per_s=stats(tps or [0.0], 1),
                len_completion=round(sum(t for r in runs for t in r["tokens"])
                                     / (16 * sum(len(r["tokens"]) for r in runs)), 1),
                first_step_s=[round(r["step_s"][0], 2) for r in runs],
                reward=[[round(x, 3) for x in r["reward"]] for r in runs],
                eval_acc=[r.get("eval_acc") for r in runs], peak_rss_mib=max(r["peak_rss_mib"] for r in runs),
                wall_s=[round(r["wall_s"], 1) for r in runs], load=[r["load"] for r in runs])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="both", choices=["fp32", "bf16", "both"], help="trainer precision")
    ap.add_argument("--data", default="arith", help="arith SPEC of the RL and eval questions (e.g. arith:1, "
                    "easier: a learning check); the cold start is always the same")
    ap.add_argument("--steps", type=int, default=6, help="GRPO steps per run (the first is reported apart)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per tool and dtype; the tools alternate")
    ap.add_argument("--lr", type=float, default=5e-6, help="learning rate (constant) of both")
    ap.add_argument("--max-new", type=int, default=128, help="max_completion_length")
    ap.add_argument("--eval-limit", type=int, default=64, help="arith test questions for the greedy accuracy "
                                                               "before / after (0: skip)")
    ap.add_argument("--tools", default="gcrl,trl", help="comma list: which tools to run")
    ap.add_argument("--quick", action="store_true", help="smoke test: 2 steps, 16 new tokens, tiny cold start")
    ap.add_argument("--worker", choices=["gcrl", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--start", help=argparse.SUPPRESS)
    ap.add_argument("--rep", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.quick:
        a.steps, a.max_new, a.eval_limit = 2, 16, min(a.eval_limit, 8)
    if a.worker:
        return worker(a)

    start = cold_start(a.quick)
    test = data.load_data(a.data, split="test", limit=a.eval_limit, seed=0) if a.eval_limit else []
    res = dict(start=start, data=a.data, steps=a.steps, lr=a.lr, max_new=a.max_new, cpu_count=os.cpu_count(),
               omp_threads=os.environ.get("OMP_NUM_THREADS"), torch=torch.__version__,
               load_avg_start=round(os.getloadavg()[0], 2))
    if test:
        res["eval_acc_start"] = round(greedy_acc(start, test, a.max_new), 3)
    tools = a.tools.split(",")
    for dtype in (["fp32", "bf16"] if a.dtype == "both" else [a.dtype]):
        runs = {t: [] for t in tools}
        for rep in range(a.repeats):
            for tool in (tools if rep % 2 == 0 else tools[::-1]):
                cmd = [sys.executable, __file__, "--worker", tool, "--dtype", dtype, "--rep", str(rep), "--start",
                       start, "--steps", str(a.steps), "--lr", str(a.lr), "--max-new", str(a.max_new), "--data", a.data]
                print(f"[vs_trl] {tool} {dtype} run {rep + 1}/{a.repeats} (load {os.getloadavg()[0]:.2f})",
                      file=sys.stderr, flush=True)
                subprocess.run(cmd, check=True, cwd=ROOT)
                r = json.loads((RUNS / "vs_trl" / f"{tool}-{dtype}-{rep}" / "result.json").read_text())
                if test:
                    r["eval_acc"] = round(greedy_acc(r["final"], test, a.max_new), 3)
                print(f"[vs_trl] {tool} {dtype}: step s {[round(s, 1) for s in r['step_s']]}, "
                      f"reward {[round(x, 2) for x in r['reward']]}, eval acc {r.get('eval_acc')}",
                      file=sys.stderr, flush=True)
                runs[tool].append(r)
        for tool in tools:
            res[f"{tool}_{dtype}"] = summary(runs[tool])
        if {"gcrl", "trl"} <= set(tools):
            gcrl_s, trl_s = res[f"gcrl_{dtype}"]["step_s"]["median"], res[f"trl_{dtype}"]["step_s"]["median"]
            res[f"ratio_{dtype}"] = round(gcrl_s / trl_s, 3)
    res["load_avg_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
