"""Training losses that see the global batch: embeddings are gathered from every process, so N processes with a
per-process batch of B learn exactly like one process with a batch of N x B (open_clip's scheme).

The model never calls `torch.distributed`; these modules do, and fall back to the local batch when no process group
is initialised.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn as dist_nn
import torch.nn.functional as F
from torch import nn

from xmodal import contrastive_loss


def _world() -> tuple[int, int]:
    """`(rank, world_size)` of the default process group, `(0, 1)` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """`(B, D)` on each of N processes -> `(N * B, D)` in rank order, differentiable: the backward pass sends each
    process the gradient of every process's loss with respect to its own rows (an all-gather whose backward is a
    reduce-scatter). Every process must pass the same batch size."""
    _, world_size = _world()
    if world_size == 1:
        return tensor
    return torch.cat(dist_nn.all_gather(tensor.contiguous()), dim=0)


class GlobalBatch:
    """The global batch for `XModalForPreTraining(global_batch=...)`: ITM draws its hard negatives from every
    process's pairs and the momentum queue's in-batch negatives (and enqueued keys) are the global batch (ALBEF's
    `concat_all_gather`). `gather` is differentiable where its input is (each process receives the gradients that
    every process's loss sends to its rows)."""

    def __init__(self) -> None:
        self.rank, self.world_size = _world()

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """`(B, ...)` on each process -> `(N * B, ...)` in rank order; the dimensions after the first are padded with
        zeros to their largest size over the processes (e.g. captions of different padded lengths). Every process
        must pass the same B."""
        if self.world_size == 1:
            return tensor
        shape = torch.tensor(tensor.shape[1:], device=tensor.device, dtype=torch.long)
        shapes = [torch.empty_like(shape) for _ in range(self.world_size)]
        dist.all_gather(shapes, shape)
        largest = torch.stack(shapes).amax(dim=0).tolist()
        padding = [
            amount for size, top in zip(reversed(tensor.shape[1:]), reversed(largest)) for amount in (0, top - size)
        ]
        if any(padding):
            tensor = F.pad(tensor, padding)
        if tensor.requires_grad:
            return torch.cat(dist_nn.all_gather(tensor.contiguous()), dim=0)
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts, dim=0)


class ContrastiveLoss(nn.Module):
    r"""Symmetric InfoNCE / NT-Xent over the global batch (CLIP; open_clip's `ClipLoss`).

    With `local_loss=False`, every process computes the loss of the whole `(N B, N B)` similarity matrix; with
    `local_loss=True`, only its own B rows against all N B columns (less compute and memory: `(B, N B)`). Either way,
    once DDP averages the gradients across processes they equal those of one process holding the whole batch.

    Args:
        label_smoothing (`float`): label smoothing of both cross-entropies.
        local_loss (`bool`): compute only the local rows of the similarity matrix.
    """

    def __init__(self, label_smoothing: float = 0.0, local_loss: bool = False) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing
        self.local_loss = local_loss

    def forward(
        self, image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor | float
    ) -> torch.Tensor:
        """`image_embeds`, `text_embeds` `(B, D)` L2-normalised pairs (row i with row i) of this process;
        `logit_scale` the inverse temperature (already exponentiated and clamped). Returns the loss `()`."""
        if image_embeds.shape != text_embeds.shape:
            raise ValueError(
                f"image_embeds {tuple(image_embeds.shape)} and text_embeds {tuple(text_embeds.shape)} must be pairs "
                "of the same shape."
            )
        rank, _ = _world()
        all_images, all_texts = gather_with_grad(image_embeds), gather_with_grad(text_embeds)
        batch_size = image_embeds.shape[0]
        smoothing = self.label_smoothing
        if not self.local_loss:
            # the fused loss: the (N B, N B) logits and their gradient are the only square matrices it keeps
            return contrastive_loss(logit_scale * all_texts @ all_images.t(), smoothing)
        logits_per_image = logit_scale * image_embeds @ all_texts.t()  # (B, N B)
        logits_per_text = logit_scale * text_embeds @ all_images.t()
        labels = torch.arange(batch_size, device=image_embeds.device) + rank * batch_size
        return (
            F.cross_entropy(logits_per_image, labels, label_smoothing=smoothing)
            + F.cross_entropy(logits_per_text, labels, label_smoothing=smoothing)
        ) / 2.0


__all__ = ["ContrastiveLoss", "GlobalBatch", "gather_with_grad"]
