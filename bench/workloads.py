"""The models, batches and timed steps that bench.speed compares.

Adapters and optimizers come from the training harness itself (`soralib.train.methods.wrap` and
`make_optimizer` on a default TrainConfig), so the benchmark times exactly what `sora train` builds:
all six linear layers of each BERT block, r_max = r = 8, lora_alpha 16, AdamW at lr 8e-4, SoRA's gates
in their own group with the fixed threshold 3e-4, AdaLoRA from r 8 to a mean rank of 4.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

R_MAX = 8
THRESHOLD = 3e-4
TINY_VOCAB = 30522  # the MiniLM tokenizer's vocabulary, so the padding bench's real token ids fit the tiny BERT
# AdaLoRA's schedule as the harness sets it for a run of this many steps (tinit 10%, tfinal 20%, deltaT 1%);
# the benchmark's steps are counted from tinit on, i.e. inside the rank-allocation phase where AdaLoRA
# updates its importance scores every step and masks ranks every deltaT steps.
ADALORA_TOTAL_STEPS = 10_000


def base_model(model: str, tiny: bool, seed: int = 0, workload: str = "glue"):
    """A fresh 2-label classifier: real MiniLM weights, or (tiny) a 2-layer BERT built from a config. Workload
    "sft": a causal LM instead (SmolLM2 from its offline GGUF, or a tiny Llama)."""
    torch.manual_seed(seed)  # the same head initialisation for every copy
    if workload == "sft":
        return causal_lm(model, tiny)
    if tiny:
        from transformers import BertConfig, BertForSequenceClassification

        return BertForSequenceClassification(BertConfig(vocab_size=TINY_VOCAB, hidden_size=32, num_hidden_layers=2,
                                                        num_attention_heads=2, intermediate_size=48, num_labels=2))
    from transformers import AutoModelForSequenceClassification

    from soralib.train.methods import resolve_model_path

    return AutoModelForSequenceClassification.from_pretrained(resolve_model_path(model), num_labels=2)


def causal_lm(model: str, tiny: bool):
    if tiny:
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2))
    from soralib.train.methods import load_causal_lm

    return load_causal_lm(train_config("lora", "sft", model))[0]


def train_config(method: str, task: str = "", model: str = ""):
    from soralib.train.config import TrainConfig

    return TrainConfig(method=method, r=R_MAX, threshold=THRESHOLD, task=task, model=model)


def adapted(method: str, base, task: str = "") -> Any:
    """`base` made trainable the harness's way (sora, lora, adalora); task "sft": as a causal LM's adapter."""
    from soralib.train.methods import wrap

    torch.manual_seed(1)
    return wrap(train_config(method, task), base, total_steps=ADALORA_TOTAL_STEPS)


def optimizer_for(method: str, model) -> torch.optim.Optimizer:
    from soralib.train.methods import make_optimizer

    return make_optimizer(train_config(method), model)


def random_batches(n: int, batch: int, seq: int, vocab: int, seed: int,
                   causal: bool = False) -> list[dict[str, torch.Tensor]]:
    """`n` fixed batches of random token ids and labels: every method sees the same ones, in the same order.
    `causal`: the labels are the tokens themselves (next-token loss on every position)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1000 if vocab > 2000 else 1, vocab, (batch, seq), generator=g)  # skip special ids
        labels = ids.clone() if causal else torch.randint(0, 2, (batch,), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


class StepRunner:
    """One method's training state; `step()` runs one step and returns its timed parts in seconds.

    step = forward + backward + optimizer.step (+ AdaLoRA's update_and_allocate) + zero_grad. For SoRA the
    prox step runs inside optimizer.step (its post-step hook); `prox_step` is also timed alone, called once
    more between optimizer.step and zero_grad and kept out of "step": that applies the threshold twice
    per step, an extra shrink of 3e-4 that does not change what is computed.
    """

    def __init__(self, method: str, model, batches: list[dict[str, torch.Tensor]]):
        self.method, self.model, self.batches = method, model.train(), batches
        self.optimizer = optimizer_for(method, model)
        self.count = 0

    def step(self) -> dict[str, float]:
        from soralib.prox import prox_step

        batch = self.batches[self.count % len(self.batches)]
        t0 = time.perf_counter()
        self.model(**batch).loss.backward()
        t1 = time.perf_counter()
        self.optimizer.step()
        t2 = time.perf_counter()
        if self.method == "adalora":  # after backward, before zero_grad, as PEFT requires
            self.model.base_model.update_and_allocate(ADALORA_TOTAL_STEPS // 10 + self.count)
        t3 = time.perf_counter()
        prox = 0.0
        if self.method == "sora":
            prox_step(self.optimizer)
            prox = time.perf_counter() - t3
        t4 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        t5 = time.perf_counter()
        self.count += 1
        parts = {"step": (t3 - t0) + (t5 - t4), "optimizer": t2 - t1}
        if self.method == "sora":
            parts["prox"] = prox
        return parts

    def flops_per_step(self) -> int:
        """Forward + backward FLOPs of one step, counted by torch's FlopCounterMode (matmul-class ops)."""
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            self.model(**self.batches[0]).loss.backward()
        self.optimizer.zero_grad(set_to_none=True)
        return int(counter.get_total_flops())


@torch.no_grad()
def half_gated_pruned_sora(base):
    """SoRA with exactly half of every module's gates at zero, then pruned: rank 4 of r_max 8 everywhere."""
    import soralib

    model = adapted("sora", base)
    g = torch.Generator().manual_seed(2)
    for layer in (m for m in model.modules() if isinstance(m, soralib.SoraLayer)):
        for gate in layer.sora_gate.values():
            gate[torch.randperm(gate.numel(), generator=g)[: gate.numel() // 2]] = 0.0
    soralib.prune(model)
    return model


def timed_forward(model, batch: dict[str, torch.Tensor]) -> Callable[[], dict[str, float]]:
    """A no-grad eval forward of `batch`, timed."""
    model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def run() -> dict[str, float]:
        with torch.no_grad():
            t0 = time.perf_counter()
            model(**inputs)
            return {"forward": time.perf_counter() - t0}

    return run


def timed_matmul(size: int) -> Callable[[], dict[str, float]]:
    """One fp32 size × size matmul into a preallocated output (2·size³ FLOPs), timed."""
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(size, size, generator=g), torch.randn(size, size, generator=g)
    out = torch.empty(size, size)

    def run() -> dict[str, float]:
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        return {"matmul": time.perf_counter() - t0}

    return run


def interleave(tasks: dict[str, Callable[[], dict[str, float]]], steps: int, blocks: int) -> dict[str, list[float]]:
    """Run the tasks in interleaved blocks A·N, B·N, C·N, A·N, ...: `blocks` timed rounds after one warm-up
    round that is discarded, so slow drift of the machine (heat, other load) hits every task alike.
    Returns every timed part as "task.part" -> list of seconds."""
    times: dict[str, list[float]] = {}
    for block in range(blocks + 1):
        for name, run in tasks.items():
            for _ in range(steps):
                parts = run()
                if block:
                    for part, seconds in parts.items():
                        times.setdefault(f"{name}.{part}", []).append(seconds)
    return times


def padding_batches(glue_dir, examples: int, batch: int, max_length: int, seed: int):
    """(ours, padded): the same MRPC training batches, padded to each batch's longest vs to `max_length`.

    `examples` rows are drawn from MRPC's train.tsv with a fixed seed and tokenized with the MiniLM tokenizer;
    batches follow transformers' LengthGroupedSampler, the one `sora train` uses (group_by_length).
    None when the GLUE copy is missing.
    """
    import random
    from pathlib import Path

    import torch.nn.functional as F
    from transformers import AutoTokenizer, DataCollatorWithPadding
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from soralib.train.data import load_glue_dir, tokenize_rows
    from soralib.train.methods import resolve_model_path
    from soralib.train.tasks import get_task

    if glue_dir is None or not (Path(glue_dir) / "MRPC" / "train.tsv").is_file():
        return None
    spec = get_task("mrpc")
    rows = load_glue_dir(spec, glue_dir)["train"]
    rows = random.Random(seed).sample(rows, min(examples, len(rows)))
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    features = tokenize_rows(rows, tokenizer, spec.text_columns, max_length)
    lengths = [len(f["input_ids"]) for f in features]
    order = list(LengthGroupedSampler(batch, lengths=lengths, generator=torch.Generator().manual_seed(seed)))
    collate = DataCollatorWithPadding(tokenizer)  # what the harness's Trainer pads batches with
    ours = [collate([features[i] for i in order[s: s + batch]]) for s in range(0, len(order), batch)]
    pad_value = {"input_ids": tokenizer.pad_token_id, "attention_mask": 0, "token_type_ids": 0}
    padded = [{k: F.pad(v, (0, max_length - v.shape[1]), value=pad_value[k]) if k in pad_value else v
               for k, v in b.items()} for b in ours]
    return ours, padded


def timed_epoch(model, batches: list[dict[str, torch.Tensor]]) -> Callable[[], dict[str, float]]:
    """Forward + backward over every batch (no optimizer step), timed as one epoch."""

    def run() -> dict[str, float]:
        t0 = time.perf_counter()
        for b in batches:
            model(**b).loss.backward()
        seconds = time.perf_counter() - t0
        model.zero_grad(set_to_none=True)
        return {"epoch": seconds}

    return run
