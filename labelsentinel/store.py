"""Label Sentinel's own record store: quality scores, settings and other records that must survive.

Why not MONAI Label's datastore JSON: ``LocalDatastore.update_image_info`` rewrites the whole
``datastore_v2.json`` from the memory of whichever process writes, so a score written by a background
scoring subprocess is lost at the server's next write (for example the "served" marker of
``/activelearning``). Scores therefore live here, in an SQLite database next to the studies
(``STUDIES/.labelsentinel/sentinel.db``): every write is a transaction on one row, processes never
overwrite each other's rows, and a restart finds everything. A copy is also put into the datastore's image
info for clients that read it, but nothing in Label Sentinel relies on that copy.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from contextlib import contextmanager

SCHEMA = """
CREATE TABLE IF NOT EXISTS quality (
    image_id TEXT NOT NULL,
    tag TEXT NOT NULL,
    label_stamp TEXT NOT NULL,
    estimator_version TEXT NOT NULL,
    ts REAL NOT NULL,
    record TEXT,
    error TEXT,
    PRIMARY KEY (image_id, tag)
);
CREATE TABLE IF NOT EXISTS leases (
    case_id TEXT PRIMARY KEY,
    client_id TEXT NOT NULL,
    expires REAL NOT NULL,
    strategy TEXT
);
CREATE TABLE IF NOT EXISTS skips (
    case_id TEXT NOT NULL,
    client_id TEXT NOT NULL,
    until REAL NOT NULL,
    PRIMARY KEY (case_id, client_id)
);
CREATE TABLE IF NOT EXISTS corrections (
    image_id TEXT NOT NULL,
    tag TEXT NOT NULL,
    structure_id INTEGER NOT NULL,
    name TEXT,
    predicted REAL,
    true_dice REAL NOT NULL,
    estimator_version TEXT,
    stamp TEXT NOT NULL,
    ts REAL NOT NULL,
    PRIMARY KEY (image_id, tag, structure_id)
);
CREATE TABLE IF NOT EXISTS signals (
    image_id TEXT PRIMARY KEY,
    run_id TEXT NOT NULL,
    record TEXT NOT NULL,
    ts REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    ts REAL NOT NULL
);
"""


def store_timeout() -> float:
    """Seconds a store write waits for another process's write (``LABELSENTINEL_STORE_TIMEOUT``, default 30)."""
    try:
        return max(0.1, float(os.environ.get("LABELSENTINEL_STORE_TIMEOUT", "30")))
    except ValueError:
        return 30.0


def store_path(studies: str) -> str:
    return os.path.join(studies, ".labelsentinel", "sentinel.db")


def file_stamp(path: str) -> str:
    """Cheap identity of a file version: size, modification time, inode and status-change time (ns). The last
    two catch a file replaced by another of the same size and modification time (``cp -p``, ``rsync -t``, a
    file system with coarse times): a replacement is a new inode or, written in place, a new change time,
    which no program can set back."""
    st = os.stat(path)
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ino}:{st.st_ctime_ns}"


_QUALITY_COLUMNS = "image_id, tag, label_stamp, estimator_version, ts, record, error"


def _quality_row(row) -> dict:
    image_id, tag, stamp, ver, ts, rec, err = row
    return {"image_id": image_id, "tag": tag, "label_stamp": stamp, "estimator_version": ver, "ts": ts,
            "record": json.loads(rec) if rec else None, "error": err}


class Store:
    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._local = threading.local()
        self._quality_cache: dict = {}
        self._conn().executescript(SCHEMA)  # idempotent; executescript manages its own transaction
        self._migrate()

    def _migrate(self) -> None:
        """Columns added since a store was created (an older ``sentinel.db`` keeps its rows)."""
        c = self._conn()
        if "strategy" not in {r[1] for r in c.execute("PRAGMA table_info(leases)")}:
            try:
                c.execute("ALTER TABLE leases ADD COLUMN strategy TEXT")
            except sqlite3.OperationalError as e:  # another process added it first
                if "duplicate column" not in str(e):
                    raise

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            # how long a write waits for another process's write to end (a store write takes milliseconds; only
            # a process holding a transaction open, e.g. a sqlite3 shell, makes it wait): then "database is locked"
            conn = sqlite3.connect(self.path, timeout=store_timeout(), isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    @contextmanager
    def _tx(self):
        c = self._conn()
        c.execute("BEGIN IMMEDIATE")
        try:
            yield c
            c.execute("COMMIT")
        except BaseException:
            c.execute("ROLLBACK")
            raise

    # quality records -----------------------------------------------------------------------------------
    def put_quality(self, image_id: str, tag: str, label_stamp: str, estimator_version: str, record=None, error=None):
        with self._tx() as c:
            c.execute(
                "INSERT OR REPLACE INTO quality VALUES (?, ?, ?, ?, ?, ?, ?)",
                (image_id, tag, label_stamp, estimator_version, time.time(),
                 None if record is None else json.dumps(record), error),
            )

    def is_current(self, image_id: str, tag: str, label_stamp: str, estimator_version: str) -> bool:
        row = self._conn().execute(
            "SELECT label_stamp, estimator_version FROM quality WHERE image_id=? AND tag=?", (image_id, tag)
        ).fetchone()
        return row is not None and row[0] == label_stamp and row[1] == estimator_version

    def quality(self, tag: str | None = None, include_errors: bool = False) -> list[dict]:
        """Quality rows by image id. The parsed ``record`` dicts are cached while the table is unchanged (a
        next-sample request reads every row: parsing a thousand records each time cost 10 ms and, through the
        garbage collector, spikes of 100-400 ms); treat them as read-only."""
        where, args = ("WHERE tag=?", (tag,)) if tag is not None else ("", ())
        conn = self._conn()
        sig = conn.execute(f"SELECT count(*), max(ts), total(ts), total(length(record)), total(length(error)) FROM quality {where}", args).fetchone()
        key = (tag, include_errors)
        hit = self._quality_cache.get(key)
        if hit is not None and hit[0] == sig:
            return [dict(r) for r in hit[1]]
        q = f"SELECT {_QUALITY_COLUMNS} FROM quality {where} ORDER BY image_id, tag"
        out = [_quality_row(row) for row in conn.execute(q, args) if include_errors or not row[-1]]
        self._quality_cache[key] = (sig, out)
        return [dict(r) for r in out]

    def get_quality(self, image_id: str, tag: str) -> dict | None:
        row = self._conn().execute(f"SELECT {_QUALITY_COLUMNS} FROM quality WHERE image_id=? AND tag=?",
                                   (image_id, tag)).fetchone()
        return None if row is None else _quality_row(row)

    def remove_quality(self, image_id: str, tag: str | None = None) -> int:
        """Remove the records of one image (one tag, or all); returns how many went."""
        with self._tx() as c:
            if tag is None:
                return c.execute("DELETE FROM quality WHERE image_id=?", (image_id,)).rowcount
            return c.execute("DELETE FROM quality WHERE image_id=? AND tag=?", (image_id, tag)).rowcount

    def prune_quality(self, present) -> list[str]:
        """Remove the records of (image, tag) pairs not in ``present`` (the pairs the datastore has now: an image or
        a label deleted since it was scored). Returns the removed pairs as ``image/tag``. ``present`` must come from
        a successful listing of the datastore: never call this on a failed or partial one."""
        keep = {(str(i), str(t)) for i, t in present}
        with self._tx() as c:
            stale = [(i, t) for i, t in c.execute("SELECT image_id, tag FROM quality") if (i, t) not in keep]
            c.executemany("DELETE FROM quality WHERE image_id=? AND tag=?", stale)
        return [f"{i}/{t}" for i, t in stale]

    # settings (e.g. a budget a project lead changes while the server runs) -----------------------------
    def set_setting(self, key: str, value) -> None:
        with self._tx() as c:
            c.execute("INSERT OR REPLACE INTO settings VALUES (?, ?, ?)", (key, json.dumps(value), time.time()))

    def get_setting(self, key: str, default=None):
        row = self._conn().execute("SELECT value FROM settings WHERE key=?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    # corrections: real (predicted, true) Dice pairs, known once a human saved a final label over a pseudo-label
    def put_corrections(self, image_id: str, tag: str, stamp: str, rows: list[dict]) -> None:
        """Replace the real pairs of one (image, pseudo-label tag) with ``rows`` (one per structure)."""
        now = time.time()
        with self._tx() as c:
            c.execute("DELETE FROM corrections WHERE image_id=? AND tag=?", (image_id, tag))
            c.executemany(
                "INSERT INTO corrections VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(image_id, tag, int(r["id"]), r.get("name"), r.get("predicted"), float(r["true_dice"]),
                  r.get("estimator_version"), stamp, now) for r in rows],
            )

    def remove_corrections(self, image_id: str, tag: str | None = None) -> int:
        """Drop the real pairs of one image (one pseudo-label tag, or all): its final label is gone or replaced by
        one that cannot be read, so they no longer describe a correction. Returns the number of rows removed."""
        with self._tx() as c:
            if tag is None:
                return c.execute("DELETE FROM corrections WHERE image_id=?", (image_id,)).rowcount
            return c.execute("DELETE FROM corrections WHERE image_id=? AND tag=?", (image_id, tag)).rowcount

    def correction_stamp(self, image_id: str, tag: str) -> str | None:
        row = self._conn().execute("SELECT stamp FROM corrections WHERE image_id=? AND tag=? LIMIT 1",
                                   (image_id, tag)).fetchone()
        return row[0] if row else None

    def corrections(self, estimator_version: str | None = None) -> list[dict]:
        q = "SELECT image_id, tag, structure_id, name, predicted, true_dice, estimator_version, ts FROM corrections"
        args: tuple = ()
        if estimator_version is not None:
            q += " WHERE estimator_version=?"
            args = (estimator_version,)
        keys = ("image_id", "tag", "id", "name", "predicted", "true_dice", "estimator_version", "ts")
        return [dict(zip(keys, r)) for r in self._conn().execute(q + " ORDER BY ts, image_id, structure_id", args)]

    # training signals of final labels (label-error suspicion), written by the trainer ----------------------
    def put_signals(self, run_id: str, records: dict[str, dict]) -> None:
        now = time.time()
        with self._tx() as c:
            c.executemany("INSERT OR REPLACE INTO signals VALUES (?, ?, ?, ?)",
                          [(k, run_id, json.dumps(v), now) for k, v in records.items()])

    def signals(self) -> dict[str, dict]:
        rows = self._conn().execute("SELECT image_id, run_id, record, ts FROM signals ORDER BY image_id")
        return {r[0]: {**json.loads(r[2]), "run_id": r[1], "ts": r[3]} for r in rows}

    # leases: a case served to one annotator is not served to another until it expires -----------------
    def acquire_lease(self, case_id: str, client_id: str, ttl: float, now: float | None = None,
                      strategy: str | None = None) -> bool:
        """``strategy``: the strategy that served the case (the budget counts only the cases it served itself)."""
        now = time.time() if now is None else now
        with self._tx() as c:
            row = c.execute("SELECT client_id, expires FROM leases WHERE case_id=?", (case_id,)).fetchone()
            if row and row[1] > now and row[0] != client_id:
                return False
            c.execute("INSERT OR REPLACE INTO leases (case_id, client_id, expires, strategy) VALUES (?, ?, ?, ?)",
                      (case_id, client_id, now + ttl, strategy))
            return True

    def release_lease(self, case_id: str, client_id: str | None = None) -> None:
        with self._tx() as c:
            if client_id is None:
                c.execute("DELETE FROM leases WHERE case_id=?", (case_id,))
            else:
                c.execute("DELETE FROM leases WHERE case_id=? AND client_id=?", (case_id, client_id))

    def leased_by_others(self, client_id: str, now: float | None = None) -> set[str]:
        now = time.time() if now is None else now
        rows = self._conn().execute("SELECT case_id FROM leases WHERE expires > ? AND client_id != ?", (now, client_id))
        return {r[0] for r in rows}

    def let_go(self, client_id: str, skip_seconds: float, now: float | None = None) -> list[str]:
        """The cases out with ``client_id`` go back to the others (an annotator who asks for a next sample without
        saving is done with the case) and are kept from that annotator for ``skip_seconds``. Returns them."""
        now = time.time() if now is None else now
        with self._tx() as c:
            cases = [r[0] for r in c.execute("SELECT case_id FROM leases WHERE client_id=? AND expires > ?", (client_id, now))]
            c.execute("DELETE FROM leases WHERE client_id=?", (client_id,))
            c.executemany("INSERT OR REPLACE INTO skips VALUES (?, ?, ?)", [(k, client_id, now + skip_seconds) for k in cases])
            c.execute("DELETE FROM skips WHERE until <= ?", (now,))
        return cases

    def skipped_by(self, client_id: str, now: float | None = None) -> set[str]:
        now = time.time() if now is None else now
        rows = self._conn().execute("SELECT case_id FROM skips WHERE client_id=? AND until > ?", (client_id, now))
        return {r[0] for r in rows}

    def leases(self, now: float | None = None) -> dict[str, dict]:
        now = time.time() if now is None else now
        rows = self._conn().execute("SELECT case_id, client_id, expires, strategy FROM leases WHERE expires > ?", (now,))
        return {r[0]: {"client_id": r[1], "expires": r[2], "strategy": r[3]} for r in rows}
