"""Static checks of deploy/: Dockerfile, compose.yaml and the Kubernetes manifests.

No Docker engine or cluster here, so everything is checked by parsing. No database either.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
SETTINGS = ROOT / "registry" / "settings.py"

APP_COMPONENTS = ("web", "worker", "worker-scan", "worker-dp", "beat", "migrate")
CHECKED_PREFIXES = ("SMR_", "S3_", "KMS_", "DATABASE_", "SECRET_")
PLACEHOLDER = "CHANGE-ME"


def load_all(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in {".yaml", ".yml"})


def k8s_manifest_files() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def k8s_docs() -> list[tuple[Path, dict]]:
    return [(path, doc) for path in k8s_manifest_files() for doc in load_all(path)]


def find(kind: str, name: str) -> dict:
    matches = [d for _, d in k8s_docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected exactly one {kind}/{name}, found {len(matches)}"
    return matches[0]


def pod_spec(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]


def app_workloads() -> dict[str, dict]:
    workloads = {
        "web": find("Deployment", "smr-web"),
        "worker": find("Deployment", "smr-worker"),
        "worker-scan": find("Deployment", "smr-worker-scan"),
        "worker-dp": find("Deployment", "smr-worker-dp"),
        "beat": find("Deployment", "smr-beat"),
        "migrate": find("Job", "smr-migrate"),
    }
    assert set(workloads) == set(APP_COMPONENTS)
    return workloads


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def settings_env_names() -> set[str]:
    text = SETTINGS.read_text()
    names = set(re.findall(r"\benv(?:_bool|_int)?\(\s*\"([A-Z][A-Z0-9_]*)\"", text))
    assert {"SECRET_KEY", "DATABASE_URL", "SMR_STORAGE", "S3_BUCKET", "KMS_KEY_ID"} <= names
    return names


def dockerfile() -> str:
    return (DEPLOY / "Dockerfile").read_text()


# --- every YAML -------------------------------------------------------------------------------


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path: Path) -> None:
    docs = load_all(path)
    assert docs, f"{path} has no YAML documents"
    assert all(isinstance(doc, dict) for doc in docs)


def test_expected_files_exist() -> None:
    for name in (
        "Dockerfile",
        "compose.yaml",
        "README.md",
        "k8s/kustomization.yaml",
        "k8s/secret.example.yaml",
        "gunicorn.conf.py",
    ):
        assert (DEPLOY / name).is_file(), name


# --- Kubernetes -------------------------------------------------------------------------------


def test_every_k8s_doc_has_api_version_kind_and_name() -> None:
    docs = k8s_docs()
    assert len(docs) >= 12
    for path, doc in docs:
        assert doc.get("apiVersion"), path
        assert doc.get("kind"), path
        assert doc.get("metadata", {}).get("name"), path
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "smr", f"{path}: {doc['kind']}"


def test_expected_k8s_objects_present() -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for _, d in k8s_docs()}
    for expected in [
        ("Namespace", "smr"),
        ("ConfigMap", "smr-config"),
        ("Secret", "smr-secrets"),
        ("Secret", "smr-keyring"),
        ("Deployment", "smr-web"),
        ("Service", "smr-web"),
        ("Deployment", "smr-worker"),
        ("Deployment", "smr-beat"),
        ("Job", "smr-migrate"),
        ("PodDisruptionBudget", "smr-web"),
        ("HorizontalPodAutoscaler", "smr-web"),
        ("HorizontalPodAutoscaler", "smr-worker"),
    ]:
        assert expected in kinds, expected
    assert any(kind == "NetworkPolicy" for kind, _ in kinds)


def test_kustomization_lists_every_manifest_but_the_secret_example() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    assert kustomization["namespace"] == "smr"
    resources = kustomization["resources"]
    assert len(resources) == len(set(resources)), "duplicate resources"
    for resource in resources:
        assert (K8S / resource).is_file(), f"kustomization lists missing {resource}"
    expected = {p.name for p in k8s_manifest_files() if not p.name.endswith(".example.yaml")}
    assert set(resources) == expected
    # Applying the placeholder Secret would overwrite the real one.
    assert not any(r.endswith(".example.yaml") for r in resources)


def test_web_deployment_probes_and_security() -> None:
    web = find("Deployment", "smr-web")
    assert web["spec"]["replicas"] == 2
    spec = pod_spec(web)
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    (container,) = spec["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000}
    for probe in ("readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["port"] in ("http", 8000)
        # Django rejects the pod IP as Host and redirects plain HTTP in production.
        headers = {h["name"]: h["value"] for h in get.get("httpHeaders", [])}
        assert headers.get("X-Forwarded-Proto") == "https"
        allowed = find("ConfigMap", "smr-config")["data"]["ALLOWED_HOSTS"].split(",")
        assert headers.get("Host") in allowed
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert "gunicorn" in container["command"]
    assert "deploy/gunicorn.conf.py" in container["command"]


@pytest.mark.parametrize("component", APP_COMPONENTS)
def test_app_pods_are_locked_down(component: str) -> None:
    spec = pod_spec(app_workloads()[component])
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["automountServiceAccountToken"] is False
    volumes = {v["name"]: v for v in spec["volumes"]}
    for container in spec.get("initContainers", []) + spec["containers"]:
        ctx = container["securityContext"]
        assert ctx["readOnlyRootFilesystem"] is True, container["name"]
        assert ctx["allowPrivilegeEscalation"] is False, container["name"]
        assert ctx["capabilities"]["drop"] == ["ALL"], container["name"]
        assert container["resources"]["requests"], container["name"]
        assert container["resources"]["limits"]["memory"], container["name"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert "emptyDir" in volumes[mounts["/tmp"]], "/tmp must be an emptyDir"
        for mount in container["volumeMounts"]:
            if "secret" in volumes[mount["name"]]:
                assert mount.get("readOnly") is True
                assert "subPath" not in mount, "subPath mounts never see Secret updates"


def test_app_workloads_share_one_image_and_config() -> None:
    """Every role runs one image, but the dp workers: the same repository name with `-dp`
    (the dp extra's build) at the same tag, which kustomize's `images:` sets for both."""
    images = set()
    for component, doc in app_workloads().items():
        spec = pod_spec(doc)
        for container in spec.get("initContainers", []) + spec["containers"]:
            image = container["image"]
            if component == "worker-dp":
                name, _, tag = image.rpartition(":")
                assert name.endswith("-dp"), image
                image = f"{name.removesuffix('-dp')}:{tag}"
            images.add(image)
            refs = [e["configMapRef"]["name"] for e in container.get("envFrom", [])]
            assert refs == ["smr-config"], component
    assert len(images) == 1
    name, _, tag = images.pop().rpartition(":")
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    tags = {entry["name"]: entry["newTag"] for entry in kustomization["images"]}
    assert tags == {name: tag, f"{name}-dp": tag}, "tag both images from one commit"


def test_selectors_match_pod_labels() -> None:
    for component, doc in app_workloads().items():
        labels = doc["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/component"] == component
        if doc["kind"] == "Deployment":
            assert doc["spec"]["selector"]["matchLabels"].items() <= labels.items()
    web_labels = find("Deployment", "smr-web")["spec"]["template"]["metadata"]["labels"]
    assert find("Service", "smr-web")["spec"]["selector"].items() <= web_labels.items()
    pdb = find("PodDisruptionBudget", "smr-web")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= web_labels.items()


def test_worker_beat_and_migrate_commands() -> None:
    workloads = app_workloads()
    worker = pod_spec(workloads["worker"])["containers"][0]["command"]
    beat = pod_spec(workloads["beat"])["containers"][0]["command"]
    assert worker[:5] == ["celery", "-A", "workers.app", "worker", "-l"]
    assert beat[:5] == ["celery", "-A", "workers.app", "beat", "-l"]
    # The root filesystem is read-only: beat's schedule file must go to /tmp.
    assert beat[beat.index("--schedule") + 1].startswith("/tmp/")
    assert workloads["beat"]["spec"]["replicas"] == 1
    assert workloads["beat"]["spec"]["strategy"]["type"] == "Recreate"
    migrate = pod_spec(workloads["migrate"])
    assert migrate["restartPolicy"] == "Never"
    assert "migrate" in migrate["containers"][0]["command"]


def queue_of(command: list[str]) -> str:
    assert "-Q" in command, f"a worker must name its queue: {command}"
    return command[command.index("-Q") + 1]


def settings_queues() -> set[str]:
    """Every queue the settings route a task to, plus the default one (periodic tasks)."""
    from django.conf import settings

    return {r["queue"] for r in settings.CELERY_TASK_ROUTES.values()} | {
        settings.CELERY_TASK_DEFAULT_QUEUE
    }


def test_one_worker_deployment_per_queue() -> None:
    """Bug caught: a routed queue no worker consumes (its jobs would wait forever), or one
    worker Deployment consuming every queue (a flood of scans starves the rest)."""
    workers = {
        name: d
        for _, d in k8s_docs()
        if d["kind"] == "Deployment" and (name := d["metadata"]["name"]).startswith("smr-worker")
    }
    queues = {}
    for name, doc in workers.items():
        (container,) = pod_spec(doc)["containers"]
        queue = queue_of(container["command"])
        assert "," not in queue, f"{name} consumes several queues: {queue}"
        queues[queue] = name
    assert set(queues) == settings_queues() == {"celery", "scan", "webhooks", "dp"}
    assert queues["scan"] == "smr-worker-scan"
    assert queues["webhooks"] == "smr-worker-webhooks"
    assert queues["dp"] == "smr-worker-dp"


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def test_dp_workers_train_one_job_at_a_time_on_a_gpu_node() -> None:
    """Bug caught: a dp worker scheduled where there is no GPU, or never scheduled (no
    toleration of the GPU nodes' taint), or prefetching a second hours-long job behind the
    one it trains, or training on the CPU of a GPU pod, or torch spinning one thread per node
    core in a pod limited to a few."""
    doc = find("Deployment", "smr-worker-dp")
    spec = pod_spec(doc)
    (container,) = spec["containers"]
    command = container["command"]
    assert command[:4] == ["celery", "-A", "workers.app", "worker"]
    assert queue_of(command) == "dp"
    assert command[command.index("--concurrency") + 1] == "1"
    assert command[command.index("--prefetch-multiplier") + 1] == "1"
    limits = container["resources"]["limits"]
    assert int(limits["nvidia.com/gpu"]) == 1
    assert "nvidia.com/gpu" not in container["resources"].get("requests", {}) or int(
        container["resources"]["requests"]["nvidia.com/gpu"]
    ) == int(limits["nvidia.com/gpu"])
    assert spec["nodeSelector"], "dp workers must land on GPU nodes"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec[
        "tolerations"
    ]
    env = env_of(container)
    assert env["SMR_DP_DEVICE"]["value"] == "cuda"
    assert env["OMP_NUM_THREADS"]["value"] == str(limits["cpu"])
    # The same broker as every other worker, from the same Secret.
    scan_env = env_of(pod_spec(find("Deployment", "smr-worker-scan"))["containers"][0])
    assert env["CELERY_BROKER_URL"] == scan_env["CELERY_BROKER_URL"]
    # A rollout must not wait for a spare GPU.
    assert doc["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0
    # Long enough for a running job to end its epoch, longer than the scans' grace.
    scan_spec = pod_spec(find("Deployment", "smr-worker-scan"))
    assert spec["terminationGracePeriodSeconds"] >= scan_spec["terminationGracePeriodSeconds"]
    # Decrypted training data stays in memory, off the node's disk.
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert volumes[mounts["/tmp"]]["emptyDir"]["medium"] == "Memory"
    # Only these pods ask for a GPU.
    for _, other in k8s_docs():
        if other["kind"] in ("Deployment", "Job") and other["metadata"]["name"] != "smr-worker-dp":
            for c in pod_spec(other)["containers"]:
                assert "nvidia.com/gpu" not in c["resources"].get("limits", {}), c["name"]


def test_only_webhook_workers_reach_outside_on_http_and_never_private_ranges() -> None:
    """Bug caught: webhook pods left without egress (nothing is delivered), or allowed into
    the cluster's private ranges (the SSRF the application check guards against)."""
    policy = find("NetworkPolicy", "smr-webhooks-egress")
    labels = pod_spec_labels(find("Deployment", "smr-worker-webhooks"))
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    (rule,) = policy["spec"]["egress"]
    (block,) = rule["to"]
    assert block["ipBlock"]["cidr"] == "0.0.0.0/0"
    assert {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16"} <= set(
        block["ipBlock"]["except"]
    )
    assert {p["port"] for p in rule["ports"]} == {80, 443}


def pod_spec_labels(doc: dict) -> dict:
    return doc["spec"]["template"]["metadata"]["labels"]


def test_scan_workers_scale_on_their_queue_length() -> None:
    scaled = find("ScaledObject", "smr-worker-scan")
    ref = scaled["spec"]["scaleTargetRef"]
    assert (ref["kind"], ref["name"]) == ("Deployment", "smr-worker-scan")
    assert 1 <= scaled["spec"]["minReplicaCount"] < scaled["spec"]["maxReplicaCount"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "redis"
    assert trigger["metadata"]["listName"] == "scan"
    assert int(trigger["metadata"]["listLength"]) >= 1
    auth = find("TriggerAuthentication", trigger["authenticationRef"]["name"])
    secrets = {d["metadata"]["name"]: d for d in load_all(K8S / "secret.example.yaml")}
    for ref in auth["spec"]["secretTargetRef"]:
        assert ref["key"] in secrets[ref["name"]]["stringData"], ref
    # KEDA owns this Deployment's HPA: a second autoscaler would fight it.
    hpa_targets = {
        d["spec"]["scaleTargetRef"]["name"]
        for _, d in k8s_docs()
        if d["kind"] == "HorizontalPodAutoscaler"
    }
    assert "smr-worker-scan" not in hpa_targets


def test_compose_runs_a_worker_per_queue() -> None:
    services = compose()["services"]
    queues = {
        queue_of(s["command"]): name
        for name, s in services.items()
        if s.get("command", [])[:4] == ["celery", "-A", "workers.app", "worker"]
    }
    assert set(queues) == settings_queues()
    scan = services[queues["scan"]]["command"]
    assert "--autoscale" in scan  # the pool grows with the backlog on one host


def test_compose_dp_worker_reserves_a_gpu_and_builds_the_dp_extra() -> None:
    services = compose()["services"]
    dp = services["worker-dp"]
    command = dp["command"]
    assert queue_of(command) == "dp"
    assert command[command.index("--concurrency") + 1] == "1"
    assert command[command.index("--prefetch-multiplier") + 1] == "1"
    (device,) = dp["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert device["count"] == 1
    assert "gpu" in device["capabilities"]
    assert dp["build"]["args"]["EXTRAS"] == "dp"
    assert (ROOT / dp["build"]["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    # Its own image name: the slim image of the other services must not be overwritten.
    assert dp["image"] != services["web"]["image"]
    # Everything the other app services get, plus the device.
    env = dict(dp["environment"])
    assert env.pop("SMR_DP_DEVICE") == "cuda"
    assert env == services["worker"]["environment"]
    assert dp["secrets"] == services["worker"]["secrets"]
    assert dp["read_only"] is True and dp["cap_drop"] == ["ALL"]
    assert dp["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    # A GPU-less host can still `docker compose up` the rest.
    assert dp["profiles"] == ["gpu"]


def test_embedded_worker_consumes_every_queue() -> None:
    script = (DEPLOY / "run-embedded.sh").read_text()
    match = re.search(r"celery\S* -A workers\.app worker .*-Q (\S+)", script)
    assert match, "run-embedded.sh must start a worker with -Q"
    assert set(match.group(1).split(",")) == settings_queues()


def test_hpas_target_existing_deployments() -> None:
    for name, target in (("smr-web", "smr-web"), ("smr-worker", "smr-worker")):
        hpa = find("HorizontalPodAutoscaler", name)
        ref = hpa["spec"]["scaleTargetRef"]
        assert ref["kind"] == "Deployment"
        assert ref["name"] == target
        find("Deployment", target)
        assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    assert find("HorizontalPodAutoscaler", "smr-web")["spec"]["minReplicas"] >= 2


def test_network_policy_default_denies() -> None:
    policies = [d for _, d in k8s_docs() if d["kind"] == "NetworkPolicy"]
    deny = [p for p in policies if p["spec"]["podSelector"] == {}]
    assert deny, "expected a namespace-wide default-deny policy"
    assert set(deny[0]["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert not deny[0]["spec"].get("ingress") and not deny[0]["spec"].get("egress")


def test_secret_files_referenced_by_config_are_mounted() -> None:
    data = find("ConfigMap", "smr-config")["data"]
    secrets = {d["metadata"]["name"]: d for _, d in k8s_docs() if d["kind"] == "Secret"}
    spec = pod_spec(find("Deployment", "smr-web"))
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in spec["containers"][0]["volumeMounts"]}
    file_vars = {k: v for k, v in data.items() if k.endswith("_FILE")}
    assert {"SECRET_KEY_FILE", "DATABASE_URL_FILE", "SMR_KEYRING_FILE"} <= file_vars.keys()
    for var, path in file_vars.items():
        directory, _, key = path.rpartition("/")
        assert directory in mounts, f"{var}: nothing mounted at {directory}"
        secret_name = mounts[directory]["secret"]["secretName"]
        assert key in secrets[secret_name]["stringData"], f"{var}: {secret_name} lacks {key}"
    # Env-var secrets point at keys that exist too.
    for container in spec["containers"]:
        for env in container.get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                assert ref["key"] in secrets[ref["name"]]["stringData"]


# --- secrets ----------------------------------------------------------------------------------

PRIVATE_KEY = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")
AWS_ACCESS_KEY = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")
SECRETISH_NAME = re.compile(r"(SECRET|PASSWORD|PASSWD|TOKEN|PRIVATE|CREDENTIAL)", re.I)


def deploy_text_files() -> list[Path]:
    skip = {".pyc"}
    return sorted(
        p
        for p in DEPLOY.rglob("*")
        if p.is_file()
        and p.suffix not in skip
        and "__pycache__" not in p.parts
        and p.parent != DEPLOY / "secrets"  # generated locally, git-ignored
    )


@pytest.mark.parametrize("path", deploy_text_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_no_literal_keys_in_deploy(path: Path) -> None:
    text = path.read_text()
    assert not PRIVATE_KEY.search(text), f"{path} contains a private key"
    assert not AWS_ACCESS_KEY.search(text), f"{path} contains an AWS access key id"
    # A 32-byte key in base64 (the keyring's KEK format).
    for candidate in re.findall(r"[A-Za-z0-9+/]{43}=", text):
        try:
            raw = base64.b64decode(candidate, validate=True)
        except ValueError:
            continue
        assert len(raw) != 32, f"{path} contains what looks like a 32-byte key"


def test_secret_example_holds_placeholders_only() -> None:
    docs = load_all(K8S / "secret.example.yaml")
    assert {d["metadata"]["name"] for d in docs} == {"smr-secrets", "smr-keyring"}
    for doc in docs:
        assert doc["kind"] == "Secret"
        assert "data" not in doc, "use stringData so placeholders stay readable"
        for key, value in doc["stringData"].items():
            assert PLACEHOLDER in value, f"{doc['metadata']['name']}.{key} is not a placeholder"
    keyring = json.loads(
        next(d for d in docs if d["metadata"]["name"] == "smr-keyring")["stringData"][
            "keyring.json"
        ]
    )
    assert keyring["version"] == 1
    assert all(entry["key"] == PLACEHOLDER for entry in keyring["keys"].values())


def test_no_secret_objects_outside_the_example() -> None:
    for path, doc in k8s_docs():
        if doc["kind"] == "Secret":
            assert path.name.endswith(".example.yaml"), path
        if doc["kind"] == "ConfigMap":
            for key in doc["data"]:
                assert not SECRETISH_NAME.search(key) or key.endswith("_FILE"), key


def test_no_secret_values_in_compose_environment() -> None:
    for name, service in compose()["services"].items():
        env = service.get("environment", {})
        if isinstance(env, list):
            env = dict(item.split("=", 1) for item in env)
        for key in env:
            assert not SECRETISH_NAME.search(key) or key.endswith("_FILE"), f"{name}: {key}"
        if "DATABASE_URL" in env:
            assert "@" not in env["DATABASE_URL"], f"{name}: DATABASE_URL embeds a password"


# --- env var names exist in settings ----------------------------------------------------------

ENV_NAME = re.compile(r"\b(?:SMR|S3|KMS|DATABASE|SECRET)_[A-Z0-9_]*[A-Z0-9]\b")


def declared_env_names() -> set[str]:
    """Env names set in compose and k8s: parsed keys plus anything in the text (comments too)."""
    names: set[str] = set()
    for service in compose()["services"].values():
        env = service.get("environment", {})
        names |= {i.split("=", 1)[0] for i in env} if isinstance(env, list) else set(env)
    for _, doc in k8s_docs():
        if doc["kind"] == "ConfigMap":
            names |= set(doc["data"])
        template = doc.get("spec", {}).get("template", {}).get("spec", {})
        for container in template.get("initContainers", []) + template.get("containers", []):
            names |= {e["name"] for e in container.get("env", [])}
    texts = [DEPLOY / "compose.yaml", DEPLOY / "Dockerfile", *k8s_manifest_files()]
    for path in texts:
        names |= set(ENV_NAME.findall(path.read_text()))
    return {n for n in names if n.startswith(CHECKED_PREFIXES)}


def test_env_var_names_exist_in_settings() -> None:
    known = settings_env_names()
    used = declared_env_names()
    assert {"SMR_STORAGE", "S3_ENDPOINT_URL", "SECRET_KEY_FILE", "SMR_KEYRING_FILE"} <= used
    unknown = sorted(n for n in used if n not in known and n.removesuffix("_FILE") not in known)
    assert not unknown, f"not read by registry/settings.py: {unknown}"


# --- compose ----------------------------------------------------------------------------------


def test_compose_services_and_ordering() -> None:
    services = compose()["services"]
    assert {"web", "worker", "beat", "postgres", "redis", "minio", "migrate"} <= set(services)
    assert services["web"]["depends_on"]["migrate"]["condition"] == (
        "service_completed_successfully"
    )
    for name in ("worker", "beat"):
        assert services[name]["depends_on"]["migrate"]["condition"] == (
            "service_completed_successfully"
        )
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["postgres"]["image"].startswith("postgres:16")
    assert services["redis"]["image"].startswith("redis:7")
    init = [s for s in services.values() if s.get("image", "").startswith("minio/mc")]
    assert init, "expected a bucket-creating minio/mc job"
    assert "mc mb" in " ".join(init[0]["command"])
    for name in ("postgres", "redis", "minio", "web"):
        assert services[name]["healthcheck"]["test"], name
    assert "/healthz" in " ".join(services["web"]["healthcheck"]["test"])


def test_compose_app_services_use_the_dockerfile() -> None:
    services = compose()["services"]
    for name in ("web", "worker", "beat", "migrate"):
        build = services[name]["build"]
        assert (DEPLOY / build["context"]).resolve() == ROOT
        assert (ROOT / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
    assert services["worker"]["command"][:4] == ["celery", "-A", "workers.app", "worker"]
    assert services["beat"]["command"][:4] == ["celery", "-A", "workers.app", "beat"]
    web_cmd = services["web"]["command"]
    assert "gunicorn" in web_cmd and "deploy/gunicorn.conf.py" in web_cmd


def test_compose_env_and_secrets() -> None:
    doc = compose()
    services = doc["services"]
    env = services["web"]["environment"]
    assert env["SMR_STORAGE"] == "s3"
    assert env["S3_ENDPOINT_URL"] == "http://minio:9000"
    assert env["SMR_KEY_PROVIDER"] == "local"
    assert env["SECURE_SSL_REDIRECT"] == "0"
    for key in (
        "S3_BUCKET",
        "S3_REGION",
        "S3_ACCESS_KEY_ID",
        "ALLOWED_HOSTS",
        "CSRF_TRUSTED_ORIGINS",
    ):
        assert env[key], key
    assert "localhost" in env["ALLOWED_HOSTS"].split(",")  # the HEALTHCHECK's Host
    declared = doc["secrets"]
    mounted = set(services["web"]["secrets"])
    for var in (
        "SECRET_KEY_FILE",
        "S3_SECRET_ACCESS_KEY_FILE",
        "SMR_KEYRING_FILE",
        "DATABASE_URL_FILE",
    ):
        path = env[var]
        assert path.startswith("/run/secrets/"), var
        assert path.removeprefix("/run/secrets/") in mounted, var
    for name in mounted:
        source = (DEPLOY / declared[name]["file"]).resolve()
        assert source.parent == DEPLOY / "secrets", name
    ignore = (DEPLOY / "secrets" / ".gitignore").read_text().split()
    assert "*" in ignore, "deploy/secrets/ must be git-ignored"
    # The aws-kms alternative is documented next to the keyring.
    text = (DEPLOY / "compose.yaml").read_text()
    assert re.search(r"#\s*SMR_KEY_PROVIDER:\s*aws-kms", text)
    assert re.search(r"#\s*KMS_KEY_ID:", text)


def test_make_secrets_generates_a_loadable_keyring(tmp_path: Path) -> None:
    import importlib.util

    from registry.crypto.keys import LocalKeyring

    spec = importlib.util.spec_from_file_location("make_secrets", DEPLOY / "make_secrets.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "secrets"
    written = module.generate(out)
    declared = {Path(s["file"]).name for s in compose()["secrets"].values()}
    assert declared <= set(written)
    ring = LocalKeyring(out / "keyring.json")
    assert "k1" in repr(ring)
    db_password = (out / "postgres_password").read_text().strip()
    assert f":{db_password}@postgres:5432/" in (out / "database_url").read_text()
    # Never overwrites: the keyring is the only copy of the keys.
    before = (out / "keyring.json").read_text()
    assert module.generate(out) == []
    assert (out / "keyring.json").read_text() == before


# --- Dockerfile -------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", dockerfile())
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_is_multi_stage_python_slim() -> None:
    froms = [args for word, args in dockerfile_instructions() if word == "FROM"]
    assert len(froms) >= 2
    assert all(f.startswith("python:3.11-slim") for f in froms)


def test_dockerfile_runs_as_non_root() -> None:
    users = [args for word, args in dockerfile_instructions() if word == "USER"]
    assert users, "no USER instruction"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    assert user.isdigit(), "numeric USER lets Kubernetes verify runAsNonRoot"
    runtime = find("Deployment", "smr-web")["spec"]["template"]["spec"]["securityContext"]
    assert runtime["runAsUser"] == int(user)


def test_dockerfile_healthcheck_env_and_cmd() -> None:
    instructions = dockerfile_instructions()
    (health,) = [args for word, args in instructions if word == "HEALTHCHECK"]
    assert "/healthz" in health
    envs = " ".join(args for word, args in instructions if word == "ENV")
    assert re.search(r"\bSMR_PRODUCTION=1\b", envs)
    assert any(word == "EXPOSE" and "8000" in args.split() for word, args in instructions)
    (cmd,) = [json.loads(args) for word, args in instructions if word == "CMD"]
    assert cmd[0] == "gunicorn"
    assert cmd[cmd.index("-c") + 1] == "deploy/gunicorn.conf.py"
    assert cmd[cmd.index("--bind") + 1] == "0.0.0.0:8000"
    copied = " ".join(args for word, args in instructions if word == "COPY")
    assert "deploy/gunicorn.conf.py" in copied


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for word, args in dockerfile_instructions():
        if word == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((word, args))
    return stages


def test_dockerfile_installs_torch_only_with_the_dp_extra() -> None:
    """Bug caught: torch (several GB with CUDA) in every role's image, or a dp image without
    it because a stage reads EXTRAS without declaring the build arg (it would be empty)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(dep.lower().startswith("torch") for dep in project["dependencies"])
    assert any(dep.startswith("torch") for dep in project["optional-dependencies"]["dp"])
    pip_runs = []
    for stage in dockerfile_stages():
        declared: dict[str, str] = {}
        for word, args in stage:
            if word == "ARG":
                name, _, default = args.partition("=")
                declared[name] = default.strip('"')
            if word == "RUN" and re.search(r"pip (?:wheel|install)\b", args):
                pip_runs.append(args)
                assert "EXTRAS" in args, f"pip ignores the extras: {args}"
                assert declared.get("EXTRAS") == "", "EXTRAS must be declared, empty by default"
                assert "torch" not in args.replace("TORCH_INDEX_URL", "").lower()
    # `.` or `.[dp]`, then the installed wheel with the same extras.
    with_extras = re.escape("${EXTRAS:+[$EXTRAS]}")
    assert any(re.search(rf'pip wheel\b.*\s"\.{with_extras}"', r) for r in pip_runs)
    assert any(
        re.search(rf"pip install\b.*secure-model-registry{with_extras}", r) for r in pip_runs
    )


def test_dockerfile_build_context_excludes_local_state() -> None:
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    for entry in (".venv", "var", ".git", "deploy/secrets"):
        assert entry in ignore, entry
