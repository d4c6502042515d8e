"""The cold start (arXiv 2602.22765 §4): supervised fine-tuning on {question, response, critique?} rows, through
the trainer's own update loop (train.Trainer.optimizer_update) with a token-mean cross-entropy.

A row with `critique` trains the critique turn (critique.critique_prompt -> the critique), a row without it the
generation turn (data.gen_prompt -> the response); teacher.cold_start_data writes such rows for `arith`.
"""
import time

import critique
import data
from grpo import Completion
from runtime import Metrics


def examples(spec, tokenizer, prompt_style="plain", max_len=None):
    """SFT / cold-start jsonl (`jsonl:PATH` or PATH) -> Completions (prompt_ids, tokens, kind); targets end with
    eos, cut to max_len tokens. Errors name the file and row."""
    path = spec.split(":", 1)[1] if spec.startswith("jsonl:") else spec
    out = []
    for i, row in enumerate(data.read_jsonl(path, "--data (sft)"), 1):
        where = f"--data {path} row {i}"
        if not isinstance(row, dict):
            raise data.DataError(f"{where}: expected a JSON object")
        for key in ("question", "response"):
            data.require_field(row, key, f"{where} (sft rows are {{question, response, critique?}})")
        crit = row.get("critique")
        if crit is not None and (not isinstance(crit, str) or not crit.strip()):
            raise data.DataError(f"{where}: 'critique' must be a non-empty string when present")
        if crit is not None:
            prompt, target = critique.critique_prompt(tokenizer, row["question"], row["response"]), crit
        else:
            prompt, target = data.gen_prompt(tokenizer, row["question"], prompt_style), row["response"]
        tokens = tokenizer(target, add_special_tokens=False)["input_ids"][:(max_len - 1) if max_len else None]
        out.append(Completion(prompt_ids=prompt, tokens=tokens + [tokenizer.eos_token_id],
                              kind="critique" if crit is not None else "response"))
    if not out:
        raise data.DataError(f"--data {path}: no rows")
    return out


def step(trainer):
    """One SFT step: cross-entropy, token-mean over the global batch, on the next --questions-per-step examples.
    Returns its Metrics."""
    metrics, t_step, runtime = Metrics(), time.perf_counter(), trainer.runtime
    rows = [trainer.examples[i] for i in runtime.share(trainer.stream.take(trainer.args.questions_per_step))]
    (n_tok,) = runtime.all_sum([sum(r.length for r in rows)])  # the normaliser: every rank's target tokens
    metrics.add("lr", trainer.set_lr())

    def loss_of(micro, inputs, logp, entropy, mask):  # this micro-batch's share of the update's loss
        metrics.add("entropy", float((entropy * mask).sum()), int(mask.sum()))
        return -(logp * mask).sum() / n_tok

    metrics.add("loss", trainer.optimizer_update(rows, loss_of, metrics, 1.0))
    for kind in ("response", "critique"):
        metrics.mean_of(f"len/{kind}", [r.length for r in rows if r.kind == kind])
    dt = time.perf_counter() - t_step
    metrics.add("time/update", dt)
    metrics.add("time/step", dt)
    metrics.add("tokens_per_s", sum(r.length for r in rows) / dt)  # trained tokens per second
    return metrics
