"""The project lead's commands, over HTTP against a running Label Sentinel server.

    labelsentinel status --server URL [--score] [--json]
    labelsentinel plan   --server URL [--cases N] [--minutes M] [--cost-model JSON] [--json]
    labelsentinel report --server URL --out DIR [--score]

``--score`` asks the server to (re)score the labels first (``POST /scoring/quality``) and shows progress
until it is done: the task's last output line, or while it waits behind another scoring task (MONAI Label runs
them one at a time), which task runs, since when and its last output line; scoring is incremental, so this is
quick when nothing changed. ``status`` and ``report`` also say whether a training run is in progress (MONAI
Label's ``GET /train/``: the record store has a run only once it ended).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import os
import re
import shutil
import sys
import time

import requests


class ServerError(Exception):
    pass


def _body(r) -> str:
    """What an error answer says: FastAPI's ``detail``, else the text (an HTML page by its title only)."""
    try:
        detail = r.json().get("detail")
        if detail:
            return detail if isinstance(detail, str) else json.dumps(detail)[:300]
    except (ValueError, AttributeError):
        pass
    text = r.text or ""
    if "<html" in text[:500].lower():
        m = re.search(r"<title>(.*?)</title>", text, re.I | re.S)
        return f"an HTML page{f' ({m.group(1).strip()[:80]})' if m else ''}"
    return text[:300]


def _answer(r, server: str, what: str, ok=(200,)):
    """The JSON of a good answer; a ServerError that says what went wrong otherwise."""
    if r.status_code == 404 and what.startswith("/labelsentinel/"):
        raise ServerError(f"{server} answers, but has no Label Sentinel routes ({what}: HTTP 404): is it a MONAI "
                          "Label server running another app? Start it with --app apps/sentinel (or `make run`)")
    if r.status_code not in ok:
        raise ServerError(f"{what}: HTTP {r.status_code}: {_body(r)}")
    try:
        return r.json()
    except ValueError:
        raise ServerError(f"{what}: {server} did not answer JSON (content type "
                          f"{r.headers.get('content-type', 'none')!r}): is it a Label Sentinel server?") from None


def _get(server: str, path: str, **kw):
    try:
        r = requests.get(server.rstrip("/") + path, timeout=60, **kw)
    except requests.RequestException as e:
        raise ServerError(f"cannot reach {server}: {e}") from e
    return _answer(r, server, path)


# MONAI Label's log line prefix, "[2026-01-02 10:11:12,345] [pid] [thread] [LEVEL] (module:line) - ", and
# MONAI/ignite's in a training run, "2026-01-02 10:11:12,345 - INFO - "
_LOG_PREFIX = re.compile(r"^(\[[^\]]*\] \[[^\]]*\] \[[^\]]*\] \[[^\]]*\] \([^)]*\) - "
                         r"|\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ - [A-Z]+ - )")
_ENDED = ("DONE", "ERROR", "STOPPED")


def _log_message(line: str) -> str:
    """A task's output line without MONAI Label's time/pid/thread/level prefix."""
    return _LOG_PREFIX.sub("", str(line)).strip()


def task_list(server: str, kind: str) -> list[dict]:
    """MONAI Label's background tasks of a kind (``scoring``, ``train``), oldest first, as ``GET /{kind}/?all=true``
    lists them: ``id``, ``status`` (SUBMITTED, RUNNING, DONE, ERROR, STOPPED), ``request``, ``start_ts`` (when it
    was submitted, server time), ``end_ts``, ``details`` (its last 20 output lines). [] when there is none yet."""
    try:
        r = requests.get(f"{server.rstrip('/')}/{kind}/", params={"all": "true"}, timeout=60)
    except requests.RequestException as e:
        raise ServerError(f"cannot reach {server}: {e}") from e
    if r.status_code == 404 and "Tasks Found" in r.text:  # MONAI Label's answer when no task was ever submitted
        return []
    got = _answer(r, server, f"/{kind}/?all=true")
    return got if isinstance(got, list) else [got]


def running_task(tasks: list[dict]) -> dict | None:
    """The task running now: ``task``, ``started`` (server time: MONAI Label runs a kind's tasks one at a time in
    the order submitted, so a task queued behind another started when that one ended), ``last_line`` (its last
    output line), ``queued`` (tasks waiting behind it). None when none is running."""
    for i, t in enumerate(tasks):
        if t.get("status") != "RUNNING":
            continue
        started = max(str(t.get("start_ts") or ""), str((tasks[i - 1].get("end_ts") if i else None) or ""))
        details = [_log_message(d) for d in t.get("details") or []]
        details = [d for d in details if d]
        return {"task": t, "id": t.get("id"), "what": (t.get("request") or {}).get("method") or
                (t.get("request") or {}).get("model") or "?", "started": started or "?",
                "last_line": details[-1] if details else "",
                "queued": sum(1 for u in tasks[i + 1:] if u.get("status") == "SUBMITTED")}
    return None


def scoring_progress(tasks: list[dict], target: str) -> str:
    """One line on the scoring task ``target`` (an id): its last output line while it runs; while it waits, which
    task runs ahead of it, since when, and that task's last output line."""
    mine = next((t for t in tasks if t.get("id") == target), None)
    if mine is None:
        return "?"
    run = running_task(tasks)
    if mine.get("status") == "RUNNING" and run:
        return f"running since {run['started']} (server time): {run['last_line'] or 'starting'}"
    if mine.get("status") == "SUBMITTED":
        ahead = [t for t in tasks[:tasks.index(mine)] if t.get("status") == "SUBMITTED"]
        if not run:
            return f"queued ({len(ahead)} task(s) ahead), waiting for MONAI Label to start it"
        return (f"queued ({len(ahead) + 1} task(s) ahead); running: {run['what']} scoring since {run['started']} "
                f"(server time): {run['last_line'] or 'starting'}")
    return str(mine.get("status"))


def run_scoring(server: str, timeout: float = 3600, out=sys.stderr) -> dict:
    """Start quality scoring and wait for it, printing progress: the task's last output line, or while it waits
    behind another scoring task, which task runs, since when, and its last output line. When a scoring task is
    running already (MONAI Label refuses a second one: HTTP 429), the last one submitted is joined."""
    base = server.rstrip("/")
    r = requests.post(f"{base}/scoring/quality", timeout=60)
    if r.status_code == 404:
        raise ServerError(f"{server} has no quality scoring (/scoring/quality: HTTP 404): is it a MONAI Label server "
                          "running another app? Start it with --app apps/sentinel (or `make run`)")
    if r.status_code not in (200, 429):
        raise ServerError(f"/scoring/quality: HTTP {r.status_code}: {_body(r)}")
    target = None
    if r.status_code == 200:
        try:
            target = r.json().get("id")
        except (ValueError, AttributeError):
            target = None
    tty = hasattr(out, "isatty") and out.isatty()
    width = max(40, shutil.get_terminal_size((160, 20)).columns - 10) if tty else 200
    t0, last = time.time(), ""
    while time.time() - t0 < timeout:
        tasks = task_list(server, "scoring")
        if target is None:  # joining: the last task submitted (it may still be queued behind the running one)
            if not tasks:
                raise ServerError("/scoring/quality answered that scoring runs already (HTTP 429), but the server "
                                  "lists no scoring task")
            live = [t for t in tasks if t.get("status") not in _ENDED]
            target = (live or tasks)[-1].get("id")
        st = next((t for t in tasks if t.get("id") == target), None)
        if st is None:
            raise ServerError(f"the scoring task {target} is no longer listed by {server} (was the server restarted?)")
        msg = scoring_progress(tasks, target) if st.get("status") not in _ENDED else last
        if msg != last:
            if tty:
                print(f"\rscoring: {msg[:width]:<{width}}", end="", file=out, flush=True)
            else:
                print(f"scoring: {msg[:width]}", file=out, flush=True)
            last = msg
        if st.get("status") in _ENDED:
            print(f"{chr(13) if tty else ''}scoring: {st.get('status')} after {time.time() - t0:.0f} s"
                  f"{' ' * (width - 20) if tty else ''}", file=out)
            if st.get("status") != "DONE":
                raise ServerError(f"scoring ended as {st.get('status')}: {_log_message((st.get('details') or [''])[-1])[:300]}")
            return st
        time.sleep(1)
    raise ServerError(f"scoring did not finish in {timeout:.0f} s")


def _records(q: dict, unlabeled_only: bool = False) -> list[dict]:
    out = []
    for r in q["records"]:
        if r.get("record") and not (unlabeled_only and r["has_final"]):
            out.append(r["record"])
    return out


def summarize(q: dict, method: str = "min") -> dict:
    from labelsentinel.strategies.ranking import aggregate

    thr = q["good_enough"]
    scored = [r for r in q["records"] if r.get("record")]
    pending = [r for r in scored if not r["has_final"]]
    aggs = [aggregate(r["record"], method) for r in pending]
    aggs = [a for a in aggs if a is not None]
    images = set(q["images"])
    leases = q.get("leases") or {}
    live = {c: v for c, v in leases.items() if c in images}
    stale = {c: v for c, v in leases.items() if c not in images}
    return {
        "images": len(q["images"]),
        "with_final_label": len(q["labeled"]),
        "scored_labels": len(scored),
        "calibrated_labels": sum(1 for r in scored if r["record"].get("calibrated")),
        "label_errors": {r["image_id"]: r["error"] for r in q["records"] if r.get("error")},
        "unreadable_images": q.get("unreadable_images", {}),
        "unreadable_labels": q.get("unreadable_labels", {}),
        "good_enough": thr,
        "unlabeled_scored": len(aggs),
        "below_threshold": sum(a < thr for a in aggs),
        "above_threshold": sum(a >= thr for a in aggs),
        "out_with_annotators": len(live),
        "annotators": _annotators(live),
        # leases the server still holds on images deleted since they were served (no case to annotate)
        "stale_leases": _annotators(stale),
        "corrections": _corrections_summary(q),
        "training": _training_summary(q),
    }


def _annotators(leases: dict) -> dict:
    """{annotator: [(case, lease end as HH:MM local time), ...]} of the cases out now."""
    out: dict = {}
    for case, lease in sorted(leases.items()):
        until = time.strftime("%H:%M", time.localtime(lease["expires"]))
        out.setdefault(lease["client_id"], []).append([case, until])
    return out


def _training_summary(q: dict) -> dict:
    t = q.get("training") or {}
    last = t.get("last") or {}
    return {"runs": t.get("runs", 0), "last_ts": last.get("ts"), "last_device": last.get("device"),
            "last_final_labels": last.get("finals"),
            "last_pseudo_labels": [{"case": p["case"], "quality": p.get("quality"), "reason": p.get("reason")}
                                   for p in last.get("pseudo_labels") or []],
            "last_refurbished": [r["case"] for r in last.get("refurbished") or []],
            # runs recorded before the trainer wrote how they ended have no status
            "last_status": last.get("status"), "last_error": last.get("error"),
            "last_refused": [{"case": r.get("case"), "source": r.get("source"), "error": r.get("error")}
                             for r in last.get("refused") or []],
            "suspect_final_labels": t.get("suspects", []),
            "reviewed_suspects": [x["case"] for x in t.get("reviewed_suspects") or []],
            # the label-error signals come from the last run with at least 2 checkpoints, maybe an earlier one
            "suspects_run_ts": (t.get("signals_run") or {}).get("ts"),
            "suspects_from_last_run": t.get("suspects_from_last_run", True)}


def training_now(server: str) -> dict | None:
    """The training run in progress on the server (MONAI Label's ``GET /train/?all=true``; the record store has a
    run only once it ended): ``model``, ``started`` (server time), ``last_line`` (its last output line), ``queued``
    (runs waiting behind it). None when none runs; ``{"unknown": why}`` when the server does not say."""
    try:
        run = running_task(task_list(server, "train"))
    except ServerError as e:
        return {"unknown": str(e)}
    if not run:
        return None
    return {"id": run["id"], "model": run["what"], "started": run["started"], "last_line": run["last_line"],
            "queued": run["queued"]}


def _training_now_text(now: dict | None) -> str:
    if not now:
        return "no training run in progress"
    if "unknown" in now:
        return f"unknown whether a training run is in progress ({now['unknown'][:200]})"
    if now.get("unlisted"):
        return (f"a {now['model']} training run is in progress in process {now.get('pid')} (run {now.get('run_id')}, "
                f"started {now['started']} server time), left running by a server that stopped without ending it; "
                "MONAI Label does not list it, and a new run is refused until it ends")
    return (f"a {now['model']} training run is in progress, started {now['started']} (server time)"
            + (f", {now['queued']} more queued" if now.get("queued") else "")
            + (f"; its last output line: {now['last_line'][:200]}" if now.get("last_line") else ""))


def _training_text(t: dict) -> str:
    if not t["runs"]:
        return "no finished training run yet"
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(t["last_ts"])) if t["last_ts"] else "?"
    pl = ", ".join(p["case"] for p in t["last_pseudo_labels"]) or "none"
    if t.get("last_status") == "failed":
        out = f"{t['runs']} run(s); last at {when} on {t['last_device']} FAILED: {t.get('last_error')}"
    else:
        out = (f"{t['runs']} run(s); last at {when} on {t['last_device']}"
               f"{' (still running)' if t.get('last_status') == 'running' else ''}: "
               f"{t['last_final_labels']} final label(s), pseudo-labels used: {pl}")
    refused = t.get("last_refused") or []
    if refused:
        out += (f"; skipped {len(refused)} unusable pair(s): "
                + ", ".join(f"{r['case']} ({r['source']}: {str(r['error'])[:120]})" for r in refused))
    if t["last_refurbished"]:
        out += f"; refurbished: {', '.join(t['last_refurbished'])}"
    sus = t["suspect_final_labels"]
    origin = ""
    if not t.get("suspects_from_last_run", True) and t.get("suspects_run_ts"):
        origin = f" by the run of {time.strftime('%Y-%m-%d %H:%M', time.localtime(t['suspects_run_ts']))}"
    out += (f"; final labels flagged as suspect{origin} (loss z >= 2): "
            + ", ".join(f"{x['case']} ({x['loss_z']:.1f})" for x in sus)
            if sus else f"; no final label flagged as suspect{origin}")
    if t.get("reviewed_suspects"):
        out += f" ({len(t['reviewed_suspects'])} flagged and reviewed since: {', '.join(t['reviewed_suspects'])})"
    return out


def _corrections_summary(q: dict) -> dict:
    """Corrected pseudo-labels, their real (predicted, true) pairs and the calibration they give."""
    c = q.get("corrections") or {}
    pairs = [p for p in c.get("pairs") or [] if p.get("predicted") is not None]
    cal = c.get("calibration") or {}
    return {"corrected_labels": c.get("cases", 0), "pairs": len(pairs),
            "pairs_current_estimator": sum(p.get("estimator_version") == c.get("estimator_version") for p in pairs),
            "mae_raw": cal.get("mae_before"), "mae_recalibrated": cal.get("mae_after"),
            "recalibration_applied": bool(cal.get("applied", True)) if cal else False}


def _corrections_text(c: dict) -> str:
    if not c["corrected_labels"]:
        return "no corrections yet (a final label saved over a pseudo-label gives its true Dice)"
    t = f"{c['corrected_labels']} corrected pseudo-label(s), {c['pairs']} real (predicted, true) Dice pairs"
    if c["mae_raw"] is not None and c["mae_recalibrated"] is not None:
        t += (f"; estimator error on them: {c['mae_raw']:.3f} raw, {c['mae_recalibrated']:.3f} recalibrated "
              "(mean absolute, cross-validated by case): "
              + ("recalibration applied" if c["recalibration_applied"] else
                 "recalibration not applied (it must lower the error by 5%, from 3 corrected labels on)"))
    return t


def cmd_status(args) -> int:
    if args.score:
        run_scoring(args.server)
    info = _get(args.server, "/info/")
    q = _get(args.server, "/labelsentinel/quality")
    s = summarize(q)
    budget = _get(args.server, "/labelsentinel/budget")["status"]
    now = training_now(args.server)
    unlisted = ((q.get("training") or {}).get("unlisted_runs") or [])
    if now is None and unlisted:  # a run whose process outlived a crashed server: MONAI Label does not list it
        r = unlisted[0]
        now = {"model": r["model"], "run_id": r.get("run_id"), "pid": r.get("pid"), "queued": 0, "last_line": None,
               "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["started"])) if r.get("started") else "?",
               "unlisted": True}
    if args.json:
        print(json.dumps({"server": args.server, "app": info.get("name"), **s, "training_now": now, "budget": budget},
                         indent=1))
        return 0
    print(f"{info.get('name')} at {args.server}")
    print(f"  images: {s['images']} ({s['with_final_label']} with a final label, {len(s['unreadable_images'])} unreadable)")
    print(f"  pseudo-labels scored: {s['scored_labels']} ({s['calibrated_labels']} recalibrated from corrections); "
          f"unlabeled cases below the good-enough threshold "
          f"({s['good_enough']:.2f}): {s['below_threshold']}, above: {s['above_threshold']}")
    print(f"  out with annotators: {s['out_with_annotators']}")
    for who, cases in s["annotators"].items():
        print(f"    {who}: " + ", ".join(f"{c} (until {t})" for c, t in cases))
    if s["stale_leases"]:
        print(f"  leases on images deleted since (not counted above): "
              + "; ".join(f"{who}: {', '.join(c for c, _ in cases)}" for who, cases in s["stale_leases"].items()))
    print(f"  corrections: {_corrections_text(s['corrections'])}")
    if now:
        print(f"  training now: {_training_now_text(now)}")
    print(f"  training: {_training_text(s['training'])}")
    for k, v in s["label_errors"].items():
        print(f"  label error: {k}: {v}")
    for k, v in s["unreadable_labels"].items():  # e.g. a final label that cannot be read: the case is served again
        print(f"  unreadable label: {k}: {v}")
    print(f"  budget: {json.dumps(budget)}")
    return 0


def _budget_text(cases, minutes) -> str:
    """'10 cases', '120 minutes' or '2 cases and 60 minutes' (a plan honours both limits when both are set)."""
    parts = ([f"{cases} cases"] if cases is not None else []) + ([f"{minutes:g} minutes"] if minutes is not None else [])
    return " and ".join(parts) or "none"


def _status_text(status: dict) -> str:
    """Used and left of the budget; 'left' only for the limits the lead set (cases, minutes or both)."""
    left = []
    if status.get("left_cases") is not None:
        left.append(f"{status['left_cases']} case(s)")
    if status.get("left_minutes") is not None:
        left.append(f"{status['left_minutes']} min")
    return (f"used: {status['used_cases']} case(s), {status['used_minutes']} min (planned minutes)"
            + (f"; left: {', '.join(left)}" if left else ""))


def parse_cost_model(text: str) -> dict:
    """The ``--cost-model`` JSON object, checked here: unknown keys and bad values are refused, naming the
    keys the cost model knows (the server would otherwise ignore an unknown key without a word)."""
    from labelsentinel.strategies.budget import CostModel

    try:
        d = json.loads(text)
    except ValueError as e:
        raise ServerError(f"--cost-model is not valid JSON ({e}): {text}") from e
    allowed = list(CostModel.__dataclass_fields__)
    if not isinstance(d, dict):
        raise ServerError(f"--cost-model must be a JSON object with the keys {', '.join(allowed)}, got {text}")
    unknown = [k for k in d if k not in allowed]
    if unknown:
        raise ServerError(f"--cost-model: unknown key(s) {', '.join(map(repr, unknown))}; "
                          f"the cost model knows {', '.join(allowed)}")
    try:
        CostModel.from_dict(d)
    except (ValueError, TypeError) as e:
        raise ServerError(f"--cost-model: {e}") from e
    return d


def parse_plan_id(text: str):
    """``--expect-plan``: a plan id (its ``ts``, as `plan` prints it) or ``none`` (no plan may be set)."""
    if str(text).strip().lower() == "none":
        return None
    try:
        v = float(text)
    except ValueError:
        v = float("nan")
    if not v == v or v in (float("inf"), float("-inf")):
        raise ServerError(f"--expect-plan must be a plan id as `labelsentinel plan` prints it (e.g. "
                          f"1767350000.123456) or none, got {text!r}")
    return v


def cmd_plan(args) -> int:
    base = args.server.rstrip("/")
    if args.cases is None and args.minutes is None:
        if args.cost_model:
            raise ServerError("--cost-model needs a budget: give --cases N and/or --minutes M with it")
        if args.expect_plan is not None:
            raise ServerError("--expect-plan needs a budget: give --cases N and/or --minutes M with it")
        d = _get(args.server, "/labelsentinel/budget")
        plan, status = d["plan"], d["status"]
        if args.json:
            print(json.dumps(d, indent=1))
        elif not plan:
            print(status.get("reason", "no budget set"))
        else:
            _print_plan(plan)
            print(_status_text(status))
        return 0
    if args.cases is not None and args.cases < 0:
        raise ServerError(f"--cases must be a whole number >= 0, got {args.cases}")
    if args.minutes is not None and not (args.minutes >= 0 and args.minutes != float("inf")):
        raise ServerError(f"--minutes must be a finite number >= 0, got {args.minutes}")
    body = {"cases": args.cases, "minutes": args.minutes}
    if args.cost_model:
        body["cost_model"] = parse_cost_model(args.cost_model)
    if args.expect_plan is not None:
        body["expected_plan_ts"] = parse_plan_id(args.expect_plan)
    if args.score:
        run_scoring(args.server)
    # The budget used counts from the plan (cases corrected since, and out under `budget`): a new plan starts
    # from zero, so what the plan it replaces had used is said. The server replaces the plan and answers with
    # the one it replaced in one step: a plan read here before the PUT may be gone by then (another lead).
    r = requests.put(f"{base}/labelsentinel/budget", json=body, timeout=120)
    if r.status_code == 409:
        raise ServerError(f"the plan was not replaced: {_body(r)}")
    plan = _answer(r, args.server, "/labelsentinel/budget")
    told = "replaced_plan" in plan  # an older server does not say which plan its PUT replaced
    previous = plan.pop("replaced_plan", None)
    after = plan.pop("budget_status", None)
    if after is None and not told:
        try:
            after = _get(args.server, "/labelsentinel/budget").get("status")
        except ServerError:
            after = None
    if args.json:
        print(json.dumps({**plan, "replaced_plan": previous, "budget_status": after}, indent=1))
        return 0
    if previous:
        print(_replaced_text(previous))
    elif not told:
        print("(this server does not say which plan, if any, the new one replaced: an older Label Sentinel server)")
    _print_plan(plan)
    if after and "used_cases" in after:
        out = after.get("out_cases") or 0
        print(f"{'the new budget counts from now: ' if previous else ''}{_status_text(after)}"
              + (f" ({out} planned case(s) already out with annotators under `budget` count as used)" if out else ""))
    return 0


def _replaced_text(prev: dict) -> str:
    """What the plan a new one replaces had used: its cases corrected since it was made and out under `budget`."""
    st = prev.get("status") or {}
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(prev["ts"])) if prev.get("ts") else "?"
    parts = [f"{st.get('corrected_cases', 0)} corrected", f"{st.get('out_cases', 0)} out with annotators"]
    if st.get("deleted_cases"):
        parts.append(f"{len(st['deleted_cases'])} deleted, not counted")
    used = (f"{st['used_cases']} of {prev['planned_cases']} planned case(s), {st.get('used_minutes', 0)} min"
            if "used_cases" in st else "unknown")
    return (f"replacing the plan of {when} (budget {_budget_text(prev['budget_cases'], prev['budget_minutes'])}), "
            f"which had used {used} ({', '.join(parts)})")


def _print_plan(plan: dict) -> None:
    b = _budget_text(plan["budget_cases"], plan["budget_minutes"])
    print(f"budget {b}: {len(plan['cases'])} planned correction(s), {plan.get('planned_minutes', plan.get('used_minutes'))} annotator minutes "
          f"({plan['method']})")
    if isinstance(plan.get("ts"), (int, float)):
        print(f"plan id {plan['ts']:.6f} (`plan --expect-plan {plan['ts']:.6f} ...` replaces only this plan)")
    for i, c in enumerate(plan["cases"], 1):
        print(f"  {i:3d}. {c['case_id']:<24} expected gain {c['gain']:.4f}  {c['minutes']:.1f} min")
    if plan["dataset_dice_before"] is not None:
        print(f"expected dataset Dice: {plan['dataset_dice_before']:.4f} -> {plan['dataset_dice_after']:.4f}")


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


AGE_GROUPS = ((None, 40, "<40"), (40, 60, "40-59"), (60, None, "60+"))


def age_group(age) -> str:
    if age is None or age == "":
        return "unknown"
    a = float(age)
    for lo, hi, name in AGE_GROUPS:
        if (lo is None or a >= lo) and (hi is None or a < hi):
            return name
    return "unknown"


def quality_by_group(q: dict, demographics: dict, method: str = "min") -> list[dict]:
    """Predicted quality of the scored pseudo-labels by patient sex and by age group (<40, 40-59, 60+), with
    the number of cases behind each figure. ``demographics``: image id -> {"sex", "age" (years)}."""
    from labelsentinel.strategies.ranking import aggregate

    thr = q["good_enough"]
    groups: dict[tuple[str, str], list[float]] = {}
    for r in q["records"]:
        if not r.get("record"):
            continue
        a = aggregate(r["record"], method)
        if a is None:
            continue
        d = demographics.get(r["image_id"]) or {}
        sex = {"F": "female", "M": "male", "O": "other"}.get(str(d.get("sex") or "").upper()[:1], "unknown")
        for key in (("sex", sex), ("age", age_group(d.get("age")))):
            groups.setdefault(key, []).append(a)
    order = {"female": 0, "male": 1, "other": 2, "<40": 0, "40-59": 1, "60+": 2, "unknown": 9}
    rows = []
    for (by, g), vals in sorted(groups.items(), key=lambda kv: (kv[0][0] != "sex", order.get(kv[0][1], 5), kv[0][1])):
        rows.append({"by": by, "group": g, "cases": len(vals), f"mean_predicted_dice_{method}": round(sum(vals) / len(vals), 4),
                     "below_good_enough": sum(v < thr for v in vals)})
    return rows


# Every file a report may write. A report folder holds one report: the files of an earlier report written there
# that this one does not write (groups.csv comes only with patient groups) are removed, as listed in the
# folder's manifest, and only while unchanged since; nothing else in the folder is touched.
REPORT_FILES = ("report.html", "structures.csv", "cases.csv", "budget_curve.csv", "corrections.csv", "groups.csv")
REPORT_MANIFEST = ".labelsentinel-report.json"
_GROUPS_HEADER = "by,group,cases,mean_predicted_dice_"


def _sha256(path: str) -> str | None:
    import hashlib

    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


def _read_manifest(out: str) -> dict | None:
    try:
        with open(os.path.join(out, REPORT_MANIFEST)) as f:
            m = json.load(f)
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and isinstance(m.get("files"), dict) else None


def _write_manifest(out: str, files: dict, ts: float) -> None:
    from labelsentinel.io import atomic_write

    atomic_write(os.path.join(out, REPORT_MANIFEST),
                 json.dumps({"written_by": "labelsentinel report", "ts": ts, "files": files}, indent=1).encode())


def _start_report_folder(out: str, ts: float) -> dict:
    """What an earlier report left in ``out``: ``files`` (name -> its sha256 when written, None when a report
    stopped while writing it), ``ts``, ``legacy`` (no manifest, but a report.html of this command: a folder written
    before the command kept one). Before anything is written, the manifest also lists the files this report will
    create, so a report that stops half-way leaves none the next one does not know about."""
    m = _read_manifest(out)
    files = {n: v for n, v in ((m or {}).get("files") or {}).items() if n in REPORT_FILES}
    legacy = False
    if m is None:
        try:
            with open(os.path.join(out, "report.html"), errors="replace") as f:
                legacy = "<title>Label Sentinel report</title>" in f.read(2000)
        except OSError:
            pass
    pending = {n: None for n in REPORT_FILES if n not in files and not os.path.lexists(os.path.join(out, n))}
    if pending or m is not None:
        _write_manifest(out, {**files, **pending}, (m or {}).get("ts") or ts)
    return {"files": {**files, **pending}, "ts": (m or {}).get("ts"), "legacy": legacy}


def _finish_report_folder(out: str, earlier: dict, written: list[str], ts: float) -> dict:
    """Remove the earlier report's files this one did not write (unchanged since: a file changed since is kept and
    named), then list this report's files in the manifest. Returns {"removed": [...], "kept": [...]}."""
    removed, kept = [], []
    names = set(earlier["files"])
    if earlier["legacy"]:  # a folder an earlier version of the command wrote: its optional file, by its header
        names.add("groups.csv")
    for name in sorted(names - set(written)):
        path = os.path.join(out, name)
        if os.path.islink(path) or not os.path.isfile(path):
            continue
        if name in earlier["files"]:
            sha = earlier["files"][name]
            ours = sha is None or sha == _sha256(path)
        else:
            try:
                with open(path, errors="replace") as f:
                    ours = f.readline().startswith(_GROUPS_HEADER)
            except OSError:
                ours = False
            if not ours:
                continue  # not the command's file
        if ours:
            os.remove(path)
            removed.append(name)
        else:
            kept.append(name)
    _write_manifest(out, {n: _sha256(os.path.join(out, n)) for n in written}, ts)
    return {"removed": removed, "kept": kept}


def write_report(q: dict, out: str, method: str = "min", demographics: dict | None = None,
                 training_now: dict | None = None, tidy: dict | None = None) -> dict:
    """HTML page + CSV files from the server's quality records; returns the paths written. ``training_now``: the
    run in progress (see :func:`training_now`), if any.

    ``out`` holds one report: the files an earlier report wrote there that this one does not write are removed
    (those changed since are kept), as the folder's manifest (``.labelsentinel-report.json``) lists them; other
    files are never touched. ``tidy``, if given, gets ``removed``, ``kept`` (file names) and ``earlier_ts``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from labelsentinel.strategies.budget import plan_budget
    from labelsentinel.strategies.ranking import aggregate, structures_of

    os.makedirs(out, exist_ok=True)
    now = time.time()
    earlier = _start_report_folder(out, now)
    thr = q["good_enough"]
    recs = [r for r in q["records"] if r.get("record")]
    per_struct: dict[str, list[float]] = {}
    n_missing: dict[str, int] = {}
    with open(os.path.join(out, "structures.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case", "tag", "label_id", "name", "predicted_dice", "raw_predicted_dice", "voxels", "flags",
                    "has_final", "missing"])
        for r in recs:
            # an expected structure the label lacks counts as predicted Dice 0, as in cases.csv and the aggregates
            for s in structures_of(r["record"]):
                missing = "missing" in (s.get("flags") or [])
                key = s.get("name") or str(s["id"])
                w.writerow([r["image_id"], r["tag"], s["id"], s.get("name") or "", s["predicted_dice"],
                            s.get("raw_predicted_dice", s["predicted_dice"]), s["voxels"],
                            ";".join(s.get("flags") or []), int(r["has_final"]), int(missing)])
                per_struct.setdefault(key, []).append(s["predicted_dice"])
                n_missing[key] = n_missing.get(key, 0) + int(missing)
    cases = []
    for r in recs:
        a = aggregate(r["record"], method)
        worst = sorted(structures_of(r["record"]), key=lambda s: s["predicted_dice"])[:3]  # a missing one too
        cases.append((r["image_id"], a, worst, r["has_final"]))
    cases.sort(key=lambda c: (c[1] if c[1] is not None else 2, c[0]))
    with open(os.path.join(out, "cases.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case", f"predicted_dice_{method}", "good_enough", "worst_structures", "has_final"])
        for cid, a, worst, fin in cases:
            w.writerow([cid, "" if a is None else f"{a:.4f}", int(a is not None and a >= thr),
                        "; ".join(f"{s.get('name') or s['id']} {s['predicted_dice']:.2f}" for s in worst), int(fin)])
    with open(os.path.join(out, "corrections.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case", "tag", "label_id", "name", "predicted_dice", "true_dice", "estimator_version"])
        for p in (q.get("corrections") or {}).get("pairs") or []:
            w.writerow([p["image_id"], p["tag"], p["id"], p.get("name") or "",
                        "" if p.get("predicted") is None else p["predicted"], round(p["true_dice"], 4),
                        p.get("estimator_version") or ""])
    pending = [r["record"] for r in recs if not r["has_final"]]
    full = plan_budget(pending, budget_cases=len(pending), threshold=None)
    with open(os.path.join(out, "budget_curve.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["corrected_cases", "expected_dataset_dice"])
        w.writerows(full.curve)

    figs = {}
    if per_struct:
        names = sorted(per_struct, key=lambda n: (sum(per_struct[n]) / len(per_struct[n]), n))
        fig, ax = plt.subplots(figsize=(10, max(3, 0.22 * len(names))))
        ax.boxplot([per_struct[n] for n in names], orientation="horizontal",
                   tick_labels=[f"{n} ({n_missing[n]} missing)" if n_missing.get(n) else n for n in names])
        ax.axvline(thr, color="r", ls="--", label=f"good enough ({thr:.2f})")
        ax.set_xlabel("predicted Dice")
        ax.legend(loc="lower left")
        figs["structures"] = _png(fig)
        plt.close(fig)
    if len(full.curve) > 1:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([c[0] for c in full.curve], [c[1] for c in full.curve], marker=".")
        ax.set_xlabel("corrected cases (best first)")
        ax.set_ylabel("expected dataset Dice")
        figs["budget"] = _png(fig)
        plt.close(fig)
    group_rows = quality_by_group(q, demographics, method) if demographics else []
    if group_rows:
        with open(os.path.join(out, "groups.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(group_rows[0]))
            w.writeheader()
            w.writerows(group_rows)
    n_below = sum(1 for _, a, _, fin in cases if not fin and a is not None and a < thr)
    n_cal = sum(1 for r in recs if r["record"].get("calibrated"))
    n_above = sum(1 for _, a, _, fin in cases if not fin and a is not None and a >= thr)
    e = html.escape
    csv_files = ("structures.csv", "cases.csv", "budget_curve.csv", "corrections.csv") + (("groups.csv",) if group_rows else ())
    missing_total = sum(n_missing.values())
    missing_note = (f"<p>{missing_total} expected structure(s) missing from their labels are counted as predicted Dice 0 "
                    f"(structures.csv: column missing): {e(', '.join(f'{k} {v}' for k, v in sorted(n_missing.items()) if v))}.</p>"
                    if missing_total else "")

    def worst_text(worst):
        return ", ".join(f"{s.get('name') or s['id']} {s['predicted_dice']:.2f}" for s in worst)

    rows = "".join(
        f"<tr><td>{e(cid)}</td><td>{'' if a is None else f'{a:.3f}'}</td><td>{e(worst_text(worst))}</td>"
        f"<td>{'final' if fin else ''}</td></tr>"
        for cid, a, worst, fin in cases[:50]
    )
    errors = "".join(f"<li>{e(r['image_id'])}/{e(r['tag'])}: {e(r['error'])}</li>" for r in q["records"] if r.get("error"))
    unreadable = "".join(f"<li>{e(i)}: {e(str(m))}</li>" for i, m in sorted((q.get("unreadable_images") or {}).items()))
    bad_labels = "".join(f"<li>{e(i)}: {e(str(m))}</li>" for i, m in sorted((q.get("unreadable_labels") or {}).items()))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Label Sentinel report</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:2px 8px;border-bottom:1px solid #ddd}}</style></head><body>
<h1>Label quality report</h1>
<p>{len(q['images'])} images, {len(q['labeled'])} with a final label; {len(recs)} pseudo-labels scored.
Good-enough threshold {thr:.2f}: <b>{n_below}</b> unlabeled case(s) below it (need a human), {n_above} above.
{n_cal} of the scored pseudo-labels are shown recalibrated from annotators' corrections (structures.csv keeps
the estimator's raw value too).</p>
<p>Corrections: {e(_corrections_text(_corrections_summary(q)))} (corrections.csv).</p>
{f'<p>Training now: {e(_training_now_text(training_now))}.</p>' if training_now else ''}
<p>Training: {e(_training_text(_training_summary(q)))}.</p>
<h2>Predicted Dice per structure</h2>{missing_note}{f'<img src="data:image/png;base64,{figs["structures"]}">' if 'structures' in figs else '<p>no scores yet</p>'}
<h2>Budget curve</h2><p>Expected dataset Dice (mean over structure instances of unlabeled cases) after correcting the
best cases first.</p>{f'<img src="data:image/png;base64,{figs["budget"]}">' if 'budget' in figs else ''}
<h2>Worst cases (lowest predicted Dice, {method} over structures)</h2>
<table><tr><th>case</th><th>predicted Dice</th><th>worst structures</th><th></th></tr>{rows}</table>
{groups_html(group_rows, method)}
{f'<h2>Labels that could not be scored</h2><ul>{errors}</ul>' if errors else ''}
{f'<h2>Images that cannot be read (never served)</h2><ul>{unreadable}</ul>' if unreadable else ''}
{f'<h2>Label files that cannot be read (not counted; a case whose final label is among them is served again)</h2><ul>{bad_labels}</ul>' if bad_labels else ''}
<p>CSV: {", ".join(f for f in csv_files)}</p></body></html>"""
    with open(os.path.join(out, "report.html"), "w") as f:
        f.write(page)
    files = ("report.html",) + csv_files
    done = _finish_report_folder(out, earlier, list(files), now)
    if tidy is not None:
        tidy.update(done, earlier_ts=earlier["ts"])
    return {k: os.path.join(out, k) for k in files}


def groups_html(rows: list[dict], method: str) -> str:
    if not rows:
        return ""
    e = html.escape
    body = "".join(f"<tr><td>{e(r['by'])}</td><td>{e(r['group'])}</td><td>{r['cases']}</td>"
                   f"<td>{r[f'mean_predicted_dice_{method}']:.3f}</td><td>{r['below_good_enough']}</td></tr>" for r in rows)
    return ("<h2>Quality by patient sex and age group</h2><p>From the DICOM headers (PatientSex, PatientAge) or the "
            "studies' cases.csv; <i>cases</i> is the number of scored cases behind each figure.</p>"
            "<table><tr><th>by</th><th>group</th><th>cases</th><th>mean predicted Dice</th><th>below good enough</th>"
            f"</tr>{body}</table>")


def cmd_report(args) -> int:
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ServerError(f"--out {args.out} is a file; give a folder (it is created if missing)")
    if args.score:
        run_scoring(args.server)
    q = _get(args.server, "/labelsentinel/quality")
    try:
        demo = _get(args.server, "/labelsentinel/demographics")["images"]
    except ServerError as e:  # an older server, or a PACS that does not answer: the report goes on without groups
        print(f"warning: no patient sex/age groups: {e}", file=sys.stderr)
        demo = None
    tidy: dict = {}
    paths = write_report(q, args.out, args.aggregate, demo, training_now(args.server), tidy=tidy)
    print(json.dumps(paths, indent=1))
    when = (f" of {time.strftime('%Y-%m-%d %H:%M', time.localtime(tidy['earlier_ts']))}"
            if tidy.get("earlier_ts") else "")
    if tidy.get("removed"):
        print(f"removed from {args.out}: {', '.join(tidy['removed'])} (written there by the earlier report{when}; "
              "not part of this report)", file=sys.stderr)
    for name in tidy.get("kept") or []:
        print(f"warning: kept {os.path.join(args.out, name)}: the earlier report{when} wrote it, but it was changed "
              "since; it is not part of this report", file=sys.stderr)
    return 0


def _wrap(f):
    def run(args):
        try:
            return f(args)
        except ServerError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except requests.RequestException as e:
            print(f"error: cannot reach {args.server}: {e}", file=sys.stderr)
            return 2

    return run


def register(sub) -> None:
    for name, func, help_ in (
        ("status", cmd_status, "quality and budget status of a running server"),
        ("plan", cmd_plan, "set (or show) the labelling budget and its plan"),
        ("report", cmd_report, "write an HTML report and CSV files"),
    ):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--server", required=True, help="server URL, e.g. http://127.0.0.1:8000")
        p.add_argument("--score", action="store_true", help="(re)score the labels first, with progress")
        if name != "report":
            p.add_argument("--json", action="store_true")
        if name == "plan":
            p.add_argument("--cases", type=int, help="budget in corrected cases")
            p.add_argument("--minutes", type=float,
                           help="budget in annotator minutes (with --cases too, the plan keeps within both)")
            p.add_argument("--cost-model", help='JSON with the keys base_minutes, review_minutes, fix_minutes, '
                           'structure_minutes, minutes_per_case, e.g. {"base_minutes": 3, "structure_minutes": {"liver": 10}}')
            p.add_argument("--expect-plan", metavar="PLAN_ID",
                           help="replace only this plan (its id, as `plan` prints it; `none`: only when no plan is "
                           "set): if another lead replaced it meanwhile, nothing changes and the command says so")
        if name == "report":
            p.add_argument("--out", required=True, help="folder for report.html and the CSV files")
            p.add_argument("--aggregate", default="min", choices=["min", "mean", "volume_weighted"])
        p.set_defaults(func=_wrap(func))
