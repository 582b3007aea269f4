"""Quality scoring and the quality/budget strategies on the real server, over sample studies with known
truth; the lead CLI against it; a restart keeps every score."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import threading

import pytest
import requests

from conftest import Server, run_scoring

pytestmark = pytest.mark.server
BROKEN = "case_007"  # its pseudo-label file is corrupted


def _score(url, timeout=600):
    return run_scoring(url, timeout)


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    from labelsentinel.sampledata import generate

    d = str(tmp_path_factory.mktemp("q") / "studies")
    generate(d, cases=8, seed=0, real_ct=False, progress=False)
    with open(os.path.join(d, "labels", "original", f"{BROKEN}.nii.gz"), "wb") as f:
        f.write(b"\x1f\x8b garbage")
    return d


@pytest.fixture(scope="module")
def server(studies, tmp_path_factory):
    # Auto scoring off so that the test decides when scoring runs (it is on by default for users).
    srv = Server(studies, str(tmp_path_factory.mktemp("qs")), env={"MONAI_LABEL_AUTO_UPDATE_SCORING": "false"}).start()
    yield srv
    srv.stop()


def _truth(studies):
    with open(os.path.join(studies, "truth", "cases.csv")) as f:
        return {r["case"]: float(r["mean_true_dice"]) for r in csv.DictReader(f)}


def test_scoring_reports_bad_label_and_scores_the_rest(server):
    st = _score(server.url)
    assert st["status"] == "DONE", st
    q = requests.get(f"{server.url}/labelsentinel/quality", timeout=30).json()
    scored = {r["image_id"] for r in q["records"] if r["record"]}
    assert scored == {f"case_{i:03d}" for i in range(8)} - {BROKEN}
    err = [r for r in q["records"] if r["error"]]
    assert len(err) == 1 and err[0]["image_id"] == BROKEN and "cannot be read" in err[0]["error"]
    rec = next(r["record"] for r in q["records"] if r["image_id"] == "case_004")
    assert rec["estimator_version"].startswith("est-") and {s["name"] for s in rec["structures"]} >= {"liver"}
    assert any(BROKEN in d and "skips" in d for d in st["details"])  # named in the scoring task's output
    # Incremental: a second run reads nothing that did not change.
    st2 = _score(server.url)
    assert any("0 scored" in d for d in st2["details"]), st2["details"][-5:]


def test_quality_strategy_serves_the_worst_case_first(server, studies):
    truth = _truth(studies)
    left = {c: d for c, d in truth.items() if c not in ("case_000", "case_001", "case_002", BROKEN)}
    r = requests.post(f"{server.url}/activelearning/quality", json={"client_id": "lead", "aggregate": "mean",
                                                                       "good_enough": 0.999}, timeout=30).json()
    assert r["id"] == min(left, key=left.get), (r, left)
    assert r["worst_structures"] and r["predicted_dice"] < 0.999
    # Asking again without saving skips the case: the next one comes, and the first goes back to the others.
    again = requests.post(f"{server.url}/activelearning/quality", json={"client_id": "lead", "aggregate": "mean",
                                                                           "good_enough": 0.999}, timeout=30).json()
    rest = {c: d for c, d in left.items() if c != r["id"]}
    assert again["id"] == min(rest, key=rest.get), (again, rest)
    from labelsentinel.store import Store, store_path

    assert set(Store(store_path(studies)).leases()) == {again["id"]}


def test_four_annotators_get_four_different_cases(server):
    results = {}

    def ask(c):
        results[c] = requests.post(f"{server.url}/activelearning/quality",
                                   json={"client_id": c, "good_enough": 0.999}, timeout=60).json()

    threads = [threading.Thread(target=ask, args=(f"annotator-{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    served = [results[c]["id"] for c in results]
    # 5 unlabeled cases, one out with "lead" (previous test): the 4 annotators get the other 4, all different;
    # the case whose label cannot be read comes last, with the reason.
    from labelsentinel.store import Store, store_path

    leads = [c for c, l in Store(store_path(server.studies)).leases().items() if l["client_id"] == "lead"]
    assert len(set(served)) == 4 and all(served) and len(leads) == 1 and leads[0] not in served, results
    broken = [r for r in results.values() if r["id"] == BROKEN]
    assert broken and "could not be scored" in broken[0]["reason"]
    fifth = requests.post(f"{server.url}/activelearning/quality", json={"client_id": "late", "good_enough": 0.999},
                          timeout=60).json()
    assert not fifth["id"] and "out with other annotators" in fifth["reason"]


def test_bad_options_and_unknown_strategies_are_told_not_crashed(server):
    def post(strategy, **params):
        return requests.post(f"{server.url}/activelearning/{strategy}", json={"client_id": "opts", **params}, timeout=30)

    r = post("nosuch")
    assert r.status_code == 404 and "quality" in r.text and "nosuch" in r.text
    for strategy, params, word in (("quality", {"aggregate": "median"}, "aggregate"),
                                   ("quality", {"good_enough": "abc"}, "good_enough"),
                                   ("quality", {"good_enough": 5}, "good_enough"),
                                   ("quality", {"lease_minutes": -5}, "lease_minutes"),
                                   ("quality", {"lease_minutes": 1e300}, "lease_minutes"),
                                   ("budget", {"lease_minutes": "nan"}, "lease_minutes"),
                                   ("review", {"signal": "foo"}, "signal")):
        r = post(strategy, **params)
        assert r.status_code == 422 and word in r.text, (strategy, params, r.status_code, r.text)
    for body, word in (({"cases": "3"}, "cases"), ({"minutes": "abc"}, "minutes"), ({"cases": True}, "cases"),
                       ({"minutes": 1e308}, "minutes"), ({"cases": 3, "good_enough": "x"}, "good-enough"),
                       ({"cases": 3, "cost_model": {"base_minutes": "x"}}, "base_minutes")):
        r = requests.put(f"{server.url}/labelsentinel/budget", json=body, timeout=30)
        assert r.status_code == 422 and word in r.text, (body, r.status_code, r.text)
    assert not requests.get(f"{server.url}/labelsentinel/budget", timeout=30).json()["plan"]  # none was set


def test_lead_cli_budget_and_report(server, tmp_path):
    def cli(*a):
        return subprocess.run([sys.executable, "-m", "labelsentinel.cli", *a, "--server", server.url],
                              capture_output=True, text=True, timeout=300)

    # Release the leases of the earlier tests so that the budget can serve.
    from labelsentinel.store import Store, store_path

    s = Store(store_path(server.studies))
    for cid in list(s.leases()):
        s.release_lease(cid)
    assert cli("plan", "--cases", "0").returncode == 0
    a = requests.post(f"{server.url}/activelearning/budget", json={"client_id": "b0"}, timeout=30).json()
    assert not a["id"] and "buys none of the" in a["reason"], a
    r = cli("plan", "--cases", "2", "--json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["budget_cases"] == 2 and len(plan["cases"]) <= 2 and plan["planned_cases"] == len(plan["cases"])
    got = []
    for i in range(4):
        a = requests.post(f"{server.url}/activelearning/budget", json={"client_id": f"b{i}"}, timeout=30).json()
        got.append(a)
    served = [a["id"] for a in got if a["id"]]
    assert served == [c["case_id"] for c in plan["cases"]]
    assert got[0]["used_cases"] == 1 and got[0]["left_cases"] == 1
    assert not got[-1]["id"] and "budget spent" in got[-1]["reason"] and got[-1]["left_cases"] == 0
    # The lead raises the budget without a restart.
    assert cli("plan", "--cases", "3").returncode == 0
    assert requests.post(f"{server.url}/activelearning/budget", json={"client_id": "b9"}, timeout=30).json()["id"]
    r = cli("status", "--json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["scored_labels"] == 7 and BROKEN in st["label_errors"]
    # who has which case: b0 and b1 hold the two planned cases, b9 the third
    held = {who: [c for c, _ in cases] for who, cases in st["annotators"].items()}
    assert held == {"b0": [served[0]], "b1": [served[1]], "b9": held["b9"]} and len(held["b9"]) == 1, held
    text = cli("status").stdout
    assert f"    b0: {served[0]} (until " in text, text
    out = tmp_path / "report"
    r = cli("report", "--out", str(out))
    assert r.returncode == 0, r.stderr
    page = (out / "report.html").read_text()
    assert "Label quality report" in page and "data:image/png;base64" in page
    rows = list(csv.DictReader(open(out / "structures.csv")))
    assert len({x["case"] for x in rows}) == 7
    # the demo's three final labels over pseudo-labels are corrections: their real pairs are listed
    assert "Corrections: 3 corrected pseudo-label(s)" in page
    pairs = list(csv.DictReader(open(out / "corrections.csv")))
    with open(os.path.join(server.studies, "truth", "cases.csv")) as f:
        finals = {r["case"] for r in csv.DictReader(f) if r["has_final"] in ("1", "True", "true")}
    assert {p["case"] for p in pairs} == finals and len(finals) == 3
    assert st["corrections"]["corrected_labels"] == 3 and st["corrections"]["pairs"] == len([p for p in pairs if p["predicted_dice"]])
    curve = list(csv.DictReader(open(out / "budget_curve.csv")))
    assert float(curve[-1]["expected_dataset_dice"]) >= float(curve[0]["expected_dataset_dice"])


def test_import_labels_over_http_knows_the_servers_names_and_leaves_no_temporary_files(server, studies, tmp_path):
    import nibabel as nib
    import numpy as np

    names_file = os.path.join(studies, "label_names.json")
    with open(names_file) as f:
        names = json.load(f)
    names["99"] = "urinary_bladder"  # known to the server from its studies' label_names.json only
    with open(names_file, "w") as f:
        json.dump(names, f)
    src = nib.load(os.path.join(studies, "labels", "original", "case_003.nii.gz"))
    arr = np.asarray(src.dataobj).astype(np.int16)
    arr[arr == int(arr.max())] = 99
    lab = tmp_path / "case_003.nii.gz"
    nib.save(nib.Nifti1Image(arr, src.affine), str(lab))
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    r = subprocess.run([sys.executable, "-m", "labelsentinel.cli", "import-labels", "--server", server.url, str(lab),
                        "--tag", "model_b"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "TMPDIR": str(tmp)})
    assert r.returncode == 0, r.stderr
    assert 99 in json.loads(r.stdout)[0]["labels"]
    assert os.listdir(tmp) == []  # the image downloaded to check the grid is gone


def test_annotators_saving_at_once_while_scoring_runs_lose_nothing(server, studies, tmp_path):
    """Four annotators save their final labels at the same moment while a scoring run works in the background
    (a subprocess that also writes MONAI Label's datastore JSON): every label is kept and listed, each one's
    real pairs are recorded, and their leases end."""
    from monailabel.client import MONAILabelClient

    from labelsentinel.store import Store, store_path

    cases = ["case_003", "case_004", "case_005", "case_006"]
    assert requests.post(f"{server.url}/scoring/quality", timeout=30).status_code in (200, 429)
    results, errors = {}, []

    def save(i, case):
        try:
            c = MONAILabelClient(server.url, tmpdir=str(tmp_path), client_id=f"saver-{i}")
            c.next_sample("quality", {"good_enough": 0.999})  # each holds a lease, as annotators do
            results[case] = c.save_label(case, os.path.join(studies, "truth", f"{case}.nii.gz"), tag="final")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"{case}: {e!r}")

    threads = [threading.Thread(target=save, args=(i, c)) for i, c in enumerate(cases)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert all(results[c]["corrections"]["recorded"] >= 1 for c in cases), results  # one per pseudo-label
    st = _score(server.url)  # the background run ends (its JSON write comes after the saves)
    assert st["status"] == "DONE", st
    ds = requests.get(f"{server.url}/datastore/?output=all", timeout=30).json()["objects"]
    assert all("final" in ds[c]["labels"] for c in cases), {c: ds[c]["labels"] for c in cases}
    for c in cases:
        with open(os.path.join(studies, "labels", "final", f"{c}.nii.gz"), "rb") as a, \
                open(os.path.join(studies, "truth", f"{c}.nii.gz"), "rb") as b:
            assert a.read() == b.read()
    store = Store(store_path(studies))
    assert {p["image_id"] for p in store.corrections()} >= set(cases)
    assert not set(store.leases()) & set(cases)


def test_restart_keeps_every_score(server, tmp_path):
    before = requests.get(f"{server.url}/labelsentinel/quality", timeout=30).json()["records"]
    # Writes by the server itself into its datastore JSON (served markers) must not touch the scores.
    requests.post(f"{server.url}/activelearning/random", json={"client_id": "z"}, timeout=30)
    server.stop()
    again = Server(server.studies, str(tmp_path), env={"MONAI_LABEL_AUTO_UPDATE_SCORING": "false"}).start()
    try:
        after = requests.get(f"{again.url}/labelsentinel/quality", timeout=30).json()["records"]
        key = lambda rows: sorted((r["image_id"], r["tag"], json.dumps(r["record"], sort_keys=True), r["error"]) for r in rows)  # noqa: E731
        assert key(after) == key(before)
    finally:
        again.stop()
