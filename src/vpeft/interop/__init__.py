"""Interoperability: Hugging Face PEFT's adapter folders (export, load) and model cards."""

from vpeft.interop.card import write_card

__all__ = ["write_card"]
