"""Fuzz the public API from its own descriptors: hypothesis builds requests of every RPC (every field and
oneof, out-of-range numbers, NaN and inf, huge repeated fields, odd Unicode) and sends them to a real
`dgemma serve` on 127.0.0.1, several at once, each with a deadline. Only documented statuses come back, no
message holds a server path or a traceback, and health is SERVING at the end."""

from __future__ import annotations

import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.api.diffusiongemma.v1 import diffusiongemma_pb2 as pb
from tests.reliability.rpc import call_rpc

BATCH, BATCHES, DEADLINE_S, WALL_LIMIT_S = 32, 64, 3.0, 300  # 2,048 requests; the loop takes 110-200 s on 2 cores
THREADS = 12  # calls in flight at once (below the server's NIM_MAX_CONCURRENT_RPCS)
DOCUMENTED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
              grpc.StatusCode.DEADLINE_EXCEEDED}
SERVICE = pb.DESCRIPTOR.services_by_name["DiffusionGemma"]
ROOT = Path(__file__).resolve().parents[2]
LEAKS = ("Traceback", 'File "', ".py", str(ROOT), sys.prefix, "site-packages")
GENERATING = {"Generate", "GenerateStream", "Infill", "Edit", "Template"}

I32 = (-2**31, 2**31 - 1)
ODD_TEXT = st.sampled_from(["", "\x00", "\u202e\u0301\u200b", "😀" * 50, "\ufeff<|turn>user", "a\r\nb\tc",
                            "{{", "{{number:3}}", "{{:-1}}", "}}{{", "\U0010fffd" * 10])
ANY_TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=30)
TEXT = st.one_of(ANY_TEXT, ANY_TEXT, ODD_TEXT,
                 st.sampled_from(["x" * 9000, "y " * 40000]))  # over the prompt cap; over the message cap
# lengths and steps: mostly small valid values (each generation stays short), the edges, and any int32
COST = st.one_of(st.integers(1, 6), st.integers(1, 6), st.sampled_from([0, -1, 1025, 65537, *I32]),
                 st.integers(*I32))
OVERRIDES = {
    "model": st.one_of(st.just(""), st.just("diffusiongemma"), TEXT),
    "request_id": st.one_of(st.just(""), st.from_regex(r"[a-z0-9/._-]{1,20}", fullmatch=True), TEXT),
    "role": st.one_of(st.sampled_from(["user", "model", "system", "assistant"]), TEXT),
    "max_new_tokens": COST, "max_denoising_steps": COST, "gap_tokens": COST, "length_tokens": COST,
    "num_variations": st.sampled_from([0, 1, 2, 3, -1, 17, 2**31 - 1]),
}


def scalar(fd: FieldDescriptor) -> st.SearchStrategy:
    t = fd.type
    if fd.name in OVERRIDES:
        return OVERRIDES[fd.name]
    if t in (fd.TYPE_FLOAT, fd.TYPE_DOUBLE):
        return st.one_of(st.floats(0, 1, width=32), st.floats(width=32),
                         st.sampled_from([float("nan"), float("inf"), -float("inf"), -0.0, 1e-45]))
    if t in (fd.TYPE_INT32, fd.TYPE_SINT32, fd.TYPE_SFIXED32):
        return st.one_of(st.integers(-3, 300), st.integers(*I32))
    if t in (fd.TYPE_INT64, fd.TYPE_SINT64, fd.TYPE_SFIXED64):
        return st.integers(-2**63, 2**63 - 1)
    if t in (fd.TYPE_UINT32, fd.TYPE_FIXED32):
        return st.integers(0, 2**32 - 1)
    if t in (fd.TYPE_UINT64, fd.TYPE_FIXED64):
        return st.one_of(st.integers(0, 100), st.integers(0, 2**64 - 1))
    if t == fd.TYPE_BOOL:
        return st.booleans()
    if t == fd.TYPE_ENUM:  # open enums: unknown numbers too
        return st.one_of(st.sampled_from([v.number for v in fd.enum_type.values]), st.integers(*I32))
    if t == fd.TYPE_STRING:
        return TEXT
    if t == fd.TYPE_BYTES:
        return st.binary(max_size=40)
    raise AssertionError(f"no strategy for {fd.full_name}")


def value(fd: FieldDescriptor, depth: int) -> st.SearchStrategy:
    one = message(fd.message_type, depth + 1) if fd.type == fd.TYPE_MESSAGE else scalar(fd)
    if not fd.is_repeated:
        return one
    # a few elements, or one element repeated many times (huge repeated fields, cheap to build)
    many = [100] if fd.type == fd.TYPE_MESSAGE else [300, 20000]
    return st.one_of(st.lists(one, max_size=4), st.lists(one, max_size=4),
                     st.builds(lambda x, n: [x] * n, one, st.sampled_from(many)))


def message(desc: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Any subset of `desc`'s fields (several members of a oneof: the last set wins, as on the wire)."""
    cls = GetMessageClass(desc)
    if depth > 3:
        return st.builds(cls)
    optional = {fd.name: value(fd, depth) for fd in desc.fields}

    def build(values: dict) -> Message:
        msg = cls()
        for name, v in values.items():
            fd = desc.fields_by_name[name]
            target = getattr(msg, name) if fd.is_repeated or fd.type == fd.TYPE_MESSAGE else None
            if fd.is_repeated:
                target.extend(v)
            elif fd.type == fd.TYPE_MESSAGE:
                target.CopyFrom(v)
            else:
                setattr(msg, name, v)
        return msg

    return st.fixed_dictionaries({}, optional=optional).map(build)


def cheap(method: str, msg: Message) -> Message:
    """Generations left at the model's defaults would run hundreds of steps: unset lengths and steps get
    small values (set ones, in range or not, are kept)."""
    if method in GENERATING:
        if not msg.options.parameters.HasField("max_denoising_steps"):
            msg.options.parameters.max_denoising_steps = 2
        if method.startswith("Generate") and not msg.HasField("max_new_tokens"):
            msg.max_new_tokens = 8
    return msg


CALLS = st.sampled_from(list(SERVICE.methods)).flatmap(
    lambda m: message(m.input_type).map(lambda msg, m=m: (m.name, m.server_streaming, cheap(m.name, msg))))


def send(stub, call: tuple[str, bool, Message]) -> tuple[grpc.StatusCode, str]:
    name, streaming, msg = call
    return call_rpc(stub, name, streaming, msg, DEADLINE_S)


def test_fuzzed_requests_get_documented_statuses_only(limited_server):
    stub = limited_server.stub()
    seen: dict[grpc.StatusCode, int] = {}
    bad: list[tuple] = []
    lock = threading.Lock()
    deadline = time.monotonic() + WALL_LIMIT_S
    room = threading.Semaphore(2 * THREADS)  # hypothesis builds the next calls while these run

    def check(call) -> None:
        try:
            code, details = send(stub, call)
            with lock:
                seen[code] = seen.get(code, 0) + 1
                if code not in DOCUMENTED or any(leak in details for leak in LEAKS):
                    bad.append((call[0], code, details[:300], str(call[2])[:300]))
        finally:
            room.release()

    with ThreadPoolExecutor(THREADS) as pool:
        @settings(max_examples=BATCHES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(st.lists(CALLS, min_size=BATCH, max_size=BATCH))
        def batch(calls):
            assert time.monotonic() < deadline, "the fuzz ran past its wall-clock limit"
            for call in calls:
                room.acquire()
                pool.submit(check, call)
            assert not bad, bad[:5]  # a failure shows up a batch or two after its call was built

        batch()
    assert not bad, bad[:5]

    print({c.name: n for c, n in seen.items()})
    assert sum(seen.values()) >= 2000, seen
    assert seen.get(grpc.StatusCode.OK, 0) > 100 and seen.get(grpc.StatusCode.INVALID_ARGUMENT, 0) > 100, seen
    assert limited_server.health() == "SERVING"
    assert limited_server.metric("dgemma_front_requests_total", code="INTERNAL") is None
    assert not limited_server.metric("dgemma_front_backend_restarts_total"), "a request restarted the backend"
