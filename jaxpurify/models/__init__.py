"""Flax models: one-hidden-layer non-overlapping CNNs (plain and designed) and deeper CNNs."""

from jaxpurify.models._one_hidden import (
    DesignedOneHiddenLayerCNN,
    OneHiddenLayerCNN,
    design_matrix,
    extract_patches,
)

# The deeper designed CNNs live in jaxpurify.multilayer (which imports this package), so they
# are re-exported lazily.
_MULTILAYER = ("Conv", "Dense", "DesignedCNN", "LeNet5", "SmallVGG")


def __getattr__(name):
    if name in _MULTILAYER:
        from jaxpurify import multilayer

        return getattr(multilayer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Conv",
    "Dense",
    "DesignedCNN",
    "DesignedOneHiddenLayerCNN",
    "LeNet5",
    "OneHiddenLayerCNN",
    "SmallVGG",
    "design_matrix",
    "extract_patches",
]
