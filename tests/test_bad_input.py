"""Bad input to the core: a one-line ValueError that names the bad value and what is allowed."""

import peft
import pytest

import soralib
from conftest import make_model, sora_model


def one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("field, value, expected", [
    ("r", 0, "r must be a positive integer (r_max), got 0"),
    ("r", -3, "r must be a positive integer (r_max), got -3"),
    ("r", 2.5, "r must be a positive integer (r_max), got 2.5"),
    ("lora_alpha", 0, "lora_alpha must be a finite number > 0, got 0"),
    ("lora_dropout", 1.0, "lora_dropout must be in [0, 1), got 1.0"),
    ("gate_init", "zeros", "gate_init must be one of randn, ones, got 'zeros'"),
])
def test_config_rejects_bad_field_values(field, value, expected):
    with pytest.raises(ValueError) as excinfo:
        soralib.SoraConfig(**{field: value})
    assert one_line(excinfo) == expected


@pytest.mark.parametrize("kwargs, expected", [
    ({"threshold": -1e-3}, "threshold must be a finite number >= 0, got -0.001"),
    ({"threshold": float("nan")}, "threshold must be a finite number >= 0, got nan"),
    ({"threshold_mode": "adaptive"}, "threshold_mode must be one of fixed, lr_scaled, got 'adaptive'"),
    ({"lr": 0.0}, "lr must be a finite number > 0, got 0.0"),
    ({"weight_decay": -0.1}, "weight_decay must be a finite number >= 0, got -0.1"),
])
def test_optimizer_rejects_bad_thresholds_and_rates(kwargs, expected):
    args = {"lr": 1e-3, **kwargs}
    with pytest.raises(ValueError) as excinfo:
        soralib.create_sora_optimizer(sora_model("mlp"), **args)
    assert one_line(excinfo) == expected


def test_set_threshold_rejects_a_negative_value():
    opt = soralib.create_sora_optimizer(sora_model("mlp"), lr=1e-3)
    with pytest.raises(ValueError, match="threshold must be a finite number >= 0, got -1"):
        soralib.set_threshold(opt, -1)


def test_target_modules_that_match_nothing_list_the_closest_module_names():
    with pytest.raises(ValueError) as excinfo:
        peft.get_peft_model(make_model("bert"), soralib.SoraConfig(target_modules=["qeury", "vale"]))
    message = one_line(excinfo)
    assert "qeury" in message and "closest linear modules:" in message
    assert "query" in message and "value" in message


def test_targets_that_are_not_linear_layers_are_rejected_with_their_type():
    with pytest.raises(ValueError) as excinfo:
        peft.get_peft_model(make_model("bert"), soralib.SoraConfig(target_modules=["attention.output.LayerNorm"]))
    assert one_line(excinfo) == ("target module 'bert.encoder.layer.0.attention.output.LayerNorm' has type LayerNorm; "
                                 "allowed: torch.nn.Linear, transformers Conv1D")


def test_embedding_targets_are_refused_naming_the_alternative():
    with pytest.raises(ValueError) as excinfo:
        peft.get_peft_model(make_model("bert"), soralib.SoraConfig(target_modules=["word_embeddings"]))
    assert one_line(excinfo) == ("target module 'bert.embeddings.word_embeddings' is an nn.Embedding: SoRA adapts "
                                 "nn.Linear and Conv1D; for embeddings use peft.LoraConfig or modules_to_save")


def test_optimizer_on_a_model_without_sora_layers_says_how_to_wrap_it():
    with pytest.raises(ValueError, match="no trainable SoRA gates; wrap it with peft.get_peft_model"):
        soralib.create_sora_optimizer(make_model("mlp"), lr=1e-3)


def test_sparsity_report_counts_in_plus_out_per_kept_rank():
    model = sora_model("mlp")  # fc1: 12 -> 24, fc2: 24 -> 12, r = 4
    gates = soralib.gate_parameters(model)
    with __import__("torch").no_grad():
        gates[0][:3] = 0  # fc1 keeps 1 rank
    report = soralib.sparsity_report(model)
    by_name = {m["module"]: m for m in report["modules"]}
    assert by_name["fc1"]["kept_rank"] == 1 and by_name["fc1"]["kept_params"] == 36
    assert by_name["fc2"]["kept_rank"] == 4 and by_name["fc2"]["kept_params"] == 4 * 36
    assert report["kept_params"] == 5 * 36 and report["lora_params_at_r_max"] == 8 * 36
    assert report["kept_fraction"] == pytest.approx(5 / 8)
