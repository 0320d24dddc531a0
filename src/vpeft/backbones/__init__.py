"""Backbone views by family. Importing this package registers the built-in views."""

# the hf and open_clip views import their package only when a model needs it: never fails
from vpeft.backbones import cnn, convnext, eva, hf, open_clip, swin, vit  # noqa: F401
from vpeft.backbones.base import BackboneView, MissingPartError, get_view

__all__ = ["BackboneView", "MissingPartError", "get_view"]
