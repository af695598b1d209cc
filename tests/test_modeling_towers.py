"""The text tower, the fusion module's text stream and the captioning decoder (training) skip padding (`_TokenPacking`): a padded batch gives each
caption's outputs as if it ran alone, the same losses and gradients as the padded computation, zeros at the padding,
and works with left padding, gradient checkpointing, hidden states and the multi-task model."""

from __future__ import annotations

import pytest
import torch

from xmodal import XModalForPreTraining, XModalModel


def _padded_and_reference(model: XModalModel, inputs: dict[str, torch.Tensor]) -> tuple[object, object]:
    """Text features of the padded batch, skipping the padding and computing it (`skip_padding = False`)."""
    text = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    skipped = model.get_text_features(**text, output_hidden_states=True)
    model.text_model.skip_padding = False
    try:
        computed = model.get_text_features(**text, output_hidden_states=True)
    finally:
        model.text_model.skip_padding = None
    return skipped, computed


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_each_caption_as_if_alone(tester, pooling: str) -> None:
    model = XModalModel(tester.get_config(text_pooling=pooling)).eval()
    inputs = tester.get_inputs()
    with torch.no_grad():
        batch = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        for row, length in enumerate(inputs["attention_mask"].sum(dim=1).tolist()):
            alone = model.get_text_features(input_ids=inputs["input_ids"][row : row + 1, :length])
            torch.testing.assert_close(batch.pooler_output[row], alone.pooler_output[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(
                batch.last_hidden_state[row, :length], alone.last_hidden_state[0], atol=1e-5, rtol=1e-5
            )
            # the padding positions are not computed: zeros
            assert torch.count_nonzero(batch.last_hidden_state[row, length:]) == 0


def test_same_outputs_as_the_padded_computation(tester) -> None:
    model = XModalModel(tester.get_config()).eval()
    inputs = tester.get_inputs()
    mask = inputs["attention_mask"].bool()
    with torch.no_grad():
        skipped, computed = _padded_and_reference(model, inputs)
    torch.testing.assert_close(skipped.pooler_output, computed.pooler_output, atol=1e-5, rtol=1e-5)
    assert len(skipped.hidden_states) == len(computed.hidden_states) == tester.num_layers + 1
    # asked for hidden states, the tower runs padded: they are the tensors of the computation (as CLIP's), padding
    # positions included
    for ours, theirs in zip(skipped.hidden_states, computed.hidden_states):
        assert ours.shape == theirs.shape == (tester.batch_size, tester.seq_length, tester.hidden_size)
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
        assert torch.count_nonzero(ours[~mask]) > 0


def test_left_padding(tester) -> None:
    # mean pooling: [CLS] pooling of a left-padded row would read a padding position in either path
    model = XModalModel(tester.get_config(text_pooling="mean")).eval()
    inputs = tester.get_inputs()
    lengths = inputs["attention_mask"].sum(dim=1)
    # move each caption to the right end of its row
    left_ids = torch.zeros_like(inputs["input_ids"])
    left_mask = torch.zeros_like(inputs["attention_mask"])
    for row, length in enumerate(lengths.tolist()):
        left_ids[row, -length:] = inputs["input_ids"][row, :length]
        left_mask[row, -length:] = 1
    with torch.no_grad():
        left = model.get_text_features(input_ids=left_ids, attention_mask=left_mask)
        model.text_model.skip_padding = False
        reference = model.get_text_features(input_ids=left_ids, attention_mask=left_mask)
    torch.testing.assert_close(left.pooler_output, reference.pooler_output, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_same_loss_and_gradients(tester, checkpointing: bool) -> None:
    torch.manual_seed(0)
    model = XModalModel(tester.get_config())
    if checkpointing:
        model.activation_checkpointing_enable()
    model.train()
    inputs = tester.get_inputs()
    results = []
    for skip in (True, False):
        model.text_model.skip_padding = skip
        model.zero_grad(set_to_none=True)
        loss = model(**inputs, return_loss=True).loss
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    (loss, grads), (reference_loss, reference_grads) = results
    torch.testing.assert_close(loss, reference_loss, atol=1e-6, rtol=1e-5)
    assert grads.keys() == reference_grads.keys()
    assert {name for name, _ in model.text_model.named_parameters(prefix="text_model")} <= grads.keys()
    for name, grad in grads.items():
        assert torch.isfinite(grad).all(), name
        torch.testing.assert_close(grad, reference_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_unpadded_batch_takes_the_plain_path(tester) -> None:
    """Without padding nothing is gathered: the outputs are bitwise those of `skip_padding = False`."""
    model = XModalModel(tester.get_config()).eval()
    inputs = tester.get_inputs(padded=False)
    with torch.no_grad():
        skipped, computed = _padded_and_reference(model, inputs)
    assert torch.equal(skipped.last_hidden_state, computed.last_hidden_state)


def _fusion_inputs(tester, model: XModalModel) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    inputs = tester.get_inputs()
    image = model.vision_model(inputs["pixel_values"]).last_hidden_state
    text = model.text_model(inputs["input_ids"], inputs["attention_mask"]).last_hidden_state
    return image, text, inputs["attention_mask"]


@pytest.mark.parametrize("paired", [False, True])
def test_fusion_text_stream_skips_padding(tester, paired: bool) -> None:
    """The fusion module's text stream on the real tokens only gives the padded computation's pooled output and
    tokens, zeros at the padding; also when several texts share an image (`image_index`)."""
    model = XModalModel(tester.get_config()).eval()
    with torch.no_grad():
        image, text, mask = _fusion_inputs(tester, model)
        index = torch.zeros(text.shape[0], dtype=torch.long) if paired else None
        skipped = model.fuse(image[:1] if paired else image, text, mask, image_index=index)
        model.cross_model.skip_padding = False
        computed = model.fuse(image[:1] if paired else image, text, mask, image_index=index)
    real = mask.bool()
    torch.testing.assert_close(skipped.pooler_output, computed.pooler_output, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        skipped.text_last_hidden_state[real], computed.text_last_hidden_state[real], atol=1e-5, rtol=1e-5
    )
    assert torch.count_nonzero(skipped.text_last_hidden_state[~real]) == 0
    assert torch.count_nonzero(computed.text_last_hidden_state[~real]) > 0  # the test pads some rows


def test_fusion_asked_for_hidden_states_runs_padded(tester) -> None:
    model = XModalModel(tester.get_config()).eval()
    with torch.no_grad():
        image, text, mask = _fusion_inputs(tester, model)
        inspected = model.fuse(image, text, mask, output_hidden_states=True)
    assert torch.count_nonzero(inspected.text_last_hidden_state[~mask.bool()]) > 0


def test_captioning_decoder_skips_padding_without_a_cache(tester) -> None:
    """Training (no cache): the decoder's real tokens are those of the padded computation, zeros at the padding."""
    model = XModalForPreTraining(tester.get_config()).eval()
    inputs = tester.get_inputs()
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with torch.no_grad():
        image = model.vision_model(inputs["pixel_values"]).last_hidden_state
        skipped = model.text_decoder(ids, image, mask).last_hidden_state
        model.text_decoder.skip_padding = False
        computed = model.text_decoder(ids, image, mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(skipped[real], computed[real], atol=1e-5, rtol=1e-5)
    assert torch.count_nonzero(skipped[~real]) == 0 and torch.count_nonzero(computed[~real]) > 0


def test_multitask_losses_unchanged(tester) -> None:
    """Every objective of the pretraining model (MLM, ITM, VQA, captioning, fusion on the text tokens) gives the same
    losses and gradients, with the text tower and the fusion module skipping the padding or computing it."""
    torch.manual_seed(0)
    model = XModalForPreTraining(tester.get_config(num_labels=5)).train()
    inputs = tester.get_pretraining_inputs(num_labels=5)
    results = []
    for skip in (True, False):
        model.text_model.skip_padding = model.cross_model.skip_padding = model.text_decoder.skip_padding = skip
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same MLM masks and ITM negatives
        output = model(**inputs, return_loss=True)
        output.loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results.append((output.loss.detach(), grads))
    (loss, grads), (reference_loss, reference_grads) = results
    torch.testing.assert_close(loss, reference_loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == reference_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], atol=1e-5, rtol=1e-4, msg=name)
