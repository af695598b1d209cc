"""Model cards (YAML metadata, model-index, pictures, how-to-use snippet, repo retargeting) and the card pictures."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from PIL import Image

from xmodal import XModalModel, train_tokenizer
from xmodal.training.data import make_synthetic_dataset
from xmodal.training.pretraining.builders import build_processor
from xmodal.training.publishing.cards import (
    CARD_TAGS,
    render_model_card,
    retarget_model_card,
    write_model_card,
)
from xmodal.training.publishing.plots import (
    PALETTE,
    nice_ticks,
    plot_loss_curve,
    plot_retrieval_example,
    retrieval_example_picture,
)

METRICS = {
    "test_text_to_image_R@1": 0.25,
    "test_text_to_image_R@5": 0.5,
    "test_image_to_text_R@1": 0.125,
    "test_zero_shot_top1": 0.6,
    "test_zero_shot_top5": 0.9,
    "test_vqa_accuracy": 0.4321,
    "test_captioning_bleu4": 0.12,
    "test_captioning_cider": 0.85,
    "validation_text_to_image_R@1": 0.3,
    "test_chance_R@1": 0.001,  # known to the run, not a card metric
    "test_text_to_image_mean_rank": 3.5,
    "test_something_new": 0.7,
}


def test_card_metadata_and_model_index(tester):
    card = render_model_card(
        tester.get_config(),
        METRICS,
        repo_id="alice/xmodal-demo",
        datasets=["alice/shapes"],
        base_model="sentence-transformers/all-MiniLM-L6-v2",
        tags=["image-captioning", "xmodal"],
    )
    data = ModelCard(str(card)).data  # what the Hub reads back from the YAML block
    assert data.library_name == "transformers" and data.license == "apache-2.0"
    assert data.pipeline_tag == "zero-shot-image-classification"
    assert data.tags == CARD_TAGS + ["image-captioning"]
    assert {"multimodal", "custom_code", "contrastive-learning"} <= set(data.tags)
    assert data.datasets == ["alice/shapes"] and data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert data.metrics == ["accuracy", "bleu", "cider", "recall"]
    assert data.model_name == "xmodal-demo"
    results = {
        (r.dataset_split, r.metric_name): (r.task_type, r.metric_type, r.metric_value) for r in data.eval_results
    }
    assert results == {
        ("test", "Text-to-image Recall@1"): ("image-text-retrieval", "recall", 25.0),
        ("test", "Text-to-image Recall@5"): ("image-text-retrieval", "recall", 50.0),
        ("test", "Image-to-text Recall@1"): ("image-text-retrieval", "recall", 12.5),
        ("test", "Zero-shot top-1 accuracy"): ("zero-shot-image-classification", "accuracy", 60.0),
        ("test", "Zero-shot top-5 accuracy"): ("zero-shot-image-classification", "accuracy", 90.0),
        ("test", "VQA accuracy"): ("visual-question-answering", "accuracy", 43.21),
        ("test", "BLEU-4"): ("image-to-text", "bleu", 12.0),
        ("test", "CIDEr"): ("image-to-text", "cider", 85.0),
        ("validation", "Text-to-image Recall@1"): ("image-text-retrieval", "recall", 30.0),
    }
    assert "| Visual question answering | VQA accuracy | test | 43.2 |" in card.text
    assert "something_new" not in str(card) and "mean_rank" not in str(card)


@pytest.mark.parametrize(
    ("architecture", "pipeline_tag"),
    [
        ("XModalForPreTraining", "zero-shot-image-classification"),
        ("XModalForImageClassification", "image-classification"),
        ("XModalForConditionalGeneration", "image-to-text"),
        ("XModalForVisualQuestionAnswering", "visual-question-answering"),
    ],
)
def test_pipeline_tag_follows_the_saved_head(tester, architecture, pipeline_tag):
    config = tester.get_config()
    config.architectures = [architecture]
    assert render_model_card(config, {}).data.pipeline_tag == pipeline_tag
    assert render_model_card(config, {}, pipeline_tag="feature-extraction").data.pipeline_tag == "feature-extraction"


def test_card_without_evaluation(tester):
    card = render_model_card(tester.get_config(), {"test_chance_R@1": 0.01})
    assert "No evaluation was run." in card.text
    assert card.data.eval_results is None and card.data.metrics is None
    assert "model-index" not in str(card) and "![" not in card.text


def test_write_model_card_with_pretrains_arguments_draws_the_loss_curve(tester, tmp_path):
    folder = tmp_path / "xmodal-run"
    folder.mkdir()
    metrics = {
        "losses": [4.0 - 0.05 * step for step in range(40)],
        "objectives": ["contrastive", "itm"],
        "objective_losses": {"contrastive": [3.0] * 40, "itm": [1.0] * 40},
        "train_steps": 40,
        "train_pairs": 640,
        "train_seconds": 1.5,
        "first_loss": 4.0,
        "final_loss": 2.05,
        **METRICS,
    }
    # the call in training/pretraining/loop.py
    path = write_model_card(folder, tester.get_config(), metrics, training_arguments={"lr": 5e-4}, num_parameters=1234)
    card = (folder / "README.md").read_text()
    assert path == str(folder / "README.md")
    assert "![training loss](loss_curve.png)" in card and "retrieval_example.png" not in card
    assert Image.open(folder / "loss_curve.png").size == (800, 480)
    assert 'AutoModel.from_pretrained("your-name/xmodal-run", trust_remote_code=True)' in card
    assert "image-text matching" in card and "| parameters | 1,234 |" in card and "- `lr`: 0.0005" in card

    Image.new("RGB", (40, 20), "white").save(folder / "retrieval_example.png")
    (folder / "loss_curve.png").unlink()
    write_model_card(folder, tester.get_config(), metrics, plot_losses=False, repo_id="bob/demo")
    card = (folder / "README.md").read_text()
    assert "![retrieval example](retrieval_example.png)" in card and "loss_curve.png" not in card
    assert not (folder / "loss_curve.png").exists() and "# demo\n" in card


def test_retarget_model_card_replaces_the_repo_id_only(tester):
    text = str(render_model_card(tester.get_config(), METRICS, repo_id="your-name/run"))
    retargeted = retarget_model_card(text, "alice/xmodal-shapes")
    assert "your-name/run" not in retargeted
    assert retargeted.count('"alice/xmodal-shapes"') == 3  # AutoModel, AutoProcessor, pipeline
    assert "\n# xmodal-shapes\n" in retargeted
    before, after = ModelCard(text).data, ModelCard(retargeted).data
    assert after.model_name == "xmodal-shapes"
    assert after.eval_results == before.eval_results and after.tags == before.tags
    assert retarget_model_card(retargeted, "alice/xmodal-shapes") == retargeted
    assert retarget_model_card("# a hand-written card\n", "alice/x") == "# a hand-written card\n"


def test_how_to_use_snippets_run_on_a_saved_folder(tester, tmp_path, monkeypatch):
    captions = ["a red circle", "a blue square", "a green triangle"]
    tokenizer = train_tokenizer(captions * 3, vocab_size=40, model_max_length=16)
    config = tester.get_config(text_config={**tester.get_config().text_config.to_dict(), "vocab_size": len(tokenizer)})
    folder = tmp_path / "model"
    XModalModel(config).save_pretrained(folder)
    build_processor(tokenizer, config).save_pretrained(folder)
    Image.new("RGB", (20, 24), (255, 0, 0)).save(tmp_path / "image.png")
    card = render_model_card(config, {}, repo_id=str(folder))
    snippets = re.findall(r"```python\n(.*?)```", card.text, flags=re.DOTALL)
    assert len(snippets) == 2
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for snippet in snippets:
        exec(snippet, namespace)  # the card's own code, with the saved folder as the repo id
    assert namespace["probs"].shape == (1, 2) and torch.allclose(namespace["probs"].sum(), torch.tensor(1.0))
    result = namespace["classifier"]("image.png", candidate_labels=["circle", "square", "triangle"])
    assert sorted(r["label"] for r in result) == ["circle", "square", "triangle"]


def test_nice_ticks():
    assert nice_ticks(1, 240) == [0, 50, 100, 150, 200, 250]
    assert nice_ticks(0.0123, 0.0456) == [0.01, 0.02, 0.03, 0.04, 0.05]
    assert nice_ticks(3, 3) == [2.4, 2.6, 2.8, 3.0, 3.2, 3.4, 3.6]  # a flat curve gets a unit-wide axis
    with pytest.raises(ValueError, match="finite low <= high"):
        nice_ticks(0, math.nan)


def _pixels_of(image: Image.Image, colour: tuple[int, int, int]) -> np.ndarray:
    """(row, column) of the pixels of exactly `colour`."""
    return np.argwhere((np.asarray(image.convert("RGB")) == colour).all(axis=-1))


def test_plot_loss_curve_draws_each_curve_in_its_colour(tmp_path):
    falling = [5.0 * math.exp(-step / 20) + 0.1 * math.sin(step) for step in range(100)]
    rising = [1.0 + step / 100 for step in range(100)]
    rising[50] = math.nan  # left out
    plot_loss_curve({"contrastive": falling, "itm": rising}, tmp_path / "loss.png", title="run")
    image = Image.open(tmp_path / "loss.png")
    assert image.format == "PNG" and image.size == (800, 480)
    for colour, goes_down in ((PALETTE[0], True), (PALETTE[1], False)):
        pixels = _pixels_of(image.crop((80, 48, 776, 418)), colour)  # the plot area, legend excluded below
        pixels = pixels[pixels[:, 1] < 500]
        assert len(pixels) > 300, colour
        left, right = pixels[pixels[:, 1] < 100], pixels[pixels[:, 1] > 400]
        # image rows grow downwards: a falling loss is drawn higher (smaller row) on the left
        assert (left[:, 0].mean() < right[:, 0].mean()) == goes_down, colour
    assert len(_pixels_of(image, PALETTE[2])) == 0

    plot_loss_curve({"loss": [2.0]}, tmp_path / "one.png")
    assert len(_pixels_of(Image.open(tmp_path / "one.png"), PALETTE[0])) > 0
    with pytest.raises(ValueError, match="1 to 10 curves"):
        plot_loss_curve({}, tmp_path / "none.png")
    with pytest.raises(ValueError, match="without any finite value: \\['nan'\\]"):
        plot_loss_curve({"ok": [1.0], "nan": [math.nan]}, tmp_path / "nan.png")
    with pytest.raises(ValueError, match="smoothing_window"):
        plot_loss_curve({"ok": [1.0]}, tmp_path / "w.png", smoothing_window=0)


def test_retrieval_example_picture(tmp_path):
    images = [Image.new("RGB", (16, 16), colour) for colour in ((255, 0, 0), (0, 0, 255), (255, 255, 0))]
    retrieval_example_picture(
        "a red square", images, [0.9, 0.4, 0.1], tmp_path / "strip.png", matches=[True, False, False]
    )
    strip = Image.open(tmp_path / "strip.png")
    assert strip.width == 12 + 3 * (128 + 8 + 12)
    red, blue, yellow = (_pixels_of(strip, c) for c in ((255, 0, 0), (0, 0, 255), (255, 255, 0)))
    assert len(red) == len(blue) == len(yellow) == 128 * 128  # enlarged without blurring
    assert red[:, 1].max() < blue[:, 1].min() and blue[:, 1].max() < yellow[:, 1].min()  # best first
    assert len(_pixels_of(strip, (44, 160, 44))) > 0  # the true match is framed in green
    with pytest.raises(ValueError, match="one score"):
        retrieval_example_picture("q", images, [0.9], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="one score"):
        retrieval_example_picture("q", [], [], tmp_path / "bad.png")


def test_plot_retrieval_example_ranks_by_similarity(tester, tmp_path):
    data = make_synthetic_dataset(num_train=0, num_validation=0, num_test=6, seed=0, image_size=16)["test"]
    tokenizer = train_tokenizer(list(data["text"]) * 2, vocab_size=80, model_max_length=32)
    config = tester.get_config(text_config={**tester.get_config().text_config.to_dict(), "vocab_size": len(tokenizer)})
    torch.manual_seed(0)
    model = XModalModel(config).eval()
    processor = build_processor(tokenizer, config)
    rows = plot_retrieval_example(model, processor, data, tmp_path / "example.png", query_index=2, k=4)
    assert len(rows) == 4 == len(set(rows))
    # one caption against six images: the processor takes them in separate calls (its lists must pair up)
    inputs = {
        **processor(images=list(data["image"]), return_tensors="pt"),
        **processor(text=[data[2]["text"]], padding=True, return_tensors="pt"),
    }
    with torch.no_grad():
        scores = model(**inputs).logits_per_text[0]
    # the top 4 by the model's own similarities, best first (up to float noise between near-ties)
    tolerance = 1e-4 * scores.abs().max().item()
    ranked, others = scores[rows], scores[[row for row in range(6) if row not in rows]]
    assert (ranked[:-1] >= ranked[1:] - tolerance).all() and ranked.min() >= others.max() - tolerance
    assert Image.open(tmp_path / "example.png").width == 12 + 4 * (128 + 8 + 12)
    with pytest.raises(ValueError, match="query_index 6"):
        plot_retrieval_example(model, processor, data, tmp_path / "x.png", query_index=6)
