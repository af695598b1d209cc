"""xmodal.configuration: the configuration classes and the shipped presets."""

from .configuration_xmodal import (
    TOWER_STYLES,
    XModalConfig,
    XModalCrossConfig,
    XModalDecoderConfig,
    XModalTextConfig,
    XModalVisionConfig,
)

__all__ = [
    "TOWER_STYLES",
    "XModalConfig",
    "XModalCrossConfig",
    "XModalDecoderConfig",
    "XModalTextConfig",
    "XModalVisionConfig",
]
