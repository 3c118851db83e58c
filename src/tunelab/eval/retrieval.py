"""BM25 retrieval over the few-shot pool (train examples) or over chunks of a document folder.

Reads texts given by the caller (the user prompts of the pool entries, or document chunks); keeps a
`bm25s` index in memory and returns, per query, the indices of the k most similar texts. Writes
nothing. Document folders are read as UTF-8 text (.txt, .md, .rst, .json, .jsonl, .csv, .html) and cut
into overlapping word windows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tunelab.errors import ConfigError

DOC_SUFFIXES = (".txt", ".md", ".rst", ".json", ".jsonl", ".csv", ".html")
CHUNK_WORDS = 120  # about 160 tokens: k=5 chunks stay well inside a 2k context
CHUNK_OVERLAP_WORDS = 20  # a fact cut by a boundary still lands whole in one chunk


@dataclass(frozen=True)
class Chunk:
    text: str
    source: str  # "path/to/doc.md#3": file and chunk number


class BM25Index:
    """BM25 (Lucene variant, English stopwords) over a fixed list of texts."""

    def __init__(self, texts: Sequence[str]) -> None:
        import bm25s

        if not texts:
            raise ValueError("BM25Index needs at least one text")
        self.size = len(texts)
        self._retriever = bm25s.BM25()
        # Tokenize to strings (not ids) so queries map through the corpus vocabulary, not their own.
        corpus_tokens = bm25s.tokenize(list(texts), stopwords="en", return_ids=False, show_progress=False)
        # bm25s cannot index a document without tokens; a placeholder keeps indices aligned.
        corpus_tokens = [tokens or ["\u2205"] for tokens in corpus_tokens]
        self._retriever.index(corpus_tokens, show_progress=False)

    def search(self, query: str, k: int) -> list[tuple[int, float]]:
        """(index, score) of the k best texts, best first; ties keep corpus order (deterministic)."""
        import bm25s

        k = min(k, self.size)
        if k <= 0:
            return []
        tokens = bm25s.tokenize([query], stopwords="en", return_ids=False, show_progress=False)[0]
        if not tokens:
            # A query of stopwords only matches nothing: fall back to corpus order, score 0.
            return [(i, 0.0) for i in range(k)]
        indices, scores = self._retriever.retrieve([tokens], k=k, show_progress=False, n_threads=1)
        return [(int(i), float(s)) for i, s in zip(indices[0], scores[0], strict=True)]


def chunk_text(text: str, source: str, words: int = CHUNK_WORDS, overlap: int = CHUNK_OVERLAP_WORDS) -> list[Chunk]:
    tokens = text.split()
    if not tokens:
        return []
    step = max(1, words - overlap)
    chunks = []
    for number, start in enumerate(range(0, max(1, len(tokens) - overlap), step)):
        chunks.append(Chunk(" ".join(tokens[start : start + words]), f"{source}#{number}"))
    return chunks


def read_document_chunks(folder: str | Path) -> list[Chunk]:
    """Every text document under `folder` (recursively, sorted) cut into overlapping word windows."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"eval.rag_docs: '{folder}' is not a folder")
    chunks: list[Chunk] = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in DOC_SUFFIXES):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"eval.rag_docs: {path}: not a UTF-8 text file") from None
        chunks.extend(chunk_text(text, str(path)))
    if not chunks:
        raise ConfigError(f"eval.rag_docs: '{folder}' has no text documents ({', '.join(DOC_SUFFIXES)})")
    return chunks
