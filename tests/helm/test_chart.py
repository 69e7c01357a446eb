"""The Helm chart, rendered by Helm's own engine (helm-python-sdk), linted, validated against the Kubernetes
schemas (kubernetes-validate) and held to the hardening policy, for the defaults and every example values file."""

from __future__ import annotations

from pathlib import Path

import helm_python
import kubernetes_validate
import pytest
import yaml

from tests.serve_ports import listening_ports

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "diffusiongemma"
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
CASES = {"defaults": {}} | {p.stem: yaml.safe_load(p.read_text()) for p in EXAMPLES}
# The oldest Kubernetes the chart admits (Chart.yaml kubeVersion) and the newest schemas at hand.
KUBE_VERSIONS = ("1.27.0", kubernetes_validate.latest_version())
# Custom resources: no Kubernetes schema covers them; their shape is checked by the tests below instead.
CRD_KINDS = {"ServiceMonitor", "GRPCRoute"}
WORKLOAD_KINDS = {"Deployment", "Pod", "Job"}


def test_every_documented_example_is_here():
    assert {p.stem for p in EXAMPLES} == {"gpu", "cpu-demo", "tls-api-keys", "headless", "grpcroute", "build-fp8"}
    documented = (ROOT / "docs" / "operations.md").read_text()
    assert all(f"`{p.name}`" in documented for p in EXAMPLES)


@pytest.fixture(scope="module")
def chart():
    return helm_python.Chart.load(CHART)


def render(chart, values: dict) -> list[dict]:
    out = chart.render(values, name="rel", namespace="ns")
    docs = []
    for path, text in out.items():
        if path.endswith("NOTES.txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


@pytest.fixture(scope="module", params=sorted(CASES))
def rendered(request, chart):
    return request.param, render(chart, CASES[request.param])


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def deployment(docs: list[dict]) -> dict:
    (dep,) = by_kind(docs, "Deployment")
    return dep


def env_of(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def test_lint_reports_no_errors():
    report = helm_python.lint(CHART, strict=False)
    errors = [m for m in report["messages"] if m["severity"] >= 3]
    assert report["errors"] == [] and errors == [], report
    for name, values in CASES.items():
        report = helm_python.lint(CHART, values)
        assert report["errors"] == [] and not [m for m in report["messages"] if m["severity"] >= 3], (name, report)


def test_every_manifest_validates_against_kubernetes_schemas(rendered):
    name, docs = rendered
    checked = 0
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            continue
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)  # raises ValidationError
        checked += 1
    assert checked >= 6, name


def test_validation_catches_a_broken_manifest(chart):
    """The validator used above does reject a bad field (so its silence above means something)."""
    dep = deployment(render(chart, {}))
    dep["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "eight thousand"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, KUBE_VERSIONS[-1], strict=True)


def test_workloads_are_hardened(rendered):
    name, docs = rendered
    workloads = [d for d in docs if d["kind"] in WORKLOAD_KINDS]
    # the server and the helm test pod (and the build Job where enabled)
    assert {d["kind"] for d in workloads} == {"Deployment", "Pod"} | ({"Job"} if name == "build-fp8" else set()), name
    for w in workloads:
        spec = w["spec"] if w["kind"] == "Pod" else w["spec"]["template"]["spec"]
        pod_sc = spec["securityContext"]
        assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] > 0
        assert pod_sc["seccompProfile"]["type"] == "RuntimeDefault"
        assert spec["automountServiceAccountToken"] is False
        for vol in spec.get("volumes", []):
            assert "hostPath" not in vol, (name, vol)
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True, (name, c["name"])
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["allowPrivilegeEscalation"] is False
            assert sc.get("privileged", False) is False
            assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add")
            assert sc["seccompProfile"]["type"] == "RuntimeDefault"
            assert c["resources"].get("requests") and c["resources"].get("limits"), (name, c["name"])
            # read-only root: every path the program writes is a volume (/tmp, HOME, NIM_CACHE_PATH, /dev/shm)
            mounts = {m["mountPath"] for m in c["volumeMounts"]}
            assert "/tmp" in mounts and env_of(c).get("HOME") == "/tmp"
            if w["kind"] == "Deployment" and c["name"] == "diffusiongemma":
                assert {"/opt/nim/.cache", "/dev/shm"} <= mounts
                assert env_of(c)["NIM_CACHE_PATH"] == "/opt/nim/.cache"
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    assert probe in c, (name, probe)


def test_pdb_and_network_policy_select_the_server_pods(rendered):
    name, docs = rendered
    selector = deployment(docs)["spec"]["selector"]["matchLabels"]
    (pdb,) = by_kind(docs, "PodDisruptionBudget")
    (netpol,) = by_kind(docs, "NetworkPolicy")
    assert pdb["spec"]["selector"]["matchLabels"] == selector
    assert netpol["spec"]["podSelector"]["matchLabels"] == selector
    assert set(netpol["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    # the helm test pod is not one of the server's pods (no Service would route to it)
    (test_pod,) = by_kind(docs, "Pod")
    assert not all(test_pod["metadata"]["labels"].get(k) == v for k, v in selector.items())


def test_probes_are_native_grpc_and_give_startup_its_budget(rendered):
    name, docs = rendered
    c = deployment(docs)["spec"]["template"]["spec"]["containers"][0]
    env = env_of(c)
    startup_timeout = int(env["NIM_STARTUP_TIMEOUT"])
    tls = env["NIM_SSL_MODE"] != "DISABLED"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        p = c[probe]
        if tls:  # the kubelet's gRPC probe is plaintext: the image's own TLS health client instead
            assert p["exec"]["command"][:2] == ["dgemma", "health"] and "--tls-ca" in p["exec"]["command"]
        else:
            assert p["grpc"]["port"] == int(env["NIM_SERVER_PORT"])
    s, live = c["startupProbe"], c["livenessProbe"]
    assert s["periodSeconds"] * s["failureThreshold"] >= startup_timeout + 60, name
    # liveness outlasts one in-process Triton restart (startup timeout + backoff) before killing the pod
    assert live["periodSeconds"] * live["failureThreshold"] >= startup_timeout + 120, name
    if not tls:
        assert c["readinessProbe"]["grpc"]["service"] == "diffusiongemma.v1.DiffusionGemma"


def test_termination_grace_outlasts_drain_and_triton_exit(rendered):
    name, docs = rendered
    spec = deployment(docs)["spec"]["template"]["spec"]
    env = env_of(spec["containers"][0])
    drain = float(env["NIM_SHUTDOWN_DRAIN_DELAY"]) + float(env["NIM_SHUTDOWN_GRACE_PERIOD"])
    triton_exit = 20 + 5  # TritonServer.stop: SIGINT, 20 s, then SIGKILL and 5 s (service/triton/launcher.py)
    assert spec["terminationGracePeriodSeconds"] > drain + triton_exit, name


def test_dev_shm_is_memory_backed_and_scratch_is_bounded(rendered):
    _, docs = rendered
    vols = {v["name"]: v for v in deployment(docs)["spec"]["template"]["spec"]["volumes"]}
    assert vols["shm"]["emptyDir"]["medium"] == "Memory" and vols["shm"]["emptyDir"]["sizeLimit"]
    assert vols["cache"]["emptyDir"]["sizeLimit"] and vols["tmp"]["emptyDir"]["sizeLimit"]


def test_gpu_defaults(chart):
    docs = render(chart, {})
    spec = deployment(docs)["spec"]["template"]["spec"]
    c = spec["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert env_of(c)["NIM_MODEL_PROFILE"] == "torch-bf16-any"
    (pvc,) = by_kind(docs, "PersistentVolumeClaim")
    store = {v["name"]: v for v in spec["volumes"]}["model-store"]
    assert store["persistentVolumeClaim"] == {"claimName": pvc["metadata"]["name"], "readOnly": True}
    assert {"name": "model-store", "mountPath": "/opt/nim/.cache/models", "readOnly": True} in c["volumeMounts"]
    assert c["args"] == ["serve"]
    assert not by_kind(docs, "HorizontalPodAutoscaler") and not by_kind(docs, "GRPCRoute")


def test_gpu_example(chart):
    docs = render(chart, CASES["gpu"])
    spec = deployment(docs)["spec"]["template"]["spec"]
    c = spec["containers"][0]
    assert env_of(c)["NIM_MODEL_PATH"] == "/opt/nim/.cache/models/diffusiongemma-26B-A4B-it"
    assert spec["nodeSelector"] and spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert "replicas" not in deployment(docs)["spec"]  # the HPA owns it
    (hpa,) = by_kind(docs, "HorizontalPodAutoscaler")
    metric = hpa["spec"]["metrics"][0]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "dgemma_queue_depth"
    (sm,) = by_kind(docs, "ServiceMonitor")
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    env = env_of(c)
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"].endswith(":4318")
    assert env["OTEL_EXPORTER_OTLP_PROTOCOL"] == "http/protobuf"
    assert "OTEL_SDK_DISABLED" not in env


def test_cpu_demo_has_no_gpu_and_no_store(chart):
    docs = render(chart, CASES["cpu-demo"])
    c = deployment(docs)["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in c["resources"]["limits"]
    assert env_of(c)["NIM_MODEL_PROFILE"] == "torch-fp32-cpu" and "NIM_MODEL_PATH" not in env_of(c)
    assert not by_kind(docs, "PersistentVolumeClaim")


def test_tls_and_api_keys_come_from_secrets(chart):
    docs = render(chart, CASES["tls-api-keys"])
    spec = deployment(docs)["spec"]["template"]["spec"]
    env = env_of(spec["containers"][0])
    assert env["NIM_SSL_MODE"] == "TLS"
    assert env["NIM_SSL_CERT_PATH"] == "/etc/dgemma/tls/tls.crt"
    assert env["NIM_SSL_KEY_PATH"] == "/etc/dgemma/tls/tls.key"
    assert env["NIM_API_KEYS_FILE"] == "/etc/dgemma/api-keys/keys" and "NIM_API_KEYS" not in env
    vols = {v["name"]: v for v in spec["volumes"]}
    assert vols["tls"]["secret"]["secretName"] == "diffusiongemma-tls"
    assert vols["api-keys"]["secret"]["secretName"] == "diffusiongemma-api-keys"
    assert vols["api-keys"]["secret"]["items"] == [{"key": "api-keys", "path": "keys"}]
    # no key or certificate material is written into any manifest
    for doc in docs:
        text = yaml.safe_dump(doc)
        assert "BEGIN" not in text and doc["kind"] != "Secret"
    (test_pod,) = by_kind(docs, "Pod")
    script = test_pod["spec"]["containers"][0]["args"][0]
    assert "--tls-ca /etc/dgemma/tls/ca.crt" in script and "DGEMMA_API_KEY" in script


def test_mtls_probes_present_the_client_certificate(chart):
    docs = render(chart, {"tls": {"mode": "MTLS", "secretName": "s"}})
    c = deployment(docs)["spec"]["template"]["spec"]["containers"][0]
    assert env_of(c)["NIM_SSL_CA_CERT_PATH"] == "/etc/dgemma/tls/ca.crt"
    assert "--tls-cert" in c["readinessProbe"]["exec"]["command"]


def test_headless_service(chart):
    docs = render(chart, CASES["headless"])
    services = {s["metadata"]["name"]: s for s in by_kind(docs, "Service")}
    headless = services["rel-diffusiongemma-headless"]
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["selector"] == deployment(docs)["spec"]["selector"]["matchLabels"]
    assert services["rel-diffusiongemma"]["spec"]["type"] == "ClusterIP"


def test_grpcroute(chart):
    docs = render(chart, CASES["grpcroute"])
    (route,) = by_kind(docs, "GRPCRoute")
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    assert route["spec"]["parentRefs"][0]["name"] == "inference-gateway"
    backend = route["spec"]["rules"][0]["backendRefs"][0]
    assert backend == {"name": "rel-diffusiongemma", "port": 8000}
    services = [m["method"]["service"] for m in route["spec"]["rules"][0]["matches"]]
    assert "diffusiongemma.v1.DiffusionGemma" in services


def test_helm_test_hook_checks_health_and_generates(rendered):
    name, docs = rendered
    (pod,) = by_kind(docs, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    c = pod["spec"]["containers"][0]
    script = c["args"][0]
    assert "dgemma health" in script and "dgemma generate" in script
    assert env_of(c)["DGEMMA_SERVER"] == "rel-diffusiongemma.ns.svc:8000"


@pytest.mark.parametrize("values, where", [
    ({"bogus": 1}, "additional properties 'bogus'"),
    ({"server": {"grpcPort": "8000"}}, "/server/grpcPort"),
    ({"server": {"grpcPrt": 8000}}, "additional properties 'grpcPrt'"),
    ({"gpu": {"count": -1}}, "/gpu/count"),
    ({"tls": {"mode": "ON"}}, "/tls/mode"),
    ({"securityContext": {"readOnlyRootFilesystem": False}}, "/securityContext/readOnlyRootFilesystem"),
    ({"podSecurityContext": {"runAsNonRoot": False}}, "/podSecurityContext/runAsNonRoot"),
    ({"grpcRoute": {"parentRefs": [{"name": "g", "nmespace": "x"}]}}, "additional properties 'nmespace'"),
    ({"server": {"limits": {"maxPromtTokens": 10}}}, "additional properties 'maxPromtTokens'"),
    ({"server": {"limits": {"streamBuffer": 0}}}, "/server/limits/streamBuffer"),
    ({"server": {"limits": {"maxRequestSeconds": "10m"}}}, "/server/limits/maxRequestSeconds"),
])
def test_schema_rejects_unknown_keys_and_wrong_types(chart, values, where):
    with pytest.raises(helm_python.HelmValuesError) as e:
        chart.render(values, name="rel", namespace="ns")
    assert where in str(e.value)


def test_limits_reach_the_server_as_nim_variables_only_when_set(chart):
    default_env = env_of(deployment(render(chart, {}))["spec"]["template"]["spec"]["containers"][0])
    assert not {"NIM_MAX_PROMPT_TOKENS", "NIM_MAX_MEMORY_BYTES", "NIM_MAX_REQUEST_SECONDS"} & set(default_env)
    limits = {"maxPromptTokens": 4096, "maxMemoryBytes": 21474836480, "maxRequestSeconds": 90.5,
              "maxNewTokensLimit": 0, "engineHeartbeatTimeoutSeconds": 10, "engineStepTimeoutSeconds": 300,
              "httpBodyTimeoutSeconds": 7.5, "tokenizerThreads": 8, "prefixCacheBytes": 0, "prefixChunkTokens": 512}
    env = env_of(deployment(render(chart, {"server": {"limits": limits}}))["spec"]["template"]["spec"]["containers"][0])
    # whole numbers print as integers (Helm reads values as float64), fractions as they are; 0 is a value
    assert {k: env.get(k) for k in ("NIM_MAX_PROMPT_TOKENS", "NIM_MAX_MEMORY_BYTES", "NIM_MAX_REQUEST_SECONDS",
                                    "NIM_MAX_NEW_TOKENS_LIMIT", "NIM_ENGINE_HEARTBEAT_TIMEOUT",
                                    "NIM_ENGINE_STEP_TIMEOUT", "NIM_HTTP_BODY_TIMEOUT", "NIM_TOKENIZER_THREADS",
                                    "NIM_PREFIX_CACHE_BYTES", "NIM_PREFIX_CHUNK_TOKENS")} == {
        "NIM_MAX_PROMPT_TOKENS": "4096", "NIM_MAX_MEMORY_BYTES": "21474836480", "NIM_MAX_REQUEST_SECONDS": "90.5",
        "NIM_MAX_NEW_TOKENS_LIMIT": "0", "NIM_ENGINE_HEARTBEAT_TIMEOUT": "10", "NIM_ENGINE_STEP_TIMEOUT": "300",
        "NIM_HTTP_BODY_TIMEOUT": "7.5", "NIM_TOKENIZER_THREADS": "8", "NIM_PREFIX_CACHE_BYTES": "0",
        "NIM_PREFIX_CHUNK_TOKENS": "512"}
    assert "NIM_STREAM_BUFFER" not in env


@pytest.mark.parametrize("values, message", [
    ({"model": {"path": "m"}, "modelStore": {"enabled": False}}, "enable modelStore"),
    ({"model": {"profile": "torch-fp32-cpu"}}, "set gpu.count to 0"),
    ({"gpu": {"count": 0}, "model": {"profile": "torch-fp8-hopper"}}, "set gpu.count >= 1"),
    ({"tls": {"mode": "TLS"}}, "tls.secretName is required"),
    ({"grpcRoute": {"enabled": True}}, "grpcRoute.parentRefs"),
    ({"otel": {"enabled": True}}, "otel.endpoint is required"),
])
def test_inconsistent_values_fail_with_a_message(chart, values, message):
    with pytest.raises(helm_python.HelmRenderError) as e:
        chart.render(values, name="rel", namespace="ns")
    assert message in str(e.value)


def test_every_value_key_is_in_the_schema(chart):
    """values.yaml and values.schema.json describe the same keys (the schema refuses the others)."""
    chart.validate_schema(yaml.safe_load((CHART / "values.yaml").read_text()))


def _build_values(**build) -> dict:
    return {"model": {"profile": "torch-fp8-hopper", "path": "builds/fp8"},
            "build": {"enabled": True, "source": "dg-26b", "profile": "torch-fp8-hopper", "output": "builds/fp8",
                      **build}}


def test_the_build_job_builds_into_the_store_and_the_server_waits_for_it(chart):
    docs = render(chart, _build_values(minAgreement=0.97, calibrationFile="calib/prompts.jsonl", threads=8))
    (job,) = by_kind(docs, "Job")
    spec = job["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    assert c["args"] == ["build", "--checkpoint", "/opt/nim/.cache/models/dg-26b", "--profile", "torch-fp8-hopper",
                         "--output", "/opt/nim/.cache/models/builds/fp8", "--if-missing", "--fp8-scaling",
                         "per-tensor", "--calibration", "/opt/nim/.cache/models/calib/prompts.jsonl",
                         "--min-agreement", "0.97", "--threads", "8"]
    store = next(m for m in c["volumeMounts"] if m["name"] == "model-store")
    assert not store.get("readOnly") and spec["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] == 0
    claim = next(v for v in spec["volumes"] if v["name"] == "model-store")["persistentVolumeClaim"]
    assert claim == {"claimName": "rel-diffusiongemma-model-store"}
    # the Service (and PDB, NetworkPolicy) select the server's pods only, never the build's
    (svc,) = [d for d in by_kind(docs, "Service") if not d["metadata"]["name"].endswith("-headless")]
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert not set(svc["spec"]["selector"].items()) <= set(labels.items())
    pod = deployment(docs)["spec"]["template"]["spec"]
    (wait,) = pod["initContainers"]
    assert wait["command"][-1] == "/opt/nim/.cache/models/builds/fp8" and "manifest.json" in wait["command"][2]
    assert env_of(pod["containers"][0])["NIM_MODEL_PATH"] == "/opt/nim/.cache/models/builds/fp8"


def test_the_build_job_is_renamed_when_its_values_change_and_absent_by_default(chart):
    def job_name(values):
        return [d["metadata"]["name"] for d in by_kind(render(chart, values), "Job")]

    first = job_name(_build_values())
    assert first == job_name(_build_values()) and first[0].startswith("rel-diffusiongemma-build-")
    assert job_name(_build_values(fp8Scaling="per-channel")) != first
    assert job_name({}) == [] and "initContainers" not in deployment(render(chart, {}))["spec"]["template"]["spec"]
    # a build not served by this release: the Job runs, the server does not wait for it
    other = render(chart, {"build": {"enabled": True, "source": "a", "profile": "torch-fp8-hopper", "output": "b"}})
    assert by_kind(other, "Job") and "initContainers" not in deployment(other)["spec"]["template"]["spec"]


@pytest.mark.parametrize("values, message", [
    ({"build": {"enabled": True, "profile": "torch-fp8-hopper", "output": "b"}}, "build.source is required"),
    ({"build": {"enabled": True, "source": "a", "output": "b"}}, "build.profile is required"),
    ({"build": {"enabled": True, "source": "a", "profile": "torch-fp8-hopper"}}, "build.output is required"),
    ({"build": {"enabled": True, "source": "a", "profile": "torch-fp8-hopper", "output": "a"}},
     "build.output must differ"),
    ({**_build_values(), "modelStore": {"enabled": False}}, "enable modelStore"),
    ({**_build_values(), "model": {"profile": "torch-bf16-any", "path": "builds/fp8"}},
     "set model.profile to the same"),
])
def test_inconsistent_build_values_fail_with_a_message(chart, values, message):
    with pytest.raises(helm_python.HelmRenderError) as e:
        chart.render(values, name="rel", namespace="ns")
    assert message in str(e.value)


def test_schema_refuses_a_bad_build_profile(chart):
    with pytest.raises(helm_python.HelmValuesError) as e:
        chart.render(_build_values(profile="fp8"), name="rel", namespace="ns")
    assert "/build/profile" in str(e.value)


# ---- every face of the server reaches a client --------------------------------------------------------------

# Variables of the pod that name files only the pod has (serve_options checks them); none of them moves a port.
POD_ONLY = {"NIM_MODEL_PATH", "NIM_MODEL_PROFILE", "NIM_API_KEYS_FILE", "NIM_SSL_CERT_PATH", "NIM_SSL_KEY_PATH",
            "NIM_SSL_CA_CERT_PATH"}
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


def server_container(docs: list[dict]) -> dict:
    (c,) = [c for c in deployment(docs)["spec"]["template"]["spec"]["containers"] if c["name"] == "diffusiongemma"]
    return c


def pod_ports(container: dict) -> set[int]:
    """The ports `dgemma serve` listens on with this container's environment (its own config code decides)."""
    env = {k: v for k, v in env_of(container).items() if v is not None and k not in POD_ONLY}
    env["NIM_SSL_MODE"] = "DISABLED"  # TLS wraps the same ports
    return set(listening_ports(env).values())


def probe_port(probe: dict, resolve) -> int | None:
    for action in ("grpc", "httpGet", "tcpSocket"):
        if action in probe:
            return resolve(probe[action]["port"])
    argv = probe["exec"]["command"]  # dgemma health --server localhost:N
    return int(argv[argv.index("--server") + 1].rsplit(":", 1)[1])


def unreachable(docs: list[dict]) -> list[str]:
    """Each way a port the server listens on misses a client: no container port, no port of the main Service
    whose targetPort resolves to it, no NetworkPolicy ingress rule; and each Service targetPort or probe that
    points at no port the server listens on."""
    c = server_container(docs)
    ports = pod_ports(c)
    declared = {p["name"]: p["containerPort"] for p in c.get("ports", []) if p.get("protocol", "TCP") == "TCP"}

    def resolve(port):
        return declared.get(port) if isinstance(port, str) else port

    problems = [f"{p}: no containerPort" for p in sorted(ports - set(declared.values()))]
    problems += [f"containerPort {p}: the server does not listen there" for p in set(declared.values()) - ports]
    for svc in by_kind(docs, "Service"):
        name, targets = svc["metadata"]["name"], [resolve(p["targetPort"]) for p in svc["spec"]["ports"]]
        problems += [f"Service {name}: a targetPort resolves to no server port" for t in targets if t not in ports]
        if not name.endswith("-headless"):
            problems += [f"{p}: not in Service {name}" for p in sorted(ports - set(targets))]
    for netpol in by_kind(docs, "NetworkPolicy"):
        rules = netpol["spec"].get("ingress", [])
        admitted = ports if any("ports" not in r for r in rules) else {
            resolve(p["port"]) for r in rules for p in r["ports"] if p.get("protocol", "TCP") == "TCP"}
        problems += [f"{p}: no ingress rule in NetworkPolicy" for p in sorted(ports - admitted)]
    for probe in PROBES:
        if probe_port(c[probe], resolve) not in ports:
            problems.append(f"{probe}: checks no port the server listens on")
    return problems


def test_every_port_the_server_listens_on_reaches_a_client(rendered):
    name, docs = rendered
    assert unreachable(docs) == [], name
    if name == "defaults":  # the chart's defaults are the server's own
        assert pod_ports(server_container(docs)) == set(listening_ports({}).values())


def test_changed_ports_follow_the_values(chart):
    ports = {"server": {"grpcPort": 9000, "httpPort": 9080, "metricsPort": 9002},
             "service": {"port": 80, "httpPort": 81, "metricsPort": 82, "headless": {"enabled": True}}}
    docs = render(chart, ports)
    assert unreachable(docs) == [] and pod_ports(server_container(docs)) == {9000, 9080, 9002}
    svc = next(s for s in by_kind(docs, "Service") if s["metadata"]["name"] == "rel-diffusiongemma")
    assert {p["port"] for p in svc["spec"]["ports"]} == {80, 81, 82}


def _drop_http_container_port(docs):
    c = server_container(docs)
    c["ports"] = [p for p in c["ports"] if p["name"] != "http"]


def _drop_http_service_port(docs):
    for svc in by_kind(docs, "Service"):
        svc["spec"]["ports"] = [p for p in svc["spec"]["ports"] if p["name"] != "http"]


def _drop_http_ingress(docs):
    (netpol,) = by_kind(docs, "NetworkPolicy")
    netpol["spec"]["ingress"] = [r for r in netpol["spec"]["ingress"] if r["ports"][0]["port"] != "http"]


def _server_moves_http(docs):  # the server would then listen on its default, not the declared port
    server_container(docs)["env"].append({"name": "NIM_HTTP_PORT", "value": "9999"})


def _probe_elsewhere(docs):
    server_container(docs)["readinessProbe"]["grpc"]["port"] = 1234


@pytest.mark.parametrize("break_it, problem", [
    (_drop_http_container_port, "8080: no containerPort"), (_drop_http_service_port, "8080: not in Service"),
    (_drop_http_ingress, "8080: no ingress rule"), (_server_moves_http, "9999: no containerPort"),
    (_probe_elsewhere, "readinessProbe: checks no port"),
])
def test_a_port_that_misses_a_client_is_caught(chart, break_it, problem):
    docs = render(chart, {})
    break_it(docs)
    assert any(p.startswith(problem) for p in unreachable(docs)), unreachable(docs)


def test_http_ingress_takes_the_grpc_peers_unless_told(chart):
    peers = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gateways"}}}]

    def from_of(values):
        (netpol,) = by_kind(render(chart, {"networkPolicy": values}), "NetworkPolicy")
        return {r["ports"][0]["port"]: r.get("from") for r in netpol["spec"]["ingress"]}

    assert from_of({"grpcFrom": peers})["http"] == peers
    assert from_of({"grpcFrom": peers, "httpFrom": []})["http"] is None  # every source
    assert from_of({})["http"] is None


# ---- rollouts and the model store on a GPU cluster ------------------------------------------------------------

def test_default_rollout_needs_no_spare_gpu_and_the_store_spans_nodes(chart):
    docs = render(chart, {})
    strategy = deployment(docs)["spec"]["strategy"]
    # a surge pod would need a GPU beyond the replicas' own: none is started before an old pod stops
    assert strategy == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    (pvc,) = by_kind(docs, "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]  # pods on any node mount it (no Multi-Attach)
    assert "runtimeClassName" not in deployment(docs)["spec"]["template"]["spec"]


@pytest.mark.parametrize("strategy, expected", [
    ({"type": "Recreate"}, {"type": "Recreate"}),  # the default rollingUpdate is not carried over
    ({"rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
     {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}),
    ({"rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "0%"}},
     {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": "0%"}}),
])
def test_strategy_is_a_value(chart, strategy, expected):
    dep = deployment(render(chart, {"strategy": strategy}))
    assert dep["spec"]["strategy"] == expected
    kubernetes_validate.validate(dep, KUBE_VERSIONS[-1], strict=True)


def test_runtime_class_name(chart):
    spec = deployment(render(chart, {"runtimeClassName": "nvidia"}))["spec"]["template"]["spec"]
    assert spec["runtimeClassName"] == "nvidia"
    with pytest.raises(helm_python.HelmValuesError):
        chart.render({"runtimeClassName": "NVIDIA runtime"}, name="rel", namespace="ns")


def test_read_only_many_store_from_a_snapshot_or_an_existing_claim(chart):
    snap = {"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "dg-26b"}
    docs = render(chart, {"modelStore": {"accessModes": ["ReadOnlyMany"], "dataSource": snap}})
    (pvc,) = by_kind(docs, "PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadOnlyMany"] and pvc["spec"]["dataSource"] == snap
    kubernetes_validate.validate(pvc, KUBE_VERSIONS[-1], strict=True)
    docs = render(chart, {"modelStore": {"accessModes": ["ReadOnlyMany"], "existingClaim": "models"}})
    assert not by_kind(docs, "PersistentVolumeClaim")
    claim = {v["name"]: v for v in deployment(docs)["spec"]["template"]["spec"]["volumes"]}["model-store"]
    assert claim["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}


def test_a_single_node_store_with_pods_on_several_nodes_is_warned_about(chart):
    def notes(values):
        return chart.render(values, name="rel", namespace="ns")["diffusiongemma/templates/NOTES.txt"]

    rwo = {"modelStore": {"accessModes": ["ReadWriteOnce"]}}
    assert "Multi-Attach" in notes({**rwo, "replicaCount": 2})
    assert "Multi-Attach" in notes({**rwo, "strategy": {"rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}})
    assert "Multi-Attach" not in notes(rwo) and "Multi-Attach" not in notes({"replicaCount": 2})


@pytest.mark.parametrize("values, message", [
    ({"strategy": {"rollingUpdate": {"maxSurge": 0, "maxUnavailable": 0}}}, "both 0"),
    ({"strategy": {"rollingUpdate": {"maxSurge": "0%", "maxUnavailable": "0%"}}}, "both 0"),
    ({**_build_values(), "modelStore": {"accessModes": ["ReadWriteOnce"]}}, "must include ReadWriteMany"),
    ({**_build_values(), "modelStore": {"accessModes": ["ReadOnlyMany"], "existingClaim": "m"}},
     "must include ReadWriteMany"),
    ({"modelStore": {"accessModes": ["ReadWriteOncePod"]}, "replicaCount": 2}, "ReadWriteOncePod admits one pod"),
    ({"modelStore": {"accessModes": ["ReadWriteOncePod"]},
      "strategy": {"rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}}, "ReadWriteOncePod admits one pod"),
    ({"modelStore": {"accessModes": ["ReadOnlyMany"]}}, "set modelStore.dataSource"),
])
def test_inconsistent_rollout_and_store_values_fail_with_a_message(chart, values, message):
    with pytest.raises(helm_python.HelmRenderError) as e:
        chart.render(values, name="rel", namespace="ns")
    assert message in str(e.value)
