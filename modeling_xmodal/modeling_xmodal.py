"""The public xmodal models, in one module: the entry point of the remote-code bundle's `auto_map`.

transformers' remote-code loader copies the file an `auto_map` entry names and, recursively, the siblings it
imports; importing every model here makes every loaded bundle complete, so a model loaded with
`trust_remote_code=True` saves (and pushes) a bundle that loads with any auto class again.

This file is part of the remote-code bundle pushed to the Hub: it imports only its siblings.
"""

from xmodal.modeling_base import XModalModel, XModalPreTrainedModel
from xmodal.modeling_pretraining import XModalForPreTraining
from xmodal.modeling_tasks import (
    XModalForConditionalGeneration,
    XModalForImageClassification,
    XModalForImageTextRetrieval,
    XModalForMaskedLM,
    XModalForVisualQuestionAnswering,
)
from xmodal.outputs import XModalForPreTrainingOutput, XModalFusionOutput, XModalImageTextRetrievalOutput, XModalOutput

# by role: the base, the dual encoder, the pretraining model, the task models, then the outputs
__all__ = [
    "XModalPreTrainedModel",
    "XModalModel",
    "XModalForPreTraining",
    "XModalForImageTextRetrieval",
    "XModalForMaskedLM",
    "XModalForVisualQuestionAnswering",
    "XModalForConditionalGeneration",
    "XModalForImageClassification",
    "XModalOutput",
    "XModalFusionOutput",
    "XModalForPreTrainingOutput",
    "XModalImageTextRetrievalOutput",
]
