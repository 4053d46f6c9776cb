"""The SDK's version (the distribution's version)."""

__version__ = "0.1.0"
