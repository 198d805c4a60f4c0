"""deploy/kubernetes, proven offline: rendered by kustomize (kubectl's built-in), validated against the Kubernetes
API schemas (kubernetes-validate), and every command, path and selector in it checked against this repository.

No cluster runs here: what a cluster does with these objects is on paper (docs/DEPLOY.md says which parts).
"""

from __future__ import annotations

import ipaddress
import json
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from sdxl.training.config import TrainingConfig
from tools.testing.cog_server import ROOT
from tools.testing.modules import load_file

KUBE = ROOT / "deploy" / "kubernetes"
KUSTOMIZATIONS = ("overlays/production", "training", "base")
IMAGE_ROOT = Path("/src")  # where `cog build` puts the repository in the image (its WORKDIR)
SCHEMA_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
# The balancer's config in base, as render_config.py writes it for namespace sdxl (overlays/production).
BALANCER_RENDER = [
    "--discover", "sdxl-predictor-pods.sdxl.svc.cluster.local:5000", "--slots", "32", "--bind", ":8080",
    "--monitor-bind", ":8404", "--request-timeout-s", "900", "--queue-timeout-s", "900",
    "--lua-path", "/usr/local/etc/haproxy/cog_slot_grace.lua",
]  # fmt: skip


def kustomize_v5() -> bool:
    if shutil.which("kubectl") is None:
        return False
    version = subprocess.run(["kubectl", "version", "--client"], capture_output=True, text=True, timeout=60).stdout
    major = re.search(r"Kustomize Version: v(\d+)", version)
    return major is not None and int(major.group(1)) >= 5


needs_kustomize = pytest.mark.skipif(not kustomize_v5(), reason="needs kubectl with kustomize v5 (kubectl kustomize)")


@cache
def rendered(name: str) -> tuple[dict, ...]:
    done = subprocess.run(["kubectl", "kustomize", str(KUBE / name)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def find(docs, kind: str, name: str) -> dict:
    def named(actual: str) -> bool:  # kustomize suffixes generated ConfigMaps with a content hash
        return actual == name or (kind == "ConfigMap" and actual.startswith(f"{name}-"))

    matches = [d for d in docs if d["kind"] == kind and named(d["metadata"]["name"])]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


def container(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]["containers"][0]


def in_repo(image_path: str) -> Path:
    """The repository file that an absolute path in the image is."""
    return ROOT / Path(image_path).relative_to(IMAGE_ROOT)


def probe_timeouts() -> dict[str, float]:
    probe = load_file("probe", ROOT / "deploy" / "probe.py")

    return probe.TIMEOUT_S


def resource_files() -> list[Path]:
    """Every whole object file the kustomizations list (patches are partial and are checked rendered)."""
    files = []
    for kustomization in KUBE.rglob("kustomization.yaml"):
        for entry in yaml.safe_load(kustomization.read_text()).get("resources", []):
            path = (kustomization.parent / entry).resolve()
            files += [path] if path.is_file() else []
    return files


@pytest.mark.parametrize("path", resource_files(), ids=lambda p: str(p.relative_to(KUBE)))
def test_every_listed_manifest_is_valid_against_the_schemas(path):
    for doc in yaml.safe_load_all(path.read_text()):
        for version in SCHEMA_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


@needs_kustomize
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_kustomization_renders_to_valid_objects(name):
    docs = rendered(name)
    assert docs
    for doc in docs:
        for version in SCHEMA_VERSIONS:
            kubernetes_validate.validate(doc, version, strict=True)


@needs_kustomize
def test_predictor_takes_one_gpu_probes_run_the_committed_script_and_drains_longer_than_a_prediction():
    docs = rendered("overlays/production")
    predictor = find(docs, "Deployment", "sdxl-predictor")
    main = container(predictor)
    assert main["resources"]["requests"]["nvidia.com/gpu"] == 1 == main["resources"]["limits"]["nvidia.com/gpu"]
    for probe, mode in (("startupProbe", "startup"), ("readinessProbe", "ready"), ("livenessProbe", "live")):
        command = main[probe]["exec"]["command"]
        assert command == ["python", str(IMAGE_ROOT / "deploy/probe.py"), mode]
        assert in_repo(command[1]).is_file()
        assert main[probe]["timeoutSeconds"] > probe_timeouts()[mode], "the kubelet would cut the probe's own wait"
    startup = main["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "a cold start from network storage"
    dockerignore = (ROOT / ".dockerignore").read_text().split()
    assert not any(line.strip("/").startswith("deploy") for line in dockerignore), "the probe must be in the image"
    server_timeout = int(re.search(r"timeout server (\d+)s", balancer_config()).group(1))
    assert predictor["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > server_timeout
    assert predictor["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"] == "sdxl"


@needs_kustomize
def test_weights_are_filled_once_by_the_job_and_mounted_read_only():
    docs = rendered("overlays/production")
    predictor, job = find(docs, "Deployment", "sdxl-predictor"), find(docs, "Job", "sdxl-weights")
    pod = predictor["spec"]["template"]["spec"]
    volume = next(v for v in pod["volumes"] if v["name"] == "weights")
    assert volume["persistentVolumeClaim"] == {"claimName": "sdxl-weights", "readOnly": True}
    mount = next(m for m in container(predictor)["volumeMounts"] if m["name"] == "weights")
    assert mount["readOnly"] is True
    assert {"name": "SDXL_WEIGHTS_DIR", "value": mount["mountPath"]} in container(predictor)["env"]
    command = container(job)["command"]
    job_mount = next(m for m in container(job)["volumeMounts"] if m["name"] == "weights")
    assert command[:2] == ["python", "/src/scripts/download_weights.py"]
    assert {"name": "PYTHONPATH", "value": "/src"} in container(job)["env"]  # the script imports sdxl from /src
    assert command[command.index("--dir") + 1] == job_mount["mountPath"]
    job_volume = next(v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == "weights")
    assert job_volume["persistentVolumeClaim"]["claimName"] == "sdxl-weights"
    # The Job's own arguments, offline: the script accepts them and names what it would fetch.
    dry = subprocess.run(
        [sys.executable, str(in_repo(command[1])), *command[2:], "--dry-run"], capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert dry.returncode == 0, dry.stderr
    assert "sdxl-base-1.0" in dry.stdout + dry.stderr


def labels_match(selector: dict, labels: dict) -> bool:
    """Kubernetes label-selector semantics (matchLabels and In/NotIn/Exists expressions)."""
    selector = selector if "matchLabels" in selector or "matchExpressions" in selector else {"matchLabels": selector}
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        value, present = labels.get(expression["key"]), expression["key"] in labels
        ok = {
            "In": present and value in expression.get("values", []),
            "NotIn": not present or value not in expression.get("values", []),
            "Exists": present,
            "DoesNotExist": not present,
        }[expression["operator"]]
        if not ok:
            return False
    return True


def selected(docs, selector: dict) -> set[str]:
    """Names of the workloads whose pods the selector picks."""
    pods = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in docs if d["kind"] in ("Deployment", "Job")}  # fmt: skip
    return {name for name, labels in pods.items() if labels_match(selector, labels)}


@needs_kustomize
def test_services_policies_and_budget_select_the_intended_pods():
    docs = rendered("overlays/production") + rendered("training")
    assert selected(docs, find(docs, "Service", "sdxl-predictor-pods")["spec"]["selector"]) == {"sdxl-predictor"}
    assert selected(docs, find(docs, "Service", "sdxl")["spec"]["selector"]) == {"sdxl-balancer"}
    assert selected(docs, find(docs, "PodDisruptionBudget", "sdxl-predictor")["spec"]["selector"]) == {"sdxl-predictor"}
    egress = find(rendered("overlays/production"), "NetworkPolicy", "sdxl-egress")["spec"]
    assert selected(docs, egress["podSelector"]) == {"sdxl-predictor", "sdxl-weights", "sdxl-training"}
    ingress = find(docs, "NetworkPolicy", "sdxl-predictor-ingress")["spec"]
    assert selected(docs, ingress["podSelector"]) == {"sdxl-predictor"}
    assert selected(docs, ingress["ingress"][0]["from"][0]["podSelector"]) == {"sdxl-balancer"}
    for policy in (egress, find(docs, "NetworkPolicy", "sdxl-balancer")["spec"]):
        dns = next(rule for rule in policy["egress"] if {"protocol": "UDP", "port": 53} in rule["ports"])
        assert dns["to"] == [
            {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},  # nothing of ours added by kustomize
            }
        ]
    hpa = find(docs, "HorizontalPodAutoscaler", "sdxl-predictor")["spec"]
    assert hpa["scaleTargetRef"]["name"] == "sdxl-predictor" and hpa["minReplicas"] >= 1


def egress_allows(policy: dict, address: str, port: int) -> bool:
    """NetworkPolicy ipBlock semantics: some rule whose ports include `port` has a block holding the address outside
    its `except` ranges."""
    ip = ipaddress.ip_address(address)
    for rule in policy["egress"]:
        if not any(p["port"] == port and p["protocol"] == "TCP" for p in rule["ports"]):
            continue
        for peer in rule["to"]:
            block = peer.get("ipBlock")
            if not block or ip.version != ipaddress.ip_network(block["cidr"]).version:
                continue
            inside = ip in ipaddress.ip_network(block["cidr"])
            if inside and not any(ip in ipaddress.ip_network(e) for e in block.get("except", [])):
                return True
    return False


BLOCKED = [
    "169.254.169.254",  # AWS, GCP, Azure metadata
    "100.100.100.200",  # Alibaba metadata (carrier-grade NAT range)
    "fd00:ec2::254",  # AWS IPv6 metadata
    "10.0.0.1", "172.16.5.4", "192.168.1.1", "127.0.0.1", "0.0.0.0", "::1", "fe80::1",
    "::ffff:10.0.0.1", "::ffff:169.254.169.254", "64:ff9b::a00:1", "64:ff9b:1::a00:1", "224.0.0.1",
]  # fmt: skip


@needs_kustomize
@pytest.mark.parametrize("address", BLOCKED)
def test_egress_wall_refuses_private_and_metadata_addresses(address):
    policy = find(rendered("overlays/production"), "NetworkPolicy", "sdxl-egress")["spec"]
    assert not egress_allows(policy, address, 443)


@needs_kustomize
def test_egress_wall_allows_public_https_only():
    policy = find(rendered("overlays/production"), "NetworkPolicy", "sdxl-egress")["spec"]
    for public in ("93.184.216.34", "2606:2800:220:1::1"):  # literal documentation-style public addresses
        assert egress_allows(policy, public, 443)
        assert not egress_allows(policy, public, 80), "plain HTTP"
    assert {p["port"] for rule in policy["egress"] for p in rule["ports"]} == {53, 443}


def balancer_config() -> str:
    return (KUBE / "base" / "balancer" / "haproxy.cfg").read_text()


def test_balancer_config_is_the_fresh_render_and_haproxy_accepts_it(tmp_path):
    done = subprocess.run(
        [sys.executable, "deploy/haproxy/render_config.py", *BALANCER_RENDER], cwd=ROOT, capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert done.stdout == balancer_config(), "rerender base/balancer/haproxy.cfg with the arguments above"
    lua = (ROOT / "deploy" / "haproxy" / "cog_slot_grace.lua").read_bytes()
    assert (KUBE / "base" / "balancer" / "cog_slot_grace.lua").read_bytes() == lua
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed: the syntax check needs it")
    (tmp_path / "cog_slot_grace.lua").write_bytes(lua)
    local = balancer_config().replace("/usr/local/etc/haproxy/cog_slot_grace.lua", str(tmp_path / "cog_slot_grace.lua"))
    (tmp_path / "haproxy.cfg").write_text(local)
    check = subprocess.run(["haproxy", "-c", "-f", str(tmp_path / "haproxy.cfg")], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


@needs_kustomize
def test_balancer_discovers_the_headless_service_of_the_production_namespace():
    docs = rendered("overlays/production")
    service = find(docs, "Service", "sdxl-predictor-pods")
    assert service["spec"]["clusterIP"] == "None"
    name = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local"
    assert f"server-template predictor 1-32 {name}:{service['spec']['ports'][0]['port']}" in balancer_config()
    balancer = find(docs, "Deployment", "sdxl-balancer")
    assert balancer["spec"]["replicas"] == 1, "two balancers would each send a predictor a request: 409"
    ports = {p["name"]: p["containerPort"] for p in container(balancer)["ports"]}
    assert f"bind :{ports['http']}" in balancer_config() and f"bind :{ports['metrics']}" in balancer_config()


@needs_kustomize
def test_training_job_runs_the_committed_entry_on_several_gpus_with_a_valid_config():
    docs = rendered("training")
    job = find(docs, "Job", "sdxl-training")
    main = container(job)
    assert main["resources"]["limits"]["nvidia.com/gpu"] > 1
    command = main["command"]
    assert command[:2] == ["python", "/src/deploy/train_job.py"] and in_repo(command[1]).is_file()
    assert {"name": "PYTHONPATH", "value": "/src"} in main["env"]  # the entry imports train.py and sdxl from /src
    config_mount = next(m for m in main["volumeMounts"] if m["name"] == "config")["mountPath"]
    assert command[command.index("--config") + 1] == f"{config_mount}/training.json"
    config_map = find(docs, "ConfigMap", "sdxl-training")
    TrainingConfig(**json.loads(config_map["data"]["training.json"]))  # the trainer's own checks
    data_mount = next(m for m in main["volumeMounts"] if m["name"] == "data")["mountPath"]
    assert command[command.index("--output") + 1].startswith(data_mount + "/")


@needs_kustomize
def test_no_workload_allows_loopback_urls():
    docs = rendered("overlays/production") + rendered("training")
    for doc in (d for d in docs if d["kind"] in ("Deployment", "Job")):
        names = {e["name"] for c in doc["spec"]["template"]["spec"]["containers"] for e in c.get("env", [])}
        assert "SDXL_ALLOW_LOOPBACK_HTTP" not in names, doc["metadata"]["name"]
        # coglet sends this token with every webhook, to whatever URL the request names.
        assert "WEBHOOK_AUTH_TOKEN" not in names, doc["metadata"]["name"]


def image_user() -> int:
    """The uid cog.yaml's build gives the image's non-root user."""
    build = yaml.safe_load((ROOT / "cog.yaml").read_text())["build"]
    return int(re.search(r"useradd --uid (\d+)", " ".join(build["run"])).group(1))


def pod_templates() -> list[dict]:
    docs = rendered("overlays/production") + rendered("training")
    return [d for d in docs if d["kind"] in ("Deployment", "Job")]


@needs_kustomize
def test_every_pod_runs_unprivileged_on_a_read_only_root_filesystem():
    templates = pod_templates()
    assert {t["metadata"]["name"] for t in templates} == {
        "sdxl-predictor",
        "sdxl-balancer",
        "sdxl-weights",
        "sdxl-training",
    }
    for template in templates:
        name, pod = template["metadata"]["name"], template["spec"]["template"]["spec"]
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True and context["runAsUser"] > 0, name
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}, name
        if container(template)["image"].endswith("sdxl-cog") or "sdxl-cog:" in container(template)["image"]:
            assert context["runAsUser"] == image_user(), f"{name}: not the image's user"
        volumes = {v["name"]: v for v in pod["volumes"]}
        for main in pod["containers"]:
            security = main["securityContext"]
            assert security["readOnlyRootFilesystem"] is True, name
            assert security["allowPrivilegeEscalation"] is False and security["capabilities"] == {"drop": ["ALL"]}
            for mount in main.get("volumeMounts", []):  # writable: scratch or a volume of its own, never the image
                volume = volumes[mount["name"]]
                assert mount.get("readOnly") or "emptyDir" in volume or "persistentVolumeClaim" in volume, name
            env = {e["name"]: e.get("value") for e in main.get("env", [])}
            if "HOME" in env:
                assert any(env["HOME"] == m["mountPath"] and not m.get("readOnly") for m in main["volumeMounts"])


@needs_kustomize
def test_predictor_scratch_holds_twice_the_weights_cache_and_coglet_can_write_its_readiness_file():
    predictor = find(rendered("overlays/production"), "Deployment", "sdxl-predictor")
    pod, main = predictor["spec"]["template"]["spec"], container(predictor)
    env = {e["name"]: e.get("value") for e in main["env"]}
    mounts = {m["mountPath"]: m["name"] for m in main["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert env["TMPDIR"] == "/tmp" and "emptyDir" in volumes[mounts["/tmp"]]
    scratch = parse_quantity(volumes[mounts["/tmp"]]["emptyDir"]["sizeLimit"])
    assert 2 * int(env["SDXL_WEIGHTS_CACHE_BYTES"]) <= scratch
    assert parse_quantity(main["resources"]["limits"]["ephemeral-storage"]) > scratch, "eviction before the cap"
    assert "emptyDir" in volumes[mounts["/var/run/cog"]]


def parse_quantity(text: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}
    return int(text[:-2]) * units[text[-2:]] if text[-2:] in units else int(text)


@needs_kustomize
def test_the_monitoring_port_is_not_on_the_clients_service():
    docs = rendered("overlays/production")
    assert [p["targetPort"] for p in find(docs, "Service", "sdxl")["spec"]["ports"]] == ["http"]
    monitoring = find(docs, "Service", "sdxl-monitoring")["spec"]
    assert [p["targetPort"] for p in monitoring["ports"]] == ["metrics"]
    assert selected(docs, monitoring["selector"]) == {"sdxl-balancer"}
