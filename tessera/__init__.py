"""Tessera: a real-time feature and ranking platform for feeds."""

__version__ = "0.1.0"
