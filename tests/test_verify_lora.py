"""verify_adapter on an exported LoRA adapter: rank patterns that disagree with the tensors, configs using more
than plain LoRA, rank 0, SoRA weights relabelled as LoRA, and absurd or non-finite scales."""

import json

import peft
import pytest
import torch

import soralib
from conftest import make_model, trained_sora
from soralib.verify import verify_adapter
from verify_helpers import CONFIG, refused, tampered, with_raw_number


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
    ({"init_lora_weights": "pissa"}, "init_lora_weights is 'pissa'; expected True or False or 'gaussian'"),
    ({"init_lora_weights": 1}, "init_lora_weights is 1; expected True or False or 'gaussian'"),
    ({"rank_pattern": ["x"]}, "rank_pattern is ['x']; expected an object of module name -> number"),
    ({"alpha_pattern": {"x": "1"}}, "alpha_pattern is {'x': '1'}; expected an object of module name -> number"),
])
def test_a_lora_config_using_more_than_plain_lora_is_refused(tmp_path, bert_lora, edit, fragment):
    adapter = tampered(bert_lora, tmp_path / "extras", lambda c: c.update(edit))
    refused(make_model("bert"), adapter, f"{CONFIG}: {fragment}")


@pytest.mark.parametrize("init", [False, "gaussian"])
def test_an_initialisation_the_saved_weights_replace_is_accepted(tmp_path, bert_lora, init):
    # gaussian or False only choose the starting A and B; PEFT loads them exactly as the default
    adapter = tampered(bert_lora, tmp_path / "init", lambda c: c.update(init_lora_weights=init))
    verify_adapter(make_model("bert"), adapter)


def test_a_lora_rank_of_zero_is_refused(tmp_path, bert_lora):
    adapter = tampered(bert_lora, tmp_path / "r0", lambda c: c.update(r=0, rank_pattern={}))
    refused(make_model("bert"), adapter, "LoRA rank of", "is 0; expected a positive integer")


@pytest.mark.parametrize("field", ["target_modules", "exclude_modules"])
def test_a_lora_module_pattern_that_is_not_a_regular_expression_is_refused(tmp_path, bert_lora, field):
    # LoraConfig takes any string; PEFT would fail on it only while matching modules
    adapter = tampered(bert_lora, tmp_path / "regex", lambda c: c.update({field: "fc(1"}))
    refused(make_model("bert"), adapter, f"{CONFIG}: 'fc(1' is not a valid regular expression (missing ),")


def test_sora_weights_relabelled_as_lora_are_refused(tmp_path, mlp_adapter):
    def relabel(config):
        del config["kept_ranks"], config["gate_init"]
        config.update(peft_type="LORA", target_modules=["fc2"])
    adapter = tampered(mlp_adapter, tmp_path / "relabelled", relabel)
    refused(make_model("mlp"), adapter, "missing tensor 'base_model.model.fc2.lora_A.weight'")


# ---- scales ----------------------------------------------------------------------------------------------------------

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


# ---- what PEFT itself saves ------------------------------------------------------------------------------------------

def tiny_causal_lm():
    import transformers as tf

    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                              num_attention_heads=2, num_key_value_heads=1))


@pytest.mark.parametrize("kind", ["lora", "sora"])
def test_all_linear_minus_excluded_modules_as_peft_saves_it_verifies_and_loads(tmp_path, kind):
    # PEFT writes "all-linear" as the resolved module list, excluded paths included, beside exclude_modules
    make = peft.LoraConfig if kind == "lora" else soralib.SoraConfig
    model = peft.get_peft_model(tiny_causal_lm(), make(r=2, target_modules="all-linear", exclude_modules=["o_proj"],
                                                       task_type="CAUSAL_LM"))
    model.save_pretrained(str(tmp_path / "a"))
    saved = json.loads((tmp_path / "a" / CONFIG).read_text())["target_modules"]
    assert any("o_proj" in entry for entry in saved)  # the case: an entry only excluded modules match
    assert verify_adapter(tiny_causal_lm(), tmp_path / "a").exclude_modules
    soralib.load_adapter_safely(tiny_causal_lm(), tmp_path / "a")


def test_a_base_layer_weight_saved_beside_the_lora_is_refused_naming_the_fix(tmp_path):
    # PEFT's save_embedding_layers="auto" saves lm_head whole when it is a target: loading would replace the model's
    model = peft.get_peft_model(tiny_causal_lm(), peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"],
                                                                  task_type="CAUSAL_LM"))
    model.save_pretrained(str(tmp_path / "a"))
    refused(tiny_causal_lm(), tmp_path / "a", "tensor 'base_model.model.lm_head.base_layer.weight' is a base-model "
            "weight, which loading would put in place of the model's own; expected adapter weights only (save with "
            "save_embedding_layers=False, or export with soralib.export_lora)")
    model.save_pretrained(str(tmp_path / "b"), save_embedding_layers=False)
    verify_adapter(tiny_causal_lm(), tmp_path / "b")
