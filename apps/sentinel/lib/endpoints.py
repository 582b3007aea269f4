"""REST routes of Label Sentinel on the MONAI Label server, for the project lead's CLI (`labelsentinel
status|plan|report --server URL`): quality records, budget plan and status.

MONAI Label has no hook for app routes, so they are added to its FastAPI application when the app has
finished starting (only the server process calls on_init_complete; background tasks never do).
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Body, HTTPException

logger = logging.getLogger(__name__)


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
        rows = store.quality(tag, include_errors=True)
        return {
            "good_enough": app_instance.threshold,
            "tag": tag,
            "images": ds.list_images(),
            "labeled": sorted(labeled),
            "unreadable_images": ds.unreadable_images() if hasattr(ds, "unreadable_images") else {},
            "records": [{**r, "has_final": r["image_id"] in labeled} for r in rows],
            "leases": store.leases(),
        }

    @router.get("/quality")
    def quality(tag: str = "original"):
        return quality_payload(tag)

    @router.get("/budget")
    def budget():
        from labelsentinel.strategies.monailabel_adapters import BudgetStrategy

        store = app_instance.store()
        return {"plan": store.get_setting("budget_plan"),
                "status": BudgetStrategy.status(store, app_instance.datastore())}

    @router.put("/budget")
    def set_budget(body: dict = Body(...)):
        from labelsentinel.strategies.monailabel_adapters import BudgetStrategy

        try:
            plan = BudgetStrategy.make_plan(
                app_instance.store(), app_instance.datastore(), budget_cases=body.get("cases"),
                budget_minutes=body.get("minutes"), cost_model=body.get("cost_model"),
                threshold=body.get("good_enough", app_instance.threshold), tag=body.get("tag", "original"),
            )
        except ValueError as e:
            raise HTTPException(status_code=422, detail=str(e)) from e
        logger.info(f"budget set: {body} -> {len(plan['cases'])} planned case(s)")
        return plan

    fastapi_app.include_router(router)
    logger.info("Label Sentinel REST routes: /labelsentinel/quality, /labelsentinel/budget")
