"""Fixtures of the decoder tests: tiny transformers checkpoints of every family, built once per session."""

from __future__ import annotations

import pytest

from tests.models import hf_zoo


@pytest.fixture(scope="session")
def zoo(tmp_path_factory):
    """``zoo(name, init=1.0, v4=False, dtype=None, text=False)``: the folder of hf_zoo.ZOO[name], built on
    first use (``v4``: its config in transformers v4's form; ``text``: with a 300-token BPE tokenizer)."""
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("zoo")
    built: dict = {}

    def get(name: str, *, init: float = 1.0, v4: bool = False, dtype=None, text: bool = False):
        key = (name, init, dtype, text)
        if key not in built:
            kwargs = {"vocab_size": 300} if text else {}
            folder = hf_zoo.build(name, root / ("text" if text else "plain"), init=init, dtype=dtype, **kwargs)
            built[key] = hf_zoo.add_tokenizer(folder, 300) if text else folder
        folder = built[key]
        if not v4:
            return folder
        if (key, "v4") not in built:
            built[key, "v4"] = hf_zoo.to_v4(folder, folder.parent / (folder.name + "-v4"))
        return built[key, "v4"]

    return get
