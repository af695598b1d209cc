"""CoOp prompt learning: the text tower's inputs_embeds path, the learner's prompts, training with frozen towers,
saving and loading, the zero-shot helper, and the benchmark script on tiny sizes."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from test_training_inference import save_tiny_model, solid
from transformers import BertConfig

from xmodal import XModalConfig, XModalModel, XModalProcessor
from xmodal.configuration import XModalVisionConfig
from xmodal.training.data import COLORS
from xmodal.training.inference.embeddings import embed_images, embed_texts
from xmodal.training.inference.index import text_fingerprint
from xmodal.training.inference.zero_shot import ZeroShotClassifier
from xmodal.training.transfer.prompt_learning import (
    DEFAULT_NUM_CONTEXT,
    PROMPTS_FILE,
    PromptLearner,
    load_prompts,
    train_prompts,
)

COLOURS = ["red", "green", "blue", "yellow"]
TINY_TOWERS = {
    name: {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    for name in ("vision_config", "text_config", "cross_config")
}
BENCH = Path(__file__).resolve().parents[1] / "bench" / "prompt_learning.py"


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny tensors gain nothing from a second thread, and lose much when other processes share the two cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _colour_model(folder: Path, steps: int = 60) -> tuple[XModalModel, XModalProcessor]:
    """The tiny model of test_training_inference, trained contrastively for a few steps to match each colour name
    with its solid-colour image (so that prompts matter: a random text tower embeds every prompt alike), saved. From
    some initialisations 60 steps stay on (or barely leave) the plateau where every caption is embedded alike (loss
    ln 8); from seed 3's the prompts then lower the loss by 1.0 and 2.7, far above the tests' 0.05 (the draw depends
    on the order the modules are built and initialised in)."""
    model, processor = save_tiny_model(folder, seed=3)
    names = list(COLORS)
    pixel_values = processor(images=[solid(name) for name in names], return_tensors="pt")["pixel_values"]
    text = processor(text=names, padding=True, return_tensors="pt")
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(steps):
        noisy = pixel_values + 0.1 * torch.randn(pixel_values.shape, generator=generator)
        loss = model(**text, pixel_values=noisy, return_loss=True).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.zero_grad(set_to_none=True)
    model.eval().save_pretrained(folder)
    return model, processor


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[XModalModel, XModalProcessor, Path]:
    folder = tmp_path_factory.mktemp("colour-model")
    model, processor = _colour_model(folder)
    return model, processor, folder


@pytest.fixture(scope="module")
def colour_images() -> tuple[list, list[int]]:
    """Two images per colour: the solid colour, and the same with a white square in a corner."""
    images, labels = [], []
    for index, colour in enumerate(COLOURS):
        marked = solid(colour)
        marked.paste((255, 255, 255), (0, 0, 4, 4))
        images += [solid(colour), marked]
        labels += [index, index]
    return images, labels


def _loss(learner: PromptLearner, model: XModalModel, image_embeds: torch.Tensor, labels: list[int]) -> float:
    with torch.no_grad():
        logits = model.logits(image_embeds, learner(model)).t()
    return F.cross_entropy(logits, torch.tensor(labels)).item()


def test_inputs_embeds_equal_input_ids_for_the_builtin_and_a_bert_text_tower(tester):
    inputs = tester.get_inputs()
    builtin = XModalModel(tester.get_config()).eval()
    bert_config = BertConfig(
        vocab_size=tester.vocab_size, hidden_size=48, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37
    )
    vision_config = XModalVisionConfig(
        image_size=16, patch_size=4, hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4
    )
    bert = XModalModel(XModalConfig.from_vision_text_configs(vision_config, bert_config, projection_dim=16)).eval()
    for model in (builtin, bert):
        mask = inputs["attention_mask"]
        with torch.no_grad():
            from_ids = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=mask)
            embeds = model.get_input_embeddings()(inputs["input_ids"])
            from_embeds = model.get_text_features(inputs_embeds=embeds, attention_mask=mask)
        torch.testing.assert_close(from_embeds.pooler_output, from_ids.pooler_output, rtol=0, atol=1e-6)
        torch.testing.assert_close(from_embeds.last_hidden_state, from_ids.last_hidden_state, rtol=0, atol=1e-6)
        with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
            model.get_text_features(input_ids=inputs["input_ids"], inputs_embeds=embeds)
        with pytest.raises(ValueError, match="input_ids is required .* or instead inputs_embeds"):
            model.get_text_features(attention_mask=mask)
    # the built-in tower checks the embeddings' shape
    with pytest.raises(ValueError, match=r"inputs_embeds must have shape \(batch_size, sequence_length, 32\)"):
        builtin.get_text_features(inputs_embeds=torch.zeros(2, 5, 31))
    with pytest.raises(ValueError, match="Give exactly one of input_ids"):
        builtin.text_model.embeddings()


def test_prompt_layout_shapes_and_initialisation(tiny):
    model, processor, _ = tiny
    names = ["red circle", "star"]
    shared = PromptLearner.from_class_names(model, processor, names)
    hidden = model.config.text_config.hidden_size
    assert shared.context.shape == (DEFAULT_NUM_CONTEXT, hidden) and not shared.class_specific
    assert set(shared.state_dict()) == {"context", "input_ids", "attention_mask"}  # no model weights
    assert [name for name, _ in shared.named_parameters()] == ["context"]
    assert 0.01 < shared.context.std().item() < 0.03  # N(0, 0.02)
    tokenizer = processor.tokenizer
    red_circle = tokenizer("red circle")["input_ids"]  # [CLS] red circle [SEP]
    assert shared.context_start == 1
    assert shared.input_ids[0, :1].tolist() == red_circle[:1]
    assert shared.input_ids[0, 1 + DEFAULT_NUM_CONTEXT :].tolist() == red_circle[1:]
    assert shared.attention_mask.sum(dim=1).tolist() == [DEFAULT_NUM_CONTEXT + 4, DEFAULT_NUM_CONTEXT + 3]
    embeddings = shared(model)
    assert embeddings.shape == (2, model.config.projection_dim)
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(2))

    specific = PromptLearner.from_class_names(model, processor, names, num_context=3, class_specific=True, seed=1)
    assert specific.context.shape == (2, 3, hidden) and specific.class_specific
    assert not torch.equal(specific.context[0], specific.context[1])

    # a phrase initialises the context: the untrained prompts embed exactly like the tokenized text
    phrase = "a red green"
    initialised = PromptLearner.from_class_names(model, processor, names, context_init=phrase, class_specific=True)
    assert initialised.num_context == 3 and initialised.context.shape == (2, 3, hidden)
    with torch.no_grad():
        learned = initialised(model)
    torch.testing.assert_close(learned, embed_texts(model, processor, [f"{phrase} {name}" for name in names]))

    with pytest.raises(ValueError, match="num_context=2 differs from the 3 tokens of context_init"):
        PromptLearner.from_class_names(model, processor, names, num_context=2, context_init=phrase)
    with pytest.raises(ValueError, match="num_context must be a positive integer"):
        PromptLearner.from_class_names(model, processor, names, num_context=0)
    with pytest.raises(ValueError, match="over the text tower's 24 positions"):
        PromptLearner.from_class_names(model, processor, names, num_context=21)
    with pytest.raises(ValueError, match="duplicates"):
        PromptLearner.from_class_names(model, processor, ["star", "star"])


def test_training_moves_only_the_context_and_lowers_the_loss(tiny, colour_images):
    model, processor, _ = tiny
    images, labels = colour_images
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    model.text_projection.weight.requires_grad_(False)  # a flag the caller set must survive training
    model.train()
    try:
        image_embeds = embed_images(model, processor, images)
        model.train()
        for class_specific in (False, True):
            initial = PromptLearner.from_class_names(model, processor, COLOURS, class_specific=class_specific, seed=3)
            learner = train_prompts(
                model,
                processor,
                images,
                labels,
                COLOURS,
                class_specific=class_specific,
                steps=25,
                batch_size=4,
                seed=3,
            )
            assert not torch.equal(learner.context, initial.context)
            assert _loss(learner, model, image_embeds, labels) < _loss(initial, model, image_embeds, labels) - 0.05
            assert not learner.training
        # the model is untouched: same weights, no gradients, flags and mode restored
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, before[name]), name
        assert all(parameter.grad is None for parameter in model.parameters())
        assert not model.text_projection.weight.requires_grad and model.logit_scale.requires_grad
        assert model.training
    finally:
        model.text_projection.weight.requires_grad_(True)
        model.eval()
    # precomputed image embeddings and class-name labels give the same learner as images and indices
    from_embeds = train_prompts(
        model, processor, None, [COLOURS[i] for i in labels], COLOURS, image_embeds=image_embeds, steps=3, seed=3
    )
    from_images = train_prompts(model, processor, images, labels, COLOURS, steps=3, seed=3)
    torch.testing.assert_close(from_embeds.context, from_images.context)
    with pytest.raises(ValueError, match="exactly one of images and image_embeds"):
        train_prompts(model, processor, images, labels, COLOURS, image_embeds=image_embeds)
    with pytest.raises(ValueError, match="Label 'pink' is not one of the class names"):
        train_prompts(model, processor, images, ["pink"] * len(images), COLOURS, steps=1)
    with pytest.raises(ValueError, match="class indices in \\[0, 4\\)"):
        train_prompts(model, processor, images, [4] * len(images), COLOURS, steps=1)
    with pytest.raises(ValueError, match="Got 3 labels for 8 images"):
        train_prompts(model, processor, images, labels[:3], COLOURS, steps=1)


def test_save_and_load_round_trip_and_refuse_another_text_tower(tiny, colour_images, tmp_path):
    model, processor, folder = tiny
    images, labels = colour_images
    learner = train_prompts(model, processor, images, labels, COLOURS, class_specific=True, num_context=2, steps=2)
    written = learner.save_prompts(folder)
    assert written == folder / PROMPTS_FILE and written.stat().st_size < 8192
    # reloaded from the saved model folder (a fresh model object): identical context and class embeddings
    reloaded_model = XModalModel.from_pretrained(folder).eval()
    loaded = load_prompts(folder, reloaded_model)
    assert loaded.class_names == COLOURS and loaded.num_context == 2 and loaded.class_specific
    assert torch.equal(loaded.context, learner.context)
    with torch.no_grad():
        assert torch.equal(loaded(reloaded_model), learner(model))
    single_file = learner.save_prompts(tmp_path / "colours.safetensors")
    assert torch.equal(load_prompts(single_file, model).context, learner.context)

    # another text tower (other weights) is refused; another image tower is not
    other, _ = save_tiny_model(tmp_path / "other", seed=1)
    with pytest.raises(ValueError, match="learned on another text tower"):
        load_prompts(folder, other)
    with pytest.raises(ValueError, match="learned on another text tower"):
        ZeroShotClassifier(other, processor, COLOURS, prompts=learner)
    other.text_model.load_state_dict(model.text_model.state_dict())
    other.text_projection.load_state_dict(model.text_projection.state_dict())
    assert text_fingerprint(other) == text_fingerprint(model)
    assert load_prompts(folder, other).class_names == COLOURS

    with pytest.raises(FileNotFoundError, match="No learned prompts"):
        load_prompts(tmp_path / "nowhere", model)
    save_file({"context": torch.zeros(1)}, str(tmp_path / "foreign.safetensors"), metadata={"format": "other"})
    with pytest.raises(ValueError, match="not an xmodal prompts file"):
        load_prompts(tmp_path / "foreign.safetensors", model)


def test_zero_shot_classifier_uses_learned_prompts(tiny):
    model, processor, _ = tiny
    images, labels = [solid(colour) for colour in COLOURS], list(range(len(COLOURS)))
    learner = train_prompts(model, processor, images, labels, COLOURS, class_specific=True, steps=10)
    classifier = ZeroShotClassifier(model, processor, COLOURS, prompts=learner)
    assert classifier.templates is None and classifier.prompts is learner
    with torch.no_grad():
        class_embeddings = learner(model)
        expected = model.logits(embed_images(model, processor, images), class_embeddings).t().softmax(dim=-1)
    torch.testing.assert_close(classifier.label_embeddings, class_embeddings)
    probabilities = classifier(images)
    torch.testing.assert_close(probabilities, expected)
    assert not torch.allclose(probabilities, ZeroShotClassifier(model, processor, COLOURS)(images), atol=1e-2)
    # a class-specific context reorders / subsets by name, and knows no other names
    reordered = ZeroShotClassifier(model, processor, ["blue", "red"], prompts=learner)
    torch.testing.assert_close(reordered.label_embeddings, classifier.label_embeddings[[2, 0]])
    with pytest.raises(ValueError, match="class-specific context, learned for"):
        ZeroShotClassifier(model, processor, ["red", "pink"], prompts=learner)
    with pytest.raises(ValueError, match="not both"):
        ZeroShotClassifier(model, processor, COLOURS, templates="a {}.", prompts=learner)
    # a shared context transfers to new class names
    shared = train_prompts(model, processor, images, labels, COLOURS, steps=2)
    transferred = ZeroShotClassifier(model, processor, ["pink", "red"], prompts=shared)
    assert transferred.prompts.class_names == ["pink", "red"]
    assert torch.equal(transferred.prompts.context, shared.context)
    with torch.no_grad():
        torch.testing.assert_close(transferred.label_embeddings[1], shared(model)[0])


def test_bench_runs_on_tiny_sizes(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_prompt_learning", BENCH)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # dataclasses look their module up
    spec.loader.exec_module(bench)
    output = tmp_path / "result.json"
    bench.main(
        [
            "--datasets",
            "synthetic",
            "--pretrain_steps",
            "2",
            "--batch_size",
            "8",
            "--num_train_examples",
            "48",
            "--num_test_examples",
            "24",
            "--shots",
            "1",
            "2",
            "--seeds",
            "2",
            "--prompt_steps",
            "2",
            "--output",
            str(output),
            "--work_dir",
            str(tmp_path / "work"),
            "--num_eval_examples",
            "16",
            "--config_overrides",
            json.dumps(TINY_TOWERS),
        ]
    )
    result = json.loads(output.read_text())
    dataset = result["datasets"]["synthetic"]
    assert result["machine"]["cores"] >= 1 and dataset["num_test_images"] == 24
    assert set(dataset["tasks"]) == {"shape", "colour"}
    for task in dataset["tasks"].values():
        assert 0.0 <= task["hand_written"]["accuracy"] <= 1.0
        assert [row["shots"] for row in task["few_shot"]] == [1, 1, 1, 2, 2, 2]
        assert all(len(row["accuracies"]) == 2 and 0 <= row["median_accuracy"] <= 1 for row in task["few_shot"])
    assert "| synthetic: shape, 6 classes (24) | CoOp, shared context |" in bench.markdown_table(result)


def test_zero_shot_command_uses_learned_prompts(tiny, tmp_path, capsys):
    from xmodal.training.cli import main

    model, processor, folder = tiny
    images, labels = [solid(colour) for colour in COLOURS], list(range(len(COLOURS)))
    learner = train_prompts(model, processor, images, labels, COLOURS, class_specific=True, steps=10)
    prompts = learner.save_prompts(tmp_path / "prompts.safetensors")
    image = tmp_path / "red.png"
    images[0].save(image)
    assert main(["zero-shot", str(image), "--model", str(folder), "--prompts", str(prompts), "--top_k", "2"]) == 0
    rows = capsys.readouterr().out.splitlines()[2:4]
    expected = ZeroShotClassifier(model, processor, COLOURS, prompts=learner).classify([image], top_k=2)[0]
    assert [row.split()[1] for row in rows] == [label for label, _ in expected]
    with pytest.raises(SystemExit) as exit_info:
        main(["zero-shot", str(image), "--model", str(folder), "--prompts", str(prompts), "--templates", "a {}."])
    assert exit_info.value.code == 2 and "not both" in capsys.readouterr().err
