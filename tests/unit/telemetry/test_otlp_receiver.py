import base64
import gzip
import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.e2e.otlp_receiver import OtlpReceiver

TRITON_JSON = Path(__file__).with_name("triton_2_51_spans.json")  # captured from Triton 2.51 here


def post(url, body, ctype, encoding=None):
    headers = {"Content-Type": ctype}
    if encoding:
        headers["Content-Encoding"] = encoding
    req = urllib.request.Request(url, data=body, headers=headers)
    with urllib.request.urlopen(req, timeout=5) as resp:
        return resp.status


def test_triton_json_export():
    with OtlpReceiver() as rx:
        assert post(rx.traces_url, TRITON_JSON.read_bytes(), "application/json") == 200
        spans = {s.name: s for s in rx.wait_for(count=3)}
    assert set(spans) == {"compute", "ident", "InferRequest"}
    assert {s.trace_id for s in spans.values()} == {"0af7651916cd43dd8448eb211c80319c"}
    assert spans["InferRequest"].parent_span_id == "b7ad6b7169203331"  # the client's traceparent
    assert spans["ident"].parent_span_id == spans["InferRequest"].span_id
    assert spans["compute"].parent_span_id == spans["ident"].span_id
    assert spans["ident"].service_name == "triton-inference-server"
    assert spans["ident"].attributes["triton.model_version"] == 1
    assert "COMPUTE_START" in spans["compute"].events
    assert spans["compute"].end_ns > spans["compute"].start_ns > 0


def test_protobuf_json_mapping_gzip_base64_ids_snake_case():
    trace_id, span_id = bytes(range(16)), bytes(range(8))
    doc = {"resource_spans": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"string_value": "svc"}}]},
        "scope_spans": [{"scope": {"name": "s"}, "spans": [{
            "trace_id": base64.b64encode(trace_id).decode(), "span_id": base64.b64encode(span_id).decode(),
            "name": "n", "kind": "SPAN_KIND_SERVER", "start_time_unix_nano": 5, "end_time_unix_nano": "7",
            "status": {"code": "STATUS_CODE_ERROR"},
            "attributes": [{"key": "a", "value": {"arrayValue": {"values": [{"intValue": "2"}, {"boolValue": True}]}}},
                           {"key": "d", "value": {"doubleValue": 0.5}}],
        }]}],
    }]}
    with OtlpReceiver() as rx:
        assert post(rx.traces_url, gzip.compress(json.dumps(doc).encode()), "application/json", "gzip") == 200
        (span,) = rx.wait_for()
    assert span.trace_id == trace_id.hex() and span.span_id == span_id.hex() and span.parent_span_id == ""
    assert span.service_name == "svc" and span.kind == 2 and span.status_code == 2
    assert span.attributes == {"a": [2, True], "d": 0.5} and (span.start_ns, span.end_ns) == (5, 7)


def test_rejects_what_it_cannot_read_and_times_out():
    with OtlpReceiver() as rx:
        with pytest.raises(urllib.error.HTTPError) as e:
            post(rx.traces_url, b"x", "text/plain")
        assert e.value.code == 415
        e.value.close()
        with pytest.raises(urllib.error.HTTPError) as e:
            post(rx.traces_url, b"{not json", "application/json")
        assert e.value.code == 400 and rx.errors
        e.value.close()
        with pytest.raises(urllib.error.HTTPError) as e:
            post(rx.url + "/v1/metrics", b"{}", "application/json")
        assert e.value.code == 404
        e.value.close()
        with pytest.raises(TimeoutError, match="decode errors"):
            rx.wait_for(timeout=0.1)
