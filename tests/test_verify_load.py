"""verify_adapter and load_adapter_safely on good adapters: SoRA (gated or pruned) and exported LoRA verify and
load to the outputs they were saved with; a task_type must fit the model; a load that fails, in the check or
inside PEFT, leaves the model as it was."""

import re

import peft
import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file

import soralib
from conftest import make_input, make_model, output, saved_sora, scramble, sora_model, trained_sora
from soralib.errors import InputError
from soralib.verify import load_adapter_safely, verify_adapter
from verify_helpers import CONFIG, WEIGHTS, refused, tampered


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


# ---- task_type, and a load that fails inside PEFT --------------------------------------------------------------------

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


def test_a_seq_cls_adapter_is_checked_for_the_head_peft_adds_to_modules_to_save(tmp_path, bert_seq_cls):
    # PEFT loads a SEQ_CLS adapter with "classifier" and "score" in modules_to_save, whatever its config says
    adapter, expected = bert_seq_cls
    listed_none = tampered(adapter, tmp_path / "none", lambda c: c.update(modules_to_save=None))
    loaded = load_adapter_safely(make_model("bert"), listed_none)  # was refused: "unexpected tensor ...classifier"
    torch.testing.assert_close(output(loaded, make_input("bert")), expected, atol=1e-5, rtol=0)
    headless = tampered(listed_none, tmp_path / "headless",
                        edit_tensors=lambda t: [t.pop(k) for k in [k for k in t if ".classifier." in k]])
    refused(make_model("bert"), headless, "missing tensor 'base_model.model.classifier.")  # PEFT: KeyError mid-load


def test_a_further_adapter_is_checked_for_the_heads_of_the_peft_model_it_joins(tmp_path, bert_seq_cls):
    # PEFT gives it the SEQ_CLS model's heads whatever its own task_type: it passed, then PEFT raised KeyError
    model = load_adapter_safely(make_model("bert"), bert_seq_cls[0])
    headless = tampered(bert_seq_cls[0], tmp_path / "null", lambda c: c.update(task_type=None, modules_to_save=None),
                        lambda t: [t.pop(k) for k in [k for k in t if ".classifier." in k]])
    before = model_state(model)
    with pytest.raises(InputError, match=r"missing tensor 'base_model\.model\.classifier\."):
        load_adapter_safely(model, headless, adapter_name="other")
    assert_same_state(before, model_state(model))


def test_a_head_both_targeted_and_saved_whole_verifies_as_peft_loads_it(tmp_path):
    # PEFT leaves a modules_to_save module out of the targets; the entry was refused as "matches no module"
    config = peft.LoraConfig(r=2, target_modules=["query", "classifier"], task_type="SEQ_CLS")
    model = peft.get_peft_model(make_model("bert"), config)
    model.save_pretrained(str(tmp_path / "a"))
    expected = output(model, make_input("bert"))
    loaded = load_adapter_safely(make_model("bert"), tmp_path / "a")
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


# ---- a second adapter into the same PeftModel ------------------------------------------------------------------------

def second_adapter(path, arch, kind):
    """(adapter directory, outputs of the model it was saved from): another pruned SoRA or its exported LoRA."""
    model = trained_sora(arch)
    scramble(model, seed=5)
    soralib.prune(model)
    if kind == "lora":
        soralib.export_lora(model, path)
    else:
        model.save_pretrained(str(path))
    return path, output(model, make_input(arch))


def first_adapter(path, arch, kind):
    if kind == "sora":
        return saved_sora(path, arch)
    model = trained_sora(arch)
    soralib.export_lora(model, path)
    return path, output(model, make_input(arch))


@pytest.mark.parametrize("arch", ["mlp", "bert", "gpt2"])
@pytest.mark.parametrize("kind", ["sora", "lora"])
def test_a_second_adapter_loads_beside_the_first_and_gives_its_own_outputs(tmp_path, arch, kind):
    a, expected_a = first_adapter(tmp_path / "a", arch, kind)
    b, expected_b = second_adapter(tmp_path / "b", arch, kind)
    model = load_adapter_safely(make_model(arch), a)
    assert verify_adapter(model, b).peft_type == ("SORA" if kind == "sora" else "LORA")
    assert load_adapter_safely(model, b, adapter_name="other") is model
    torch.testing.assert_close(output(model, make_input(arch)), expected_a, atol=1e-5, rtol=0)  # not made active
    model.set_adapter("other")
    torch.testing.assert_close(output(model, make_input(arch)), expected_b, atol=1e-5, rtol=0)


def test_load_adapter_safely_names_the_first_adapter(tmp_path, mlp_adapter):
    assert set(load_adapter_safely(make_model("mlp"), mlp_adapter, adapter_name="mine").peft_config) == {"mine"}


@pytest.mark.parametrize("case", ["taken", "dotted", "other type"])
def test_a_second_adapter_that_cannot_join_is_refused_and_the_model_untouched(tmp_path, mlp_adapter, case):
    model = load_adapter_safely(make_model("mlp"), mlp_adapter)
    adapter, name = (second_adapter(tmp_path / "b", "mlp", "lora" if case == "other type" else "sora")[0],
                     {"taken": "default", "dotted": "a.b", "other type": "other"}[case])
    before = model_state(model)
    message = {"taken": "adapter_name 'default' is already loaded in this model; expected a new name (loaded: default)",
               "dotted": "adapter_name is 'a.b'; expected a non-empty name without dots",
               "other type": "peft_type is 'LORA' and the model's adapters are 'SORA'; expected 'SORA'"}[case]
    with pytest.raises(InputError, match=re.escape(message)):
        load_adapter_safely(model, adapter, adapter_name=name)
    assert_same_state(before, model_state(model))


def test_a_second_adapter_that_fails_inside_peft_leaves_the_model_as_it_was(tmp_path, monkeypatch, mlp_adapter):
    model = load_adapter_safely(make_model("mlp"), mlp_adapter)
    adapter, expected = second_adapter(tmp_path / "b", "mlp", "sora")
    before = model_state(model)

    def boom(*args, **kwargs):
        raise RuntimeError("failed while loading the weights")
    monkeypatch.setattr(peft.peft_model, "set_peft_model_state_dict", boom)
    with pytest.raises(RuntimeError, match="failed while loading the weights"):
        load_adapter_safely(model, adapter, adapter_name="other")
    assert_same_state(before, model_state(model))
    monkeypatch.undo()
    load_adapter_safely(model, adapter, adapter_name="other").set_adapter("other")
    torch.testing.assert_close(output(model, make_input("mlp")), expected, atol=1e-5, rtol=0)
