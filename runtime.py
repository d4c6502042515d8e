"""The distributed runtime of train.py: what a step needs from Accelerate and the machine, nothing of GC-RL.

    Runtime         the Accelerator for the flags; rank, world, sharding; collectives (all_sum, all_max, gather,
                    share); the three calls of an optimizer update (gradient_sync, backward, step); the run's
                    files: metrics.jsonl (log_metrics), checkpoints (save_checkpoint, load_checkpoint)
    full_weights    the whole model on every rank for the sampler under FSDP2 / FSDP1 / ZeRO-3, once per step
    Metrics         a step's metrics, reduced exactly over ranks; peak_memory
    seed_for, Stream  stateless seeds per (seed, step, rank, phase); the data order, saved in checkpoints
    find_checkpoint --resume auto; stop_signals: Ctrl-C / SIGTERM finish the step, checkpoint, exit

Under DDP every rank holds the whole model and DDP all-reduces (averages) the gradients; FSDP2 / FSDP1 / ZeRO-3
shard parameters, gradients and optimizer state, and every forward of the trained model is then a collective:
every rank must run as many as the busiest one (`all_max`). Checkpoints hold a full HF model/ written by rank 0.
On a machine without GPUs `accelerate launch --multi_gpu --num_processes N train.py ...` runs N CPU processes over
gloo; set OMP_NUM_THREADS so that processes x threads <= cores (oversubscribed OpenMP threads slow CPU matmuls down
100x).
"""
import contextlib
import hashlib
import importlib.util
import json
import os
import random
import shutil
import signal
import sys
from pathlib import Path

import torch

import data
from config import ConfigError

TRACKER_MODULES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}  # --report-to needs one
# progress bar: metric -> short name; printed lines (--log-every) show these and a few more
BAR = {"reward/response": "rew", "acc/response": "acc", "reward/critique": "c_rew", "acc/critique": "c_acc",
       "loss": "loss"}
SHOW = tuple(BAR) + ("critic/wrong_rate", "frac_reward_zero_std", "eval/acc/response", "time/step")


# ============================================================================ the accelerator

def make_accelerator(args):
    """The Accelerator for the flags; under FSDP2 with bf16 (set by the launch config) its mixed-precision policy."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    report = None if args.report_to in (None, "none") else args.report_to
    if report and not any(importlib.util.find_spec(m) for m in TRACKER_MODULES[report]):
        raise ConfigError(f"--report-to {report}: the package is not installed (pip install {report})")
    # a fresh AcceleratorState, so that main() can run again in the same process with other settings (tests);
    # the distributed process group (PartialState) is kept
    AcceleratorState._reset_state()
    # launched as N processes on a machine without CUDA: Accelerate needs cpu=True to form the gloo group, else
    # it quietly runs N independent single-process trainings
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    cpu = args.cpu or (world_env > 1 and not torch.cuda.is_available())
    # gradient_accumulation_steps: read by DeepSpeed only (its config's "auto"); the update loop is train.py's own
    accelerator = Accelerator(mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.grad_accum,
                              log_with=report, project_dir=args.out, cpu=cpu)
    if accelerator.num_processes != world_env:
        raise ConfigError(f"launched with WORLD_SIZE={world_env} but Accelerate formed {accelerator.num_processes} "
                          f"process(es) on {accelerator.device}; check the launcher (--cpu forces the CPU)")
    if sharding(accelerator) == "fsdp2" and args.mixed_precision == "bf16":
        from torch.distributed.fsdp import MixedPrecisionPolicy
        # bf16 compute and gathers (the sampler's full weights too), fp32 gradient reduction; no output cast:
        # Policy.forward returns fp32 log-probs
        accelerator.state.fsdp_plugin.mixed_precision_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                                                    reduce_dtype=torch.float32)
    return accelerator


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


class Runtime:
    """This process's place in the run and the collectives every rank makes together."""

    def __init__(self, args):
        from accelerate.utils import DistributedType
        self.accelerator = make_accelerator(args)
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.device, self.is_main = self.accelerator.device, self.accelerator.is_main_process
        self.sharding = sharding(self.accelerator)
        self.deepspeed = self.accelerator.distributed_type == DistributedType.DEEPSPEED

    def close(self, trackers=False, ok=True):
        """End the run: the trackers' files, then the process group (stops gloo / NCCL's threads before the
        interpreter exits; left running, a rank can abort in teardown). `ok` (no exception): first wait for every
        rank, so none tears down while another is still in a collective (its final save)."""
        if trackers:
            self.accelerator.end_training()
        if torch.distributed.is_initialized():
            if ok:
                torch.distributed.barrier()
            torch.distributed.destroy_process_group()

    def print(self, *args):  # rank 0 only
        self.accelerator.print(*args)

    def unwrap(self, model):
        return self.accelerator.unwrap_model(model)

    # -- collectives (one process: plain values)
    def all_sum(self, values):
        """A (nested) list of numbers summed over ranks, as float64: global counts and normalisers."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        return (self.accelerator.reduce(t, "sum") if self.world > 1 else t).tolist()

    def all_max(self, n):
        """An int's maximum over ranks: the busiest rank's count, which every rank must match in collectives."""
        return int(self.accelerator.gather(torch.tensor([n], device=self.device)).max()) if self.world > 1 else n

    def gather(self, items):
        """Every rank's list, concatenated in rank order."""
        from accelerate.utils import gather_object
        return gather_object(items) if self.world > 1 else list(items)

    def share(self, items):
        """This rank's contiguous share of a list drawn for all ranks (whole groups: questions, pairs)."""
        k = len(items) // self.world
        return items[self.rank * k:(self.rank + 1) * k]

    # -- the three calls of an optimizer update (train.Trainer.optimizer_update)
    def micro_batch_count(self, n):
        """How many micro-batches this rank runs when it has n: DeepSpeed's configured gradient_accumulation_steps
        (its engine counts them); otherwise the busiest rank's n, so that every rank makes as many backward calls
        (DDP's all-reduce, FSDP's reduce-scatter are collectives)."""
        return self.accelerator.gradient_accumulation_steps if self.deepspeed else self.all_max(n)

    def gradient_sync(self, model, now):
        """Context of one micro-batch's forward and backward. DDP all-reduces the gradients in every backward; with
        now=False it skips that and they accumulate on the rank, so an update all-reduces once, in its last
        micro-batch. Sharded models reduce-scatter in every micro-batch (accumulating would keep a whole fp32
        gradient on every rank); DeepSpeed's engine decides by its accumulation boundary (`backward`)."""
        if now or self.sharding or self.deepspeed:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(model)

    def backward(self, loss, last):
        """Backward of one micro-batch's loss. The loss is already its share of the whole update's loss: its
        normaliser (tokens or sequences) counts every rank's and every micro-batch's. So the gradient of the update
        is the SUM of the micro-batches' and ranks' gradients; DDP and FSDP AVERAGE over ranks, hence `* world`.
        DeepSpeed's engine also divides by its gradient_accumulation_steps (undone the same way) and, at the
        accumulation boundary (the last micro-batch), reduces, clips by its config, steps and zeroes by itself."""
        if not self.deepspeed:
            (loss * self.world).backward()
            return
        engine = self.accelerator.deepspeed_engine_wrapped.engine
        engine.set_gradient_accumulation_boundary(is_boundary=last)
        engine.backward(loss * self.world * self.accelerator.gradient_accumulation_steps)
        if last:
            engine.step()

    def step(self, model, optimizer, max_norm):
        """After the last micro-batch: clip the gradient norm to max_norm, one optimizer step, zero the gradients.
        Returns the norm before clipping (DeepSpeed: the norm its engine saw, or None)."""
        if self.deepspeed:  # done in backward by the engine (its optimizer wrapper's step is a no-op)
            return self.accelerator.deepspeed_engine_wrapped.get_global_grad_norm()
        norm = self.accelerator.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
        optimizer.zero_grad()
        return norm

    # -- the run's files: metrics, checkpoints
    def log_metrics(self, out, step, metrics, bar, log_every=0, tracker=False):
        """A step's metrics, reduced over ranks, plus this rank's peak memory: a row of OUT/metrics.jsonl, the
        progress bar, a printed line every `log_every` steps, and the tracker (--report-to)."""
        row = dict(step=step, **metrics.reduce(self.accelerator), **peak_memory(self.device))
        if self.is_main:
            with open(Path(out) / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            bar.update(1)
            bar.set_postfix({short: f"{row[k]:.3g}" for k, short in BAR.items() if k in row})
            if log_every and step % log_every == 0:
                bar.write(" ".join(f"{k}={row[k]:.4g}" for k in ("step",) + SHOW if k in row))
        if tracker:
            self.accelerator.log(row, step=step)

    def open_run_files(self, args, out, resumed_step=None):
        """The run's files (rank 0): metrics.jsonl and samples.jsonl cut back to a resumed run's step (else
        removed), train_config.json (the flags, the processes, the device); and the tracker (--report-to)."""
        if self.is_main:
            for f in ("metrics.jsonl", "samples.jsonl"):
                if resumed_step is not None:
                    truncate_jsonl(Path(out) / f, resumed_step)
                else:
                    (Path(out) / f).unlink(missing_ok=True)
            cfg = dict(vars(args), num_processes=self.world, device=str(self.device), torch=torch.__version__)
            data.write_json(Path(out) / "train_config.json", cfg)  # not config.json: that name marks an HF model dir
        if args.report_to != "none":
            flat = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
            self.accelerator.init_trackers("gcrl", config=flat)

    def save_checkpoint(self, out, step, model, tokenizer, state, rank_state, keep=0, final=False):
        """OUT/checkpoint-STEP/: model/ (HF, from_pretrained + tokenizer, written whole by rank 0), Accelerate's
        save_state files (weights, optimizer, every rank's RNG; sharded under FSDP), trainer_state.json (`state`
        plus every rank's `rank_state` as "ranks"). Written to checkpoint-STEP.tmp, then renamed; the last `keep`
        checkpoints are kept (0: all); final=True also copies model/ to OUT/final. Returns the checkpoint's path."""
        accelerator, out = self.accelerator, Path(out)
        ck, tmp = out / f"checkpoint-{step}", out / f"checkpoint-{step}.tmp"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        ranks = self.gather([rank_state])
        # the whole model on rank 0 (a collective under FSDP / ZeRO-3, which gather it; the module's own otherwise)
        full = accelerator.get_state_dict(model)
        if self.is_main:
            lm = self.unwrap(model).lm
            sd = {k.removeprefix("lm."): v for k, v in full.items()}  # HF names, without the Policy wrapper's
            first = {}  # a gathered dict holds tied weights (lm_head = embeddings) as copies: one tensor, saved once
            for name, p in lm.named_parameters(remove_duplicate=False):
                sd[name] = sd[first.setdefault(id(p), name)]
            lm.save_pretrained(tmp / "model", state_dict=sd, safe_serialization=True)
            tokenizer.save_pretrained(tmp / "model")
            data.write_json(tmp / "trainer_state.json", dict(state, ranks=ranks))
            if ck.exists():
                shutil.rmtree(ck)
            os.replace(tmp, ck)
            if keep > 0:
                for old in checkpoints(out)[:-keep]:
                    shutil.rmtree(old, ignore_errors=True)
            if final:
                fin, ftmp = out / "final", out / "final.tmp"
                shutil.rmtree(ftmp, ignore_errors=True)
                shutil.copytree(ck / "model", ftmp)
                shutil.rmtree(fin, ignore_errors=True)
                os.replace(ftmp, fin)
        accelerator.wait_for_everyone()
        return ck

    def load_checkpoint(self, path):
        """Accelerate's load_state of checkpoint `path` (weights, optimizer, RNG); returns (its trainer_state.json,
        this rank's saved rank_state or None). A checkpoint of another number of processes gives a warning."""
        state = json.loads((Path(path) / "trainer_state.json").read_text())
        self.accelerator.load_state(str(path))
        ranks = state["ranks"]
        if len(ranks) != self.world:
            self.print(f"[gcrl] warning: checkpoint written by {len(ranks)} processes, now {self.world}: "
                       f"ranks without a saved cache start with an empty one (not an exact continuation)")
        return state, ranks[self.rank] if self.rank < len(ranks) else None


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


# ============================================================================ metrics

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


# ============================================================================ seeds and data order

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


# ============================================================================ checkpoints

def checkpoints(out):
    """OUT's checkpoint-STEP dirs, oldest first."""
    cks = [p for p in Path(out).glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(cks, key=lambda p: int(p.name.split("-")[-1]))


def truncate_jsonl(path, last_step):
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


def find_checkpoint(resume, out, say=print):
    """--resume: a checkpoint dir, or "auto" = the latest checkpoint in OUT (None, said, when there is none)."""
    if resume != "auto":
        return resume
    cks = checkpoints(out)
    if not cks:
        say(f"[gcrl] --resume auto: no checkpoint in {out}, starting fresh")
    return str(cks[-1]) if cks else None


# ============================================================================ signals

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
