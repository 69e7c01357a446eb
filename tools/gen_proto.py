"""Generate the Python gRPC stubs of proto/diffusiongemma/v1 into service/api/ (`make proto`).

The stubs are committed; tests/api/test_stubs_current.py regenerates them into a temporary directory
and fails when the committed ones differ.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO = "proto/diffusiongemma/v1/diffusiongemma.proto"
GENERATED = ("diffusiongemma_pb2.py", "diffusiongemma_pb2.pyi", "diffusiongemma_pb2_grpc.py")
PACKAGE_DIR = Path("service/api/diffusiongemma/v1")


def generate(out_dir: Path) -> list[Path]:
    """Run protoc; the proto directory is mapped to service/api so imports read service.api.…; returns the files."""
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    args = ["protoc", f"-Iservice/api={ROOT / 'proto'}", f"--python_out={out_dir}", f"--pyi_out={out_dir}",
            f"--grpc_python_out={out_dir}", str(ROOT / PROTO)]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return [out_dir / PACKAGE_DIR / name for name in GENERATED]


if __name__ == "__main__":
    files = generate(ROOT)
    print("\n".join(str(f.relative_to(ROOT)) for f in files))
    sys.exit(0)
