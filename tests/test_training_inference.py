"""Zero-shot classification with prompt ensembles, and folder retrieval with its embedding cache.

`save_tiny_model` (a tiny XModalModel and its processor, saved) is also used by test_training_cli.py and
test_training_transfer_finetune.py.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from xmodal import XModalConfig, XModalImageProcessor, XModalModel, XModalProcessor
from xmodal.processing import train_tokenizer
from xmodal.training.data import COLORS, SHAPES, caption_corpus, make_synthetic_dataset
from xmodal.training.inference.index import (
    CACHE_PREFIX,
    embedding_fingerprint,
    index_image_folder,
    list_images,
    rank_images,
    rank_texts,
)
from xmodal.training.inference.zero_shot import DEFAULT_TEMPLATES, ZeroShotClassifier, ensemble_text_embeddings

IMAGE_SIZE = 32


def tiny_processor() -> XModalProcessor:
    """A 32 px processor with a WordPiece vocabulary trained on procedural captions (every colour and shape a
    single token)."""
    scenes = make_synthetic_dataset(num_train=16, num_validation=0, num_test=0, seed=0, image_size=IMAGE_SIZE)
    corpus = list(caption_corpus(scenes)) + [" ".join([*COLORS, *SHAPES])] * 20
    tokenizer = train_tokenizer(corpus, vocab_size=200, model_max_length=24)
    image_processor = XModalImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return XModalProcessor(image_processor=image_processor, tokenizer=tokenizer)


def save_tiny_model(folder: Path, seed: int = 0) -> tuple[XModalModel, XModalProcessor]:
    """A randomly initialised XModalModel (hidden 32, one layer per tower and a fusion layer, 32 px images) and its
    processor, saved to `folder` like a pretrained checkpoint."""
    processor = tiny_processor()
    tower = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2}
    config = XModalConfig(
        vision_config={**tower, "image_size": IMAGE_SIZE, "patch_size": 8},
        text_config={
            **tower,
            "vocab_size": len(processor.tokenizer),
            "max_position_embeddings": 24,
            "hidden_dropout_prob": 0.0,
            "attention_dropout": 0.0,
        },
        cross_config=tower,
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = XModalModel(config).eval()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor


def solid(colour: str) -> Image.Image:
    return Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), COLORS[colour])


class ColourModel(torch.nn.Module):
    """A model whose features we control: an image's feature is its mean normalised colour; a text's is the sum of the
    mean normalised colours of the colour words it contains (every other token contributes nothing). So the image of
    a colour has cosine similarity exactly 1 with any text naming only that colour. Counts the images it embeds."""

    def __init__(self, processor: XModalProcessor) -> None:
        super().__init__()
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(10.0)))
        colours = torch.zeros(len(processor.tokenizer), 3)
        for name in COLORS:
            ids = processor.tokenizer(name, add_special_tokens=False)["input_ids"]
            assert len(ids) == 1, (name, ids)
            colours[ids[0]] = processor(images=[solid(name)], return_tensors="pt")["pixel_values"].mean(dim=(2, 3))[0]
        self.register_buffer("token_colours", colours)
        self.images_embedded = 0

    def get_image_features(self, pixel_values: torch.Tensor) -> SimpleNamespace:
        self.images_embedded += len(pixel_values)
        return SimpleNamespace(pooler_output=pixel_values.mean(dim=(2, 3)))

    def get_text_features(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: torch.Tensor
    ) -> SimpleNamespace:
        return SimpleNamespace(pooler_output=(self.token_colours[input_ids] * attention_mask[..., None]).sum(dim=1))

    def logits(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        return self.logit_scale.exp() * text_embeds @ image_embeds.t()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[XModalModel, XModalProcessor]:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="module")
def colour_processor() -> XModalProcessor:
    return tiny_processor()


def test_template_ensemble_equals_the_mean_of_normalised_prompt_embeddings(tiny):
    model, processor = tiny
    labels, templates = ["circle", "red square", "star"], ("a photo of {}.", "{} shape here", "{}")

    def embed_one(text: str) -> torch.Tensor:
        inputs = processor(text=[text], return_tensors="pt")
        with torch.no_grad():
            features = model.get_text_features(**inputs).pooler_output[0]
        return F.normalize(features, dim=-1)

    manual = torch.stack(
        [
            F.normalize(torch.stack([embed_one(t.replace("{}", label)) for t in templates]).mean(0), dim=-1)
            for label in labels
        ]
    )
    classifier = ZeroShotClassifier(model, processor, labels, templates, batch_size=2)
    torch.testing.assert_close(classifier.label_embeddings, manual, atol=1e-5, rtol=1e-5)
    # the ensemble is not just one of its templates (beyond the equality tolerance above: a random text tower embeds
    # every prompt nearly alike)
    assert not torch.allclose(manual[0], embed_one("circle"), atol=1e-5, rtol=1e-5)
    # a single template is allowed (a string) and gives that template's normalised embedding
    single = ensemble_text_embeddings(model, processor, labels, "a photo of {}.")
    torch.testing.assert_close(single[0], embed_one("a photo of circle."), atol=1e-5, rtol=1e-5)

    # probabilities: softmax over the labels of exp(logit_scale) * cosine similarity
    images = [solid("red"), solid("blue")]
    with torch.no_grad():
        pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
        image_embeds = F.normalize(model.get_image_features(pixel_values=pixel_values).pooler_output, dim=-1)
        expected = (model.clamped_logit_scale() * image_embeds @ manual.t()).softmax(dim=-1)
    probabilities = classifier(images)
    assert probabilities.shape == (2, 3)
    torch.testing.assert_close(probabilities, expected, atol=1e-5, rtol=1e-4)


def test_default_templates_and_bad_labels_or_templates(tiny):
    model, processor = tiny
    assert len(DEFAULT_TEMPLATES) > 1 and all("{}" in template for template in DEFAULT_TEMPLATES)
    assert ZeroShotClassifier(model, processor, ["circle"]).templates == DEFAULT_TEMPLATES
    with pytest.raises(ValueError, match="no '\\{\\}' placeholder"):
        ZeroShotClassifier(model, processor, ["circle"], ["a photo of {}.", "a photo"])
    with pytest.raises(ValueError, match="at least one label"):
        ZeroShotClassifier(model, processor, [])
    with pytest.raises(ValueError, match="duplicates \\['circle'\\]"):
        ZeroShotClassifier(model, processor, ["circle", "star", "circle"])
    with pytest.raises(TypeError, match="single string"):
        ZeroShotClassifier(model, processor, "circle")


def test_zero_shot_picks_the_colour_of_a_constructed_model(colour_processor, tmp_path):
    model = ColourModel(colour_processor)
    colours = ["red", "green", "blue", "yellow"]
    classifier = ZeroShotClassifier(model, colour_processor, colours, batch_size=3)
    path = tmp_path / "blue.png"
    solid("blue").save(path)
    images = [solid("yellow"), str(path), solid("red"), solid("green")]
    probabilities = classifier(images)
    torch.testing.assert_close(probabilities.sum(dim=-1), torch.ones(4))
    assert probabilities.argmax(dim=-1).tolist() == [3, 2, 0, 1]
    top = classifier.classify(images, top_k=2)
    assert [ranked[0][0] for ranked in top] == ["yellow", "blue", "red", "green"]
    assert all(len(ranked) == 2 and ranked[0][1] >= ranked[1][1] for ranked in top)
    assert len(classifier.classify(images[:1], top_k=None)[0]) == 4
    assert model.images_embedded == 4 + 4 + 1  # one pass per call, labels embedded once
    with pytest.raises(FileNotFoundError, match="missing.png"):
        classifier([tmp_path / "missing.png"])


def _write_images(folder: Path, names_and_colours: dict[str, str]) -> None:
    for name, colour in names_and_colours.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        solid(colour).save(folder / name)


def test_folder_index_caches_reuses_and_refreshes(colour_processor, tmp_path):
    model = ColourModel(colour_processor)
    folder = tmp_path / "photos"
    _write_images(folder, {"red.png": "red", "sub/green.jpg": "green", "sub/deeper/blue.PNG": "blue"})
    (folder / "notes.txt").write_text("not an image")
    _write_images(folder, {".hidden/pink.png": "pink", ".pink.png": "pink"})
    assert list_images(folder) == ["red.png", "sub/deeper/blue.PNG", "sub/green.jpg"]

    first = index_image_folder(model, colour_processor, folder, batch_size=2)
    assert first.num_embedded == 3 and model.images_embedded == 3
    assert first.cache_file.parent == folder and first.cache_file.name.startswith(CACHE_PREFIX)
    assert first.cache_file.is_file() and first.embeddings.shape == (3, 3)
    torch.testing.assert_close(first.embeddings.norm(dim=-1), torch.ones(3))

    second = index_image_folder(model, colour_processor, folder)
    assert second.num_embedded == 0 and model.images_embedded == 3  # nothing re-embedded
    assert second.paths == first.paths
    torch.testing.assert_close(second.embeddings, first.embeddings)

    # a changed file (new content and modification time), a new file and a deleted file
    _write_images(folder, {"red.png": "orange", "new/purple.png": "purple"})
    stat = (folder / "red.png").stat()
    os.utime(folder / "red.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    (folder / "sub/green.jpg").unlink()
    third = index_image_folder(model, colour_processor, folder)
    assert third.paths == ["new/purple.png", "red.png", "sub/deeper/blue.PNG"]
    assert third.num_embedded == 2 and model.images_embedded == 5
    torch.testing.assert_close(third.embeddings[2], first.embeddings[1])  # blue, from the cache
    assert rank_images(model, colour_processor, "orange", third, top_k=1)[0][0] == os.path.join(folder, "red.png")

    # another model (other weights) has another cache
    with torch.no_grad():
        model.token_colours[0, 0] = 1.0
    fourth = index_image_folder(model, colour_processor, folder)
    assert fourth.num_embedded == 3 and fourth.cache_file != third.cache_file
    assert len(list(folder.glob(f"{CACHE_PREFIX}*.safetensors"))) == 2

    # a cache folder elsewhere; without a cache nothing is written
    cache_dir = tmp_path / "cache"
    elsewhere = index_image_folder(model, colour_processor, folder, cache_dir=cache_dir)
    assert elsewhere.num_embedded == 3 and elsewhere.cache_file.parent == cache_dir
    assert index_image_folder(model, colour_processor, folder, cache_dir=cache_dir).num_embedded == 0
    uncached = index_image_folder(model, colour_processor, folder, use_cache=False)
    assert uncached.num_embedded == 3 and uncached.cache_file is None


def test_fingerprint_ignores_where_a_model_was_loaded_from(tiny, tmp_path):
    model, processor = tiny
    model.save_pretrained(tmp_path / "copy")
    reloaded = XModalModel.from_pretrained(tmp_path / "copy")
    assert embedding_fingerprint(reloaded, processor) == embedding_fingerprint(model, processor)
    with torch.no_grad():
        reloaded.visual_projection.weight[0, 0] += 1.0
    assert embedding_fingerprint(reloaded, processor) != embedding_fingerprint(model, processor)


def test_ranking_images_for_a_text_and_texts_for_an_image(colour_processor, tmp_path):
    model = ColourModel(colour_processor)
    colours = ["red", "green", "blue", "yellow", "cyan"]
    _write_images(tmp_path, {f"{colour}.png": colour for colour in colours})
    index = index_image_folder(model, colour_processor, tmp_path)
    ranked = rank_images(model, colour_processor, "a green thing", index, top_k=3)
    assert len(ranked) == 3 and ranked[0] == (os.path.join(tmp_path, "green.png"), pytest.approx(1.0, abs=1e-5))
    assert ranked[0][1] > ranked[1][1] >= ranked[2][1]
    everything = rank_images(model, colour_processor, "a green thing", index, top_k=None)
    assert sorted(path for path, _ in everything) == sorted(os.path.join(tmp_path, f"{c}.png") for c in colours)

    texts = ["a blue square", "a cyan circle", "something yellow", "red"]
    ranked_texts = rank_texts(model, colour_processor, tmp_path / "yellow.png", texts)
    assert [text for text, _ in ranked_texts][0] == "something yellow"
    assert ranked_texts[0][1] == pytest.approx(1.0, abs=1e-5) and len(ranked_texts) == 4
    with pytest.raises(ValueError, match="top_k"):
        rank_texts(model, colour_processor, solid("red"), texts, top_k=0)


def test_missing_or_empty_folders(colour_processor, tmp_path):
    model = ColourModel(colour_processor)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        index_image_folder(model, colour_processor, tmp_path / "nowhere")
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="No image files"):
        index_image_folder(model, colour_processor, tmp_path)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="could be read"):
        index_image_folder(model, colour_processor, tmp_path)
