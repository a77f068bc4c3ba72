"""The deployment examples, the image and its build context keep the promises their comments
and deploy/README.md make. Schema validity is `make deploy-check`'s; these are the promises
no schema knows."""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import tomllib
import yaml

from mlflow_sidecar.client.settings import ClientEnvSettings
from mlflow_sidecar.server.config import (
    ArtifactsConfig,
    ServerConfig,
    is_loopback,
    load_config,
)

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy/kubernetes"
COMPOSE = ROOT / "deploy/compose"
JOBS = ["trainer-job.yaml", "trainer-job-pvc.yaml"]
INFERENCE = "inference-deployment.yaml"
# Every pod with a sidecar: the training Jobs and the inference Deployment.
PODS = [*JOBS, INFERENCE]
SECRET_NAME = re.compile(r"TOKEN|PASSWORD|SECRET|CREDENTIAL", re.IGNORECASE)
INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Z_][A-Z0-9_]*)[^}]*\}")
QUANTITY = re.compile(r"^(?P<number>[0-9.]+)(?P<unit>Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$")
UNITS = {
    None: 1,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
}


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def job_of(name: str) -> dict[str, Any]:
    """The Job, or the Deployment, of a manifest: what holds the pod template."""
    (job,) = [doc for doc in documents(K8S / name) if doc["kind"] in ("Job", "Deployment")]
    return job


def pod_spec(name: str) -> dict[str, Any]:
    spec: dict[str, Any] = job_of(name)["spec"]["template"]["spec"]
    return spec


def sidecar_of(spec: dict[str, Any]) -> dict[str, Any]:
    (sidecar,) = [c for c in spec["initContainers"] if c["name"] == "mlflow-sidecar"]
    return sidecar


def containers(spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from spec.get("initContainers", [])
    yield from spec["containers"]


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry["name"]: entry for entry in container.get("env", [])}


def quantity_bytes(quantity: str) -> float:
    match = QUANTITY.match(str(quantity))
    assert match, f"not a Kubernetes quantity: {quantity}"
    return float(match["number"]) * UNITS[match["unit"]]


def dockerfile_env() -> dict[str, str]:
    """The ENV settings of the Dockerfile's final stage."""
    final_stage = (ROOT / "Dockerfile").read_text().rsplit("\nFROM ", 1)[1]
    joined = final_stage.replace("\\\n", " ")
    env: dict[str, str] = {}
    for line in joined.splitlines():
        if line.startswith("ENV "):
            env.update(re.findall(r"(\w+)=(\S+)", line))
    return env


def sidecar_config(container: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Any:
    """The configuration the sidecar loads from the container's env and the image's."""
    for name in list(os.environ):
        if name.startswith("MLFLOW_"):
            monkeypatch.delenv(name)
    for name, value in dockerfile_env().items():
        if name.startswith("MLFLOW_SIDECAR__"):
            monkeypatch.setenv(name, value)
    for name, entry in env_of(container).items():
        monkeypatch.setenv(name, entry.get("value", "from-a-secret"))
    return load_config()


# --- Kubernetes ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", JOBS)
def test_the_sidecar_is_a_native_sidecar_of_a_job_that_ends_with_the_trainer(name):
    job = job_of(name)
    spec = job["spec"]["template"]["spec"]
    assert job["apiVersion"] == "batch/v1"
    assert spec["restartPolicy"] == "Never"
    assert sidecar_of(spec)["restartPolicy"] == "Always"
    assert [c["name"] for c in spec["containers"]] == ["trainer"]
    trainer_env = env_of(spec["containers"][0])
    assert trainer_env["MLFLOW_SIDECAR_CLIENT_TARGET"]["value"] == "127.0.0.1:50051"


@pytest.mark.parametrize("name", PODS)
def test_probes_are_http_gets_on_the_metrics_port(name):
    sidecar = sidecar_of(pod_spec(name))
    ports = {port["name"]: port["containerPort"] for port in sidecar["ports"]}
    metrics_port = int(env_of(sidecar)["MLFLOW_SIDECAR__METRICS__PORT"]["value"])
    paths = {}
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert set(sidecar[probe]) & {"exec", "grpc", "tcpSocket"} == set(), probe
        action = sidecar[probe]["httpGet"]
        assert ports[action["port"]] == metrics_port
        paths[probe] = action["path"]
    assert paths == {
        "startupProbe": "/healthz",
        "livenessProbe": "/healthz",
        "readinessProbe": "/readyz",
    }


@pytest.mark.parametrize("name", PODS)
def test_the_sidecar_env_passes_the_sidecars_own_checks(name, monkeypatch):
    """The bind policy, grace and drain rules hold for the manifest's settings, the gRPC
    port stays on loopback and the data volume is mounted where the image keeps its data."""
    spec = pod_spec(name)
    sidecar = sidecar_of(spec)
    config = sidecar_config(sidecar, monkeypatch)
    assert is_loopback(config.server.host)
    assert not config.auth.enabled  # loopback inside the pod: no token for the trainer
    assert spec["terminationGracePeriodSeconds"] > config.server.grace_s
    mounts = {mount["mountPath"]: mount["name"] for mount in sidecar["volumeMounts"]}
    assert mounts[str(config.data_dir)] == "sidecar-data"


@pytest.mark.parametrize("name", PODS)
def test_the_spool_drains_for_most_of_the_grace_period(name, monkeypatch):
    """The manifests give the sidecar its grace "to drain the spool": the drain must use it,
    leaving no more than a couple of seconds for the rest of the stop."""
    config = sidecar_config(sidecar_of(pod_spec(name)), monkeypatch)
    assert config.server.grace_s - 2 <= config.spool.drain_on_stop_s <= config.server.grace_s


@pytest.mark.parametrize("name", PODS)
def test_the_data_volume_holds_the_largest_upload(name, monkeypatch):
    spec = pod_spec(name)
    config = sidecar_config(sidecar_of(spec), monkeypatch)
    assert config.artifacts.max_upload_bytes >= ArtifactsConfig().max_upload_bytes
    (volume,) = [v for v in spec["volumes"] if v["name"] == "sidecar-data"]
    if "emptyDir" in volume:
        size = volume["emptyDir"]["sizeLimit"]
    else:
        claim_name = volume["persistentVolumeClaim"]["claimName"]
        (claim,) = [
            doc
            for doc in documents(K8S / name)
            if doc["kind"] == "PersistentVolumeClaim" and doc["metadata"]["name"] == claim_name
        ]
        size = claim["spec"]["resources"]["requests"]["storage"]
    assert quantity_bytes(size) > config.artifacts.max_upload_bytes


@pytest.mark.parametrize("name", PODS)
def test_pod_and_both_containers_meet_the_restricted_pod_security_standard(name):
    spec = pod_spec(name)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    checked = list(containers(spec))
    assert {c["name"] for c in checked} == {
        "mlflow-sidecar",
        "inference" if name == INFERENCE else "trainer",
    }
    for container in checked:
        context = container["securityContext"]
        assert context["runAsNonRoot"] is True, container["name"]
        assert context["allowPrivilegeEscalation"] is False, container["name"]
        assert context["readOnlyRootFilesystem"] is True, container["name"]
        assert context["capabilities"] == {"drop": ["ALL"]}, container["name"]
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}, container["name"]
        assert container["resources"]["requests"]["memory"], container["name"]
        assert container["resources"]["limits"]["memory"], container["name"]


def test_the_namespace_enforces_the_restricted_standard():
    (namespace,) = documents(K8S / "namespace.yaml")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for name in PODS:
        for doc in documents(K8S / name):
            assert doc["metadata"]["namespace"] == namespace["metadata"]["name"]


@pytest.mark.parametrize("name", PODS)
def test_credentials_come_from_secrets(name):
    for container in containers(pod_spec(name)):
        for var, entry in env_of(container).items():
            if SECRET_NAME.search(var):
                assert "value" not in entry, var
                assert entry["valueFrom"]["secretKeyRef"]["name"], var
    assert "MLFLOW_SIDECAR__MLFLOW__TOKEN" in env_of(sidecar_of(pod_spec(name)))


@pytest.mark.parametrize("name", PODS)
def test_prometheus_finds_the_metrics_port(name):
    job = job_of(name)
    template = job["spec"]["template"]
    sidecar = sidecar_of(template["spec"])
    metrics_port = env_of(sidecar)["MLFLOW_SIDECAR__METRICS__PORT"]["value"]
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == metrics_port
    assert annotations["prometheus.io/path"] == "/metrics"

    (monitor,) = documents(K8S / "podmonitor.yaml")
    assert monitor["kind"] == "PodMonitor"
    assert monitor["metadata"]["namespace"] == job["metadata"]["namespace"]
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    )
    port_names = {port["name"] for port in sidecar["ports"]}
    for endpoint in monitor["spec"]["podMetricsEndpoints"]:
        assert endpoint["port"] in port_names
        assert endpoint["path"] == "/metrics"


def test_the_inference_container_reads_the_sidecars_model_cache_read_only(monkeypatch):
    """MLFLOW_SIDECAR_CLIENT_MODEL_CACHE_DIR names, in the inference container, the very
    directory the sidecar keeps its model cache in, on the volume the two share."""
    spec = pod_spec(INFERENCE)
    sidecar = sidecar_of(spec)
    config = sidecar_config(sidecar, monkeypatch)
    assert {m["name"]: m["mountPath"] for m in sidecar["volumeMounts"]}["sidecar-data"] == str(
        config.data_dir
    )
    (inference,) = spec["containers"]
    (mount,) = [m for m in inference["volumeMounts"] if m["name"] == "sidecar-data"]
    assert mount["readOnly"] is True
    cache_dir = env_of(inference)["MLFLOW_SIDECAR_CLIENT_MODEL_CACHE_DIR"]["value"]
    relative = config.model_cache_dir.relative_to(config.data_dir)
    assert PurePosixPath(cache_dir) == PurePosixPath(mount["mountPath"]) / relative.as_posix()
    for name, entry in env_of(inference).items():
        monkeypatch.setenv(name, entry["value"])
    assert ClientEnvSettings().model_cache_dir == cache_dir
    # The volume holds a full cache and the largest upload staged beside it.
    (volume,) = [v for v in spec["volumes"] if v["name"] == "sidecar-data"]
    room = config.model_cache.max_bytes + config.artifacts.max_upload_bytes
    assert quantity_bytes(volume["emptyDir"]["sizeLimit"]) >= room


# --- images ---------------------------------------------------------------------------------


def image_references() -> Iterator[tuple[str, str]]:
    """(file, image) of every image the deploy files and Dockerfiles name."""
    for path in sorted(K8S.glob("*.yaml")):
        for doc in documents(path):
            if doc["kind"] == "Job":
                for container in containers(doc["spec"]["template"]["spec"]):
                    yield path.name, container["image"]
    for service in yaml.safe_load((COMPOSE / "docker-compose.yaml").read_text())[
        "services"
    ].values():
        if "image" in service:
            yield "docker-compose.yaml", service["image"]
    for dockerfile in (ROOT / "Dockerfile", COMPOSE / "mlflow.Dockerfile"):
        text = dockerfile.read_text()
        args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.MULTILINE))
        for written in re.findall(r"^FROM (\S+)", text, re.MULTILINE):
            image = written
            for name, value in args.items():
                image = image.replace(f"${{{name}}}", value)
            yield dockerfile.name, image


def test_every_image_is_pinned():
    references = list(image_references())
    assert len(references) >= 8
    for source, image in references:
        if "@" in image:
            assert re.fullmatch(r"sha256:[0-9a-f]{64}", image.split("@", 1)[1]), (source, image)
            continue
        name, _, tag = image.rpartition(":")
        assert name and "/" not in tag, f"{source}: {image} has no tag"
        assert tag != "latest" and re.search(r"\d", tag), f"{source}: {image} is not pinned"


# --- compose ------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((COMPOSE / "docker-compose.yaml").read_text())
    return loaded


def test_compose_has_postgres_s3_mlflow_and_an_authenticated_sidecar():
    services = compose()["services"]
    assert {"postgres", "minio", "mlflow", "sidecar"} <= set(services)
    command = " ".join(services["mlflow"]["command"])
    assert "s3://" in command
    assert services["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql://")
    sidecar = services["sidecar"]
    assert not is_loopback(sidecar["environment"]["MLFLOW_SIDECAR__SERVER__HOST"])
    assert (
        sidecar["environment"]["MLFLOW_SIDECAR__AUTH__TOKENS_FILE"]
        == "/run/secrets/" + (sidecar["secrets"][0])
    )


def test_compose_takes_every_secret_from_the_env_file():
    document = compose()
    example = dict(
        line.split("=", 1)
        for line in (COMPOSE / "example.env").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert all(value == "" for value in example.values()), "example.env holds no secret"
    for name, service in document["services"].items():
        for var, value in service.get("environment", {}).items():
            for used in INTERPOLATION.finditer(str(value)):
                assert used["name"] in example, f"{name}.{var}: {used['name']}"
            if var.endswith("_FILE"):
                assert str(value).startswith("/run/secrets/"), f"{name}.{var}"
            elif SECRET_NAME.search(var) or var.endswith("_KEY"):
                assert INTERPOLATION.fullmatch(str(value)), f"{name}.{var} is a literal"
    for secret in document["secrets"].values():
        assert secret["environment"] in example
    required = set(INTERPOLATION.findall((COMPOSE / "docker-compose.yaml").read_text()))
    assert required <= set(example), required - set(example)
    assert "deploy/compose/.env" in (ROOT / ".gitignore").read_text().splitlines()


def test_compose_publishes_ports_on_loopback_only():
    published = [
        (name, port)
        for name, service in compose()["services"].items()
        for port in service.get("ports", [])
    ]
    assert published
    for name, port in published:
        assert str(port).startswith("127.0.0.1:"), (name, port)


def test_compose_starts_each_service_after_what_it_needs_is_healthy():
    services = compose()["services"]
    for name in ("postgres", "minio", "mlflow"):
        assert services[name]["healthcheck"]["test"], name
    one_shot = {"create-bucket"}
    edges = 0
    for name, service in services.items():
        for dependency, condition in service.get("depends_on", {}).items():
            expected = (
                "service_completed_successfully" if dependency in one_shot else "service_healthy"
            )
            assert condition == {"condition": expected}, (name, dependency)
            edges += 1
    assert edges >= 5
    assert services["sidecar"]["depends_on"] == {"mlflow": {"condition": "service_healthy"}}


def test_compose_mlflow_is_the_official_image_installed_once():
    mlflow = compose()["services"]["mlflow"]
    assert "pip" not in " ".join(mlflow["command"])
    dockerfile = (COMPOSE / mlflow["build"]["dockerfile"]).read_text()
    assert re.search(r"^FROM ghcr\.io/mlflow/mlflow:v\d+\.\d+\.\d+$", dockerfile, re.MULTILINE)
    assert re.findall(r"\b[\w-]+==[\d.]+", dockerfile), "the additions are pinned"


def test_compose_sidecar_uses_the_slim_install_it_can_run_on():
    sidecar = compose()["services"]["sidecar"]
    assert sidecar["build"]["args"]["EXTRA"] == "remote"
    assert sidecar["environment"]["MLFLOW_SIDECAR__MLFLOW__TRACKING_URI"].startswith("http")


# --- Dockerfile and build context ---------------------------------------------------------


def test_the_image_exposes_no_port_while_the_sidecar_listens_on_loopback():
    host = dockerfile_env().get("MLFLOW_SIDECAR__SERVER__HOST", ServerConfig().host)
    exposes = re.findall(r"^EXPOSE", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert is_loopback(host)
    assert exposes == []


def test_the_image_compiles_bytecode_it_cannot_write_at_run_time():
    build_stage = (ROOT / "Dockerfile").read_text().rsplit("\nFROM ", 1)[0]
    compile_step = r"-m compileall .*--invalidation-mode unchecked-hash /opt/sidecar"
    assert re.search(compile_step, build_stage)
    assert dockerfile_env()["PYTHONDONTWRITEBYTECODE"] == "1"


def test_the_extra_build_arg_names_extras_of_the_package():
    text = (ROOT / "Dockerfile").read_text()
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    default = re.search(r"^ARG EXTRA=(\w+)$", text, re.MULTILINE)
    assert default and default[1] == "server"
    choices = re.search(r'case "\$EXTRA" in ([\w|]+)\)', text)
    assert choices
    assert set(choices[1].split("|")) == {"server", "remote"}
    assert {"server", "remote"} <= set(extras)


def ignored(path: str) -> bool:
    """Docker's rule: the last pattern that matches a path decides; `!` re-includes."""
    verdict = False
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").rstrip("/")
        candidates = {pattern, pattern.removeprefix("**/")}
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        hit = any(
            fnmatch.fnmatchcase(prefix, candidate)
            or fnmatch.fnmatchcase(parts[-1], candidate.removeprefix("**/"))
            for prefix in prefixes
            for candidate in candidates
            if "/" not in candidate or prefix.count("/") == candidate.count("/")
        )
        if hit:
            verdict = not negate
    return verdict


def test_the_build_context_carries_the_sources_and_no_local_state():
    copied = re.findall(r"^COPY (?!--from)(.+) \S+$", (ROOT / "Dockerfile").read_text(), re.M)
    sources = [source for line in copied for source in line.split()]
    assert sources
    for source in sources:
        assert not ignored(source), source
    assert not ignored("server/mlflow_sidecar/server/cli.py")
    for local in (
        ".venv/bin/python",
        "node_modules/.bin/buf",
        ".sidecar-data/spool.db",
        ".git/HEAD",
        "mlflow.db",
        "mlruns/0/meta.yaml",
        "server/mlflow_sidecar/server/__pycache__/cli.cpython-311.pyc",
        "deploy/compose/.env",
    ):
        assert ignored(local), local
