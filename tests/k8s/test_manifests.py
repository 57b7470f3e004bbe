"""The Kubernetes manifests, checked offline (the Dockerfile: test_image.py).

Every overlay under k8s/overlays (found, not listed) and k8s/monitoring is built with the
kustomize inside kubectl and each resource validated against the Kubernetes 1.37 schemas
(strict: an unknown or misspelt field fails). Then the properties the deployment relies on:
the gateway's port (never the SuperLink's) leaves the cluster only through the path-split
Ingresses, Control only for operator client certificates, sites talk to the
aggregator and DNS only, kits come from Secrets made outside git, pods run as the image's
non-root user with a read-only root filesystem, flags, ports and probes agree, and the Docker
build context can never carry data, runs, kits or keys. No Docker daemon or cluster is needed.
"""

import ipaddress
import json
import re
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.k8s.manifests import (
    AGGREGATOR,
    AGGREGATOR_HEALTH,
    AGGREGATOR_METRICS,
    BUILDS,
    FLEET_PORT,
    GPU,
    K8S,
    K8S_VERSION,
    ROOT,
    SITE,
    SITE_HEALTH,
    SITE_METRICS,
    UID,
    VERSION,
    build,
    builds_with,
    container,
    docker_user,
    find,
    flags,
    instruction,
    mounts,
    ports,
    workloads,
)

# --- every build: it builds, it validates, it holds no key -----------------------------------


def test_the_example_overlays_are_there() -> None:
    assert {"overlays/aggregator", "overlays/hospital-example"} <= BUILDS.keys()


@pytest.mark.parametrize("name", BUILDS)
def test_build_validates_against_kubernetes_1_37(name: str) -> None:
    errors = []
    for resource in build(name):
        what = f"{resource['kind']}/{resource['metadata']['name']}"
        try:
            kubernetes_validate.validate(resource, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{what}: {'.'.join(map(str, e.path))}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            errors.append(f"{what}: {e.message}")
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("name", BUILDS)
def test_no_build_carries_a_key_or_a_secret(name: str) -> None:
    resources = build(name)
    assert "PRIVATE KEY" not in yaml.safe_dump_all(resources)
    # Kits reach the cluster as Secrets made from KITS/ by hand, never from these manifests.
    assert [r["metadata"]["name"] for r in resources if r["kind"] == "Secret"] == []


def test_no_key_lies_under_k8s() -> None:
    keys = [
        str(p.relative_to(ROOT))
        for p in K8S.rglob("*")
        if p.is_file() and (p.suffix == ".key" or b"PRIVATE KEY" in p.read_bytes())
    ]
    assert keys == []


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


@pytest.mark.parametrize("name", BUILDS)
def test_every_service_and_network_policy_selects_a_pod_of_its_build(name: str) -> None:
    resources = build(name)
    pods = [
        r["spec"]["template"] for r in resources if r["kind"] in {"Deployment", "StatefulSet"}
    ]
    for r in resources:
        if r["kind"] == "Service":
            selector = r["spec"]["selector"]
        elif r["kind"] == "NetworkPolicy":
            selector = r["spec"]["podSelector"]["matchLabels"]
        else:
            continue
        chosen = [pod for pod in pods if selects(selector, pod["metadata"]["labels"])]
        assert chosen, f"{name}: {r['kind']}/{r['metadata']['name']} selects no pod"
        if r["kind"] == "Service":
            for port in r["spec"]["ports"]:
                assert all(
                    port["targetPort"] in {p["name"] for p in pod["spec"]["containers"][0]["ports"]}
                    for pod in chosen
                ), f"{name}: Service/{r['metadata']['name']} targets a port no pod names"


# --- pods: security context, image --------------------------------------------------------


def test_every_container_runs_as_the_image_user_read_only_without_privileges() -> None:
    checked = 0
    for what, workload in workloads():
        pod = workload["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False, what
        for c in pod.get("initContainers", []) + pod["containers"]:
            ctx = {**pod.get("securityContext", {}), **c.get("securityContext", {})}
            assert ctx.get("runAsNonRoot") is True, what
            assert ctx.get("runAsUser") == UID == docker_user(), what
            assert ctx.get("readOnlyRootFilesystem") is True, what
            assert ctx.get("allowPrivilegeEscalation") is False, what
            assert ctx.get("capabilities", {}).get("drop") == ["ALL"], what
            assert ctx.get("capabilities", {}).get("add") is None, what
            assert ctx.get("seccompProfile") == {"type": "RuntimeDefault"}, what
            assert "limits" in c.get("resources", {}) and "requests" in c["resources"], what
            checked += 1
    assert checked >= 2


def test_images_are_this_release_and_the_cuda_build_goes_where_a_gpu_is_requested() -> None:
    for what, workload in workloads():
        c = container(workload)
        gpu = GPU in c["resources"].get("limits", {})
        expected = f"medfed:{VERSION}-cuda" if gpu else f"medfed:{VERSION}"
        assert c["image"] == expected, what


# --- the aggregator ------------------------------------------------------------------------


def test_aggregator_flags_ports_and_probes_agree() -> None:
    for name, deployment in builds_with("Deployment", AGGREGATOR):
        c = container(deployment)
        args = flags(c["args"])
        assert c["args"][0] == "server", name
        # the container exposes the gateway; the SuperLink listens on 127.0.0.1 inside the pod
        assert ports(deployment) == {
            "gateway": FLEET_PORT, "health": AGGREGATOR_HEALTH, "metrics": AGGREGATOR_METRICS,
        }, name
        assert (args["--port"], args["--health-port"], args["--metrics-port"]) == (
            str(FLEET_PORT), str(AGGREGATOR_HEALTH), str(AGGREGATOR_METRICS),
        ), name
        assert args["--host"] == args["--metrics-host"] == "0.0.0.0", name
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"] == {"port": AGGREGATOR_HEALTH}, (name, probe)
        # SQLite state: never two SuperLinks on one database
        assert deployment["spec"]["replicas"] == 1, name
        assert deployment["spec"]["strategy"] == {"type": "Recreate"}, name


def test_aggregator_mounts_its_kit_read_only_and_its_state_on_a_claim() -> None:
    for name, deployment in builds_with("Deployment", AGGREGATOR):
        args, vols = flags(container(deployment)["args"]), mounts(deployment)
        kit_mount, kit = vols[args["--kit"]]
        assert args["--kit"] == "/kit", name
        assert kit_mount.get("readOnly") is True, name
        assert kit["secret"] == {"secretName": "medfed-server-kit", "defaultMode": 0o400}, name
        assert "subPath" not in kit_mount, f"{name}: a subPath mount never sees an updated kit"
        _, state = vols[args["--state"]]
        claim = state["persistentVolumeClaim"]["claimName"]
        assert find(build(name), "PersistentVolumeClaim", claim) is not None, name
        assert {"name": "FLWR_HOME", "value": "/state/flwr"} in container(deployment)["env"]


def ingress_paths(ingress: dict[str, Any]) -> set[tuple[str, str, str]]:
    """(host, path, backend service) of every route."""
    return {
        (rule["host"], p["path"], p["backend"]["service"]["name"])
        for rule in ingress["spec"]["rules"]
        for p in rule["http"]["paths"]
    }


def test_ingresses_route_fleet_to_hospitals_and_control_to_allow_listed_operators() -> None:
    expected_secret = {"superlink-fleet": "medfed-ca", "superlink-control": "medfed-control-client"}
    for name, fleet in builds_with("Ingress", "superlink-fleet"):
        resources = build(name)
        control = find(resources, "Ingress", "superlink-control")
        assert control is not None, name
        ((fleet_host, fleet_path, fleet_service),) = ingress_paths(fleet)
        ((control_host, control_path, control_service),) = ingress_paths(control)
        assert fleet_path == "/v1/fleet/" and control_path == "/v1/control/", name
        assert fleet_host != control_host, name
        assert "defaultBackend" not in fleet["spec"] and "defaultBackend" not in control["spec"]
        for ingress, host in ((fleet, fleet_host), (control, control_host)):
            notes = ingress["metadata"]["annotations"]
            # TLS re-encryption: ingress-nginx reads the path, then speaks HTTPS to the SuperLink
            assert notes["nginx.ingress.kubernetes.io/backend-protocol"] == "HTTPS", name
            assert notes.get("nginx.ingress.kubernetes.io/ssl-passthrough") != "true", name
            assert [t["hosts"] for t in ingress["spec"]["tls"]] == [[host]], name
            assert all(r["http"]["paths"][0]["pathType"] == "Prefix"
                       for r in ingress["spec"]["rules"])
            # the re-encrypted hop checks the gateway's certificate, under the Fleet host
            # (which the certificate names), with a Secret of the Ingress's own namespace
            if notes.get("nginx.ingress.kubernetes.io/proxy-ssl-verify") == "on":
                secret = expected_secret[ingress["metadata"]["name"]]
                assert notes["nginx.ingress.kubernetes.io/proxy-ssl-secret"] == (
                    f"{ingress['metadata']['namespace']}/{secret}"
                ), name
                assert notes["nginx.ingress.kubernetes.io/proxy-ssl-name"] == fleet_host, name
        allowed = control["metadata"]["annotations"][
            "nginx.ingress.kubernetes.io/whitelist-source-range"
        ]
        networks = [ipaddress.ip_network(c.strip()) for c in allowed.split(",")]
        assert networks and all(n.prefixlen > 0 for n in networks), f"{name}: {allowed}"
        assert "nginx.ingress.kubernetes.io/whitelist-source-range" not in fleet["metadata"][
            "annotations"
        ], f"{name}: hospitals connect from anywhere their kit is"
        # both Ingresses reach the SuperLink's one port
        for service_name in (fleet_service, control_service):
            service = find(resources, "Service", service_name)
            assert service is not None, (name, service_name)
            assert service["spec"]["type"] == "ClusterIP", (name, service_name)
            assert [p["targetPort"] for p in service["spec"]["ports"]] == ["gateway"]


def test_control_needs_an_operator_certificate_and_fleet_none() -> None:
    for name, control in builds_with("Ingress", "superlink-control"):
        namespace = control["metadata"]["namespace"]
        notes = control["metadata"]["annotations"]
        # the client must present a certificate of the project CA, checked against its CRL
        assert notes["nginx.ingress.kubernetes.io/auth-tls-verify-client"] == "on", name
        assert notes["nginx.ingress.kubernetes.io/auth-tls-secret"] == (
            f"{namespace}/medfed-operator-ca"
        ), name
        assert notes["nginx.ingress.kubernetes.io/auth-tls-verify-depth"] == "1", name
        assert notes.get("nginx.ingress.kubernetes.io/ssl-passthrough") != "true", name
        # the re-encrypted hop presents the Ingress's own operator certificate to the gateway
        # (which serves /v1/control/ to nobody else) and checks the gateway's certificate
        assert notes["nginx.ingress.kubernetes.io/proxy-ssl-verify"] == "on", name
        assert notes["nginx.ingress.kubernetes.io/proxy-ssl-secret"] == (
            f"{namespace}/medfed-control-client"
        ), name
        fleet = find(build(name), "Ingress", "superlink-fleet")
        assert fleet is not None, name
        assert not any("auth-tls" in k for k in fleet["metadata"]["annotations"]), (
            f"{name}: hospitals authenticate with their node keys, not certificates"
        )


def test_the_image_carries_nginx_for_the_gateway() -> None:
    (run,) = [args for args in instruction("RUN") if "apt-get" in args]
    assert re.search(r"apt-get install -y --no-install-recommends nginx\b", run), run
    assert "rm -rf /var/lib/apt/lists/*" in run


def test_no_ingress_anywhere_routes_runtime_or_the_whole_port() -> None:
    for name in BUILDS:
        for r in build(name):
            if r["kind"] == "Ingress":
                for _, path, _ in ingress_paths(r):
                    assert path in {"/v1/fleet/", "/v1/control/"}, f"{name}: {path}"
            if r["kind"] == "Service":
                assert r["spec"].get("type", "ClusterIP") == "ClusterIP", name


def allowed_ingress(policy: dict[str, Any]) -> dict[int, list[dict[str, Any]]]:
    """port -> the peers allowed to connect to it."""
    allowed: dict[int, list[dict[str, Any]]] = {}
    for rule in policy["spec"]["ingress"]:
        for port in rule["ports"]:
            assert port["protocol"] == "TCP"
            allowed.setdefault(port["port"], []).extend(rule["from"])
    return allowed


def namespace_peer(name: str) -> dict[str, Any]:
    return {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": name}}}


def test_aggregator_accepts_the_superlink_port_from_the_ingress_controller_only() -> None:
    for name, policy in builds_with("NetworkPolicy", AGGREGATOR):
        assert policy["spec"]["podSelector"]["matchLabels"] == {
            "app.kubernetes.io/name": "medfed", "app.kubernetes.io/component": "aggregator",
        }
        assert "Ingress" in policy["spec"]["policyTypes"], name
        allowed = allowed_ingress(policy)
        assert allowed.keys() == {FLEET_PORT, AGGREGATOR_METRICS, AGGREGATOR_HEALTH}, name
        assert allowed[FLEET_PORT] == [namespace_peer("ingress-nginx")], name
        assert allowed[AGGREGATOR_METRICS] == [namespace_peer("monitoring")], name


# --- a hospital site -------------------------------------------------------------------------


def test_site_flags_ports_probes_and_mounts_agree() -> None:
    for name, deployment in builds_with("Deployment", SITE):
        c = container(deployment)
        args, vols = flags(c["args"]), mounts(deployment)
        assert c["args"][0] == "site", name
        assert ports(deployment) == {"metrics": SITE_METRICS, "health": SITE_HEALTH}, name
        assert (args["--metrics-port"], args["--health-port"]) == (
            str(SITE_METRICS), str(SITE_HEALTH),
        ), name
        assert c["readinessProbe"]["grpc"] == {"port": SITE_HEALTH}, name
        # no liveness restarts: `medfed site` supervises its SuperNode (k8s/base/site)
        assert "livenessProbe" not in c and "startupProbe" not in c, name

        data_mount, data = vols[args["--data"]]
        assert data_mount.get("readOnly") is True, name
        assert data["persistentVolumeClaim"]["readOnly"] is True, name
        claim = data["persistentVolumeClaim"]["claimName"]
        assert find(build(name), "PersistentVolumeClaim", claim) is not None, (
            f"{name}: the overlay must provide the image data claim {claim}"
        )

        kit_mount, kit = vols[args["--kit"]]
        assert kit_mount.get("readOnly") is True, name
        assert kit["secret"] == {"secretName": "medfed-site-kit", "defaultMode": 0o400}, name
        _, state = vols[args["--state"]]
        assert "persistentVolumeClaim" in state, f"{name}: the privacy ledger must persist"
        assert "emptyDir" in vols["/tmp"][1], name
        assert {"name": "FLWR_HOME", "value": "/state/flwr"} in c["env"], name


def test_the_gpu_example_requests_a_gpu_and_the_cpu_one_does_not() -> None:
    limits = {
        name: container(d)["resources"]["limits"] for name, d in builds_with("Deployment", SITE)
    }
    assert limits["overlays/hospital-example"][GPU] == 1
    if "overlays/hospital-cpu" in limits:
        assert GPU not in limits["overlays/hospital-cpu"]


def test_site_may_reach_the_aggregator_fleet_port_and_dns_and_nothing_else() -> None:
    dns = {
        "to": [{
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
        }],
        "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}],
    }
    for name, policy in builds_with("NetworkPolicy", SITE):
        assert sorted(policy["spec"]["policyTypes"]) == ["Egress", "Ingress"], name
        aggregator, *rest = policy["spec"]["egress"]
        assert rest == [dns], name
        ((peer,),) = [aggregator["to"]]
        assert peer.keys() == {"ipBlock"}, f"{name}: the aggregator is outside the cluster"
        cidr = ipaddress.ip_network(peer["ipBlock"]["cidr"])
        assert cidr.num_addresses == 1, f"{name}: {cidr} is wider than the aggregator's address"
        assert aggregator["ports"] == [{"port": FLEET_PORT, "protocol": "TCP"}], name
        assert allowed_ingress(policy) == {SITE_METRICS: [namespace_peer("monitoring")]}, name


# --- monitoring ----------------------------------------------------------------------------


def configmap_file(name: str, key: str) -> str:
    cm = find(build("monitoring"), "ConfigMap", name)
    assert cm is not None, name
    return str(cm["data"][key])


def test_the_provisioned_dashboard_is_the_repository_dashboard() -> None:
    shipped = (ROOT / "monitoring" / "grafana-dashboard.json").read_text()
    assert configmap_file("medfed-grafana-dashboard", "grafana-dashboard.json") == shipped
    cm = find(build("monitoring"), "ConfigMap", "medfed-grafana-dashboard")
    assert cm is not None
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    exprs = [t["expr"] for p in json.loads(shipped)["panels"] for t in p.get("targets", [])]
    assert exprs and all("medfed_" in e for e in exprs)


def kept_by(relabel_configs: list[dict[str, Any]], meta: dict[str, str]) -> bool:
    """Whether Prometheus's keep/drop relabelling keeps a target with these labels."""
    for rule in relabel_configs:
        action = rule.get("action", "replace")
        if action not in {"keep", "drop"}:
            continue
        value = rule.get("separator", ";").join(meta.get(s, "") for s in rule["source_labels"])
        matched = re.fullmatch(rule.get("regex", "(.*)"), value) is not None
        if matched != (action == "keep"):
            return False
    return True


def test_the_scrape_config_finds_exactly_the_metrics_ports_of_medfed_pods() -> None:
    config = yaml.safe_load(configmap_file("medfed-prometheus", "prometheus.yml"))
    (job,) = config["scrape_configs"]
    assert job["kubernetes_sd_configs"] == [{"role": "pod"}]
    scraped = set()
    for _, workload in workloads():
        labels = workload["spec"]["template"]["metadata"]["labels"]
        for port in container(workload)["ports"]:
            meta = {
                f"__meta_kubernetes_pod_label_{re.sub(r'[^a-zA-Z0-9_]', '_', k)}": v
                for k, v in labels.items()
            } | {"__meta_kubernetes_pod_container_port_name": port["name"]}
            if kept_by(job["relabel_configs"], meta):
                scraped.add(port["containerPort"])
    assert scraped == {AGGREGATOR_METRICS, SITE_METRICS}
