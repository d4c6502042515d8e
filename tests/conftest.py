"""Shared test fixtures: a byte-level tokenizer with a ChatML template and tiny random models,
all built in-process (no network, no files)."""
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parent / "data" / "gsm8k"  # copies of two GSM8K files (MIT, OpenAI)
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def make_tokenizer():
    """Every byte is one token (ids 0-255) plus three specials: small, offline, lossless."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]})
    tok.chat_template = CHATML
    return tok


def make_model(arch="llama", vocab_size=259, seed=0, **over):
    """A tiny random causal LM of the given architecture (llama, mistral, qwen2, qwen3)."""
    import transformers as tf
    cfg_cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config,
               "qwen3": tf.Qwen3Config}[arch]
    kw = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              tie_word_embeddings=True, bos_token_id=256, eos_token_id=257, pad_token_id=258)
    kw.update(over)
    torch.manual_seed(seed)
    return tf.AutoModelForCausalLM.from_config(cfg_cls(**kw)).eval()


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def tiny_model(tokenizer):
    return make_model(vocab_size=len(tokenizer))


@torch.inference_mode()
def sampler_logits(sampler, ids):
    """fp32 logits (P, V) at every position of one sequence `ids`, through the Sampler's own forward (prefill into
    cache row 0): what the tests compare with the HF model's logits."""
    ids = torch.as_tensor(ids, dtype=torch.long, device=sampler.model.lm_head.weight.device)
    with sampler._weights():
        sampler._ensure_cache(1, ids.shape[0])
        cos, sin = sampler._rope_table(ids.shape[0], sampler.compute_dtype, ids.device)
        return sampler._logits(sampler._prefill(ids, 0, (0, 1), cos, sin))


def script_sampler(monkeypatch, respond):
    """eval.py's sampling scripted, no model: a generation prompt is the record's question, a critique prompt the
    tuple ("critique", question, response); `respond(prompt, request, j)` gives the text of row j of a prompt.
    Returns the generate_many requests seen (one list per call)."""
    import critique
    import rollout
    seen = []

    class FakeSampler:
        def generate_many(self, reqs, progress=None, **kw):
            seen.append(reqs)
            return [[dict(prompt_index=i, text=respond(p, r, j)) for i, p in enumerate(r["prompts"])
                     for j in range(r["n"])] for r in reqs]

    def outputs(records, outs):
        return [dict(q_index=o["prompt_index"], id=records[o["prompt_index"]]["id"], text=o["text"],
                     length=len(o["text"]), truncated=False, tokens=[], logprobs=[], prompt_ids=[]) for o in outs]

    monkeypatch.setattr(rollout, "Sampler", lambda *a, **k: FakeSampler())
    monkeypatch.setattr(rollout, "generation_prompts", lambda tok, records, style="plain": [
        r["question"] for r in records])
    monkeypatch.setattr(rollout, "default_stop_ids", lambda tok: [])
    monkeypatch.setattr(rollout, "rollout_outputs", lambda tok, records, prompts, outs: outputs(records, outs))
    monkeypatch.setattr(critique, "critique_prompts", lambda tok, pairs: [("critique", p["question"], p["response"])
                                                                          for p in pairs])
    monkeypatch.setattr(critique, "critique_outputs", lambda tok, pairs, prompts, outs, m: [
        dict(pair_index=o["prompt_index"], text=o["text"], label=pairs[o["prompt_index"]]["label"]) for o in outs])
    return seen
