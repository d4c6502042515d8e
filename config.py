"""train.py's flags, and what they make a step do: `build_parser`, and `plan`, which checks them all in one place
and derives the phases of a step from --mode, --pairs and --pair-filter (arXiv 2602.22765 §3; ablations §5)."""
import argparse
from dataclasses import dataclass
from pathlib import Path

import critique
import data
import reward
from grpo import LOSS_TYPES

DESCRIPTION = "GC-RL training: one policy learns to answer (generation) and to judge answers (critique) with GRPO."


class ConfigError(ValueError):
    """Bad flags or inputs; the message names the flag."""


@dataclass(frozen=True)
class Plan:
    """The phases of one step, derived once from the flags (`plan`):

        mode   responses (steps 1-3)   train_responses   critiques (steps 4-5)   pairs
        g      yes                     yes               no                      -
        gc     yes                     yes               yes                     dynamic (default) | static
        c      with dynamic pairs      no                yes                     static (default) | dynamic
        sft    no                      no                no                      -

    pairs: "dynamic" = this run's fresh responses through `pair_filter` (balance | random) and the cache;
    "static" = a balanced set built once from the starting policy (or --static-pairs)."""
    mode: str
    responses: bool
    train_responses: bool
    critiques: bool
    pairs: str | None
    pair_filter: str


def plan(args, world=1):
    """Check the flags (each error names its flag) and derive the step's Plan; `world`: the number of processes."""
    for flag, v in (("--num-generations", args.num_generations), ("--questions-per-step", args.questions_per_step),
                    ("--max-steps", args.max_steps), ("--grad-accum", args.grad_accum),
                    ("--ppo-epochs", args.ppo_epochs), ("--critiques-per-pair", args.critiques_per_pair)):
        if v < 1:
            raise ConfigError(f"{flag} must be >= 1, got {v}")
    mode, critiques = args.mode, args.mode in ("gc", "c")
    if mode in ("g", "gc") and args.num_generations < 2 and args.group_mode != "shared":
        raise ConfigError(f"--num-generations must be >= 2 for --group-mode {args.group_mode} (a question's "
                          f"responses are its group; or use --group-mode shared)")
    if args.static_pairs and (mode, args.pairs) not in (("c", None), ("c", "static"), ("gc", "static")):
        raise ConfigError("--static-pairs is for static pairs only (--mode c, or --mode gc --pairs static)")
    if args.resume not in (None, "auto") and not (Path(args.resume) / "trainer_state.json").is_file():
        raise ConfigError(f"--resume {args.resume}: not a checkpoint dir (no trainer_state.json)")
    if args.questions_per_step % world:
        raise ConfigError(f"--questions-per-step {args.questions_per_step} must be divisible by the number of "
                          f"processes ({world}): each rank samples whole groups of its own questions")
    if args.pairs and not critiques:
        raise ConfigError(f"--pairs {args.pairs} is for --mode gc / c (--mode {mode} critiques nothing)")
    pairs = args.pairs or {"gc": "dynamic", "c": "static"}.get(mode)
    if args.pair_filter != "balance" and pairs != "dynamic":
        raise ConfigError(f"--pair-filter {args.pair_filter} filters the dynamic pairs of --mode gc / c "
                          f"(with --pairs dynamic); the static set is always balanced")
    if critiques and args.pairs_per_step % world:
        raise ConfigError(f"--pairs-per-step {args.pairs_per_step} must be divisible by the number of processes "
                          f"({world})")
    if critiques and args.group_mode == "question" and args.pairs_per_step % (2 * world):
        raise ConfigError(f"--pairs-per-step {args.pairs_per_step} with --group-mode question must be divisible by "
                          f"2 x the number of processes ({2 * world}): a question's two pairs are critiqued together")
    inert = inert_reward_flags(args)
    if critiques and inert:
        raise ConfigError(f"{inert} cannot change any advantage under --group-mode per-prompt with --scale-rewards "
                          f"true: each critique group holds one pair's critiques, which share its label, so every "
                          f"reward is 0 or one constant and the constant cancels in (r - mean) / std. Use "
                          f"--group-mode question (the paper's grouping: a question's responses and the critiques "
                          f"of its pairs in one group) or shared, or --scale-rewards false")
    return Plan(mode=mode, responses=mode in ("g", "gc") or pairs == "dynamic", train_responses=mode in ("g", "gc"),
                critiques=critiques, pairs=pairs, pair_filter=args.pair_filter)


def inert_reward_flags(args):
    """The critique-reward flag that no advantage can see: under per-pair groups with std scaling, a reward of 0 or
    c (one c per pair: the pair's label fixes it) gives A = (x - mean) / (std + eps / c) for x in {0, 1}: c cancels
    (up to eps), so Eq. 3 / 5 / 6 act exactly as Eq. 2 does. Returns the flag as text, or "" when it can act."""
    if args.group_mode == "per-prompt" and args.scale_rewards and args.critique_reward != "plain":
        return f"--critique-reward {args.critique_reward}"
    return ""


def _flag(s):
    v = str(s).strip().lower()
    if v in ("1", "true", "yes", "on", "group"):
        return True
    if v in ("0", "false", "no", "off", "none"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def build_parser():
    p = argparse.ArgumentParser(prog="train.py", description=DESCRIPTION,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mode", choices=("sft", "g", "c", "gc"), default="gc",
                   help="gc: GC-RL (responses + critiques of cached pairs); g: vanilla GRPO; c: critique-only on "
                        "static pairs; sft: cross-entropy cold start on {question, response, critique?} jsonl")
    p.add_argument("--model", default="smollm2-135m",
                   help="alias, HF hub id, model dir, checkpoint dir or run dir (e.g. the --out of an sft run)")
    p.add_argument("--data", default="arith",
                   help=f"data SPEC ({data.SPECS}); --mode sft: jsonl:PATH of {{question, response, critique?}} rows")
    p.add_argument("--limit", type=int, default=None, help="use the first N records of --data (arith: generate N)")
    p.add_argument("--out", default="runs/train",
                   help="run dir: train_config.json, metrics.jsonl, samples.jsonl, checkpoint-N/, final/")
    p.add_argument("--prompt-style", choices=sorted(data.PROMPT_STYLES), default="plain",
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
    g.add_argument("--static-pairs", default=None,
                   help="static pairs: jsonl {question, response, label} (or jsonl:PATH / gsm8k-solutions:PATH) "
                        "instead of building them")
    g.add_argument("--static-k", type=int, default=10, help="static pairs: responses per question when building them")
    g.add_argument("--static-questions", type=int, default=0,
                   help="static pairs: questions used to build them (0 = all)")
    g = p.add_argument_group("GRPO loss")
    g.add_argument("--group-mode", choices=critique.GROUP_MODES, default="question",
                   help="question: a group per question, its responses and the critiques of its pairs together "
                        "(verl's one uid per prompt; the paper's 'mixed into the same group'); per-prompt: a group "
                        "per question's responses and one per pair's critiques; shared: every sample of a step")
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
    g.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per update, at most (forward/backward pieces of similar length): divides the "
                        "update's activation memory, same update")
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

