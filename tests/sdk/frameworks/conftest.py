"""The framework tests run Keras 3 on its torch backend (no TensorFlow here)."""

from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")
