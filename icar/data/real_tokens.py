"""Real token embeddings for Figure 4 (docs/PAPER_NOTES.md §4.8): an embedding table and its tokenizer, a text corpus, and
windows of T consecutive token ids, real and shuffled across windows.

Two sources: `wordllama` (default) reads the 32000 x 256 token-embedding table (distilled from Llama-2-family
LLM embeddings) and its tokenizer from the files inside the `wordllama` wheel, so nothing is downloaded at run
time; `hf:<name or path>` takes the input embeddings of a pretrained `transformers` model (the authors used
gpt2-large), which needs `pip install 'icar[hf]'` and, for a hub name, the network or the local HF cache.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import torch
from pydoc_data.topics import topics
from safetensors.torch import load_file
from tokenizers import Tokenizer

from icar.config import PYDOC

WORDLLAMA_WEIGHTS = "weights/l2_supercat_256.safetensors"
WORDLLAMA_TOKENIZER = "tokenizers/l2_supercat_tokenizer_config.json"
WORDLLAMA_KEY = "embedding.weight"
_UNDERLINE = re.compile(r"^\s*([^\w\s])\1+\s*$")  # a reST heading underline: "*****", "=====", "-----"


@dataclass
class EmbeddingSource:
    """A tokenizer and the embedding table its ids index: `encode(texts)` gives one id list per text, without
    special tokens; `table` is (V, D) float64."""

    name: str
    encode: Callable[[Sequence[str]], list[list[int]]]
    table: torch.Tensor  # (V, D)


def load_embedding_source(source: str) -> EmbeddingSource:
    """`wordllama` or `hf:<model name or local path>` (e.g. `hf:gpt2`, `hf:gpt2-large`)."""
    if source == "wordllama":
        return _wordllama()
    if source.startswith("hf:") and len(source) > 3:
        return _huggingface(source[3:])
    raise ValueError(f"source must be 'wordllama' or 'hf:<model name or path>' (e.g. hf:gpt2), got {source!r}")


def _wordllama() -> EmbeddingSource:
    """The table and tokenizer files shipped inside the wordllama wheel, read with safetensors and tokenizers."""
    root = files("wordllama")
    table = load_file(str(root / WORDLLAMA_WEIGHTS))[WORDLLAMA_KEY].double()  # (32000, 256), stored as float16
    tokenizer = Tokenizer.from_file(str(root / WORDLLAMA_TOKENIZER))
    special = {i for i, tok in tokenizer.get_added_tokens_decoder().items() if tok.special}

    def encode(texts: Sequence[str]) -> list[list[int]]:
        batch = tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [[i for i in enc.ids if i not in special] for enc in batch]

    return EmbeddingSource("wordllama", encode, table)


def _huggingface(name: str) -> EmbeddingSource:
    """`AutoTokenizer` and `AutoModel(...).get_input_embeddings().weight` of a transformers model."""
    try:  # the optional extra icar[hf]: imported only for source=hf:...
        from transformers import AutoModel, AutoTokenizer
    except ImportError as err:
        raise ImportError(f"source=hf:{name} needs transformers: pip install 'icar[hf]'") from err
    tokenizer = AutoTokenizer.from_pretrained(name)
    table = AutoModel.from_pretrained(name).get_input_embeddings().weight.detach().double()  # (V, D)
    special = set(tokenizer.all_special_ids)

    def encode(texts: Sequence[str]) -> list[list[int]]:
        ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return [[i for i in row if i not in special] for row in ids]

    return EmbeddingSource(f"hf:{name}", encode, table)


def load_corpus(text: str) -> tuple[str, list[str]]:
    """(name, paragraphs) of `pydoc` or a text file. `pydoc` is the Python language reference that ships with
    Python (`pydoc_data.topics`, ~465 kB of English prose with some grammar): no download at run time, where the
    authors' Moby Dick needs NLTK's Gutenberg corpus to be fetched first."""
    if text == PYDOC:
        return "pydoc_data.topics", paragraphs("\n\n".join(topics[k] for k in sorted(topics)))
    path = Path(text).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"text must be 'pydoc' or the path of a text file, got {text!r} (no such file)")
    return str(path), paragraphs(path.read_text(encoding="utf-8", errors="replace"))


def paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs with reST underlines dropped and whitespace runs collapsed, so that
    indentation and "*****" lines do not become runs of repeated tokens that the corpus's prose lacks."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line for line in block.splitlines() if not _UNDERLINE.match(line)]
        flat = " ".join(" ".join(lines).split())
        if flat:
            out.append(flat)
    return out


def corpus_ids(source: EmbeddingSource, texts: Sequence[str]) -> torch.Tensor:
    """The corpus as one flat (n,) id tensor: each text encoded without special tokens, then concatenated."""
    ids = torch.tensor([i for row in source.encode(texts) for i in row], dtype=torch.long)  # (n,)
    V = source.table.shape[0]
    if ids.numel() and int(ids.max()) >= V:
        raise ValueError(f"{source.name}: token id {int(ids.max())} is outside the embedding table ({V} rows); "
                         "use a tokenizer that matches the model")
    return ids


def cut_windows(ids: torch.Tensor, T: int) -> torch.Tensor:
    """Consecutive non-overlapping windows of T ids, (n // T, T); the tail that does not fill one is dropped."""
    n = ids.numel() // T
    return ids[: n * T].view(n, T)


def subsample_windows(windows: torch.Tensor, max_windows: int, generator: torch.Generator) -> torch.Tensor:
    """A random subset of max_windows windows in corpus order (all of them when max_windows is 0 or larger)."""
    N = windows.shape[0]
    if max_windows <= 0 or max_windows >= N:
        return windows
    keep = torch.randperm(N, generator=generator)[:max_windows].sort().values
    return windows[keep]


def shuffle_windows(windows: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Every (window, position) token permuted across the whole set and reshaped back into windows: the same
    multiset of tokens, without the order of the text."""
    flat = windows.flatten()
    return flat[torch.randperm(flat.numel(), generator=generator)].view_as(windows)


def unit_rows(table: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Each embedding row divided by its norm (a zero row stays zero), computed in dtype (float32: as the authors
    normalised GPT-2's float32 table)."""
    table = table.to(dtype)
    return table / table.norm(dim=1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)


def embed_windows(windows: torch.Tensor, unit_table: torch.Tensor) -> torch.Tensor:
    """(N, T) ids -> (N, T, D) unit-norm token embeddings s_1..s_T per window."""
    return unit_table[windows]
