"""Building blocks shared by the towers and the fusion module: attention through transformers' attention
interface (eager, sdpa, flash), the MLP, stochastic depth, the encoder layer and encoder, and the packing of
visible tokens for masked image modelling.

This file is part of the remote-code bundle pushed to the Hub: it imports only the standard library, torch,
transformers, safetensors and its siblings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS


def _host_reads_are_free(tensor: torch.Tensor) -> bool:
    """Whether reading `tensor`'s values on the host costs nothing: a CPU tensor in eager mode. On an accelerator
    a read (`bool(t.all())`, `int(t.max())`) waits for every queued kernel, so optional fast paths that need one
    (skipping an all-ones mask) are only taken on CPU."""
    return tensor.device.type == "cpu" and not torch.compiler.is_compiling()


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(Q K^T * scaling + mask) V. Shapes: q `(B, H, Lq, D)`, k/v `(B, H, Lk, D)`, mask `(B, 1, 1|Lq, Lk)`;
    returns `(B, Lq, H, D)` and the attention weights `(B, H, Lq, Lk)`."""
    attn_weights = torch.matmul(query, key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    elif getattr(module, "is_causal", False) and query.shape[2] > 1:
        # no mask on a causal module means an unpadded prefill without cache (see `_causal_mask`)
        future = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device).triu(1)
        attn_weights = attn_weights.masked_fill(future, torch.finfo(attn_weights.dtype).min)
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


def _additive_padding_mask(attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """`(B, L)` 1/0 key-padding mask -> additive `(B, 1, 1, L)` mask, or None when nothing is padded (so sdpa can
    take its unmasked fast path). Whether anything is padded is only looked at on CPU (`_host_reads_are_free`):
    compiled or on an accelerator the mask is always built, so nothing waits for the device."""
    if attention_mask is None or (_host_reads_are_free(attention_mask) and bool(attention_mask.all())):
        return None
    mask = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
    mask = mask.masked_fill(attention_mask == 0, torch.finfo(dtype).min)
    return mask[:, None, None, :]


@dataclass
class _TokenPacking:
    """Where the real tokens of a right- or left-padded `(B, L)` batch lie, so that the token-wise work of a layer
    (LayerNorm, projections, MLP) runs on the `N` real tokens alone, as in unpadded BERT training (Portes et al.
    2023, MosaicBERT); only the attention core sees the padded `(B, L)` layout. Skipped tokens are padding, which
    the key mask hides from every real token, so the real tokens' outputs do not change."""

    index: torch.Tensor  # (N,) positions of the real tokens in the flattened (B * L) layout
    batch_size: int
    length: int

    @classmethod
    def from_mask(cls, attention_mask: torch.Tensor) -> _TokenPacking:
        """From a `(B, L)` 1/0 mask with some padding."""
        batch_size, length = attention_mask.shape
        return cls(attention_mask.reshape(-1).nonzero().squeeze(1), batch_size, length)

    @classmethod
    def when_skipped(
        cls,
        attention_mask: torch.Tensor | None,
        padded: bool,
        skip_padding: bool | None,
        device: torch.device,
        inspected: bool,
    ) -> _TokenPacking | None:
        """The packing of a `padded` batch when its padding is skipped, else None: a module's `skip_padding` (None:
        on CPU only, where gathering the real tokens needs no device synchronisation), never under `torch.compile`
        (no data-dependent shapes) nor when hidden states or attentions are `inspected` (they are then the padded
        computation's own tensors)."""
        skip = device.type == "cpu" if skip_padding is None else skip_padding
        if not (padded and skip) or inspected or torch.compiler.is_compiling():
            return None
        return cls.from_mask(attention_mask)

    def unpad(self, tokens: torch.Tensor) -> torch.Tensor:
        """`(B, L, C)` -> `(N, C)`."""
        return tokens.reshape(self.batch_size * self.length, -1).index_select(0, self.index)

    def pad(self, tokens: torch.Tensor) -> torch.Tensor:
        """`(N, C)` -> `(B, L, C)`, zeros at the padding."""
        padded = tokens.new_zeros(self.batch_size * self.length, tokens.shape[-1]).index_copy(0, self.index, tokens)
        return padded.view(self.batch_size, self.length, -1)

    def sequence_index(self) -> torch.Tensor:
        """`(N,)` the row (sequence) of the batch each real token belongs to."""
        return torch.div(self.index, self.length, rounding_mode="floor")


def _visible_first(bool_masked_pos: torch.Tensor) -> torch.Tensor:
    """`(B, N)` mask -> `(B, N)` patch indices, each row's unmasked patches first, in their original order."""
    return torch.argsort(bool_masked_pos.to(torch.uint8), dim=1, stable=True)


def _keep_visible(tokens: torch.Tensor, bool_masked_pos: torch.Tensor) -> torch.Tensor:
    """`(B, N, D)` tokens and a `(B, N)` mask with the same number of True entries per row -> the unmasked tokens
    `(B, N - num_masked, D)`, in their original order. The number kept (a shape) is the one host read; the tokens
    are gathered by index (no boolean indexing, whose forward and backward each read the mask on the host)."""
    if bool_masked_pos.shape != tokens.shape[:2]:
        raise ValueError(
            f"bool_masked_pos must have shape (batch_size, num_patches)={tuple(tokens.shape[:2])}, got "
            f"{tuple(bool_masked_pos.shape)}."
        )
    counts = (~bool_masked_pos.bool()).sum(dim=1)
    fewest, most = torch.stack([counts.min(), counts.max()]).tolist()
    if fewest != most:
        raise ValueError(
            f"bool_masked_pos must mask the same number of patches in every image (got {fewest} to {most} visible); "
            "use xmodal.random_patch_mask."
        )
    index = _visible_first(bool_masked_pos)[:, :fewest]  # (B, num_visible)
    return tokens.gather(1, index[:, :, None].expand(-1, -1, tokens.shape[-1]))


def _restore_visible(visible: torch.Tensor, bool_masked_pos: torch.Tensor) -> torch.Tensor:
    """The inverse of `_keep_visible`: `(B, num_visible, D)` tokens and the `(B, N)` mask -> `(B, N, D)` with each
    token back in its place and zeros at the masked positions (scattered by index, no host read)."""
    batch_size, num_patches = bool_masked_pos.shape
    index = _visible_first(bool_masked_pos)[:, : visible.shape[1], None].expand(-1, -1, visible.shape[-1])
    return visible.new_zeros(batch_size, num_patches, visible.shape[-1]).scatter(1, index, visible)


def _causal_mask(
    attention_mask: torch.Tensor | None, query_length: int, past_length: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor | None:
    """Additive `(B, 1, Lq, past + Lq)` mask for causal self-attention over a cache of `past_length` tokens, or None
    where the attention modules' own causal flag suffices (nothing padded, and no cache or one query). Off CPU any
    given mask counts as padded (no host read, see `_additive_padding_mask`)."""
    padded = attention_mask is not None and not (_host_reads_are_free(attention_mask) and bool(attention_mask.all()))
    if not padded and (past_length == 0 or query_length == 1):
        return None
    key_length = past_length + query_length
    positions = torch.arange(key_length, device=device)
    future = positions[None, :] > (positions[past_length:, None])  # (Lq, Lk)
    blocked = future[None, None]
    if padded:
        blocked = blocked | (attention_mask[:, None, None, -key_length:] == 0)
    return torch.zeros(blocked.shape, dtype=dtype, device=device).masked_fill(blocked, torch.finfo(dtype).min)


class XModalAttention(nn.Module):
    """Multi-head attention through transformers' attention interface (sdpa by default, eager available).

    Self-attention uses one fused QKV projection; cross-attention (`is_cross_attention=True`) projects the
    queries from `hidden_states` and the keys/values from `encoder_hidden_states`. Causal self-attention
    (`is_causal=True`, the captioning decoder) appends its keys/values to a transformers `Cache` when one is given.
    """

    def __init__(
        self,
        config: PreTrainedConfig,
        is_cross_attention: bool = False,
        is_causal: bool = False,
        layer_idx: int | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.embed_dim // self.num_heads
        self.scaling = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        self.is_causal = is_causal
        self.layer_idx = layer_idx
        self.is_cross_attention = is_cross_attention
        if is_cross_attention:
            self.q_proj = nn.Linear(self.embed_dim, self.embed_dim)
            self.kv_proj = nn.Linear(self.embed_dim, 2 * self.embed_dim)
        else:
            self.qkv_proj = nn.Linear(self.embed_dim, 3 * self.embed_dim)
        self.out_proj = nn.Linear(self.embed_dim, self.embed_dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        cache: Cache | None = None,
        encoder_index: torch.Tensor | None = None,
        packing: _TokenPacking | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`hidden_states` `(B, Lq, C)`, `encoder_hidden_states` `(B, Lk, C)` (or `(M, Lk, C)` with `encoder_index`
        `(B,)` picking row `encoder_index[b]` for query row b: each context is projected once however often it is
        used), additive `attention_mask` `(B, 1, 1 | Lq, Lk)` -> the output `(B, Lq, C)` and the attention weights
        `(B, H, Lq, Lk)` (None unless the implementation computes them, as eager does; asking sdpa for them with
        `output_attentions=True` warns, as in transformers). With `packing` (uncached self-attention, or the queries of
        cross-attention), `hidden_states` are the `(N, C)` real tokens of a padded batch and so is the output."""
        if packing is not None and not self.is_cross_attention:  # uncached self-attention (text tower, fusion)
            qkv = packing.pad(self.qkv_proj(hidden_states))  # (N, 3C) -> (B, L, 3C), the projection on real tokens
            batch_size, query_length = packing.batch_size, packing.length
            query, key, value = qkv.view(batch_size, query_length, 3, self.num_heads, self.head_dim).unbind(dim=2)
            attended, weights = self._attend(query, key, value, attention_mask, output_attentions=output_attentions)
            return self.out_proj(packing.unpad(attended)), weights
        if self.is_cross_attention:
            if packing is not None:  # the queries are the (N, C) real tokens: projected unpadded, attended padded
                batch_size, query_length = packing.batch_size, packing.length
                query = packing.pad(self.q_proj(hidden_states))
            else:
                batch_size, query_length, _ = hidden_states.shape
                query = self.q_proj(hidden_states)
            query = query.view(batch_size, query_length, self.num_heads, self.head_dim)
            key_length = encoder_hidden_states.shape[1]
            kv = self.kv_proj(encoder_hidden_states)
            if encoder_index is not None:
                # index_select, not kv[encoder_index]: its backward is an index_add (8x faster on CPU than the
                # index_put that advanced indexing backpropagates through)
                kv = kv.index_select(0, encoder_index)
            kv = kv.view(batch_size, key_length, 2, self.num_heads, self.head_dim)
            key, value = kv.unbind(dim=2)
        else:
            batch_size, query_length, _ = hidden_states.shape
            qkv = self.qkv_proj(hidden_states).view(batch_size, query_length, 3, self.num_heads, self.head_dim)
            query, key, value = qkv.unbind(dim=2)
        attended, weights = self._attend(query, key, value, attention_mask, cache, output_attentions)
        if packing is not None:
            attended = packing.unpad(attended)  # (B, L, C) -> (N, C)
        return self.out_proj(attended), weights

    def _attend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-head `query` `(B, Lq, H, D)`, `key`/`value` `(B, Lk, H, D)` -> attention output `(B, Lq, C)`, before
        the output projection, and the attention weights `(B, H, Lq, Lk)` when the implementation gives them."""
        batch_size, query_length = query.shape[:2]
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # (B, H, L, D)
        if cache is not None and not self.is_cross_attention:
            key, value = cache.update(key, value, self.layer_idx)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            scaling=self.scaling,
            dropout=self.dropout if self.training else 0.0,
            **({"output_attentions": True} if output_attentions else {}),
        )
        return attn_output.reshape(batch_size, query_length, self.embed_dim), attn_weights


def _gelu_(tensor: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.gelu_(tensor)


def _gelu_tanh_(tensor: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.gelu_(tensor, approximate="tanh")


def _silu_(tensor: torch.Tensor) -> torch.Tensor:
    return F.silu(tensor, inplace=True)


_INPLACE_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": _gelu_,
    "gelu_pytorch_tanh": _gelu_tanh_,
    "relu": torch.relu_,
    "silu": _silu_,
    "swish": _silu_,
}
"""In-place kernels that compute exactly what `ACT2FN[name]` computes, for the activations that have one."""


class XModalMLP(nn.Module):
    """Two-layer feed-forward block: `(B, L, C)` -> `(B, L, C)`.

    Without autograd (inference), activations with an in-place kernel (`_INPLACE_ACTIVATIONS`) overwrite `fc1`'s
    output instead of allocating a second `(B, L, intermediate_size)` tensor, the largest of the layer: 1.07-1.11x
    image embeddings/s at the tiny preset, batch 64, on CPU (bench/inference.py). The result is the same."""

    def __init__(self, config: PreTrainedConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.activation_fn = ACT2FN[config.hidden_act]
        self.inplace_activation_fn = _INPLACE_ACTIVATIONS.get(config.hidden_act)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.fc1(hidden_states)
        if self.inplace_activation_fn is not None and not torch.is_grad_enabled():
            hidden_states = self.inplace_activation_fn(hidden_states)
        else:
            hidden_states = self.activation_fn(hidden_states)
        return self.fc2(hidden_states)


def _drop_path_rates(drop_path_rate: float, depth: int) -> list[float]:
    """The stochastic depth rate of each of `depth` blocks, rising linearly from 0 at the first to `drop_path_rate`
    at the last (timm's `torch.linspace(0, drop_path_rate, depth)`, in float64 so that a rate just below 1 stays
    below 1)."""
    return [rate.item() for rate in torch.linspace(0.0, float(drop_path_rate), depth, dtype=torch.float64)]


class XModalDropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016) of a residual branch, as timm's `DropPath`: in training, each sample's
    branch output is zeroed with probability `drop_prob` and the kept ones are scaled by `1 / (1 - drop_prob)`, so
    the expected output is the input; the identity in eval mode or at `drop_prob=0` (no random numbers drawn).

    The per-sample mask is drawn from the global torch RNG on the tensor's device: `(B, 1, ..., 1)` for `(B, ...)`.
    With `packing`, the input is the `(N, C)` real tokens of a padded batch of B sequences: the `(B,)` mask is
    drawn as for the padded `(B, L, C)` layout (the same random numbers) and expanded to each token's sequence.
    """

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"XModalDropPath.drop_prob must be in [0, 1), got {drop_prob!r}.")
        self.drop_prob = drop_prob

    def forward(self, hidden_states: torch.Tensor, packing: _TokenPacking | None = None) -> torch.Tensor:
        """`hidden_states` `(B, ...)`, or `(N, C)` with `packing` -> the same shape."""
        if self.drop_prob == 0.0 or not self.training:
            return hidden_states
        keep_prob = 1.0 - self.drop_prob
        batch_size = packing.batch_size if packing is not None else hidden_states.shape[0]
        mask = hidden_states.new_empty(batch_size).bernoulli_(keep_prob).div_(keep_prob)  # (B,)
        if packing is not None:
            mask = mask.index_select(0, packing.sequence_index())  # (N,)
        return hidden_states * mask.view(-1, *([1] * (hidden_states.ndim - 1)))

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:g}"


class XModalEncoderLayer(GradientCheckpointingLayer):
    """Pre-LayerNorm transformer block: x + SelfAttn(LN(x)) [+ CrossAttn(LN(x), LN(context))] + MLP(LN(x)).

    With `has_cross_attention=True` it is a fusion layer: the queries come from `hidden_states` and the
    keys/values from `encoder_hidden_states` (the other modality), as in ALBEF/BLIP. With `is_causal=True` the
    self-attention is causal and cached (a decoder layer). With `drop_path_rate > 0`, each residual branch goes
    through [`XModalDropPath`] after its dropout (stochastic depth; drawn independently per branch, as in timm);
    at 0 there is no such module.
    """

    def __init__(
        self,
        config: PreTrainedConfig,
        has_cross_attention: bool = False,
        is_causal: bool = False,
        layer_idx: int | None = None,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = XModalAttention(config, is_causal=is_causal, layer_idx=layer_idx)
        self.has_cross_attention = has_cross_attention
        if has_cross_attention:
            self.cross_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
            self.context_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
            self.cross_attn = XModalAttention(config, is_cross_attention=True)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = XModalMLP(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.drop_path = XModalDropPath(drop_path_rate) if drop_path_rate > 0 else None

    def _residual_branch(self, branch: torch.Tensor, packing: _TokenPacking | None = None) -> torch.Tensor:
        """Dropout, then stochastic depth (when configured), of a branch output `(B, L, C)` (or `(N, C)`)."""
        branch = self.dropout(branch)
        return branch if self.drop_path is None else self.drop_path(branch, packing)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        encoder_index: torch.Tensor | None = None,
        packing: _TokenPacking | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """`hidden_states` `(B, L, C)`, or the `(N, C)` real tokens with `packing`; masks are additive
        `(B, 1, 1 | L, Lk)`; `encoder_hidden_states` `(B, Lk, C)`, or `(M, Lk, C)` indexed by `encoder_index` `(B,)`
        (unpadded contexts only). Returns the layer's output (the shape of `hidden_states`), its self-attention
        weights `(B, H, L, L)` and cross-attention weights `(B, H, L, Lk)` (None where not computed, see
        [`XModalAttention`])."""
        attended, self_weights = self.self_attn(
            self.layer_norm1(hidden_states),
            attention_mask,
            cache=cache,
            packing=packing,
            output_attentions=output_attentions,
        )
        hidden_states = hidden_states + self._residual_branch(attended, packing)
        cross_weights = None
        if self.has_cross_attention:
            context = self.context_layer_norm(encoder_hidden_states)
            cross, cross_weights = self.cross_attn(
                self.cross_layer_norm(hidden_states),
                encoder_attention_mask,
                context,
                encoder_index=encoder_index,
                packing=packing,
                output_attentions=output_attentions,
            )
            hidden_states = hidden_states + self._residual_branch(cross, packing)
        hidden_states = hidden_states + self._residual_branch(self.mlp(self.layer_norm2(hidden_states)), packing)
        return hidden_states, self_weights, cross_weights


class XModalEncoder(nn.Module):
    """A stack of `num_hidden_layers` [`XModalEncoderLayer`] blocks, with stochastic depth rising linearly from 0 at
    the first block to `config.drop_path_rate` (when the config has one) at the last, and causal self-attention
    when `config.is_causal` is set (uncached: the whole sequence at once)."""

    def __init__(self, config: PreTrainedConfig) -> None:
        super().__init__()
        rates = _drop_path_rates(getattr(config, "drop_path_rate", 0.0), config.num_hidden_layers)
        is_causal = getattr(config, "is_causal", False)
        self.layers = nn.ModuleList(
            [XModalEncoderLayer(config, is_causal=is_causal, drop_path_rate=rate) for rate in rates]
        )

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        packing: _TokenPacking | None = None,
        output_attentions: bool = False,
    ) -> BaseModelOutput:
        """`hidden_states` `(B, L, C)` and an additive `attention_mask` `(B, 1, 1, L)`. With `packing`, the layers run
        on the `(N, C)` real tokens of the padded batch and `last_hidden_state` is `(N, C)` (the towers run padded
        when hidden states are asked for, so that these are the tensors of the computation).

        `hidden_states` (with `output_hidden_states`): the input of the first layer, then each layer's output,
        `num_hidden_layers + 1` tensors; `attentions` (with `output_attentions`): each layer's attention weights
        `(B, H, L, L)`, as CLIP returns them."""
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.layers:
            hidden_states, weights, _ = layer(
                hidden_states, attention_mask, packing=packing, output_attentions=output_attentions
            )
            if output_hidden_states:
                all_hidden_states = all_hidden_states + (hidden_states,)
            if output_attentions and weights is not None:
                all_attentions = all_attentions + (weights,)
        return BaseModelOutput(
            last_hidden_state=hidden_states, hidden_states=all_hidden_states, attentions=all_attentions
        )


class XModalPreTrainedSubModel(PreTrainedModel):
    """The base of xmodal's sub-models: the image and text towers, the fusion module and the two decoders are each a
    `PreTrainedModel` on their own sub-config (`vision_config`, `text_config`, `cross_config`, `decoder_config`,
    `mim_decoder_config`), as CLIP's and BLIP's towers are. transformers then dispatches the attention implementation
    per sub-config: `from_pretrained(..., attn_implementation={"vision_config": "sdpa", "text_config": "eager"})` and
    `model.set_attn_implementation(...)` reach every sub-model, each checked against what it supports."""

    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_attention_backend = True
    _no_split_modules = ["XModalEncoderLayer"]


__all__ = [
    "XModalAttention",
    "XModalDropPath",
    "XModalEncoder",
    "XModalEncoderLayer",
    "XModalMLP",
    "XModalPreTrainedSubModel",
    "eager_attention_forward",
]
