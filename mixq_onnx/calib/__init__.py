"""Calibration data: synthetic (diffusion, inversion), real, or noise images in a reusable cache."""
from .cache import (
    CacheInfo,
    VerifyResult,
    default_root,
    info,
    list_caches,
    load_images,
    remove,
    resolve_cache,
    verify,
)
from .classes import ClassVocab, load_classes
from .dataset import CalibrationSet, check_calibration, load_calibration
from .prompts import ImagePlan, PromptConfig, plan_images
from .run import CalibConfig, make_calibration_cache

__all__ = [
    "load_calibration",
    "CacheInfo",
    "CalibConfig",
    "CalibrationSet",
    "check_calibration",
    "ClassVocab",
    "ImagePlan",
    "PromptConfig",
    "VerifyResult",
    "default_root",
    "info",
    "list_caches",
    "load_classes",
    "load_images",
    "make_calibration_cache",
    "plan_images",
    "remove",
    "resolve_cache",
    "verify",
]
