"""SoRA end to end on a tiny BERT built from a config: wrap, train, prune, export, reload in plain PEFT.

    python examples/quickstart.py [--out-dir runs/quickstart] [--steps 150]
"""

import argparse
import logging
from pathlib import Path

import peft
import torch
from transformers import BertConfig, BertForSequenceClassification

import soralib


def toy_batch(generator: torch.Generator, batch: int = 32, length: int = 12):
    """Label = 1 when token 7 appears in the sequence: learnable, so the loss must fall."""
    ids = torch.randint(1, 64, (batch, length), generator=generator)
    return ids, (ids == 7).any(dim=1).long()


def main(out_dir: str = "runs/quickstart", steps: int = 150) -> None:
    torch.manual_seed(0)
    out = Path(out_dir)
    base = BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=128, num_labels=2))
    base.save_pretrained(out / "base")  # the "pretrained" model the exported adapter will be loaded onto

    # 1. Wrap: every linear layer of each block gets a gated rank-8 update; the head trains in full.
    config = soralib.SoraConfig(r=8, lora_alpha=16, modules_to_save=["classifier"],
                                target_modules=["query", "key", "value", "dense"], exclude_modules=["pooler.dense"])
    model = peft.get_peft_model(base, config)
    # 2. Train: any torch optimizer plus the proximal gate step (a fixed τ per step, as in the reference code).
    optimizer = soralib.create_sora_optimizer(model, lr=3e-3, weight_decay=0.1, threshold=2e-3,
                                              gate_group_kwargs={"eps": 1e-6})
    generator = torch.Generator().manual_seed(0)
    model.train()
    for step in range(1, steps + 1):
        ids, labels = toy_batch(generator)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 50 == 0:
            report = soralib.sparsity_report(model)
            print(f"step {step:4d}  loss {loss.item():.3f}  kept rank {report['kept_rank']}/{report['r_max_total']}")
    model.eval()

    # 3. Prune: zero-gated ranks are cut out; outputs do not change.
    ids, _ = toy_batch(torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        kept = soralib.prune(model)
        after = model(input_ids=ids).logits
    report = soralib.sparsity_report(model)
    print(f"pruned: kept ranks per module {sorted(kept.values())}, "
          f"{report['kept_params']} of {report['lora_params_at_r_max']} LoRA parameters "
          f"({report['kept_fraction']:.0%}); max |Δ| after pruning {(after - before).abs().max():.1e}")

    # 4. Export a standard LoRA adapter and load it with nothing but PEFT.
    soralib.export_lora(model, out / "adapter")
    reloaded = peft.PeftModel.from_pretrained(BertForSequenceClassification.from_pretrained(out / "base"),
                                              out / "adapter").eval()
    with torch.no_grad():
        diff = (reloaded(input_ids=ids).logits - before).abs().max().item()
    print(f"exported LoRA adapter: {out / 'adapter'} (max |Δ| in plain PEFT: {diff:.1e})")
    if diff > 1e-5:
        raise SystemExit(f"the exported adapter differs from the SoRA model by {diff}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default="runs/quickstart")
    parser.add_argument("--steps", type=int, default=150)
    main(**vars(parser.parse_args()))
