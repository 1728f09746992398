"""A SoRA model under a plain transformers Trainer: SoraCallback adds the prox step, and without it (or
soralib's optimizer) the first training forward warns, so that no run goes silently unpruned."""

import logging
from types import SimpleNamespace

import pytest
import torch

import soralib
from conftest import make_input, sora_model
from soralib.layer import UNTHRESHOLDED_WARNING


def dataset(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 64, (n, 9), generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    return [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": y} for i, y in zip(ids, labels)]


def train(tmp_path, model, callbacks=(), optimizers=(None, None), weight_decay=0.1, max_steps=4, save_steps=None,
          resume=None, warmup_steps=0):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=max_steps, report_to=[], use_cpu=True,
                             learning_rate=1e-2, weight_decay=weight_decay, per_device_train_batch_size=4,
                             save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
                             logging_strategy="no", warmup_steps=warmup_steps)
    trainer = Trainer(model=model, args=args, train_dataset=dataset(), callbacks=list(callbacks),
                      optimizers=optimizers)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def warnings_in(caplog):
    return [r for r in caplog.records if r.name == "soralib" and r.getMessage() == UNTHRESHOLDED_WARNING]


def gate_groups(optimizer):
    return [g for g in optimizer.param_groups if "sora_threshold" in g]


def test_callback_gives_a_plain_trainer_the_prox_step_without_weight_decay_on_the_gates(tmp_path, caplog):
    model = sora_model("bert")
    with caplog.at_level(logging.WARNING, logger="soralib"):
        trainer = train(tmp_path, model, callbacks=[soralib.SoraCallback(threshold=0.3)])
    gates = torch.cat([g.detach() for g in soralib.gate_parameters(model)])
    assert (gates == 0).any() and (gates != 0).any()
    [group] = gate_groups(trainer.optimizer)
    assert group["weight_decay"] == 0.0 and group["sora_threshold"] == 0.3
    gate_ids = {id(g) for g in soralib.gate_parameters(model)}
    assert {id(p) for p in group["params"]} == gate_ids
    others = [g for g in trainer.optimizer.param_groups if g is not group]
    assert not any(id(p) in gate_ids for g in others for p in g["params"])
    assert any(g["weight_decay"] == 0.1 for g in others)  # the Trainer's own decay still applies elsewhere
    # the gate group follows the Trainer's linear schedule down to 0 with the others
    assert group["initial_lr"] == 1e-2 and group["lr"] == others[0]["lr"] == 0.0
    assert not warnings_in(caplog)


@pytest.mark.parametrize("resume", [False, True], ids=["warm-up", "resumed-after-the-lr-decayed-to-0"])
def test_callback_takes_a_gate_group_whose_scheduled_lr_is_zero(tmp_path, resume):
    # a warm-up starts the Trainer's lr at 0, and a linear decay ends it there (the last checkpoint's)
    model = sora_model("bert")
    trainer = train(tmp_path, model, callbacks=[soralib.SoraCallback(threshold=1e-3)], warmup_steps=2,
                    save_steps=4)
    if resume:  # the last checkpoint: its gate group's lr is 0
        trainer = train(tmp_path / "again", sora_model("bert"), callbacks=[soralib.SoraCallback(threshold=1e-3)],
                        resume=str(tmp_path / "checkpoint-4"))
    assert gate_groups(trainer.optimizer)[0]["lr"] == 0.0  # at the end of the decay


def test_plain_trainer_without_the_prox_step_warns_once_naming_the_fix(tmp_path, caplog):
    model = sora_model("bert")
    with caplog.at_level(logging.WARNING, logger="soralib"):
        train(tmp_path, model)
    assert len(warnings_in(caplog)) == 1
    assert "soralib.SoraCallback(threshold=...)" in UNTHRESHOLDED_WARNING
    assert "soralib.create_sora_optimizer" in UNTHRESHOLDED_WARNING


def test_callback_leaves_soralibs_optimizer_alone_and_nothing_warns(tmp_path, caplog):
    model = sora_model("bert")
    optimizer = soralib.create_sora_optimizer(model, lr=1e-2, threshold=0.2)
    groups = len(optimizer.param_groups)
    with caplog.at_level(logging.WARNING, logger="soralib"):
        trainer = train(tmp_path, model, callbacks=[soralib.SoraCallback(threshold=0.9)],
                        optimizers=(optimizer, None))
    assert len(trainer.optimizer.param_groups) == groups
    assert soralib.get_threshold(optimizer) == 0.2
    assert not warnings_in(caplog)


def test_training_forward_warns_once_per_model_and_inference_never(caplog):
    model = sora_model("mlp")
    inputs = make_input("mlp")
    with caplog.at_level(logging.WARNING, logger="soralib"):
        model.eval()
        model(**inputs)
        model.train()
        with torch.no_grad():
            model(**inputs)
        assert not warnings_in(caplog)
        model(**inputs)
        model(**inputs)
        assert len(warnings_in(caplog)) == 1  # two layers, two forwards: one warning
        sora_model("mlp").train()(**inputs)
        assert len(warnings_in(caplog)) == 2


def test_callback_moves_the_gates_with_their_optimizer_state_and_settings():
    model = sora_model("mlp")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, betas=(0.8, 0.9), weight_decay=0.1)
    model.train()(**make_input("mlp"))[0].sum().backward()
    optimizer.step()
    gates = soralib.gate_parameters(model)
    moments = [optimizer.state[g]["exp_avg"].clone() for g in gates]
    soralib.SoraCallback(threshold=0.1, gate_lr=1e-3).on_train_begin(None, None, None, model=model,
                                                                      optimizer=optimizer)
    [group] = gate_groups(optimizer)
    assert group["betas"] == (0.8, 0.9) and group["weight_decay"] == 0.0 and group["lr"] == 1e-3
    for g, m in zip(gates, moments):
        torch.testing.assert_close(optimizer.state[g]["exp_avg"], m)


def bad_optimizer(kind, model):
    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "not-torch":  # e.g. DeepSpeed's optimizer
        return SimpleNamespace(param_groups=[{"params": params}]), None
    if kind == "no-gates":
        gate_ids = {id(g) for g in soralib.gate_parameters(model)}
        return torch.optim.AdamW([p for p in params if id(p) not in gate_ids]), None
    optimizer = torch.optim.AdamW(params)
    return optimizer, torch.optim.lr_scheduler.StepLR(optimizer, 1)


@pytest.mark.parametrize("kind, message", [
    ("not-torch", "SoraCallback cannot add the prox step to a SimpleNamespace; "),
    ("no-gates", "2 of the model's 2 trainable SoRA gates are not in the Trainer's optimizer, "),
    ("step-lr", "SoraCallback cannot extend a StepLR learning-rate schedule to the gate group; "),
], ids=["not-torch", "no-gates", "step-lr"])
def test_callback_refuses_an_optimizer_it_cannot_change_and_names_the_one_line_fix(kind, message):
    model = sora_model("mlp")
    optimizer, scheduler = bad_optimizer(kind, model)
    before = [list(g["params"]) for g in optimizer.param_groups]
    with pytest.raises(ValueError) as err:
        soralib.SoraCallback(threshold=0.1).on_train_begin(None, None, None, model=model, optimizer=optimizer,
                                                           lr_scheduler=scheduler)
    assert str(err.value).startswith(message)
    assert str(err.value).endswith("optimizers=(soralib.create_sora_optimizer(model, lr=args.learning_rate, "
                                   "threshold=...), None))")
    assert [list(g["params"]) for g in optimizer.param_groups] == before  # nothing changed


def test_callback_checks_its_settings_when_built():
    with pytest.raises(ValueError, match="threshold must be a finite number >= 0, got -1"):
        soralib.SoraCallback(threshold=-1)


# SoraBudgetCallback: soralib.BudgetSchedule on a Trainer.

def budget_of(model, budget):
    """(budget, sparsity_report key, cost of one rank at most) of a SoraBudgetCallback's keyword arguments."""
    report = soralib.sparsity_report(model)
    if "target_rank" in budget:
        return budget["target_rank"] * len(report["modules"]), "kept_rank", 1
    return budget["target_params"], "kept_params", max(m["in_features"] + m["out_features"] for m in report["modules"])


def assert_within_one_rank(model, budget):
    target, measure, rank_cost = budget_of(model, budget)
    assert target - rank_cost < soralib.sparsity_report(model)[measure] <= target


@pytest.mark.parametrize("budget", [{"target_rank": 2}, {"target_params": 2000}], ids=["rank", "params"])
@pytest.mark.parametrize("optimizer", ["SoraCallback", "create_sora_optimizer"])
def test_budget_callback_ends_a_trainer_run_within_one_rank_of_the_budget(tmp_path, optimizer, budget):
    model = sora_model("bert")  # every gate non-zero at the start: 4 ranks in each of 12 modules, 3328 parameters
    if optimizer == "SoraCallback":  # the Trainer's AdamW, fixed by the callback listed first
        trainer = train(tmp_path, model, max_steps=8, callbacks=[soralib.SoraCallback(threshold=0.0),
                                                                 soralib.SoraBudgetCallback(**budget)])
    else:
        trainer = train(tmp_path, model, max_steps=8, callbacks=[soralib.SoraBudgetCallback(**budget)],
                        optimizers=(soralib.create_sora_optimizer(model, lr=1e-2), None))
    assert_within_one_rank(model, budget)
    assert soralib.get_threshold(trainer.optimizer) == 0.0  # the hold: the trim alone decides
    assert all(m["kept_rank"] >= 1 for m in soralib.sparsity_report(model)["modules"])  # min_rank 1 by default


def test_budget_callback_run_resumed_from_a_checkpoint_goes_on_bit_for_bit(tmp_path):
    def run(out, resume=None):
        model = sora_model("bert")
        callbacks = [soralib.SoraBudgetCallback(target_rank=2)]
        train(out, model, max_steps=8, save_steps=3, callbacks=callbacks, resume=resume,
              optimizers=(soralib.create_sora_optimizer(model, lr=1e-2), None))
        return {k: v for k, v in model.state_dict().items() if "sora_" in k}

    straight = run(tmp_path / "straight")
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "straight" / "checkpoint-3"))  # in the ramp
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)


def adapter_tensors(model):
    return {k: v for k, v in model.state_dict().items() if "sora_" in k}


def assert_bitwise_equal(straight, resumed):
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)


@pytest.mark.parametrize("callbacks", [
    lambda: [soralib.SoraCallback(threshold=20.0, threshold_mode="lr_scaled", gate_lr=2e-2)],
    lambda: [soralib.SoraCallback(threshold=0.0), soralib.SoraBudgetCallback(target_rank=2)],
], ids=["SoraCallback", "with-SoraBudgetCallback"])
def test_trainer_run_with_soracallback_resumed_from_a_checkpoint_goes_on_bit_for_bit(tmp_path, callbacks):
    def run(out, resume=None):  # the Trainer's own AdamW, weight-decayed: the callback moves the gates
        model = sora_model("bert")
        train(out, model, max_steps=8, save_steps=3, callbacks=callbacks(), resume=resume)
        return model

    straight = run(tmp_path / "straight")
    gates = torch.cat([g.detach() for g in soralib.gate_parameters(straight)])
    assert (gates == 0).any() and (gates != 0).any()  # the prox step (or the budget) pruned some ranks
    # in the ramp of the budget schedule, past the lr's first steps
    resumed = run(tmp_path / "resumed", resume=str(tmp_path / "straight" / "checkpoint-3"))
    assert_bitwise_equal(adapter_tensors(straight), adapter_tensors(resumed))


@pytest.mark.parametrize("again", ["resume-after-an-interruption", "train-more-then-resume-in-a-new-trainer"])
def test_the_same_trainer_trained_again_with_soracallback_resumes_bit_for_bit(tmp_path, again):
    # A notebook keeps its Trainer, and the Trainer its optimizer, with the gate group SoraCallback added
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Interrupt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:
                raise KeyboardInterrupt

    def trainer(out, max_steps=8, interrupt=False):
        args = TrainingArguments(output_dir=str(out), max_steps=max_steps, report_to=[], use_cpu=True,
                                 learning_rate=1e-2, weight_decay=0.1, per_device_train_batch_size=4,
                                 save_strategy="steps", save_steps=2, logging_strategy="no", warmup_steps=1)
        callbacks = [soralib.SoraCallback(threshold=0.0), soralib.SoraBudgetCallback(target_rank=2)]
        return Trainer(model=sora_model("bert"), args=args, train_dataset=dataset(),
                       callbacks=callbacks + ([Interrupt()] if interrupt else []))

    if again == "resume-after-an-interruption":
        straight = trainer(tmp_path / "straight")
        straight.train()
        same = trainer(tmp_path / "same", interrupt=True)
        with pytest.raises(KeyboardInterrupt):
            same.train()
        same.pop_callback(Interrupt)
        same.train(resume_from_checkpoint=str(tmp_path / "same" / "checkpoint-4"))
        assert_bitwise_equal(adapter_tensors(straight.model), adapter_tensors(same.model))
    else:  # and the checkpoints of a second train() resume in a new Trainer
        same = trainer(tmp_path / "same", max_steps=4)
        same.train()
        same.args.max_steps = 8
        same.train(resume_from_checkpoint=str(tmp_path / "same" / "checkpoint-4"))
        resumed = trainer(tmp_path / "new")
        resumed.train(resume_from_checkpoint=str(tmp_path / "same" / "checkpoint-6"))
        assert_bitwise_equal(adapter_tensors(same.model), adapter_tensors(resumed.model))


@pytest.mark.parametrize("order", ["alone", "before-SoraCallback"])
def test_budget_callback_without_a_gate_group_says_to_list_soracallback_first(tmp_path, order):
    callbacks = [soralib.SoraBudgetCallback(target_rank=2)] + ([soralib.SoraCallback(threshold=0.0)]
                                                                if order != "alone" else [])
    with pytest.raises(ValueError, match=r"^SoraBudgetCallback found no SoRA gate group in the Trainer's optimizer; "
                                         r"list soralib.SoraCallback\(threshold=...\) before it in callbacks, or"):
        train(tmp_path, sora_model("bert"), callbacks=callbacks)


def test_budget_callback_checks_its_settings_when_built():
    with pytest.raises(ValueError, match=r"^give target_params or target_rank, not both$"):
        soralib.SoraBudgetCallback(target_params=100, target_rank=2)
    with pytest.raises(ValueError, match=r"^target_rank must be a finite number > 0, got -1$"):
        soralib.SoraBudgetCallback(target_rank=-1)


def tiny_llama_and_tokenizer():
    """A 2-layer Llama causal LM with a 100-word vocabulary and a word-level tokenizer built in memory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = {**{f"w{i}": i for i in range(97)}, "<unk>": 97, "<pad>": 98, "<eos>": 99}
    backend = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                        eos_token="<eos>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         num_key_value_heads=1, intermediate_size=48, pad_token_id=98,
                                         eos_token_id=99, bos_token_id=None))
    return model, tokenizer


def test_sft_trainer_with_sora_config_and_both_callbacks_ends_within_budget(tmp_path, caplog):
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    model, tokenizer = tiny_llama_and_tokenizer()
    g = torch.Generator().manual_seed(0)
    data = datasets.Dataset.from_dict({"input_ids": torch.randint(0, 97, (16, 12), generator=g).tolist()})
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=4, learning_rate=1e-2,
                         report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True)
    budget = {"target_rank": 2}
    with caplog.at_level(logging.WARNING, logger="soralib"):
        trainer = trl.SFTTrainer(
            model=model, args=args, train_dataset=data, processing_class=tokenizer,
            peft_config=soralib.SoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
            callbacks=[soralib.SoraCallback(threshold=0.0), soralib.SoraBudgetCallback(**budget)])
        trainer.train()
    assert not warnings_in(caplog)  # the gates were soft-thresholded: SoraCallback fixed SFTTrainer's AdamW
    assert len(soralib.sparsity_report(trainer.model)["modules"]) == 6
    assert_within_one_rank(trainer.model, budget)


def test_sft_trainer_with_both_callbacks_resumed_from_a_checkpoint_goes_on_bit_for_bit(tmp_path):
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")

    def run(out, resume=None):
        model, tokenizer = tiny_llama_and_tokenizer()
        g = torch.Generator().manual_seed(0)
        data = datasets.Dataset.from_dict({"input_ids": torch.randint(0, 97, (16, 12), generator=g).tolist()})
        args = trl.SFTConfig(output_dir=str(out), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], use_cpu=True, save_strategy="steps", save_steps=2, logging_strategy="no",
                             disable_tqdm=True)
        trainer = trl.SFTTrainer(
            model=model, args=args, train_dataset=data, processing_class=tokenizer,
            peft_config=soralib.SoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
            callbacks=[soralib.SoraCallback(threshold=0.0), soralib.SoraBudgetCallback(target_rank=2)])
        trainer.train(resume_from_checkpoint=resume)
        return adapter_tensors(trainer.model)

    straight = run(tmp_path / "straight")
    assert_bitwise_equal(straight, run(tmp_path / "resumed", resume=str(tmp_path / "straight" / "checkpoint-2")))
