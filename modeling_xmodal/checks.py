"""Input checks at the model boundary (shapes and dtypes, plus one device sync for the range of the token ids)
and the loading policy of `XModalPreTrainedModel.from_pretrained`: safetensors only by default, clear errors for
damaged or mismatching weights.

This file is part of the remote-code bundle pushed to the Hub: it imports only the standard library, torch,
transformers, safetensors and its siblings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from safetensors import SafetensorError, safe_open
from transformers import PreTrainedConfig


def _check_pixel_values(pixel_values: object, num_channels: int | None) -> None:
    """Raise a `TypeError`/`ValueError` naming the problem unless `pixel_values` is a non-empty floating-point tensor
    of shape `(batch_size, num_channels, height, width)`. Values are not inspected (no device sync)."""
    if pixel_values is None:
        raise ValueError("pixel_values is required (a float tensor of shape (batch_size, 3, height, width)).")
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(
            f"pixel_values must be a torch.Tensor of shape (batch_size, num_channels, height, width), got a "
            f"{type(pixel_values).__name__}; convert images with the processor (return_tensors='pt')."
        )
    channels = num_channels if num_channels is not None else "num_channels"
    if pixel_values.ndim != 4 or (num_channels is not None and pixel_values.shape[1] != num_channels):
        hint = ""
        if pixel_values.ndim == 4 and pixel_values.shape[-1] == num_channels:
            hint = " It looks channels-last: use pixel_values.permute(0, 3, 1, 2)."
        elif pixel_values.ndim == 3:
            hint = " A single image needs a batch dimension: use pixel_values[None]."
        raise ValueError(
            f"pixel_values must have shape (batch_size, {channels}, height, width), got "
            f"{tuple(pixel_values.shape)}.{hint}"
        )
    if not pixel_values.is_floating_point():
        raise TypeError(
            f"pixel_values must be a floating-point tensor of normalised pixels, got dtype {pixel_values.dtype}: "
            "raw integer or boolean pixels must go through the image processor first."
        )
    if 0 in pixel_values.shape:
        raise ValueError(
            f"pixel_values is empty (shape {tuple(pixel_values.shape)}): a batch needs at least one image of at least "
            "one pixel."
        )


def _check_text_inputs(
    config: PreTrainedConfig,
    input_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    token_type_ids: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    check_values: bool = True,
) -> None:
    """Raise a `TypeError`/`ValueError` naming the problem for text inputs the text tower (`config`, any model type)
    cannot take: non-tensors, wrong ranks or dtypes, an empty batch or sequence, a mask or ids of another shape than
    `input_ids` `(batch_size, sequence_length)`, a sequence longer than `max_position_embeddings`, and, with
    `check_values`, ids outside the embedding tables (`_check_ranges`: one device sync for all id tensors)."""
    named = {
        "input_ids": input_ids,
        "inputs_embeds": inputs_embeds,
        "attention_mask": attention_mask,
        "token_type_ids": token_type_ids,
        "position_ids": position_ids,
    }
    for name, value in named.items():
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(
                f"{name} must be a torch.Tensor, got a {type(value).__name__}; tokenize with the processor "
                "(return_tensors='pt')."
            )
    for name in ("input_ids", "token_type_ids", "position_ids"):
        value = named[name]
        if value is not None and value.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be an integer tensor (int64 or int32), got dtype {value.dtype}.")
    reference = input_ids if input_ids is not None else inputs_embeds
    expected_rank = 2 if input_ids is not None else 3
    if reference.ndim != expected_rank:
        shape = (
            "(batch_size, sequence_length)" if input_ids is not None else "(batch_size, sequence_length, hidden_size)"
        )
        name = "input_ids" if input_ids is not None else "inputs_embeds"
        raise ValueError(f"{name} must have shape {shape}, got {tuple(reference.shape)}.")
    batch_size, length = reference.shape[:2]
    if batch_size == 0 or length == 0:
        raise ValueError(
            f"{'input_ids' if input_ids is not None else 'inputs_embeds'} is empty (shape {tuple(reference.shape)}): "
            "a batch needs at least one text of at least one token."
        )
    for name in ("attention_mask", "token_type_ids"):
        value = named[name]
        if value is not None and tuple(value.shape) != (batch_size, length):
            raise ValueError(
                f"{name} must have the shape of the tokens ({batch_size}, {length}), got {tuple(value.shape)}."
            )
    if position_ids is not None and (
        position_ids.ndim != 2 or position_ids.shape[1] != length or position_ids.shape[0] not in (1, batch_size)
    ):
        raise ValueError(
            f"position_ids must have shape ({batch_size}, {length}) or (1, {length}), got {tuple(position_ids.shape)}."
        )
    max_positions = getattr(config, "max_position_embeddings", None)
    if isinstance(max_positions, int) and length > max_positions:
        raise ValueError(
            f"Sequence length {length} exceeds max_position_embeddings={max_positions}; truncate the text "
            "(processor(..., truncation=True, max_length=...))."
        )
    if check_values:
        _check_ranges(_text_id_ranges(config, input_ids, token_type_ids, position_ids))


@dataclass
class _Range:
    """The values of `tensor` must lie in [0, `size`): `accepted_by` names who needs that and `what` the limit in the
    error, `hint` says how to fix it."""

    name: str
    tensor: torch.Tensor
    size: int
    what: str
    accepted_by: str = "the text tower"
    hint: str = ""


def _text_id_ranges(
    config: PreTrainedConfig,
    input_ids: torch.Tensor | None,
    token_type_ids: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    accepted_by: str = "the text tower",
    prefix: str = "",
) -> list[_Range]:
    """The embedding-table bounds of a text tower's (or decoder's) id tensors, for `_check_ranges`."""
    type_vocab_size = getattr(config, "type_vocab_size", None)
    tables = [
        ("input_ids", input_ids, getattr(config, "vocab_size", None), "vocab_size"),
        ("token_type_ids", token_type_ids, type_vocab_size or None, "type_vocab_size"),  # 0: no token types, ignored
        ("position_ids", position_ids, getattr(config, "max_position_embeddings", None), "max_position_embeddings"),
    ]
    hint = (
        f" The tokenizer does not match the model: its vocabulary must fit {accepted_by}'s vocab_size (after adding "
        "tokens, call model.resize_token_embeddings(len(tokenizer)))."
    )
    return [
        _Range(prefix + name, ids, size, f"{field}={size}", accepted_by, hint if name == "input_ids" else "")
        for name, ids, size, field in tables
        if ids is not None and isinstance(size, int) and ids.numel()
    ]


def _check_ranges(ranges: list[_Range]) -> None:
    """Raise a `ValueError` naming the first tensor with a value outside its [0, size). Reading values on the host
    waits for an accelerator to finish its queued work, so all tensors are read in one device synchronisation;
    nothing is read under `torch.compile` (a branch on values would break the graph; the eager call at the model
    boundary checks them)."""
    if not ranges or torch.compiler.is_compiling():
        return
    device = ranges[0].tensor.device
    extremes = [torch.stack([check.tensor.min(), check.tensor.max()]).long().to(device) for check in ranges]
    bounds = torch.stack(extremes).tolist()  # the one device sync
    for check, (low, high) in zip(ranges, bounds, strict=True):
        if low < 0 or high >= check.size:
            raise ValueError(
                f"{check.name} hold ids from {low} to {high} (max id {high}); {check.accepted_by} accepts "
                f"[0, {check.size}) ({check.what}).{check.hint}"
            )


_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def _pickle_refusal(where: str, files: list[str]) -> str:
    return (
        f"{where} has no safetensors weights, only pickle-based files ({', '.join(files)}). xmodal loads safetensors "
        "only by default, because unpickling a file can execute arbitrary code. If you trust the files, pass "
        "use_safetensors=False: pytorch_model.bin is then read with torch.load(weights_only=True), which accepts "
        "tensors only. Better, convert the weights once: safetensors.torch.save_file(torch.load(path, "
        "weights_only=True), 'model.safetensors', metadata={'format': 'pt'})."
    )


def _refuse_pickle_only(path: str, subfolder: str) -> None:
    """Raise `OSError` if the local `path` is a pickle file, or a folder with pickle-based weights and no
    safetensors ones (a Hub id is checked by transformers, which is asked for safetensors only)."""
    if os.path.isfile(path) or os.path.isfile(os.path.join(subfolder, path)):
        if not path.endswith(".safetensors"):
            raise OSError(_pickle_refusal(f"The weights file {path!r}", [os.path.basename(path)]))
        return
    folder = os.path.join(path, subfolder)
    if not os.path.isdir(folder):
        return
    names = os.listdir(folder)
    if any(name.endswith((".safetensors", ".safetensors.index.json")) for name in names):
        return
    pickled = sorted(name for name in names if name.endswith(_PICKLE_SUFFIXES) or name.endswith(".bin.index.json"))
    if pickled:
        raise OSError(_pickle_refusal(f"The folder {folder!r}", pickled))


def _damaged_weights_file(path: str | None, subfolder: str) -> str:
    """The local safetensors file that cannot be opened (after a `SafetensorError`), or a description of it."""
    if path is None:
        return "the weights file"
    if os.path.isfile(path):
        return repr(path)
    folder = os.path.join(path, subfolder)
    if os.path.isdir(folder):
        for name in sorted(os.listdir(folder)):
            if name.endswith(".safetensors"):
                try:
                    with safe_open(os.path.join(folder, name), framework="pt"):
                        pass
                except SafetensorError:
                    return repr(os.path.join(folder, name))
    return f"the safetensors weights of {path!r}"


def _weights_source(path: str | None, subfolder: str, use_safetensors: bool) -> str:
    """How to name the weights that were loaded in an error: the local file transformers reads, else the repo."""
    if path is None:
        return "the given state_dict"
    if os.path.isfile(path):
        return repr(path)
    folder = os.path.join(path, subfolder)
    safe = ("model.safetensors", "model.safetensors.index.json")
    pickled = ("pytorch_model.bin", "pytorch_model.bin.index.json")
    for name in safe + pickled if use_safetensors else pickled + safe:
        if os.path.isfile(os.path.join(folder, name)):
            return repr(os.path.join(folder, name))
    return f"the weights of {path!r}"


def _check_pairs(logits_per_text: torch.Tensor) -> None:
    if logits_per_text.shape[0] != logits_per_text.shape[1]:
        raise ValueError(
            f"Losses over pairs need as many texts as images (text i describing image i), got "
            f"{logits_per_text.shape[0]} texts and {logits_per_text.shape[1]} images."
        )


# every helper here is internal to the models (imported by name by the sibling files)
__all__: list[str] = []
