"""Incremental label-quality scoring of a set of labels (no MONAI Label import).

``score_labels`` runs the quality estimator over (image, label) pairs and keeps the result in the
:class:`labelsentinel.store.Store`. A pair whose image and label files, estimator version, structure names and
expected structures are unchanged since the last run is skipped without reading anything, so running it after every next-sample and every
training (MONAI Label's auto scoring) stays cheap. The estimator itself is loaded only when something needs
scoring. A label that cannot be used (unreadable, wrong grid, bad values) is recorded with its error and
reported; the others are scored. Given ``listed`` (the (image, tag) pairs the datastore lists), the records of
images and labels deleted since they were scored are removed; a pair that is listed but cannot be read now keeps
its record (a read error may pass).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable

from labelsentinel.io import VolumeError, check_same_grid, load_image, load_label
from labelsentinel.store import Store, file_stamp

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelItem:
    image_id: str
    tag: str
    image_path: str
    label_path: str


def pair_stamp(item: LabelItem, inputs: str = "") -> str:
    """The version of what a score depends on besides the estimator: both files and ``inputs`` (a digest of the
    structure names and expected structures, see :func:`inputs_digest`)."""
    return f"{file_stamp(item.image_path)}|{file_stamp(item.label_path)}" + (f"|{inputs}" if inputs else "")


def inputs_digest(names: dict[int, str] | None, expected: set[int] | None) -> str:
    """Names change the estimator's input (the name embedding) and expected structures the record's
    ``missing``: a score made with other names or another expected set is not current."""
    key = json.dumps([sorted((int(k), str(v)) for k, v in (names or {}).items()), sorted(int(i) for i in expected or ())])
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def score_labels(
    items: Iterable[LabelItem],
    store: Store,
    estimator_version: str,
    load_estimator: Callable[[], object],
    names: dict[int, str] | None = None,
    progress: Callable[[str], None] | None = None,
    expected: set[int] | None = None,
    listed: "Callable[[], Iterable[tuple[str, str]]] | Iterable[tuple[str, str]] | None" = None,
) -> dict:
    """Score what changed; return ``{"scored": [...], "unchanged": n, "errors": {id/tag: msg}, "seconds": s}``.

    ``load_estimator()`` returns an object with ``predict(image, label, spacing, names) -> list[dict]``.
    ``expected``: structure ids every label of the project should have; the ones a label lacks are
    recorded as ``missing`` (the ranking counts them as Dice 0).
    ``listed``: the (image id, tag) pairs the datastore has, or a function returning them (called after the
    scoring, so an image deleted while it ran is caught too); the records of other pairs are removed and listed
    under ``"removed"``. None (or a function returning None, e.g. when the datastore could not be listed):
    nothing is removed.
    """
    t0 = time.time()
    items = list(items)
    todo, unchanged = [], 0
    errors: dict[str, str] = {}
    inputs = inputs_digest(names, expected)
    for it in items:
        try:
            stamp = pair_stamp(it, inputs)
        except OSError as e:
            errors[f"{it.image_id}/{it.tag}"] = f"{it.label_path}: {e.strerror}"
            continue
        if store.is_current(it.image_id, it.tag, stamp, estimator_version):
            unchanged += 1
            prev = store.get_quality(it.image_id, it.tag)
            if prev and prev["error"]:
                errors[f"{it.image_id}/{it.tag}"] = prev["error"]
        else:
            todo.append((it, stamp))
    scored = []
    estimator = load_estimator() if todo else None

    def read(it):
        return load_image(it.image_path), load_label(it.label_path)

    # The next case's files are read on a second thread while this one is estimated.
    reader = ThreadPoolExecutor(1)
    try:
        ahead = reader.submit(read, todo[0][0]) if todo else None
        for n, (it, stamp) in enumerate(todo, 1):
            key = f"{it.image_id}/{it.tag}"
            pending, ahead = ahead, (reader.submit(read, todo[n][0]) if n < len(todo) else None)
            try:
                image, label = pending.result()
                check_same_grid(image, label)
                structures = estimator.predict(image.array, label.array, image.spacing, names or {})
                present = {int(s["id"]) for s in structures}
                missing = [{"id": i, "name": (names or {}).get(i)} for i in sorted(set(expected or ()) - present)]
                record = {"case": it.image_id, "tag": it.tag, "structures": structures, "missing": missing,
                          "estimator_version": estimator_version, "ts": time.time()}
                store.put_quality(it.image_id, it.tag, stamp, estimator_version, record=record)
                scored.append(key)
            except VolumeError as e:
                logger.error(f"quality scoring skips {key}: {e}")
                store.put_quality(it.image_id, it.tag, stamp, estimator_version, error=str(e))
                errors[key] = str(e)
            if progress:
                progress(f"[{n}/{len(todo)}] {key}" + (f": {errors[key]}" if key in errors else ""))
    finally:
        reader.shutdown(cancel_futures=True)
    removed: list[str] = []
    pairs = listed() if callable(listed) else listed
    if pairs is not None:  # a function answers None when the datastore could not be listed: nothing is removed
        removed = store.prune_quality(set(pairs))
        if removed:
            logger.info(f"quality scoring: removed the records of {len(removed)} deleted image(s)/label(s): {removed}")
        gone = {f"{i}/{t}" for i, t in {(it.image_id, it.tag) for it in items} - set(pairs)} | set(removed)
        errors = {k: v for k, v in errors.items() if k not in gone}  # not an error: no longer there
        scored = [k for k in scored if k not in gone]
    return {
        "estimator_version": estimator_version,
        "total": len(items),
        "scored": scored,
        "unchanged": unchanged,
        "errors": errors,
        "removed": removed,
        "seconds": round(time.time() - t0, 3),
    }
