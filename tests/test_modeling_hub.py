"""The Hub bundle: a saved folder loads with trust_remote_code in a fresh process where xmodal cannot be imported,
gives bit-identical outputs, and serves the zero-shot pipeline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoImageProcessor, AutoProcessor, pipeline

from xmodal import AUTO_MAP, XModalImageProcessor, XModalModel, XModalProcessor, random_patch_mask, train_tokenizer
from xmodal.hub import BUNDLE_MODULES as BUNDLE_FILES

CAPTIONS = ["a red circle", "a blue square", "a green triangle", "two yellow stars", "a purple cross at the top"]


def _images(count: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)) for _ in range(count)]


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory) -> Path:
    from conftest import XModalModelTester

    folder = tmp_path_factory.mktemp("bundle")
    tokenizer = train_tokenizer(CAPTIONS * 3, vocab_size=60, model_max_length=16)
    tester = XModalModelTester(vocab_size=len(tokenizer))
    torch.manual_seed(0)
    model = XModalModel(
        tester.get_config(
            text_config={
                "vocab_size": len(tokenizer),
                "max_position_embeddings": 32,
                "hidden_size": 32,
                "intermediate_size": 37,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "pad_token_id": tokenizer.pad_token_id,
            }
        )
    ).eval()
    processor = XModalProcessor(XModalImageProcessor(size={"height": 16, "width": 16}), tokenizer)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    inputs = processor(images=_images(3), text=CAPTIONS[:3], return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
        fused = model.get_multimodal_features(**inputs).pooler_output
    save_file(
        {**dict(inputs), "logits_per_image": out.logits_per_image.contiguous(), "fused": fused.contiguous()},
        folder / "expected.safetensors",
    )
    return folder


def test_bundle_files_and_auto_map(saved_folder):
    for name in BUNDLE_FILES:
        assert (saved_folder / f"{name}.py").is_file()
    config = json.loads((saved_folder / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP
    processor_config = json.loads((saved_folder / "processor_config.json").read_text())
    assert processor_config["auto_map"]["AutoProcessor"] == "processing_xmodal.XModalProcessor"
    assert processor_config["image_processor"]["auto_map"]["AutoImageProcessor"] == (
        "image_processing_xmodal.XModalImageProcessor"
    )
    assert (saved_folder / "model.safetensors").is_file() and not list(saved_folder.glob("*.bin"))


# Prologue of the scripts run in a fresh process: importing xmodal fails there, as on a machine without it.
_BLOCK_XMODAL = textwrap.dedent(
    """
    import sys

    class _NoXModal:
        def find_spec(self, name, path=None, target=None):
            if name == "xmodal" or name.startswith("xmodal."):
                raise ModuleNotFoundError(f"xmodal is deliberately not importable here: {name}")
            return None

    sys.meta_path.insert(0, _NoXModal())
    """
)

_REMOTE_SCRIPT = _BLOCK_XMODAL + textwrap.dedent(
    """

    import torch
    from PIL import Image
    from safetensors.torch import load_file, save_file
    from transformers import (AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageClassification,
                              AutoModelForZeroShotImageClassification, AutoProcessor, pipeline)

    folder, out_path = sys.argv[1], sys.argv[2]
    expected = load_file(f"{folder}/expected.safetensors")
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    zero_shot = AutoModelForZeroShotImageClassification.from_pretrained(folder, trust_remote_code=True).eval()
    classifier = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True, num_labels=3)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    image_processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    assert type(processor).__name__ == "XModalProcessor" and type(image_processor).__name__ == "XModalImageProcessor"
    inputs = {k: expected[k] for k in ("input_ids", "attention_mask", "pixel_values", "token_type_ids") if k in expected}
    with torch.no_grad():
        logits = model(**inputs).logits_per_image
        fused = model.get_multimodal_features(**inputs).pooler_output
        zs_logits = zero_shot(**inputs).logits_per_image
        class_logits = classifier(pixel_values=inputs["pixel_values"]).logits
    images = [Image.new("RGB", (20, 24), (255, 0, 0))]
    pixel_values = image_processor(images=images, return_tensors="pt")["pixel_values"]
    pipe = pipeline("zero-shot-image-classification", model=folder, trust_remote_code=True)
    result = pipe(images[0], candidate_labels=["a red circle", "a blue square"], hypothesis_template="{}")
    assert len(result) == 2 and abs(sum(r["score"] for r in result) - 1) < 1e-5, result
    # a remotely loaded model saves a complete bundle again
    model.save_pretrained(f"{out_path}.resaved")
    assert "xmodal" not in sys.modules
    save_file({"logits_per_image": logits.contiguous(), "fused": fused.contiguous(), "zs_logits": zs_logits.contiguous(), "pixel_values": pixel_values,
               "class_logits": class_logits}, out_path)
    print("REMOTE-OK", config.model_type, type(classifier).__name__)
    """
)


def _run_without_xmodal(script_text: str, folder: Path, out_path: Path, tmp_path: Path) -> str:
    """Runs `script_text folder out_path` in a fresh offline Python where xmodal cannot be imported; returns stdout."""
    script = tmp_path / "remote_script.py"
    script.write_text(script_text)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    result = subprocess.run(
        [sys.executable, str(script), str(folder), str(out_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def test_remote_code_round_trip_without_xmodal(saved_folder, tmp_path):
    out_path = tmp_path / "remote_outputs.safetensors"
    stdout = _run_without_xmodal(_REMOTE_SCRIPT, saved_folder, out_path, tmp_path)
    assert "REMOTE-OK xmodal XModalForImageClassification" in stdout
    remote = load_file(out_path)
    expected = load_file(saved_folder / "expected.safetensors")
    assert torch.equal(remote["logits_per_image"], expected["logits_per_image"])
    assert torch.equal(remote["zs_logits"], expected["logits_per_image"])
    assert torch.equal(remote["fused"], expected["fused"])
    local_pixels = XModalProcessor.from_pretrained(saved_folder)(
        images=[Image.new("RGB", (20, 24), (255, 0, 0))], return_tensors="pt"
    )["pixel_values"]
    assert torch.equal(remote["pixel_values"], local_pixels)
    resaved = Path(f"{out_path}.resaved")
    for name in BUNDLE_FILES:
        assert (resaved / f"{name}.py").read_text() == (saved_folder / f"{name}.py").read_text()
    assert json.loads((resaved / "config.json").read_text())["auto_map"] == AUTO_MAP


def test_processor_round_trip_through_auto_classes(saved_folder):
    processor = AutoProcessor.from_pretrained(saved_folder)
    assert isinstance(processor, XModalProcessor)
    assert isinstance(AutoImageProcessor.from_pretrained(saved_folder), XModalImageProcessor)
    original = XModalProcessor.from_pretrained(saved_folder)
    a = processor(images=_images(2), text=CAPTIONS[:2], return_tensors="pt")
    b = original(images=_images(2), text=CAPTIONS[:2], return_tensors="pt")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_zero_shot_pipeline_with_installed_package(saved_folder):
    classifier = pipeline("zero-shot-image-classification", model=str(saved_folder))
    labels = ["a red circle", "a blue square", "a green triangle"]
    result = classifier(_images(1)[0], candidate_labels=labels, hypothesis_template="{}")
    assert sorted(r["label"] for r in result) == sorted(labels)
    assert abs(sum(r["score"] for r in result) - 1.0) < 1e-5
    assert [r["score"] for r in result] == sorted((r["score"] for r in result), reverse=True)
    # the pipeline's scores are the model's softmax over labels
    model = XModalModel.from_pretrained(saved_folder).eval()
    processor = XModalProcessor.from_pretrained(saved_folder)
    inputs = processor(images=_images(1)[0], text=labels, return_tensors="pt")
    with torch.no_grad():
        probs = model(**inputs).logits_per_image.softmax(-1)[0]
    by_label = {r["label"]: r["score"] for r in result}
    np.testing.assert_allclose([by_label[label] for label in labels], probs.numpy(), atol=1e-5)


def test_save_with_push_is_refused_where_it_would_upload_an_incomplete_bundle(saved_folder, tmp_path):
    # config and processor saves would upload before the bundle is written: refused before any network call.
    # (model.save_pretrained(push_to_hub=True) is fine: the config's bundle is written before its upload.)
    config = XModalModel.config_class.from_pretrained(saved_folder)
    with pytest.raises(ValueError, match=r"call \.push_to_hub\(repo_id\) instead"):
        config.save_pretrained(tmp_path / "push", push_to_hub=True)
    with pytest.raises(ValueError, match="incomplete remote-code bundle"):
        XModalProcessor.from_pretrained(saved_folder).save_pretrained(tmp_path / "push", push_to_hub=True)


_HEADS_REMOTE_SCRIPT = _BLOCK_XMODAL + textwrap.dedent(
    """

    import torch
    from safetensors.torch import load_file, save_file
    from transformers import (AutoModelForImageTextToText, AutoModelForMaskedLM, AutoModelForPreTraining,
                              AutoModelForVisualQuestionAnswering)

    folder, out_path = sys.argv[1], sys.argv[2]
    inputs = load_file(f"{folder}/inputs.safetensors")
    results = {}
    for auto_class in (AutoModelForPreTraining, AutoModelForMaskedLM, AutoModelForImageTextToText,
                       AutoModelForVisualQuestionAnswering):
        model = auto_class.from_pretrained(folder, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        results[type(model).__name__] = model
    with torch.no_grad():
        torch.manual_seed(0)
        out = results["XModalForPreTraining"](**inputs, return_loss=True)
        mlm = results["XModalForMaskedLM"](input_ids=inputs["mlm_input_ids"], pixel_values=inputs["pixel_values"],
                                           attention_mask=inputs["attention_mask"], labels=inputs["mlm_labels"])
        vqa = results["XModalForVisualQuestionAnswering"](input_ids=inputs["question_input_ids"],
                                                          pixel_values=inputs["pixel_values"])
        captions = results["XModalForConditionalGeneration"].generate(pixel_values=inputs["pixel_values"],
                                                                      max_new_tokens=5, num_beams=2)
    assert "xmodal" not in sys.modules
    save_file({"loss": out.loss, "mlm_loss": mlm.loss, "vqa_logits": vqa.logits.contiguous(), "captions": captions.contiguous()},
              out_path)
    print("HEADS-REMOTE-OK", sorted(results))
    """
)


def test_every_head_loads_from_the_bundle_without_xmodal(tmp_path):
    from conftest import XModalModelTester

    from xmodal import (
        XModalForConditionalGeneration,
        XModalForMaskedLM,
        XModalForPreTraining,
        XModalForVisualQuestionAnswering,
    )

    tester = XModalModelTester()
    torch.manual_seed(0)
    model = XModalForPreTraining(tester.get_config(num_labels=5, queue_size=6, save_queue=True)).eval()
    folder = tmp_path / "pretraining"
    model.save_pretrained(folder)
    generator = torch.Generator().manual_seed(1)
    inputs = tester.get_inputs()
    inputs["mlm_input_ids"] = inputs["input_ids"].clone()
    inputs["mlm_input_ids"][:, 1] = 4
    inputs["mlm_labels"] = torch.full_like(inputs["input_ids"], -100)
    inputs["mlm_labels"][:, 1] = inputs["input_ids"][:, 1]
    inputs["bool_masked_pos"] = random_patch_mask(3, 16, 0.5, generator=generator)
    inputs["question_input_ids"] = torch.randint(5, 99, (3, 5), generator=generator)
    inputs["vqa_labels"] = torch.tensor([0, 4, 2])
    save_file(inputs, folder / "inputs.safetensors")
    with torch.no_grad():
        torch.manual_seed(0)
        expected_loss = model(**inputs, return_loss=True).loss
        mlm_loss = (
            XModalForMaskedLM.from_pretrained(folder)
            .eval()(
                input_ids=inputs["mlm_input_ids"],
                pixel_values=inputs["pixel_values"],
                attention_mask=inputs["attention_mask"],
                labels=inputs["mlm_labels"],
            )
            .loss
        )
        vqa_logits = (
            XModalForVisualQuestionAnswering.from_pretrained(folder)
            .eval()(input_ids=inputs["question_input_ids"], pixel_values=inputs["pixel_values"])
            .logits
        )
        captions = (
            XModalForConditionalGeneration.from_pretrained(folder)
            .eval()
            .generate(pixel_values=inputs["pixel_values"], max_new_tokens=5, num_beams=2)
        )
    out_path = tmp_path / "remote_heads.safetensors"
    assert "HEADS-REMOTE-OK" in _run_without_xmodal(_HEADS_REMOTE_SCRIPT, folder, out_path, tmp_path)
    remote = load_file(out_path)
    assert torch.equal(remote["loss"], expected_loss)
    assert torch.equal(remote["mlm_loss"], mlm_loss)
    assert torch.equal(remote["vqa_logits"], vqa_logits)
    assert torch.equal(remote["captions"], captions)


_PIPELINES_SCRIPT = _BLOCK_XMODAL + textwrap.dedent(
    """

    import json
    from PIL import Image
    from transformers import pipeline

    folder, out_path = sys.argv[1], sys.argv[2]
    image = Image.new("RGB", (20, 24), (255, 0, 0))
    results = {
        "image-feature-extraction": pipeline("image-feature-extraction", model=folder, trust_remote_code=True)(image),
        "feature-extraction": pipeline("feature-extraction", model=folder, trust_remote_code=True)("a red circle"),
    }
    captioner = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
    results["caption"] = captioner(images=image, text="", max_new_tokens=6)[0]["generated_text"]
    results["continued"] = captioner(images=image, text="a red", max_new_tokens=6)[0]["generated_text"]
    results["image-to-text"] = pipeline("image-to-text", model=folder, trust_remote_code=True)(
        image, text="", max_new_tokens=6
    )[0]["generated_text"]
    assert "xmodal" not in sys.modules
    with open(out_path, "w") as handle:
        json.dump(results, handle)
    print("PIPELINES-OK")
    """
)


def test_pipelines_on_the_bundle_without_xmodal(tmp_path):
    """Every transformers 5 pipeline task that fits an xmodal checkpoint, in a process without xmodal: embeddings
    (`image-feature-extraction`, `feature-extraction`) equal the model's, and captions (`image-text-to-text`, and
    `image-to-text`, its alias in transformers 5) equal `generate`'s. (`visual-question-answering` is no pipeline
    task in transformers 5: ask the question as the `image-text-to-text` prompt, or call
    XModalForVisualQuestionAnswering.)"""
    from conftest import XModalModelTester

    from xmodal import XModalForConditionalGeneration, XModalForPreTraining

    folder = tmp_path / "bundle"
    tokenizer = train_tokenizer(CAPTIONS * 3, vocab_size=60, model_max_length=16)
    tester = XModalModelTester(vocab_size=len(tokenizer))
    text = {"vocab_size": len(tokenizer), "max_position_embeddings": 32, "pad_token_id": tokenizer.pad_token_id}
    torch.manual_seed(0)
    XModalForPreTraining(
        tester.get_config(text_config=text, decoder_config={"vocab_size": len(tokenizer)})
    ).save_pretrained(folder)
    processor = XModalProcessor(XModalImageProcessor(size={"height": 16, "width": 16}), tokenizer)
    processor.save_pretrained(folder)
    out_path = tmp_path / "pipelines.json"
    assert "PIPELINES-OK" in _run_without_xmodal(_PIPELINES_SCRIPT, folder, out_path, tmp_path)
    remote = json.loads(out_path.read_text())

    image = Image.new("RGB", (20, 24), (255, 0, 0))
    model = XModalModel.from_pretrained(folder).eval()
    captioner = XModalForConditionalGeneration.from_pretrained(folder).eval()
    with torch.no_grad():
        pixel_values = processor(images=image, return_tensors="pt")["pixel_values"]
        image_embeds = model(pixel_values=pixel_values).image_embeds
        text_embeds = model(**processor(text="a red circle", return_tensors="pt")).text_embeds
        caption = captioner.generate(pixel_values=pixel_values, max_new_tokens=6)
        prompt = processor(text="a red", return_tensors="pt")["input_ids"][:, :-1]  # without its [SEP]
        continued = captioner.generate(pixel_values=pixel_values, input_ids=prompt, max_new_tokens=6)
    np.testing.assert_allclose(remote["image-feature-extraction"], image_embeds.numpy(), atol=1e-6)
    np.testing.assert_allclose(remote["feature-extraction"], text_embeds.numpy(), atol=1e-6)
    assert remote["caption"] == remote["image-to-text"] == tokenizer.decode(caption[0], skip_special_tokens=True)
    assert remote["continued"] == tokenizer.decode(continued[0], skip_special_tokens=True)
