"""xmodal.configuration: the configuration classes and the shipped presets."""

from .configuration_xmodal import (
    XModalConfig,
    XModalCrossConfig,
    XModalDecoderConfig,
    XModalTextConfig,
    XModalVisionConfig,
)

__all__ = ["XModalConfig", "XModalCrossConfig", "XModalDecoderConfig", "XModalTextConfig", "XModalVisionConfig"]
