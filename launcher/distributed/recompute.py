"""``train.activation_checkpointing``: blocks that keep less of their forward and recompute the rest in backward.

A block's activations are what training holds between its forward and its backward; a deep model's dwarf its weights.
``full`` keeps only each block's input and recomputes the block in backward (about one more forward: a third more
compute); ``N`` does so for every N-th block (torchtitan's selective layers: a share of the memory for a share of the
cost); ``op`` keeps the outputs of the block's matmuls and attention and recomputes the cheap rest (norms,
activations, dropout masks), torch's selective checkpointing policy. Each block's own ``forward`` is wrapped, so its
parameters, state_dict keys and hooks (FSDP's) stay as they were, and compiling it compiles the wrapped forward.

torch.utils.checkpoint keeps and restores the random state of the recomputed forward: dropout draws the same mask
twice, and a run with it on ends bitwise equal to one with it off.
"""

from __future__ import annotations

import functools

import torch
from torch import nn


def checkpoint_blocks(blocks: list[nn.Module], mode: str) -> int:
    """Wrap the forward of ``blocks`` (every one, or every N-th) as ``mode`` asks; returns how many were wrapped."""
    if mode == "off":
        return 0
    chosen = blocks if not mode.isdigit() else blocks[int(mode) - 1 :: int(mode)]
    context = _keep_matmuls if mode == "op" else None
    for block in chosen:
        block.forward = functools.partial(_checkpointed, block.forward, context)
    return len(chosen)


def _checkpointed(forward, context, *args, **kwargs):
    from torch.utils.checkpoint import checkpoint

    extra = {"context_fn": context} if context else {}
    return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=True, **extra, **kwargs)


def _keep_matmuls():
    """Selective checkpointing's contexts: the matmuls' and attention's outputs are kept, the rest recomputed."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    aten = torch.ops.aten
    kept = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}
    kept |= {getattr(aten, name).default for name in ("_scaled_dot_product_flash_attention",
                                                      "_scaled_dot_product_efficient_attention",
                                                      "_scaled_dot_product_cudnn_attention",
                                                      "_scaled_dot_product_flash_attention_for_cpu")
             if hasattr(aten, name)}

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in kept else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)
