"""Which study files can actually be read, remembered per file version.

A corrupt or truncated file among the studies must not stop the server: it is checked once (a full read,
since a truncated .nii.gz only fails at its end), the verdict is cached by (size, mtime) in a JSON file, and
callers keep unreadable files out of what they serve.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading

from labelsentinel.io import VolumeError, load_image

logger = logging.getLogger(__name__)


class ImageCheckCache:
    def __init__(self, cache_path: str):
        self.cache_path = cache_path
        self._lock = threading.Lock()
        self._dirty = False
        self._cache: dict[str, dict] = {}
        try:
            with open(cache_path) as f:
                self._cache = json.load(f)
        except (OSError, ValueError):
            self._cache = {}

    @staticmethod
    def _stamp(path: str) -> list:
        st = os.stat(path)
        return [st.st_size, int(st.st_mtime_ns)]

    def check(self, path: str, save: bool = True) -> str | None:
        """None if the image is readable, else the reason (logged once per file version). ``save=False``: the
        new verdict is written at the next :meth:`flush` (a listing of 1,000 new files wrote the whole cache
        1,000 times: 8 s of JSON, not of reading)."""
        key = os.path.abspath(path)
        try:
            stamp = self._stamp(path)
        except OSError as e:
            return f"{path}: {e.strerror}"
        with self._lock:
            hit = self._cache.get(key)
            if hit and hit.get("stamp") == stamp:
                return hit.get("error")
        error = self._read(path)
        with self._lock:
            self._cache[key] = {"stamp": stamp, "error": error}
            self._dirty = True
            if save:
                self._save()
        return error

    what = "study"  # in the log line of an unreadable file

    def _load(self, path: str) -> None:
        load_image(path)

    def _read(self, path: str) -> str | None:
        try:
            self._load(path)
            return None
        except VolumeError as e:
            logger.error(f"unreadable {self.what} skipped: {e}")
            return str(e)

    def flush(self) -> None:
        """Write the verdicts found since the last write (after checks with ``save=False``)."""
        with self._lock:
            if self._dirty:
                self._save()

    def _save(self) -> None:
        self._dirty = False
        d = os.path.dirname(self.cache_path)
        try:
            os.makedirs(d, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(self._cache, f)
            os.replace(tmp, self.cache_path)
        except OSError as e:  # a read-only studies folder: keep the verdicts in memory
            logger.warning(f"cannot write {self.cache_path}: {e}")
