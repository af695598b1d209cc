"""xmodal: image-text pretraining for the Hugging Face ecosystem.

Importing xmodal registers every config, model, image processor and processor with transformers' Auto classes.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForImageTextToText,
    AutoModelForMaskedLM,
    AutoModelForPreTraining,
    AutoModelForVisualQuestionAnswering,
    AutoModelForZeroShotImageClassification,
    AutoProcessor,
)

from .configuration import XModalConfig, XModalCrossConfig, XModalDecoderConfig, XModalTextConfig, XModalVisionConfig
from .hub import AUTO_MAP, write_remote_code
from .losses import (
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
from .modeling_xmodal import (
    XModalForConditionalGeneration,
    XModalForImageClassification,
    XModalForImageTextRetrieval,
    XModalForMaskedLM,
    XModalForPreTraining,
    XModalForPreTrainingOutput,
    XModalForVisualQuestionAnswering,
    XModalFusionOutput,
    XModalImageTextRetrievalOutput,
    XModalModel,
    XModalOutput,
    XModalPreTrainedModel,
)
from .processing import XModalImageProcessor, XModalProcessor, train_tokenizer

for _config_class in (XModalVisionConfig, XModalTextConfig, XModalCrossConfig, XModalDecoderConfig, XModalConfig):
    AutoConfig.register(_config_class.model_type, _config_class, exist_ok=True)
for _auto_class, _model_class in (
    (AutoModel, XModalModel),
    (AutoModelForZeroShotImageClassification, XModalModel),
    (AutoModelForImageClassification, XModalForImageClassification),
    (AutoModelForPreTraining, XModalForPreTraining),
    (AutoModelForMaskedLM, XModalForMaskedLM),
    (AutoModelForImageTextToText, XModalForConditionalGeneration),
    (AutoModelForVisualQuestionAnswering, XModalForVisualQuestionAnswering),
):
    _auto_class.register(XModalConfig, _model_class, exist_ok=True)
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
    "XModalDecoderConfig",
    "XModalForConditionalGeneration",
    "XModalForImageClassification",
    "XModalForImageTextRetrieval",
    "XModalForMaskedLM",
    "XModalForPreTraining",
    "XModalForPreTrainingOutput",
    "XModalForVisualQuestionAnswering",
    "XModalFusionOutput",
    "XModalImageProcessor",
    "XModalImageTextRetrievalOutput",
    "XModalModel",
    "XModalOutput",
    "XModalPreTrainedModel",
    "XModalProcessor",
    "XModalTextConfig",
    "XModalVisionConfig",
    "causal_lm_loss",
    "contrastive_loss",
    "mask_tokens",
    "masked_image_modeling_loss",
    "masked_language_modeling_loss",
    "negatives_contrastive_loss",
    "nt_xent_loss",
    "patchify",
    "random_patch_mask",
    "siglip_loss",
    "train_tokenizer",
    "vqa_loss",
    "write_remote_code",
]
