"""Every rendered manifest is valid Kubernetes (offline, strict, two versions), and wired to
what the server really serves and reads: probe paths and ports, settings keys, selectors."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from opd.server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = ["gpu", "cpu-dev"]
K8S_VERSIONS = ["1.30", "1.33"]
SERVER_ROUTES = {"/healthz", "/readyz", "/metrics", "/v1/model", "/v1/score"}
SETTINGS_ENV = Settings.env_names()


def render(overlay: str) -> list[dict]:
    out = subprocess.run(
        ["kubectl", "kustomize", str(ROOT / "deploy" / "k8s" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=True,
    )
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str) -> dict:
    (doc,) = by_kind(docs, kind)
    return doc


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render(request.param)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_is_valid_kubernetes(rendered, version):
    overlay, docs = rendered
    kinds = {d["kind"] for d in docs}
    assert overlay in OVERLAYS
    assert {
        "Deployment",
        "Service",
        "ConfigMap",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "NetworkPolicy",
        "Job",
    } <= kinds, kinds
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_probes_and_ports_match_the_server(rendered):
    _, docs = rendered
    deployment = one(docs, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000}
    probes = {
        k: container[k]["httpGet"] for k in ("startupProbe", "readinessProbe", "livenessProbe")
    }
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["startupProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/healthz"
    for probe in probes.values():
        assert probe["path"] in SERVER_ROUTES and probe["port"] in ports
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300  # model load
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] in SERVER_ROUTES
    service = one(docs, "Service")
    assert service["spec"]["ports"][0]["targetPort"] in ports
    config = one(docs, "ConfigMap")["data"]
    assert int(config["OPD_PORT"]) == 8000
    drain = float(config["OPD_DRAIN_TIMEOUT_S"])
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > drain


def test_configmap_and_secret_keys_are_settings_the_server_reads(rendered):
    _, docs = rendered
    config = one(docs, "ConfigMap")
    unknown = set(config["data"]) - SETTINGS_ENV
    assert not unknown, f"ConfigMap keys the server does not read: {unknown}"
    deployment = one(docs, "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["envFrom"][0]["configMapRef"]["name"] == config["metadata"]["name"]
    env = {e["name"]: e for e in container["env"]}
    assert "OPD_API_KEY" in SETTINGS_ENV
    key_ref = env["OPD_API_KEY"]["valueFrom"]["secretKeyRef"]
    secrets = by_kind(docs, "Secret")
    if secrets:  # the dev overlay generates one; production brings its own
        (secret,) = secrets
        assert key_ref["name"] == secret["metadata"]["name"]
        assert key_ref["key"] in secret["data"]
    service = one(docs, "Service")
    for job in by_kind(docs, "Job"):
        (trainer,) = job["spec"]["template"]["spec"]["containers"]
        trainer_env = {e["name"]: e for e in trainer["env"]}
        assert trainer_env["OPD_API_KEY"]["valueFrom"]["secretKeyRef"] == key_ref
        url = trainer_env["OPD_TEACHER_URL"]["value"]
        port = service["spec"]["ports"][0]["port"]
        assert url == f"http://{service['metadata']['name']}:{port}"
        assert any("$(OPD_TEACHER_URL)" in a for a in trainer["args"])
        assert "--resume=auto" in trainer["args"]


def _matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_selectors_match_labels(rendered):
    _, docs = rendered
    deployment = one(docs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert _matches(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    assert _matches(one(docs, "Service")["spec"]["selector"], pod_labels)
    assert _matches(one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], pod_labels)
    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    policy = one(docs, "NetworkPolicy")
    assert _matches(policy["spec"]["podSelector"]["matchLabels"], pod_labels)
    (rule,) = policy["spec"]["ingress"]
    for job in by_kind(docs, "Job"):
        trainer_labels = job["spec"]["template"]["metadata"]["labels"]
        assert _matches(rule["from"][0]["podSelector"]["matchLabels"], trainer_labels)
    assert not _matches(rule["from"][0]["podSelector"]["matchLabels"], pod_labels)


def test_pods_run_locked_down(rendered):
    _, docs = rendered
    for doc in (one(docs, "Deployment"), *by_kind(docs, "Job")):
        spec = doc["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        for container in spec["containers"]:
            ctx = container["securityContext"]
            assert ctx["allowPrivilegeEscalation"] is False
            assert ctx["readOnlyRootFilesystem"] is True
            assert ctx["capabilities"]["drop"] == ["ALL"]


def test_gpu_overlay_requests_gpus():
    docs = render("gpu")
    jobs = {j["metadata"]["name"]: j for j in by_kind(docs, "Job")}
    gpus = {"opd-teacher": "1", "opd-trainer": "1", "opd-trainer-multigpu": "8"}
    for doc in (one(docs, "Deployment"), *jobs.values()):
        (container,) = doc["spec"]["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == gpus[doc["metadata"]["name"]]
    (multi,) = jobs["opd-trainer-multigpu"]["spec"]["template"]["spec"]["containers"]
    assert multi["command"][0] == "torchrun" and "--nproc_per_node=8" in multi["command"]
    assert one(docs, "ConfigMap")["data"]["OPD_DEVICE"] == "cuda"


def test_cpu_image_dockerfile_matches_the_service():
    text = (ROOT / "deploy" / "docker" / "Dockerfile.cpu").read_text()
    assert re.search(r"^USER 10001$", text, re.M)  # non-root, same uid as the manifests
    assert re.search(r"^EXPOSE 8000$", text, re.M)
    health = re.search(r"HEALTHCHECK .*?(/\w+)'", text, re.S)
    assert health and health.group(1) in SERVER_ROUTES
    assert "download.pytorch.org/whl/cpu" in text  # never the multi-GB CUDA build here
    assert '["opd", "serve"]' in text


def test_gpu_image_dockerfile_serves_the_vllm_backend():
    text = (ROOT / "deploy" / "docker" / "Dockerfile.gpu").read_text()
    assert re.search(r"^ARG VLLM_IMAGE=vllm/vllm-openai:v\d", text, re.M)
    assert re.search(r"^USER 10001$", text, re.M)
    assert re.search(r"^EXPOSE 8000$", text, re.M)
    assert re.search(r"OPD_BACKEND=vllm", text)
    health = re.search(r"HEALTHCHECK .*?(/\w+)'", text, re.S)
    assert health and health.group(1) in SERVER_ROUTES
    assert '["opd", "serve"]' in text
    # the GPU overlay runs that backend, with settings the server reads
    data = one(render("gpu"), "ConfigMap")["data"]
    assert data["OPD_BACKEND"] == "vllm"
    from opd.server.settings import Settings

    Settings(**{k.removeprefix("OPD_").lower(): v for k, v in data.items()})


def test_multi_teacher_overlay_wires_two_teachers_to_one_trainer():
    """Two teachers, each selecting only its own pods, with its own model volume and served
    name; one trainer Job whose --teacher flags reach both Services and parse as opd train's."""
    from opd.client.configs.train import TrainConfig
    from opd.shared.config_cli import from_flags

    docs = render("multi-teacher")
    for doc in docs:
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)
    deployments = {d["metadata"]["name"]: d for d in by_kind(docs, "Deployment")}
    assert set(deployments) == {"opd-teacher-math", "opd-teacher-code"}
    named = {kind: {d["metadata"]["name"]: d for d in by_kind(docs, kind)} for kind in (
        "Service", "PodDisruptionBudget", "NetworkPolicy", "HorizontalPodAutoscaler", "ConfigMap"
    )}  # fmt: skip
    (job,) = by_kind(docs, "Job")
    trainer_labels = job["spec"]["template"]["metadata"]["labels"]
    (trainer,) = job["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in trainer["env"]}
    flags = {}
    for arg in trainer["args"]:
        if arg.startswith("--teacher="):
            name, _, ref = arg.removeprefix("--teacher=").partition("=")
            flags[name] = env[re.fullmatch(r"\$\((\w+)\)", ref).group(1)]
    assert set(flags) == {"math", "code"}
    for teacher, other in (("math", "code"), ("code", "math")):
        dep = deployments[f"opd-teacher-{teacher}"]
        pods = dep["spec"]["template"]["metadata"]["labels"]
        others = deployments[f"opd-teacher-{other}"]["spec"]["template"]["metadata"]["labels"]
        name = f"opd-teacher-{teacher}"
        service = named["Service"][name]
        selectors = [
            dep["spec"]["selector"]["matchLabels"],
            service["spec"]["selector"],
            named["PodDisruptionBudget"][name]["spec"]["selector"]["matchLabels"],
            named["NetworkPolicy"][name]["spec"]["podSelector"]["matchLabels"],
        ]
        for selector in selectors:  # its own pods, never the other teacher's
            assert _matches(selector, pods) and not _matches(selector, others), selector
        assert named["HorizontalPodAutoscaler"][name]["spec"]["scaleTargetRef"]["name"] == name
        (rule,) = named["NetworkPolicy"][name]["spec"]["ingress"]
        assert _matches(rule["from"][0]["podSelector"]["matchLabels"], trainer_labels)
        (container,) = dep["spec"]["template"]["spec"]["containers"]
        config = named["ConfigMap"][container["envFrom"][0]["configMapRef"]["name"]]["data"]
        assert set(config) <= SETTINGS_ENV
        assert config["OPD_SERVED_MODEL_NAME"] == f"{teacher}-teacher"
        volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
        claim = volumes["model"]["persistentVolumeClaim"]["claimName"]
        assert claim == f"opd-teacher-model-{teacher}"
        port = service["spec"]["ports"][0]["port"]
        assert flags[teacher] == f"http://{name}:{port}"
    config = from_flags(
        TrainConfig,
        student="/models/student",
        teacher=[f"{n}={u}" for n, u in flags.items()],
        teacher_field="domain",
    )
    assert [n for n, _ in config.teacher.specs()] == ["math", "code"]
