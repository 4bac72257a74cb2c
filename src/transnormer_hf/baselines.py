"""Baselines TNL is compared with: a same-size Llama and decode-step timing (for quickstart, benchmarks, notebooks)."""

from __future__ import annotations

import statistics
import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from .cache_transnormer import TransNormerLLMCache
from .modeling_transnormer import CACHE_FIELD, TransNormerLLMPreTrainedModel


def same_size_llama(config) -> LlamaForCausalLM:
    """A randomly initialised LlamaForCausalLM with TNL's width, depth, heads, vocabulary and ~its size.

    TNL's token mixer has 5 d x d projections (q, k, v, gate, out), Llama's 4; the extra d^2 per layer goes
    into Llama's MLP (3 d x inner), rounded to a multiple of 64 (an odd width such as 6315 misaligns the rows and
    halves the matmul speed on an H100), so the parameter counts agree within 0.4% for the released shapes.
    """
    llama_config = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=64 * round((config.intermediate_size + config.hidden_size / 3) / 64),
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_attention_heads, max_position_embeddings=1 << 20,
        tie_word_embeddings=True, pad_token_id=config.pad_token_id, bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
    )
    return LlamaForCausalLM(llama_config)


def cache_bytes(cache) -> int:
    """Memory a decoding cache holds: TNL's fixed-size states, or the keys and values of a Llama cache."""
    if isinstance(cache, TransNormerLLMCache):
        return cache.state_bytes
    return sum(tensor.numel() * tensor.element_size()
               for layer in cache.layers for tensor in (layer.keys, layer.values))


def cache_at_context(model, context: int, device: str, batch: int = 1):
    """A cache of `batch` rows as after `context` tokens, built without a prefill; returns it with its bytes.

    TNL: one decode step gives every layer its fixed-size state; the token counter is then set to `context`
    (it only moves the LRPE angles). Llama: every layer gets keys and values of `context` random vectors.
    """
    config = model.config
    if isinstance(model, TransNormerLLMPreTrainedModel):
        cache = TransNormerLLMCache(config)
        with torch.no_grad():
            model(input_ids=torch.ones(batch, 1, dtype=torch.int64, device=device), use_cache=True,
                  **{CACHE_FIELD: cache})
        cache.seen_tokens = context
        return cache, cache_bytes(cache)
    head_dim = config.hidden_size // config.num_attention_heads
    cache = DynamicCache(config=config)
    dtype = next(model.parameters()).dtype
    for layer_idx in range(config.num_hidden_layers):
        keys, values = (torch.randn(batch, config.num_key_value_heads, context, head_dim, dtype=dtype, device=device)
                        for _ in range(2))
        cache.update(keys, values, layer_idx)
    return cache, cache_bytes(cache)


def decode_step_seconds(model, context: int, steps: int, device: str, batch: int = 1) -> tuple[float, int]:
    """Median wall time of one greedy decode step of `batch` rows at `context` tokens, and the cache bytes there."""
    cache, held_bytes = cache_at_context(model, context, device, batch)
    token = torch.ones(batch, 1, dtype=torch.int64, device=device)
    times = []
    with torch.no_grad():
        for step in range(steps + 1):  # the first step is a warm-up
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            logits = model(input_ids=token, use_cache=True, **{CACHE_FIELD: cache}).logits
            token = logits[:, -1:].argmax(-1)
            if device == "cuda":
                torch.cuda.synchronize()
            if step:
                times.append(time.perf_counter() - start)
    return statistics.median(times), held_bytes
