"""The metric the chart's HPA scales on is on the front's /metrics (the one port a scraper reaches), and it
moves with load: requests waiting for a canvas slot in the engine."""

from __future__ import annotations

from pathlib import Path

import helm_python
import yaml

from tests.e2e.conftest import Serve
from tests.e2e.test_operations import LONG, wait_until

CHART = Path(__file__).resolve().parents[2] / "helm" / "diffusiongemma"


def hpa_metric_name() -> str:
    values = yaml.safe_load((CHART / "examples" / "gpu.yaml").read_text())
    hpa = yaml.safe_load(helm_python.Chart.load(CHART).render(values, name="r", namespace="n")[
        "diffusiongemma/templates/hpa.yaml"])
    return hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]


def test_front_metrics_export_the_queue_depth_the_hpa_names(tmp_path):
    name = hpa_metric_name()
    assert name == "dgemma_queue_depth"
    # one canvas slot: a second and third request wait in the engine's queue
    srv = Serve(tmp_path, {"NIM_MAX_LIVE_CANVASES": "1"}, api_key=None)
    calls = []
    try:
        scrape = srv.metrics()  # the front's port, not Triton's (127.0.0.1 only in the pod)
        assert f"# TYPE {name} gauge" in scrape and "# TYPE dgemma_live_canvases gauge" in scrape
        assert srv.metric(name, model="diffusiongemma") == 0
        calls = [srv.stub().GenerateStream(LONG, timeout=120) for _ in range(3)]
        assert next(calls[0]).HasField("draft")
        assert wait_until(lambda: srv.metric(name, model="diffusiongemma") == 2, timeout=30), srv.metrics()
        assert srv.metric("dgemma_live_canvases", model="diffusiongemma") == 1
    finally:
        for c in calls:
            c.cancel()
    try:
        assert wait_until(lambda: srv.metric(name, model="diffusiongemma") == 0, timeout=30)
        assert wait_until(lambda: srv.metric("dgemma_live_canvases", model="diffusiongemma") == 0, timeout=30)
    finally:
        assert srv.stop() == 0
