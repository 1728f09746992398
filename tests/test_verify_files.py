"""verify_adapter on an adapter directory's files: pickles are refused without being opened, a missing file is
named, and the weights must be a valid safetensors file holding exactly the expected tensors (names, shapes,
float dtypes, finite values)."""

import json
import logging
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_model, sora_model
from soralib.errors import InputError
from soralib.verify import load_adapter_safely, verify_adapter
from verify_helpers import CONFIG, WEIGHTS, refused, tampered


class Tripwire:
    """Unpickling this creates the directory `path`: proof that a pickle was opened."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def shape_of(adapter_dir, key):
    return tuple(load_file(str(adapter_dir / WEIGHTS))[key].shape)


# ---- pickles -------------------------------------------------------------------------------------------------------

def test_a_pickle_only_adapter_is_refused_without_being_opened(tmp_path, mlp_adapter):
    adapter = tampered(mlp_adapter, tmp_path / "bin")
    torch.save(load_file(str(adapter / WEIGHTS)), adapter / "adapter_model.bin")
    (adapter / WEIGHTS).unlink()
    refused(make_model("mlp"), adapter, "adapter_model.bin: pickle weights refused (unpickling can run arbitrary code)",
            "expected adapter_model.safetensors", "safetensors.torch.save_file")


@pytest.mark.parametrize("name", ["weights.pt", "adapter_model.pth", "x.pkl", "last.ckpt"])
def test_every_pickle_suffix_is_refused_when_there_is_no_safetensors(tmp_path, mlp_adapter, name):
    adapter = tampered(mlp_adapter, tmp_path / "pickle")
    (adapter / WEIGHTS).rename(adapter / name)
    refused(make_model("mlp"), adapter, f"{name}: pickle weights refused")


def test_a_malicious_pickle_is_never_unpickled(tmp_path, mlp_adapter):
    adapter = tampered(mlp_adapter, tmp_path / "trap")
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps(Tripwire(tmp_path / "tripped")))
    (adapter / WEIGHTS).unlink()
    with pytest.raises(InputError, match="pickle weights refused"):
        load_adapter_safely(make_model("mlp"), adapter)
    assert not (tmp_path / "tripped").exists()


def test_a_pickle_next_to_a_safetensors_file_is_ignored_with_a_warning(tmp_path, mlp_adapter, caplog):
    adapter = tampered(mlp_adapter, tmp_path / "both")
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps(Tripwire(tmp_path / "tripped")))
    with caplog.at_level(logging.WARNING, logger="soralib.verify"):
        verify_adapter(make_model("mlp"), adapter)
        load_adapter_safely(make_model("mlp"), adapter)
    assert "ignoring pickle file(s) adapter_model.bin" in caplog.text
    assert not (tmp_path / "tripped").exists()


# ---- missing files ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [CONFIG, WEIGHTS])
def test_a_missing_file_is_named(tmp_path, mlp_adapter, name):
    adapter = tampered(mlp_adapter, tmp_path / "missing")
    (adapter / name).unlink()
    refused(make_model("mlp"), adapter, f"{name}: missing; expected an adapter directory with")


def test_a_save_whose_adapter_is_in_a_subfolder_names_the_subfolder(tmp_path):
    model = sora_model("mlp")
    model.add_adapter("mine", model.peft_config["default"])
    model.delete_adapter("default")
    model.save_pretrained(str(tmp_path / "save"))  # PEFT writes an adapter not named "default" to save/mine/
    refused(make_model("mlp"), tmp_path / "save",
            f"{CONFIG}: missing; expected an adapter directory with {CONFIG} and {WEIGHTS} "
            f"(found in subfolder mine: pass {tmp_path / 'save' / 'mine'})")


def test_a_directory_that_does_not_exist_is_refused(tmp_path):
    refused(make_model("mlp"), tmp_path / "nowhere", "nowhere: not a directory")


# ---- bad weights -----------------------------------------------------------------------------------------------------

def test_a_file_that_is_not_safetensors_is_refused(tmp_path, mlp_adapter):
    adapter = tampered(mlp_adapter, tmp_path / "garbage")
    (adapter / WEIGHTS).write_bytes(b"\x80\x04\x95 a pickle pretending to be safetensors")
    refused(make_model("mlp"), adapter, f"{WEIGHTS}: not a valid safetensors file")


def test_a_truncated_safetensors_file_is_refused(tmp_path, mlp_adapter):
    adapter = tampered(mlp_adapter, tmp_path / "truncated")
    data = (adapter / WEIGHTS).read_bytes()
    (adapter / WEIGHTS).write_bytes(data[:-10])
    refused(make_model("mlp"), adapter, f"{WEIGHTS}: not a valid safetensors file")


@pytest.mark.parametrize("key", ["base_model.model.fc2.sora_gate", "base_model.model.head.weight",
                                 "base_model.model.fc1.sora_A.weight"])
def test_a_missing_tensor_is_named_with_its_expected_shape(tmp_path, mlp_adapter, key):
    expected = shape_of(mlp_adapter, key)
    adapter = tampered(mlp_adapter, tmp_path / "missing", edit_tensors=lambda t: t.pop(key))
    refused(make_model("mlp"), adapter, f"{WEIGHTS}: missing tensor '{key}' (1 missing in all); "
                                        f"expected shape {expected}")


@pytest.mark.parametrize("key", ["base_model.model.fc2.lora_magnitude_vector", "base_model.model.act.weight",
                                 "base_model.model.fc1.base_layer.weight"])
def test_an_unexpected_tensor_is_named(tmp_path, mlp_adapter, key):
    adapter = tampered(mlp_adapter, tmp_path / "extra", edit_tensors=lambda t: t.update({key: torch.zeros(12)}))
    said = ("is a base-model weight, which loading would put in place" if "base_layer" in key
            else "(1 unexpected in all)")
    refused(make_model("mlp"), adapter, f"{WEIGHTS}: ", f"tensor '{key}' {said}")


@pytest.mark.parametrize("key", ["base_model.model.fc2.sora_A.weight", "base_model.model.fc2.sora_B.weight",
                                 "base_model.model.fc2.sora_gate", "base_model.model.head.weight"])
def test_a_tensor_of_the_wrong_shape_is_named_with_the_expected_shape(tmp_path, mlp_adapter, key):
    expected = shape_of(mlp_adapter, key)
    grown = tuple(n + 1 for n in expected)
    adapter = tampered(mlp_adapter, tmp_path / "shape", edit_tensors=lambda t: t.update({key: torch.zeros(grown)}))
    refused(make_model("mlp"), adapter, f"tensor '{key}' has shape {grown}; expected {expected}")


def test_kept_ranks_that_disagree_with_the_tensors_are_refused(tmp_path, mlp_adapter):
    kept = json.loads((mlp_adapter / CONFIG).read_text())["kept_ranks"]["fc2"]
    assert kept >= 1
    adapter = tampered(mlp_adapter, tmp_path / "ranks", lambda c: c["kept_ranks"].update(fc2=kept - 1))
    refused(make_model("mlp"), adapter, f"'base_model.model.fc2.sora_A.weight' has shape ({kept}, 24); "
                                        f"expected ({kept - 1}, 24)")


@pytest.mark.parametrize("dtype, name", [(torch.int64, "I64"), (torch.bool, "BOOL"), (torch.uint8, "U8")])
def test_a_non_float_tensor_is_refused(tmp_path, mlp_adapter, dtype, name):
    key = "base_model.model.fc2.sora_gate"
    adapter = tampered(mlp_adapter, tmp_path / "dtype", edit_tensors=lambda t: t.update({key: t[key].to(dtype)}))
    refused(make_model("mlp"), adapter, f"tensor '{key}' has dtype {name}; expected a float dtype")


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("key", ["base_model.model.fc2.sora_B.weight", "base_model.model.head.bias"])
def test_nan_or_inf_values_are_refused(tmp_path, mlp_adapter, key, value):
    def poison(tensors):
        tensors[key].view(-1)[0] = value
    adapter = tampered(mlp_adapter, tmp_path / "nan", edit_tensors=poison)
    refused(make_model("mlp"), adapter, f"{WEIGHTS}: tensor '{key}' has NaN or Inf values; expected finite numbers")


@pytest.mark.parametrize("key", ["base_model.model.fc2.sora_A.weight", "base_model.model.fc2.sora_B.weight",
                                 "base_model.model.fc2.sora_gate"])
def test_adapter_weights_far_beyond_any_trained_size_are_refused(tmp_path, mlp_adapter, key):
    # finite, so the NaN check passed them, yet 1e20 in A and B makes every output NaN
    def inflate(tensors):
        tensors[key].view(-1)[0] = -1e20
    adapter = tampered(mlp_adapter, tmp_path / "huge", edit_tensors=inflate)
    refused(make_model("mlp"), adapter, f"{WEIGHTS}: tensor '{key}' holds values up to 1e+20 in size; expected "
                                        "|value| <= 10000 (trained adapter weights are near 1)")


def test_half_precision_adapters_are_accepted(tmp_path, mlp_adapter):
    adapter = tampered(mlp_adapter, tmp_path / "half",
                       edit_tensors=lambda t: t.update({k: v.to(torch.bfloat16) for k, v in t.items()}))
    verify_adapter(make_model("mlp"), adapter)
