"""One call of any RPC of the public API, its status and details back (the fuzz and the extremes walk)."""

from __future__ import annotations

import grpc
from google.protobuf.message import Message


def call_rpc(stub, method: str, streaming: bool, msg: Message, timeout: float) -> tuple[grpc.StatusCode, str]:
    try:
        if streaming:
            for _ in getattr(stub, method)(msg, timeout=timeout):
                pass
        else:
            getattr(stub, method)(msg, timeout=timeout)
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
