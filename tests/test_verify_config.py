"""verify_adapter on a SoRA adapter's adapter_config.json: not a JSON object, a bad field value (named with what
was expected), another architecture's adapter, an absurd or non-finite scale, deep nesting, bad regexes."""

import pytest

from conftest import make_model, saved_sora
from soralib.verify import verify_adapter
from verify_helpers import CONFIG, refused, tampered, with_raw_number


# ---- bad configs -----------------------------------------------------------------------------------------------------

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


# ---- scales, depth ---------------------------------------------------------------------------------------------------

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
    refused(make_model("mlp"), adapter, f"{CONFIG}: invalid SORA config: {field} 'fc(1' is not a valid regex "
                                        "(missing ),")
