"""Training-time RepNeXt M0-M5 (no hand-written fusion; see ``model.py``)."""

from examples.repnext.model import REPNEXT_CONFIGS, RepNeXt, register_timm_models, repnext_m0, repnext_m1, repnext_m2, repnext_m3, repnext_m4, repnext_m5
from examples.repnext.utils import randomize_bn_stats

__all__ = [
    "REPNEXT_CONFIGS",
    "RepNeXt",
    "randomize_bn_stats",
    "register_timm_models",
    "repnext_m0",
    "repnext_m1",
    "repnext_m2",
    "repnext_m3",
    "repnext_m4",
    "repnext_m5",
]
