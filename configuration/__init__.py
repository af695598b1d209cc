"""xmodal.configuration: the configuration classes and the shipped presets."""

from .configuration_xmodal import XModalConfig, XModalCrossConfig, XModalTextConfig, XModalVisionConfig

__all__ = ["XModalConfig", "XModalCrossConfig", "XModalTextConfig", "XModalVisionConfig"]
