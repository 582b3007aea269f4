"""Thin MONAI Label adapters: the `quality` scoring method and the `quality`, `budget`, `review`, `random` and
`first` strategies.

All decisions are made by the plain functions of :mod:`labelsentinel.strategies` over records kept in the
:class:`labelsentinel.store.Store`; these classes only translate between them and MONAI Label's datastore
and request dicts. Options appear in ``info()["config"]`` so the OHIF and Slicer panels show them and send
them back as request parameters (a list value means "choose one"; its first element is the default).
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from typing import Callable

from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy

from labelsentinel.store import Store
from labelsentinel.strategies.corrections import (
    calibrate_records,
    collect_corrections,
    load_calibration,
    prune_corrections,
    recalibrate,
)
from labelsentinel.strategies.label_errors import review_state, suspects
from labelsentinel.strategies.budget import CostModel, plan_budget
from labelsentinel.strategies.ranking import METHODS, aggregate, rank_cases, structures_of, unknown_structures
from labelsentinel.strategies.scoring import LabelItem, score_labels

logger = logging.getLogger(__name__)

FINAL = "final"


def correction_pairs(datastore: Datastore, image_ids=None) -> list[tuple[str, str, str, str]]:
    """(image, pseudo tag, pseudo-label path, final label path) of every case with a final and a pseudo-label.

    A final label the datastore lists as labeled but not among the image's labels (on a DICOMweb datastore: a
    SEG that is only in the PACS, saved by another server or a PACS workstation) is fetched through
    ``get_label_uri(image, "final")``; one that cannot be fetched now is left for the next scoring."""
    out = []
    try:
        labeled = set(datastore.get_labeled_images())
    except Exception as e:  # a PACS outage: the final labels listed locally still count
        logger.error(f"labeled images could not be listed: {type(e).__name__}: {e}")
        labeled = set()
    for image_id in image_ids if image_ids is not None else datastore.list_images():
        labels = datastore.get_labels_by_image_id(image_id)
        if FINAL in labels:
            final = datastore.get_label_uri(labels[FINAL], FINAL)
        elif image_id in labeled and any(t not in (FINAL, "refurbished") for t in labels):
            try:
                final = datastore.get_label_uri(image_id, FINAL)
            except Exception as e:
                logger.error(f"final label of {image_id} could not be fetched, its correction waits for the next "
                             f"scoring: {type(e).__name__}: {e}")
                continue
            if not final:
                continue
        else:
            continue
        for tag, label_id in labels.items():
            if tag not in (FINAL, "refurbished"):
                out.append((image_id, tag, datastore.get_label_uri(label_id, tag), final))
    return out


def datastore_pairs(datastore: Datastore) -> set[tuple[str, str]] | None:
    """(image id, tag) of every label the datastore lists now (readable or not), or None when it cannot be
    listed (a PACS outage): nothing may be removed on a failed listing."""
    try:
        return {(i, tag) for i in datastore.list_images() for tag in datastore.get_labels_by_image_id(i)}
    except Exception as e:
        logger.error(f"datastore could not be listed, no record removed: {type(e).__name__}: {e}")
        return None


def with_tag(datastore: Datastore, images, tag: str) -> set[str]:
    """The ``images`` that have a label of ``tag`` now (a record of a deleted label is not used). A datastore
    that cannot say which labels an image has (a minimal stand-in) filters nothing."""
    labels_of = getattr(datastore, "get_labels_by_image_id", None)
    if labels_of is None:
        return set(images)
    return {i for i in images if tag in labels_of(i)}


def images_with_final(datastore: Datastore, images=None) -> set[str] | None:
    """Images with a final label now (a local one, or one MONAI Label's datastore lists as labeled: a SEG only in
    the PACS); None when the datastore cannot be listed."""
    try:
        images = datastore.list_images() if images is None else images
        out = {i for i in images if FINAL in datastore.get_labels_by_image_id(i)}
        return out | set(datastore.get_labeled_images())
    except Exception as e:
        logger.error(f"datastore could not be listed, no correction removed: {type(e).__name__}: {e}")
        return None


def live_corrections(store: Store, datastore: Datastore, pairs: list[dict] | None = None) -> list[dict]:
    """The real pairs (``pairs``, default the store's) whose final label is still there (the others no longer
    count, even before the next scoring removes them)."""
    pairs = store.corrections() if pairs is None else pairs
    finals = images_with_final(datastore, sorted({p["image_id"] for p in pairs}))
    return pairs if finals is None else [p for p in pairs if p["image_id"] in finals]


def refit_calibration(store: Store, version: str, prior_mae: float) -> dict:
    ft = store.get_setting("estimator_finetuned") or {}
    trained = ft.get("trained_cases", []) if ft.get("version") == version else []
    return recalibrate(store, version, prior_mae, trained_cases=trained)


def record_corrections(store: Store, datastore: Datastore, version: str, prior_mae: float, names=None,
                       image_ids=None) -> dict:
    """Store the real pairs of corrected pseudo-labels, drop those whose final label is gone (deleted, or
    replaced by a file that cannot be read), and refit the calibration when anything changed."""
    res = collect_corrections(correction_pairs(datastore, image_ids), store, names)
    corrected = {p["image_id"] for p in store.corrections()}
    check = corrected if image_ids is None else corrected & set(image_ids)
    finals = images_with_final(datastore, sorted(check)) if check else set()
    if finals is not None:  # never on a failed listing
        removed = prune_corrections(store, finals | (corrected - check))
        res["removed"] = sorted(set(res["removed"]) | set(removed))
    if res["recorded"] or res["removed"] or store.get_setting(f"calibration:{version}") is None:
        cal = refit_calibration(store, version, prior_mae)
        res["calibration"] = {k: cal[k] for k in ("n", "cases", "mae_before", "mae_after", "conformal_pairs")}
    return res


def calibrated_records(store: Store, tag: str, prior_mae: float = 0.1, cases=None) -> list[dict]:
    """The quality records of ``tag``, calibrated; with ``cases``, only those of these images (pass the images
    that have a ``tag`` label now, so a record of a deleted image or label is not used before the next scoring
    removes it)."""
    keep = None if cases is None else set(cases)
    recs = [r["record"] for r in store.quality(tag) if r["record"] and (keep is None or r["image_id"] in keep)]
    return calibrate_records(recs, lambda v: load_calibration(store, v, prior_mae) if v else None)


def label_items(datastore: Datastore, tags=None) -> list[LabelItem]:
    """Every non-final label (pseudo-labels, stored model predictions) of every readable image."""
    items = []
    image_error = getattr(datastore, "image_error", None)
    for image_id in datastore.list_images():
        if image_error and image_error(image_id):
            continue
        for tag, label_id in datastore.get_labels_by_image_id(image_id).items():
            if tag == FINAL or (tags and tag not in tags):
                continue
            items.append(LabelItem(image_id, tag, datastore.get_image_uri(image_id),
                                   datastore.get_label_uri(label_id, tag)))
    return items


class QualityScoring(ScoringMethod):
    """Predicted Dice of every structure of every pseudo-label; skips what did not change."""

    def __init__(self, store: Callable[[], Store], names: dict, weights: str | None = None, device: str = "cpu",
                 expected: set[int] | None = None, prior_mae: float = 0.1, finetune_after: int = 0,
                 finetune_path: str | None = None):
        super().__init__("Label quality: predicted Dice of every structure of every pseudo-label (no ground truth)")
        self._store = store
        self.prior_mae = prior_mae
        self.finetune_after = int(finetune_after or 0)
        self.finetune_path = finetune_path
        self.expected = set(expected or ())
        self.names = names
        self.weights = weights
        self.device = device

    def active_weights(self) -> str | None:
        """The fine-tuned estimator once one was accepted (see ``maybe_finetune``), else the configured one."""
        ft = self._store().get_setting("estimator_finetuned")
        if ft and ft.get("weights") and os.path.isfile(ft["weights"]):
            return ft["weights"]
        return self.weights

    def maybe_finetune(self, datastore: Datastore) -> dict | None:
        """Fine-tune the estimator on the real corrections each time ``finetune_after`` more cases are corrected."""
        if self.finetune_after <= 0 or not self.finetune_path:
            return None
        store = self._store()
        corrected = sorted({r["image_id"] for r in store.corrections() if r["predicted"] is not None})
        last = store.get_setting("estimator_finetune_last", {"cases": 0})
        if len(corrected) < last["cases"] + self.finetune_after:
            return None
        from labelsentinel.models.estimator_finetune import Correction, finetune

        corr = [Correction(i, datastore.get_image_uri(i), p, f, self.names)
                for i, tag, p, f in correction_pairs(datastore, corrected) if tag == "original"]
        logger.info(f"fine-tuning the estimator on {len(corr)} corrected cases")
        try:
            res = finetune(corr, self.finetune_path, self.active_weights(), progress=logger.info)
        except Exception as e:  # the current weights stay; tell the log and the result
            logger.error(f"estimator fine-tuning failed, current weights kept: {e}")
            res = {"accepted": False, "error": str(e)}
        store.set_setting("estimator_finetune_last", {"cases": len(corrected), "result": res, "ts": time.time()})
        if res.get("accepted"):
            store.set_setting("estimator_finetuned", res)
        return res

    def __call__(self, request, datastore: Datastore):
        from labelsentinel.models.estimator import QualityEstimator, weights_version

        weights = self.active_weights()
        version = weights_version(weights)
        result = score_labels(
            label_items(datastore),
            self._store(),
            version,
            lambda: QualityEstimator.load(weights, self.device),
            self.names,
            progress=lambda m: logger.info(f"quality scoring {m}"),
            expected=self.expected,
            # records of images and labels deleted since they were scored go (not on a failed listing)
            listed=lambda: datastore_pairs(datastore),
        )
        logger.info(f"quality scoring: {len(result['scored'])} scored, {result['unchanged']} unchanged, "
                    f"{len(result['errors'])} errors, {len(result['removed'])} removed in {result['seconds']} s")
        # Human corrections of scored pseudo-labels: real (predicted, true) pairs -> recalibration.
        result["corrections"] = record_corrections(self._store(), datastore, version, self.prior_mae, self.names)
        ft = self.maybe_finetune(datastore)
        if ft is not None:
            result["finetune"] = ft
        return result


def _param(request: dict, key: str, default):
    v = request.get(key, default)
    if isinstance(v, list):
        v = v[0] if v else default
    return default if v in (None, "") else v


MAX_LEASE_MINUTES = 24 * 60.0


def _number(request: dict, key: str, default: float, lo: float | None = None, hi: float | None = None,
            lo_open: bool = False) -> float:
    """A numeric request option, checked: ValueError (answered as HTTP 422) naming the option otherwise."""
    raw = _param(request, key, default)
    try:
        if isinstance(raw, bool):
            raise TypeError
        v = float(raw)
    except (TypeError, ValueError):
        raise ValueError(f"option {key} must be a number, got {raw!r}") from None
    if math.isnan(v) or math.isinf(v) or (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
        rng = f"{'>' if lo_open else '>='} {lo:g}" if lo is not None else ""
        rng += (" and " if rng and hi is not None else "") + (f"<= {hi:g}" if hi is not None else "")
        raise ValueError(f"option {key} must be a finite number{' ' + rng if rng else ''}, got {raw!r}")
    return v


def _lease_seconds(request: dict, default_minutes: float) -> float:
    return 60.0 * _number(request, "lease_minutes", default_minutes, lo=0.0, hi=MAX_LEASE_MINUTES, lo_open=True)


def _let_go(store: Store, client: str, ttl: float) -> set[str]:
    """Asking for a next sample means the annotator is done with the case they hold: a case they did not save
    goes back to the others, and comes back to them only when nothing else is left (for a lease period).
    Returns the cases this annotator skipped."""
    store.let_go(client, ttl)
    return store.skipped_by(client)


def _skipped_last(cases: list, skipped: set[str], key=lambda c: c) -> list:
    return sorted(cases, key=lambda c: key(c) in skipped)  # stable: the order within each part is kept


def _structures(request) -> list[str] | None:
    s = _param(request, "structures", "")
    return [x.strip() for x in str(s).split(",") if x.strip()] or None


class _LeasedStock(Strategy):
    """MONAI Label's stock order over the unlabeled images, with our leases: a case out with one annotator is not
    served to another while the lease runs, and asking again lets go of the case held (see ``_let_go``). With
    no case free the answer says why instead of serving a case someone else has open."""

    def __init__(self, description: str, store: Callable[[], Store], lease_minutes: float = 30.0):
        super().__init__(description)
        self._store = store
        self.lease_minutes = lease_minutes

    def pick(self, images: list[str], request, datastore: Datastore) -> list[str]:
        """``images`` (the free unlabeled ones) in the order to try: by id, MONAI Label's `first` order."""
        return sorted(images)

    def __call__(self, request, datastore: Datastore):
        store = self._store()
        client = str(request.get("client_id") or "anonymous")
        ttl = _lease_seconds(request, self.lease_minutes)
        images = datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels"))
        if not images:
            n = len(datastore.list_images())
            return {"reason": f"nothing to serve: none of the {n} image(s) is a readable case without a final label"
                    if n else "nothing to serve: the datastore holds no images"}
        skipped = _let_go(store, client, ttl)
        busy = store.leased_by_others(client)
        order = self.pick([i for i in images if i not in busy], request, datastore)
        for cid in _skipped_last(order, skipped):
            if store.acquire_lease(cid, client, ttl):
                return {"id": cid, "client_id": client}
        return {"reason": f"nothing to serve: all {len(images)} unlabeled case(s) are out with other annotators"}


class FirstStrategy(_LeasedStock):
    """MONAI Label's `first` (unlabeled images by id), with leases."""

    def __init__(self, store: Callable[[], Store], lease_minutes: float = 30.0):
        super().__init__("First: the first unlabeled case by id that no other annotator has open", store, lease_minutes)


class RandomStrategy(_LeasedStock):
    """MONAI Label's `random` (a case is likelier the longer since it was last served), with leases. The weights
    are the seconds since each case was last served plus one: MONAI Label 0.8.5's own are the seconds alone,
    so when every candidate was served within the current second they are all 0 and it crashes (several
    annotators clicking Next Sample at once)."""

    def __init__(self, store: Callable[[], Store], lease_minutes: float = 30.0):
        super().__init__("Random: a random unlabeled case that no other annotator has open", store, lease_minutes)

    def pick(self, images, request, datastore):
        name = str(request.get("strategy") or "random")
        now = int(time.time())

        def key(image):  # a weighted draw without replacement (Efraimidis and Spirakis): log(u) / weight, largest first
            w = now - (datastore.get_image_info(image).get("strategy", {}).get(name, {}).get("ts", 0) or 0) + 1
            return math.log(1.0 - random.random()) / max(w, 1)

        return sorted(images, key=key, reverse=True)


class QualityStrategy(Strategy):
    """Serves the unlabeled case whose pseudo-label most needs a human; never the same case to two
    annotators while it is out; never a case whose predicted quality is already good enough. An annotator who
    asks again without saving skips the case they hold (see ``_let_go``)."""

    def __init__(self, store: Callable[[], Store], threshold: float, lease_minutes: float = 30.0,
                 prior_mae: float = 0.1):
        super().__init__("Quality: the case whose pseudo-label most needs a human (predicted Dice, lowest first)")
        self._store = store
        self.threshold = threshold
        self.lease_minutes = lease_minutes
        self.prior_mae = prior_mae

    def info(self):
        return {
            "description": self.description,
            "config": {
                "aggregate": list(METHODS),
                "structures": "",
                "good_enough": round(self.threshold, 3),
                "label_tag": "original",
            },
        }

    def candidates(self, request, datastore: Datastore):
        store = self._store()
        tag = str(_param(request, "label_tag", "original"))
        unlabeled = set(datastore.get_unlabeled_images())
        records = calibrated_records(store, tag, self.prior_mae, with_tag(datastore, unlabeled, tag))
        threshold = _number(request, "good_enough", self.threshold, lo=0.0, hi=1.0)
        method = str(_param(request, "aggregate", "min"))
        if method not in METHODS:
            raise ValueError(f"option aggregate must be one of {', '.join(METHODS)}, got {method!r}")
        subset = _structures(request)
        unknown = unknown_structures(records, subset)
        if unknown:
            known = sorted({str(x.get("name") or x.get("id")) for r in records for x in structures_of(r)})
            raise ValueError(f"option structures: no scored case has {', '.join(map(repr, unknown))}; the structures "
                             f"are: {', '.join(known)} (names or ids, comma-separated)")
        ranked = rank_cases(records, method, subset, threshold)
        scored = {r["case"] for r in records}
        return store, ranked, unlabeled, scored, threshold

    def __call__(self, request, datastore: Datastore):
        client = str(request.get("client_id") or "anonymous")
        store, ranked, unlabeled, scored, threshold = self.candidates(request, datastore)
        ttl = _lease_seconds(request, self.lease_minutes)
        skipped = _let_go(store, client, ttl)
        busy = store.leased_by_others(client)
        tag = str(_param(request, "label_tag", "original"))
        # Scored cases that need a human, worst first; then cases without a score (just added, or a label that
        # cannot be read: unknown or unusable, so a person must look); the ones this annotator skipped last.
        order = [(rc.case_id, rc) for rc in ranked] + [(cid, None) for cid in sorted(unlabeled - scored)]
        for cid, rc in _skipped_last(order, skipped, key=lambda c: c[0]):
            if cid in busy or not store.acquire_lease(cid, client, ttl):
                continue
            if rc is not None:
                return {"id": cid, "predicted_dice": round(rc.score, 4), "worst_structures": rc.worst,
                        "client_id": client}
            has_label = bool(with_tag(datastore, [cid], tag))
            q = store.get_quality(cid, tag) if has_label else None
            why = (f"label could not be scored: {q['error']}" if q and q["error"] else "not scored yet"
                   if has_label else f"no {tag} label to score")
            return {"id": cid, "predicted_dice": None, "reason": why, "client_id": client}
        # Why nothing is left, counted over the unlabeled scored cases.
        method, subset = str(_param(request, "aggregate", "min")), _structures(request)
        out_now = busy & unlabeled
        n_good = n_without = 0
        for r in calibrated_records(store, tag, self.prior_mae, scored):
            if r["case"] not in unlabeled or r["case"] in out_now:
                continue
            a = aggregate(r, method, subset)
            n_without += a is None
            n_good += a is not None and a >= threshold
        why = [f"{n_good} unlabeled case(s) are good enough (>= {threshold:.2f})", f"{len(out_now)} are out with other annotators"]
        if subset:
            why.append(f"{n_without} have none of the structures {', '.join(subset)}")
        return {"reason": "nothing to serve: " + ", ".join(why)}


class BudgetStrategy(Strategy):
    """Serves the cases of the budget plan in order and reports the budget used and left with each answer.

    The plan is made when a project lead sets the budget (``labelsentinel plan --server URL --cases N`` or
    ``--minutes M``, stored in the record store, no restart needed) from the scores at that moment. The budget
    used is the planned cases corrected since the plan (a final label saved, whoever saved it and through
    whichever strategy) plus the planned cases out with an annotator *who was served them by this strategy*
    (its lease runs): cases out with annotators under other strategies are their work, not the budget's, and
    are not served here while they are out. A case an annotator let go without saving (asked for another, or
    the lease expired) goes back to the plan, for anyone; a planned case whose image, or (not corrected yet) whose
    pseudo-label, was deleted is skipped and not counted. Serving never writes the plan, so it cannot undo a lead's new budget set at the same moment.
    """

    name = "budget"

    def __init__(self, store: Callable[[], Store], threshold: float, lease_minutes: float = 30.0):
        super().__init__("Budget: the planned corrections that buy the most dataset Dice, within the lead's budget")
        self._store = store
        self.threshold = threshold
        self.lease_minutes = lease_minutes

    @staticmethod
    def label_tags(store: Store, datastore: Datastore) -> set[str]:
        """The pseudo-label tags a plan can be made from: those the datastore has (final labels are not scored)."""
        pairs = datastore_pairs(datastore) if hasattr(datastore, "get_labels_by_image_id") else None
        if pairs is None:  # not listable now: the tags of the scores
            return {r["tag"] for r in store.quality(include_errors=True)} - {FINAL}
        return {t for _, t in pairs} - {FINAL}

    @staticmethod
    def make_plan(store: Store, datastore: Datastore, budget_cases=None, budget_minutes=None, cost_model=None,
                  threshold=None, tag="original", prior_mae: float = 0.1) -> dict:
        """Plan from the scores of the ``tag`` labels, calibrated with ``prior_mae`` (the app's, as the
        strategies). ValueError (nothing written: the current plan stays) for an unknown tag or a bad budget."""
        if not isinstance(tag, str) or not tag:
            raise ValueError(f"tag must be the name of a label tag, got {tag!r}")
        tags = BudgetStrategy.label_tags(store, datastore)
        if tag not in tags:
            raise ValueError(f"unknown label tag {tag!r}: the datastore has "
                             + (", ".join(sorted(tags)) if tags else "no pseudo-labels") + "; the current plan is kept")
        unlabeled = set(datastore.get_unlabeled_images())
        records = calibrated_records(store, tag, prior_mae, with_tag(datastore, unlabeled, tag))
        plan = plan_budget(records, budget_cases=budget_cases, budget_minutes=budget_minutes,
                           cost_model=CostModel.from_dict(cost_model), threshold=threshold)
        d = plan.to_dict()
        d.update(ts=time.time(), cost_model=cost_model or {}, threshold=threshold, tag=tag, prior_mae=prior_mae)
        store.set_setting("budget_plan", d)
        return d

    @staticmethod
    def _gone(datastore: Datastore, plan: dict, images: set, labeled: set) -> set[str]:
        """Planned cases that can no longer be corrected as planned: the image was deleted, or (not corrected
        yet) the pseudo-label the plan chose it for was deleted."""
        pending = [c["case_id"] for c in plan["cases"] if c["case_id"] in images and c["case_id"] not in labeled]
        still = with_tag(datastore, pending, plan.get("tag") or "original")
        return {c["case_id"] for c in plan["cases"] if c["case_id"] not in images} | (set(pending) - still)

    @staticmethod
    def _account(store: Store, datastore: Datastore, plan: dict) -> dict:
        images = set(datastore.list_images())
        labeled = set(datastore.get_labeled_images())
        gone = BudgetStrategy._gone(datastore, plan, images, labeled)
        leases = store.leases()
        acc = {"corrected": [], "out": [], "out_elsewhere": [], "gone": [], "open": []}
        for c in plan["cases"]:
            cid = c["case_id"]
            if cid in gone:
                acc["gone"].append(c)
            elif cid in labeled:
                acc["corrected"].append(c)
            elif cid in leases and leases[cid].get("strategy") == BudgetStrategy.name:
                acc["out"].append(c)
            elif cid in leases:
                acc["out_elsewhere"].append(c)
            else:
                acc["open"].append(c)
        return acc

    @staticmethod
    def status(store: Store, datastore: Datastore) -> dict:
        plan = store.get_setting("budget_plan")
        if not plan:
            return {"reason": "no budget set: a project lead sets one with `labelsentinel plan --server URL --cases N`"}
        acc = BudgetStrategy._account(store, datastore, plan)
        used = acc["corrected"] + acc["out"]
        used_minutes = round(sum(c["minutes"] for c in used), 3)
        out = {
            "budget_cases": plan["budget_cases"],
            "budget_minutes": plan["budget_minutes"],
            "used_cases": len(used),
            "used_minutes": used_minutes,
            "planned_cases": len(plan["cases"]),
            "corrected_cases": len(acc["corrected"]),  # final label saved since the plan
            "out_cases": len(acc["out"]),  # out with annotators served by the budget strategy
            "out_elsewhere": [c["case_id"] for c in acc["out_elsewhere"]],  # planned, out under other strategies
            # planned, image (or, not corrected yet, the pseudo-label it was planned for) deleted since: skipped
            "deleted_cases": [c["case_id"] for c in acc["gone"]],
        }
        out["left_cases"] = None if plan["budget_cases"] is None else plan["budget_cases"] - len(used)
        out["left_minutes"] = None if plan["budget_minutes"] is None else round(plan["budget_minutes"] - used_minutes, 3)
        return out

    def info(self):
        # The budget itself is the lead's (`labelsentinel plan`); an annotator's panel only sets the lease.
        return {"description": self.description, "config": {"lease_minutes": float(self.lease_minutes)}}

    def __call__(self, request, datastore: Datastore):
        store = self._store()
        client = str(request.get("client_id") or "anonymous")
        ttl = _lease_seconds(request, self.lease_minutes)
        plan = store.get_setting("budget_plan")
        if not plan:
            return self.status(store, datastore)
        images = set(datastore.list_images())
        labeled = set(datastore.get_labeled_images())
        gone = self._gone(datastore, plan, images, labeled)
        skipped = _let_go(store, client, ttl)
        busy = store.leased_by_others(client)
        for c in _skipped_last(plan["cases"], skipped, key=lambda c: c["case_id"]):
            cid = c["case_id"]
            if cid in gone or cid in labeled or cid in busy:
                continue
            if store.acquire_lease(cid, client, ttl, strategy=self.name):
                return {"id": cid, "expected_gain": c["gain"], "minutes": c["minutes"], **self.status(store, datastore)}
        st = self.status(store, datastore)
        if not plan["cases"]:
            if plan.get("candidates", 0) == 0:
                st["reason"] = ("nothing planned: no unlabeled case was below the good-enough threshold when the "
                                "budget was set")
            else:
                b = (f"{plan['budget_cases']} case(s)" if plan["budget_cases"] is not None else "") + \
                    (" and " if plan["budget_cases"] is not None and plan["budget_minutes"] is not None else "") + \
                    (f"{plan['budget_minutes']:g} minute(s)" if plan["budget_minutes"] is not None else "")
                st["reason"] = (f"nothing planned: the budget of {b} buys none of the {plan['candidates']} case(s) "
                                "that need a human (a larger budget is needed)")
            return st
        used = (f"{st['used_cases']} of {len(plan['cases'])} planned case(s) used"
                + (f", {st['used_minutes']} of {plan['budget_minutes']} minutes" if plan["budget_minutes"] is not None else ""))
        gone = (f"; {len(st['deleted_cases'])} planned case(s) deleted (image or pseudo-label) since the plan: "
                f"{', '.join(st['deleted_cases'])}" if st["deleted_cases"] else "")
        waiting = len(plan["cases"]) - st["used_cases"] - len(st["deleted_cases"])
        if waiting > 0:  # planned cases not used yet, but out with other annotators (under other strategies too)
            st["reason"] = (f"nothing to serve now: the {waiting} planned case(s) not used yet are out with other "
                            f"annotators; budget {used}{gone}")
        elif len(plan["cases"]) == plan.get("candidates") and not st["deleted_cases"] and (
                (st["left_cases"] or 0) > 0 or (st["left_minutes"] or 0) > 0):
            # every case that needed a human was planned and used: the budget is not what ran out
            st["reason"] = (f"nothing left to correct: all {len(plan['cases'])} case(s) below the good-enough threshold "
                            f"when the budget was set are used ({used}); the other unlabeled cases were good enough. "
                            "Set the budget again (`labelsentinel plan`) to plan from the latest scores")
        elif st["deleted_cases"] and (plan["budget_cases"] is None or st["left_cases"] > 0):
            # the plan ran out, not the budget: what was deleted was never used
            st["reason"] = (f"nothing left in the plan: {used}{gone}; set the budget again (`labelsentinel plan`) "
                            "to plan what is left of it")
        else:
            st["reason"] = f"budget spent: {used}{gone}"
        return st


class ReviewStrategy(Strategy):
    """Serves the final label most suspected of being wrong by the last training run's signals (the loss score
    by default, the stronger of the two in every benchmark condition, or variance of gradients); a final label
    saved again after that run counts as reviewed."""

    def __init__(self, store: Callable[[], Store], lease_minutes: float = 30.0, min_score: float = 2.0):
        super().__init__("Review: the final labels the last training flags as most likely wrong (loss or VoG)")
        self._store = store
        self.lease_minutes = lease_minutes
        self.min_score = min_score

    def info(self):
        return {"description": self.description, "config": {"signal": ["loss", "vog"], "min_score": self.min_score}}

    def __call__(self, request, datastore: Datastore):
        store = self._store()
        client = str(request.get("client_id") or "anonymous")
        by = str(_param(request, "signal", "loss"))
        if by not in ("loss", "vog"):
            raise ValueError(f"option signal must be loss or vog, got {by!r}")
        ttl = _lease_seconds(request, self.lease_minutes)
        min_score = _number(request, "min_score", self.min_score)
        signals = store.signals()
        if not signals:
            return {"reason": "no label-error signals yet: they are written by a training run on final labels"}
        images = set(datastore.list_images())
        finals = {}
        for cid in signals:
            labels = datastore.get_labels_by_image_id(cid) if cid in images else {}
            finals[cid] = datastore.get_label_uri(labels[FINAL], FINAL) if FINAL in labels else None
        reviewed, gone = review_state(signals, finals)
        skipped = _let_go(store, client, ttl)
        busy = store.leased_by_others(client)
        ranked = suspects(signals, by, min_score, exclude=reviewed | gone | busy)
        for cid, score in _skipped_last(ranked, skipped, key=lambda r: r[0]):
            if store.acquire_lease(cid, client, ttl):
                worst = sorted(signals[cid]["structures"], key=lambda s: -s[f"{by}_z"])[:3]
                return {"id": cid, "signal": by, "suspect_score": round(score, 3), "client_id": client,
                        "suspect_structures": [{"id": s["id"], "name": s["name"], "z": s[f"{by}_z"]} for s in worst]}
        out_now = sorted(c for c, _ in suspects(signals, by, min_score, exclude=reviewed | gone) if c in busy)
        counts = f"{len(reviewed)} reviewed since the signals" + (f", {len(gone)} deleted" if gone else "")
        if out_now:
            return {"reason": f"nothing to review now: the {len(out_now)} unreviewed final label(s) with a {by} score "
                              f">= {min_score:g} are out with other annotators ({', '.join(out_now)}); {counts}"}
        return {"reason": f"nothing to review: no unreviewed final label has a {by} score >= {min_score:g} ({counts})"}
