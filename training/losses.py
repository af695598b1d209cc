"""Training losses that see the global batch: embeddings are gathered from every process, so N processes with a
per-process batch of B learn exactly like one process with a batch of N x B (open_clip's scheme).

The model never calls `torch.distributed`; these modules do, and fall back to the local batch when no process group
is initialised.
"""

from __future__ import annotations

from typing import Any

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
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        logit_scale: torch.Tensor | float,
        negative_text_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`image_embeds`, `text_embeds` `(B, D)` L2-normalised pairs (row i with row i) of this process;
        `logit_scale` the inverse temperature (already exponentiated and clamped); `negative_text_embeds` `(K, D)`
        this process's hard negative captions, gathered like the pairs and added to every image's image->text
        softmax (NegCLIP). Returns the loss `()`."""
        if image_embeds.shape != text_embeds.shape:
            raise ValueError(
                f"image_embeds {tuple(image_embeds.shape)} and text_embeds {tuple(text_embeds.shape)} must be pairs "
                "of the same shape."
            )
        rank, _ = _world()
        all_images, all_texts = gather_with_grad(image_embeds), gather_with_grad(text_embeds)
        batch_size = image_embeds.shape[0]
        smoothing = self.label_smoothing
        if not self.local_loss and negative_text_embeds is None:
            # the fused loss: the (N B, N B) logits and their gradient are the only square matrices it keeps
            return contrastive_loss(logit_scale * all_texts @ all_images.t(), smoothing)
        # this process's rows (local_loss) or all of them, against every column and the negative captions
        images, texts = (image_embeds, text_embeds) if self.local_loss else (all_images, all_texts)
        columns = all_texts
        if negative_text_embeds is not None:
            columns = torch.cat([all_texts, gather_with_grad(negative_text_embeds)])
        logits_per_image = logit_scale * images @ columns.t()  # (B or N B, N B [+ N K])
        logits_per_text = logit_scale * texts @ all_images.t()
        offset = rank * batch_size if self.local_loss else 0
        labels = torch.arange(images.shape[0], device=image_embeds.device) + offset
        return (
            F.cross_entropy(logits_per_image, labels, label_smoothing=smoothing)
            + F.cross_entropy(logits_per_text, labels, label_smoothing=smoothing)
        ) / 2.0


LOSS_BALANCING: tuple[str, ...] = ("none", "running_scale", "relative_scale", "uncertainty")
"""How `LossBalancer` combines the objectives of a multi-task step."""


def _process_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean of `values` over the processes (itself on one process), detached."""
    values = values.detach().clone()
    _, world_size = _world()
    if world_size > 1:
        dist.all_reduce(values)
        values /= world_size
    return values


class LossBalancer(nn.Module):
    r"""Combines the losses of a multi-task step, $L = \sum_i w_i \, f_i(L_i)$, with the weights `w_i` of the
    objectives (`XModalConfig.<objective>_loss_weight`) and one of four schemes:

    - `"none"`: $f_i(L) = L$, the fixed weighted sum that `XModalForPreTraining` returns;
    - `"running_scale"`: $f_i(L) = L / m_i$, with $m_i$ a bias-corrected exponential moving average (decay `momentum`)
      of $L_i$ over the steps, this step included (not differentiated), so that each objective weighs $w_i$ whatever
      its units: a VQA loss of 20 at the start no longer drowns an InfoNCE of 4, and an objective whose loss has
      fallen by half counts as much as before;
    - `"relative_scale"`: $f_0(L) = L$ for the first objective (the anchor: the contrastive loss where it is trained)
      and $f_i(L) = L \, m_0 / m_i$ for the others, with the same running means: each auxiliary loss weighs $w_i$
      times the anchor whatever its units, while the anchor's gradient keeps the scale it has alone. Dividing the
      anchor too (`running_scale`) makes its gradient grow as its loss falls, which changes AdamW's effective step
      over the run (`bench/RESULTS.md`, "Multi-task at equal wall-clock": it halves contrastive R@1);
    - `"uncertainty"`: learned homoscedastic-uncertainty weights (Kendall, Gal and Cipolla, CVPR 2018, the form for
      classification losses): $f_i(L) = e^{-s_i} L + s_i / 2$ with a learnable $s_i = \log \sigma_i^2$ per objective
      (initialised at 0), so the weight of each objective settles near $1 / (2 L_i)$. The parameters must be given to
      the optimizer (`parameters()`, no weight decay).

    The statistics (`running_scale`'s averages, `uncertainty`'s gradient for $s_i$) use the losses averaged over the
    processes, so every process combines them alike and `s_i` stays identical everywhere. A step may compute only
    some of the objectives (`xmodal pretrain --auxiliary_every`): the sum then runs over those, and only their
    averages are updated. The state is in `state_dict()` (buffers and parameters), for checkpoints.

    Args:
        weights: `{objective: w_i}` of the objectives, in the order of their losses.
        mode: one of :data:`LOSS_BALANCING`.
        momentum: decay of `running_scale`'s averages, in `[0, 1)`.
    """

    def __init__(self, weights: dict[str, float], mode: str = "none", momentum: float = 0.98) -> None:
        super().__init__()
        if mode not in LOSS_BALANCING:
            raise ValueError(f"--loss_balancing must be one of {', '.join(LOSS_BALANCING)}, got {mode!r}.")
        if not 0 <= momentum < 1:
            raise ValueError(f"LossBalancer momentum must be in [0, 1), got {momentum}.")
        self.names = list(weights)
        self.mode = mode
        self.momentum = momentum
        self.register_buffer("weights", torch.tensor([weights[name] for name in self.names], dtype=torch.float))
        self.register_buffer("running_mean", torch.zeros(len(self.names)))
        # per objective: the steps that computed it
        self.register_buffer("num_updates", torch.zeros(len(self.names), dtype=torch.long))
        self.log_variance = nn.Parameter(torch.zeros(len(self.names))) if mode == "uncertainty" else None

    def effective_weights(self) -> torch.Tensor:
        """`(num_objectives,)`: what each loss is multiplied by now (for logging)."""
        if self.mode in ("running_scale", "relative_scale"):
            correction = 1.0 - self.momentum ** self.num_updates.clamp(min=1).float()
            scale = (self.running_mean / correction).clamp(min=1e-8)
            if self.mode == "relative_scale":
                # relative to the anchor's scale, once the anchor has a running mean
                scale = scale / torch.where(self.num_updates[0] > 0, scale[0], torch.ones_like(scale[0]))
            return self.weights / scale
        if self.mode == "uncertainty":
            return self.weights * torch.exp(-self.log_variance.detach())
        return self.weights.clone()

    def forward(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """`{objective: loss ()}` (some or all of the objectives of `weights`) -> the combined loss `()`."""
        if not losses or not set(losses) <= set(self.names):
            raise ValueError(f"LossBalancer expects the losses of some of {self.names}, got {sorted(losses)}.")
        present = [index for index, name in enumerate(self.names) if name in losses]
        values = torch.stack([losses[self.names[index]].float() for index in present])
        weights = self.weights[present].to(values.device)
        if self.mode == "none":
            return (weights * values).sum()
        mean = _process_mean(values)
        if self.mode in ("running_scale", "relative_scale"):
            if self.training and torch.isfinite(mean).all():
                decay = torch.full_like(self.running_mean, 1.0)
                decay[present] = self.momentum
                update = torch.zeros_like(self.running_mean)
                update[present] = (1.0 - self.momentum) * mean.to(self.running_mean)
                self.running_mean.mul_(decay).add_(update)
                self.num_updates[present] += 1
            return (self.effective_weights()[present].to(values.device) * values).sum()
        log_variance = self.log_variance[present].to(values.device)
        precision = torch.exp(-log_variance)
        # the model's gradient is e^{-s} dL (local losses); s's gradient comes from the processes' mean losses, so
        # that s stays the same on every process; the value is the Kendall loss of the local losses
        model_term = precision.detach() * values
        variance_term = precision * mean + log_variance / 2.0 - precision.detach() * mean
        return (weights * (model_term + variance_term)).sum()

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # checkpoints of xmodal <= 0.1 count the updates of all objectives at once: one count for each
        count = state_dict.get(f"{prefix}num_updates")
        if count is not None and count.ndim == 0:
            state_dict[f"{prefix}num_updates"] = count.expand(len(self.names)).clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


__all__ = ["LOSS_BALANCING", "ContrastiveLoss", "GlobalBatch", "LossBalancer", "gather_with_grad"]
