"""End to end: `sample-apps/add-to-your-app` (Label Sentinel's strategies added to another team's minimal
MONAI Label app) started with the real `monailabel start_server`, as its README says."""

from __future__ import annotations

import os
import time

import pytest
import requests

from conftest import REPO, Server

pytestmark = pytest.mark.server

EXAMPLE = os.path.join(REPO, "sample-apps", "add-to-your-app")


def test_example_app_scores_serves_with_leases_and_gives_reasons(studies_copy, tmp_path):
    from monailabel.client import MONAILabelClient

    srv = Server(studies_copy, str(tmp_path), app=EXAMPLE).start()
    try:
        info = requests.get(f"{srv.url}/info/", timeout=10).json()
        assert info["name"] == "Your app + Label Sentinel"
        assert set(info["strategies"]) == {"random", "quality", "budget"}, info["strategies"]
        assert "quality" in info["scoring"]

        # no budget set: the reason reaches the annotator (MONAI Label alone answers {})
        r = requests.post(f"{srv.url}/activelearning/budget", json={}, timeout=30)
        assert r.status_code == 200 and r.json()["id"] == "" and "no budget set" in r.json()["reason"], r.text

        # scoring runs as a background task of this app and scores every pseudo-label
        requests.post(f"{srv.url}/scoring/quality", timeout=30)
        t_end = time.time() + 300
        while time.time() < t_end:
            st = requests.get(f"{srv.url}/scoring/", timeout=30).json()
            if st.get("status") in ("DONE", "ERROR"):
                break
            time.sleep(1)
        assert st.get("status") == "DONE", f"{st}\n{srv.log()[-3000:]}"
        from labelsentinel.store import Store, store_path

        scored = {r["image_id"] for r in Store(store_path(studies_copy)).quality("original")}
        assert {"case_000", "case_001", "case_002", "case_003", "totalseg_ct"} <= scored, scored

        # two annotators asking `quality` and `random` at once never get the same open case
        a = MONAILabelClient(srv.url, tmpdir=str(tmp_path), client_id="alice")
        b = MONAILabelClient(srv.url, tmpdir=str(tmp_path), client_id="bob")
        got_a = a.next_sample("quality", {})
        got_b = b.next_sample("random", {})
        assert got_a.get("id") and got_b.get("id") and got_a["id"] != got_b["id"], (got_a, got_b)
        assert got_a.get("predicted_dice") is not None, got_a
    finally:
        srv.stop()
