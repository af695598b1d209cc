"""The multi-task training step reads tensor values on the host (a device synchronisation on an accelerator) only
where it must: once for all id ranges, once for the MLM target positions and once for the MIM visible count.

On CPU such reads are free, so the model also uses them for fast paths (skipping an all-ones mask);
`_host_reads_are_free` is patched to False here to run the accelerator policy on the CPU."""

from __future__ import annotations

import collections
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from xmodal import XModalForPreTraining, layers, masked_language_modeling_loss, random_patch_mask
from xmodal.layers import _keep_visible, _restore_visible

# ops that read a tensor's values on the host (`bool(t)`, `int(t)`, `t.item()`, data-dependent output shapes)
_READS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.masked_select.default"}
_BOOLEAN_INDEXING = {"aten.index.Tensor", "aten.index_put.default", "aten.index_put_.default"}


class _HostReads(TorchDispatchMode):
    """Counts host reads by the xmodal line that caused them."""

    def __init__(self) -> None:
        super().__init__()
        self.where: collections.Counter[str] = collections.Counter()

    def record(self) -> None:
        frames = [frame for frame in traceback.extract_stack() if "modeling_xmodal" in frame.filename]
        self.where[f"{frames[-1].lineno}: {frames[-1].line}" if frames else "autograd"] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = str(func)
        boolean_index = name in _BOOLEAN_INDEXING and any(
            isinstance(index, torch.Tensor) and index.dtype == torch.bool for index in args[1] if index is not None
        )
        if name in _READS or boolean_index:
            self.record()
        return func(*args, **(kwargs or {}))


@contextmanager
def _count_host_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[_HostReads]:
    """`tolist` reads without dispatching an op: it is counted by a wrapper."""
    counter = _HostReads()
    tolist = torch.Tensor.tolist

    def counted_tolist(tensor: torch.Tensor) -> object:
        counter.record()
        return tolist(tensor)

    with monkeypatch.context() as patch:
        patch.setattr(torch.Tensor, "tolist", counted_tolist)
        with counter:
            yield counter


def _every_objective(tester) -> tuple[XModalForPreTraining, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = XModalForPreTraining(tester.get_config(num_labels=5)).train()
    inputs = tester.get_pretraining_inputs(num_labels=5)
    inputs["second_view_input_ids"] = inputs["input_ids"].flip(1)
    inputs["second_view_attention_mask"] = inputs["attention_mask"].flip(1)
    inputs["second_view_pixel_values"] = inputs["pixel_values"].flip(3)
    for name in ("itm", "mlm", "mim", "captioning", "vqa"):
        assert getattr(model.config, f"{name}_loss_weight") > 0, name
    return model, inputs


def _step(model: XModalForPreTraining, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same masks and negatives
    loss = model(**inputs, return_loss=True).loss
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_the_multitask_step_reads_the_device_three_times(tester, monkeypatch) -> None:
    model, inputs = _every_objective(tester)
    # the accelerator default
    model.text_model.skip_padding = model.cross_model.skip_padding = model.text_decoder.skip_padding = False
    reference_loss, reference_grads = _step(model, inputs)  # the CPU policy
    monkeypatch.setattr(layers, "_host_reads_are_free", lambda tensor: False)
    with _count_host_reads(monkeypatch) as reads:
        loss, grads = _step(model, inputs)
    lines = sorted(reads.where)
    assert sum(reads.where.values()) == 3, reads.where
    assert any("_check_ranges" in line or "the one device sync" in line for line in lines), lines
    assert any("nonzero" in line for line in lines), lines  # the MLM targets
    assert any("counts.min()" in line for line in lines), lines  # the MIM visible count
    # the masks built without looking give the same step
    torch.testing.assert_close(loss, reference_loss, atol=1e-6, rtol=1e-6)
    assert grads.keys() == reference_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize(
    ("field", "message"),
    [
        ("input_ids", r"input_ids hold ids from .* the text tower accepts \[0, 99\)"),
        ("second_view_input_ids", r"second_view_input_ids hold ids from .* accepts \[0, 99\)"),
        ("question_input_ids", r"question_input_ids hold ids from .* accepts \[0, 99\)"),
        ("mlm_input_ids", r"mlm_input_ids hold ids from .* accepts \[0, 99\)"),
        ("decoder_input_ids", r"decoder input_ids hold ids from .* the captioning decoder accepts \[0, 99\)"),
        ("vqa_labels", r"VQA answer indices hold ids from 0 to 7 .* the VQA head accepts \[0, 5\)"),
    ],
)
def test_the_single_range_check_names_the_bad_input(tester, field, message) -> None:
    model, inputs = _every_objective(tester)
    inputs["mlm_input_ids"] = inputs["input_ids"].clone()
    inputs["mlm_labels"] = torch.full_like(inputs["input_ids"], -100)
    inputs["decoder_input_ids"] = inputs["input_ids"].clone()
    if field == "vqa_labels":
        inputs["vqa_labels"] = torch.tensor([0, 7, 1])
    else:
        inputs[field] = inputs[field if field in inputs else "input_ids"].clone()
        inputs[field][0, 0] = 120
    with pytest.raises(ValueError, match=message):
        model(**inputs, return_loss=True)


def test_keep_and_restore_visible_gather_and_scatter_the_unmasked_tokens_in_order() -> None:
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(4, 9, 3, generator=generator, requires_grad=True)
    mask = random_patch_mask(4, 9, 0.5, generator=generator)
    kept = _keep_visible(tokens, mask)
    torch.testing.assert_close(kept, tokens[~mask].reshape(4, -1, 3), rtol=0, atol=0)
    kept.sum().backward()
    torch.testing.assert_close(tokens.grad, (~mask)[:, :, None].float().expand_as(tokens))
    restored = _restore_visible(kept, mask)
    torch.testing.assert_close(restored, tokens * (~mask)[:, :, None], rtol=0, atol=0)
    uneven = mask.clone()
    uneven[0] = False
    with pytest.raises(ValueError, match=r"mask the same number of patches in every image \(got 5 to 9 visible\)"):
        _keep_visible(tokens, uneven)


def test_mlm_loss_is_the_mean_over_targets_and_zero_without_any() -> None:
    logits = torch.randn(6, 11, requires_grad=True)
    labels = torch.tensor([3, -100, 0, 10, -100, 5])
    kept = labels != -100
    expected = torch.nn.functional.cross_entropy(logits[kept], labels[kept])
    torch.testing.assert_close(masked_language_modeling_loss(logits, labels), expected)
    none = masked_language_modeling_loss(logits, torch.full_like(labels, -100))
    none.backward()
    assert none.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))
