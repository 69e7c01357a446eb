"""catalog-info.yaml: a Backstage Component and its gRPC API entity, pointing at files that exist."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
ENTITY_NAME = re.compile(r"^[a-z0-9A-Z]([-_.]?[a-z0-9A-Z])*$")  # Backstage's name rule (63 chars at most)


def entities() -> dict[str, dict]:
    docs = list(yaml.safe_load_all((ROOT / "catalog-info.yaml").read_text()))
    return {d["kind"]: d for d in docs}


def local(url: str) -> Path:
    assert url.startswith("./"), url
    return ROOT / url[2:]


def test_component_and_api_entities():
    e = entities()
    assert set(e) == {"Component", "API"}
    for entity in e.values():
        assert entity["apiVersion"] == "backstage.io/v1alpha1"
        name = entity["metadata"]["name"]
        assert ENTITY_NAME.match(name) and len(name) <= 63
        spec = entity["spec"]
        assert spec["owner"] and spec["lifecycle"] in ("experimental", "production", "deprecated")
    assert e["Component"]["spec"]["providesApis"] == [e["API"]["metadata"]["name"]]
    assert e["API"]["spec"]["type"] == "grpc"


def test_api_definition_is_the_proto():
    proto = local(entities()["API"]["spec"]["definition"]["$text"])
    assert proto.is_file() and proto.suffix == ".proto"
    assert "service DiffusionGemma" in proto.read_text() and "package diffusiongemma.v1;" in proto.read_text()


def test_links_point_at_the_docs_and_the_chart():
    e = entities()
    urls = [link["url"] for entity in e.values() for link in entity["metadata"]["links"]]
    for url in urls:
        assert local(url).exists(), url
    assert "./docs/operations.md" in urls and "./helm/diffusiongemma" in urls
    assert (local("./helm/diffusiongemma") / "Chart.yaml").is_file()
