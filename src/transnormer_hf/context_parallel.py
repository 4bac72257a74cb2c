"""Context parallelism for the model: one long sequence trained across the ranks of a process group, exact.

Usage (any launcher that starts a process group; the same global batch on every rank of the group):

    enable_context_parallel(model, group)           # once
    local = shard_for_context_parallel(batch, group)
    loss = model(**local).loss                      # this rank's share: the group's sum is the global mean
    loss.backward()                                 # gradients: sum them over the group (DDP/FSDP: see below)

Each rank keeps one contiguous slice of every row (rank 0 the first tokens, `kernels.slice_lengths`); the
token mixer passes the recurrent state across ranks (`kernels/context_parallel.py`, LASP-2), LRPE sees
global positions, packed documents (position_ids that restart) reset exactly where they do on one process.
Labels are shifted before slicing (`shift_labels`), so the last token of a slice predicts the first token of
the next. The loss of a rank is its summed token loss over the label count of the whole sequence
(`num_items_in_batch`, counted over the group when not given), so the group's losses and gradients add up to
the one-process ones. Engines that average gradients over every rank (DDP, FSDP2 on a dp x cp mesh) must scale
each rank's loss by the number of ranks that average, as Trainer does for `num_items_in_batch`.

No load balancing (zigzag) layout: linear attention costs the same for every token of a slice, so contiguous
slices are balanced already and each rank passes on one state.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F

from transnormer_hf.kernels import ContextParallelLayout, slice_lengths

IGNORE_INDEX = -100
SEQUENCE_KEYS = ("input_ids", "labels", "shift_labels", "position_ids", "attention_mask")


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The TransNormerLLMModel inside a causal LM, a PEFT or DDP wrapper: the module with a context-parallel group
    slot (found by that attribute, so this module, which the model imports, never imports the model back)."""
    for module in model.modules():
        if hasattr(module, "context_parallel_group"):
            return module
    raise TypeError(f"context parallelism needs a TransNormerLLM model; {type(model).__name__} holds none")


def enable_context_parallel(model: torch.nn.Module, group: dist.ProcessGroup | None) -> torch.nn.Module:
    """Make `model` run each forward as this rank's slice of a sequence split over `group` (None: turn it off).

    A group of one rank is the plain path: no layout is gathered, nothing changes."""
    if group is not None and dist.get_world_size(group) == 1:
        group = None
    _base_model(model).context_parallel_group = group
    return model


def shard_for_context_parallel(batch: Mapping[str, torch.Tensor], group: dist.ProcessGroup) -> dict:
    """This rank's contiguous slice of a global batch: `input_ids`, `labels`, `position_ids`, `attention_mask`.

    Labels become globally shifted `shift_labels` first (kept if the batch has them), and `position_ids` default
    to 0..N-1, so every slice knows its place. Other entries pass unchanged.
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    reference = batch["input_ids"] if "input_ids" in batch else batch["inputs_embeds"]
    length = reference.shape[1]
    lengths = slice_lengths(length, world)
    begin = sum(lengths[:rank])
    piece = slice(begin, begin + lengths[rank])
    local = dict(batch)
    if "labels" in batch and "shift_labels" not in batch:
        local["shift_labels"] = F.pad(batch["labels"], (0, 1), value=IGNORE_INDEX)[..., 1:]
    if local.get("position_ids") is None:
        local["position_ids"] = torch.arange(length, device=reference.device).expand(reference.shape[0], -1)
    for key in (*SEQUENCE_KEYS, "inputs_embeds"):
        if local.get(key) is not None:
            local[key] = local[key][:, piece].contiguous()
    return local


def context_parallel_layout(group: dist.ProcessGroup, position_ids: torch.Tensor | None, length: int,
                            packed: bool, device: torch.device) -> ContextParallelLayout:
    """Gather where every rank's slice sits (one small all-gather per forward, read on the host).

    A slice continues the previous one unless its first position restarts the count (a document starting on the
    boundary); `packed`: this slice holds a document start after its first token.
    """
    ends = torch.full((2,), -1, device=device) if position_ids is None else position_ids[0, [0, -1]].to(device)
    flags = torch.tensor([length, int(position_ids is not None), int(packed)], device=device)
    mine = torch.cat([flags, ends.to(flags.dtype)])  # (length, has positions, packed, first, last position)
    table = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(table, mine, group=group)
    rows = torch.stack(table).tolist()
    continues = tuple(j == 0 or not rows[j][1] or rows[j][3] == rows[j - 1][4] + 1 for j in range(len(rows)))
    return ContextParallelLayout(group, tuple(row[0] for row in rows), continues, tuple(not row[2] for row in rows))


def forward_layout(group: dist.ProcessGroup, position_ids: torch.Tensor | None, hidden_states: torch.Tensor,
                   cu_seqlens: torch.Tensor | None, cache: object) -> ContextParallelLayout:
    """The model's layout for one forward; errors for what a split sequence cannot do."""
    if cache is not None:
        raise ValueError("context parallelism splits one sequence across ranks for training; it keeps no cache: "
                         "pass use_cache=False")
    if cu_seqlens is not None and position_ids is not None and position_ids.shape[0] != 1:
        raise ValueError("context parallelism with packed documents (position_ids that restart) needs one packed "
                         f"row per batch; got {position_ids.shape[0]} rows")
    return context_parallel_layout(group, position_ids, hidden_states.shape[1], cu_seqlens is not None,
                                   hidden_states.device)


def loss_kwargs(group: dist.ProcessGroup, labels: torch.Tensor, kwargs: dict) -> dict:
    """The loss arguments under context parallelism: globally shifted labels, the whole sequence's label count."""
    if kwargs.get("shift_labels") is None:
        raise ValueError("under context parallelism the labels must be shifted before the sequence is sliced (the "
                         "last token of a slice predicts the next slice's first): pass `shift_labels`, as "
                         "`shard_for_context_parallel` and Trainer's context parallelism do")
    if kwargs.get("num_items_in_batch") is None:
        count = (kwargs["shift_labels"] != IGNORE_INDEX).sum()
        dist.all_reduce(count, group=group)
        kwargs = {**kwargs, "num_items_in_batch": count}
    return kwargs


def gather_packed_rows(batch: Mapping[str, torch.Tensor], group: dist.ProcessGroup) -> dict[str, torch.Tensor]:
    """The group's packed rows (each rank's `PackedCollator` row, (1, T_r)) laid end to end in one (1, sum T_r) row.

    So a context-parallel group trains the rows its ranks loaded, as data parallelism would: the global batch is
    unchanged, every document still starts at position 0 (the state resets there) and its first label is -100.
    """
    keys = ("input_ids", "position_ids", "labels")
    if any(key not in batch for key in keys) or "attention_mask" in batch or batch["input_ids"].shape[0] != 1:
        raise ValueError("context parallelism trains packed rows: a batch of one row with input_ids, position_ids "
                         f"and labels and no attention_mask (--packing); got {sorted(batch)} of shape "
                         f"{tuple(batch['input_ids'].shape)}")
    world = dist.get_world_size(group)
    length = torch.tensor([batch["input_ids"].shape[1]], device=batch["input_ids"].device)
    lengths = [torch.empty_like(length) for _ in range(world)]
    dist.all_gather(lengths, length, group=group)
    lengths = [int(n) for n in torch.cat(lengths).tolist()]
    joined = dict(batch)
    for key, fill in zip(keys, (0, 0, IGNORE_INDEX)):
        row = F.pad(batch[key], (0, max(lengths) - batch[key].shape[1]), value=fill)  # all_gather needs one shape
        rows = [torch.empty_like(row) for _ in range(world)]
        dist.all_gather(rows, row.contiguous(), group=group)
        joined[key] = torch.cat([row[:, :n] for row, n in zip(rows, lengths)], dim=1)
    return joined


def context_parallel_mesh(size: int, device_type: str):
    """A (dp, cp) DeviceMesh over the whole world: consecutive ranks form one context-parallel group."""
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    if size < 1 or world % size:
        raise ValueError(f"the context-parallel size must divide the number of processes {world}; got {size}")
    return init_device_mesh(device_type, (world // size, size), mesh_dim_names=("dp", "cp"))


def context_parallel_trainer_class():
    """`transformers.Trainer` with context parallelism over the "cp" dimension of a (dp, cp) mesh.

    Each rank loads its own packed rows as under plain data parallelism; `compute_loss` joins the rows of its
    context-parallel group (`gather_packed_rows`) and runs this rank's slice. Trainer's `num_items_in_batch`
    (the label count over every rank) and its loss scale by the number of processes then give DDP and FSDP2, which
    average gradients over all ranks, exactly the one-process gradient of the same global batch.
    """
    from transformers import Trainer

    class ContextParallelTrainer(Trainer):
        def __init__(self, *args, context_parallel_group: dist.ProcessGroup, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.context_parallel_group = context_parallel_group
            enable_context_parallel(self.model, context_parallel_group)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            local = shard_for_context_parallel(gather_packed_rows(inputs, self.context_parallel_group),
                                               self.context_parallel_group)
            return super().compute_loss(model, local, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    return ContextParallelTrainer
