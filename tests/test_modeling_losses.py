"""Objective tests: every loss and sampling helper checked against formulas computed by hand (explicit loops,
math.log / math.exp), plus the ITM, momentum-queue and multi-view objectives of `XModalForPreTraining`."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import XModalModelTester
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from xmodal import (
    XModalForPreTraining,
    XModalModel,
    causal_lm_loss,
    contrastive_loss,
    mask_tokens,
    masked_image_modeling_loss,
    masked_language_modeling_loss,
    negatives_contrastive_loss,
    nt_xent_loss,
    patchify,
    random_patch_mask,
    siglip_loss,
    vqa_loss,
)
from xmodal.heads import XModalMomentumEncoder
from xmodal.matching import _caption_keys, _itm_pairs

TOL = {"rtol": 1e-5, "atol": 1e-5}
ONLY_CONTRASTIVE = {
    "itm_loss_weight": 0,
    "mlm_loss_weight": 0,
    "mim_loss_weight": 0,
    "captioning_loss_weight": 0,
    "vqa_loss_weight": 0,
}


# ------------------------------------------------------------------------------------------------------------------
# hand-computed references (plain Python floats)
# ------------------------------------------------------------------------------------------------------------------


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


def _cross_entropy(rows: list[list[float]], labels: list[int], smoothing: float = 0.0) -> float:
    """mean_i [(1 - e) * -log p_i[y_i] + e * mean_c -log p_i[c]]."""
    total = 0.0
    for row, label in zip(rows, labels):
        lse = _logsumexp(row)
        nll = lse - row[label]
        uniform = sum(lse - value for value in row) / len(row)
        total += (1.0 - smoothing) * nll + smoothing * uniform
    return total / len(rows)


def _columns(rows: list[list[float]]) -> list[list[float]]:
    return [[rows[i][j] for i in range(len(rows))] for j in range(len(rows[0]))]


def _dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def _normalize(vector: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in vector))
    return [x / norm for x in vector]


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _close(actual: torch.Tensor | float, expected: float, tol: float = 1e-5) -> None:
    if isinstance(actual, torch.Tensor):
        actual = actual.detach()
    assert abs(float(actual) - expected) <= tol * max(1.0, abs(expected)), (float(actual), expected)


matrices = st.integers(2, 4).flatmap(
    lambda n: st.lists(st.lists(st.floats(-6, 6, allow_nan=False), min_size=n, max_size=n), min_size=n, max_size=n)
)


# ------------------------------------------------------------------------------------------------------------------
# 1-4: contrastive losses
# ------------------------------------------------------------------------------------------------------------------


def test_contrastive_loss_by_hand():
    rows = [[2.0, 0.5, -1.0], [0.3, 1.5, 0.2], [-0.5, 2.5, 0.7]]
    logits = torch.tensor(rows)
    labels = [0, 1, 2]
    expected = (_cross_entropy(rows, labels) + _cross_entropy(_columns(rows), labels)) / 2
    _close(contrastive_loss(logits), expected)
    # label smoothing 0.1: (1 - e) CE + e * mean over classes of -log p, in both directions
    smoothed = (_cross_entropy(rows, labels, 0.1) + _cross_entropy(_columns(rows), labels, 0.1)) / 2
    _close(contrastive_loss(logits, label_smoothing=0.1), smoothed)
    assert abs(smoothed - expected) > 1e-3  # the smoothing term does change the value
    # 2x2 fully by hand
    a, b, c, d = 1.0, -1.0, 0.5, 3.0
    forward = -math.log(math.exp(a) / (math.exp(a) + math.exp(b))) - math.log(
        math.exp(d) / (math.exp(c) + math.exp(d))
    )
    backward = -math.log(math.exp(a) / (math.exp(a) + math.exp(c))) - math.log(
        math.exp(d) / (math.exp(b) + math.exp(d))
    )
    _close(contrastive_loss(torch.tensor([[a, b], [c, d]])), (forward / 2 + backward / 2) / 2)


@settings(max_examples=25, deadline=None)
@given(rows=matrices, smoothing=st.sampled_from([0.0, 0.1, 0.3]))
def test_contrastive_loss_property(rows, smoothing):
    labels = list(range(len(rows)))
    expected = (_cross_entropy(rows, labels, smoothing) + _cross_entropy(_columns(rows), labels, smoothing)) / 2
    _close(contrastive_loss(torch.tensor(rows, dtype=torch.float64), label_smoothing=smoothing), expected, 1e-9)


def _two_cross_entropies(logits: torch.Tensor, smoothing: float) -> torch.Tensor:
    labels = torch.arange(logits.shape[0])
    return (
        F.cross_entropy(logits, labels, label_smoothing=smoothing)
        + F.cross_entropy(logits.t(), labels, label_smoothing=smoothing)
    ) / 2


@pytest.mark.parametrize("chunk_elements", [1 << 20, 7])
@pytest.mark.parametrize("size,smoothing", [(1, 0.0), (5, 0.0), (9, 0.1), (33, 0.3)])
def test_fused_contrastive_loss_gradient(monkeypatch, chunk_elements, size, smoothing):
    """The fused loss's own backward equals autograd through two cross-entropies, in float64, also when the rows are
    processed in chunks of one row (7 elements); torch's gradcheck agrees with finite differences."""
    from xmodal import losses as model_losses

    monkeypatch.setattr(model_losses, "_LOSS_CHUNK_ELEMENTS", chunk_elements)
    logits = torch.randn(size, size, dtype=torch.float64, generator=torch.Generator().manual_seed(size)) * 4
    logits.requires_grad_()
    fused = contrastive_loss(logits, smoothing)
    (fused_grad,) = torch.autograd.grad(fused * 1.5, logits)
    reference = _two_cross_entropies(logits, smoothing)
    (reference_grad,) = torch.autograd.grad(reference * 1.5, logits)
    torch.testing.assert_close(fused, reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fused_grad, reference_grad, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: contrastive_loss(x, smoothing), (logits,))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_contrastive_loss_half_precision(dtype):
    """16-bit logits are computed in fp32 (as autocast does for cross-entropy): an fp32 loss and a gradient in the
    input dtype, close to the fp32 result, finite at large logits."""
    logits = torch.randn(16, 16, generator=torch.Generator().manual_seed(0)) * 30
    low = logits.to(dtype).requires_grad_()
    loss = contrastive_loss(low)
    loss.backward()
    assert loss.dtype == torch.float32 and low.grad.dtype == dtype
    reference = logits.to(dtype).float().requires_grad_()
    _two_cross_entropies(reference, 0.0).backward()
    torch.testing.assert_close(loss, _two_cross_entropies(logits.to(dtype).float(), 0.0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(low.grad.float(), reference.grad, rtol=2e-2, atol=1e-3)
    assert torch.isfinite(low.grad).all()


def test_fused_contrastive_loss_refuses_non_square():
    with pytest.raises(ValueError, match=r"square logits matrix, got shape \(2, 3\)"):
        contrastive_loss(torch.zeros(2, 3))


def test_negatives_contrastive_loss_by_hand():
    positives = [1.0, -0.5, 2.0]
    negatives = [[0.0, 0.5, -1.0, 1.5], [-2.0, 0.3, 0.1, -0.4], [2.5, 1.0, 0.0, -3.0]]
    total = 0.0
    for p, row in zip(positives, negatives):
        total += -math.log(math.exp(p) / (math.exp(p) + sum(math.exp(n) for n in row)))
    _close(negatives_contrastive_loss(torch.tensor(positives), torch.tensor(negatives)), total / 3)


@settings(max_examples=25, deadline=None)
@given(rows=matrices, smoothing=st.sampled_from([0.0, 0.1]))
def test_negatives_loss_equals_in_batch_arrangement(rows, smoothing):
    """The in-batch InfoNCE is the explicit-negatives loss with the off-diagonal entries as negatives."""
    logits = torch.tensor(rows, dtype=torch.float64)
    n = len(rows)
    off = ~torch.eye(n, dtype=torch.bool)
    directions = []
    for matrix in (logits, logits.t()):
        positive = torch.tensor([float(matrix[i, i]) for i in range(n)], dtype=torch.float64)
        negative = matrix[off].reshape(n, n - 1)
        directions.append(negatives_contrastive_loss(positive, negative, label_smoothing=smoothing))
    expected = float(contrastive_loss(logits, label_smoothing=smoothing))
    _close((directions[0] + directions[1]) / 2, expected, 1e-9)


def test_siglip_loss_by_hand():
    rows = [[3.0, -2.0, 0.5], [-1.0, 1.0, -4.0], [0.2, -0.3, 2.0]]
    total = 0.0
    for i in range(3):
        for j in range(3):
            z = 1.0 if i == j else -1.0
            total += _log_sigmoid(z * rows[i][j])
    _close(siglip_loss(torch.tensor(rows)), -total / 3)


def test_siglip_model_bias_and_logits(tester):
    config = tester.get_config(
        contrastive_loss_type="siglip", logit_bias_init_value=-3.5, logit_scale_init_value=math.log(10.0)
    )
    model = XModalModel(config).eval()
    assert isinstance(model.logit_bias, torch.nn.Parameter) and model.logit_bias.requires_grad
    _close(model.logit_bias, -3.5)
    assert XModalModel(tester.get_config()).logit_bias is None
    inputs = tester.get_inputs()
    out = model(**inputs, return_loss=True)
    with torch.no_grad():
        images = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output.tolist()
        texts = model.get_text_features(inputs["input_ids"], inputs["attention_mask"]).pooler_output.tolist()
    total = 0.0
    for i, text in enumerate(texts):
        for j, image in enumerate(images):
            expected = 10.0 * _dot(_normalize(text), _normalize(image)) - 3.5
            _close(out.logits_per_text[i, j], expected, 1e-4)
            total += _log_sigmoid((1.0 if i == j else -1.0) * expected)
    _close(out.loss, -total / len(texts), 1e-4)


def _nt_xent_by_hand(first: list[list[float]], second: list[list[float]], scale: float) -> float:
    z = [_normalize(v) for v in first + second]
    n2 = len(z)
    half = n2 // 2
    total = 0.0
    for i in range(n2):
        positive = (i + half) % n2
        denominator = sum(math.exp(scale * _dot(z[i], z[k])) for k in range(n2) if k != i)
        total += -math.log(math.exp(scale * _dot(z[i], z[positive])) / denominator)
    return total / n2


def test_nt_xent_by_hand():
    first = [[1.0, 0.0, 2.0], [0.5, -1.0, 0.3], [-0.2, 0.4, 1.0]]
    second = [[0.9, 0.2, 1.8], [0.1, -1.2, 0.0], [-1.0, 1.0, 0.5]]
    for scale in (1.0, 5.0):
        loss = nt_xent_loss(torch.tensor(first), torch.tensor(second), scale)
        _close(loss, _nt_xent_by_hand(first, second, scale))
    _close(
        nt_xent_loss(torch.tensor(first), torch.tensor(second), torch.tensor(5.0)),
        _nt_xent_by_hand(first, second, 5.0),
    )


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(2, 5),
    factors=st.lists(st.floats(0.05, 20.0), min_size=10, max_size=10),
)
def test_nt_xent_invariant_to_norms(seed, n, factors):
    generator = torch.Generator().manual_seed(seed)
    first = torch.randn(n, 4, generator=generator, dtype=torch.float64)
    second = torch.randn(n, 4, generator=generator, dtype=torch.float64)
    scale = torch.tensor(factors[: 2 * n], dtype=torch.float64)[:, None]
    reference = nt_xent_loss(first, second, 3.0)
    rescaled = nt_xent_loss(first * scale[:n], second * scale[n:], 3.0)
    _close(rescaled, float(reference), 1e-9)
    _close(reference, _nt_xent_by_hand(first.tolist(), second.tolist(), 3.0), 1e-9)


# ------------------------------------------------------------------------------------------------------------------
# 5-6: masking
# ------------------------------------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    batch=st.integers(1, 5),
    length=st.integers(1, 12),
    probability=st.floats(0.0, 1.0),
)
def test_mask_tokens_properties(seed, batch, length, probability):
    data = torch.Generator().manual_seed(seed)
    vocab, mask_id = 50, 4
    input_ids = torch.randint(5, vocab, (batch, length), generator=data)
    special = torch.rand(batch, length, generator=data) < 0.3
    special[:, 0] = True  # [CLS]
    masked, labels = mask_tokens(
        input_ids, special, mask_id, vocab, probability, generator=torch.Generator().manual_seed(seed)
    )
    chosen = labels != -100
    for b in range(batch):
        for t in range(length):
            if special[b, t]:
                assert masked[b, t] == input_ids[b, t] and labels[b, t] == -100
            if chosen[b, t]:
                assert labels[b, t] == input_ids[b, t]
                assert 0 <= int(masked[b, t]) < vocab
            else:
                assert masked[b, t] == input_ids[b, t]
    again = mask_tokens(input_ids, special, mask_id, vocab, probability, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(again[0], masked) and torch.equal(again[1], labels)
    if probability == 1.0:
        assert torch.equal(chosen, ~special)
    if probability == 0.0:
        assert not chosen.any()


def test_mask_tokens_statistics():
    generator = torch.Generator().manual_seed(0)
    vocab, mask_id = 1000, 4
    input_ids = torch.randint(10, vocab, (200, 64), generator=generator)
    special = torch.zeros_like(input_ids, dtype=torch.bool)
    special[:, 0] = special[:, -8:] = True  # [CLS] and padding
    masked, labels = mask_tokens(input_ids, special, mask_id, vocab, 0.15, generator=generator)
    chosen = labels != -100
    eligible = int((~special).sum())
    assert abs(int(chosen.sum()) / eligible - 0.15) < 0.03
    assert not (chosen & special).any()
    n = int(chosen.sum())
    to_mask = int((masked[chosen] == mask_id).sum()) / n
    unchanged = int((masked[chosen] == input_ids[chosen]).sum()) / n
    randomised = 1.0 - to_mask - unchanged
    assert abs(to_mask - 0.8) < 0.03
    assert abs(unchanged - 0.1) < 0.03
    assert abs(randomised - 0.1) < 0.03
    seeded = [mask_tokens(input_ids, special, mask_id, vocab, 0.15, torch.Generator().manual_seed(7)) for _ in "ab"]
    assert torch.equal(seeded[0][0], seeded[1][0]) and torch.equal(seeded[0][1], seeded[1][1])


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 6),
    num_patches=st.integers(1, 80),
    ratio=st.floats(0.0, 1.0),
    seed=st.integers(0, 1000),
)
def test_random_patch_mask_counts(batch, num_patches, ratio, seed):
    mask = random_patch_mask(batch, num_patches, ratio, generator=torch.Generator().manual_seed(seed))
    assert mask.shape == (batch, num_patches) and mask.dtype == torch.bool
    expected = max(1, round(ratio * num_patches))
    for row in mask.tolist():
        assert sum(row) == expected


def test_random_patch_mask_rows_differ():
    mask = random_patch_mask(8, 64, 0.5, generator=torch.Generator().manual_seed(0))
    rows = {tuple(row) for row in mask.tolist()}
    assert len(rows) == 8
    again = random_patch_mask(8, 64, 0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(mask, again)


# ------------------------------------------------------------------------------------------------------------------
# 7-10: reconstruction and classification losses
# ------------------------------------------------------------------------------------------------------------------


def test_patchify_matches_conv_patch_embedding():
    torch.manual_seed(0)
    p, d = 4, 5
    x = torch.randn(2, 3, 8, 12)
    patches = patchify(x, p)
    assert patches.shape == (2, 6, p * p * 3)
    # element by element: patch n = row-major (gh, gw); feature (pi, qi, c) at (pi * P + qi) * C + c
    for b in range(2):
        for gh in range(2):
            for gw in range(3):
                for pi in range(p):
                    for qi in range(p):
                        for c in range(3):
                            value = patches[b, gh * 3 + gw, (pi * p + qi) * 3 + c]
                            assert value == x[b, c, gh * p + pi, gw * p + qi]
    conv = torch.nn.Conv2d(3, d, p, stride=p)
    with torch.no_grad():
        expected = conv(x).flatten(2).transpose(1, 2)
        weight = conv.weight.permute(0, 2, 3, 1).reshape(d, -1)
        torch.testing.assert_close(patches @ weight.t() + conv.bias, expected, **TOL)


def _mim_by_hand(predictions, pixel_values, mask, patch_size, norm_pix):
    patches = patchify(pixel_values, patch_size).tolist()
    total, count = 0.0, 0
    for b, row in enumerate(mask.tolist()):
        for n, flagged in enumerate(row):
            if not flagged:
                continue
            target = patches[b][n]
            if norm_pix:
                mean = sum(target) / len(target)
                var = sum((v - mean) ** 2 for v in target) / (len(target) - 1)
                target = [(v - mean) / math.sqrt(var + 1e-6) for v in target]
            prediction = predictions[b, n].tolist()
            total += sum((a - t) ** 2 for a, t in zip(prediction, target)) / len(target)
            count += 1
    return total / max(count, 1)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_masked_image_modeling_loss(norm_pix):
    torch.manual_seed(1)
    pixel_values = torch.randn(2, 3, 8, 8) * 2 + 0.5
    predictions = torch.randn(2, 4, 48)
    mask = torch.tensor([[True, False, False, True], [False, True, False, False]])
    loss = masked_image_modeling_loss(predictions, pixel_values, mask, 4, norm_pix)
    _close(loss, _mim_by_hand(predictions, pixel_values, mask, 4, norm_pix), 1e-5)
    changed = predictions.clone()
    changed[~mask] = 100.0
    _close(masked_image_modeling_loss(changed, pixel_values, mask, 4, norm_pix), float(loss), 1e-6)
    changed[mask] += 1.0
    assert abs(float(masked_image_modeling_loss(changed, pixel_values, mask, 4, norm_pix)) - float(loss)) > 1e-3
    nothing = torch.zeros_like(mask)
    assert float(masked_image_modeling_loss(predictions, pixel_values, nothing, 4, norm_pix)) == 0.0


def test_masked_language_modeling_loss_by_hand():
    torch.manual_seed(2)
    logits = torch.randn(2, 3, 5)
    labels = torch.tensor([[1, -100, 4], [-100, -100, 0]])
    total, count = 0.0, 0
    for b in range(2):
        for t in range(3):
            if labels[b, t] != -100:
                row = logits[b, t].tolist()
                total += _logsumexp(row) - row[int(labels[b, t])]
                count += 1
    _close(masked_language_modeling_loss(logits, labels), total / count)
    # no label at all: 0, still attached to the graph
    leaf = torch.randn(2, 3, 5, requires_grad=True)
    loss = masked_language_modeling_loss(leaf, torch.full((2, 3), -100))
    assert float(loss.detach()) == 0.0 and loss.requires_grad
    loss.backward()
    assert leaf.grad is not None and not leaf.grad.any()


def test_causal_lm_loss_shifts_by_one():
    vocab = 6
    labels = torch.tensor([[-100, 2, 5, 1, 3]])
    logits = torch.zeros(1, 5, vocab)
    for t in range(4):  # position t predicts label t + 1
        logits[0, t, int(labels[0, t + 1])] = 12.0
    logits[0, 4, 0] = 12.0  # the last position has no target
    loss = causal_lm_loss(logits, labels)
    expected = 0.0
    for t in range(4):
        row = logits[0, t].tolist()
        expected += _logsumexp(row) - row[int(labels[0, t + 1])]
    _close(loss, expected / 4)
    assert float(loss) < 1e-3
    # the unshifted alignment would be far worse
    assert float(masked_language_modeling_loss(logits, labels)) > 5.0
    # the last position and the first label are never used
    other = logits.clone()
    other[0, 4] = torch.randn(vocab)
    _close(
        causal_lm_loss(other, labels.masked_fill(torch.tensor([[True, False, False, False, False]]), 4)), float(loss)
    )


def test_vqa_loss_by_hand():
    logits = torch.tensor([[1.0, -2.0, 0.5, 0.0], [-1.0, 3.0, 2.0, -0.5]])
    scores = torch.tensor([[1.0, 0.0, 0.3, 0.0], [0.0, 0.6, 1.0, 0.0]])
    total = 0.0
    for b in range(2):
        for a in range(4):
            x, y = float(logits[b, a]), float(scores[b, a])
            total += -(y * _log_sigmoid(x) + (1 - y) * _log_sigmoid(-x))
    _close(vqa_loss(logits, scores), total / 8 * 4)
    indices = torch.tensor([2, 1])
    one_hot = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    _close(vqa_loss(logits, indices), float(vqa_loss(logits, one_hot)), 1e-7)
    with pytest.raises(ValueError):
        vqa_loss(logits, torch.tensor([0, 4]))
    with pytest.raises(ValueError):
        vqa_loss(logits, torch.tensor([-1, 0]))
    with pytest.raises(ValueError):
        vqa_loss(logits, torch.zeros(2, 3))
    with pytest.raises(ValueError):
        vqa_loss(logits, torch.zeros(3, 4))
    with pytest.raises(TypeError):
        vqa_loss(logits, torch.tensor([0.0, 1.0]))


# ------------------------------------------------------------------------------------------------------------------
# 11-12: image-text matching
# ------------------------------------------------------------------------------------------------------------------


def _pairs(logits: torch.Tensor, input_ids: torch.Tensor, hard: bool):
    """`_itm_pairs` on one process: candidates are the batch's pairs whose caption differs."""
    keys = _caption_keys(input_ids, torch.ones_like(input_ids))
    return _itm_pairs(logits, logits.t(), keys[None, :] != keys[:, None], hard)


def test_caption_keys_ignore_padding_and_tell_captions_apart():
    input_ids = torch.tensor([[2, 7, 8, 3, 0], [2, 7, 8, 3, 0], [2, 8, 7, 3, 0], [2, 7, 8, 9, 3]])
    mask = (input_ids != 0).long()
    keys = _caption_keys(input_ids, mask)
    assert keys[0] == keys[1] and len({int(k) for k in keys[1:]}) == 3
    # the same caption padded to another length, or on the left, has the same key
    assert _caption_keys(input_ids[:1, :4], mask[:1, :4]) == keys[0]
    left = torch.tensor([[0, 0, 2, 7, 8, 3]])
    assert _caption_keys(left, (left != 0).long()) == keys[0]


def test_itm_pairs_never_pick_same_caption():
    # captions: {0, 1} identical, {2, 3, 4} identical, 5 unique
    input_ids = torch.tensor([[7, 8, 9], [7, 8, 9], [1, 2, 0], [1, 2, 0], [1, 2, 0], [5, 5, 5]])
    same = [[input_ids[i].tolist() == input_ids[j].tolist() for j in range(6)] for i in range(6)]
    logits = torch.randn(6, 6, generator=torch.Generator().manual_seed(0)).mul(3).requires_grad_(True)
    torch.manual_seed(0)
    for hard in (True, False):
        for _ in range(40):
            neg_image, neg_text, has_negative = _pairs(logits, input_ids, hard)
            assert has_negative.all()
            for i in range(6):
                assert not same[i][int(neg_image[i])]
                assert not same[i][int(neg_text[i])]
            for tensor in (neg_image, neg_text, has_negative):
                assert not tensor.requires_grad and tensor.grad_fn is None
    identical = torch.tensor([[3, 4]] * 4)
    _, _, has_negative = _pairs(torch.randn(4, 4), identical, True)
    assert not has_negative.any()


def test_itm_hard_negatives_follow_similarity():
    n = 5
    input_ids = torch.arange(n)[:, None].repeat(1, 3)
    logits = torch.zeros(n, n)
    for i in range(n):
        logits[i, i] = 50.0  # the true pair is the most similar, yet never a negative
        logits[i, (i + 1) % n] = 20.0
    torch.manual_seed(0)
    for _ in range(20):
        neg_image, neg_text, _ = _pairs(logits, input_ids, True)
        assert neg_image.tolist() == [(i + 1) % n for i in range(n)]
        assert neg_text.tolist() == [(j - 1) % n for j in range(n)]
    # uniform sampling ignores the similarities
    seen = set()
    for _ in range(60):
        neg_image, _, _ = _pairs(logits, input_ids, False)
        seen.add(int(neg_image[0]))
    assert seen == {1, 2, 3, 4}


def test_itm_through_model(tester):
    torch.manual_seed(0)
    config = tester.get_config(
        contrastive_loss_weight=1, itm_sampling="all", **{**ONLY_CONTRASTIVE, "itm_loss_weight": 1}
    )
    model = XModalForPreTraining(config).train()
    inputs = tester.get_inputs()
    out = model(**inputs, return_loss=True)
    b = tester.batch_size
    assert out.itm_logits.shape == (3 * b, 2)
    rows = out.itm_logits.tolist()
    expected = _cross_entropy(rows, [1] * b + [0] * (2 * b))  # captions are distinct: every row has a negative
    _close(out.itm_loss, expected, 1e-5)
    _close(out.loss, float(out.contrastive_loss.detach()) + expected, 1e-5)

    config = tester.get_config(contrastive_loss_weight=0, **{**ONLY_CONTRASTIVE, "itm_loss_weight": 1})
    model = XModalForPreTraining(config).train()
    out = model(**inputs, return_loss=True)
    assert out.contrastive_loss is None
    out.loss.backward()
    for parameter in (model.logit_scale, model.visual_projection.weight, model.text_projection.weight):
        assert parameter.grad is None or not parameter.grad.any()
    assert model.itm_head.weight.grad is not None and model.itm_head.weight.grad.abs().sum() > 0


def test_auxiliary_batch_size_limits_the_generative_objectives_to_the_first_pairs(tester):
    """MLM, MIM, captioning and VQA on the first `auxiliary_batch_size` pairs equal the same objectives run on those
    pairs alone; the contrastive loss keeps the whole batch; every parameter still gets a gradient."""
    weights = {f"{name}_loss_weight": 1.0 for name in ("itm", "mlm", "mim", "captioning", "vqa")}
    inputs = tester.get_pretraining_inputs()
    head = {key: value[:2] for key, value in inputs.items()}
    torch.manual_seed(0)
    full = XModalForPreTraining(tester.get_config(num_labels=5, **weights)).eval()  # eval: no dropout
    limited = XModalForPreTraining(tester.get_config(num_labels=5, auxiliary_batch_size=2, **weights)).eval()
    limited.load_state_dict(full.state_dict())
    num_patches = (tester.image_size // tester.patch_size) ** 2
    masks = {"bool_masked_pos": torch.rand(2, num_patches).argsort(dim=1) < num_patches // 2}
    torch.manual_seed(1)
    on_two = full(**head, **masks, return_loss=True)
    torch.manual_seed(1)
    out = limited(**inputs, bool_masked_pos=torch.cat([masks["bool_masked_pos"], masks["bool_masked_pos"][:1]]),
                  return_loss=True)  # fmt: skip
    assert out.captioning_logits.shape[0] == out.vqa_logits.shape[0] == out.mim_logits.shape[0] == 2
    for name in ("captioning", "vqa", "mim"):
        torch.testing.assert_close(getattr(out, f"{name}_loss"), getattr(on_two, f"{name}_loss"))
    torch.testing.assert_close(out.contrastive_loss, full(**inputs, return_loss=True).contrastive_loss)
    limited.train()(**inputs, return_loss=True).loss.backward()
    assert not [name for name, parameter in limited.named_parameters() if parameter.grad is None]
    with pytest.raises(ValueError, match="auxiliary_batch_size must be a positive integer"):
        tester.get_config(auxiliary_batch_size=0)


# ------------------------------------------------------------------------------------------------------------------
# 13: momentum encoders and queue
# ------------------------------------------------------------------------------------------------------------------


def _queue_model(tester, **overrides) -> XModalForPreTraining:
    torch.manual_seed(0)
    config = tester.get_config(queue_size=8, momentum=0.9, **ONLY_CONTRASTIVE, **overrides)
    return XModalForPreTraining(config)


def _momentum_pairs(model):
    return model.momentum_encoder._pairs(model)


def test_momentum_update(tester):
    model = _queue_model(tester).train()
    encoder = model.momentum_encoder
    assert isinstance(encoder, XModalMomentumEncoder)
    assert not bool(encoder.initialized)
    assert all(not momentum.requires_grad for _, momentum in _momentum_pairs(model))
    inputs = tester.get_inputs()
    model(**inputs, return_loss=True)
    assert bool(encoder.initialized)
    for online, momentum in _momentum_pairs(model):
        assert torch.equal(online, momentum)
    old = [momentum.detach().clone() for _, momentum in _momentum_pairs(model)]
    with torch.no_grad():
        for online, _ in _momentum_pairs(model):
            online.add_(torch.randn_like(online))
    new = [online.detach().clone() for online, _ in _momentum_pairs(model)]
    model(**inputs, return_loss=True)
    for (_, momentum), o, n in zip(_momentum_pairs(model), old, new):
        torch.testing.assert_close(momentum, 0.9 * o + 0.1 * n, **TOL)


def test_enqueue_ring_buffer(tester):
    encoder = _queue_model(tester).momentum_encoder
    dim = tester.projection_dim
    assert int(encoder.queue_ptr) == 0
    batches = [torch.full((3, dim), float(k + 1)) for k in range(3)]
    for k, batch in enumerate(batches):
        encoder.enqueue(batch, -batch)
        assert int(encoder.queue_ptr) == 3 * (k + 1) % 8
    expected_rows = [1, 1, 1, 2, 2, 2, 3, 3]
    expected_rows[0] = 3  # the third batch wrapped: rows 6, 7, 0
    assert encoder.image_queue[:, 0].tolist() == expected_rows
    assert encoder.text_queue[:, 0].tolist() == [-v for v in expected_rows]
    # a batch larger than the queue keeps its last `size` entries, the newest at the rows written last
    big = torch.arange(10, dtype=torch.float)[:, None].repeat(1, dim)
    start = int(encoder.queue_ptr)
    encoder.enqueue(big, big)
    assert int(encoder.queue_ptr) == start
    for k in range(8):
        assert float(encoder.image_queue[(start + k) % 8, 0]) == 2 + k
    assert sorted(encoder.text_queue[:, 0].tolist()) == list(range(2, 10))


def test_queue_loss_by_hand(tester):
    model = _queue_model(tester).train()
    encoder = model.momentum_encoder
    inputs = tester.get_inputs()
    image_queue, text_queue = encoder.image_queue.clone(), encoder.text_queue.clone()
    out = model(**inputs, return_loss=True)
    image_m, text_m = encoder.embed(
        inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"], model.config
    )
    b = tester.batch_size
    # the batch's momentum embeddings were written at rows 0..B-1, the rest of the queue untouched
    torch.testing.assert_close(encoder.image_queue[:b], image_m, **TOL)
    torch.testing.assert_close(encoder.text_queue[:b], text_m, **TOL)
    assert torch.equal(encoder.image_queue[b:], image_queue[b:])
    assert int(encoder.queue_ptr) == b
    scale = math.exp(float(model.logit_scale.detach()))
    images, texts = out.image_embeds.tolist(), out.text_embeds.tolist()
    text_columns = text_m.tolist() + text_queue.tolist()
    image_columns = image_m.tolist() + image_queue.tolist()
    image_to_text = [[scale * _dot(image, column) for column in text_columns] for image in images]
    text_to_image = [[scale * _dot(text, column) for column in image_columns] for text in texts]
    assert len(image_to_text[0]) == b + 8
    labels = list(range(b))
    expected = (_cross_entropy(image_to_text, labels) + _cross_entropy(text_to_image, labels)) / 2
    _close(out.contrastive_loss, expected, 1e-4)
    # it differs from the plain in-batch loss
    assert abs(expected - float(contrastive_loss(out.logits_per_text.detach()))) > 1e-3


def test_queue_frozen_in_eval(tester):
    model = _queue_model(tester).eval()
    encoder = model.momentum_encoder
    inputs = tester.get_inputs()
    queues = (encoder.image_queue.clone(), encoder.text_queue.clone(), encoder.queue_ptr.clone())
    out = model(**inputs, return_loss=True)
    assert torch.isfinite(out.loss)
    assert torch.equal(encoder.image_queue, queues[0]) and torch.equal(encoder.text_queue, queues[1])
    assert torch.equal(encoder.queue_ptr, queues[2])
    model.train()
    model(**inputs, return_loss=True)
    model.eval()
    snapshot = [t.clone() for t in (encoder.image_queue, encoder.text_queue, encoder.queue_ptr)]
    weights = [momentum.clone() for _, momentum in _momentum_pairs(model)]
    model(**inputs, return_loss=True)
    for before, after in zip(snapshot, (encoder.image_queue, encoder.text_queue, encoder.queue_ptr)):
        assert torch.equal(before, after)
    for before, (_, after) in zip(weights, _momentum_pairs(model)):
        assert torch.equal(before, after)


@pytest.mark.parametrize("save_queue", [False, True])
def test_queue_save_pretrained(tester, tmp_path, save_queue):
    model = _queue_model(tester, save_queue=save_queue).train()
    model(**tester.get_inputs(), return_loss=True)
    assert bool(model.momentum_encoder.initialized)
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
    momentum_keys = {key for key in keys if key.startswith("momentum_encoder.")}
    assert "logit_scale" in keys and any(key.startswith("vision_model.") for key in keys)
    if save_queue:
        for name in ("image_queue", "text_queue", "queue_ptr", "initialized"):
            assert f"momentum_encoder.{name}" in keys
        assert any(key.startswith("momentum_encoder.vision_model.") for key in momentum_keys)
    else:
        assert not momentum_keys
    reloaded = XModalForPreTraining.from_pretrained(tmp_path)
    assert bool(reloaded.momentum_encoder.initialized) == save_queue
    if save_queue:
        assert torch.equal(reloaded.momentum_encoder.image_queue, model.momentum_encoder.image_queue)
        assert int(reloaded.momentum_encoder.queue_ptr) == int(model.momentum_encoder.queue_ptr)
    torch.testing.assert_close(reloaded.logit_scale, model.logit_scale)


# ------------------------------------------------------------------------------------------------------------------
# 14: multi-view
# ------------------------------------------------------------------------------------------------------------------


def test_multiview_contrastive_loss(tester):
    torch.manual_seed(0)
    model = XModalForPreTraining(tester.get_config(multiview_loss_weight=0.5, **ONLY_CONTRASTIVE)).eval()
    inputs = tester.get_inputs(seed=0)
    views = tester.get_inputs(seed=1)
    second = {
        "second_view_pixel_values": views["pixel_values"],
        "second_view_input_ids": views["input_ids"],
        "second_view_attention_mask": views["attention_mask"],
    }
    with torch.no_grad():
        single = model(**inputs, return_loss=True).contrastive_loss
        both = model(**inputs, **second, return_loss=True).contrastive_loss
        images = [
            model.get_image_features(pixel_values=p).pooler_output.tolist()
            for p in (inputs["pixel_values"], views["pixel_values"])
        ]
        texts = [
            model.get_text_features(v["input_ids"], v["attention_mask"]).pooler_output.tolist()
            for v in (inputs, views)
        ]
    scale = math.exp(float(model.logit_scale.detach()))
    labels = list(range(tester.batch_size))
    cross = []
    for image_view in images:
        for text_view in texts:
            rows = [[scale * _dot(_normalize(t), _normalize(v)) for v in image_view] for t in text_view]
            cross.append((_cross_entropy(rows, labels) + _cross_entropy(_columns(rows), labels)) / 2)
    _close(single, cross[0], 1e-4)
    within = (_nt_xent_by_hand(images[0], images[1], scale) + _nt_xent_by_hand(texts[0], texts[1], scale)) / 2
    expected = sum(cross) / 4 + 0.5 * within
    _close(both, expected, 1e-4)
    assert abs(float(both) - float(single)) > 1e-3


def test_itm_half_sampling_replaces_about_half_of_the_pairs(tester):
    """itm_sampling="half": B fused pairs; a pair is kept (label 1) or given a negative image or text (label 0), the
    negatives never being a pair with an identical caption."""
    from xmodal.matching import _itm_inputs, _LocalBatch

    config = tester.get_config(itm_sampling="half")
    model = XModalForPreTraining(config)
    batch, length = 64, 5
    input_ids = torch.arange(batch * length).reshape(batch, length) % 97 + 1
    text = torch.randn(batch, length, 8)
    embeds = F.normalize(torch.randn(batch, config.projection_dim), dim=-1)
    torch.manual_seed(0)
    texts, masks, image_index, labels, prior = _itm_inputs(model, text, None, input_ids, embeds, embeds, _LocalBatch())
    assert texts.shape == (batch, length, 8) and masks.shape == (batch, length) and labels.shape == (batch,)
    positives = labels == 1
    assert 0.3 < float(positives.float().mean()) < 0.7
    rows = torch.arange(batch)
    # positives are the true pairs; each negative swaps exactly one side
    assert torch.equal(image_index[positives], rows[positives])
    assert torch.equal(texts[positives], text[positives])
    for row in rows[~positives].tolist():
        swapped_image = int(image_index[row]) != row
        swapped_text = not torch.equal(texts[row], text[row])
        assert swapped_image != swapped_text, row
    # each pair's contrastive prior (for the ITM head) is the logit of the very pair it fuses
    text_index = torch.tensor(
        [next(j for j in rows.tolist() if torch.equal(texts[r], text[j])) for r in rows.tolist()]
    )
    torch.testing.assert_close(prior, model.pair_logits(embeds[image_index], embeds[text_index]).detach())
    # identical captions: no negative can be drawn, so every pair stays positive
    same = torch.ones(4, length, dtype=torch.long)
    _, _, image_index, labels, _ = _itm_inputs(
        model, torch.randn(4, length, 8), None, same, embeds[:4], embeds[:4], _LocalBatch()
    )
    assert labels.tolist() == [1, 1, 1, 1] and image_index.tolist() == [0, 1, 2, 3]


def test_itm_on_the_auxiliary_rows_draws_negatives_from_the_whole_batch(tester):
    """`auxiliary_batch_size` K: ITM fuses the first K pairs (and their negatives, 3K with "all"), the negatives
    being drawn from all B pairs of the batch."""
    from xmodal.matching import _itm_inputs, _LocalBatch

    model = XModalForPreTraining(tester.get_config(itm_sampling="all", itm_hard_negatives=False))
    batch, anchors, length = 32, 4, 5
    input_ids = torch.arange(batch * length).reshape(batch, length) % 97 + 1
    text = torch.randn(batch, length, 8)
    embeds = F.normalize(torch.randn(batch, model.config.projection_dim), dim=-1)
    torch.manual_seed(0)
    picked = set()
    for _ in range(20):
        texts, masks, image_index, labels, prior = _itm_inputs(
            model, text, None, input_ids, embeds, embeds, _LocalBatch(), anchors
        )
        assert texts.shape == (3 * anchors, length, 8) and labels.tolist() == [1] * anchors + [0] * 2 * anchors
        assert image_index[:anchors].tolist() == list(range(anchors))
        picked.update(image_index[anchors : 2 * anchors].tolist())
    assert max(picked) >= anchors  # negative images come from beyond the anchors


@pytest.mark.parametrize("sampling, steps, target", [("all", 100, 0.35), ("half", 300, 0.6)])
def test_itm_head_learns_to_tell_pairs_from_negatives(sampling, steps, target):
    """ITM can fit a fixed set of 8 pairs (random images and texts): its loss falls well below the label prior
    (ln 2 for "half"; 0.64 for "all", one positive to two negatives) within a few hundred steps. "half" draws which
    pairs become negatives afresh at every step, so its loss is noisy: the best 20-step window is checked."""
    tester = XModalModelTester(batch_size=8, seq_length=6)
    torch.manual_seed(0)
    config = tester.get_config(
        **{**ONLY_CONTRASTIVE, "itm_loss_weight": 1.0}, itm_sampling=sampling, itm_hard_negatives=False
    )
    model = XModalForPreTraining(config).train()
    inputs = tester.get_inputs(padded=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    history = []
    for _ in range(steps):
        out = model(**inputs, return_loss=True)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        history.append(out.itm_loss.item())
    windows = [sum(history[i : i + 20]) / 20 for i in range(0, steps, 20)]
    assert windows[0] > 0.6
    final = windows[-1] if sampling == "all" else min(windows)
    assert final < target, [round(window, 3) for window in windows]
