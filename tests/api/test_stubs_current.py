"""The committed gRPC stubs are what protoc makes of the committed proto."""

from pathlib import Path

from tools.gen_proto import GENERATED, PACKAGE_DIR, ROOT, generate


def test_committed_stubs_match_the_proto(tmp_path):
    for fresh in generate(tmp_path):
        committed = ROOT / PACKAGE_DIR / fresh.name
        assert committed.read_bytes() == fresh.read_bytes(), f"{committed} is stale: run `make proto`"
    assert sorted(p.name for p in (ROOT / PACKAGE_DIR).glob("diffusiongemma_pb2*")) == sorted(GENERATED)


def test_stubs_import_and_describe_the_service():
    from service.api.diffusiongemma.v1 import diffusiongemma_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["DiffusionGemma"]
    assert service.full_name == "diffusiongemma.v1.DiffusionGemma"
    assert {m.name for m in service.methods} == {
        "Generate", "GenerateStream", "Infill", "Edit", "Template", "Tokenize", "ListModels", "Score"}
    assert Path(pb.__file__).parent == ROOT / PACKAGE_DIR
