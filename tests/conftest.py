# Triton kernels run on CPU tensors only under its interpreter, which must be chosen before
# triton (or splice.kernels) is imported; an explicit TRITON_INTERPRET in the environment wins.
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def real_model():
    """(model, tokenizer): the default model from the real cache (converted on the first run)."""
    from splice.models.loader import load_model

    return load_model()
