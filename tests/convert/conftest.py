import os

import pytest

GOLDEN = os.path.join(os.path.dirname(__file__), "..", "golden")
FORMATS = ["hf_full_rope", "official_partial_rope"]


@pytest.fixture(params=FORMATS)
def golden(request) -> str:
    """A tiny golden checkpoint folder: transformers-format sharded, or official-format single file."""
    return os.path.join(GOLDEN, request.param)
