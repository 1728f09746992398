"""What the test_verify_* files share: an adapter directory copied with its config or tensors edited, and the
check that verify_adapter refuses it in one line and leaves the model as it was."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from soralib.errors import InputError
from soralib.verify import verify_adapter

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


def tampered(src, dst, edit_config=None, edit_tensors=None):
    """A copy of adapter `src` with its config and/or tensors changed by the given functions (in place)."""
    shutil.copytree(src, dst)
    if edit_config:
        config = json.loads((dst / CONFIG).read_text())
        edit_config(config)
        (dst / CONFIG).write_text(json.dumps(config))
    if edit_tensors:
        tensors = load_file(str(dst / WEIGHTS))
        edit_tensors(tensors)
        save_file(tensors, str(dst / WEIGHTS), metadata={"format": "pt"})
    return dst


def refused(model, adapter_dir, *fragments, **kwargs) -> str:
    """Assert verify_adapter raises a one-line InputError containing `fragments` and leaves `model` as it was."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InputError) as excinfo:
        verify_adapter(model, adapter_dir, **kwargs)
    message = str(excinfo.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    return message


def with_raw_number(adapter, placeholder, raw):
    """Put a number JSON allows but json.dumps cannot write (1e400 parses as inf) where `placeholder` stands."""
    text = (adapter / CONFIG).read_text()
    assert str(placeholder) in text
    (adapter / CONFIG).write_text(text.replace(str(placeholder), raw))
    return adapter
