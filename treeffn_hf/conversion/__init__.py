"""Dense -> sparse conversion: surgery, dense-to-tree initialisation and training."""

from .surgery import convert

__all__ = ["convert"]
