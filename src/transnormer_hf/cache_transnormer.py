"""TransNormerLLMCache: the recurrent state of every layer plus the number of tokens seen.

A TNL layer needs no keys or values from the past: one fp32 state S of shape (batch, heads, d_k, d_v)
summarises them (tnl_spec.md section 6), so the cache has the same size at token 100 and at token
100,000. The LRPE position of the next token is `seen_tokens`, less the masked tokens of its row that a forward
skipped (`position_lag`, kept only once a mask other than left padding was used); unlike the official code, no
position offset is kept on the modules, so reusing a model instance never shifts positions (spec section 10.1).

`TransNormerLLMStaticCache` is the compile-friendly variant (`generate(..., cache_implementation="static")`):
its states keep one address and shape from the first forward on and are updated in place, and the token
count lives in a device tensor, so a compiled decode step is traced once and replayed (CUDA graphs).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

# transformers version shim: the cache's keyword and output field, `past_key_values` in 5.17-5.23 and `cache` from
# 5.24 on (the old name deprecated until 5.40).
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class TransNormerLLMLayerState:
    """One layer's fp32 state (batch, heads, d_k, d_v), or None before the first forward."""

    is_compileable = False
    is_croppable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self) -> None:
        self.state: torch.Tensor | None = None

    @property
    def is_initialized(self) -> bool:
        return self.state is not None

    @property
    def batch_size(self) -> int:
        return -1 if self.state is None else self.state.shape[0]

    def __repr__(self) -> str:
        shape = None if self.state is None else tuple(self.state.shape)
        return f"{type(self).__name__}(state={shape})"

    def _map(self, fn) -> None:
        if self.state is not None:
            self.state = fn(self.state)

    def update(self, new_state: torch.Tensor) -> None:
        """Keep the state a forward returned."""
        self.state = new_state

    def reset(self) -> None:
        self._map(torch.zeros_like)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda s: s.index_select(0, beam_idx.to(s.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda s: s.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda s: s[indices.to(s.device)])

    def offload(self) -> None:
        """States are small and always needed: they stay where they are."""

    def prefetch(self) -> None:
        """See `offload`."""


class TransNormerLLMCache(Cache):
    """Recurrent cache for `TransNormerLLMModel`: per-layer fp32 states and a seen-token counter.

    Pass a fresh `TransNormerLLMCache(config)` (or nothing) to a forward or to `generate`. Strategies that
    must roll a cache back (assisted decoding, prompt lookup) cannot work on a recurrent state: `crop`
    raises and says why.
    """

    layer_class = TransNormerLLMLayerState

    def __init__(self, config=None, num_layers: int | None = None) -> None:
        if num_layers is None:
            if config is None:
                raise ValueError("TransNormerLLMCache needs the model config or num_layers")
            num_layers = config.num_hidden_layers
        super().__init__(layers=[self.layer_class() for _ in range(num_layers)])
        self.seen_tokens = 0
        # (batch,) int64: masked tokens each row skipped after the model gathered its real tokens; None is all 0.
        self.position_lag: torch.Tensor | None = None

    def __getitem__(self, layer_idx: int) -> torch.Tensor | None:
        return self.layers[layer_idx].state

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def positions(self, length: int, device: torch.device) -> torch.Tensor:
        """Absolute (LRPE) positions of the next `length` tokens: (length,) int64, or (batch, length) per row once
        rows have skipped masked tokens."""
        return self._less_lag(torch.arange(self.seen_tokens, self.seen_tokens + length, device=device))

    def _less_lag(self, positions: torch.Tensor) -> torch.Tensor:
        if self.position_lag is None:
            return positions
        return positions[None, :] - self.position_lag.to(positions.device)[:, None]  # (B, N)

    def advance(self, length: int, real_tokens: torch.Tensor | None = None) -> None:
        """Count `length` more tokens; the model calls it once per forward, after every layer. `real_tokens` (batch,)
        says how many of them each row really had when its masked tokens were skipped."""
        self.seen_tokens += length
        self._skip_masked(length, real_tokens)

    def _skip_masked(self, length: int, real_tokens: torch.Tensor | None) -> None:
        if real_tokens is not None:
            masked = length - real_tokens
            self.position_lag = masked if self.position_lag is None else self.position_lag + masked

    def _map_lag(self, fn) -> None:
        if self.position_lag is not None:
            self.position_lag = fn(self.position_lag)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._map_lag(lambda lag: lag.index_select(0, beam_idx.to(lag.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._map_lag(lambda lag: lag.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._map_lag(lambda lag: lag[indices.to(lag.device)])

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.seen_tokens + query_length, 0

    def reset(self) -> None:
        for layer in self.layers:
            layer.state = None
        self.seen_tokens = 0
        self.position_lag = None

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove in (0, None):
            return
        raise NotImplementedError(
            "TransNormerLLMCache cannot be cropped: a recurrent state has no per-token entries to remove, so "
            "decoding strategies that roll back tokens (assisted decoding, prompt lookup) are not supported"
        )

    @property
    def state_bytes(self) -> int:
        """Memory held by the states, in bytes (constant in the sequence length)."""
        return sum(layer.state.numel() * layer.state.element_size() for layer in self.layers if layer.state is not None)


def _mark_static_address(tensor: torch.Tensor) -> None:
    # A tensor that a CUDA graph reads and writes must keep its address from one replay to the next.
    if not torch.compiler.is_compiling():
        torch._dynamo.mark_static_address(tensor)


class TransNormerLLMStaticLayerState(TransNormerLLMLayerState):
    """One layer's state for compiled decoding: allocated by the first forward, then updated in place."""

    is_compileable = True

    def update(self, new_state: torch.Tensor) -> None:
        if self.state is None:
            self.state = new_state.contiguous()
            _mark_static_address(self.state)
        elif new_state is not self.state:  # the fused decode step may already have written it in place
            self.state.copy_(new_state)

    def reset(self) -> None:
        if self.state is not None:
            self.state.zero_()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.state is not None:
            self.state.copy_(self.state.index_select(0, beam_idx.to(self.state.device)))


class TransNormerLLMStaticCache(TransNormerLLMCache):
    """Compile-friendly recurrent cache: fixed-shape states updated in place and a device token counter.

    `generate(..., cache_implementation="static")` builds one, and `generate` then runs its decode steps through
    `torch.compile` (on CUDA by default with mode "reduce-overhead", i.e. CUDA graphs; elsewhere pass a
    `compile_config`). The states are allocated by the first forward (the eager prefill) at its batch size and
    device; LRPE positions are read from a 0-d int64 tensor, so the compiled step never specialises on the
    position. `seen_tokens` reads that tensor back (a host sync; generate reads it once, before the prefill).
    """

    layer_class = TransNormerLLMStaticLayerState

    def __init__(self, config=None, num_layers: int | None = None) -> None:
        self._seen: torch.Tensor | None = None
        super().__init__(config, num_layers)

    @property
    def seen_tokens(self) -> int:
        return 0 if self._seen is None else int(self._seen)

    @seen_tokens.setter
    def seen_tokens(self, value: int) -> None:
        if self._seen is not None:
            self._seen.fill_(value)
        elif value != 0:
            self._seen = torch.tensor(value, dtype=torch.int64)

    def positions(self, length: int, device: torch.device) -> torch.Tensor:
        if self._seen is None or self._seen.device != device:
            self._seen = torch.zeros((), dtype=torch.int64, device=device) + self.seen_tokens
            _mark_static_address(self._seen)
        return self._less_lag(self._seen + torch.arange(length, device=device))

    def advance(self, length: int, real_tokens: torch.Tensor | None = None) -> None:
        self._seen.add_(length)
        self._skip_masked(length, real_tokens)

    def reset(self) -> None:
        """Zero the states and the counter in place, keeping their addresses (a captured graph stays valid)."""
        for layer in self.layers:
            layer.reset()
        self.seen_tokens = 0
        self.position_lag = None
