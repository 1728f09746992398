"""verify_adapter: an adapter directory from an untrusted source is checked as data before it reaches the model."""

import json
import logging
import os
import pickle
import shutil

import peft
import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file

import soralib
from conftest import make_input, make_model, output, scramble, sora_model
from soralib.errors import InputError
from soralib.verify import load_adapter_safely, verify_adapter

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


def trained_sora(arch):
    """A SoRA model as training leaves it: non-zero B, part of each gate zero, the first module's entirely."""
    model = sora_model(arch)
    scramble(model, zero_fraction=0.5)
    with torch.no_grad():
        next(m for m in model.modules() if isinstance(m, soralib.SoraLayer)).sora_gate["default"].zero_()
    return model


def saved_sora(path, arch="mlp", pruned=True):
    """(adapter directory, outputs of the model it was saved from)."""
    model = trained_sora(arch)
    if pruned:
        soralib.prune(model)
    model.save_pretrained(str(path))
    return path, output(model, make_input(arch))


@pytest.fixture
def mlp_adapter(tmp_path):
    """A pruned SoRA adapter of the tiny MLP: fc1 pruned to rank 0, fc2 with its kept ranks, head saved whole."""
    return saved_sora(tmp_path / "good")[0]


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


class Tripwire:
    """Unpickling this creates the directory `path`: proof that a pickle was opened."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def shape_of(adapter_dir, key):
    return tuple(load_file(str(adapter_dir / WEIGHTS))[key].shape)


# ---- good adapters pass and load to the outputs they were saved with -------------------------------------------

@pytest.mark.parametrize("arch", ["mlp", "bert", "gpt2", "llama"])
@pytest.mark.parametrize("pruned", [False, True], ids=["gated", "pruned"])
def test_saved_sora_adapter_verifies_and_loads_to_the_same_outputs(tmp_path, arch, pruned):
    adapter_dir, expected = saved_sora(tmp_path / "a", arch, pruned)
    config = verify_adapter(make_model(arch), adapter_dir)
    assert isinstance(config, soralib.SoraConfig)
    assert bool(config.kept_ranks) == pruned
    loaded = load_adapter_safely(make_model(arch), adapter_dir)
    torch.testing.assert_close(output(loaded, make_input(arch)), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["mlp", "bert", "gpt2", "llama"])
@pytest.mark.parametrize("layout", ["exact", "uniform"])
def test_exported_lora_verifies_and_loads_to_the_same_outputs(tmp_path, arch, layout):
    model = trained_sora(arch)
    expected = output(model, make_input(arch))
    soralib.export_lora(model, tmp_path / "lora", layout=layout)
    config = verify_adapter(make_model(arch), tmp_path / "lora")
    assert config.peft_type == "LORA"
    loaded = load_adapter_safely(make_model(arch), tmp_path / "lora")
    torch.testing.assert_close(output(loaded, make_input(arch)), expected, atol=1e-5, rtol=0)


def test_load_adapter_safely_can_load_for_training(tmp_path, mlp_adapter):
    loaded = load_adapter_safely(make_model("mlp"), mlp_adapter, is_trainable=True)
    assert any(p.requires_grad for p in soralib.gate_parameters(loaded))


def test_a_matching_expected_base_passes_and_an_unset_one_in_the_config_is_not_checked(tmp_path, mlp_adapter):
    named = tampered(mlp_adapter, tmp_path / "named", lambda c: c.update(base_model_name_or_path="org/tiny-mlp"))
    assert verify_adapter(make_model("mlp"), named, expected_base="org/tiny-mlp").base_model_name_or_path
    assert verify_adapter(make_model("mlp"), mlp_adapter, expected_base="org/tiny-mlp").base_model_name_or_path is None


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


# ---- missing files and bad configs --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [CONFIG, WEIGHTS])
def test_a_missing_file_is_named(tmp_path, mlp_adapter, name):
    adapter = tampered(mlp_adapter, tmp_path / "missing")
    (adapter / name).unlink()
    refused(make_model("mlp"), adapter, f"{name}: missing; expected an adapter directory with")


def test_a_directory_that_does_not_exist_is_refused(tmp_path):
    refused(make_model("mlp"), tmp_path / "nowhere", "nowhere: not a directory")


@pytest.mark.parametrize("text, fragment", [
    ('{"peft_type": "SORA",', "not valid JSON"),
    ('{"peft_type": "SORA", "r": 4, "lora_alpha": NaN}', "not valid JSON (NaN is not a number)"),
    ('["SORA"]', "the JSON is a list; expected an object"),
])
def test_a_config_that_is_not_a_json_object_is_refused(tmp_path, mlp_adapter, text, fragment):
    adapter = tampered(mlp_adapter, tmp_path / "json")
    (adapter / CONFIG).write_text(text)
    refused(make_model("mlp"), adapter, f"{CONFIG}: {fragment}")


@pytest.mark.parametrize("edit, fragment", [
    ({"peft_type": "IA3"}, "peft_type 'IA3'; expected one of LORA, SORA"),
    ({"peft_type": None}, "peft_type None; expected one of LORA, SORA"),
    ({"surprise": 1}, "unknown field 'surprise'; expected only SoraConfig fields"),
    ({"r": 0}, "invalid SORA config: r must be a positive integer (r_max), got 0"),
    ({"kept_ranks": {"fc2": 9}}, "invalid SORA config: kept_ranks['fc2'] must be an integer in [0, r=4], got 9"),
    ({"target_modules": ["fc1", "fc9"]}, "target_modules entry 'fc9' matches no module of the base model MLP; "
                                          "closest linear modules: fc1, fc2"),
    ({"target_modules": None}, "target_modules is None; expected a string or a list of strings"),
    ({"target_modules": []}, "target_modules is empty; expected the module names the adapter was saved with"),
    ({"target_modules": ["fc1", 2]}, "target_modules is ['fc1', 2]; expected a string or a list of strings"),
    ({"modules_to_save": "head"}, "modules_to_save is 'head'; expected null or a list of strings"),
    ({"kept_ranks": ["fc2"]}, "kept_ranks is ['fc2']; expected an object of module name -> number"),
    ({"kept_ranks": {"fc2": 2, "fc3": 1}}, "kept_ranks names 'fc3', which is not adapted; expected only target "
                                          "modules"),
    ({"lora_alpha": "8"}, "lora_alpha is '8'; expected a number"),
    ({"lora_dropout": 1.5}, "lora_dropout is 1.5; expected a number in [0, 1)"),
    ({"layers_to_transform": "0"}, "layers_to_transform is '0'; expected null, an integer or a list of integers"),
    ({"target_modules": ["act"]}, "target module 'act' is a ReLU; expected nn.Linear or Conv1D"),
    ({"base_model_name_or_path": "evil/model"}, "base_model_name_or_path is 'evil/model'; expected 'org/tiny-mlp'"),
])
def test_a_bad_config_value_is_named_with_what_was_expected(tmp_path, mlp_adapter, edit, fragment):
    adapter = tampered(mlp_adapter, tmp_path / "config", lambda c: c.update(edit))
    refused(make_model("mlp"), adapter, f"{CONFIG}: {fragment}", expected_base="org/tiny-mlp")


def test_an_adapter_for_another_architecture_is_refused(tmp_path):
    adapter, _ = saved_sora(tmp_path / "bert", "bert")
    refused(make_model("llama"), adapter, "target_modules entry", "matches no module of the base model Llama",
            "closest linear modules:")


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
    refused(make_model("mlp"), adapter, f"{WEIGHTS}: unexpected tensor '{key}' (1 unexpected in all)")


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


def test_half_precision_adapters_are_accepted(tmp_path, mlp_adapter):
    adapter = tampered(mlp_adapter, tmp_path / "half",
                       edit_tensors=lambda t: t.update({k: v.to(torch.bfloat16) for k, v in t.items()}))
    verify_adapter(make_model("mlp"), adapter)


# ---- exported LoRA specifics ---------------------------------------------------------------------------------------

@pytest.fixture
def bert_lora(tmp_path):
    soralib.export_lora(trained_sora("bert"), tmp_path / "lora", layout="exact")
    return tmp_path / "lora"


def test_a_lora_rank_pattern_that_disagrees_with_the_tensors_is_refused(tmp_path, bert_lora):
    config = json.loads((bert_lora / CONFIG).read_text())
    pattern, rank = next(iter(config["rank_pattern"].items()))
    adapter = tampered(bert_lora, tmp_path / "pattern", lambda c: c["rank_pattern"].update({pattern: rank + 1}))
    module = pattern.lstrip("^").replace("\\", "")
    refused(make_model("bert"), adapter, f"'base_model.model.{module}.lora_A.weight' has shape ({rank}, 32); "
                                         f"expected ({rank + 1}, 32)")


@pytest.mark.parametrize("edit, fragment", [
    ({"use_dora": True}, "use_dora is True; expected False, its default (only plain LoRA adapters are verified)"),
    ({"bias": "all"}, "bias is 'all'; expected 'none', its default"),
    ({"megatron_config": {"a": 1}, "megatron_core": "os"}, "megatron_config is {'a': 1}; expected None, its default"),
    ({"init_lora_weights": "pissa"}, "init_lora_weights is 'pissa'; expected True, its default"),
    ({"init_lora_weights": 1}, "init_lora_weights is 1; expected True, its default"),
    ({"rank_pattern": ["x"]}, "rank_pattern is ['x']; expected an object of module name -> number"),
    ({"alpha_pattern": {"x": "1"}}, "alpha_pattern is {'x': '1'}; expected an object of module name -> number"),
])
def test_a_lora_config_using_more_than_plain_lora_is_refused(tmp_path, bert_lora, edit, fragment):
    adapter = tampered(bert_lora, tmp_path / "extras", lambda c: c.update(edit))
    refused(make_model("bert"), adapter, f"{CONFIG}: {fragment}")


def test_a_lora_rank_of_zero_is_refused(tmp_path, bert_lora):
    adapter = tampered(bert_lora, tmp_path / "r0", lambda c: c.update(r=0, rank_pattern={}))
    refused(make_model("bert"), adapter, "LoRA rank of", "is 0; expected a positive integer")


def test_sora_weights_relabelled_as_lora_are_refused(tmp_path, mlp_adapter):
    def relabel(config):
        del config["kept_ranks"], config["gate_init"]
        config.update(peft_type="LORA", target_modules=["fc2"])
    adapter = tampered(mlp_adapter, tmp_path / "relabelled", relabel)
    refused(make_model("mlp"), adapter, "missing tensor 'base_model.model.fc2.lora_A.weight'")


# ---- load_adapter_safely never touches the model when verify fails --------------------------------------------------

@pytest.mark.parametrize("case", ["pickle", "nan", "shape"])
def test_load_adapter_safely_refuses_before_touching_the_model(tmp_path, mlp_adapter, case):
    adapter = tampered(mlp_adapter, tmp_path / case)
    key = "base_model.model.fc2.sora_B.weight"
    tensors = load_file(str(adapter / WEIGHTS))
    if case == "pickle":
        torch.save(tensors, adapter / "adapter_model.bin")
        (adapter / WEIGHTS).unlink()
    else:
        tensors[key] = torch.full_like(tensors[key], float("nan")) if case == "nan" else torch.zeros(1, 1)
        save_file(tensors, str(adapter / WEIGHTS))
    model = make_model("mlp")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InputError):
        load_adapter_safely(model, adapter)
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


# ---- scales, depth, task_type, and a load that fails inside PEFT ------------------------------------------------------

def with_raw_number(adapter, placeholder, raw):
    """Put a number JSON allows but json.dumps cannot write (1e400 parses as inf) where `placeholder` stands."""
    text = (adapter / CONFIG).read_text()
    assert str(placeholder) in text
    (adapter / CONFIG).write_text(text.replace(str(placeholder), raw))
    return adapter


@pytest.mark.parametrize("edit, raw, fragment", [
    ({"lora_alpha": 1e308}, None, "the scale of 'fc1', lora_alpha / r, is 1e+308 / 4 = 2.5e+307; "
                                  "expected |scale| <= 10000"),
    ({"lora_alpha": 40004}, None, "the scale of 'fc1', lora_alpha / r, is 40004 / 4 = 1e+04; expected"),
    ({"lora_alpha": 12345.5}, "1e400", "lora_alpha is inf; expected a finite number"),
    ({"lora_alpha": 10**400}, None, "lora_alpha is 1000"),
    ({"r": 10**400}, None, "r is 1000"),
    ({"alpha_pattern": {"fc1": 1e9}}, None, "the scale of 'fc1', lora_alpha / r, is 1000000000.0 / 4 = 2.5e+08"),
    ({"use_rslora": True, "lora_alpha": 20002}, None, "the scale of 'fc1', lora_alpha / sqrt(r), is 20002 / 4 = 1e+04"),
    ({"rank_pattern": {"fc1": 2}, "lora_alpha": 30000}, None, "the scale of 'fc1', lora_alpha / r, is 30000 / 2 = 1.5e+04"),
], ids=["alpha-1e308", "scale-above-1e4", "alpha-inf", "alpha-huge-int", "r-huge", "alpha-pattern", "rslora",
        "rank-pattern-r-max"])
def test_a_sora_config_with_an_absurd_or_non_finite_scale_is_refused(tmp_path, mlp_adapter, edit, raw, fragment):
    adapter = tampered(mlp_adapter, tmp_path / "scale", lambda c: c.update(edit))
    if raw:
        with_raw_number(adapter, edit["lora_alpha"], raw)
    refused(make_model("mlp"), adapter, f"{CONFIG}: {fragment}")


def test_a_scale_of_exactly_the_bound_passes(tmp_path, mlp_adapter):
    adapter = tampered(mlp_adapter, tmp_path / "bound", lambda c: c.update(lora_alpha=40000))  # r = 4: scale 1e4
    verify_adapter(make_model("mlp"), adapter)


def first_pattern(adapter):
    return next(iter(json.loads((adapter / CONFIG).read_text())["alpha_pattern"]))


@pytest.mark.parametrize("edit, raw, fragment", [
    (lambda c: c.update(lora_alpha=1e308), None, "lora_alpha / r, is 1e+308 / 3 = 3.333e+307; expected |scale| <= "
                                                 "10000"),
    (lambda c: c.update(lora_alpha=-1e5), None, "lora_alpha / r, is -100000.0 / 3 = -3.333e+04; expected"),
    (lambda c: c.update(lora_alpha=20000, use_rslora=True), None, "lora_alpha / sqrt(r), is 20000 / 3 = 1.155e+04"),
    (lambda c: c["alpha_pattern"].update({next(iter(c["alpha_pattern"])): 1e308}), None,
     "the scale of 'bert.encoder.layer.0.attention.output.dense', lora_alpha / r, is 1e+308 / 1"),
    (lambda c: c["alpha_pattern"].update({next(iter(c["alpha_pattern"])): 12345.5}), "1e400",
     "alpha_pattern['^bert\\\\.encoder\\\\.layer\\\\.0\\\\.attention\\\\.output\\\\.dense'] is inf; expected a finite "
     "number"),
    (lambda c: c["rank_pattern"].update({next(iter(c["rank_pattern"])): 2.5}), None,
     "rank_pattern['^bert\\\\.encoder\\\\.layer\\\\.0\\\\.attention\\\\.output\\\\.dense'] is 2.5; expected an integer "
     "in [1, 1048576]"),
], ids=["alpha-1e308", "alpha-negative", "rslora", "alpha_pattern-1e308", "alpha_pattern-inf", "rank_pattern-float"])
def test_a_lora_config_with_an_absurd_or_non_finite_scale_is_refused(tmp_path, bert_lora, edit, raw, fragment):
    adapter = tampered(bert_lora, tmp_path / "scale", edit)
    if raw:
        with_raw_number(adapter, 12345.5, raw)
    refused(make_model("bert"), adapter, f"{CONFIG}: ", fragment)


def test_rslora_within_the_bound_and_the_same_alpha_without_it_pass(tmp_path, bert_lora):
    verify_adapter(make_model("bert"), tampered(bert_lora, tmp_path / "plain", lambda c: c.update(lora_alpha=20000)))
    verify_adapter(make_model("bert"), tampered(bert_lora, tmp_path / "rs", lambda c: c.update(lora_alpha=100,
                                                                                            use_rslora=True)))


@pytest.mark.parametrize("text", [
    "[" * 100000 + "]" * 100000,
    '{"peft_type": "SORA", "r": 4, "target_modules": ["fc1"], "auto_mapping": ' + "[" * 100 + "]" * 100 + "}",
], ids=["100000-lists", "100-lists-in-a-field"])
def test_a_deeply_nested_config_is_refused_in_one_line(tmp_path, mlp_adapter, text):
    adapter = tampered(mlp_adapter, tmp_path / "deep")
    (adapter / CONFIG).write_text(text)
    refused(make_model("mlp"), adapter, f"{CONFIG}: the JSON nests more than 32 levels deep; expected a PEFT adapter "
                                        "config")


@pytest.mark.parametrize("field", ["target_modules", "exclude_modules"])
def test_a_module_pattern_that_is_not_a_regular_expression_is_refused(tmp_path, mlp_adapter, field):
    adapter = tampered(mlp_adapter, tmp_path / "regex", lambda c: c.update({field: "fc(1"}))
    refused(make_model("mlp"), adapter, f"{CONFIG}: 'fc(1' is not a valid regular expression (missing ),")


@pytest.fixture
def bert_seq_cls(tmp_path):
    model = sora_model("bert", task_type="SEQ_CLS")
    model.save_pretrained(str(tmp_path / "seq_cls"))
    return tmp_path / "seq_cls", output(model, make_input("bert"))


def test_a_seq_cls_adapter_loads_on_a_sequence_classifier(bert_seq_cls):
    adapter, expected = bert_seq_cls
    loaded = load_adapter_safely(make_model("bert"), adapter)
    assert isinstance(loaded, peft.PeftModelForSequenceClassification)
    torch.testing.assert_close(output(loaded, make_input("bert")), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("task", ["CAUSAL_LM", "TOKEN_CLS", "FEATURE_EXTRACTION"])
def test_a_task_type_that_does_not_fit_the_model_is_refused_and_the_model_untouched(tmp_path, bert_seq_cls, task):
    adapter = tampered(bert_seq_cls[0], tmp_path / "task", lambda c: c.update(task_type=task))
    model = make_model("bert")
    refused(model, adapter, f"{CONFIG}: task_type is '{task}', which does not fit the base model "
                            "BertForSequenceClassification; expected SEQ_CLS (or null)")
    with pytest.raises(InputError, match="does not fit the base model"):
        load_adapter_safely(model, adapter)
    assert not any(isinstance(m, BaseTunerLayer) for m in model.modules())


def test_a_task_type_on_a_model_that_is_not_a_transformers_model_is_refused(tmp_path, mlp_adapter):
    adapter = tampered(mlp_adapter, tmp_path / "task", lambda c: c.update(task_type="SEQ_CLS"))
    refused(make_model("mlp"), adapter, f"{CONFIG}: task_type is 'SEQ_CLS', which needs a transformers model, and "
                                        "the base model MLP is not one; expected task_type null")


def model_state(model):
    """Everything a failed load must leave as it was: module tree (by identity), attributes, tensors, config."""
    return ([(name, type(m), id(m), sorted(vars(m))) for name, m in model.named_modules()],
            [(name, id(p), p.requires_grad, p.clone()) for name, p in model.named_parameters()],
            {k: v.clone() for k, v in model.state_dict().items()},
            dict(vars(model.config)) if hasattr(model, "config") else None)


def assert_same_state(before, after):
    assert before[0] == after[0]
    assert [x[:3] for x in before[1]] == [x[:3] for x in after[1]]
    assert all(torch.equal(b[3], a[3]) for b, a in zip(before[1], after[1]))
    assert before[2].keys() == after[2].keys() and all(torch.equal(before[2][k], after[2][k]) for k in before[2])
    assert before[3] == after[3]


@pytest.mark.parametrize("arch", ["mlp", "bert"])
def test_a_load_that_fails_inside_peft_leaves_the_model_as_it_was(tmp_path, monkeypatch, request, arch):
    adapter, expected = saved_sora(tmp_path / "a") if arch == "mlp" else request.getfixturevalue("bert_seq_cls")

    def boom(*args, **kwargs):
        raise RuntimeError("failed while loading the weights")
    monkeypatch.setattr(peft.peft_model, "set_peft_model_state_dict", boom)
    model = make_model(arch)
    before = model_state(model)
    with pytest.raises(RuntimeError, match="failed while loading the weights"):
        load_adapter_safely(model, adapter, is_trainable=True)
    assert_same_state(before, model_state(model))
    monkeypatch.undo()  # the same model then loads the adapter as a fresh one would
    loaded = load_adapter_safely(model, adapter)
    torch.testing.assert_close(output(loaded, make_input(arch)), expected, atol=1e-5, rtol=0)
