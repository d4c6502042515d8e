"""train.py under FSDP2 and DeepSpeed ZeRO-3 sharding.

FSDP2 runs for real on CPU: two processes started with `accelerate launch --config_file
configs/accelerate/fsdp2.yaml` over gloo, against the same run under DDP. Accelerate forms FSDP only on
accelerators: on CPU it builds the FSDP plugin from the launcher's environment, then quietly runs DDP. This file,
run once per rank as the driver, does what AcceleratorState does on a GPU machine (distributed type FSDP in
AcceleratorState and PartialState, the plugin kept); everything after that (fully_shard, clipping,
get_state_dict, save_state, load_state) is Accelerate's own FSDP2 path, cpu-RAM-efficient loading included (the
config's fsdp_cpu_ram_efficient_loading). The driver uses the real rollout.Sampler (through runtime.full_weights),
with rewards and verdicts from a hash of the sampled text, and saves each rank's final parameters, gathered, and
its checkpoint reads (from_pretrained calls) to OUT/rank{R}.pt.

DeepSpeed does not run here (no CUDA; its CPU backend needs oneCCL), and FSDP1 is not launched: their branches of
runtime.full_weights are checked against stand-ins of the calls they make.
"""
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import types
import zlib
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
FSDP2_CONFIG = ROOT / "configs" / "accelerate" / "fsdp2.yaml"


def force_fsdp_on_cpu():
    """Keep the FSDP plugin Accelerate builds from the launcher's environment, as it does on GPUs (state.py drops
    it for MULTI_CPU): distributed type FSDP in both AcceleratorState and PartialState."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType
    init = AcceleratorState.__init__

    def patched(self, *args, fsdp_plugin=None, **kw):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kw)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            self.distributed_type = PartialState().distributed_type = DistributedType.FSDP

    AcceleratorState.__init__ = patched


if __name__ == "__main__":  # the driver, one per rank
    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(1)
    from torch.distributed.fsdp import FSDPModule
    from transformers import AutoModelForCausalLM

    import reward
    import runtime
    import train

    reward.response_reward = lambda text, gold, **kw: float(zlib.crc32(text.encode()) % 2)
    reward.extract_verdict = lambda text: ("right", "wrong")[zlib.crc32(text.encode()) % 3 % 2]
    if os.environ.get("GCRL_TEST_EMPTY_RANK") == os.environ.get("RANK"):  # this rank: every response wrong
        reward.response_reward = lambda text, gold, **kw: 0.0
    if os.environ.get("ACCELERATE_USE_FSDP") == "true":
        force_fsdp_on_cpu()
    unshards = []  # explicit FSDPModule.unshard calls (FSDP's own forward hooks do not come through here)
    unshard = FSDPModule.unshard
    FSDPModule.unshard = lambda self, *a, **kw: (unshards.append(type(self).__name__), unshard(self, *a, **kw))[1]
    loads = []  # from_pretrained calls: this rank's reads of the checkpoint
    load = AutoModelForCausalLM.from_pretrained
    AutoModelForCausalLM.from_pretrained = lambda *a, **kw: (loads.append(a), load(*a, **kw))[1]
    save = train.save

    def save_and_dump(trainer, final=False):
        ck = save(trainer, final)
        if final:
            n, rt = len(unshards), trainer.runtime
            with runtime.full_weights(trainer.model, rt.accelerator):  # (state_dict() would give FSDP2's shards)
                sd = {k: v.detach().clone() for k, v in trainer.lm().named_parameters(remove_duplicate=False)}
            lm, plugin = trainer.lm(), getattr(rt.accelerator.state, "fsdp_plugin", None)  # (DDP: none)
            torch.save(dict(params=sd, sharding=rt.sharding, unshards=n, loads=len(loads),
                            units=sum(isinstance(m, FSDPModule) for m in trainer.model.modules()),
                            ram_efficient=getattr(plugin, "cpu_ram_efficient_loading", None),
                            tied=lm.get_output_embeddings().weight is lm.get_input_embeddings().weight),
                       trainer.out / f"rank{rt.rank}.pt")
        return ck

    train.save = save_and_dump
    train.main(sys.argv[1:])
    sys.exit(0)

import models  # noqa: E402
import runtime  # noqa: E402
import test_train  # noqa: E402
from test_multiprocess import _free_port  # noqa: E402
from test_train import base_args, metrics  # noqa: E402

tiny_dir, qspec, one_thread = test_train.tiny_dir, test_train.qspec, test_train.one_thread  # fixtures


def launch(out, argv, fsdp, config=FSDP2_CONFIG, **env_over):
    """2 CPU processes of this driver: FSDP2 from the repo's config file (or `config`), or DDP (--multi_gpu)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **env_over)
    kind = ["--config_file", str(config)] if fsdp else ["--multi_gpu", "--mixed_precision", "no",
                                                        "--dynamo_backend", "no"]
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", *kind, "--num_processes", "2",
           "--num_machines", "1", "--main_process_ip", "127.0.0.1", "--main_process_port", str(_free_port()),
           __file__] + argv
    # own session: a rank stuck in a collective that its peer never joins is killed with the launcher
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail("the ranks hung (a collective not joined by every rank?)\n" + stderr[-3000:])
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return [torch.load(Path(out) / f"rank{r}.pt") for r in (0, 1)]


# 2 GC-RL steps, checkpoint after each; old log-probs (ppo-epochs 2), micro-batches (grad-accum 2) and a reference
# model (beta > 0): every collective of the update
OVER = {"--mode": "gc", "--questions-per-step": 4, "--pairs-per-step": 4, "--max-steps": 2, "--save-every": 1,
        "--beta": 0.1, "--ppo-epochs": 2, "--grad-accum": 2, "--logprob-batch": 2, "--max-completion-length": 24,
        "--max-critique-length": 24}
EXACT = ("reward/response", "acc/critique", "critic/precision", "frac_reward_zero_std", "cache/size", "len/critique",
         "len/response", "update/seqs", "update/tokens", "clip_ratio", "pairs/right_frac")
CLOSE = ("loss", "grad_norm", "kl", "entropy", "logprob_gap")


@pytest.fixture(scope="module")
def runs(tiny_dir, qspec, tmp_path_factory):
    """The same 2-step GC-RL run under FSDP2 and under DDP: {name: (out dir, [rank0, rank1] dumps)}."""
    base = tmp_path_factory.mktemp("fsdp")
    out = {}
    for name, fsdp in (("fsdp2", True), ("ddp", False)):
        d = base / name
        out[name] = (d, launch(d, base_args(tiny_dir, qspec, d, **OVER), fsdp))
    return out


def test_fsdp2_matches_ddp(runs):
    """Same parameters (<= 1e-6), the same samples and the same metrics as DDP; the sampler gathered the
    weights once per step, each FSDP unit once (never per token or per layer call)."""
    (fd, (f0, f1)), (dd, (d0, _)) = runs["fsdp2"], runs["ddp"]
    assert f0["sharding"] == "fsdp2" and d0["sharding"] is None
    assert f0["units"] == 3  # root (embeddings, norm, tied head) + one per decoder layer
    assert f0["unshards"] == 2 * f0["units"]  # 2 steps: one full_weights each
    for k in d0["params"]:
        assert torch.equal(f0["params"][k], f1["params"][k]), k  # FSDP2 ranks agree
        assert torch.allclose(f0["params"][k], d0["params"][k], rtol=0, atol=1e-6), k
    start = models.load_policy(str(Path(fd) / "checkpoint-1" / "model"))[0].state_dict()
    assert any(not torch.equal(start[k], f0["params"][k]) for k in start)  # step 2 moved the weights
    sf, sd = (Path(d) / "samples.jsonl" for d in (fd, dd))
    assert sf.read_text() == sd.read_text() and sf.read_text()
    mf, md = metrics(fd), metrics(dd)
    assert [r["step"] for r in mf] == [1, 2]
    for a, b in zip(mf, md):
        assert a["update/seqs"] > 0
        for k in EXACT:
            assert a[k] == b[k], k
        for k in CLOSE:
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), k


@pytest.fixture(scope="module")
def full_load(tiny_dir, qspec, tmp_path_factory):
    """The `runs` FSDP2 run with the repo's config but fsdp_cpu_ram_efficient_loading off: (out dir, dumps)."""
    base = tmp_path_factory.mktemp("fsdp-full-load")
    on, off = "fsdp_cpu_ram_efficient_loading: true", "fsdp_cpu_ram_efficient_loading: false"
    assert on in FSDP2_CONFIG.read_text()
    (base / "fsdp2.yaml").write_text(FSDP2_CONFIG.read_text().replace(on, off))
    d = base / "run"
    return d, launch(d, base_args(tiny_dir, qspec, d, **OVER), True, config=base / "fsdp2.yaml")


def test_fsdp2_cpu_ram_efficient_loading(runs, full_load):
    """The repo's config reads the checkpoint on rank 0 only: rank 1 builds an empty policy that Accelerate's
    prepare fills with rank 0's weights, and reads it just once, for the reference model (--beta > 0; never
    prepared, so nothing broadcasts into it). The tied LM head stays tied; the run is bitwise the one in which
    every rank reads the policy itself (and within 1e-6 of DDP: test_fsdp2_matches_ddp)."""
    (fd, (f0, f1)), (od, (o0, o1)) = runs["fsdp2"], full_load
    assert f0["ram_efficient"] is f1["ram_efficient"] is True and o0["ram_efficient"] is False
    assert (f0["loads"], f1["loads"], o0["loads"], o1["loads"]) == (2, 1, 2, 2)
    assert f0["tied"] and f1["tied"] and o0["tied"] and o1["tied"]
    assert set(f1["params"]) == set(o0["params"])
    for k in o0["params"]:
        assert torch.equal(f1["params"][k], o0["params"][k]), k
    assert (fd / "samples.jsonl").read_text() == (od / "samples.jsonl").read_text()
    for a, b in zip(metrics(fd), metrics(od), strict=True):
        for k in EXACT + CLOSE:
            assert a[k] == b[k], k


def test_fsdp2_final_is_a_full_hf_checkpoint(runs):
    """final/ (gathered by get_state_dict, written by rank 0) loads with from_pretrained and equals the trained
    weights; the tied LM head is stored once."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM
    fd, (f0, _) = runs["fsdp2"]
    model = AutoModelForCausalLM.from_pretrained(Path(fd) / "final")
    sd = model.state_dict()
    assert set(sd) == set(f0["params"])
    assert all(torch.equal(sd[k], f0["params"][k]) for k in sd)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with safe_open(str(Path(fd) / "final" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys


def test_fsdp2_resume_is_exact(runs, tiny_dir, qspec, tmp_path):
    """Killed after step 1, resumed from checkpoint-1 (save_state / load_state of the sharded model and optimizer):
    step 2 and the final weights are bitwise those of the uninterrupted run."""
    fd, (f0, _) = runs["fsdp2"]
    d = tmp_path / "resumed"
    shutil.copytree(fd, d)
    for p in ("checkpoint-2", "final", "rank0.pt", "rank1.pt"):
        shutil.rmtree(d / p, ignore_errors=True) if (d / p).is_dir() else (d / p).unlink(missing_ok=True)
    r0, _ = launch(d, base_args(tiny_dir, qspec, d, **OVER, **{"--resume": "auto"}), True)
    assert all(torch.equal(r0["params"][k], f0["params"][k]) for k in f0["params"])
    a, b = metrics(d)[-1], metrics(fd)[-1]
    assert a["step"] == b["step"] == 2 and len(metrics(d)) == 2
    for k in EXACT + CLOSE:
        assert a[k] == b[k], k


def test_fsdp2_a_rank_with_nothing_to_learn(tiny_dir, qspec, tmp_path):
    """Rank 1's groups all uniform, rank 0's not: under FSDP2 every forward is a collective, so rank 1 runs dummy
    forwards in the old log-prob pass (and the update) as many times as rank 0; no hang, ranks in lockstep."""
    out = tmp_path / "empty"
    over = {"--mode": "g", "--questions-per-step": 4, "--beta": 0.1, "--ppo-epochs": 2, "--mini-batch-size": 2,
            "--logprob-batch": 2, "--max-completion-length": 24}
    r0, r1 = launch(out, base_args(tiny_dir, qspec, out, **over), True, GCRL_TEST_EMPTY_RANK="1")
    assert r0["sharding"] == "fsdp2"
    assert all(torch.equal(r0["params"][k], r1["params"][k]) for k in r0["params"])
    (row,) = metrics(out)
    assert row["update/seqs"] > 0 and row["frac_reward_zero_std"] >= 0.5  # rank 1: both groups uniform


# ----------------------------------------------------------------------------- stand-ins: ZeRO-3, FSDP1, DDP

def fake_accelerator(distributed_type, zero_stage=None, fsdp2=False):
    plugin = types.SimpleNamespace(zero_stage=zero_stage)
    return types.SimpleNamespace(distributed_type=distributed_type, is_fsdp2=fsdp2,
                                 state=types.SimpleNamespace(deepspeed_plugin=plugin))


def test_full_weights_zero3_fsdp1_ddp_stand_ins(monkeypatch):
    """Each branch makes its one gathering call around the block, with the right arguments, and nothing else:
    ZeRO-3 GatheredParameters(all parameters, modifier_rank=None), FSDP1 summon_full_params(writeback=False),
    DDP / ZeRO-2 nothing."""
    from accelerate.utils import DistributedType
    from torch.distributed.fsdp import FullyShardedDataParallel
    model = torch.nn.Linear(2, 2)
    calls = []

    @contextlib.contextmanager
    def gathered(params, modifier_rank=0):
        calls.append(("zero3 enter", [id(p) for p in params], modifier_rank))
        yield
        calls.append(("zero3 exit",))

    @contextlib.contextmanager
    def summon(module, writeback=True, **kw):
        calls.append(("fsdp1 enter", module, writeback))
        yield
        calls.append(("fsdp1 exit",))

    fake_ds = types.ModuleType("deepspeed")
    fake_ds.zero = types.SimpleNamespace(GatheredParameters=gathered)
    monkeypatch.setitem(sys.modules, "deepspeed", fake_ds)
    monkeypatch.setattr(FullyShardedDataParallel, "summon_full_params", staticmethod(summon))

    with runtime.full_weights(model, fake_accelerator(DistributedType.DEEPSPEED, zero_stage=3)):
        calls.append("body")
    assert calls == [("zero3 enter", [id(model.weight), id(model.bias)], None), "body", ("zero3 exit",)]
    calls.clear()
    with runtime.full_weights(model, fake_accelerator(DistributedType.FSDP)):
        calls.append("body")
    assert calls == [("fsdp1 enter", model, False), "body", ("fsdp1 exit",)]
    calls.clear()
    for acc in (fake_accelerator(DistributedType.MULTI_GPU), fake_accelerator(DistributedType.NO),
                fake_accelerator(DistributedType.DEEPSPEED, zero_stage=2)):
        assert runtime.sharding(acc) is None
        with runtime.full_weights(model, acc):
            calls.append("body")
    assert calls == ["body"] * 3


def test_update_calls_ddp_and_deepspeed_stand_ins():
    """The three calls of an optimizer update (runtime.Runtime). DDP: no all-reduce but in the last micro-batch
    (accelerator.no_sync before it), each loss times the world size (DDP averages, the update needs the sum),
    one clip and one step. DeepSpeed: its engine is told the accumulation boundary (the last micro-batch), each loss
    is scaled by world x its configured count (the engine divides by it), the engine steps once, at the boundary,
    and a rank always runs that count of micro-batches."""
    calls = []

    @contextlib.contextmanager
    def no_sync(model):
        calls.append("no_sync")
        yield

    class Loss:  # records what backward() is called on
        def __init__(self, v):
            self.v = v

        def __mul__(self, k):
            return Loss(self.v * k)

        def backward(self):
            calls.append(("backward", self.v))

    rt = object.__new__(runtime.Runtime)
    rt.deepspeed, rt.sharding, rt.world = False, None, 2
    def clip(params, max_norm):
        calls.append("clip")
        return 2.0

    rt.accelerator = types.SimpleNamespace(no_sync=no_sync, clip_grad_norm_=clip)
    opt = types.SimpleNamespace(step=lambda: calls.append("step"), zero_grad=lambda: calls.append("zero_grad"))
    for i in range(3):
        with rt.gradient_sync(None, now=i == 2):
            rt.backward(Loss(0.5), last=i == 2)
    assert rt.step(types.SimpleNamespace(parameters=lambda: []), opt, 1.0) == 2.0
    assert calls == ["no_sync", ("backward", 1.0), "no_sync", ("backward", 1.0), ("backward", 1.0), "clip", "step",
                     "zero_grad"]

    calls.clear()
    engine = types.SimpleNamespace(set_gradient_accumulation_boundary=lambda is_boundary: calls.append(is_boundary),
                                   backward=lambda loss: calls.append(("backward", loss.v)),
                                   step=lambda: calls.append("engine.step"))
    rt.deepspeed, rt.sharding = True, "zero3"
    wrapped = types.SimpleNamespace(engine=engine, get_global_grad_norm=lambda: 3.0)
    rt.accelerator = types.SimpleNamespace(gradient_accumulation_steps=4, no_sync=no_sync,
                                           deepspeed_engine_wrapped=wrapped)
    assert rt.micro_batch_count(1) == 4  # DeepSpeed's count, whatever this rank has
    for i in range(4):
        with rt.gradient_sync(None, now=i == 3):
            rt.backward(Loss(0.5), last=i == 3)
    assert rt.step(None, opt, 1.0) == 3.0  # the engine's norm; no second step
    assert calls == [False, ("backward", 4.0)] * 3 + [True, ("backward", 4.0), "engine.step"]
