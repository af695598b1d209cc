"""xmodal: image-text pretraining for the Hugging Face ecosystem.

Importing xmodal registers every config, model, image processor and processor with transformers' Auto classes.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForZeroShotImageClassification,
    AutoProcessor,
)

from .configuration import XModalConfig, XModalCrossConfig, XModalTextConfig, XModalVisionConfig
from .hub import AUTO_MAP, write_remote_code
from .modeling_xmodal import (
    XModalForImageClassification,
    XModalFusionOutput,
    XModalModel,
    XModalOutput,
    XModalPreTrainedModel,
    contrastive_loss,
)
from .processing import XModalImageProcessor, XModalProcessor, train_tokenizer

for _config_class in (XModalVisionConfig, XModalTextConfig, XModalCrossConfig, XModalConfig):
    AutoConfig.register(_config_class.model_type, _config_class, exist_ok=True)
AutoModel.register(XModalConfig, XModalModel, exist_ok=True)
AutoModelForZeroShotImageClassification.register(XModalConfig, XModalModel, exist_ok=True)
AutoModelForImageClassification.register(XModalConfig, XModalForImageClassification, exist_ok=True)
AutoImageProcessor.register(XModalConfig, image_processor_classes={"pil": XModalImageProcessor}, exist_ok=True)
AutoProcessor.register(XModalConfig, XModalProcessor, exist_ok=True)
# Saved processors then carry their `auto_map` (nested in processor_config.json where AutoImageProcessor reads it).
XModalImageProcessor.register_for_auto_class("AutoImageProcessor")
XModalProcessor.register_for_auto_class("AutoProcessor")

__version__ = "0.1.0"

__all__ = [
    "AUTO_MAP",
    "XModalConfig",
    "XModalCrossConfig",
    "XModalForImageClassification",
    "XModalFusionOutput",
    "XModalImageProcessor",
    "XModalModel",
    "XModalOutput",
    "XModalPreTrainedModel",
    "XModalProcessor",
    "XModalTextConfig",
    "XModalVisionConfig",
    "contrastive_loss",
    "train_tokenizer",
    "write_remote_code",
]
