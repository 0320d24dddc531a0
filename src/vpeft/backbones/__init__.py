"""Backbone views by family. Importing this package registers the built-in views."""

from vpeft.backbones import cnn, vit  # noqa: F401
from vpeft.backbones.base import BackboneView, MissingPartError, get_view

__all__ = ["BackboneView", "MissingPartError", "get_view"]
