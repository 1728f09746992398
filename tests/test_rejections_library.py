"""The rows of docs/errors.md for the library (no CLI) that no other test file covers: SoraConfig fields, optimizer
arguments, target modules, and export, prune, the sparsity report and merge, each rejected with a one-line message."""

import peft
import pytest
import torch
from torch import nn

import soralib
from conftest import make_model, sora_model
from rejection_helpers import one_line
from soralib.layer import SoraLinear

# SORALIB_CACHE in each test's own tmp_path (conftest._cache): nothing is cached in the home directory
pytestmark = pytest.mark.usefixtures("_cache")


# ---- SoraConfig fields ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, expected", [
    ({"r": True}, "r must be a positive integer (r_max), got True"),
    ({"lora_alpha": float("nan")}, "lora_alpha must be a finite number > 0, got nan"),
    ({"lora_dropout": -0.1}, "lora_dropout must be in [0, 1), got -0.1"),
    ({"kept_ranks": ["fc1"]}, "kept_ranks must be a dict of module path -> rank, got ['fc1']"),
    ({"r": 4, "kept_ranks": {"fc1": 5}}, "kept_ranks['fc1'] must be an integer in [0, r=4], got 5"),
    ({"r": 4, "rank_pattern": {"fc1": 6}, "kept_ranks": {"fc1": 7}},
     "kept_ranks['fc1'] must be an integer in [0, r_max=6 (rank_pattern)], got 7"),
    ({"rank_pattern": ["fc1"]}, "rank_pattern must be a dict of module key (regex) -> value, got ['fc1']"),
    ({"rank_pattern": {"fc1": 0}}, "rank_pattern['fc1'] must be a positive integer, got 0"),
    ({"rank_pattern": {"fc1": 2.0}}, "rank_pattern['fc1'] must be a positive integer, got 2.0"),
    ({"rank_pattern": {"fc(": 2}}, "rank_pattern key 'fc(' is not a valid regex (missing ), unterminated subpattern "
                                   "at position 2)"),
    ({"alpha_pattern": {"fc1": -1}}, "alpha_pattern['fc1'] must be a finite number > 0, got -1"),
    ({"alpha_pattern": {"": 2}}, "alpha_pattern keys must be non-empty module names or regexes, got ''"),
    ({"use_rslora": "yes"}, "use_rslora must be true or false, got 'yes'"),
    ({"bias": "all"}, "bias must be 'none' (SoRA trains no biases; put the module in modules_to_save to train its "
                      "bias), got 'all'"),
    ({"layers_pattern": "layer"}, "layers_pattern='layer' needs layers_to_transform (the layer indexes to adapt)"),
    ({"target_modules": ".*query", "layers_to_transform": [0]}, "layers_to_transform and layers_pattern need "
     "target_modules as a list of names, not one regex; got target_modules='.*query'"),
    ({"layers_to_transform": [0, -1]}, "layers_to_transform must be a layer index >= 0 or a list of them, got [0, -1]"),
    ({"layers_to_transform": [0], "layers_pattern": 3}, "layers_pattern must be a name or a list of names, got 3"),
    ({"target_modules": 5}, "target_modules must be a list of module names or one regex string (or 'all-linear'), "
                            "got 5"),
    ({"target_modules": ["fc1", 5]}, "target_modules must be a list of module names or one regex string (or "
                                     "'all-linear'), got ['fc1', 5]"),
    ({"target_modules": "(("}, "target_modules '((' is not a valid regex (missing ), unterminated subpattern at "
                               "position 1); expected a list of module names or one regex"),
    ({"exclude_modules": 5}, "exclude_modules must be a list of module names or one regex string, got 5"),
    ({"modules_to_save": 5}, "modules_to_save must be a list of module names, got 5"),
    ({"modules_to_save": "head"}, "modules_to_save must be a list of module names, got 'head'; did you mean ['head']?"),
    ({"inference_mode": "no"}, "inference_mode must be true or false, got 'no'"),
], ids=["r-bool", "lora_alpha-nan", "lora_dropout-negative", "kept_ranks-list", "kept_ranks-above-r",
        "kept_ranks-above-pattern-r_max", "rank_pattern-list", "rank_pattern-zero", "rank_pattern-float",
        "rank_pattern-bad-regex", "alpha_pattern-negative", "alpha_pattern-empty-key", "use_rslora-str", "bias-all",
        "layers_pattern-alone", "layers_to_transform-with-regex-targets", "layers_to_transform-negative",
        "layers_pattern-int", "target_modules-int", "target_modules-int-entry", "target_modules-bad-regex",
        "exclude_modules-int", "modules_to_save-int", "modules_to_save-str", "inference_mode-str"])
def test_sora_config_rejects_bad_field_values(kwargs, expected):
    with pytest.raises(ValueError) as excinfo:
        soralib.SoraConfig(**kwargs)
    assert one_line(excinfo) == expected


@pytest.mark.parametrize("targets, adapted", [
    ("all-linear", ["fc1", "fc2", "head"]),  # a plain torch model has no output head PEFT knows to leave out
    ("fc.", ["fc1", "fc2"]), (["fc1", "fc2"], ["fc1", "fc2"]), (("fc1", "fc2"), ["fc1", "fc2"]),
    ({"fc1", "fc2"}, ["fc1", "fc2"]),
], ids=["all-linear", "regex", "list", "tuple", "set"])
def test_sora_config_takes_target_modules_in_every_form_peft_lora_takes(targets, adapted):
    model = peft.get_peft_model(make_model("mlp"), soralib.SoraConfig(target_modules=targets))
    assert [name.removeprefix("base_model.model.") for name, _ in soralib.optim.sora_layers(model)] == adapted


# ---- optimizer arguments --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, expected", [
    ({"threshold": float("inf")}, "threshold must be a finite number >= 0, got inf"),
    ({"threshold": "0.1"}, "threshold must be a finite number >= 0, got '0.1'"),
    ({"min_rank": -1}, "min_rank must be an integer >= 0, got -1"),
    ({"min_rank": 1.5}, "min_rank must be an integer >= 0, got 1.5"),
    ({"lr": "1e-3"}, "lr must be a finite number > 0, got '1e-3'"),
    ({"lr": None}, "lr must be a finite number > 0, got None"),
    ({"weight_decay": "0.1"}, "weight_decay must be a finite number >= 0, got '0.1'"),
    ({"gate_lr": "x"}, "gate_lr must be a finite number > 0 (or None: lr), got 'x'"),
    ({"gate_group_kwargs": {"sora_threshold": -5}},
     "gate_group_kwargs['sora_threshold'] must be a finite number >= 0, got -5"),
    ({"gate_group_kwargs": {"lr": "1e-3"}}, "gate_group_kwargs['lr'] must be a finite number > 0, got '1e-3'"),
    ({"gate_group_kwargs": 5}, "gate_group_kwargs must be a dict of the gates' optimizer settings, got 5"),
], ids=["threshold-inf", "threshold-str", "min_rank-negative", "min_rank-float", "lr-str", "lr-None",
        "weight_decay-str", "gate_lr-str", "gate_group_kwargs-threshold", "gate_group_kwargs-lr-str",
        "gate_group_kwargs-not-dict"])
def test_optimizer_rejects_bad_arguments(kwargs, expected):
    with pytest.raises(ValueError) as excinfo:
        soralib.create_sora_optimizer(sora_model("mlp"), **{"lr": 1e-3, **kwargs})
    assert one_line(excinfo) == expected


@pytest.mark.parametrize("kwargs, expected", [
    ({"threshold": -1}, "threshold must be a finite number >= 0, got -1"),
    ({"lr": "1e-3"}, "lr must be a finite number > 0, got '1e-3'"),
    ({"gate_group_kwargs": {"sora_min_rank": 0.5}}, "gate_group_kwargs['sora_min_rank'] must be an integer >= 0, "
                                                    "got 0.5"),
], ids=["threshold-negative", "lr-str", "gate_group_kwargs-min_rank"])
def test_trainer_optimizer_form_checks_its_arguments_when_called_not_when_the_trainer_builds_it(kwargs, expected):
    with pytest.raises(ValueError) as excinfo:
        soralib.trainer_optimizer_cls_and_kwargs(**{"lr": 1e-3, **kwargs})
    assert one_line(excinfo) == expected


def test_soralib_callback_checks_the_gate_group_settings_it_is_given():
    with pytest.raises(ValueError) as excinfo:
        soralib.SoraCallback(threshold=1e-3, gate_group_kwargs={"sora_threshold": -5})
    assert one_line(excinfo) == "gate_group_kwargs['sora_threshold'] must be a finite number >= 0, got -5"
    with pytest.raises(ValueError) as excinfo:
        soralib.SoraCallback(threshold=1e-3, gate_lr="x")
    assert one_line(excinfo) == "gate_lr must be a finite number > 0 (or None: lr), got 'x'"


def test_soft_threshold_refuses_a_negative_tau_that_would_grow_the_gates():
    with pytest.raises(ValueError) as excinfo:
        soralib.soft_threshold(torch.tensor([-1.0, 0.2, 0.5]), -0.3)
    assert one_line(excinfo) == "tau must be a finite number >= 0, got -0.3"


def test_add_prox_step_refuses_an_optimizer_without_a_gate_group_and_adds_no_hook():
    plain = torch.optim.SGD(make_model("mlp").parameters(), lr=0.1)
    with pytest.raises(ValueError) as excinfo:
        soralib.add_prox_step(plain)
    assert one_line(excinfo) == ("add_prox_step needs an optimizer with a SoRA gate group (a param group with "
                                 "'sora_threshold'); this SGD has none: build it with soralib.create_sora_optimizer")
    assert not getattr(plain, soralib.prox._HOOKED, False)


def test_add_prox_step_checks_a_hand_built_gate_group():
    model = sora_model("mlp")
    gates = soralib.gate_parameters(model)
    opt = torch.optim.SGD([{"params": gates, "sora_threshold": -1.0, "sora_threshold_mode": "fixed"}], lr=0.1)
    with pytest.raises(ValueError) as excinfo:
        soralib.add_prox_step(opt)
    assert one_line(excinfo) == "optimizer.param_groups[0]['sora_threshold'] must be a finite number >= 0, got -1.0"


@pytest.mark.parametrize("case", ["no mode", "not gates", "weight decay"])
def test_add_prox_step_refuses_a_hand_built_gate_group_it_cannot_step_and_adds_no_hook(case):
    # no mode: every step failed after the optimizer's update; not gates: A, B and the head were zeroed entry by
    # entry; weight decay: the gates were decayed, which soralib promises they never are
    model = sora_model("mlp")
    params = list(model.parameters()) if case == "not gates" else soralib.gate_parameters(model)
    group = {"params": params, "sora_threshold": 1e-2, "sora_threshold_mode": "fixed",
             "weight_decay": 0.1 if case == "weight decay" else 0.0}
    if case == "no mode":
        del group["sora_threshold_mode"]
    opt = torch.optim.AdamW([group], lr=0.1)
    with pytest.raises(ValueError) as excinfo:
        soralib.add_prox_step(opt)
    assert one_line(excinfo) == {
        "no mode": "optimizer.param_groups[0] has 'sora_threshold' but no 'sora_threshold_mode'; expected one of "
                   "fixed, lr_scaled (soralib.create_sora_optimizer sets both)",
        "not gates": "optimizer.param_groups[0] holds a parameter of shape (24, 12); a gate group holds SoRA gate "
                     "vectors only (soralib.gate_parameters(model))",
        "weight decay": "optimizer.param_groups[0]['weight_decay'] must be 0 for SoRA gates (the prox step's l1 is "
                        "their only regulariser), got 0.1: set it to 0 (a torch optimizer's default applies where the "
                        "group does not say)"}[case]
    assert not getattr(opt, soralib.prox._HOOKED, False)


@pytest.mark.parametrize("kwargs, expected", [
    ({"weight_decay": 0.1}, "gate_group_kwargs['weight_decay'] must be 0 for SoRA gates (the prox step's l1 is their "
                            "only regulariser), got 0.1: set it to 0 (a torch optimizer's default applies where the "
                            "group does not say)"),
    ({"params": []}, "gate_group_kwargs cannot set 'params': the gate group holds the model's SoRA gates"),
    ({"esp": 1e-6}, "gate_group_kwargs key 'esp' is not a setting of AdamW; expected one of amsgrad, betas, "
                    "capturable, differentiable, eps, foreach, fused, lr, maximize, weight_decay"),
], ids=["weight-decay", "params", "typo"])
@pytest.mark.parametrize("form", ["create_sora_optimizer", "trainer_optimizer_cls_and_kwargs"])
def test_gate_group_kwargs_that_would_decay_drop_or_miss_the_gates_are_refused(kwargs, expected, form):
    with pytest.raises(ValueError) as excinfo:
        if form == "create_sora_optimizer":
            soralib.create_sora_optimizer(sora_model("mlp"), lr=1e-3, gate_group_kwargs=kwargs)
        else:  # when called, not first when the Trainer builds the optimizer
            soralib.trainer_optimizer_cls_and_kwargs(1e-3, gate_group_kwargs=kwargs)
    assert one_line(excinfo) == expected


def test_soracallback_refuses_a_gate_group_key_the_trainers_optimizer_does_not_have():
    # its optimizer class is known only when the Trainer hands it over: the typo was silently ignored
    model = sora_model("mlp")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = [list(g["params"]) for g in optimizer.param_groups]
    with pytest.raises(ValueError) as excinfo:
        soralib.SoraCallback(threshold=1e-3, gate_group_kwargs={"esp": 1e-6}).on_train_begin(
            None, None, None, model=model, optimizer=optimizer, lr_scheduler=None)
    assert one_line(excinfo).startswith("gate_group_kwargs key 'esp' is not a setting of AdamW; expected one of ")
    assert [list(g["params"]) for g in optimizer.param_groups] == before


def test_gate_group_kwargs_may_carry_a_name_for_loggers():
    opt = soralib.create_sora_optimizer(sora_model("mlp"), lr=1e-3, gate_group_kwargs={"name": "sora_gates"})
    assert opt.param_groups[-1]["name"] == "sora_gates"


def test_set_threshold_needs_an_optimizer_with_a_sora_gate_group():
    plain = torch.optim.SGD(make_model("mlp").parameters(), lr=0.1)
    with pytest.raises(ValueError) as excinfo:
        soralib.set_threshold(plain, 1e-3)
    assert one_line(excinfo) == ("this optimizer has no SoRA gate group; build it with "
                                 "soralib.create_sora_optimizer")


def test_gate_l1_needs_a_model_with_sora_layers():
    with pytest.raises(ValueError) as excinfo:
        soralib.gate_l1(make_model("mlp"))
    assert one_line(excinfo) == "gate_l1 needs a model with SoRA layers; this one has none"


# ---- targets --------------------------------------------------------------------------------------------------------

def test_exclude_modules_that_leave_no_target_are_rejected_with_the_closest_names():
    config = soralib.SoraConfig(target_modules=["fc1"], exclude_modules=["fc1"])
    with pytest.raises(ValueError) as excinfo:
        peft.get_peft_model(make_model("mlp"), config)
    assert one_line(excinfo) == "No modules were targeted for adaptation; closest linear modules: fc1, fc2"


@pytest.mark.parametrize("layers, pattern, expected", [
    ([4], None, "in layers_to_transform=[4]; the targets are in layers 0, 1"),
    ([0], "layers", "in layers_to_transform=[0] with layers_pattern='layers', which names no layer list holding them; "
                    "without layers_pattern the targets are in layers 0, 1"),
], ids=["layer-out-of-range", "wrong-layers-pattern"])
def test_layers_to_transform_that_leave_no_target_name_the_layers_the_targets_are_in(layers, pattern, expected):
    # before: the closest names, "query" itself, which hid the cause (BERT's 2 layers are in "bert.encoder.layer")
    config = soralib.SoraConfig(target_modules=["query"], layers_to_transform=layers, layers_pattern=pattern)
    with pytest.raises(ValueError) as excinfo:
        peft.get_peft_model(make_model("bert"), config)
    assert one_line(excinfo) == f"Target modules {{'query'}} not found in the base model {expected}"


def test_no_target_modules_on_an_architecture_peft_does_not_know_is_rejected():
    with pytest.raises(ValueError) as excinfo:
        peft.get_peft_model(make_model("mlp"), soralib.SoraConfig())
    assert "Please specify `target_modules` in `peft_config`" in one_line(excinfo)  # PEFT's own message


def test_a_modules_to_save_entry_that_matches_no_module_is_rejected_with_the_closest_names():
    model = make_model("bert")
    config = soralib.SoraConfig(task_type="SEQ_CLS", target_modules=["query"], modules_to_save=["clasifier"])
    with pytest.raises(ValueError) as excinfo:
        peft.get_peft_model(model, config)
    assert one_line(excinfo) == ("modules_to_save entry 'clasifier' matches no module of the model; "
                                 "closest modules: classifier, layer, pooler")
    assert not any(isinstance(m, soralib.SoraLayer) for m in model.modules())  # refused before injecting
    # the head names PEFT adds itself for SEQ_CLS are not refused: a Llama has "score" and no "classifier"
    config = soralib.SoraConfig(task_type="SEQ_CLS", target_modules=["q_proj"], modules_to_save=["score"])
    assert "classifier" in peft.get_peft_model(make_model("llama"), config).peft_config["default"].modules_to_save


@pytest.mark.parametrize("layer, expected", [
    (nn.Embedding(3, 4), "cannot adapt an nn.Embedding: SoRA adapts nn.Linear and Conv1D; for embeddings use "
                         "peft.LoraConfig or modules_to_save"),
    (nn.Conv2d(3, 4, 1), "cannot adapt a layer of type Conv2d; allowed: torch.nn.Linear, transformers Conv1D"),
], ids=["embedding", "conv2d"])
def test_a_sora_layer_refuses_a_base_layer_that_is_not_linear(layer, expected):
    with pytest.raises(ValueError) as excinfo:
        SoraLinear(layer, "default", r_max=2, rank=2, lora_alpha=4, lora_dropout=0.0, gate_init="randn")
    assert one_line(excinfo) == expected


# ---- export, prune, sparsity report, merge --------------------------------------------------------------------------

@pytest.mark.parametrize("call, expected", [
    (lambda: soralib.sparsity_report(make_model("mlp")), "the model has no SoRA layers for adapter 'default'"),
    (lambda: soralib.sparsity_report(sora_model("mlp"), adapter="other"),
     "the model has no SoRA layers for adapter 'other'"),
    (lambda: soralib.prune(make_model("mlp")), "the model has no SoRA layers for adapter 'default'"),
    (lambda: soralib.prune(sora_model("mlp"), adapter="other"), "the model has no SoRA layers for adapter 'other'"),
    (lambda: soralib.gate_l1(sora_model("mlp"), adapter="other"), "the model has no SoRA layers for adapter 'other'"),
], ids=["sparsity_report-plain-model", "sparsity_report-unknown-adapter", "prune-plain-model", "prune-unknown-adapter",
        "gate_l1-unknown-adapter"])
def test_sparsity_report_and_prune_need_sora_layers_for_the_adapter(call, expected):
    with pytest.raises(ValueError) as excinfo:
        call()
    assert one_line(excinfo) == expected


def test_prune_refuses_a_merged_model_and_leaves_it_as_it_was():
    model = sora_model("mlp")
    model.base_model.merge_adapter()
    ranks = {name: layer.r["default"] for name, layer in soralib.optim.sora_layers(model)}
    with pytest.raises(ValueError) as excinfo:
        soralib.prune(model)
    assert one_line(excinfo) == "cannot prune 'fc1' while merged; unmerge first"
    assert ranks == {name: layer.r["default"] for name, layer in soralib.optim.sora_layers(model)}


def test_safe_merge_refuses_an_adapter_that_gives_non_finite_weights():
    model = sora_model("mlp")
    layer = next(m for m in model.modules() if isinstance(m, soralib.SoraLayer))
    base = layer.get_base_layer().weight.detach().clone()
    with torch.no_grad():
        layer.sora_B["default"].weight.fill_(float("inf"))
    with pytest.raises(ValueError) as excinfo:
        layer.merge(safe_merge=True)
    assert one_line(excinfo) == "merging adapter 'default' gives non-finite weights; the adapter is broken"
    assert torch.equal(layer.get_base_layer().weight, base) and not layer.merged


def test_exact_export_of_an_adapter_whose_gates_are_all_zero_is_refused_and_writes_nothing(tmp_path):
    model = sora_model("mlp")
    with torch.no_grad():
        for gate in soralib.gate_parameters(model):
            gate.zero_()
    with pytest.raises(ValueError) as excinfo:
        soralib.export_lora(model, tmp_path / "adapter", layout="exact")
    assert one_line(excinfo) == ("every gate is zero: the adapter is empty; export with layout='uniform' to get "
                                 "zero LoRA")
    assert list(tmp_path.iterdir()) == []
