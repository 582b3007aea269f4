"""Label Sentinel: the MONAI Label app.

Start with ``monailabel start_server --app apps/sentinel --studies STUDIES --host 127.0.0.1 --port 8000``
(or ``make run``). Options come in with ``--conf key value``; see README.md for the list.
This file only wires the pieces together; the logic lives in ``labelsentinel`` and ``lib/``.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import time

import monailabel
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.config import TaskConfig
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.interfaces.tasks.train import TrainTask

from lib.configs.segmentation import Segmentation
from lib.datastore import SentinelDatastore

from labelsentinel import __version__
from labelsentinel.io import load_label_names
from labelsentinel.models.name_embedding import unknown_names
from labelsentinel.store import Store, store_path
from labelsentinel.strategies.monailabel_adapters import (
    BudgetStrategy,
    FirstStrategy,
    QualityScoring,
    QualityStrategy,
    RandomStrategy,
    ReviewStrategy,
    record_corrections,
)
from labelsentinel.strategies.monailabel_app import ReasonedNextSample
from labelsentinel.strategies.ranking import good_enough_threshold

logger = logging.getLogger(__name__)

CONFIGS = {"segmentation": Segmentation}


def conf_number(conf: dict, key: str, default, cast=float, lo=None, hi=None):
    """``--conf key value`` as a number in [lo, hi]; a clear error naming the option otherwise."""
    raw = conf.get(key)
    if raw is None or str(raw).strip() == "":
        return default
    kind = "an integer" if cast is int else "a number"
    bounds = f"{kind} >= {lo}" if hi is None else f"{kind} from {lo} to {hi}"
    try:
        v = cast(str(raw).strip())
    except ValueError:
        raise ValueError(f"--conf {key} must be {bounds}, got {raw!r}") from None
    if not math.isfinite(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ValueError(f"--conf {key} must be {bounds}, got {raw!r}")
    return v


def resolve_labels(app_dir: str, studies: str, conf: dict) -> None:
    """Which structures the project segments, when ``--conf labels`` is not given.

    The app's labels.json (the demo's structures) fits studies whose label_names.json agrees with it (the
    demo, TotalSegmentator ids). When the studies' label_names.json gives the app's ids other names, or none
    of them, the studies' file is the project's list: otherwise a label would be scored as lacking structures
    it was never meant to have, under names that are not its own."""
    if conf.get("labels") or studies.startswith(("http://", "https://")):
        return
    p = os.path.join(studies, "label_names.json")
    default = load_label_names(os.path.join(app_dir, "labels.json"))
    if not os.path.isfile(p):
        logger.warning(f"no --conf labels and no {p}: the app's default structures ({', '.join(default.values())}) "
                       "are expected in every label, and a label lacking one is scored as missing it. Give your "
                       "structures with --conf labels FILE (id -> name JSON).")
        return
    theirs = load_label_names(p)
    clash = sorted(i for i in default if i in theirs and theirs[i] != default[i])
    if clash or not set(default) & set(theirs):
        why = (f"it names id {clash[0]} {theirs[clash[0]]!r}, not {default[clash[0]]!r}" if clash
               else "it holds none of the app's default ids")
        logger.info(f"labels: {p} ({len(theirs)} structures; {why}), not the app's default labels.json")
        conf["labels"] = p


class SentinelApp(ReasonedNextSample, MONAILabelApp):
    """MONAI Label's app with our strategies, scoring, datastore and routes; ``ReasonedNextSample`` makes a
    strategy that serves nothing answer with its reason."""

    def __init__(self, app_dir, studies, conf):
        # Set everything the base constructor's init_* calls need before calling it.
        self.model_dir = conf.get("model_dir") or os.path.join(app_dir, "model")
        resolve_labels(app_dir, studies, conf)
        os.makedirs(self.model_dir, exist_ok=True)
        names = [m.strip() for m in conf.get("models", "segmentation").split(",") if m.strip()]
        unknown = [m for m in names if m not in CONFIGS]
        if unknown:
            raise ValueError(f"unknown model(s) {unknown} in --conf models; available: {', '.join(CONFIGS)}")
        self.configs: dict[str, TaskConfig] = {}
        for n in names:
            c = CONFIGS[n]()
            c.init(n, self.model_dir, conf, None)
            self.configs[n] = c
        self.estimator_weights = conf.get("estimator_weights") or None
        self.estimator_device = self._estimator_device(conf)
        self.estimator_mae = self._estimator_mae()
        self.threshold = self._good_enough(conf)
        self.finetune_after = conf_number(conf, "finetune_after", 10, int, lo=0)
        self._store = None
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="Label Sentinel",
            description="Label-quality estimation and quality-driven annotation",
            version=f"{__version__} (monailabel {monailabel.__version__})",
            # A list of names in id order, as MONAI Label's own apps give it: OHIF's MONAI Label panel calls
            # info["labels"].push(...) and failed to connect at all when it was a name -> id mapping.
            labels=self._label_list(),
        )
        missing = unknown_names(self.structure_names().values())
        if missing:
            logger.warning(f"{len(missing)} structure name(s) are not in the estimator's name table: {missing}; their "
                           "quality is estimated from the image and mask alone (less accurate). Name them as in "
                           "README 'Structure names' (--conf label_names FILE) where one fits.")

    def _label_list(self) -> list[str] | None:
        if not self.configs:
            return None
        labels = next(iter(self.configs.values())).labels
        if isinstance(labels, dict):
            return [k for k, _ in sorted(labels.items(), key=lambda kv: kv[1])]
        return list(labels) if labels else None

    def init_datastore(self) -> Datastore:
        if self.studies.startswith("http://") or self.studies.startswith("https://"):
            from lib.dicomweb import adopt_remote

            return adopt_remote(super().init_datastore(), self.structure_names())
        from monailabel.config import settings

        if not os.path.isdir(self.studies):
            raise ValueError(f"studies folder {self.studies!r} does not exist")
        ds = SentinelDatastore(
            self.studies,
            structure_names=self.structure_names,  # Slicer's label_info names -> the app's ids
            extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )
        images = ds.list_images()
        if not images:
            logger.warning(f"studies folder {self.studies} holds no images: add .nii.gz files (or run labelsentinel sample-data)")
        bad = ds.unreadable_images()
        if bad:
            logger.warning(f"{len(bad)} of {len(images)} studies cannot be read and are not served: {sorted(bad)}")
        return ds

    def init_infers(self) -> dict[str, InferTask]:
        return {k: v.infer() for k, v in self.configs.items()}

    def init_trainers(self) -> dict[str, TrainTask]:
        out = {}
        for k, v in self.configs.items():
            t = v.trainer()
            if t:
                if hasattr(t, "configure_sentinel"):
                    t.configure_sentinel(self.store, self.structure_names(), self.expected_structures(),
                                         self.prior_mae, infer=v.infer())
                out[k] = t
        return out

    @staticmethod
    def _estimator_device(conf) -> str:
        device = (conf.get("estimator_device") or "cpu").strip().lower()
        if device not in ("cpu", "cuda"):
            raise ValueError(f"--conf estimator_device must be cpu or cuda, got {conf.get('estimator_device')!r}")
        if device == "cuda":
            import torch

            if not torch.cuda.is_available():
                logger.warning("--conf estimator_device cuda: no CUDA device here; the estimator scores on the CPU")
                return "cpu"
        return device

    def _estimator_mae(self) -> float | None:
        """The estimator's validation MAE (from its checkpoint): the prior error before real corrections.
        Weights given with ``--conf estimator_weights`` must load, or the server does not start."""
        from labelsentinel.models.estimator import DEFAULT_WEIGHTS, QualityEstimator

        if self.estimator_weights:
            if not os.path.isfile(self.estimator_weights):
                raise ValueError(f"--conf estimator_weights {self.estimator_weights}: no such file")
            try:
                ck = QualityEstimator.load(self.estimator_weights).checkpoint
            except Exception as e:
                raise ValueError(f"--conf estimator_weights {self.estimator_weights}: not a usable estimator "
                                 f"checkpoint ({type(e).__name__}: {e})") from None
        try:
            if not self.estimator_weights:
                import torch

                ck = torch.load(DEFAULT_WEIGHTS, map_location="cpu", weights_only=True)
            return float(ck["validation"]["estimator"]["mae"])
        except Exception as e:  # a checkpoint without its validation figures
            logger.warning(f"estimator MAE unknown ({type(e).__name__}: {e})")
            return None

    def _good_enough(self, conf) -> float:
        """``--conf good_enough X``, else derived from the estimator's validation MAE (see ranking.py)."""
        given = conf_number(conf, "good_enough", None, float, lo=0.0, hi=1.0)
        if given is not None:
            return given
        if self.estimator_mae is None:
            logger.warning("good-enough threshold 0.9 (estimator MAE unknown)")
            return 0.9
        return good_enough_threshold(self.estimator_mae)

    def store(self) -> Store:
        """Label Sentinel's record store (scores, leases, budget): next to local studies, else in model_dir."""
        if self._store is None:
            local = not (self.studies.startswith("http://") or self.studies.startswith("https://"))
            path = store_path(self.studies) if local else os.path.join(self.model_dir, "sentinel.db")
            self._store = Store(self.conf.get("sentinel_db") or path)
        return self._store

    def structure_names(self) -> dict[int, str]:
        """Names for the estimator: the app's labels, plus the studies' label_names.json when there is one."""
        names = {}
        p = os.path.join(self.studies, "label_names.json")
        if os.path.isfile(p):
            names.update(load_label_names(p))
        for c in self.configs.values():
            names.update({int(v): k for k, v in c.labels.items()})
        if self.conf.get("label_names"):
            names.update(load_label_names(self.conf["label_names"]))
        return names

    def init_strategies(self) -> dict[str, Strategy]:
        return {
            "quality": QualityStrategy(self.store, self.threshold, prior_mae=self.prior_mae),
            "budget": BudgetStrategy(self.store, self.threshold),
            "review": ReviewStrategy(self.store),
            # MONAI Label's own orders, with our leases (two annotators never get the same open case)
            "random": RandomStrategy(self.store),
            "first": FirstStrategy(self.store),
        }

    def init_scoring_methods(self) -> dict[str, ScoringMethod]:
        device = self.estimator_device
        # The structures the project segments (the app's labels): a pseudo-label lacking one is incomplete.
        expected = {int(v) for c in self.configs.values() for v in c.labels.values()}
        return {"quality": QualityScoring(self.store, self.structure_names(), self.estimator_weights, device, expected,
                                          prior_mae=self.prior_mae,
                                          finetune_after=self.finetune_after,
                                          finetune_path=os.path.join(self.model_dir, "estimator_finetuned.pt"))}

    def async_scoring(self, method, params=None):
        """MONAI Label's automatic scoring (MONAI_LABEL_AUTO_UPDATE_SCORING, on by default: at start-up, after
        every next sample served and after a synchronous training run) queued one more scoring run per call,
        each a subprocess that builds the app again, run one after another: 15 next samples kept the server
        scoring for minutes and a lead's ``status --score`` waited for all of them. Here it goes through
        ``queue_scoring`` as ``POST /scoring/{method}`` does: at most one run waits behind the one under way."""
        if not self._server_mode or params:
            return super().async_scoring(method, params)
        from lib.endpoints import queue_scoring

        result = {m: queue_scoring(m) for m in ([method] if method else list(self._scoring_methods))}
        return result.get(method) if method else result

    def _active_estimator(self) -> str | None:
        q = self._scoring_methods.get("quality")
        return q.active_weights() if isinstance(q, QualityScoring) else self.estimator_weights

    @property
    def prior_mae(self) -> float:
        return self.estimator_mae if self.estimator_mae is not None else 0.1

    def expected_structures(self) -> set[int]:
        return {int(v) for c in self.configs.values() for v in c.labels.values()}

    def on_save_label(self, image_id, label_id):
        """A final label saved over a pseudo-label: its real (predicted, true) Dice pairs recalibrate the
        estimator at once, and the annotator's lease on the case ends."""
        res = super().on_save_label(image_id, label_id) or {}
        try:
            from labelsentinel.models.estimator import weights_version

            labels = self.datastore().get_labels_by_image_id(image_id)
            if labels.get("final") == label_id:
                res.update(self._save_notes(image_id, label_id))
                self.store().release_lease(image_id)
                res["corrections"] = record_corrections(self.store(), self.datastore(),
                                                        weights_version(self._active_estimator()), self.prior_mae,
                                                        self.structure_names(), image_ids=[image_id])
        except Exception as e:  # the label is saved; a failed bookkeeping step must not fail the save
            logger.error(f"recording the correction of {image_id} failed: {e}")
            res["corrections_error"] = str(e)
        return res

    def _recover_training_runs(self) -> None:
        """At start-up, what training runs left in their work areas: a run that finished but whose process ended
        while it was publishing (server killed) is published now, not only when the next run starts (until then
        the server inferred with its model while no record, and no label-error signals, showed it); the work of
        runs that did not finish is discarded. A run still working (its process outlived a crashed server) is left
        alone. In a thread: publishing copies a model and saves labels."""
        import threading

        def recover():
            for name, task in self._trainers.items():
                if hasattr(task, "recover"):
                    try:
                        task.recover(self.datastore())
                    except Exception as e:  # never stops the server
                        logger.error(f"training work areas of {name} not recovered at start-up: {e}")

        threading.Thread(target=recover, name="labelsentinel-recover-training", daemon=True).start()

    def _save_notes(self, image_id: str, label_id: str) -> dict:
        """What the annotator who saved a final label should know: the case was out with another annotator, or the
        label replaced one saved before (kept in the label history). ``replaced`` and ``warnings`` in the answer
        (the save itself is never refused for this: no work is lost either way)."""
        notes: dict = {}
        try:
            info = self.datastore().get_label_info(label_id, "final") or {}
        except Exception:
            return notes
        saver = info.get("client_id")
        warnings = []
        lease = self.store().leases().get(image_id)
        if lease and saver and lease["client_id"] != saver:  # (OHIF sends no client_id with a save: not known)
            warnings.append(f"{image_id} was out with {lease['client_id']} (served by {lease.get('strategy') or 'a strategy'}); "
                            "your final label is saved")
        rep = info.get("replaced")
        if rep:
            notes["replaced"] = rep
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rep["ts"])) if rep.get("ts") else "an earlier time"
            if rep.get("client_id") != saver:  # another annotator's (a re-submit by the same one is no news)
                kept = f"; it is kept at {rep['history']}" if rep.get("history") else ""
                warnings.append(f"this final label replaced the one {rep.get('client_id') or 'an annotator'} saved at "
                                f"{when}{kept}")
        if warnings:
            notes["warnings"] = warnings
            for w in warnings:
                logger.warning(f"final label of {image_id} saved: {w}")
        return notes

    def on_init_complete(self):
        super().on_init_complete()
        from lib.endpoints import register_routes

        register_routes(self)
        self._recover_training_runs()
        # What start-up built (MONAI Label, torch, the app: hundreds of thousands of objects) is moved out of the
        # garbage collector's reach. A full collection otherwise walks all of it and stalls the request that
        # triggered it: 50 to 240 ms pauses inside next_sample were measured (BENCHMARKS.md, next sample).
        gc.collect()
        gc.freeze()
        logger.info(f"start-up objects frozen for the garbage collector: {gc.get_freeze_count()}")

    def info(self):
        d = super().info()
        ds = self.datastore()
        if hasattr(ds, "unreadable_images") and hasattr(ds, "unreadable_labels"):  # local or DICOMweb
            d["labelsentinel"] = {"unreadable_images": ds.unreadable_images(), "unreadable_labels": ds.unreadable_labels()}
        return d
