"""Flax models: one-hidden-layer non-overlapping CNNs (plain and designed) and deeper CNNs."""

from jaxpurify.models._one_hidden import (
    DesignedOneHiddenLayerCNN,
    OneHiddenLayerCNN,
    design_matrix,
    extract_patches,
)

__all__ = [
    "DesignedOneHiddenLayerCNN",
    "OneHiddenLayerCNN",
    "design_matrix",
    "extract_patches",
]
