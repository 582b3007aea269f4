"""REST routes of Label Sentinel on the MONAI Label server, for the project lead's CLI (`labelsentinel
status|plan|report --server URL`): quality records, budget plan and status.

MONAI Label has no hook for app routes, so they are added to its FastAPI application when the app has
finished starting (only the server process calls on_init_complete; background tasks never do).
"""

from __future__ import annotations

import logging
import math
import os
import sqlite3
import threading
import time

from fastapi import APIRouter, Body, HTTPException, Request

logger = logging.getLogger(__name__)


def final_label_paths(datastore, cases) -> dict:
    """case -> path of its final label now (None: no final label, or the image is gone)."""
    images = set(datastore.list_images())
    out = {}
    for cid in cases:
        labels = datastore.get_labels_by_image_id(cid) if cid in images else {}
        out[cid] = datastore.get_label_uri(labels["final"], "final") if "final" in labels else None
    return out


def training_payload(store, datastore=None) -> dict:
    """The last training run (which pseudo-labels it used and why, what it refurbished) and the final labels the
    label-error signals flag, most suspect first (loss z-score >= 2, the review strategy's default).

    ``suspects`` are the flagged final labels not reviewed since (as in the review strategy); those saved again
    since are listed under ``reviewed_suspects``, those deleted since under ``deleted_suspects``. Signals are written only
    by a run with at least 2 checkpoints, so they may come from an earlier run than the last: ``signals_run`` is
    the run they come from (its ``run_id`` and time ``ts``), and ``suspects_from_last_run`` says whether that is
    the last run."""
    from labelsentinel.strategies.label_errors import review_state, suspects

    runs = store.get_setting("training_runs", []) or []
    last = runs[-1] if runs else None
    signals = store.signals()
    flagged = suspects(signals, "loss", 2.0) if signals else []
    reviewed: set = set()
    gone: set = set()
    if flagged and datastore is not None:
        try:
            reviewed, gone = review_state({c: signals[c] for c, _ in flagged},
                                          final_label_paths(datastore, [c for c, _ in flagged]))
        except Exception as e:  # the datastore cannot be read now: shown as flagged, not hidden
            logger.error(f"suspect final labels: review state unknown ({type(e).__name__}: {e})")

    def row(c, z):
        return {"case": c, "loss_z": round(z, 2), "vog_z": round(float(signals[c].get("vog", 0.0)), 2),
                "run_id": signals[c].get("run_id"), "ts": signals[c].get("ts")}

    by_run: dict = {}
    for d in signals.values():
        r = by_run.setdefault(d.get("run_id"), {"run_id": d.get("run_id"), "ts": d.get("ts"), "final_labels": 0})
        r["ts"] = max(r["ts"] or 0, d.get("ts") or 0)
        r["final_labels"] += 1
    signal_runs = sorted(by_run.values(), key=lambda r: r["ts"] or 0)
    latest = signal_runs[-1] if signal_runs else None
    return {"runs": len(runs), "last": last,
            "suspects": [row(c, z) for c, z in flagged if c not in reviewed | gone],
            "reviewed_suspects": [row(c, z) for c, z in flagged if c in reviewed],
            "deleted_suspects": [row(c, z) for c, z in flagged if c in gone],
            "signals_run": latest,
            "signals_runs": signal_runs,
            "suspects_from_last_run": bool(latest and last and str(latest["run_id"]) == str(last.get("run_id")))}


def unlisted_runs(app_instance) -> list[dict]:
    """Training runs still working on a model that MONAI Label does not list (their process outlived a crashed
    server): ``model``, ``run_id``, ``pid``, ``started``. Empty while MONAI Label lists a training task."""
    try:
        if task_busy("train"):
            return []
        out = []
        for name, task in (getattr(app_instance, "_trainers", None) or {}).items():
            if hasattr(task, "live_runs"):
                out.extend({"model": name, **r} for r in task.live_runs() if r.get("pid") != os.getpid())
        return out
    except Exception as e:  # a status answer never fails on it
        logger.error(f"training runs in progress not known: {e}")
        return []


# One plan replacement at a time in this server (PUT /labelsentinel/budget): what a PUT replaced is read and
# written in one step. Only the PUT writes the plan.
_BUDGET_LOCK = threading.Lock()


def same_plan(plan: dict | None, expected_ts) -> bool:
    """Whether ``plan`` is the one a caller expects: ``expected_ts`` its ``ts`` (to the microsecond, so a ts
    printed with 6 decimals matches), or None for no plan."""
    if expected_ts is None or not plan:
        return expected_ts is None and not plan
    ts = plan.get("ts")
    return isinstance(ts, (int, float)) and abs(float(ts) - float(expected_ts)) <= 1e-6


def describe_plan(plan: dict) -> str:
    ts = plan.get("ts")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if isinstance(ts, (int, float)) else "?"
    budget = " and ".join(([f"{plan['budget_cases']} cases"] if plan.get("budget_cases") is not None else [])
                          + ([f"{plan['budget_minutes']:g} minutes"] if plan.get("budget_minutes") is not None else []))
    plan_id = f"{ts:.6f}" if isinstance(ts, (int, float)) else repr(ts)
    return f"the current plan is {plan_id} (set {when} server time, budget {budget or 'none'})"


def register_routes(app_instance) -> None:
    try:
        from monailabel.app import app as fastapi_app
    except Exception as e:  # not running inside the server
        logger.info(f"no REST routes for Label Sentinel: {e}")
        return
    if any(getattr(r, "path", "").startswith("/labelsentinel/") for r in fastapi_app.router.routes):
        return
    router = APIRouter(prefix="/labelsentinel", tags=["Label Sentinel"])

    def quality_payload(tag: str = "original") -> dict:
        store = app_instance.store()
        ds = app_instance.datastore()
        labeled = set(ds.get_labeled_images())
        # Records of images and labels deleted since they were scored are not shown (the next scoring removes them).
        from labelsentinel.strategies.monailabel_adapters import datastore_pairs, live_corrections

        present = datastore_pairs(ds)
        rows = [r for r in store.quality(tag, include_errors=True)
                if present is None or (r["image_id"], r["tag"]) in present]
        # Calibrated as the strategies and the budget planner see them (raw value kept as raw_predicted_dice),
        # so the lead's status, report and plan agree with what annotators are served.
        from labelsentinel.strategies.corrections import calibrate_records, load_calibration

        prior = app_instance.prior_mae
        cal = iter(calibrate_records([r["record"] for r in rows if r["record"]],
                                     lambda v: load_calibration(store, v, prior) if v else None))
        rows = [{**r, "record": next(cal)} if r["record"] else r for r in rows]
        # Real (predicted, true) Dice pairs from annotators' corrections, and the calibration of the estimator
        # now in use that they give.
        from labelsentinel.models.estimator import weights_version

        try:
            version = weights_version(app_instance._active_estimator())
        except Exception:  # no weights file: nothing scored either
            version = None
        stored = store.corrections()
        pairs = live_corrections(store, ds, stored)  # the pairs whose final label is still there
        if len(pairs) < len(stored):  # a final label deleted since the last scoring: its pairs go
            from labelsentinel.strategies.corrections import prune_corrections
            from labelsentinel.strategies.monailabel_adapters import refit_calibration

            prune_corrections(store, {p["image_id"] for p in pairs})
            if version:
                refit_calibration(store, version, app_instance.prior_mae)
        calib = store.get_setting(f"calibration:{version}") if version else None
        corrections = {
            "estimator_version": version,
            "pairs": pairs,
            "cases": len({(p["image_id"], p["tag"]) for p in pairs}),
            "calibration": {k: calib.get(k) for k in ("n", "cases", "mae_before", "mae_after", "conformal_pairs", "applied")} if calib else None,
        }
        return {
            "good_enough": app_instance.threshold,
            "tag": tag,
            "images": ds.list_images(),
            "labeled": sorted(labeled),
            "unreadable_images": ds.unreadable_images() if hasattr(ds, "unreadable_images") else {},
            "unreadable_labels": ds.unreadable_labels() if hasattr(ds, "unreadable_labels") else {},
            "records": [{**r, "has_final": r["image_id"] in labeled} for r in rows],
            "leases": store.leases(),
            "corrections": corrections,
            "label_names": {str(k): v for k, v in app_instance.structure_names().items()},
            "training": {**training_payload(store, ds), "unlisted_runs": unlisted_runs(app_instance)},
        }

    @router.get("/quality")
    def quality(tag: str = "original"):
        return quality_payload(tag)

    @router.get("/budget")
    def budget():
        from labelsentinel.strategies.monailabel_adapters import BudgetStrategy

        store = app_instance.store()
        with _BUDGET_LOCK:  # the plan and its status, not the status of a plan set in between
            return {"plan": store.get_setting("budget_plan"),
                    "status": BudgetStrategy.status(store, app_instance.datastore())}

    @router.put("/budget")
    def set_budget(body: dict = Body(...)):
        """A new plan, replacing the current one in one step (under a lock: a PUT at the same moment replaces
        this one's plan, not the same one). The answer is the new plan, plus ``replaced_plan`` (the plan it
        replaced, with what it had used at that moment; null when none was set) and ``budget_status`` (the new
        plan's). ``expected_plan_ts`` (optional): the ``ts`` of the plan the caller means to replace (as ``GET
        /labelsentinel/budget`` shows it), or null for "no plan set"; when the current plan is another, HTTP 409
        and nothing changes. Without it, whatever plan is set is replaced, as before."""
        from labelsentinel.strategies.monailabel_adapters import BudgetStrategy

        check = "expected_plan_ts" in body
        expected = body.get("expected_plan_ts")
        if check and expected is not None and (isinstance(expected, bool) or not isinstance(expected, (int, float))
                                               or not math.isfinite(expected)):
            raise HTTPException(status_code=422, detail="expected_plan_ts must be the ts of the plan to replace (a "
                                f"number, as GET /labelsentinel/budget shows it) or null for no plan, got {expected!r}")
        store, ds = app_instance.store(), app_instance.datastore()
        with _BUDGET_LOCK:
            old = store.get_setting("budget_plan")
            if check and not same_plan(old, expected):
                raise HTTPException(status_code=409, detail=(
                    f"the budget plan was replaced since you read it: expected "
                    f"{'no plan' if expected is None else f'the plan {float(expected):.6f}'}, but "
                    f"{describe_plan(old) if old else 'no plan is set'}; nothing was changed. Read the current plan "
                    "(GET /labelsentinel/budget, or `labelsentinel plan --server URL`) and set the budget again"))
            replaced = None
            if old:
                try:
                    old_status = BudgetStrategy.status(store, ds)
                except Exception as e:  # the datastore cannot be listed now: the replacement goes on
                    old_status = {"error": f"{type(e).__name__}: {e}"}
                replaced = {"ts": old.get("ts"), "budget_cases": old.get("budget_cases"),
                            "budget_minutes": old.get("budget_minutes"), "planned_cases": len(old.get("cases") or []),
                            "tag": old.get("tag"), "status": old_status}
            try:
                plan = BudgetStrategy.make_plan(
                    store, ds, budget_cases=body.get("cases"),
                    budget_minutes=body.get("minutes"), cost_model=body.get("cost_model"),
                    threshold=body.get("good_enough", app_instance.threshold), tag=body.get("tag", "original"),
                    prior_mae=app_instance.prior_mae,  # as the strategies calibrate
                )
            except (ValueError, TypeError) as e:
                raise HTTPException(status_code=422, detail=str(e)) from e
            try:
                status = BudgetStrategy.status(store, ds)
            except Exception as e:
                status = {"error": f"{type(e).__name__}: {e}"}
        logger.info(f"budget set: {body} -> {len(plan['cases'])} planned case(s), plan {plan['ts']!r}, replacing "
                    f"{'plan ' + repr(replaced['ts']) if replaced else 'none'}")
        return {**plan, "replaced_plan": replaced, "budget_status": status}

    @router.get("/demographics")
    def demographics():
        """image id -> {"sex", "age"} (age in years): DICOM headers of a DICOMweb datastore (QIDO-RS), else a
        ``cases.csv`` (or the sample data's ``truth/cases.csv``) of the studies folder, else the image info."""
        return image_demographics(app_instance)

    fastapi_app.include_router(router)
    register_delete_routes(fastapi_app, app_instance)
    register_label_download_route(fastapi_app, app_instance)
    register_ohif_route(fastapi_app)
    register_activelearning_route(fastapi_app)
    register_train_route(fastapi_app)
    register_scoring_route(fastapi_app)
    logger.info("Label Sentinel REST routes: /labelsentinel/quality, /labelsentinel/budget, /labelsentinel/demographics")


def image_demographics(app_instance) -> dict:
    ds = app_instance.datastore()
    images = ds.list_images()
    out = {i: {"sex": "", "age": None} for i in images}
    client = getattr(ds, "_client", None)
    if client is not None and hasattr(client, "search_for_series"):
        from labelsentinel.dicom import DicomUnavailable, series_demographics

        try:
            found = series_demographics(client, set(images))  # the datastore's client: its credentials, its PACS
        except DicomUnavailable as e:  # the PACS is down or refuses the query: say so (not a bare 500)
            raise HTTPException(status_code=503, detail=f"demographics unavailable: {e}") from e
        for uid, d in found.items():
            out[uid] = {"sex": d["sex"], "age": d["age"]}
        return {"source": "dicom", "images": out}
    from labelsentinel.dicom import age_years, read_cases_csv

    rows = read_cases_csv(app_instance.studies) if not app_instance.studies.startswith("http") else {}
    source = "cases.csv" if rows else "image info"
    for i in images:
        r = rows.get(i)
        if r is None:
            info = ds.get_image_info(i) or {}
            r = {"sex": info.get("PatientSex") or info.get("sex") or "",
                 "age": info.get("PatientAge") or info.get("age")}
        out[i] = {"sex": str(r.get("sex") or "").upper()[:1], "age": age_years(r.get("age"))}
    return {"source": source, "images": out}


SERVER_COOKIE = "MONAILABEL_SERVER_URL"

# MONAI Label 0.8.5's OHIF panel (bundle of extensions/monai-label, ActiveLearning.tsx) binds the strategy
# drop-down to ``this.onChangeStrategy``, which it never defines: whatever an annotator picks, Next Sample asks
# for "random". Served patched: the drop-down sets the strategy, and it starts on the app's first strategy
# (``quality`` for this app) instead of "random". And when a strategy serves nothing (budget spent, every case
# good enough or out with others), the panel showed an empty Next Sample form whose OK reloaded the page on an
# undefined study; it now shows the answer's reason.
_OHIF_STRATEGY_PATCHES = (
    ("onChange: this.onChangeStrategy,", "onChange: evt => this.setState({ strategy: evt.target.value }),"),
    ("      strategy: 'random',\n      training: false,",
     "      strategy: props.info && props.info.data && props.info.data.strategies && "
     "Object.keys(props.info.data.strategies).length ? Object.keys(props.info.data.strategies)[0] : 'random',\n"
     "      training: false,"),
    ("      } else {\n        this.uiModelService.show({\n          content: NextSampleForm,",
     "      } else if (!response.data || !response.data.id) {\n"
     "        this.notification.show({\n"
     "          title: 'MONAI Label',\n"
     "          message: (response.data && response.data.reason) || 'Nothing to label: the strategy served no case',\n"
     "          type: 'warning',\n"
     "          duration: 15000\n"
     "        });\n"
     "      } else {\n        this.uiModelService.show({\n          content: NextSampleForm,"),
)
_patched_scripts: dict = {}


def patched_ohif_script(path: str) -> bytes | None:
    """The patched text of an OHIF script that needs it, else None (cached per file and modification time)."""
    import os

    try:
        key = (path, os.path.getmtime(path))
    except OSError:
        return None
    if key not in _patched_scripts:
        with open(path, "rb") as f:
            raw = f.read()
        out = None
        if b"this.onChangeStrategy" in raw and b"this.onChangeStrategy =" not in raw:
            text = raw.decode("utf-8")
            for a, b in _OHIF_STRATEGY_PATCHES:
                if a in text:
                    text = text.replace(a, b, 1)
                else:
                    logger.warning(f"OHIF strategy patch: {a[:40]!r} not found in {os.path.basename(path)}")
            out = text.encode("utf-8")
            logger.info(f"OHIF: serving {os.path.basename(path)} with the strategy drop-down fixed and empty answers shown with their reason")
        _patched_scripts[key] = out
    return _patched_scripts[key]


def register_ohif_route(fastapi_app) -> None:
    """Serve OHIF's files under sub-folders (``/ohif/assets/...``): MONAI Label 0.8.5 joins the path with
    ``os.pathsep`` (':') instead of '/', so every such file fell back to index.html. Our route is put in front
    of MONAI Label's; anything that is not a file under the OHIF folder still gets index.html (OHIF's own
    client-side routes), as before.

    OHIF's MONAI Label panel reads the server address from the cookie ``MONAILABEL_SERVER_URL`` and, without
    one, guesses ``http://HOST:8000/``: with the page we also set that cookie to this server's own address
    (unless the annotator already chose one; the guessed :8000 default does not count as a choice), so the
    panel connects to the server that serves it, whatever its port."""
    import os
    from urllib.parse import quote, unquote


    from fastapi import Depends
    from fastapi.responses import FileResponse, Response
    from monailabel.config import settings
    from monailabel.endpoints.user.auth import RBAC, User
    from monailabel.utils.others.generic import get_mime_type

    import monailabel.endpoints as ep

    if any(getattr(r, "name", "") == "labelsentinel_ohif" for r in fastapi_app.router.routes):
        return
    ohif_dir = os.path.realpath(os.path.join(os.path.dirname(ep.__file__), "static", "ohif"))

    async def ohif_file(request: Request, path: str = "",
                        user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):
        index = os.path.join(ohif_dir, "index.html")
        file = os.path.realpath(os.path.join(ohif_dir, path)) if path else index
        if not (file.startswith(ohif_dir + os.sep) and os.path.isfile(file)):
            file = index
        if not os.path.isfile(file):
            raise HTTPException(status_code=404, detail="OHIF is not installed in this MONAI Label")
        patched = patched_ohif_script(file) if file.endswith(".js") else None
        if patched is not None:
            return Response(patched, media_type="application/javascript")
        response = FileResponse(file, media_type=get_mime_type(file))
        if file == index:
            here = str(request.base_url)
            chosen = unquote(request.cookies.get(SERVER_COOKIE) or "")  # JavaScript escape()d it
            guessed = f"http://{request.url.hostname}:8000/"
            if not chosen or chosen in ("undefined", "null") or (chosen == guessed and here != guessed):
                # JavaScript's unescape() reads it back; Path=/ohif is where the panel's own cookie lives.
                response.headers.append("set-cookie", f"{SERVER_COOKIE}={quote(here, safe='')}; Path=/ohif; SameSite=Lax")
        return response

    # first in the list: it matches only /ohif/...
    _add_route_first(fastapi_app, "/ohif/{path:path}", ohif_file, "labelsentinel_ohif", ["GET"])


def forget_deleted(app_instance, image_id: str, tag: str | None) -> dict:
    """After MONAI Label deleted an image (``tag`` None) or one of its labels: its quality records, and with a
    final label its correction pairs (the calibration is refitted from the others), go at once; the case's lease
    ends with the image. The next scoring would remove them too (a file deleted outside the server)."""
    from labelsentinel.models.estimator import weights_version
    from labelsentinel.strategies.monailabel_adapters import FINAL, refit_calibration

    store = app_instance.store()
    out = {"quality_removed": 0, "corrections_removed": 0}
    if tag != FINAL:
        out["quality_removed"] = store.remove_quality(image_id, tag)
    if tag in (None, FINAL):
        out["corrections_removed"] = store.remove_corrections(image_id)
        if tag is None:
            store.release_lease(image_id)
        if out["corrections_removed"]:
            try:
                refit_calibration(store, weights_version(app_instance._active_estimator()), app_instance.prior_mae)
            except Exception as e:  # the next scoring refits it
                logger.error(f"recalibration after deleting {image_id}/{tag or 'image'} failed: {e}")
    logger.info(f"deleted {image_id}{'/' + tag if tag else ''}: {out}")
    return out


def register_delete_routes(fastapi_app, app_instance) -> None:
    """``DELETE /datastore/image`` (and the older ``DELETE /datastore/?id=``) and ``DELETE /datastore/label`` as
    MONAI Label answers them, and then what Label Sentinel kept about the deleted image or label goes too (see
    ``forget_deleted``)."""
    from fastapi import Depends
    from monailabel.config import settings
    from monailabel.endpoints.datastore import remove_image, remove_label
    from monailabel.endpoints.user.auth import RBAC, User

    if any(getattr(r, "name", "") == "labelsentinel_remove_label" for r in fastapi_app.router.routes):
        return

    def delete_image(id: str, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))):
        res = remove_image(id, user.username)
        try:
            forget_deleted(app_instance, id, None)
        except Exception as e:  # deleted; the next scoring and the readers leave its records out
            logger.error(f"records of deleted image {id} not removed now: {e}")
        return res

    def delete_label(id: str, tag: str, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))):
        res = remove_label(id, tag, user.username)
        try:
            forget_deleted(app_instance, id, tag)
        except Exception as e:
            logger.error(f"records of deleted label {id}/{tag} not removed now: {e}")
        return res

    _add_route_first(fastapi_app, "/datastore/image", delete_image, "labelsentinel_remove_image", ["DELETE"])
    # MONAI Label's older (deprecated) route for the same, still used by older clients
    _add_route_first(fastapi_app, "/datastore/", delete_image, "labelsentinel_remove_image_old", ["DELETE"])
    _add_route_first(fastapi_app, "/datastore/label", delete_label, "labelsentinel_remove_label", ["DELETE"])


def register_label_download_route(fastapi_app, app_instance) -> None:
    """``GET /datastore/label`` as MONAI Label answers it, but a label file that cannot be read (truncated,
    wrong values: listed under ``unreadable_labels`` in ``/info/``) answers HTTP 422 with the reason instead of
    being sent as it is (Slicer then failed to load a broken file without saying why)."""
    from fastapi import Depends
    from monailabel.config import settings
    from monailabel.endpoints.datastore import download_label
    from monailabel.endpoints.user.auth import RBAC, User

    if any(getattr(r, "name", "") == "labelsentinel_download_label" for r in fastapi_app.router.routes):
        return

    def get_label(label: str, tag: str, user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):
        check = getattr(app_instance.datastore(), "label_error", None)
        err = check(label, tag) if callable(check) else None
        if err:
            raise HTTPException(status_code=422, detail=(
                f"the {tag} label of {label} cannot be read, so it is not sent: {err}. It is listed under "
                f"unreadable_labels in /info/ and its case is served again; save a new {tag} label for it"))
        return download_label(label, tag)

    _add_route_first(fastapi_app, "/datastore/label", get_label, "labelsentinel_download_label", ["GET"])


def register_activelearning_route(fastapi_app) -> None:
    """``POST /activelearning/{strategy}`` as MONAI Label answers it, but a request without a ``client_id``
    (OHIF's MONAI Label panel never sends one) gets ``anonymous@<client address>``: annotators on different
    machines are told apart, so the quality and budget strategies do not serve them the same case while it is
    out. Slicer and scripts that send their own ``client_id`` are unchanged."""
    from fastapi import Depends
    from monailabel.config import settings
    from monailabel.endpoints.activelearning import sample
    from monailabel.endpoints.user.auth import RBAC, User

    if any(getattr(r, "name", "") == "labelsentinel_activelearning" for r in fastapi_app.router.routes):
        return

    async def next_sample(strategy: str, request: Request, params: dict | None = Body(None),
                          user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))):
        params = dict(params or {})
        if not params.get("client_id"):
            host = request.client.host if request.client else "unknown"
            params["client_id"] = f"anonymous@{host}"
        from monailabel.interfaces.utils.app import app_instance

        known = getattr(app_instance(), "_strategies", None) or {}
        if known and strategy not in known:
            raise HTTPException(status_code=404, detail=f"no strategy {strategy!r}; this server has: {', '.join(known)}")
        try:
            return sample(strategy, params, user.username)
        except ValueError as e:  # a bad option value: say which, instead of a bare 500
            raise HTTPException(status_code=422, detail=str(e)) from e
        except sqlite3.OperationalError as e:  # another process holds the record store's write lock
            if "locked" not in str(e):
                raise
            from labelsentinel.store import store_timeout

            path = getattr(getattr(app_instance(), "_store", None), "path", None) or "sentinel.db"
            raise HTTPException(status_code=503, detail=(
                f"no case was served: Label Sentinel's record store {path} stayed locked by another process for "
                f"{store_timeout():g} s (a sqlite3 shell or script with a transaction open?); nothing was changed. "
                "Close it and ask again")) from e

    _add_route_first(fastapi_app, "/activelearning/{strategy}", next_sample, "labelsentinel_activelearning", ["POST"])


def register_train_route(fastapi_app) -> None:
    """``POST /train/{model}`` as MONAI Label answers it, but the options are checked before a run is queued: a
    bad value (``pseudo_labels=bogus``, ``max_epochs=0``, ``lr=-1``) answers HTTP 422 naming every bad option,
    an unknown model 404, and a synchronous run that stops on bad input (no usable final labels) 422 with the
    reason, where MONAI Label answers a bare 500 or queues a run that fails later.

    One run at a time, also for simultaneous requests: MONAI Label's "already running" check looks only at the
    training processes already started, and a queued run gets its process a moment later in another thread,
    so requests arriving together were all queued and ran one after another. Here the check (a training
    process, or a run queued and not started yet) and the queuing happen under one lock; every request but
    the first answers HTTP 429 as MONAI Label answers a second one. ``enqueue=true`` still queues behind."""
    from fastapi import Depends
    from monailabel.config import settings
    from monailabel.endpoints.train import run_model
    from monailabel.endpoints.user.auth import RBAC, User

    if any(getattr(r, "name", "") == "labelsentinel_train" for r in fastapi_app.router.routes):
        return
    lock = threading.Lock()

    def train(model: str, params: dict | None = Body(None), run_sync: bool = False, enqueue: bool = False,
              user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))):
        from monailabel.interfaces.utils.app import app_instance

        trainers = getattr(app_instance(), "_trainers", None) or {}
        if trainers and model not in trainers:
            raise HTTPException(status_code=404, detail=f"no trainer {model!r}; this server has: {', '.join(trainers)}")
        task = trainers.get(model)
        if task is not None and hasattr(task, "check_options"):
            try:
                task.check_options(dict(params or {}))
            except ValueError as e:
                raise HTTPException(status_code=422, detail=str(e)) from e
        # a run MONAI Label does not list (its server crashed and restarted) still works on the model: not a second
        orphans = [] if task_busy("train") else (task.live_runs() if hasattr(task, "live_runs") else [])
        if orphans:
            r = orphans[0]
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["started"])) if r.get("started") else "?"
            if r.get("pid") == os.getpid():
                raise HTTPException(status_code=429, detail=f"a synchronous training run of {model} (run "
                                    f"{r.get('run_id')}, since {since}) is under way in this server")
            raise HTTPException(status_code=429, detail=(
                f"a training run of {model} is still running in process {r['pid']} (run {r.get('run_id')}, since "
                f"{since}), started before this server restarted, so MONAI Label does not list it; a second run would "
                f"train at the same time on the same model. Wait for it to finish (it publishes its model as usual) "
                f"or stop it (kill {r['pid']}), then train again"))
        try:
            if not enqueue:
                with lock:
                    if task_busy("train"):
                        raise HTTPException(status_code=429, detail="++++++++++ Train Task is Already Running")
                    if not run_sync:  # queued while the lock is held: the next request sees it
                        return run_model(model, params, run_sync, enqueue)
            return run_model(model, params, run_sync, enqueue)
        except ValueError as e:  # a synchronous run refused its input
            raise HTTPException(status_code=422, detail=str(e)) from e

    _add_route_first(fastapi_app, "/train/{model}", train, "labelsentinel_train", ["POST"])


def task_busy(kind: str, listed: list[dict] | None = None) -> bool:
    """A MONAI Label background task of ``kind`` (train, scoring) runs, or is queued and not started yet (its
    process exists only a moment after it is queued: MONAI Label's own check looks at processes alone)."""
    from monailabel.utils.async_tasks.utils import processes, tasks

    listed = tasks(kind) if listed is None else listed
    return bool(processes(kind)) or any(t.get("status") in ("SUBMITTED", "RUNNING") for t in listed)


_SCORING_LOCK = threading.Lock()


def queue_scoring(method: str, params: dict | None = None) -> dict:
    """A scoring run of ``method`` for whoever asks (``POST /scoring/{method}``, MONAI Label's automatic scoring
    after a next sample or a training): a run of it already waiting is joined (its task is answered), a run under
    way gets one run queued behind it, else a run starts. One lock for every caller, so simultaneous requests
    never start or queue two. A queued run reads the datastore when it starts: it covers every request made
    while it waits. MONAI Label answered 429 while a run was under way and the request was dropped."""
    from monailabel.utils.async_tasks.task import AsyncTask
    from monailabel.utils.async_tasks.utils import tasks

    with _SCORING_LOCK:
        listed = tasks("scoring")
        queued = next((t for t in listed if t.get("status") == "SUBMITTED"
                       and (t.get("request") or {}).get("method") == method), None)
        if queued is not None:
            return queued
        res, detail = AsyncTask.run("scoring", request={"method": method}, params=params,
                                    enqueue=task_busy("scoring", listed))
    if res is None:
        raise HTTPException(status_code=429, detail=detail)
    return res


def register_scoring_route(fastapi_app) -> None:
    """``POST /scoring/{method}`` as MONAI Label answers it, but through :func:`queue_scoring` (a request while a
    run is under way queues one run behind it instead of a dropped 429). ``run_sync=true`` is MONAI Label's."""
    from fastapi import Depends
    from monailabel.config import settings
    from monailabel.endpoints.scoring import run_method
    from monailabel.endpoints.user.auth import RBAC, User

    if any(getattr(r, "name", "") == "labelsentinel_scoring" for r in fastapi_app.router.routes):
        return

    def score(method: str, params: dict | None = Body(None), run_sync: bool = False,
              user: User = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR))):
        return run_method(method, params, run_sync) if run_sync else queue_scoring(method, params)

    _add_route_first(fastapi_app, "/scoring/{method}", score, "labelsentinel_scoring", ["POST"])


def _add_route_first(fastapi_app, path: str, endpoint, name: str, methods: list[str]) -> None:
    """Add a route in front of every other: MONAI Label's own routes sit inside included routers (FastAPI keeps
    an included router as one entry), so ours must come first to answer its path."""
    fastapi_app.add_api_route(path, endpoint, methods=methods, include_in_schema=False, name=name)
    routes = fastapi_app.router.routes
    ours = next(r for r in routes if getattr(r, "name", "") == name)
    routes.remove(ours)
    routes.insert(0, ours)
