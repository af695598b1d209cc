"""Task-head tests in the style of transformers' ModelTester: every xmodal head's outputs, gradients, weight tying,
save/load (directly, through the Auto classes and across heads), disabled objectives, input errors, generation,
attention implementations, gradient checkpointing and retrieval re-ranking."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForImageTextToText,
    AutoModelForMaskedLM,
    AutoModelForPreTraining,
    AutoModelForVisualQuestionAnswering,
)

from xmodal import (
    XModalForConditionalGeneration,
    XModalForImageClassification,
    XModalForImageTextRetrieval,
    XModalForMaskedLM,
    XModalForPreTraining,
    XModalForVisualQuestionAnswering,
    XModalModel,
)

NUM_LABELS = 5
MASKED = object()  # placeholder for the number of masked tokens in an expected shape
BOS, EOS, PAD = 2, 3, 0
HEADS = (
    XModalModel,
    XModalForPreTraining,
    XModalForImageTextRetrieval,
    XModalForMaskedLM,
    XModalForVisualQuestionAnswering,
    XModalForConditionalGeneration,
    XModalForImageClassification,
)
AUTO_CLASSES = {
    XModalModel: AutoModel,
    XModalForPreTraining: AutoModelForPreTraining,
    XModalForMaskedLM: AutoModelForMaskedLM,
    XModalForVisualQuestionAnswering: AutoModelForVisualQuestionAnswering,
    XModalForConditionalGeneration: AutoModelForImageTextToText,
    XModalForImageClassification: AutoModelForImageClassification,
}
# what every head's loss uses of the model: XModalModel's loss is contrastive only, so its fusion module gets no gradient
UNUSED_BY_LOSS = {XModalModel: ("cross_model.",)}


pytestmark = pytest.mark.usefixtures("single_thread")


def build_heads(tester, **overrides) -> dict[type, torch.nn.Module]:
    """Every head built from the tester config with `num_labels=5`, each from the same seed."""
    config = tester.get_config(num_labels=NUM_LABELS, **overrides)
    heads = {}
    for head_class in HEADS:
        torch.manual_seed(0)
        heads[head_class] = head_class(config)
    return heads


def build_head(tester, head_class: type, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return head_class(tester.get_config(num_labels=NUM_LABELS, **overrides))


def head_inputs(head_class: type, tester, with_labels: bool) -> dict[str, torch.Tensor | bool]:
    """The inputs of `head_class`, with its labels (or `return_loss=True`) when `with_labels`."""
    inputs = tester.get_inputs(seed=0, padded=True)
    batch = tester.batch_size
    generator = torch.Generator().manual_seed(1)
    if head_class is XModalForImageClassification:
        inputs = {"pixel_values": inputs["pixel_values"]}
        if with_labels:
            inputs["labels"] = torch.tensor([0, 4, 2])
        return inputs
    if head_class is XModalForConditionalGeneration:
        inputs["input_ids"][:, 0] = BOS
        if with_labels:
            inputs["labels"] = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
        return inputs
    if head_class is XModalForMaskedLM:
        if with_labels:
            labels = torch.full_like(inputs["input_ids"], -100)
            labels[:, 1:3] = inputs["input_ids"][:, 1:3]
            inputs["input_ids"] = inputs["input_ids"].clone()
            inputs["input_ids"][:, 1:3] = 4  # [MASK]
            inputs["labels"] = labels
        return inputs
    if head_class is XModalForVisualQuestionAnswering:
        if with_labels:
            inputs["labels"] = torch.rand(batch, NUM_LABELS, generator=generator)
        return inputs
    if with_labels:
        inputs["return_loss"] = True
        if head_class is XModalForPreTraining:
            inputs["question_input_ids"] = torch.randint(5, tester.vocab_size, (batch, 5), generator=generator)
            inputs["question_attention_mask"] = torch.tensor([[1] * 5, [1] * 4 + [0], [1] * 3 + [0] * 2])
            inputs["vqa_labels"] = torch.rand(batch, NUM_LABELS, generator=generator)
    return inputs


def expected_shapes(head_class: type, tester, with_labels: bool) -> dict[str, tuple[int, ...]]:
    b, length, vocab = tester.batch_size, tester.seq_length, tester.vocab_size
    num_tokens = 1 + (tester.image_size // tester.patch_size) ** 2
    contrastive = {
        "logits_per_image": (b, b),
        "logits_per_text": (b, b),
        "image_embeds": (b, tester.projection_dim),
        "text_embeds": (b, tester.projection_dim),
    }
    if head_class is XModalModel:
        return contrastive
    if head_class is XModalForPreTraining:
        if not with_labels:
            return contrastive
        losses = ("contrastive", "itm", "mlm", "mim", "captioning", "vqa")
        return {
            **contrastive,
            **{f"{name}_loss": () for name in losses},
            "itm_logits": (b, 2),  # itm_sampling="half": one fused pair per example
            "mlm_logits": (MASKED, vocab),  # only the masked positions
            "mim_logits": (b, num_tokens - 1, tester.patch_size**2 * 3),
            "captioning_logits": (b, length, vocab),
            "vqa_logits": (b, NUM_LABELS),
        }
    if head_class is XModalForImageTextRetrieval:
        return {**contrastive, "itm_logits": (b, 2)} if with_labels else contrastive
    if head_class is XModalForConditionalGeneration:
        return {"logits": (b, length, vocab), "image_embeds": (b, num_tokens, tester.hidden_size)}
    if head_class is XModalForMaskedLM:
        return {"logits": (b, length, vocab)}
    return {"logits": (b, NUM_LABELS)}


# --------------------------------------------------------------------------------------------------------------
# 1. Outputs and gradients
# --------------------------------------------------------------------------------------------------------------


def test_mlm_logits_cover_exactly_the_masked_positions(tester):
    model = build_head(tester, XModalForPreTraining).eval()
    inputs = head_inputs(XModalForPreTraining, tester, with_labels=True)
    torch.manual_seed(0)
    out = model(**inputs)
    assert out.mlm_logits.shape[0] > 0  # the tester's labels mask some tokens
    labels = inputs.get("mlm_labels")
    if labels is not None:
        assert out.mlm_logits.shape[0] == int((labels != -100).sum())


def test_heads_name_their_shared_parts_alike(tester):
    """Cross-head loading relies on every head naming and shaping its shared modules identically."""
    heads = build_heads(tester)
    assert all(model.config.num_labels == NUM_LABELS for model in heads.values())
    for part in ("vision_model", "text_model", "cross_model", "text_decoder", "itm_head", "mlm_head", "vqa_head"):
        layouts = {}
        for head_class, model in heads.items():
            module = getattr(model, part, None)
            if module is not None:
                layouts[head_class.__name__] = {
                    name: tuple(value.shape) for name, value in module.state_dict().items()
                }
        assert len(layouts) >= 2, part
        first = next(iter(layouts.values()))
        assert all(layout == first for layout in layouts.values()), f"{part} differs between {sorted(layouts)}"


@pytest.mark.parametrize("head_class", HEADS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("with_labels", [False, True], ids=["no_labels", "labels"])
def test_forward_outputs(tester, head_class, with_labels):
    model = build_head(tester, head_class).eval()
    torch.manual_seed(0)
    out = model(**head_inputs(head_class, tester, with_labels))
    shapes = expected_shapes(head_class, tester, with_labels)
    for name, shape in shapes.items():
        assert isinstance(out[name], torch.Tensor), name
        expected = tuple(out["mlm_logits"].shape[0] if size is MASKED else size for size in shape)
        assert tuple(out[name].shape) == expected, name
        assert torch.isfinite(out[name]).all(), name
    tensors = {name for name, value in out.items() if isinstance(value, torch.Tensor)} - {"loss"}
    assert tensors <= set(shapes), f"unexpected outputs {tensors - set(shapes)}"
    if with_labels:
        assert out.loss is not None and out.loss.shape == () and torch.isfinite(out.loss)
    else:
        assert out.get("loss") is None
    if head_class is XModalForConditionalGeneration:
        assert out.get("cache") is None


def test_vqa_head_accepts_soft_scores_and_indices(tester):
    model = build_head(tester, XModalForVisualQuestionAnswering).eval()
    inputs = head_inputs(XModalForVisualQuestionAnswering, tester, with_labels=False)
    indices = torch.tensor([1, 4, 0])
    by_index = model(**inputs, labels=indices)
    soft = model(**inputs, labels=torch.nn.functional.one_hot(indices, NUM_LABELS).float())
    torch.testing.assert_close(by_index.loss, soft.loss)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        soft.logits, torch.nn.functional.one_hot(indices, NUM_LABELS).float()
    )
    torch.testing.assert_close(soft.loss, expected * NUM_LABELS)


@pytest.mark.parametrize(
    "head_class, overrides",
    [(head_class, {}) for head_class in HEADS] + [(XModalForPreTraining, {"queue_size": 6})],
    ids=[head_class.__name__ for head_class in HEADS] + ["XModalForPreTraining-momentum_queue"],
)
def test_every_trainable_parameter_gets_a_gradient(tester, head_class, overrides):
    model = build_head(tester, head_class, **overrides).train()
    torch.manual_seed(0)
    out = model(**head_inputs(head_class, tester, with_labels=True))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    unused = UNUSED_BY_LOSS.get(head_class, ())
    frozen = [name for name, param in model.named_parameters() if not param.requires_grad]
    if overrides.get("queue_size"):
        assert frozen and all(name.startswith("momentum_encoder.") for name in frozen)
        assert all(param.grad is None for name, param in model.named_parameters() if name in frozen)
    else:
        assert not frozen
    missing, zero, non_finite = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith(unused):
            assert param.grad is None, f"{name} should not be in the graph of the loss"
        elif param.grad is None:
            missing.append(name)
        elif not torch.isfinite(param.grad).all():
            non_finite.append(name)
        elif not bool(param.grad.ne(0).any()):
            zero.append(name)
    assert not missing, f"parameters without gradient: {missing}"
    assert not non_finite, f"non-finite gradients: {non_finite}"
    assert not zero, f"all-zero gradients: {zero}"


# --------------------------------------------------------------------------------------------------------------
# 2-3. Weight tying and save/load round trips
# --------------------------------------------------------------------------------------------------------------


def _assert_tied(model: torch.nn.Module) -> None:
    if getattr(model, "mlm_head", None) is not None:
        assert model.mlm_head.decoder.weight is model.text_model.embeddings.word_embeddings.weight
    if getattr(model, "lm_head", None) is not None:
        assert model.lm_head.weight is model.text_decoder.embed_tokens.weight


@pytest.mark.parametrize(
    "head_class, overrides, heads",
    [
        (XModalForPreTraining, {}, ("mlm_head", "lm_head")),
        (XModalForPreTraining, {"mlm_loss_weight": 0.0}, ("lm_head",)),
        (XModalForPreTraining, {"captioning_loss_weight": 0.0}, ("mlm_head",)),
        (XModalForMaskedLM, {}, ("mlm_head",)),
        (XModalForConditionalGeneration, {}, ("lm_head",)),
    ],
    ids=["pretraining", "pretraining-no_mlm", "pretraining-no_captioning", "masked_lm", "conditional_generation"],
)
def test_weight_tying_survives_save_load(tester, tmp_path, head_class, overrides, heads):
    model = build_head(tester, head_class, **overrides)
    for name in ("mlm_head", "lm_head"):
        assert (getattr(model, name, None) is not None) == (name in heads)
    _assert_tied(model)
    model.save_pretrained(tmp_path)
    reloaded, info = head_class.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for name in heads:
        assert getattr(reloaded, name) is not None
    _assert_tied(reloaded)
    torch.testing.assert_close(reloaded.state_dict(), model.state_dict(), rtol=0, atol=0)


@pytest.mark.parametrize("head_class", [XModalForMaskedLM, XModalForConditionalGeneration], ids=lambda c: c.__name__)
def test_resize_token_embeddings_keeps_the_tie_and_reloads(tester, tmp_path, head_class):
    """Adding tokens to the tokenizer: the tied head grows with the embeddings, the new ids are accepted and the
    resized model reloads."""
    model = build_head(tester, head_class).eval()
    new_size = tester.vocab_size + 8
    model.resize_token_embeddings(new_size)
    _assert_tied(model)
    inputs = head_inputs(head_class, tester, with_labels=False)
    inputs["input_ids"][0, 1] = new_size - 1
    logits = model(**inputs).logits
    assert logits.shape[-1] == new_size
    model.save_pretrained(tmp_path)
    reloaded = head_class.from_pretrained(tmp_path).eval()
    assert torch.equal(reloaded(**inputs).logits, logits)


def _outputs(model: torch.nn.Module, inputs: dict) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)  # ITM negatives, MLM and MIM masks are sampled
    with torch.no_grad():
        out = model(**inputs)
    return {name: value for name, value in out.items() if isinstance(value, torch.Tensor)}


@pytest.mark.parametrize("head_class", HEADS, ids=lambda c: c.__name__)
def test_save_load_round_trip(tester, tmp_path, head_class):
    model = build_head(tester, head_class).eval()
    inputs = head_inputs(head_class, tester, with_labels=True)
    expected = _outputs(model, inputs)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaders = [head_class] + ([AUTO_CLASSES[head_class]] if head_class in AUTO_CLASSES else [])
    for loader in loaders:
        reloaded, info = loader.from_pretrained(tmp_path, output_loading_info=True)
        assert type(reloaded) is head_class, loader.__name__
        assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
        reloaded.eval()
        actual = _outputs(reloaded, inputs)
        assert actual.keys() == expected.keys()
        for name, value in expected.items():
            assert torch.equal(actual[name], value), f"{loader.__name__}: {name}"
        if head_class is XModalForConditionalGeneration:
            pixel_values = inputs["pixel_values"]
            assert torch.equal(
                reloaded.generate(pixel_values=pixel_values, max_new_tokens=4),
                model.generate(pixel_values=pixel_values, max_new_tokens=4),
            )


# --------------------------------------------------------------------------------------------------------------
# 4. Loading one head from another's checkpoint
# --------------------------------------------------------------------------------------------------------------


def _head_only_keys(target: torch.nn.Module, source_keys: set[str]) -> set[str]:
    """Keys of `target` absent from a checkpoint holding `source_keys`, less those tied to a key that is present."""
    tied = getattr(target, "_tied_weights_keys", None) or {}
    return {
        key for key in target.state_dict() if key not in source_keys and tied.get(key, "<none>") not in source_keys
    }


@pytest.mark.parametrize("head_class", [h for h in HEADS if h is not XModalForPreTraining], ids=lambda c: c.__name__)
def test_heads_load_from_a_pretraining_checkpoint(tester, tmp_path, head_class):
    source = build_head(tester, XModalForPreTraining)
    source.save_pretrained(tmp_path)
    source_state = source.state_dict()
    torch.manual_seed(1)
    model, info = head_class.from_pretrained(tmp_path, output_loading_info=True)
    state = model.state_dict()
    shared = set(state) & set(source_state)
    assert set(info["missing_keys"]) == _head_only_keys(model, set(source_state))
    assert not set(info["missing_keys"]) & shared
    prefixes = {
        XModalForImageTextRetrieval: ("itm_head.",),
        XModalForMaskedLM: ("mlm_head.",),
        XModalForVisualQuestionAnswering: ("vqa_head.",),
        XModalForConditionalGeneration: ("text_decoder.", "lm_head."),
    }.get(head_class, ())
    for prefix in ("vision_model.", *prefixes):
        assert any(key.startswith(prefix) for key in shared), prefix
    if head_class is not XModalForConditionalGeneration and head_class is not XModalForImageClassification:
        assert any(key.startswith("text_model.") for key in shared)
        assert any(key.startswith("cross_model.") for key in shared)
    different = [key for key in shared if not torch.equal(state[key], source_state[key])]
    assert not different, f"shared weights not loaded: {different}"
    if head_class is XModalForImageClassification:
        assert set(info["missing_keys"]) == {"classifier.weight", "classifier.bias"}
    else:
        assert not info["missing_keys"]
    _assert_tied(model)
    model.eval()
    out = model(**head_inputs(head_class, tester, with_labels=True))
    assert torch.isfinite(out.loss)


def test_pretraining_loads_from_a_base_model_checkpoint(tester, tmp_path):
    source = build_head(tester, XModalModel)
    source.save_pretrained(tmp_path)
    source_state = source.state_dict()
    model, info = XModalForPreTraining.from_pretrained(tmp_path, output_loading_info=True)
    state = model.state_dict()
    head_only = _head_only_keys(model, set(source_state))
    assert set(info["missing_keys"]) == head_only
    assert not set(info["missing_keys"]) & set(source_state)
    assert not info["unexpected_keys"]
    for prefix in ("itm_head.", "mlm_head.dense.", "mim_decoder.", "text_decoder.", "lm_head.", "vqa_head."):
        assert any(key.startswith(prefix) for key in head_only), prefix
    for key, value in source_state.items():
        assert torch.equal(state[key], value), key
    _assert_tied(model)
    # the new heads are initialised, not left as uninitialised memory
    assert torch.equal(model.mlm_head.decoder.bias, torch.zeros_like(model.mlm_head.decoder.bias))
    assert torch.equal(model.mim_decoder.mask_token, torch.zeros_like(model.mim_decoder.mask_token))
    for weight in (
        model.itm_head.weight,
        model.mim_decoder.head.weight,
        model.vqa_head.classifier.weight,
        model.lm_head.weight,
    ):
        assert torch.isfinite(weight).all() and 0.0 < weight.std().item() < 0.1
    assert model.itm_head.prior_weight.item() == model.config.itm_contrastive_prior
    out = model(**head_inputs(XModalForPreTraining, tester, with_labels=True))
    assert torch.isfinite(out.loss)


# --------------------------------------------------------------------------------------------------------------
# 5-6. Disabled objectives and errors
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "weights, text_calls, vision_calls",
    [
        ({"mlm_loss_weight": 0.0, "mim_loss_weight": 0.0, "vqa_loss_weight": 0.0}, 1, 1),
        ({"mlm_loss_weight": 2.0, "mim_loss_weight": 0.0, "vqa_loss_weight": 0.0}, 2, 1),
        ({"mlm_loss_weight": 0.0, "mim_loss_weight": 3.0, "vqa_loss_weight": 0.0}, 1, 2),
        ({"mlm_loss_weight": 0.0, "mim_loss_weight": 0.0, "vqa_loss_weight": 1.5}, 2, 1),
        (
            {
                "itm_loss_weight": 0.0,
                "captioning_loss_weight": 0.0,
                "mlm_loss_weight": 0.0,
                "mim_loss_weight": 0.0,
                "vqa_loss_weight": 0.0,
            },
            1,
            1,
        ),
        ({"contrastive_loss_weight": 0.0, "mlm_loss_weight": 0.7, "mim_loss_weight": 0.3}, 3, 2),
    ],
    ids=["mlm_mim_vqa_off", "mlm_on", "mim_on", "vqa_on", "contrastive_only", "no_contrastive"],
)
def test_disabled_objectives_cost_nothing(tester, weights, text_calls, vision_calls):
    weights = {"contrastive_loss_weight": 1.5, "itm_loss_weight": 0.5, "captioning_loss_weight": 0.25, **weights}
    model = build_head(tester, XModalForPreTraining, **weights).train()
    enabled = {
        name
        for name in ("contrastive", "itm", "mlm", "mim", "captioning", "vqa")
        if weights.get(f"{name}_loss_weight", 1.0) > 0
    }
    heads = {
        "itm": "itm_head",
        "mlm": "mlm_head",
        "mim": "mim_decoder",
        "captioning": "text_decoder",
        "vqa": "vqa_head",
    }
    for objective, attribute in heads.items():
        assert (getattr(model, attribute) is None) == (objective not in enabled), attribute
    assert (model.lm_head is None) == ("captioning" not in enabled)
    calls = {"text": 0, "vision": 0}
    model.text_model.register_forward_hook(lambda *_: calls.__setitem__("text", calls["text"] + 1))
    model.vision_model.register_forward_hook(lambda *_: calls.__setitem__("vision", calls["vision"] + 1))
    inputs = head_inputs(XModalForPreTraining, tester, with_labels=True)
    if "vqa" not in enabled:
        inputs = {key: value for key, value in inputs.items() if not key.startswith(("question_", "vqa_"))}
    torch.manual_seed(0)
    out = model(**inputs)
    assert calls == {"text": text_calls, "vision": vision_calls}
    expected = 0.0
    for name in ("contrastive", "itm", "mlm", "mim", "captioning", "vqa"):
        loss = out[f"{name}_loss"] if f"{name}_loss" in out else None
        if name in enabled:
            assert loss is not None and torch.isfinite(loss), name
            expected = expected + weights.get(f"{name}_loss_weight", 1.0) * loss
        else:
            assert loss is None, name
            logits = {
                "mlm": "mlm_logits",
                "mim": "mim_logits",
                "captioning": "captioning_logits",
                "vqa": "vqa_logits",
                "itm": "itm_logits",
            }
            if name in logits:
                assert out.get(logits[name]) is None
    torch.testing.assert_close(out.loss, expected)
    # without return_loss only the towers run, once each
    calls.update(text=0, vision=0)
    model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], pixel_values=inputs["pixel_values"])
    assert calls == {"text": 1, "vision": 1}


def test_a_call_computes_only_the_objectives_asked_for(tester):
    """`objectives=` (task sampling, `xmodal pretrain --auxiliary_every`): a contrastive-only call runs each tower
    once, returns that loss alone (equal to the full call's), and leaves every other head without a gradient."""
    model = build_head(tester, XModalForPreTraining).train()
    assert model.pretraining_objectives == ("contrastive", "itm", "mlm", "mim", "captioning", "vqa")
    inputs = head_inputs(XModalForPreTraining, tester, with_labels=True)
    calls = {"text": 0, "vision": 0}
    model.text_model.register_forward_hook(lambda *_: calls.__setitem__("text", calls["text"] + 1))
    model.vision_model.register_forward_hook(lambda *_: calls.__setitem__("vision", calls["vision"] + 1))
    full = model(**inputs)
    calls.update(text=0, vision=0)
    out = model(**inputs, objectives=["contrastive"])
    assert calls == {"text": 1, "vision": 1}
    assert [key for key in out.keys() if key.endswith("loss")] == ["loss", "contrastive_loss"]
    torch.testing.assert_close(out.loss, full.contrastive_loss)
    out.loss.backward()
    tower_parameters = {id(p) for p in model.text_model.parameters()}  # the MLM decoder is tied to the embeddings
    for name in ("itm_head", "mlm_head", "mim_decoder", "text_decoder", "vqa_head", "cross_model"):
        head = [p for p in getattr(model, name).parameters() if id(p) not in tower_parameters]
        assert head and all(p.grad is None for p in head), name
    two = model(**inputs, objectives=("contrastive", "vqa"))
    assert {key for key in two.keys() if key.endswith("_loss")} == {"contrastive_loss", "vqa_loss"}
    # the question inputs are needed only when VQA is computed
    without_questions = {k: v for k, v in inputs.items() if not k.startswith(("question_", "vqa_"))}
    assert model(**without_questions, objectives=["contrastive", "itm"]).itm_loss is not None
    for bad in (["contrastive", "retrieval"], "contrastive"):
        with pytest.raises(ValueError, match="objectives must be a collection of this model's objectives"):
            model(**inputs, objectives=bad)
    dual = build_head(tester, XModalForPreTraining, itm_loss_weight=0.0, mlm_loss_weight=0.0, vqa_loss_weight=0.0)
    with pytest.raises(ValueError, match=r"\['contrastive', 'mim', 'captioning'\]"):
        dual(**inputs, objectives=["itm"])


def test_errors(tester):
    inputs = tester.get_inputs()
    model = build_head(tester, XModalForPreTraining)
    with pytest.raises(ValueError, match="vqa_loss_weight"):
        model(**inputs, return_loss=True)
    with pytest.raises(ValueError, match="vqa_loss_weight"):
        model(**inputs, return_loss=True, question_input_ids=inputs["input_ids"])
    # MLM needs fused text tokens
    image_to_text = {"direction": "image_to_text"}
    with pytest.raises(ValueError, match="Masked language modelling"):
        XModalForMaskedLM(tester.get_config(cross_config=image_to_text))
    with pytest.raises(ValueError, match="Masked language modelling"):
        XModalForPreTraining(tester.get_config(cross_config=image_to_text, num_labels=NUM_LABELS))
    XModalForPreTraining(tester.get_config(cross_config=image_to_text, mlm_loss_weight=0.0, num_labels=NUM_LABELS))
    # objectives needing fusion without a fusion module
    no_fusion = tester.get_config(cross_config={"num_hidden_layers": 0}, num_labels=NUM_LABELS)
    for head_class in (
        XModalForPreTraining,
        XModalForImageTextRetrieval,
        XModalForMaskedLM,
        XModalForVisualQuestionAnswering,
    ):
        with pytest.raises(ValueError, match="fusion module|fused text tokens"):
            head_class(no_fusion)
    dual = XModalForPreTraining(
        tester.get_config(
            cross_config={"num_hidden_layers": 0}, itm_loss_weight=0.0, mlm_loss_weight=0.0, vqa_loss_weight=0.0
        )
    )
    assert dual.cross_model is None
    assert torch.isfinite(dual(**inputs, return_loss=True).loss)
    # losses over pairs need equal batches
    unequal = {**inputs, "pixel_values": inputs["pixel_values"][:2]}
    for head_class in (XModalForPreTraining, XModalForImageTextRetrieval):
        model = build_head(tester, head_class)
        with pytest.raises(ValueError, match="as many texts as images"):
            model(**unequal, return_loss=True)
        assert model(**unequal).logits_per_text.shape == (tester.batch_size, 2)


# --------------------------------------------------------------------------------------------------------------
# 7. Generation
# --------------------------------------------------------------------------------------------------------------

CAPTIONS = torch.tensor([[BOS, 10, 11, 12, 13, EOS], [BOS, 20, 21, 22, EOS, PAD], [BOS, 30, 31, EOS, PAD, PAD]])


@pytest.fixture(scope="module")
def captioner():
    """A captioning model trained for 30 steps on three fixed captions, and its images."""
    from conftest import XModalModelTester

    tester = XModalModelTester()
    pixel_values = tester.get_inputs(seed=0)["pixel_values"]
    model = build_head(tester, XModalForConditionalGeneration)
    attention_mask = (CAPTIONS != PAD).long()
    labels = CAPTIONS.masked_fill(attention_mask == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    first = None
    for _ in range(30):
        loss = model(input_ids=CAPTIONS, pixel_values=pixel_values, attention_mask=attention_mask, labels=labels).loss
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < first - 1.0
    return model.eval(), pixel_values


def test_generation_special_tokens(captioner):
    model, _ = captioner
    config = model.config.decoder_config
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (BOS, EOS, PAD)
    generation = model.generation_config
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (BOS, EOS, PAD)


def test_greedy_generation_with_and_without_cache(captioner):
    model, pixel_values = captioner
    cached = model.generate(pixel_values=pixel_values, max_new_tokens=8, use_cache=True)
    uncached = model.generate(pixel_values=pixel_values, max_new_tokens=8, use_cache=False)
    assert torch.equal(cached, uncached)
    assert (cached[:, 0] == BOS).all()
    # not degenerate: the captions differ and contain trained tokens
    assert len({tuple(row.tolist()) for row in cached}) == cached.shape[0]
    assert all(row[1].item() == caption[1].item() for row, caption in zip(cached, CAPTIONS))
    _assert_eos_then_pad(cached, 1 + 8)


def test_cached_steps_match_full_forward(captioner):
    model, pixel_values = captioner
    sequence = torch.tensor([[BOS, 10, 11, 12, 13, EOS, 7], [BOS, 20, 21, 22, EOS, 5, 6], [BOS, 30, 31, EOS, 7, 8, 9]])
    for attention_mask in (None, torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 4 + [0] * 3])):
        with torch.no_grad():
            full = model(input_ids=sequence, pixel_values=pixel_values, attention_mask=attention_mask).logits
            prefix = 3
            kwargs = {} if attention_mask is None else {"attention_mask": attention_mask[:, :prefix]}
            out = model(input_ids=sequence[:, :prefix], pixel_values=pixel_values, use_cache=True, **kwargs)
            assert out.cache is not None and out.cache.get_seq_length() == prefix
            steps = [out.logits]
            for position in range(prefix, sequence.shape[1]):
                kwargs = {} if attention_mask is None else {"attention_mask": attention_mask[:, : position + 1]}
                out = model(
                    input_ids=sequence[:, position : position + 1],
                    pixel_values=pixel_values,
                    cache=out.cache,
                    use_cache=True,
                    **kwargs,
                )
                steps.append(out.logits)
            assert out.cache.get_seq_length() == sequence.shape[1]
        stepped = torch.cat(steps, dim=1)
        # the real positions; at padding, the uncached forward skips the work on CPU (logits of a zero state)
        real = torch.ones(sequence.shape, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        torch.testing.assert_close(stepped[real], full[real], atol=1e-5, rtol=1e-5)


def _assert_eos_then_pad(sequences: torch.Tensor, full_length: int) -> None:
    for row in sequences.tolist():
        if EOS in row[1:]:
            first = row.index(EOS, 1)
            assert all(token == PAD for token in row[first + 1 :]), f"tokens after EOS are not PAD: {row}"
        else:
            assert len(row) == full_length, row


def test_beam_search(captioner):
    model, pixel_values = captioner
    batch = pixel_values.shape[0]
    beams = model.generate(pixel_values=pixel_values, max_new_tokens=6, num_beams=3)
    assert beams.shape[0] == batch and beams.shape[1] <= 1 + 6
    assert (beams[:, 0] == BOS).all()
    several = model.generate(pixel_values=pixel_values, max_new_tokens=6, num_beams=3, num_return_sequences=2)
    assert several.shape[0] == 2 * batch
    for sequences in (beams, several):
        for row in sequences.tolist():
            assert EOS in row[1:] or len(row) == 1 + 6, row


def test_beam_search_pads_after_eos_with_pad_id(captioner):
    """Rows that stop before the others must be padded with PAD (0), as greedy search and sampling do."""
    model, pixel_values = captioner
    beams = model.generate(pixel_values=pixel_values, max_new_tokens=6, num_beams=3)
    lengths = [row.index(EOS, 1) + 1 if EOS in row[1:] else len(row) for row in beams.tolist()]
    assert min(lengths) < beams.shape[1], "the test needs a row that ends early"
    for row, length in zip(beams, lengths):
        assert (row[length:] == PAD).all(), row.tolist()


def test_sampling_is_reproducible(captioner):
    model, pixel_values = captioner
    torch.manual_seed(123)
    first = model.generate(pixel_values=pixel_values, max_new_tokens=6, do_sample=True, top_k=5)
    torch.manual_seed(123)
    second = model.generate(pixel_values=pixel_values, max_new_tokens=6, do_sample=True, top_k=5)
    assert torch.equal(first, second)
    _assert_eos_then_pad(first, 1 + 6)
    several = model.generate(
        pixel_values=pixel_values, max_new_tokens=6, do_sample=True, top_k=5, num_return_sequences=2
    )
    assert several.shape[0] == 2 * pixel_values.shape[0]


def test_prompt_is_kept_as_prefix(captioner):
    model, pixel_values = captioner
    prompt = torch.tensor([[BOS, 10, 11], [BOS, 20, 21], [BOS, 30, 31]])
    for kwargs in ({}, {"num_beams": 3}):
        out = model.generate(pixel_values=pixel_values, input_ids=prompt, max_new_tokens=4, **kwargs)
        assert torch.equal(out[:, : prompt.shape[1]], prompt)
        assert out.shape[1] > prompt.shape[1]
    # left-padded prompts of different lengths give what each prompt gives alone
    padded = torch.tensor([[BOS, 10, 11, 12], [PAD, BOS, 20, 21], [PAD, PAD, BOS, 30]])
    attention_mask = (padded != PAD).long()
    batched = model.generate(
        pixel_values=pixel_values, input_ids=padded, attention_mask=attention_mask, max_new_tokens=4
    )
    for row in range(3):
        start = int((attention_mask[row] == 0).sum())
        alone = model.generate(
            pixel_values=pixel_values[row : row + 1], input_ids=padded[row : row + 1, start:], max_new_tokens=4
        )
        width = alone.shape[1] - (padded.shape[1] - start)
        generated = batched[row, padded.shape[1] : padded.shape[1] + width]
        assert torch.equal(generated, alone[0, padded.shape[1] - start :]), (batched[row], alone[0])


def test_generation_errors(captioner):
    model, pixel_values = captioner
    prompt = torch.full((2, 1), BOS)
    with pytest.raises(ValueError, match="2 prompts for 3 images"):
        model.generate(pixel_values=pixel_values, input_ids=prompt, max_new_tokens=2)
    limit = model.config.decoder_config.max_position_embeddings
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.generate(pixel_values=pixel_values, max_new_tokens=limit + 5, min_new_tokens=limit + 5)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(input_ids=torch.full((1, limit + 1), 5), pixel_values=pixel_values[:1])


# --------------------------------------------------------------------------------------------------------------
# 8-9. Attention implementations and gradient checkpointing
# --------------------------------------------------------------------------------------------------------------


def _deterministic_pretraining_inputs(tester) -> dict:
    inputs = head_inputs(XModalForPreTraining, tester, with_labels=True)
    mlm_input_ids = inputs["input_ids"].clone()
    mlm_input_ids[:, 1:3] = 4
    mlm_labels = torch.full_like(mlm_input_ids, -100)
    mlm_labels[:, 1:3] = inputs["input_ids"][:, 1:3]
    num_patches = (tester.image_size // tester.patch_size) ** 2
    bool_masked_pos = torch.zeros(tester.batch_size, num_patches, dtype=torch.bool)
    bool_masked_pos[:, ::3] = True
    return {**inputs, "mlm_input_ids": mlm_input_ids, "mlm_labels": mlm_labels, "bool_masked_pos": bool_masked_pos}


@pytest.mark.parametrize(
    "head_class", [XModalForConditionalGeneration, XModalForPreTraining], ids=lambda c: c.__name__
)
def test_eager_matches_sdpa(tester, tmp_path, head_class):
    build_head(tester, head_class).save_pretrained(tmp_path)
    if head_class is XModalForConditionalGeneration:
        inputs = head_inputs(head_class, tester, with_labels=True)
        assert (inputs["attention_mask"] == 0).any()
    else:
        inputs = _deterministic_pretraining_inputs(tester)
    results = {}
    for implementation in ("eager", "sdpa"):
        model = head_class.from_pretrained(tmp_path, attn_implementation=implementation).eval()
        for config in (model.config.vision_config, model.config.cross_config, model.config.decoder_config):
            assert config._attn_implementation == implementation
        results[implementation] = _outputs(model, inputs)
    assert results["eager"].keys() == results["sdpa"].keys()
    for name, value in results["eager"].items():
        torch.testing.assert_close(value, results["sdpa"][name], atol=1e-5, rtol=1e-5, msg=name)
    # switching on a loaded model agrees as well
    model.set_attn_implementation("eager")
    for name, value in _outputs(model, inputs).items():
        torch.testing.assert_close(value, results["eager"][name], atol=1e-6, rtol=1e-6, msg=name)


def test_gradient_checkpointing_gives_same_loss_and_gradients(tester):
    model = build_head(tester, XModalForPreTraining).train()
    inputs = head_inputs(XModalForPreTraining, tester, with_labels=True)

    def loss_and_grads():
        model.zero_grad()
        torch.manual_seed(7)
        loss = model(**inputs).loss
        loss.backward()
        return loss.detach(), {name: param.grad.clone() for name, param in model.named_parameters()}

    reference_loss, reference_grads = loss_and_grads()
    layer_calls = []
    # transformers checkpoints the layer's `forward` (the layer's own hooks stay outside) and the non-reentrant
    # recomputation stops early: count the calls of the layer's first sub-module
    model.cross_model.text_layers[0].layer_norm1.register_forward_pre_hook(lambda *_: layer_calls.append(1))
    model.activation_checkpointing_enable()
    assert model.is_activation_checkpointing
    loss, grads = loss_and_grads()
    # the fusion layer runs once for ITM and MLM (same text length, one batched call) and once for VQA, and is
    # recomputed for each call in the backward pass
    assert len(layer_calls) == 4
    torch.testing.assert_close(loss, reference_loss)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference_grads[name], atol=1e-6, rtol=1e-5, msg=name)


# --------------------------------------------------------------------------------------------------------------
# 10. Retrieval re-ranking
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_images, top_k", [(3, 2), (5, 2), (5, 1), (3, 10)])
def test_retrieval_rerank(tester, num_images, top_k):
    model = build_head(tester, XModalForImageTextRetrieval).eval()
    inputs = tester.get_inputs()
    pixel_values = torch.cat(
        [inputs["pixel_values"], torch.randn(num_images, 3, tester.image_size, tester.image_size)]
    )
    pixel_values = pixel_values[:num_images]
    out = model(
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        pixel_values=pixel_values,
        rerank_top_k=top_k,
    )
    scores = out.itm_scores_per_text
    assert scores.shape == (tester.batch_size, num_images)
    k = min(top_k, num_images)
    candidates = out.logits_per_text.topk(k, dim=1).indices
    inside = torch.zeros_like(scores, dtype=torch.bool).scatter(1, candidates, True)
    assert torch.isfinite(scores[inside]).all()
    assert (scores[~inside] == float("-inf")).all()
    assert int(inside.sum()) == tester.batch_size * k
    # each candidate's score is the ITM log-odds of that image-text pair
    texts, images = inside.nonzero(as_tuple=True)
    itm = model.score_pairs(
        input_ids=inputs["input_ids"][texts],
        attention_mask=inputs["attention_mask"][texts],
        pixel_values=pixel_values[images],
    )
    torch.testing.assert_close(scores[texts, images], itm[:, 1] - itm[:, 0], atol=1e-5, rtol=1e-5)
    assert (
        model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], pixel_values=pixel_values
        ).itm_scores_per_text
        is None
    )


def test_itm_head_adds_the_detached_contrastive_prior(tester, tmp_path):
    """The match logit is the fused [CLS]'s plus prior_weight x the pair's contrastive logit, which gets no gradient
    (matching never pulls the embeddings); itm_contrastive_prior=0 is ALBEF's plain linear head. A checkpoint saved
    before the prior existed (no prior_weight, no config field) loads with the prior at its default weight."""
    import json

    import torch.nn.functional as F

    from xmodal.heads import XModalITMHead

    config = tester.get_config(itm_contrastive_prior=2.0)
    head = XModalITMHead(config)
    pooled = torch.randn(5, config.cross_config.hidden_size)
    contrastive = torch.randn(5, requires_grad=True)
    logits = head(pooled, contrastive)
    plain = F.linear(pooled, head.weight, head.bias)
    torch.testing.assert_close(logits, plain + torch.stack([torch.zeros(5), 2.0 * contrastive], dim=1))
    logits[:, 1].sum().backward()
    assert contrastive.grad is None and head.prior_weight.grad is not None
    with pytest.raises(ValueError, match=r"contrastive_logits of shape \(5,\), got None"):
        head(pooled)
    with pytest.raises(ValueError, match=r"got \(4,\)"):
        head(pooled, contrastive[:4])
    ablated = XModalITMHead(tester.get_config(itm_contrastive_prior=0.0))
    assert ablated.prior_weight is None and set(ablated.state_dict()) == {"weight", "bias"}
    torch.testing.assert_close(ablated(pooled), F.linear(pooled, ablated.weight, ablated.bias))

    old = build_head(tester, XModalForImageTextRetrieval, itm_contrastive_prior=0.0)
    old.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["itm_contrastive_prior"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    model = XModalForImageTextRetrieval.from_pretrained(tmp_path)
    assert model.itm_head.prior_weight.item() == 1.0
    assert torch.equal(model.itm_head.weight, old.itm_head.weight)


@pytest.mark.parametrize("direction", ["text_to_image", "both"])
def test_fuse_with_image_index_equals_fusing_the_gathered_images(direction):
    """Pairs given by image_index fuse like the materialised pairs; with text_to_image each image's keys/values are
    computed once and the (unfused) image tokens are not copied per pair."""
    from conftest import XModalModelTester

    tester = XModalModelTester(direction=direction)
    model = XModalModel(tester.get_config()).eval()
    inputs = tester.get_inputs()
    with torch.no_grad():
        image = model.vision_model(pixel_values=inputs["pixel_values"]).last_hidden_state
        text = model.text_model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
        ).last_hidden_state
        index = torch.tensor([2, 0, 0])
        indexed = model.fuse(image, text, inputs["attention_mask"], image_index=index)
        gathered = model.fuse(image[index], text, inputs["attention_mask"])
    torch.testing.assert_close(indexed.pooler_output, gathered.pooler_output, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(indexed.text_last_hidden_state, gathered.text_last_hidden_state, rtol=1e-5, atol=1e-6)
    if direction == "text_to_image":
        assert indexed.image_last_hidden_state is None
    else:
        torch.testing.assert_close(indexed.image_last_hidden_state, gathered.image_last_hidden_state)
    with pytest.raises(ValueError, match=r"image_index hold ids from 0 to 5 .* the fusion module accepts \[0, 3\)"):
        model.fuse(image, text, inputs["attention_mask"], image_index=torch.tensor([0, 5, 1]))
    with pytest.raises(ValueError, match=r"image_index must be 3 indices in \[0, 3\), got shape \(2,\)"):
        model.fuse(image, text, inputs["attention_mask"], image_index=torch.tensor([0, 1]))
