"""Shared fixtures: a transformers-style model tester with tiny sizes, and the path to the shared real data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from xmodal import XModalConfig

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


class XModalModelTester:
    """Builds tiny configs (hidden 32, 2 layers) and matching inputs, reused by many small tests."""

    def __init__(
        self,
        batch_size: int = 3,
        image_size: int = 16,
        patch_size: int = 4,
        hidden_size: int = 32,
        num_layers: int = 2,
        num_heads: int = 4,
        vocab_size: int = 99,
        seq_length: int = 7,
        projection_dim: int = 24,
        direction: str = "text_to_image",
    ) -> None:
        self.batch_size = batch_size
        self.image_size = image_size
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.vocab_size = vocab_size
        self.seq_length = seq_length
        self.projection_dim = projection_dim
        self.direction = direction

    def get_config(self, **overrides: object) -> XModalConfig:
        tower = {
            "hidden_size": self.hidden_size,
            "intermediate_size": 37,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
        }
        values: dict[str, object] = {
            "vision_config": {**tower, "image_size": self.image_size, "patch_size": self.patch_size},
            "text_config": {
                **tower,
                "vocab_size": self.vocab_size,
                "max_position_embeddings": 32,
                "hidden_dropout_prob": 0.0,
                "attention_dropout": 0.0,
            },
            "cross_config": {**tower, "direction": self.direction},
            "projection_dim": self.projection_dim,
        }
        values.update(overrides)
        return XModalConfig(**values)

    def get_inputs(self, seed: int = 0, padded: bool = True) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        input_ids = torch.randint(1, self.vocab_size, (self.batch_size, self.seq_length), generator=generator)
        attention_mask = torch.ones_like(input_ids)
        if padded:
            # item 0 unpadded; the others padded at the end
            for row in range(1, self.batch_size):
                length = self.seq_length - row
                attention_mask[row, length:] = 0
                input_ids[row, length:] = 0
        pixel_values = torch.randn(self.batch_size, 3, self.image_size, self.image_size, generator=generator)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}

    def get_pretraining_inputs(self, num_labels: int = 5) -> dict[str, torch.Tensor]:
        """`get_inputs()` plus a padded question of 5 tokens per image and soft VQA scores over `num_labels`
        answers (for `XModalForPreTraining` with every objective; batch size 3)."""
        inputs = self.get_inputs()
        generator = torch.Generator().manual_seed(1)
        inputs["question_input_ids"] = torch.randint(5, self.vocab_size, (self.batch_size, 5), generator=generator)
        inputs["question_attention_mask"] = torch.tensor([[1] * 5, [1] * 4 + [0], [1] * 3 + [0] * 2])
        inputs["vqa_labels"] = torch.rand(self.batch_size, num_labels, generator=generator)
        return inputs


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models run fastest on one thread; several threads on a shared 2-core machine thrash (20x slower).
    Modules of tiny-model tests use it with `pytestmark = pytest.mark.usefixtures("single_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tester() -> XModalModelTester:
    return XModalModelTester()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """`../shared/data`: skipped when absent, an error under CI."""
    if not SHARED_DATA.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but the shared data folder {SHARED_DATA} is missing.")
        pytest.skip(f"shared data folder {SHARED_DATA} not present")
    return SHARED_DATA


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The folder of a tiny saved xmodal model and processor (the fine-tuning tests' starting point)."""
    from test_training_inference import save_tiny_model

    folder = tmp_path_factory.mktemp("pretrained")
    save_tiny_model(folder)
    return str(folder)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Each test starts without an Accelerate state: a run with mixed precision (e.g. bf16) in one test must not make
    the next test's `Accelerator()` fail ("AcceleratorState has already been initialized")."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
