"""Loading damaged, mismatching or foreign checkpoints: config.json fields of the wrong type or value, truncated or
corrupted model.safetensors, weights of the wrong shape or missing, and pickle-based weights.

Every failure names the file and the field or tensor; no half-loaded model is returned; pickle files are refused by
default and, when allowed with `use_safetensors=False`, read with `torch.load(weights_only=True)` so that a malicious
pickle never runs.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import XModalModelTester
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel

from xmodal import XModalConfig, XModalForConditionalGeneration, XModalForImageClassification, XModalModel

SUB_CONFIGS = ("vision_config", "text_config", "cross_config", "decoder_config", "mim_decoder_config")
# transformers metadata, not read by xmodal
NOT_FIELDS = ("model_type", "transformers_version", "auto_map", "architectures", *SUB_CONFIGS)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny XModalModel saved with save_pretrained (config.json, model.safetensors, the remote-code bundle)."""
    folder = tmp_path_factory.mktemp("saved")
    torch.manual_seed(0)
    XModalModel(XModalModelTester().get_config()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def weights(saved: Path) -> dict[str, torch.Tensor]:
    return load_file(saved / "model.safetensors")


def copy_of(saved: Path, target: Path) -> Path:
    shutil.copytree(saved, target, dirs_exist_ok=True)
    return target


def edit_config(folder: Path, section: str | None, key: str, value: object) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    (config if section is None else config[section])[key] = value
    path.write_text(json.dumps(config))


def edit_weights(folder: Path, change: dict[str, torch.Tensor | None]) -> None:
    state = load_file(folder / "model.safetensors")
    for key, value in change.items():
        if value is None:
            del state[key]
        else:
            state[key] = value
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def assert_same_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], skip: tuple[str, ...] = ()) -> None:
    state = model.state_dict()
    for key, value in weights.items():
        if key not in skip:
            torch.testing.assert_close(state[key], value, msg=key)


# ---------------------------------------------------------------- config.json


def _scalar_fields(saved: Path) -> list[tuple[str | None, str]]:
    config = json.loads((saved / "config.json").read_text())
    fields = [(None, key) for key in config if key not in NOT_FIELDS]
    fields += [(section, key) for section in SUB_CONFIGS for key in config[section] if key != "model_type"]
    return fields


# the only (field, type of value) pairs among the wrong values below that are legal: optional ids and sizes, the default dtype
# and unbounded floats
LEGAL = {
    ("text_config", "pad_token_id", type(None)),
    ("decoder_config", "pad_token_id", type(None)),
    ("decoder_config", "bos_token_id", type(None)),
    ("decoder_config", "eos_token_id", type(None)),
    (None, "special_token_ids", type(None)),
    (None, "auxiliary_batch_size", type(None)),
    (None, "dtype", type(None)),
    *((section, "dtype", type(None)) for section in SUB_CONFIGS),  # saved with the model's dtype, as the top level
    (None, "logit_bias_init_value", int),
    (None, "logit_scale_init_value", int),
}


def test_every_config_field_with_a_wrong_type_or_value_names_the_file_and_the_field(saved, tmp_path) -> None:
    problems = []
    for section, key in _scalar_fields(saved):
        for bad in ("abc", {"x": 1}, [[1]], None, -7, float("nan")):
            folder = tmp_path / f"{section}.{key}.{type(bad).__name__}"
            folder.mkdir()
            shutil.copy(saved / "config.json", folder / "config.json")
            edit_config(folder, section, key, bad)
            try:
                config = XModalConfig.from_pretrained(folder)
            except (ValueError, TypeError) as err:
                message = str(err)
                named = str(folder / "config.json") in message and key in message and (section or "") in message
                if not named:
                    problems.append((section, key, bad, message))
                continue
            except Exception as err:  # anything else is a crash inside transformers or huggingface_hub
                problems.append((section, key, bad, repr(err)))
                continue
            loaded = getattr(config if section is None else getattr(config, section), key)
            if (section, key, type(bad)) not in LEGAL or not (loaded == bad or key == "special_token_ids"):
                problems.append((section, key, bad, f"accepted as {loaded!r}"))
    assert not problems, "\n".join(map(str, problems))


@pytest.mark.parametrize(
    ("section", "key", "value", "error", "match"),
    [
        (
            "vision_config",
            "hidden_size",
            "abc",
            ValueError,
            r"vision_config: XModalVisionConfig.hidden_size must be a "
            r"positive integer, got 'abc'",
        ),
        (
            "text_config",
            "num_attention_heads",
            5,
            ValueError,
            r"text_config: XModalTextConfig.hidden_size \(32\) must "
            r"be divisible by num_attention_heads \(5\)",
        ),
        (
            "cross_config",
            "intermediate_size",
            -3,
            ValueError,
            r"cross_config: XModalCrossConfig.intermediate_size must "
            r"be a positive integer, got -3",
        ),
        (
            None,
            "projection_dim",
            24.0,
            ValueError,
            r"XModalConfig.projection_dim must be a positive integer, got 24.0",
        ),
        (
            None,
            "vision_config",
            "vit",
            TypeError,
            r"XModalConfig.vision_config must be a PreTrainedConfig, a dict or "
            r"None, got str",
        ),
        (
            "text_config",
            "hidden_act",
            ["gelu"],
            ValueError,
            r"text_config: XModalTextConfig.hidden_act \['gelu'\] is "
            r"unknown",
        ),
    ],
    ids=["hidden-abc", "heads-not-dividing", "negative-size", "float-size", "sub-config-string", "activation-list"],
)
@pytest.mark.parametrize("loader", ["XModalModel", "AutoModel", "AutoConfig"])
def test_invalid_config_fields_through_every_loader(
    saved, tmp_path, section, key, value, error, match, loader
) -> None:
    folder = copy_of(saved, tmp_path / "model")
    edit_config(folder, section, key, value)
    load = {
        "XModalModel": XModalModel.from_pretrained,
        "AutoModel": AutoModel.from_pretrained,
        "AutoConfig": AutoConfig.from_pretrained,
    }[loader]
    with pytest.raises(error, match=rf"Invalid xmodal config '{re.escape(str(folder / 'config.json'))}': .*{match}"):
        load(folder)


def test_config_json_that_is_not_an_object_or_not_json(saved, tmp_path) -> None:
    folder = copy_of(saved, tmp_path / "model")
    (folder / "config.json").write_text("[1, 2]")
    config_file = re.escape(str(folder / "config.json"))
    with pytest.raises(TypeError, match=rf"'{config_file}': it must hold a JSON object .* got a list"):
        XModalModel.from_pretrained(folder)
    (folder / "config.json").write_text('{"model_type": "xmodal", ')
    with pytest.raises(OSError, match=rf"config file at '{config_file}' is not a valid JSON file"):
        XModalModel.from_pretrained(folder)


@pytest.mark.parametrize(
    ("missing", "tensor"),
    [
        ("vision_config", r"vision_model.embeddings.class_embedding: checkpoint \(1, 1, 32\) vs model \(1, 1, 768\)"),
        ("projection_dim", r"text_projection.weight: checkpoint \(24, 32\) vs model \(512, 32\)"),
    ],
)
def test_missing_config_fields_fall_back_to_defaults_and_the_weights_then_refuse_to_fit(
    saved, tmp_path, missing, tensor
) -> None:
    folder = copy_of(saved, tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    del config[missing]
    (folder / "config.json").write_text(json.dumps(config))
    weights_file = re.escape(str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=rf"The weights in '{weights_file}' do not fit .*{tensor}"):
        XModalModel.from_pretrained(folder)


# ---------------------------------------------------------------- model.safetensors


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fraction=st.floats(0.0, 0.999))
def test_a_truncated_safetensors_file_names_the_file(
    saved: Path, tmp_path_factory: pytest.TempPathFactory, fraction: float
) -> None:
    folder = copy_of(saved, tmp_path_factory.mktemp("cut"))
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: int(fraction * len(data))])
    with pytest.raises(
        OSError, match=rf"Cannot read the weights file '{re.escape(str(path))}': .*truncated or corrupted"
    ):
        XModalModel.from_pretrained(folder)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(position=st.floats(0.0, 1.0), byte=st.integers(0, 255))
def test_a_corrupted_safetensors_header_names_the_file(
    saved: Path, tmp_path_factory: pytest.TempPathFactory, position: float, byte: int
) -> None:
    folder = copy_of(saved, tmp_path_factory.mktemp("header"))
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    header_end = 8 + int.from_bytes(data[:8], "little")
    index = min(int(position * header_end), header_end - 1)
    if data[index] == byte:
        byte ^= 0x01
    data[index] = byte
    path.write_bytes(bytes(data))
    # a damaged header either cannot be parsed (OSError), or describes tensors that do not fit or lack tower weights
    # (ValueError); a change that keeps it valid (whitespace padding, a renamed non-tower tensor) loads every weight
    # it holds, and transformers reports the others as missing (re-initialised)
    try:
        model, info = XModalModel.from_pretrained(folder, output_loading_info=True)
    except OSError as err:
        assert f"Cannot read the weights file '{path}'" in str(err), err
        return
    except ValueError as err:
        assert f"'{path}'" in str(err), err
        return
    original = load_file(saved / "model.safetensors")
    assert_same_weights(model, original, skip=tuple(info["missing_keys"]))


def test_weights_of_the_wrong_shape_name_the_file_and_the_tensor(saved, tmp_path, weights) -> None:
    folder = copy_of(saved, tmp_path / "model")
    edit_weights(folder, {"text_projection.weight": torch.zeros(5, 5), "visual_projection.weight": torch.zeros(24, 8)})
    message = (
        rf"The weights in '{re.escape(str(folder / 'model.safetensors'))}' do not fit XModalModel built from its config: 2 tensor\(s\) "
        r"have another shape \(text_projection.weight: checkpoint \(5, 5\) vs model \(24, 32\); "
        r"visual_projection.weight: checkpoint \(24, 8\) vs model \(24, 32\)\)"
    )
    with pytest.raises(ValueError, match=message):
        XModalModel.from_pretrained(folder)
    # on purpose: the two tensors are re-initialised, every other weight is loaded
    model = XModalModel.from_pretrained(folder, ignore_mismatched_sizes=True)
    assert model.text_projection.weight.shape == model.visual_projection.weight.shape == (24, 32)
    assert_same_weights(model, weights, skip=("text_projection.weight", "visual_projection.weight"))


def test_missing_weights_are_initialised_and_reported_as_transformers_does(saved, tmp_path, weights) -> None:
    folder = copy_of(saved, tmp_path / "tower")
    dropped = next(key for key in weights if key.startswith("text_model.encoder."))
    edit_weights(folder, {dropped: None})
    model, info = XModalModel.from_pretrained(folder, output_loading_info=True)
    assert info["missing_keys"] == {dropped} and not info["unexpected_keys"]
    assert torch.isfinite(model.state_dict()[dropped]).all()
    assert_same_weights(model, weights, skip=(dropped,))

    folder = copy_of(saved, tmp_path / "projection")
    edit_weights(folder, {"text_projection.weight": None, "unexpected.weight": torch.zeros(2)})
    model, info = XModalModel.from_pretrained(folder, output_loading_info=True)
    assert info["missing_keys"] == {"text_projection.weight"} and info["unexpected_keys"] == {"unexpected.weight"}
    assert_same_weights(model, weights, skip=("text_projection.weight",))


def test_heads_load_from_a_base_checkpoint_and_a_base_model_from_a_checkpoint_without_its_text_tower(
    saved, tmp_path, weights
) -> None:
    classifier = XModalForImageClassification.from_pretrained(saved, num_labels=3)
    assert_same_weights(classifier, {k: v for k, v in weights.items() if k.startswith("vision_model.")})
    captioner = XModalForConditionalGeneration.from_pretrained(saved)  # a new decoder on the pretrained image tower
    assert_same_weights(captioner, {k: v for k, v in weights.items() if k.startswith("vision_model.")})
    classifier.save_pretrained(tmp_path / "classifier")
    model, info = XModalModel.from_pretrained(tmp_path / "classifier", output_loading_info=True)
    assert info["missing_keys"] and all(
        key.startswith(("text_model.", "cross_model.", "visual_projection.", "text_projection.", "logit_scale"))
        for key in info["missing_keys"]
    )
    assert any(key.startswith("text_model.") for key in info["missing_keys"])
    assert_same_weights(model, {k: v for k, v in weights.items() if k.startswith("vision_model.")})


# ---------------------------------------------------------------- pickle-based weights


class _Payload:
    """Unpickling this creates `marker` (what a malicious checkpoint would do with worse intent)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


def _malicious_folder(saved: Path, folder: Path, marker: Path, keep_safetensors: bool = False) -> Path:
    copy_of(saved, folder)
    state: dict[str, object] = dict(load_file(folder / "model.safetensors"))
    state["text_projection.weight"] = _Payload(marker)
    torch.save(state, folder / "pytorch_model.bin")
    if not keep_safetensors:
        (folder / "model.safetensors").unlink()
    return folder


def test_the_malicious_pickle_is_live(saved, tmp_path) -> None:
    # the control for the tests below: unpickled without restriction, the file runs code
    marker = tmp_path / "pwned"
    folder = _malicious_folder(saved, tmp_path / "evil", marker)
    torch.load(folder / "pytorch_model.bin", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("loader", [XModalModel.from_pretrained, AutoModel.from_pretrained])
def test_pickle_only_folders_are_refused_by_default(saved, tmp_path, loader) -> None:
    marker = tmp_path / "pwned"
    folder = _malicious_folder(saved, tmp_path / "evil", marker)
    with pytest.raises(
        OSError,
        match=r"only pickle-based files \(pytorch_model.bin\).*pass use_safetensors=False.*"
        r"torch.load\(weights_only=True\)",
    ):
        loader(folder)
    assert not marker.exists()


def test_a_pickle_file_path_is_refused_by_default(saved, tmp_path) -> None:
    marker = tmp_path / "pwned"
    folder = _malicious_folder(saved, tmp_path / "evil", marker)
    config = XModalConfig.from_pretrained(folder)
    with pytest.raises(OSError, match=r"The weights file '.*pytorch_model.bin' has no safetensors weights"):
        XModalModel.from_pretrained(folder / "pytorch_model.bin", config=config)
    assert not marker.exists()


def test_with_the_flag_a_malicious_pickle_still_does_not_run(saved, tmp_path) -> None:
    marker = tmp_path / "pwned"
    folder = _malicious_folder(saved, tmp_path / "evil", marker)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        XModalModel.from_pretrained(folder, use_safetensors=False)
    with pytest.raises(ValueError, match=r"weights_only=False would let the file execute arbitrary code"):
        XModalModel.from_pretrained(folder, use_safetensors=False, weights_only=False)
    assert not marker.exists()


def test_safetensors_win_over_a_pickle_in_the_same_folder(saved, tmp_path, weights) -> None:
    marker = tmp_path / "pwned"
    folder = _malicious_folder(saved, tmp_path / "both", marker, keep_safetensors=True)
    assert_same_weights(XModalModel.from_pretrained(folder), weights)
    assert not marker.exists()


def test_a_trusted_pickle_loads_with_the_flag(saved, tmp_path, weights) -> None:
    folder = copy_of(saved, tmp_path / "bin")
    torch.save(dict(load_file(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    assert_same_weights(XModalModel.from_pretrained(folder, use_safetensors=False), weights)
    (folder / "pytorch_model.bin").rename(folder / "model.pt")
    with pytest.raises(OSError, match=r"only pickle-based files \(model.pt\)"):
        XModalModel.from_pretrained(folder)
