"""Every field of the public API through its extremes, against a real `dgemma serve` on 127.0.0.1.

gRPC: every field of every request message (walked from the proto's descriptors, nested and repeated ones
included) gets 0, -1, its type's limits, inf and NaN, empty and huge strings, unknown enum numbers, empty and huge
lists, wrong roles. HTTP: every body field of every route (the request models' own fields, the OpenAI fields this
server ignores or refuses, nested ones) and the request headers get the same, plus wrong JSON types.

Each call, one field off a valid request at a time, must end as the API documents it: OK, or INVALID_ARGUMENT
(HTTP 400/404/413) naming the field it was given (413: the body). Afterwards: no backend restart, no INTERNAL,
no ERROR line or traceback in the server's logs, and health is SERVING.
"""

from __future__ import annotations

import json
import math
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from service.api.diffusiongemma.v1 import diffusiongemma_pb2 as pb
from service.front.openai_schema import IGNORED, UNSUPPORTED, ChatRequest, CompletionRequest, TokenizeRequest
from tests.e2e.conftest import Serve
from tests.reliability.rpc import call_rpc

DEADLINE_S, WALL_LIMIT_S, THREADS = 60.0, 600, 2
ENV = {"NIM_LOG_LEVEL": "WARNING", "NIM_SHUTDOWN_DRAIN_DELAY": "0", "NIM_MAX_NEW_TOKENS_LIMIT": "256",
       "NIM_MAX_DENOISING_STEPS_LIMIT": "16"}
I32, I64, U64 = (-2**31, 2**31 - 1), (-2**63, 2**63 - 1), (0, 2**64 - 1)
BIG = "x" * 200_000  # over the prompt's byte cap (128 KiB), under gRPC's message cap (1 MiB)
STRINGS = ["", "\n", "\x00", "tool", "\u202e😀", "{{", BIG]
FLOATS = [0.0, -1.0, 1e-45, 3.4e38, -3.4e38, math.inf, -math.inf, math.nan]
FAST = pb.DiffusionParameters(max_denoising_steps=2)
OPTIONS = pb.GenerationOptions(parameters=FAST)


def grpc_bases() -> list[tuple[str, Message]]:
    chat = pb.Chat(messages=[pb.ChatMessage(role="user", content="hi")])
    hole = pb.TemplatePart(hole=pb.Hole(name="n", type=pb.HOLE_TYPE_NUMBER, length_tokens=2))
    return [
        ("Generate", pb.GenerateRequest(text="def ", max_new_tokens=8, options=OPTIONS)),
        ("Generate", pb.GenerateRequest(chat=chat, max_new_tokens=8, options=OPTIONS)),
        ("Generate", pb.GenerateRequest(token_ids=pb.TokenIds(ids=[2, 10, 11]), max_new_tokens=8, options=OPTIONS)),
        ("GenerateStream", pb.GenerateRequest(text="def ", max_new_tokens=8, options=OPTIONS, return_drafts=True)),
        ("Infill", pb.InfillRequest(prefix="def f(", suffix="):\n", gap_tokens=4, options=OPTIONS)),
        ("Edit", pb.EditRequest(text="x = 1\n", editable=[pb.Span(start=4, end=5)], instruction="two",
                                options=OPTIONS)),
        ("Template", pb.TemplateRequest(skeleton='{"a": {{a:number:2}}}', instruction="one", options=OPTIONS)),
        ("Template", pb.TemplateRequest(parts=[pb.TemplatePart(literal="n = "), hole], options=OPTIONS)),
        ("Tokenize", pb.TokenizeRequest(text="def f():")),
        ("Tokenize", pb.TokenizeRequest(chat=chat)),
        ("ListModels", pb.ListModelsRequest()),
    ]


def scalar_extremes(fd: FieldDescriptor) -> list:
    t = fd.type
    if t in (fd.TYPE_FLOAT, fd.TYPE_DOUBLE):
        return FLOATS
    if t in (fd.TYPE_INT32, fd.TYPE_SINT32, fd.TYPE_SFIXED32):
        return [0, -1, 1, *I32]
    if t in (fd.TYPE_INT64, fd.TYPE_SINT64, fd.TYPE_SFIXED64):
        return [0, -1, *I64]
    if t in (fd.TYPE_UINT32, fd.TYPE_FIXED32, fd.TYPE_UINT64, fd.TYPE_FIXED64):
        return [0, 1, 2**63, U64[1] if t in (fd.TYPE_UINT64, fd.TYPE_FIXED64) else 2**32 - 1]
    if t == fd.TYPE_BOOL:
        return [True, False]
    if t == fd.TYPE_ENUM:  # open enums: unknown numbers arrive as such
        return [*(v.number for v in fd.enum_type.values), 99, -1, I32[1]]
    if t == fd.TYPE_STRING:
        return STRINGS
    raise AssertionError(f"no extremes for {fd.full_name}")


def grpc_cases(method: str, base: Message) -> list[tuple[str, str, Message]]:
    """(method, field path, request) with one field of `base` set to an extreme."""
    out = []

    def variant(path: list, value) -> Message:
        msg = type(base)()
        msg.CopyFrom(base)
        target = msg
        for name, index in path[:-1]:
            target = getattr(target, name)
            if index is not None:
                target = target[index] if len(target) > index else target.add()
        name, _ = path[-1]
        fd = target.DESCRIPTOR.fields_by_name[name]
        if fd.is_repeated:
            del getattr(target, name)[:]
            getattr(target, name).extend(value)
        elif fd.type == fd.TYPE_MESSAGE:
            getattr(target, name).CopyFrom(value)
        else:
            setattr(target, name, value)
        return msg

    def walk(desc, path: list, depth: int) -> None:
        for fd in desc.fields:
            here = path + [(fd.name, None)]
            label = ".".join(n if i is None else f"{n}[{i}]" for n, i in here)
            if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
                continue  # no request has map fields
            if fd.type == fd.TYPE_MESSAGE:
                if fd.is_repeated:
                    one = fd.message_type._concrete_class()
                    for value in ([], [one] * 1000):
                        out.append((method, label, variant(here, value)))
                    if depth < 3:
                        walk(fd.message_type, path + [(fd.name, 0)], depth + 1)
                elif depth < 3:
                    walk(fd.message_type, here, depth + 1)
                continue
            extremes = scalar_extremes(fd)
            if fd.is_repeated:
                # one element of each extreme, and 20,000 of a short one (20,000 x 200 KB would be 4 GB a message)
                short = next(v for v in extremes if v != BIG and v not in ("",))
                values = [[], *([v] for v in extremes), [short] * 20_000]
            else:
                values = extremes
            for v in values:
                out.append((method, label, variant(here, v)))

    walk(base.DESCRIPTOR, [], 0)
    return out


OK_OR_INVALID = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT}


def names_in(label: str) -> set[str]:
    """The names along a field path ("options.parameters.t_min" -> options, parameters, t_min)."""
    return {part.split("[")[0] for part in label.replace("[", ".[").split(".") if part and part[0] != "["}


# Fields whose values are checked against each other: an error may name either one.
RELATED = [{"t_min", "t_max"}, {"text", "editable"}, {"parts", "skeleton"}, {"prompt", "messages"},
           {"stream", "stream_options"}, {"tools", "tool_choice"}]


def names_the_field(named: str, label: str) -> bool:
    """`named` (the error's field path) is the varied field `label`, a field along its path, or its partner."""
    given, varied = names_in(named), names_in(label)
    return bool(given & varied) or any(given & pair and varied & pair for pair in RELATED)


# ---- HTTP ---------------------------------------------------------------------------------------------------

HTTP_VALUES = [0, -1, 1, 2**31 - 1, 2**31, 2**63, 2**64, 1e300, -1e300, math.nan, math.inf, "", "abc", "\n",
               BIG, [], [1], ["a"], {}, None, True]
HEADERS = {"x-request-timeout": ["0", "-1", "inf", "nan", "1e300", "abc", "", "5"],
           "x-request-id": ["", "a\tb", "a b", "x" * 200, "é", "ok-id"]}
SHORT = {"max_tokens": 8, "max_denoising_steps": 2}
HTTP_BASES = [
    ("/v1/completions", CompletionRequest, {"prompt": "def ", **SHORT}),
    ("/v1/completions", CompletionRequest, {"prompt": "def f(", "suffix": "):\n", "max_tokens": 4,
                                            "max_denoising_steps": 2}),
    ("/v1/chat/completions", ChatRequest, {"messages": [{"role": "user", "content": "hi"}], **SHORT}),
    ("/v1/tokenize", TokenizeRequest, {"prompt": "def f():"}),
    ("/v1/chat/completions", ChatRequest, {  # a forced tool call: the structured-output path
        "messages": [{"role": "user", "content": "hi"}], "max_denoising_steps": 2, "tool_choice": "required",
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {"a": {"type": "string", "maxLength": 4}, "b": {"type": "boolean"}}}}}]}),
]
NESTED = {"messages[0]": ["role", "content", "name"], "stream_options": ["include_usage"]}


def http_cases() -> list[tuple[str, str, dict, dict]]:
    """(path, field, body, headers) with one field of a base body (or one header) set to an extreme."""
    out = []
    for path, model, base in HTTP_BASES:
        fields = set(model.model_fields) | set(IGNORED) | set(UNSUPPORTED) | {"an_unknown_field"}
        for name in sorted(fields):
            for v in HTTP_VALUES:
                out.append((path, name, {**base, name: v}, {}))
        if "messages" in base:
            for name in NESTED["messages[0]"]:
                for v in HTTP_VALUES:
                    out.append((path, f"messages[0].{name}", {**base, "messages": [{**base["messages"][0], name: v}]},
                                {}))
        if "stream" in model.model_fields:
            for v in HTTP_VALUES:
                out.append((path, "stream_options.include_usage",
                            {**base, "stream": True, "stream_options": {"include_usage": v}}, {}))
        for header, values in HEADERS.items():
            for v in values:
                out.append((path, header, base, {header: v}))
    return out


def call_http(srv: Serve, path: str, body: dict, headers: dict) -> tuple[int, dict | None, bytes]:
    data = json.dumps(body).encode()  # NaN and Infinity go out as JSON's common extension, as Python's clients send
    req = urllib.request.Request(srv.http_url + path, data=data, method="POST",
                                 headers={"content-type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=DEADLINE_S) as r:
            raw = r.read()
            status = r.status
    except urllib.error.HTTPError as e:
        raw, status = e.read(), e.code
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = None  # an SSE stream
    return status, doc, raw


# ---- the test -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def extremes_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("extremes")
    srv = Serve(tmp, ENV, api_key=None)
    srv.tmp = tmp
    yield srv
    assert srv.stop() == 0


def test_every_field_through_its_extremes(extremes_server):
    srv = extremes_server
    stub = srv.stub()
    deadline = time.monotonic() + WALL_LIMIT_S
    cases = [c for method, base in grpc_bases() for c in grpc_cases(method, base)]
    web = http_cases()
    assert len(cases) > 500 and len(web) > 500, (len(cases), len(web))

    def grpc_one(case) -> str | None:
        method, label, msg = case
        assert time.monotonic() < deadline, "the walk ran past its wall-clock limit"
        code, details = call_rpc(stub, method, method == "GenerateStream", msg, DEADLINE_S)
        if code not in OK_OR_INVALID:
            return f"{method} {label}: {code.name} {details[:200]}"
        named = details.split(":", 1)[0]
        if code == grpc.StatusCode.INVALID_ARGUMENT and not names_the_field(named, label):
            return f"{method} {label}: INVALID_ARGUMENT names {named!r}: {details[:200]}"
        return None

    def http_one(case) -> str | None:
        path, field, body, headers = case
        assert time.monotonic() < deadline, "the walk ran past its wall-clock limit"
        status, doc, raw = call_http(srv, path, body, headers)
        if status == 200:
            bad = b"internal_error" in raw or b'"error"' in raw
            return f"POST {path} {field}: 200 with an error: {raw[-300:]!r}" if bad else None
        if status not in (400, 404, 413) or not doc or "error" not in doc:
            return f"POST {path} {field}={str(body.get(field, headers))[:40]}: {status} {raw[:200]!r}"
        param = doc["error"].get("param") or ""
        if status == 413:
            return None if param == "body" else f"POST {path} {field}: 413 names {param!r}"
        if not names_the_field(param, field):
            return f"POST {path} {field}={str(body.get(field, headers))[:40]}: {status} names {param!r}: {raw[:200]!r}"
        return None

    with ThreadPoolExecutor(THREADS) as pool:
        bad = [b for b in pool.map(grpc_one, cases) if b] + [b for b in pool.map(http_one, web) if b]
    assert not bad, "\n".join(bad[:30])

    assert srv.health() == "SERVING"
    assert not srv.metric("dgemma_front_backend_restarts_total"), "a request restarted the backend"
    assert srv.metric("dgemma_front_requests_total", code="INTERNAL") is None
    logs = [srv.log, srv.tmp / "triton.log"]
    errors = [ln for p in logs if p.exists() for ln in p.read_text(errors="replace").splitlines()
              if " ERROR " in ln or '"level": "ERROR"' in ln or "Traceback" in ln]
    assert not errors, "\n".join(errors[:20])
