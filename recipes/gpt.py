"""A small GPT in the spirit of nanoGPT, trained byte by byte on the Python standard library's own source files: a
real text corpus on every machine that has Python, no download.

    torchrun --standalone --nproc_per_node 2 -m launcher recipe=gpt

A decoder-only transformer: token and position embeddings, pre-norm blocks of causal self-attention (through
``scaled_dot_product_attention``) and a GELU MLP, the output layer tied to the token embedding. AdamW with weight
decay on the matrices only (not on norms, biases or embeddings), a cosine schedule after a warmup, gradient
clipping. ``model.layers``, ``model.heads``, ``model.width`` and ``model.context`` size it.

The corpus: every ``.py`` file under the standard library (``sysconfig``'s ``stdlib`` path, without site-packages
and the test suites), in sorted order; every 10th file is validation, the rest training, so no file is in both.
The first ``data.train_bytes`` and ``data.eval_bytes`` of each side are cut into windows of ``model.context + 1``
bytes. Or any corpus, however large: ``data.tokens=DIR``, a folder written by ``python -m launcher.tokens --out DIR
FILES`` (memory-mapped token shards, launcher/data/tokens.py), whose tokenizer (bytes, or a ``tokenizer.json``)
sizes the model's vocabulary. A sample is a dict (``input_ids``, ``targets``: the same window shifted by one token);
a batch of them is cut at once (``ByteWindows.take``). This recipe shows every optional hook: ``step`` (the
language-model loss), ``metrics`` (perplexity and next-token accuracy, as sums and counts), ``samples`` (a few lines
it writes after each evaluation, decoded by the corpus's tokenizer), ``tokens_per_sample`` (throughput in tokens/s),
``param_groups``, ``blocks`` (what fsdp shards and activation checkpointing recomputes) and ``tp_plan`` (how a block
splits under ``dist.tp``).
"""

import math
import sysconfig
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from launcher.data.tokenizer import ByteTokenizer
from launcher.data.tokens import TokenWindows, read_meta

SAMPLE_LINES, PROMPT_TOKENS, WRITTEN_TOKENS = 3, 16, 48  # what ``samples`` writes after each evaluation

DEFAULTS = {
    "train": {"epochs": 3, "batch_size": 32, "clip_grad_norm": 1.0, "log_every": 25},
    "optim": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.1},
    "sched": {"name": "cosine", "warmup_steps": 50, "min_lr_ratio": 0.1},
    "eval": {"batch_size": 64},
    "data": {"train_bytes": 2_000_000, "eval_bytes": 65_000},
    "model": {"layers": 4, "heads": 4, "width": 64, "context": 64, "dropout": 0.0},
}


class CausalSelfAttention(nn.Module):
    """Queries, keys and values of their own projections: under tensor parallel each process computes whole heads
    (its share of each projection's outputs), as many as its share of the width holds."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.head_width, self.dropout = width // heads, dropout
        self.q, self.k, self.v = nn.Linear(width, width), nn.Linear(width, width), nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = (projection(x).view(batch, length, -1, self.head_width).transpose(1, 2)
                   for projection in (self.q, self.k, self.v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0)
        return self.out(y.transpose(1, 2).reshape(batch, length, -1))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.norm1, self.attention = nn.LayerNorm(width), CausalSelfAttention(width, heads, dropout)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width),
                                 nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, layers: int, heads: int, width: int, context: int, dropout: float):
        super().__init__()
        self.tokens, self.positions = nn.Embedding(vocab, width), nn.Embedding(context, width)
        self.blocks = nn.Sequential(*[Block(width, heads, dropout) for _ in range(layers)])
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, vocab, bias=False)
        self.head.weight = self.tokens.weight  # weight tying
        self.apply(_init_weights)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.tokens(input_ids) + self.positions(positions)
        return self.head(self.norm(self.blocks(x)))  # (batch, length, vocab) logits


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


class ByteWindows(Dataset):
    """Non-overlapping windows of ``length + 1`` bytes, as {input_ids, targets} shifted by one.

    ``take`` cuts a whole batch of windows at once (with ``to``, ``nbytes`` and ``device``, the engine then reads
    batches without a sample's ``__getitem__`` and a collation each, on the GPU where they fit).
    """

    tokenizer = ByteTokenizer()

    def __init__(self, data: bytes | torch.Tensor, length: int):
        self.length = length
        self.data = data if isinstance(data, torch.Tensor) else torch.frombuffer(bytearray(data), dtype=torch.uint8)

    def __len__(self) -> int:
        return (len(self.data) - 1) // self.length

    def __getitem__(self, index: int) -> dict:
        window = self.data[index * self.length : (index + 1) * self.length + 1].long()
        return {"input_ids": window[:-1], "targets": window[1:]}

    def take(self, indices: torch.Tensor) -> dict:
        windows = self.data[(indices * self.length)[:, None] + torch.arange(self.length + 1, device=indices.device)]
        windows = windows.long()
        return {"input_ids": windows[:, :-1], "targets": windows[:, 1:]}

    def to(self, device: torch.device) -> "ByteWindows":
        return ByteWindows(self.data.to(device), self.length)

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    @property
    def device(self) -> torch.device:
        return self.data.device


def stdlib_sources() -> list[Path]:
    """The standard library's .py files in a fixed order, without site-packages and the test suites."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skipped = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    return sorted(path for path in root.rglob("*.py")
                  if not skipped & set(path.relative_to(root).parts) and path.is_file())


def corpus(files: list[Path], size: int) -> bytes:
    """The first ``size`` bytes of the files, concatenated."""
    chunks, total = [], 0
    for path in files:
        chunks.append(path.read_bytes())
        total += len(chunks[-1])
        if total >= size:
            break
    return b"".join(chunks)[:size]


def build_model(cfg) -> nn.Module:
    m = cfg.model
    return GPT(vocabulary(cfg), m.layers, m.heads, m.width, m.context, m.dropout)


def vocabulary(cfg) -> int:
    """The number of token ids the model embeds: the corpus's (``data.tokens``), or 256 for the bytes it reads."""
    return read_meta(Path(cfg.data.tokens) / "train")["vocab"] if cfg.data.tokens else ByteTokenizer.vocab


def build_datasets(cfg):
    if cfg.data.tokens:
        return token_windows(Path(cfg.data.tokens), cfg.model.context)
    files = stdlib_sources()
    train_files = [path for i, path in enumerate(files) if i % 10]
    eval_files = [path for i, path in enumerate(files) if i % 10 == 0]
    context = cfg.model.context
    return (ByteWindows(corpus(train_files, cfg.data.train_bytes), context),
            ByteWindows(corpus(eval_files, cfg.data.eval_bytes), context))


def token_windows(folder: Path, context: int):
    """(train, eval) windows of a token corpus (``data.tokens``): memory-mapped, any size, in one tokenizer's ids."""
    train, evaluation = TokenWindows(folder / "train", context), None
    if (folder / "eval").is_dir():
        evaluation = TokenWindows(folder / "eval", context)
        if evaluation.meta.get("tokenizer") != train.meta.get("tokenizer"):
            raise ValueError(f"data.tokens={folder}: train/ and eval/ were written with other tokenizers (their "
                             "tokens.json say so): write both with one python -m launcher.tokens")
        evaluation.tokenizer  # read now (``samples`` decodes with it): a missing library is said at the start
    if len(train) == 0:
        raise ValueError(f"data.tokens={folder}: its training corpus is shorter than one window of model.context + 1 "
                         f"= {context + 1} tokens")
    return train, evaluation


def param_groups(model: nn.Module, cfg):
    """Weight decay on the matrices of the linear layers; none on norms, biases and embeddings (and so the tied
    output layer)."""
    embeddings = {id(model.tokens.weight), id(model.positions.weight)}
    decayed = [p for p in model.parameters() if p.dim() >= 2 and id(p) not in embeddings]
    kept = [p for p in model.parameters() if p.dim() < 2 or id(p) in embeddings]
    return [{"params": decayed}, {"params": kept, "weight_decay": 0.0}]


def step(model: nn.Module, batch: dict):
    """The language-model loss: every position predicts the next token."""
    logits = model(batch["input_ids"])
    return F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten()), logits


def metrics(logits: torch.Tensor, batch: dict) -> dict:
    """Perplexity (exp of the mean negative log-likelihood per token) and next-token accuracy, as sums and counts.

    (The accuracy keeps its name from the byte corpus, ``next_byte_accuracy``, so runs compare across versions.)
    """
    targets = batch["targets"]
    nll = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")
    correct = (logits.argmax(dim=-1) == targets).sum()
    return {"perplexity": (nll, targets.numel(), math.exp), "next_byte_accuracy": (correct, targets.numel())}


def samples(model: nn.Module, eval_set, cfg) -> list[str]:
    """A few lines the model writes, for a person to read what it learned: each the first ``PROMPT_TOKENS`` of an
    evaluation window (the first, the last and between) and ``WRITTEN_TOKENS`` more, greedily, decoded.

    Greedy (each token the likeliest) draws no random numbers: the run trains on exactly as without it.
    """
    tokenizer = getattr(eval_set, "tokenizer", None)
    if tokenizer is None:  # a corpus whose tokens.json names no tokenizer this recipe can decode
        return []
    places = torch.linspace(0, len(eval_set) - 1, SAMPLE_LINES).long().unique()
    prompts = eval_set.take(places.to(eval_set.device))["input_ids"][:, :PROMPT_TOKENS]
    ids = prompts.to(next(model.parameters()).device)
    for _ in range(WRITTEN_TOKENS):
        logits = model(ids[:, -cfg.model.context:])
        ids = torch.cat([ids, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
    return [f"{tokenizer.decode(line[:PROMPT_TOKENS])} → {tokenizer.decode(line[PROMPT_TOKENS:])}"
            for line in ids.tolist()]


def tokens_per_sample(cfg) -> int:
    return cfg.model.context


def blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: under fsdp each is sharded on its own (the embeddings, the final norm and the tied
    output layer go with the root), so only one block's parameters are gathered at a time; and what
    ``train.activation_checkpointing`` recomputes."""
    return list(model.blocks)


def tp_plan(model: nn.Module, cfg) -> dict:
    """``dist.tp``: each block's projections split Megatron-style over the tensor-parallel group.

    Queries, keys, values and the MLP's first layer by their outputs (each process its share of the heads and of the
    hidden width), the attention's and the MLP's output layers by their inputs, summed over the group (one
    all-reduce each in forward and backward). The embeddings, norms and the tied output layer stay whole.
    """
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    if cfg.model.heads % cfg.dist.tp:
        raise ValueError(f"model.heads={cfg.model.heads} does not split over dist.tp={cfg.dist.tp} processes: use a "
                         "dist.tp that divides it")
    by_output, by_input = ColwiseParallel(), RowwiseParallel()
    return {"blocks.*.attention.q": by_output, "blocks.*.attention.k": by_output, "blocks.*.attention.v": by_output,
            "blocks.*.attention.out": by_input, "blocks.*.mlp.0": by_output, "blocks.*.mlp.2": by_input}
