"""Static rules of the Dockerfile (no Docker engine runs here, so the image itself is not built in CI)."""

from __future__ import annotations

import re
import tomllib

import dockerfile
import pytest
from packaging.specifiers import SpecifierSet

from tests.packaging.dockerfile_spec import DOCKERFILE, INIT, ROOT, Stage, image_argv, program_argv, stages
from tests.serve_ports import listening_ports

BASE = re.compile(r"^nvcr\.io/nvidia/tritonserver:(\d{2})\.(\d{2})-py3$")
SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL|NGC_API", re.I)
OCI = ("title", "description", "version", "revision", "licenses", "source", "documentation")


@pytest.fixture(scope="module")
def all_stages() -> list[Stage]:
    return stages()


@pytest.fixture(scope="module")
def final(all_stages) -> Stage:
    return all_stages[-1]


def test_parses_with_dockers_parser():
    cmds = dockerfile.parse_file(str(DOCKERFILE))
    assert cmds[0].cmd == "FROM"


def test_multi_stage_on_ngc_triton_pinned_by_tag(all_stages):
    assert len(all_stages) >= 2
    tags = set()
    for s in all_stages:
        m = BASE.match(s.image)
        assert m, f"stage {s.name}: base must be nvcr.io/nvidia/tritonserver:<yy.mm>-py3, got {s.image}"
        tags.add(s.image)
    assert len(tags) == 1, "build and runtime stages must share one base (the venv's Python must match)"


def test_requires_python_admits_the_image_python(all_stages):
    """NGC Triton 25.x images run Python 3.12 (shared/FACTS.md); the Python backend stub imports the project."""
    yy = int(BASE.match(all_stages[-1].image).group(1))
    assert yy == 25, "another base year: check its Python and update this rule with it"
    spec = SpecifierSet(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"])
    assert "3.12" in spec and "3.11" in spec


def test_runs_as_a_non_root_user(final):
    users = final.all("USER")
    assert users, "the runtime stage must set USER"
    uid = users[-1].value[0].split(":")[0]
    assert uid.isdigit() and int(uid) > 0, "USER must be a numeric non-root uid (runAsNonRoot can check it)"
    last_user = max(c.start_line for c in users)
    assert all(c.start_line < last_user for c in final.all("RUN")), "no RUN after USER"
    chart = (ROOT / "helm/diffusiongemma/values.yaml").read_text()
    assert f"runAsUser: {uid}" in chart, "the chart runs the image's user"


def test_writable_paths_are_only_the_declared_ones(final):
    env = final.env()
    declared = {env["NIM_CACHE_PATH"], env["HOME"]}
    volumes = {v for c in final.all("VOLUME") for v in c.value}
    assert env["NIM_CACHE_PATH"] == "/opt/nim/.cache" and volumes == {"/opt/nim/.cache"}
    for c in final.all("RUN"):
        text = " ".join(c.value)
        assert "chmod" not in text or "777" not in text
        for m in re.finditer(r"chown\s+(?:-R\s+)?\S+\s+(\S+)", text):
            assert m.group(1) in declared, f"chown of an undeclared path: {m.group(1)}"
    for c in final.all("COPY"):
        assert not [f for f in c.flags if f.startswith("--chown") or f.startswith("--chmod")], \
            f"runtime files stay root-owned: {c.original}"
    assert "--home-dir " + env["HOME"] in " ".join(final.all("RUN")[0].value)


def test_embedded_model_is_installed_as_package_data():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "assets/**/*" in pyproject["tool"]["setuptools"]["package-data"]["service"]
    text = DOCKERFILE.read_text()
    assert "COPY service ./service" in text and "pip install '.[build]'" in text
    assert "DEFAULT_CHECKPOINT / 'config.json'" in text  # the build fails if the model did not make it in


def test_the_image_can_run_the_build_stage():
    """`dgemma build` in the image: engine_build is copied and the build extra (ModelOpt) installed and imported."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert any(d.startswith("nvidia-modelopt==") for d in pyproject["project"]["optional-dependencies"]["build"])
    assert "engine_build*" in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    text = DOCKERFILE.read_text()
    assert "COPY engine_build ./engine_build" in text
    assert "import engine_build.build, modelopt.torch.quantization" in text


def test_venv_on_path_is_the_one_built(all_stages, final):
    build = all_stages[0]
    venv = "/opt/dgemma/venv"
    assert any(f"python3 -m venv {venv}" in " ".join(c.value) for c in build.all("RUN"))
    copies = [c for c in final.all("COPY") if f"--from={build.name}" in c.flags]
    assert copies and copies[0].value == (venv, venv)
    assert final.env()["PATH"].startswith(f"{venv}/bin:")


def test_entrypoint_is_dgemma_serve_with_the_images_tritonserver(final):
    assert program_argv(final) == ["dgemma", "serve"]
    env = final.env()
    assert "TRITONSERVER" not in env  # the launcher then takes /opt/tritonserver/bin/tritonserver
    from service.triton import launcher
    assert str(launcher.NGC_BINARY) == "/opt/tritonserver/bin/tritonserver"


def test_healthcheck_uses_the_grpc_health_service(final):
    (hc,) = final.all("HEALTHCHECK")
    argv = final.exec_form("HEALTHCHECK")
    assert argv[:2] == ["dgemma", "health"]
    flags = dict(f.lstrip("-").split("=", 1) for f in hc.flags)
    assert {"interval", "timeout", "start-period", "retries"} <= set(flags)
    # the health client dials DGEMMA_SERVER: the same port the server listens on
    env = final.env()
    assert env["DGEMMA_SERVER"] == f"127.0.0.1:{env['NIM_SERVER_PORT']}"


def test_every_port_the_server_listens_on_is_exposed(final):
    """The ports `dgemma serve` listens on with the image's environment, as its own config code reads it."""
    env = {k: v for k, v in final.env().items() if k.startswith("NIM_")}
    ports = set(listening_ports(env).values())
    exposed = {int(p.split("/")[0]) for c in final.all("EXPOSE") for p in c.value}
    assert ports <= exposed, f"not EXPOSEd: {sorted(ports - exposed)}"
    assert ports == set(listening_ports({}).values()), "the image moves a port off the server's default"


def test_pid_1_is_tini_from_the_distros_packages(all_stages, final):
    """PID 1 reaps orphaned processes (Triton's children) and forwards signals: tini, not dgemma itself."""
    argv = image_argv(final)
    assert argv[:len(INIT)] == INIT and argv[len(INIT)] == "dgemma", argv
    assert "-g" not in argv[:argv.index("--")], "SIGTERM goes to dgemma alone: it stops Triton in its order"
    users = [c.start_line for c in final.all("USER")]
    installs = [c for c in final.all("RUN") if re.search(r"apt-get install\b[^&;]*\btini\b", " ".join(c.value))]
    assert installs and installs[0].start_line < min(users), "tini is installed by apt in the runtime stage"
    assert "tini" not in str(final.env()), "no TINI_* settings or a copied binary: the package's /usr/bin/tini"
    for s in all_stages:
        assert not [c for c in s.all("COPY") + s.all("ADD") if "tini" in " ".join(c.value)]


def test_oci_labels(final):
    labels = final.labels()
    for key in OCI:
        assert labels.get(f"org.opencontainers.image.{key}"), f"missing OCI label {key}"
    assert labels["org.opencontainers.image.version"] == "${VERSION}"
    args = {c.value[0].split("=")[0]: c.value[0].split("=", 1)[1] for c in final.all("ARG")}
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert args["VERSION"] == version


def test_no_secrets_in_any_layer(all_stages):
    for s in all_stages:
        for name in list(s.env()) + [c.value[0].split("=")[0] for c in s.all("ARG")]:
            assert not SECRET_NAME.search(name), f"stage {s.name}: {name} looks like a secret"
        assert not s.all("ADD"), "ADD fetches URLs and unpacks archives: use COPY"
        for c in s.all("COPY"):
            for src in c.value[:-1]:
                assert not re.search(r"\.(pem|key|crt|p12)$|\.env$|netrc|\.ssh", src), c.original
        for c in s.all("RUN"):
            text = " ".join(c.value)
            assert not re.search(r"(curl|wget)[^|]*\|\s*(ba)?sh", text), c.original
            assert not re.search(r"NIM_API_KEYS=|--password|token=", text, re.I), c.original
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ignore[ignore.index("*")] == "*", ".dockerignore must be an allow-list"
    assert {"**/*.pem", "**/*.key", "**/.env"} <= set(ignore)


def test_copied_sources_exist_and_are_allowed_by_dockerignore(all_stages):
    allowed = [line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().split() if line.startswith("!")]
    for s in all_stages:
        for c in s.all("COPY"):
            if any(f.startswith("--from") for f in c.flags):
                continue
            for src in c.value[:-1]:
                assert (ROOT / src).exists(), src
                assert src.rstrip("/") in allowed, f"{src} is not in the .dockerignore allow-list"
