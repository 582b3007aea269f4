"""Multi-structure segmentation training task.

Trains on ``final`` labels plus the pseudo-labels the quality estimator trusts (see
``labelsentinel.strategies.pseudolabels`` for the rules and defaults), records which pseudo-labels each run
used and why, gathers per-sample training signals of the final labels (variance of gradients and loss, see
``labelsentinel.strategies.label_errors``) and, when ``refurbish`` is on, trains on the model's prediction
instead of a final label flagged by the previous run (saved under the ``refurbished`` tag; the human label is
never touched). CUDA with mixed precision when a GPU is present, CPU otherwise. Every pair a run would use is
checked in full first (``check_pairs``); unusable ones are skipped with the reason. The run's record says
whether it finished or failed.

A run's products (the model, the checkpoint the next run starts from, the refurbished labels, the label-error
signals, the run's record) are published only when it finishes. MONAI Label published the best model at every
epoch and the run saved its refurbished labels into the datastore before training, so a run stopped with
DELETE /train (its process killed with SIGKILL) changed the model the server infers with, the checkpoint the
next run started from, and replaced the refurbished labels of the last finished run. Now a run works in
``MODEL_DIR/segmentation/staging/<run_id>-<pid>/`` (MONAI Label's output folder for the run: checkpoints, stats,
cache; plus its refurbished labels and signals); when it finishes it writes ``COMMITTED.json`` there (its record), then
publishes: the best model to the published path (atomically: inference sees the old or the new file), the
refurbished labels into the datastore (tagged with the ``run_id``), the signals into the record store, the
checkpoints into ``MODEL_DIR/segmentation/<name>/`` as MONAI Label keeps them, the record; then the folder is
removed. The next run, and the server when it starts, first look at what is left there: the work of a run that
did not finish (stopped, killed, failed) is discarded; that of a run killed while publishing (``COMMITTED.json``
there) is published. A work area whose process still runs is left alone.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import threading
import time

import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.inferers import SlidingWindowInferer
from monai.losses import DiceCELoss
from monai.transforms import (
    Activationsd,
    AsDiscreted,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    Orientationd,
    RandCropByPosNegLabeld,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityRanged,
    SpatialPadd,
    Spacingd,
)
from monailabel.tasks.train.basic_train import BasicTrainTask, Context

from lib.infers.segmentation import HU_WINDOW
from lib.transforms import LabelIdsToChannelsd
from labelsentinel.io import VolumeError, atomic_copy, atomic_write, grid_difference, load_image, load_label
from labelsentinel.strategies.corrections import load_calibration
from labelsentinel.strategies.label_errors import LabelErrorSignals, reviewed_since, suspects
from labelsentinel.strategies.pseudolabels import DEFAULTS as PSEUDO, RULES, select_pseudo_labels

logger = logging.getLogger(__name__)


# ---- checks of the files a run trains on --------------------------------------------------------------
# MONAI Label reads every file again at each epoch: a truncated or empty file, or a label with non-integer
# values, used to fail the whole run mid-training. Each pair is read in full once per file version (size,
# modification time, inode, change time) and the result cached in MODEL_DIR/segmentation/train_checked.json,
# so a large CT is decompressed once, not at every run.
def _read_volume(path: str, role: str) -> dict:
    """Read ``path`` in full as an ``image`` (3D, finite) or a ``label`` (3D, integer ids >= 0) with the checks
    scoring and uploads use (``labelsentinel.io``). Returns {"shape", "affine"}; raises VolumeError. A folder (a
    DICOM series MONAI reads as one image) is not judged: {}."""
    if os.path.isdir(path):
        return {}
    vol = (load_image if role == "image" else load_label)(path)
    return {"shape": list(vol.array.shape), "affine": vol.affine.tolist()}


class FileChecks:
    """The result of ``_read_volume`` per file version, kept in a JSON file (None: not kept)."""

    def __init__(self, path: str | None = None):
        self.path, self.entries, self.changed = path, {}, False
        if path and os.path.isfile(path):
            try:
                with open(path) as f:
                    self.entries = json.load(f)
            except (OSError, ValueError) as e:
                logger.warning(f"training file checks: {path} unreadable ({e}), checking every file again")

    def check(self, path: str, role: str) -> dict:
        """{"shape", "affine"} of a usable file; raises VolumeError with the reason otherwise."""
        from labelsentinel.store import file_stamp

        try:
            stamp = file_stamp(path)
        except OSError:
            raise VolumeError(f"{path}: file not found")
        key = f"{role}:{os.path.abspath(path)}"
        hit = self.entries.get(key)
        if not hit or hit.get("stamp") != stamp:
            try:
                hit = {"stamp": stamp, **_read_volume(path, role)}
            except VolumeError as e:
                hit = {"stamp": stamp, "error": str(e)}
            self.entries[key], self.changed = hit, True
        if hit.get("error"):
            raise VolumeError(hit["error"])
        return hit

    def save(self) -> None:
        if not self.path or not self.changed:
            return
        # forget files that are gone (renamed, deleted): the cache stays the size of the datastore
        self.entries = {k: v for k, v in self.entries.items() if os.path.exists(k.split(":", 1)[1])}
        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            with open(tmp, "w") as f:
                json.dump(self.entries, f)
            os.replace(tmp, self.path)
            self.changed = False
        except OSError as e:
            logger.warning(f"training file checks not saved to {self.path}: {e}")


def _grid_problem(img: dict, lab: dict) -> str | None:
    """Why a label is not on its image's grid (the shape, then the affine within 1e-3 mm as uploads require)."""
    import numpy as np

    if not img or not lab:  # a folder: not judged
        return None
    si, sl = tuple(img["shape"]), tuple(lab["shape"])
    if si != sl:
        return f"label shape {sl} does not match image shape {si}"
    ai, al = np.asarray(img["affine"]), np.asarray(lab["affine"])
    if not np.allclose(ai, al, atol=1e-3):
        return f"label and image are on different grids (shape {si}; {grid_difference(al, ai)})"
    return None


def check_pairs(datalist: list[dict], cache_path: str | None = None, source: str | None = None,
                checks: FileChecks | None = None) -> tuple[list[dict], list[dict]]:
    """Split a datalist into usable pairs and refused ones, with the reason. Usable: both files read in full,
    the image 3D and finite, the label integer ids >= 0, both on the same voxel grid (shape, and affine
    within 1e-3 mm). Each file version is read once (``checks``, or a cache kept in
    ``cache_path``)."""
    own = checks is None
    checks = checks if checks is not None else FileChecks(cache_path)
    good, refused = [], []
    for d in datalist:
        try:
            img = checks.check(d["image"], "image")
            lab = checks.check(d["label"], "label")
            problem = _grid_problem(img, lab)
            if problem:
                raise VolumeError(f"{problem} (image {d['image']}, label {d['label']})")
            good.append(d)
        except VolumeError as e:
            logger.error(f"training skips a pair{f' ({source})' if source else ''}: {e}")
            r = {"image": d["image"], "label": d["label"], "error": str(e)}
            if source or d.get("source"):
                r["source"] = source or d.get("source")
            if d.get("case"):
                r["case"] = d["case"]
            refused.append(r)
    if own:
        checks.save()
    return good, refused


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _opt(request: dict, key: str, default):
    """A request option as the type of its default (OHIF/Slicer send strings; a list means its first item)."""
    if isinstance(default, list):  # a config choice list: its first item is the default
        default = default[0] if default else None
    v = request.get(key, default)
    if isinstance(v, list):
        v = v[0] if v else default
    if v in (None, ""):
        return default
    if isinstance(default, bool):
        return v if isinstance(v, bool) else str(v).strip().lower() in _TRUE
    if isinstance(default, int):
        return int(float(v))  # "5" and "5.0" from a panel (checked as whole numbers by checked_options)
    return type(default)(v) if default is not None else v


# Training options checked before a run starts (name: kind, lowest, highest; "int"/"float" bounds inclusive,
# "float>" excludes the lowest). OHIF and Slicer send strings: "5" and "0.5" are read as numbers.
NUMBERS = {
    "max_epochs": ("int", 1, 100000), "early_stop_patience": ("int", -1, None), "val_split": ("float", 0.0, 0.9),
    "train_batch_size": ("int", 1, 1024), "val_batch_size": ("int", 1, 1024), "lr": ("float>", 0.0, 1.0),
    "pseudo_threshold": ("float", 0.0, 1.0), "pseudo_topk": ("int", 0, None), "pseudo_alpha": ("float>", 0.0, 0.5),
    "signal_checkpoints": ("int", 2, 100), "suspect_threshold": ("float", None, None),
}
FLAGS = ("pretrained", "multi_gpu", "pseudo_weighting", "label_errors", "refurbish")


def checked_options(config: dict, request: dict) -> tuple[dict, list[str]]:
    """The training options of ``request`` read as their types (the numbers of ``NUMBERS`` and the on/off
    options of ``FLAGS``), and what is wrong with them (sentences; empty when all is well). Checked too: every
    option whose configured value is a list of choices (``pseudo_labels``, ``refurbish_signal``, ``tracking``,
    ...). Other keys pass as they are."""
    values, out = {}, []
    for key, raw in request.items():
        v = raw[0] if isinstance(raw, list) and raw else raw
        if v in (None, "", []):
            continue
        if key in NUMBERS:
            kind, lo, hi = NUMBERS[key]
            try:
                if isinstance(v, bool):
                    raise ValueError
                x = float(v)
                if not math.isfinite(x) or (kind == "int" and x != int(x)):
                    raise ValueError
            except (TypeError, ValueError):
                out.append(f"option {key} must be {'a whole number' if kind == 'int' else 'a finite number'}, got {raw!r}")
                continue
            bad_lo = lo is not None and (x <= lo if kind == "float>" else x < lo)
            if bad_lo or (hi is not None and x > hi):
                rng = " and ".join(([f"{'>' if kind == 'float>' else '>='} {lo:g}"] if lo is not None else [])
                                   + ([f"<= {hi:g}"] if hi is not None else []))
                out.append(f"option {key} must be {rng}, got {raw!r}")
            elif not isinstance(raw, list):
                values[key] = int(x) if kind == "int" else x
        elif key in FLAGS:
            if not isinstance(v, bool) and str(v).strip().lower() not in _TRUE + _FALSE:
                out.append(f"option {key} must be true or false, got {raw!r}")
            elif not isinstance(raw, list):
                values[key] = v if isinstance(v, bool) else str(v).strip().lower() in _TRUE
        elif key != "device" and isinstance(config.get(key), list) and config[key] \
                and all(isinstance(c, str) for c in config[key]):
            if not isinstance(v, str) or v not in config[key]:
                out.append(f"option {key} must be one of {', '.join(config[key])}; got {raw!r}")
    return values, out


class WeightedDiceCELoss(DiceCELoss):
    """DiceCE scaled by the batch's sample weight (exact with batch size 1, the default; the batch mean
    otherwise). ``weight`` is set by the trainer's iteration just before the loss is computed."""

    weight = 1.0

    def forward(self, input, target):
        return super().forward(input, target) * self.weight


def _case_id(datastore, image_path: str) -> str:
    for i in datastore.list_images():
        if datastore.get_image_uri(i) == image_path:
            return i
    return os.path.basename(image_path).split(".")[0]


# ---- a run's work area, published only when the run finishes ---------------------------------------------
STAGING = "staging"  # MODEL_DIR/segmentation/staging/<run_id>-<pid>/
OWNER, COMMIT, SIGNALS, REFURBISHED = "owner.json", "COMMITTED.json", "signals.json", "refurbished"
_LIVE: set[str] = set()  # work areas of the runs under way in this process (synchronous runs, run_sync=true)
_LIVE_LOCK = threading.Lock()


def _atomic_json(path: str, data) -> None:
    """``path`` replaced in one step, flushed to disk first (a reader, or a later start, never sees half a file)."""
    atomic_write(path, json.dumps(data, indent=1).encode())


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _process_started(pid: int) -> float | None:
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:  # ended, not reaped (an orphan whose new parent does not reap)
            return None
        return proc.create_time()
    except psutil.Error:
        return None


def _stage_alive(stage: str) -> bool:
    """Whether the run that owns the work area ``stage`` (named ``<run_id>-<pid>``) still runs: a run of this
    process that has not returned, or the process that created it (same pid and start time) in another."""
    with _LIVE_LOCK:
        if os.path.abspath(stage) in _LIVE:
            return True
    try:
        pid = int(os.path.basename(stage).rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return False
    if pid == os.getpid():  # a run of this process that is no longer under way
        return False
    started = _process_started(pid)
    if started is None:
        return False
    owner = _read_json(os.path.join(stage, OWNER))
    if not owner or owner.get("started") is None:  # being created right now
        return True
    return abs(started - float(owner["started"])) < 1.0  # else the pid is another process's now


def _label_ext(path: str) -> str:
    name = os.path.basename(path)
    return next((e for e in (".nii.gz", ".seg.nrrd") if name.endswith(e)), os.path.splitext(name)[1])


class _SignalHandler:
    """At ``signal_checkpoints`` evenly spaced epochs, computes every final label's checkpoint maps; at the
    end of training writes the label-error signals into the run's work area (the record store gets them when
    the run is published)."""

    def __init__(self, task: "Segmentation", context: Context):
        self.task, self.context = task, context
        n = max(2, int(_opt(context.request, "signal_checkpoints", 4)))
        e = int(context.max_epochs)
        self.epochs = sorted({max(1, round(e * (k + 1) / n)) for k in range(n)})
        self.signals = LabelErrorSignals(ids=task.ids)
        self.data = None

    def attach(self, engine):
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.epoch_completed)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def _load(self):
        from monai.transforms import Compose

        t = Compose(self.task._load(("image", "label")))
        self.data = []
        for d in self.context.datalist:
            if d.get("source") != "final":
                continue
            try:
                x = t({"image": d["image"], "label": d["label"]})
                lab = x["label"][0]  # class indices 0..N (LabelIdsToChannelsd)
                img = x["image"].as_tensor() if hasattr(x["image"], "as_tensor") else x["image"]
                lab = lab.as_tensor() if hasattr(lab, "as_tensor") else lab
                self.data.append((d["case"], img.float(), lab.long(), d["label"]))
            except Exception as e:
                logger.error(f"label-error signals skip {d['case']}: {e}")

    def epoch_completed(self, engine):
        if engine.state.epoch not in self.epochs:
            return
        from labelsentinel.models.training_signals import checkpoint_maps

        if self.data is None:
            self._load()
        t0 = time.time()
        for case, img, lab, _ in self.data:
            g, ce, pred = checkpoint_maps(engine.network, img, lab)
            self.signals.update(case, g, ce, pred, lab.numpy())
        logger.info(f"label-error signals: checkpoint {self.signals.checkpoints} (epoch {engine.state.epoch}) over "
                    f"{len(self.data)} final labels in {time.time() - t0:.1f} s")

    def completed(self, engine):
        if not self.data or self.signals.checkpoints < 2:
            logger.info("label-error signals: fewer than 2 checkpoints, nothing written")
            return
        from labelsentinel.store import file_stamp

        scores = self.signals.scores(self.task.sentinel["names"])
        for case, _, _, label_path in self.data:
            scores[case]["label_stamp"] = file_stamp(label_path)
            scores[case]["label"] = label_path
        # into the run's work area (context.output_dir): the record store gets them when the run is published
        _atomic_json(os.path.join(self.context.output_dir, SIGNALS), {"run_id": str(self.context.run_id), "scores": scores})
        logger.info(f"label-error signals computed for {len(scores)} final labels ({self.signals.checkpoints} checkpoints)")


class Segmentation(BasicTrainTask):
    def __init__(self, model_dir, network, labels: dict[str, int], spacing, roi_size, description="", **kwargs):
        self._network = network
        self.ids = list(labels.values())
        self.spacing = spacing
        self.roi_size = roi_size
        self.sentinel = None  # set by the app: store, names, calibration prior, infer task
        # MONAI Label's default tracking (MLflow on a file store under the model folder) fails with the pinned
        # mlflow 3 ("filesystem tracking backend ... in maintenance mode"): training is untracked by default,
        # and MLflow, when chosen, writes to an SQLite file in the model folder unless a tracking URI is set.
        from monailabel.config import settings

        kwargs.setdefault("tracking", None)
        kwargs.setdefault("tracking_uri", settings.MONAI_LABEL_TRACKING_URI
                          or "sqlite:///" + os.path.join(os.path.abspath(model_dir), "mlflow.db"))
        super().__init__(model_dir, description, labels=labels, amp=torch.cuda.is_available(), **kwargs)
        # MONAI Label's publisher copies the best model to the published path at every epoch: a stopped run changed
        # the model the server infers with. The path is kept here and used by ``_publish`` when a run finishes.
        self._publish_to, self._publish_path = self._publish_path, None
        self._run, self._checked, self._stage, self._staged_labels, self._output_name = None, False, None, [], None
        self._config["tracking"] = ["None", "mlflow"]
        self._config.update({
            "max_epochs": 20, "val_split": 0.2, "lr": 2e-3,
            # pseudo-labels (labelsentinel.strategies.pseudolabels)
            "pseudo_labels": list(RULES),
            "pseudo_threshold": PSEUDO["threshold"],
            "pseudo_topk": PSEUDO["k"],
            "pseudo_alpha": PSEUDO["alpha"],
            "pseudo_weighting": False,
            # label-error signals of final labels, and refurbishment of flagged ones for the next round
            "label_errors": True,
            "signal_checkpoints": 4,
            "refurbish": False,
            "refurbish_signal": ["vog", "loss"],
            "suspect_threshold": 3.0,
        })

    def configure_sentinel(self, store, names: dict, expected: set, prior_mae: float, infer=None):
        self.sentinel = {"store": store, "names": names, "expected": expected, "prior_mae": prior_mae, "infer": infer}

    def network(self, context: Context):
        return self._network

    def optimizer(self, context: Context):
        return torch.optim.AdamW(context.network.parameters(), lr=float(context.request.get("lr", 2e-3)), weight_decay=1e-5)

    def loss_function(self, context: Context):
        self._loss = WeightedDiceCELoss(to_onehot_y=True, softmax=True)
        return self._loss

    def train_iteration_update(self, context: Context):
        def iteration(engine, batch):
            w = batch.get("weight") if isinstance(batch, dict) else None
            self._loss.weight = float(torch.as_tensor(w, dtype=torch.float32).mean()) if w is not None else 1.0
            return SupervisedTrainer._iteration(engine, engine, batch)

        return iteration

    # ---- data ------------------------------------------------------------------------------------------
    def check_options(self, request: dict) -> None:
        """ValueError naming every bad training option (the server answers it with HTTP 422 before a run starts;
        a run started another way fails with the same message)."""
        values, problems = checked_options(self._config, request)
        if problems:
            raise ValueError("; ".join(problems))
        # the checked values as their types, in place (MONAI Label's trainer reads max_epochs etc. as they come,
        # and a panel sends "5")
        request.update(values)

    def __call__(self, request, datastore):
        """MONAI Label's run, in its own work area, and its record (store ``training_runs``, ``train_data.json``,
        and ``train_refused.json`` once the data checks ran) written when it ends: ``status`` finished, or failed
        with the ``error`` (a failure in the data checks, the options or training itself). Nothing is written
        before, and nothing the run makes is published before it finishes (``_commit``): a run killed from
        outside (DELETE /train) leaves no record, the files keep describing the last run that ended, and the
        model, the refurbished labels and the signals stay those of the last run that finished. What earlier runs
        left in their work areas is published or discarded first (``recover``)."""
        self._run, self._checked, self._stage, self._staged_labels, self._output_name = None, False, None, [], None
        self.recover(datastore)
        try:
            try:
                result = super().__call__(request, datastore)
            except BaseException as e:
                self._discard(self._stage, "failed")
                self._end_run("failed", e)
                raise
            self._commit(result, datastore)
            return result
        finally:
            if self._stage:
                with _LIVE_LOCK:
                    _LIVE.discard(os.path.abspath(self._stage))

    def _record(self, status: str, error: BaseException | None = None, result=None) -> dict:
        """The run's record as it ends."""
        run = self._run if self._run is not None else {"run_id": None, "ts": time.time()}
        run.update(status=status, ended=time.time(), seconds=round(time.time() - run["ts"], 1), error=None)
        if error is not None:
            run["error"] = f"{type(error).__name__}: {str(error)[:2000]}"
            cause = error.__cause__ or error.__context__
            while cause is not None and (cause.__cause__ or cause.__context__) is not None:
                cause = cause.__cause__ or cause.__context__
            if cause is not None:  # MONAI wraps the real error in "applying transform ..." RuntimeErrors
                run["error"] += f" (cause: {type(cause).__name__}: {str(cause)[:500]})"
        if isinstance(result, dict) and result.get("best_metric") is not None:
            run["best_metric"] = result["best_metric"]
        return run

    def _end_run(self, status: str, error: BaseException | None = None, result=None) -> None:
        self._write_record(self._record(status, error, result), self._checked)

    def _write_record(self, run: dict, checked: bool) -> None:
        try:
            if checked:
                self._write_json("train_refused.json", {"ts": int(time.time()), "run_id": run.get("run_id"),
                                                        "refused": run.get("refused", [])})
            self._write_json("train_data.json", run)
            if self.sentinel:
                store = self.sentinel["store"]()
                runs = store.get_setting("training_runs", []) or []
                store.set_setting("training_runs", (runs + [run])[-50:])
        except Exception as e:  # never hides the run's own error
            logger.error(f"training run record not written: {e}")
        logger.info(f"training run {run.get('run_id')} {run.get('status')}" + (f": {run['error']}" if run.get("error") else ""))

    def _recorded(self, run_id) -> bool:
        """Whether the record of run ``run_id`` was written (a run killed while it was being published)."""
        if self.sentinel:
            try:
                runs = self.sentinel["store"]().get_setting("training_runs", []) or []
                return any(str(r.get("run_id")) == str(run_id) for r in runs)
            except Exception as e:
                logger.error(f"training runs could not be read: {e}")
        return str((_read_json(os.path.join(self._model_dir, "train_data.json")) or {}).get("run_id")) == str(run_id)

    # ---- a run's work area: published when the run finishes, discarded otherwise ----------------------------
    def _open_stage(self, request) -> str:
        """The run's work area, ``staging/<run_id>-<pid>``, made MONAI Label's output folder of the run
        (``context.output_dir`` is ``model_dir/<name>``): its checkpoints, stats and cache go there, and so do its
        refurbished labels and signals."""
        run_id = str(request["run_id"])
        self._output_name = str(request.get("name") or "train_01")
        stage = os.path.join(self._model_dir, STAGING, f"{run_id}-{os.getpid()}")
        with _LIVE_LOCK:
            _LIVE.add(os.path.abspath(stage))
        if os.path.exists(stage):
            shutil.rmtree(stage)
        os.makedirs(stage)
        _atomic_json(os.path.join(stage, OWNER), {"run_id": run_id, "pid": os.getpid(),
                                                  "started": _process_started(os.getpid()), "name": self._output_name})
        self._stage = stage
        request["name"] = os.path.relpath(stage, self._model_dir)
        return stage

    def _commit(self, result, datastore) -> None:
        """The run finished: its record goes into ``COMMITTED.json`` in its work area (from then on a run killed
        while publishing is published by the next one), then everything is published (``_publish``)."""
        run = self._record("finished", result=result)
        manifest = {"run": run, "checked": self._checked, "name": self._output_name, "labels": self._staged_labels}
        try:
            _atomic_json(os.path.join(self._stage, COMMIT), manifest)
        except Exception as e:
            self._discard(self._stage, f"finished but could not be published ({type(e).__name__}: {e})")
            self._write_record(self._record("failed", e), self._checked)
            raise
        self._publish(self._stage, manifest, datastore)

    def _publish(self, stage: str, manifest: dict, datastore) -> None:
        """Publish a finished run's work area: the model (atomically), the refurbished labels into the datastore
        (with the run id), the label-error signals, MONAI Label's checkpoints and stats into
        ``MODEL_DIR/segmentation/<name>/``, the record; then remove the work area. Each step can be done again:
        a run killed while publishing is published by the next run (``recover``)."""
        run = manifest["run"]
        run_id = run.get("run_id")
        best = os.path.join(stage, self._key_metric_filename)
        if self._publish_to and os.path.isfile(best):
            try:
                # a reader (inference loading the published model) sees the old file or the new one, never a
                # partial copy (MONAI Label's publisher used shutil.copy)
                os.makedirs(os.path.dirname(os.path.abspath(self._publish_to)), exist_ok=True)
                atomic_copy(best, self._publish_to)
                logger.info(f"training run {run_id}: model published: {best} => {self._publish_to}")
            except OSError as e:  # nothing published: the run counts as failed
                shutil.rmtree(stage, ignore_errors=True)
                run.update(status="failed", error=f"the model could not be published to {self._publish_to}: {e}")
                self._write_record(run, manifest.get("checked", False))
                raise RuntimeError(run["error"]) from e
        for item in manifest.get("labels") or []:
            case, staged = item["case"], item["file"]
            try:
                if os.path.isfile(staged):
                    datastore.save_label(case, staged, REFURBISHED, {**item.get("info", {}), "run_id": run_id})
                    os.unlink(staged)
                label_id = datastore.get_labels_by_image_id(case).get(REFURBISHED)
                path = datastore.get_label_uri(label_id, REFURBISHED) if label_id else None
                err = None if path else "not in the datastore"
            except Exception as e:  # e.g. the image was deleted meanwhile
                path, err = None, f"{type(e).__name__}: {getattr(e, 'detail', None) or e}"
                logger.error(f"training run {run_id}: refurbished label of {case} not saved: {err}")
            for r in run.get("refurbished") or []:
                if r.get("case") == case:
                    r["refurbished"] = path
                    if err:
                        r["error"] = err
        signals = _read_json(os.path.join(stage, SIGNALS))
        if signals and self.sentinel:
            try:
                self.sentinel["store"]().put_signals(str(signals.get("run_id", run_id)), signals["scores"])
                logger.info(f"label-error signals written for {len(signals['scores'])} final labels")
            except Exception as e:
                logger.error(f"training run {run_id}: label-error signals not written: {e}")
        out = os.path.join(self._model_dir, manifest.get("name") or "train_01")
        try:  # MONAI Label's checkpoints and stats of the run, where it keeps them
            os.makedirs(out, exist_ok=True)
            for f in os.listdir(stage):
                if f in (OWNER, COMMIT, SIGNALS, REFURBISHED) or f.startswith("cache_"):
                    continue
                dst = os.path.join(out, f)
                if os.path.isdir(dst) and not os.path.islink(dst):
                    shutil.rmtree(dst)
                os.replace(os.path.join(stage, f), dst)
        except OSError as e:
            logger.error(f"training run {run_id}: checkpoints not moved to {out}: {e}")
        if not self._recorded(run_id):
            self._write_record(run, manifest.get("checked", False))
        shutil.rmtree(stage, ignore_errors=True)

    def _discard(self, stage: str | None, why: str) -> None:
        """Remove the work area of a run that did not finish, saying what it held (nothing was published)."""
        if not stage or not os.path.isdir(stage):
            return
        owner = _read_json(os.path.join(stage, OWNER)) or {}
        held = []
        if os.path.isfile(os.path.join(stage, self._key_metric_filename)):
            held.append("a model checkpoint")
        try:
            n = len(os.listdir(os.path.join(stage, REFURBISHED)))
        except OSError:
            n = 0
        if n:
            held.append(f"{n} refurbished label(s)")
        shutil.rmtree(stage, ignore_errors=True)
        logger.warning(f"training run {owner.get('run_id') or os.path.basename(stage)} {why}: its work is discarded "
                       f"({', '.join(held) or 'nothing made yet'}); the model, refurbished labels and signals of the "
                       "last finished run stay as they were")

    def recover(self, datastore) -> None:
        """Before a run: the work areas left by earlier runs whose process has ended. A run that finished but was
        killed while publishing (``COMMITTED.json`` there) is published now; any other (stopped with DELETE /train,
        killed, failed) is discarded. A work area whose run still runs (another process) is left alone."""
        root = os.path.join(self._model_dir, STAGING)
        if not os.path.isdir(root):
            return
        from filelock import FileLock

        # one recovery at a time: the server's at start-up and a run's (another process) may meet
        with FileLock(os.path.join(self._model_dir, "staging.lock")):
            self._recover(root, datastore)

    def _recover(self, root: str, datastore) -> None:
        try:
            names = sorted(os.listdir(root))
        except OSError:
            return
        for n in names:
            stage = os.path.join(root, n)
            if not os.path.isdir(stage) or _stage_alive(stage):
                continue
            try:
                manifest = _read_json(os.path.join(stage, COMMIT))
                if isinstance(manifest, dict) and isinstance(manifest.get("run"), dict):
                    logger.warning(f"training run {manifest['run'].get('run_id')} finished but its process ended "
                                   "while its products were being published: publishing them now")
                    self._publish(stage, manifest, datastore)
                else:
                    self._discard(stage, "did not finish (stopped with DELETE /train, or its process ended)")
            except Exception as e:  # never stops a new run
                logger.error(f"training work area {stage} left as it is: {type(e).__name__}: {e}")

    def live_runs(self) -> list[dict]:
        """The runs whose work area is in use by a process that still runs (a run of this process under way, or
        of another: MONAI Label's training process, or one left running by a server that crashed and restarted,
        which MONAI Label no longer knows of): ``run_id``, ``pid``, ``started``."""
        root = os.path.join(self._model_dir, STAGING)
        try:
            names = sorted(os.listdir(root))
        except OSError:
            return []
        out = []
        for n in names:
            stage = os.path.join(root, n)
            if os.path.isdir(stage) and _stage_alive(stage):
                owner = _read_json(os.path.join(stage, OWNER)) or {}
                out.append({"run_id": owner.get("run_id"), "pid": owner.get("pid"), "started": owner.get("started")})
        return out

    def load_path(self, output_dir, pretrained=True):
        """The weights a run starts from: the published model, which only a finished run writes, else the
        starting weights (``pretrained``). MONAI Label looked first in the run's output folder, where a stopped
        run had left its own checkpoint."""
        if self._publish_to and os.path.exists(self._publish_to):
            return self._publish_to
        return self._load_path if pretrained else None

    def _write_json(self, name: str, data: dict) -> None:
        """``MODEL_DIR/segmentation/name`` replaced in one step (a reader never sees half a file)."""
        os.makedirs(self._model_dir, exist_ok=True)
        _atomic_json(os.path.join(self._model_dir, name), data)

    def pre_process(self, request, datastore):
        # the run's record, completed below and written when the run ends (``_end_run``), never before
        self._run = run = {"run_id": request.get("run_id"), "ts": time.time(), "status": "running", "finals": 0,
                           "pseudo_labels": [], "refurbished": [], "refused": []}
        self.check_options(request)
        # the device BasicTrainTask will pick (single GPU): the requested device when CUDA is there, else CPU;
        # mixed precision only on CUDA (a request for the CPU on a GPU server trains in full precision)
        device = str(request.get("device") or "cuda") if torch.cuda.is_available() else "cpu"
        self._amp = device.startswith("cuda")
        run.update(device=device, amp=self._amp,
                   options={k: _opt(request, k, v) for k, v in self._config.items()
                            if k.startswith(("pseudo_", "refurbish", "suspect_", "label_errors"))})
        self._open_stage(request)
        checks = FileChecks(os.path.join(self._model_dir, "train_checked.json"))
        try:
            good, refused = check_pairs(datastore.datalist(), source="final", checks=checks)
            for r in refused:
                r.setdefault("case", _case_id(datastore, r["image"]))
            run["refused"] = refused
            self._checked = True  # (pseudo-labels refused below are added to the same list)
            if not good:
                msg = "no usable final labels to train on"
                if refused:
                    msg += f"; refused: {'; '.join(r['error'] for r in refused)}"
                raise ValueError(msg)
            for d in good:
                d.update(weight=1.0, source="final", case=_case_id(datastore, d["image"]))
            run["finals"] = len(good)
            if self.sentinel:
                if _opt(request, "refurbish", False):
                    run["refurbished"] = self._refurbish(request, datastore, good, checks)
                pseudo = self._pseudo_labels(request, datastore, checks, refused)
                run["pseudo_labels"] = pseudo
                for p in pseudo:
                    good.append({"image": p["image"], "label": p["label"], "weight": p["weight"], "source": "pseudo",
                                 "case": p["case"]})
        finally:
            checks.save()
        logger.info(f"training data: {run['finals']} final labels, {len(run['pseudo_labels'])} pseudo-labels, "
                    f"{len(run['refurbished'])} refurbished, {len(run['refused'])} pair(s) skipped; on {device}"
                    f"{' with mixed precision' if run['amp'] else ''}")
        return good

    def _pseudo_labels(self, request, datastore, checks: FileChecks | None = None,
                       refused: list | None = None) -> list[dict]:
        rule = _opt(request, "pseudo_labels", PSEUDO["rule"])
        if rule == "none":
            return []
        store = self.sentinel["store"]()
        labeled = set(datastore.get_labeled_images())
        records = [r["record"] for r in store.quality("original") if r["record"] and r["image_id"] not in labeled]
        versions = {r.get("estimator_version") for r in records}
        cal = load_calibration(store, versions.pop(), self.sentinel["prior_mae"]) if len(versions) == 1 else None
        chosen = select_pseudo_labels(
            records, rule=rule, threshold=_opt(request, "pseudo_threshold", PSEUDO["threshold"]),
            k=_opt(request, "pseudo_topk", PSEUDO["k"]), alpha=_opt(request, "pseudo_alpha", PSEUDO["alpha"]),
            calibration=cal, expected=self.sentinel["expected"],
            weighting=_opt(request, "pseudo_weighting", False))
        out = []
        for c in chosen:
            labels = datastore.get_labels_by_image_id(c["case"])
            if c["tag"] not in labels:
                continue
            out.append({**c, "image": datastore.get_image_uri(c["case"]),
                        "label": datastore.get_label_uri(labels[c["tag"]], c["tag"])})
        good, bad = check_pairs(out, source="pseudo", checks=checks)
        if refused is not None:
            refused.extend(bad)
        return good

    def _refurbish(self, request, datastore, finals: list[dict], checks: FileChecks | None = None) -> list[dict]:
        """Swap flagged final labels (previous run's signals) for the current model's prediction (kept in the run's
        work area until the run finishes). A final label saved again since those signals (an annotator reviewed
        it, as the review strategy counts it) is the annotator's word and is trained on as it is."""
        store = self.sentinel["store"]()
        signals = store.signals()
        by = _opt(request, "refurbish_signal", "vog")
        reviewed = reviewed_since(signals, {d["case"]: d["label"] for d in finals})
        if reviewed:
            logger.info(f"refurbishment leaves {len(reviewed)} final label(s) saved again since the signals: {sorted(reviewed)}")
        flagged = dict(suspects(signals, by, _opt(request, "suspect_threshold", 3.0), exclude=reviewed))
        infer = self.sentinel.get("infer")
        done = []
        for d in finals:
            cid = d["case"]
            if cid not in flagged or infer is None:
                continue
            try:
                path, _ = infer({"image": d["image"], "device": "cuda" if torch.cuda.is_available() else "cpu"})
                # into the run's work area; saved under the refurbished tag when the run finishes (``_publish``)
                new = os.path.join(self._stage, REFURBISHED, cid + _label_ext(path))
                os.makedirs(os.path.dirname(new), exist_ok=True)
                shutil.move(path, new)
                _, bad = check_pairs([{"image": d["image"], "label": new}], source="refurbished", checks=checks)
                if bad:
                    os.unlink(new)
                    raise VolumeError(bad[0]["error"])
                self._staged_labels.append({"case": cid, "file": new, "info": {"source": "refurbishment", "signal": by,
                                                                               "score": flagged[cid]}})
                done.append({"case": cid, "final": d["label"], "refurbished": new, by: flagged[cid]})
                d.update(label=new, source="refurbished")
            except Exception as e:  # a failed refurbishment keeps the human label
                logger.error(f"refurbishment of {cid} failed, training on its final label: {e}")
        return done

    def partition_datalist(self, context: Context, shuffle=False):
        """Validation only ever on human (final) labels; pseudo-labels and refurbished labels train only."""
        data = context.datalist
        finals = [d for d in data if d.get("source") == "final"]
        extra = [d for d in data if d.get("source") != "final"]
        context.datalist = finals
        train, val = super().partition_datalist(context, shuffle)
        context.datalist = data
        return list(train) + extra, val

    # ---- label-error signals ---------------------------------------------------------------------------
    def train_handlers(self, context: Context):
        handlers = super().train_handlers(context)
        if self.sentinel and _opt(context.request, "label_errors", True):
            handlers.append(_SignalHandler(self, context))
        return handlers

    def _load(self, keys):
        return [
            LoadImaged(keys=keys),
            EnsureChannelFirstd(keys=keys),
            Orientationd(keys=keys, axcodes="RAS"),
            Spacingd(keys=keys, pixdim=self.spacing, mode=("bilinear", "nearest")[: len(keys)]),
            LabelIdsToChannelsd(keys="label", ids=self.ids),
            ScaleIntensityRanged(keys="image", a_min=HU_WINDOW[0], a_max=HU_WINDOW[1], b_min=0.0, b_max=1.0, clip=True),
        ]

    def train_pre_transforms(self, context: Context):
        keys = ("image", "label")
        return [
            *self._load(keys),
            SpatialPadd(keys=keys, spatial_size=self.roi_size),
            RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=self.roi_size, pos=2, neg=1, num_samples=1),
            # No flips: left/right structures (kidney_left/right) must keep their side.
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
            RandShiftIntensityd(keys="image", offsets=0.05, prob=0.5),
            EnsureTyped(keys=keys, device=context.device),
        ]

    def train_post_transforms(self, context: Context):
        n = len(self.ids) + 1
        return [
            EnsureTyped(keys="pred", device=context.device),
            Activationsd(keys="pred", softmax=True),
            AsDiscreted(keys=("pred", "label"), argmax=(True, False), to_onehot=(n, n)),
        ]

    def val_pre_transforms(self, context: Context):
        keys = ("image", "label")
        return [*self._load(keys), EnsureTyped(keys=keys, device=context.device)]

    def val_inferer(self, context: Context):
        return SlidingWindowInferer(roi_size=self.roi_size, sw_batch_size=1, overlap=0.25)
