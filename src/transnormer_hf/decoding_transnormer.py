"""generate()'s greedy and sampling loop for TNL: each one-token step replayed from a CUDA graph, the stop decision read
one step late, so the host queues step t + 1 while the GPU still runs step t (issue 17).

transformers' own loop (`_sample`) launches ~250 kernels per token from Python and then waits for the GPU to say
whether every sequence has finished; on an H200 host that leaves the GPU idle most of the time. A recurrent cache
makes the step easy to capture: its state has a fixed shape, so one CUDA graph replays every step of a generation.
`decode_with_cuda_graphs` is handed to `generate()` as its `custom_generate` decoding loop (transformers' mechanism
for custom loops): generate() still merges the generation config, builds the logits processors and stopping criteria
and prepares the cache; this loop only runs the steps. The tokens are the ones `_sample` gives (same processors,
same sampling calls in the same order, the same kernels replayed), and what it cannot run it hands to `_sample`.
"""

from __future__ import annotations

import torch
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.utils import logging

from .cache_transnormer import CACHE_FIELD, TransNormerLLMCache, TransNormerLLMStaticCache

logger = logging.get_logger(__name__)
# Where generate() takes this loop by itself (the CPU tests add "cpu", where every step then runs eagerly).
GRAPH_DEVICE_TYPES = ("cuda",)


def takes_graph_decoding(device: torch.device) -> bool:
    """Whether generate() on a model on `device` takes this loop for greedy decoding and sampling."""
    return device.type in GRAPH_DEVICE_TYPES


class GraphedDecodeStep:
    """The model's one-token forward on a fixed-address view of `cache`: the first call runs eagerly (it also compiles
    and autotunes every kernel), then the step is captured once and replayed. Off CUDA every call runs eagerly (the
    stand-in the CPU tests drive)."""

    def __init__(self, model, cache: TransNormerLLMCache, tokens: torch.Tensor) -> None:
        """`tokens`: the first tokens to feed (B,), which give the batch and the device."""
        self.model, self.cache = model, cache
        self.device = tokens.device
        self.capture = self.device.type == "cuda"  # False: every call runs eagerly
        self.view = cache if isinstance(cache, TransNormerLLMStaticCache) else _static_view(cache, self.device)
        self.tokens = torch.zeros(tokens.shape[0], 1, dtype=torch.int64, device=self.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.steps = 0

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed `tokens` (B,); returns the next logits (B, V) in fp32, a tensor of its own."""
        self.tokens.copy_(tokens[:, None])
        self.steps += 1
        if self.graph is not None:
            self.graph.replay()
            return self.logits.to(copy=True, dtype=torch.float32)
        if not self.capture:
            return self._forward().to(copy=True, dtype=torch.float32)
        # Warm up on the stream that captures: libraries set up per-stream state (cuBLAS workspaces) on first use.
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            logits = self._forward().to(copy=True, dtype=torch.float32)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        try:
            # capture_begin/end rather than `torch.cuda.graph`, which also syncs and empties the allocator's cache
            with torch.cuda.stream(stream):
                graph.capture_begin()
                try:
                    self.logits = self._forward()  # recorded; nothing runs until replay
                finally:
                    graph.capture_end()
        except RuntimeError as error:  # something in the step cannot be captured: decode eagerly, as _sample would
            logger.warning_once(f"TNL decoding: the step could not be captured as a CUDA graph ({error}); decoding "
                                f"continues without it")
            self.capture = False
            return logits
        self.graph = graph
        return logits

    def _forward(self) -> torch.Tensor:
        outputs = self.model(input_ids=self.tokens, use_cache=True, return_dict=True, logits_to_keep=1,
                             **{CACHE_FIELD: self.view})
        return outputs.logits[:, -1]

    def finish(self) -> None:
        """Give the user's cache the states and the token count the steps left in the view."""
        if self.view is self.cache:
            return
        for layer, view_layer in zip(self.cache.layers, self.view.layers):
            layer.state = view_layer.state
        self.cache.seen_tokens += self.steps


def _static_view(cache: TransNormerLLMCache, device: torch.device) -> TransNormerLLMStaticCache:
    """A static cache over `cache`'s states (made contiguous, then updated in place) and its token count on the
    device, so that one captured step holds at every position."""
    view = TransNormerLLMStaticCache(num_layers=len(cache.layers))
    for layer, view_layer in zip(cache.layers, view.layers):
        view_layer.update(layer.state)
    view.positions(1, device)  # places the token counter on the device
    view.seen_tokens = cache.seen_tokens
    view.position_lag = cache.position_lag
    return view


class _LateStopFlags:
    """`all sequences finished` of each step, copied to the host without waiting and read one step later."""

    def __init__(self, device: torch.device) -> None:
        pinned = device.type == "cuda"
        self.values = [torch.zeros((), dtype=torch.bool, pin_memory=pinned) for _ in range(2)]
        self.events = [torch.cuda.Event() if pinned else None for _ in range(2)]
        self.writes = 0  # the two slots alternate: write n goes to slot n % 2

    def write(self, unfinished: torch.Tensor) -> None:
        slot = self.writes % 2
        self.values[slot].copy_(unfinished.max() == 0, non_blocking=True)
        if self.events[slot] is not None:
            self.events[slot].record()
        self.writes += 1

    def previous_stopped(self) -> bool:
        """Whether every sequence had finished at the step before the last `write`."""
        if self.writes < 2:
            return False
        slot = self.writes % 2  # that of write number writes - 2
        if self.events[slot] is not None:
            self.events[slot].synchronize()
        return bool(self.values[slot])


def why_transformers_loop(model, model_kwargs: dict, generation_config, synced_gpus: bool) -> str | None:
    """Why this generation must take transformers' `_sample` instead, or None when the graph loop can run it."""
    if synced_gpus:
        return "synced_gpus (DeepSpeed ZeRO-3, FSDP) runs every rank to max_length"
    if generation_config.output_attentions or generation_config.output_hidden_states:
        return "output_attentions / output_hidden_states need every step's intermediate outputs"
    if generation_config.is_assistant:
        return "an assistant model's loop is driven by assisted decoding"
    if not isinstance(model_kwargs.get(CACHE_FIELD), TransNormerLLMCache):
        return "generation without a cache (use_cache=False) recomputes the whole prefix at every step"
    if getattr(model, "hf_quantizer", None) is not None or len(set(getattr(model, "hf_device_map", {0: 0}).values())) > 1:
        return "quantized or dispatched (device_map) models run hooks or kernels a CUDA graph may not capture"
    return None


def decode_with_cuda_graphs(model, input_ids: torch.LongTensor, logits_processor, stopping_criteria, generation_config,
                            synced_gpus: bool = False, streamer=None, **model_kwargs):
    """transformers' greedy / multinomial sampling loop (`_sample`, same arguments and outputs) with graph-replayed
    steps and, when the cache is not returned and nothing streams, the stop decision read one step late.

    The late read costs one step: when it reports that every sequence finished a step ago, the step run meanwhile
    and the token it gave are dropped (the state update stays in a cache nobody sees). A returned cache (one the user passed,
    or `return_dict_in_generate`) or a streamer makes the loop check every step, so the cache holds exactly the
    tokens transformers' loop feeds it."""
    if generation_config.num_beams != 1:
        raise ValueError(f"decode_with_cuda_graphs runs greedy decoding and sampling (num_beams=1); got "
                         f"num_beams={generation_config.num_beams}: leave custom_generate unset for beam search")
    reason = why_transformers_loop(model, model_kwargs, generation_config, synced_gpus)
    if reason is not None:
        logger.info_once(f"TNL decoding: transformers' loop runs this generation: {reason}")
        return type(model)._sample(model, input_ids, logits_processor, stopping_criteria, generation_config,
                                   synced_gpus=synced_gpus, streamer=streamer, **model_kwargs)
    pad_token_id = generation_config._pad_token_tensor
    if pad_token_id is not None:
        pad_token_id = pad_token_id.to(input_ids.device)
    has_eos_stopping_criteria = any(hasattr(criteria, "eos_token_id") for criteria in stopping_criteria)
    return_dict = generation_config.return_dict_in_generate
    scores = () if return_dict and generation_config.output_scores else None
    raw_logits = () if return_dict and generation_config.output_logits else None
    cache_is_returned = return_dict or getattr(model_kwargs[CACHE_FIELD], "_is_user_defined", False)
    late_stop = _LateStopFlags(input_ids.device) if streamer is None and not cache_is_returned else None
    max_length = stopping_criteria.max_length

    outputs = model._prefill(input_ids, generation_config, model_kwargs)
    cache = getattr(outputs, CACHE_FIELD)
    logits = outputs.logits[:, -1].to(copy=True, dtype=torch.float32, device=input_ids.device)
    del outputs  # the prefill's logits may be large
    step = GraphedDecodeStep(model, cache, input_ids[:, -1])
    unfinished_sequences = torch.ones(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    dropped = 0
    while True:
        next_token_scores = logits_processor(input_ids, logits)
        if scores is not None:
            scores += (next_token_scores,)
        if raw_logits is not None:
            raw_logits += (logits,)
        if generation_config.do_sample:
            probs = torch.nn.functional.softmax(next_token_scores, dim=-1)
            next_tokens = torch.multinomial(probs, num_samples=1).squeeze(1)
        else:
            next_tokens = torch.argmax(next_token_scores, dim=-1)
        if has_eos_stopping_criteria:  # finished sequences continue with padding
            next_tokens = next_tokens * unfinished_sequences + pad_token_id * (1 - unfinished_sequences)
        input_ids = torch.cat([input_ids, next_tokens[:, None]], dim=-1)
        unfinished_sequences = unfinished_sequences & ~stopping_criteria(input_ids, scores)
        if streamer is not None:
            streamer.put(next_tokens.cpu())
        if late_stop is not None:
            late_stop.write(unfinished_sequences)
            # The previous step's flag is ready by now: the GPU is still running the step this token came from.
            if late_stop.previous_stopped():
                dropped = 1  # every sequence had finished before this token
                break
        elif unfinished_sequences.max() == 0:
            break
        if max_length is not None and input_ids.shape[1] >= max_length:
            break
        logits = step(next_tokens)
    step.finish()
    if dropped:
        input_ids = input_ids[:, :-1]
        scores = scores[:-1] if scores is not None else None
        raw_logits = raw_logits[:-1] if raw_logits is not None else None
    if streamer is not None:
        streamer.end()
    if not return_dict:
        return input_ids
    return GenerateDecoderOnlyOutput(sequences=input_ids, scores=scores, logits=raw_logits, **{CACHE_FIELD: cache})
