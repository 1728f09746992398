"""Greedy generations of a causal LM on validation prompts, and exact match of their final answers.

An answer is checkable when the reference has GSM8K's last line `#### N`: exact match compares the number
after the last `####` of generation and reference (commas stripped, as GSM8K's own evaluation does).
"""

from __future__ import annotations

import json
import re
from typing import Any

from .sft_data import prompt_ids

ANSWER = re.compile(r"####\s*([-+]?[\d,]*\.?\d+)")


def final_answer(text: str) -> str | None:
    """The number after the last `####` in `text` ("1,234" -> "1234"), or None when there is none."""
    found = ANSWER.findall(text)
    return found[-1].replace(",", "").lstrip("+") if found else None


def stop_ids(model, tokenizer) -> list[int]:
    """Every token that ends a greedy answer: the tokenizer's EOS and the model's generation config's end tokens.

    Chat models often end a turn with a token that is not EOS (Gemma's <end_of_turn>, Llama 3's <|eot_id|>),
    listed in generation_config.json: stopping at EOS alone would run on to max_new_tokens past the answer.
    """
    config = getattr(model, "generation_config", None)
    named = getattr(config, "eos_token_id", None)
    named = named if isinstance(named, (list, tuple)) else [named]
    return list(dict.fromkeys(i for i in (tokenizer.eos_token_id, *named) if isinstance(i, int)))


def generate(model, tokenizer, rows: list[dict[str, Any]], chat: bool, max_new_tokens: int,
             batch_size: int) -> list[str]:
    """The greedy continuation of each row's prompt (special tokens dropped), in row order."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    stops = stop_ids(model, tokenizer)
    was_training = model.training
    model.eval()
    texts = []
    try:
        for start in range(0, len(rows), batch_size):
            prompts = [prompt_ids(tokenizer, row["prompt"], chat) for row in rows[start:start + batch_size]]
            width = max(map(len, prompts))
            # Left padding: every prompt ends where generation starts.
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                     do_sample=False, pad_token_id=pad, eos_token_id=stops,
                                     use_cache=True)  # training may have switched the cache off
            texts += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    finally:
        model.train(was_training)
    return texts


def generation_metrics(rows: list[dict[str, Any]], texts: list[str]) -> tuple[dict[str, float], list[dict]]:
    """({"exact_match", "generated"} , one record per row). exact_match only when every reference is checkable."""
    references = [final_answer(row["completion"]) for row in rows]
    records = [{"prompt": row["prompt"], "reference": row["completion"], "generation": text,
                "answer": final_answer(text), "reference_answer": ref} for row, text, ref in zip(rows, texts, references)]
    metrics: dict[str, float] = {"generated": float(len(rows))}
    if rows and all(ref is not None for ref in references):
        metrics["exact_match"] = sum(r["answer"] == r["reference_answer"] for r in records) / len(records)
    return metrics, records


def sample_generations(records: list[dict[str, Any]], count: int = 3) -> list[str]:
    """Markdown lines showing the first `count` of an sft run's generations (generations.jsonl's records)."""
    records = [r for r in records if isinstance(r.get("generation"), str)][:count]
    md = ["## Sample generations", ""] if records else []
    for r in records:
        prompt = r["prompt"] if isinstance(r.get("prompt"), str) else json.dumps(r.get("prompt"))
        md += [f"**Prompt:** {prompt}", "", "**Generated:**", "```", r["generation"].strip(), "```",
               f"Answer {r.get('answer')!r}, reference {r.get('reference_answer')!r}.", ""]
    return md


def generate_shared_out(model, tokenizer, rows, chat: bool, max_new_tokens: int, batch_size: int) -> list[str]:
    """`generate` on every rank of a DDP run (or the one process): rank r takes rows r, r + W, ..., and all
    ranks gather every text, in row order.

    Why each rank a share rather than rank 0 alone: DDP keeps the whole model on every rank, so the ranks
    generate independently (no collective inside `generate`; `sora train` has no ZeRO-3 or FSDP, whose
    forwards would need every rank), W times faster; the one gather comes when every rank is done with its
    share, where rank 0 generating alone would keep the others at a barrier that times out (Trainer's
    ddp_timeout, 30 min) on a long generation, or leave them without the metrics.
    """
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    texts = generate(model, tokenizer, rows[rank::world], chat, max_new_tokens, batch_size)
    if world == 1:
        return texts
    shares: list[list[str] | None] = [None] * world
    dist.all_gather_object(shares, texts)
    return [shares[i % world][i // world] for i in range(len(rows))]
