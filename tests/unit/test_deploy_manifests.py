"""deploy/: the Kubernetes manifests and the Helm chart, checked offline.

- Schema: every object against the Kubernetes OpenAPI schemas shipped by `kubernetes-validate` (strict: no
  unknown fields), for the oldest and the newest Kubernetes version it knows, and deserialized into the
  official client's model classes (types and required fields).
- The chart is rendered and linted by Helm's own engine (`helm-python-sdk` bundles Helm's Go SDK; no helm
  binary, no cluster).
- Consistency: the router's args parse with the real CLI parser, its selector selects the vLLM pods and not
  its own, services select the right pods and name existing ports, probes hit /health, RBAC lets the router's
  ServiceAccount list + watch pods, and the KV endpoints the router derives for a vLLM pod (by the discovery
  code itself) are the ones vLLM's --kv-events-config binds.
- NetworkPolicies, evaluated by a small model of their ingress semantics (`ingress_allowed`): the router's pods
  reach every port of the vLLM pods it uses (HTTP, KV events, replay: taken from the container ports, the
  annotations and what discovery derives), and nothing else reaches those ports; clients reach the router's
  HTTP port.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from kubernetes import client as k8s_client

from preble_router import cli
from preble_router.discovery import add_discovery_args, check_discovery_args, pod_backend

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
CHART = DEPLOY / "helm" / "preble-router"
K8S_VERSIONS = ["1.29.0", kubernetes_validate.utils.latest_version()]
POD_IP = "10.0.0.5"  # only ever a string here: nothing connects anywhere
NAMESPACE = "llm"  # where the manifests are applied and the chart installed


# ---- loading and validating ---------------------------------------------------------------------------

class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys (PyYAML keeps the last; the API server may not)."""


def _mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    keys = [loader.construct_object(k, deep=deep) for k, _ in node.value]
    dupes = {k for k in keys if keys.count(k) > 1}
    if dupes:
        raise yaml.constructor.ConstructorError(None, None, f"duplicate keys {sorted(dupes)}", node.start_mark)
    return loader.construct_mapping(node, deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def load_docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.load_all(text, Loader=_StrictLoader) if d]


def _canonical_quantities(obj: Any) -> Any:
    """Numbers under resources.requests/limits as strings, as the API server stores them (the client's models
    type a Quantity as a string; YAML `nvidia.com/gpu: 1` is valid Kubernetes all the same)."""
    if isinstance(obj, list):
        return [_canonical_quantities(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    out = {k: _canonical_quantities(v) for k, v in obj.items()}
    for key in ("requests", "limits"):
        if isinstance(out.get(key), dict):
            out[key] = {k: str(v) if isinstance(v, (int, float)) else v for k, v in out[key].items()}
    return out


def validate(doc: dict[str, Any]) -> None:
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)
    model = k8s_client.ApiClient().deserialize(json.dumps(_canonical_quantities(doc)), f"V1{doc['kind']}",
                                               "application/json")
    assert model.kind == doc["kind"] and model.metadata.name == doc["metadata"]["name"]


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    with helm.Chart.load(str(CHART)) as chart:
        chart.validate_schema(values or {})
        manifests = chart.render(values, name="qwen", namespace=NAMESPACE)
    docs = [doc for path, text in sorted(manifests.items()) if path.endswith(".yaml") for doc in load_docs(text)]
    for doc in docs:
        validate(doc)
    return docs


def manifest(name: str) -> list[dict[str, Any]]:
    docs = load_docs((DEPLOY / "kubernetes" / name).read_text())
    for doc in docs:
        validate(doc)
    return docs


# ---- what the objects must say to each other -------------------------------------------------------------

def router_parser() -> argparse.ArgumentParser:
    p = cli.build_parser()
    if "--discovery" not in p._option_string_actions:  # cli.py not wired to discovery yet: do it here
        backends = p._option_string_actions["--backends"]
        backends.required, backends.nargs, backends.default = False, "*", []
        add_discovery_args(p)
    return p


def parse_router_args(argv: list[str]) -> argparse.Namespace:
    p = router_parser()
    args = p.parse_args(argv)
    check_discovery_args(p, args)
    return args


def objects(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def container(deployment: dict, name: str) -> dict:
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == name)


def deployment_with(docs: list[dict], container_name: str) -> dict:
    return next(d for d in objects(docs, "Deployment")
                if any(c["name"] == container_name for c in d["spec"]["template"]["spec"]["containers"]))


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def parse_selector(text: str) -> dict[str, str]:
    return dict(term.split("=", 1) for term in text.split(","))


def port_names(c: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in c.get("ports", [])}


def kv_events_config(vllm: dict) -> dict[str, Any] | None:
    args = vllm["args"]
    return json.loads(args[args.index("--kv-events-config") + 1]) if "--kv-events-config" in args else None


def check_deployment(d: dict) -> None:
    pod_labels = d["spec"]["template"]["metadata"]["labels"]
    assert selects(d["spec"]["selector"]["matchLabels"], pod_labels), d["metadata"]["name"]
    for c in d["spec"]["template"]["spec"]["containers"]:
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            target = (c.get(probe) or {}).get("httpGet") or (c.get(probe) or {}).get("tcpSocket")
            if target and isinstance(target["port"], str):
                assert target["port"] in port_names(c), (c["name"], probe)


def check_service(svc: dict, target: dict, others: list[dict]) -> None:
    sel = svc["spec"]["selector"]
    assert selects(sel, target["spec"]["template"]["metadata"]["labels"])
    for other in others:
        assert not selects(sel, other["spec"]["template"]["metadata"]["labels"])
    router = container(target, "router")
    for port in svc["spec"]["ports"]:
        assert port["targetPort"] in port_names(router)


def client_and_peer_services(docs: list[dict]) -> tuple[dict, dict | None]:
    """The router's Service for clients, and the headless one its pods find each other by (peer sync), if any."""
    services = objects(docs, "Service")
    headless = [s for s in services if s["spec"].get("clusterIP") == "None"]
    (svc,) = [s for s in services if s not in headless]
    assert len(headless) <= 1
    return svc, headless[0] if headless else None


def check_peer_sync(args: argparse.Namespace, router_d: dict, peers_svc: dict | None) -> None:
    """More than one router replica: each binds the peer port and subscribes to every pod behind the headless
    Service (all of them, Ready or not); one replica: no peer sync at all."""
    replicas = router_d["spec"]["replicas"]
    if replicas <= 1:
        assert peers_svc is None and args.peer_bind is None and args.peers == []
        return
    assert peers_svc is not None and peers_svc["spec"]["publishNotReadyAddresses"] is True
    check_service(peers_svc, router_d, [])
    router = container(router_d, "router")
    port = port_names(router)["peers"]
    assert args.peer_bind == f"tcp://*:{port}"
    name = peers_svc["metadata"]["name"]
    assert args.peers == [f"dns:{name}.{NAMESPACE}.svc.cluster.local:{port}"]
    assert [(p["port"], p["targetPort"]) for p in peers_svc["spec"]["ports"]] == [(port, "peers")]


def check_vllm(vllm: dict, *, expect_kv: bool = True) -> None:
    args = vllm["args"]
    assert vllm["command"] == ["vllm", "serve"]
    assert "--enable-prompt-tokens-details" in args and "--enable-prefix-caching" in args
    assert vllm["readinessProbe"]["httpGet"]["path"] == "/health"
    config = kv_events_config(vllm)
    if expect_kv:
        assert config["enable_kv_cache_events"] is True and config["publisher"] == "zmq"


def as_ready_pod(deployment: dict) -> Any:
    """The V1Pod a vLLM Deployment's template becomes once Running and Ready at POD_IP."""
    template = deployment["spec"]["template"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {**template["metadata"], "name": "vllm-0",
                                                           "namespace": NAMESPACE, "uid": "u"},
           "spec": template["spec"], "status": {"phase": "Running", "podIP": POD_IP,
                                                "conditions": [{"type": "Ready", "status": "True"}]}}
    return k8s_client.ApiClient().deserialize(json.dumps(_canonical_quantities(pod)), "V1Pod", "application/json")


# ---- NetworkPolicy semantics (ingress), enough to say who reaches which port -----------------------------

@dataclass
class PodRef:
    """A pod as a NetworkPolicy sees it: its labels, its namespace and its named container ports."""
    labels: dict[str, str]
    namespace: str = NAMESPACE
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def namespace_labels(self) -> dict[str, str]:
        return {"kubernetes.io/metadata.name": self.namespace}


def label_selector_matches(sel: dict | None, labels: dict[str, str]) -> bool:
    """A metav1.LabelSelector: matchLabels AND matchExpressions; {} selects everything."""
    sel = sel or {}
    if not selects(sel.get("matchLabels") or {}, labels):
        return False
    for e in sel.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values") or []
        ok = {"In": key in labels and labels.get(key) in values,
              "NotIn": labels.get(key) not in values,
              "Exists": key in labels,
              "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def _port_matches(ports: list[dict] | None, dst: PodRef, port: int, protocol: str) -> bool:
    if not ports:  # no ports: every port
        return True
    for p in ports:
        if p.get("protocol", "TCP") != protocol:
            continue
        want = p.get("port")
        if want is None:
            return True
        if isinstance(want, str):  # a named port: the destination pod's container port of that name
            if dst.ports.get(want) == port:
                return True
        elif want <= port <= p.get("endPort", want):
            return True
    return False


def _peer_matches(peers: list[dict] | None, src: PodRef, policy_namespace: str) -> bool:
    if not peers:  # no from: every source
        return True
    for peer in peers:
        if "ipBlock" in peer:  # could be any pod's IP: count it as letting everyone in (the safe side here)
            return True
        if "namespaceSelector" in peer:
            ns_ok = label_selector_matches(peer["namespaceSelector"], src.namespace_labels)
        else:
            ns_ok = src.namespace == policy_namespace
        if ns_ok and label_selector_matches(peer.get("podSelector"), src.labels):
            return True
    return False


def ingress_allowed(policies: list[dict], src: PodRef, dst: PodRef, port: int, protocol: str = "TCP") -> bool:
    """Whether `src` may connect to `dst`:`port`. A pod no ingress policy selects takes everything; one that
    some policy selects takes what the union of those policies' rules allows. (Traffic from the pod's own
    node, e.g. the kubelet's probes, always passes; it is not modelled.)"""
    applying = []
    for pol in policies:
        spec, ns = pol["spec"], pol["metadata"].get("namespace", NAMESPACE)
        types = spec.get("policyTypes") or ["Ingress"]
        if ns == dst.namespace and "Ingress" in types and label_selector_matches(spec["podSelector"], dst.labels):
            applying.append((ns, spec.get("ingress") or []))
    if not applying:
        return True
    return any(_port_matches(rule.get("ports"), dst, port, protocol) and _peer_matches(rule.get("from"), src, ns)
               for ns, rules in applying for rule in rules)


def pod_ref(deployment: dict, container_name: str, namespace: str = NAMESPACE) -> PodRef:
    return PodRef(deployment["spec"]["template"]["metadata"]["labels"], namespace,
                  port_names(container(deployment, container_name)))


def endpoint_port(url: str) -> int:
    return urlsplit(url).port


# sources that must not reach the vLLM pods: a client pod, a vLLM replica, a pod in another namespace, and a
# pod there wearing the router's labels (a podSelector without namespaceSelector is this namespace only)
def strangers(router: PodRef, vllm: PodRef) -> list[PodRef]:
    return [PodRef({"app": "client"}), PodRef(dict(vllm.labels)), PodRef({"app": "client"}, "other"),
            PodRef(dict(router.labels), "other")]


ANY_CLIENT = PodRef({"app": "client"}, "other")


def check_network_policies(docs: list[dict], router_d: dict, vllm_d: dict | None, vllm_ports: set[int],
                           client: PodRef = ANY_CLIENT) -> None:
    """The vLLM pods take the router's pods on exactly `vllm_ports` and nobody else on any of them; the
    router's pods take `client` on the router's HTTP port (the Service's target) and on nothing else."""
    policies = objects(docs, "NetworkPolicy")
    router = pod_ref(router_d, "router")
    router_http = router.ports["http"]
    svc, peers_svc = client_and_peer_services(docs)
    assert {router.ports.get(p["targetPort"], p["targetPort"]) for p in svc["spec"]["ports"]} == {router_http}
    router_pols = [p for p in policies if label_selector_matches(p["spec"]["podSelector"], router.labels)]
    assert len(router_pols) == 1
    assert ingress_allowed(policies, client, router, router_http)
    assert not ingress_allowed(policies, client, router, 9090)
    if peers_svc is not None:  # peer sync: the router pods reach each other's peer port, and nobody else does
        peer_port = router.ports["peers"]
        assert ingress_allowed(policies, router, router, peer_port)
        assert not ingress_allowed(policies, client, router, peer_port)
        for other in (PodRef({"app": "client"}), PodRef(dict(router.labels), "other")):
            assert not ingress_allowed(policies, other, router, peer_port)
    else:
        assert "peers" not in router.ports
    if vllm_d is None:
        assert len(policies) == 1
        return
    vllm = pod_ref(vllm_d, "vllm")
    # the vLLM pods' policy selects them (and not the router's pods), is ingress-only, and on the KV ports lets
    # in nothing but podSelectors (this namespace) that select the router's pods
    vllm_pols = [p for p in policies if label_selector_matches(p["spec"]["podSelector"], vllm.labels)]
    assert len(vllm_pols) == 1, vllm_pols
    (vllm_pol,) = vllm_pols
    assert not label_selector_matches(vllm_pol["spec"]["podSelector"], router.labels)
    assert vllm_pol["spec"]["policyTypes"] == ["Ingress"]
    kv_ports = vllm_ports - {vllm.ports["http"]}
    for rule in vllm_pol["spec"]["ingress"]:
        if any(_port_matches(rule.get("ports"), vllm, p, "TCP") for p in kv_ports):
            assert rule.get("from"), rule
            for peer in rule["from"]:
                assert set(peer) == {"podSelector"}, peer
                assert label_selector_matches(peer["podSelector"], router.labels), peer
    # the container ports are exactly the ports the router uses, and what the policies let through
    assert set(vllm.ports.values()) == vllm_ports
    candidates = vllm_ports | {22, 5557, 5558, 8000, 8080, 9000}
    assert {p for p in candidates if ingress_allowed(policies, router, vllm, p)} == vllm_ports
    for other in strangers(router, vllm):
        for port in candidates:
            assert not ingress_allowed(policies, other, vllm, port), (other, port)
    assert not ingress_allowed(policies, router, vllm, 5557, "UDP")


def check_deployment_mode(docs: list[dict], *, kv: bool = True, replay: bool = True,
                          vllm_deployed: bool = True, network_policy: bool = True,
                          client: PodRef = ANY_CLIENT) -> argparse.Namespace:
    router_d = deployment_with(docs, "router")
    router = container(router_d, "router")
    args = parse_router_args(router["args"])
    assert args.discovery == "k8s" and args.backends == []
    check_deployment(router_d)
    assert router["readinessProbe"]["httpGet"]["path"] == "/health"

    # RBAC: the router's ServiceAccount may list + watch pods
    sa = router_d["spec"]["template"]["spec"]["serviceAccountName"]
    assert [s["metadata"]["name"] for s in objects(docs, "ServiceAccount")] == [sa]
    (binding,) = objects(docs, "RoleBinding")
    assert any(s["kind"] == "ServiceAccount" and s["name"] == sa for s in binding["subjects"])
    role = next(r for r in objects(docs, "Role") if r["metadata"]["name"] == binding["roleRef"]["name"])
    assert binding["roleRef"]["kind"] == "Role"
    assert any("" in rule["apiGroups"] and "pods" in rule["resources"] and {"list", "watch"} <= set(rule["verbs"])
               for rule in role["rules"])

    svc, peers_svc = client_and_peer_services(docs)
    check_peer_sync(args, router_d, peers_svc)
    if not network_policy:
        assert not objects(docs, "NetworkPolicy")
    if not vllm_deployed:
        assert len(objects(docs, "Deployment")) == 1
        check_service(svc, router_d, [])
        if network_policy:
            check_network_policies(docs, router_d, None, set(), client)
        return args
    vllm_d = deployment_with(docs, "vllm")
    check_deployment(vllm_d)
    check_service(svc, router_d, [vllm_d])
    vllm = container(vllm_d, "vllm")
    check_vllm(vllm, expect_kv=kv)
    # the router's selector picks the vLLM pods, and not its own
    selector = parse_selector(args.k8s_selector)
    assert selects(selector, vllm_d["spec"]["template"]["metadata"]["labels"])
    assert not selects(selector, router_d["spec"]["template"]["metadata"]["labels"])
    # what discovery makes of a Ready vLLM pod: vLLM's HTTP port and the ports its publisher binds
    spec = pod_backend(as_ready_pod(vllm_d), port=args.k8s_port, kv_port=args.k8s_kv_port,
                       replay_port=args.k8s_replay_port)
    assert spec is not None
    vllm_port = int(next(a for a in vllm["args"] if a.startswith("--port=")).split("=")[1])
    assert spec.url == f"http://{POD_IP}:{vllm_port}" and port_names(vllm)["http"] == vllm_port
    config = kv_events_config(vllm)
    if kv:
        assert spec.kv_endpoint == config["endpoint"].replace("*", POD_IP)
        assert int(config["endpoint"].rsplit(":", 1)[1]) == port_names(vllm)["kv-events"]
    else:
        assert spec.kv_endpoint is None and config is None
    if kv and replay:
        assert spec.replay_endpoint == config["replay_endpoint"].replace("*", POD_IP)
        assert int(config["replay_endpoint"].rsplit(":", 1)[1]) == port_names(vllm)["kv-replay"]
    else:
        assert spec.replay_endpoint is None and "replay_endpoint" not in (config or {})
    # the NetworkPolicies: exactly the ports the router connects to (as discovery derives them) are open to it
    if network_policy:
        used = {endpoint_port(e) for e in (spec.url, spec.kv_endpoint, spec.replay_endpoint) if e}
        check_network_policies(docs, router_d, vllm_d, used, client)
    return args


# ---- the plain manifests -----------------------------------------------------------------------------------

def test_every_yaml_under_deploy_is_valid_kubernetes():
    files = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
    assert [f.name for f in files] == ["router-deployment.yaml", "router-sidecar.yaml"]
    for f in files:
        assert manifest(f.name)
        assert objects(manifest(f.name), "NetworkPolicy")


def test_deployment_mode_manifest():
    docs = manifest("router-deployment.yaml")
    assert sorted(d["kind"] for d in docs) == ["Deployment", "Deployment", "NetworkPolicy", "NetworkPolicy", "Role",
                                               "RoleBinding", "Service", "ServiceAccount"]
    args = check_deployment_mode(docs)
    assert args.policy == "preble" and args.k8s_kv_port is None  # KV endpoints from the pod annotations
    vllm_d = deployment_with(docs, "vllm")
    annotations = vllm_d["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {"preble.io/kv-events": "tcp://{podIP}:5557", "preble.io/kv-replay": "tcp://{podIP}:5558"}
    # the annotated KV ports are router-only
    policies, router = objects(docs, "NetworkPolicy"), pod_ref(deployment_with(docs, "router"), "router")
    vllm = pod_ref(vllm_d, "vllm")
    for port in (endpoint_port(a.replace("{podIP}", POD_IP)) for a in annotations.values()):
        assert ingress_allowed(policies, router, vllm, port)
        assert not any(ingress_allowed(policies, other, vllm, port) for other in strangers(router, vllm))
    assert kv_events_config(container(vllm_d, "vllm")) == {
        "enable_kv_cache_events": True, "publisher": "zmq", "endpoint": "tcp://*:5557",
        "replay_endpoint": "tcp://*:5558"}
    assert args.model == container(vllm_d, "vllm")["args"][0]


def test_sidecar_manifest():
    docs = manifest("router-sidecar.yaml")
    assert sorted(d["kind"] for d in docs) == ["Deployment", "NetworkPolicy", "Service"]
    (d,) = objects(docs, "Deployment")
    check_deployment(d)
    router, vllm = container(d, "router"), container(d, "vllm")
    check_vllm(vllm)
    args = parse_router_args(router["args"])
    assert args.discovery == "static" and args.backends == ["http://127.0.0.1:8000"]
    assert [cli.parse_kv_source(s) for s in args.kv_events] == [
        ("http://127.0.0.1:8000", "tcp://127.0.0.1:5557", "tcp://127.0.0.1:5558")]
    config = kv_events_config(vllm)
    assert (config["endpoint"], config["replay_endpoint"]) == ("tcp://127.0.0.1:5557", "tcp://127.0.0.1:5558")
    assert "--port=8000" in vllm["args"] and port_names(vllm)["vllm"] == 8000
    assert vllm["readinessProbe"]["httpGet"]["path"] == "/health"
    check_service(objects(docs, "Service")[0], d, [])
    assert not objects(docs, "Role")  # a static backend needs no API access
    # clients reach the router's port; vLLM's (bound on 0.0.0.0 for the kubelet's probes) only over loopback
    pod = PodRef(d["spec"]["template"]["metadata"]["labels"], ports={**port_names(vllm), **port_names(router)})
    policies = objects(docs, "NetworkPolicy")
    for client in (PodRef({"app": "client"}), PodRef({}, "other")):
        assert ingress_allowed(policies, client, pod, port_names(router)["http"])
        for port in (port_names(vllm)["vllm"], 5557, 5558):
            assert not ingress_allowed(policies, client, pod, port)


# ---- the Helm chart ------------------------------------------------------------------------------------------

def test_chart_lints_clean():
    report = helm.lint(str(CHART), strict=True)
    assert report["errors"] == [] and all(m["severity"] < 2 for m in report["messages"]), report


def test_chart_defaults_render_the_deployment_mode():
    docs = render()
    assert sorted(d["kind"] for d in docs) == ["Deployment", "Deployment", "NetworkPolicy", "NetworkPolicy", "Role",
                                               "RoleBinding", "Service", "ServiceAccount"]
    args = check_deployment_mode(docs)
    assert (args.k8s_namespace, args.k8s_kv_port, args.k8s_replay_port) == ("llm", 5557, 5558)
    assert args.policy == "preble" and args.model == "Qwen/Qwen2.5-7B-Instruct"
    assert deployment_with(docs, "router")["spec"]["replicas"] == 1
    assert deployment_with(docs, "vllm")["spec"]["replicas"] == 2


def test_chart_values_reach_the_objects():
    values = {
        "image": {"repository": "registry.example/preble-router", "tag": "1.2.3"},
        "replicas": 3, "model": "meta-llama/Llama-3.1-8B-Instruct", "servedModelName": "llama",
        "policy": "cache_aware", "selector": {"app": "vllm", "model": "llama-8b"},
        "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "1Gi"}},
        "extraArgs": ["--preble-bal-threshold=2.0"], "hfTokenSecret": "hf",
        "vllm": {"replicas": 4, "port": 9000, "extraArgs": ["--max-model-len=8192"],
                 "resources": {"limits": {"nvidia.com/gpu": 2}}},
    }
    docs = render(values)
    args = check_deployment_mode(docs)
    router_d, vllm_d = deployment_with(docs, "router"), deployment_with(docs, "vllm")
    router, vllm = container(router_d, "router"), container(vllm_d, "vllm")
    assert router_d["spec"]["replicas"] == 3 and vllm_d["spec"]["replicas"] == 4
    assert router["image"] == "registry.example/preble-router:1.2.3"
    assert (args.model, args.served_model_name, args.policy) == ("meta-llama/Llama-3.1-8B-Instruct", "llama",
                                                                 "cache_aware")
    assert args.preble_bal_threshold == 2.0 and args.k8s_port == "9000"
    assert parse_selector(args.k8s_selector) == {"app": "vllm", "model": "llama-8b"}
    assert router["resources"] == values["resources"]
    assert vllm["resources"]["limits"] == {"memory": "48Gi", "nvidia.com/gpu": 2}  # Helm merges with the defaults
    assert "--max-model-len=8192" in vllm["args"] and "--served-model-name=llama" in vllm["args"]
    for c in (router, vllm):
        assert {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "HF_TOKEN"}}} in c["env"]


def test_chart_without_kv_replay_or_events():
    check_deployment_mode(render({"vllm": {"kvReplayPort": 0}}), replay=False)
    args = check_deployment_mode(render({"vllm": {"kvEventsPort": 0}}), kv=False, replay=False)
    assert args.k8s_kv_port is None and args.k8s_replay_port is None


def test_chart_routes_to_vllm_deployed_elsewhere():
    docs = render({"vllm": {"enabled": False}, "selector": {"app": "my-vllm"}})
    args = check_deployment_mode(docs, vllm_deployed=False)
    assert args.k8s_selector == "app=my-vllm"
    # pods deployed elsewhere are not isolated by this chart; the router's own policy is there
    assert ingress_allowed(objects(docs, "NetworkPolicy"), PodRef({"app": "client"}), PodRef({"app": "my-vllm"}), 8000)


def test_chart_network_policy_values():
    check_deployment_mode(render({"networkPolicy": {"enabled": False}}), network_policy=False)
    check_deployment_mode(render({"networkPolicy": {"enabled": False}, "vllm": {"enabled": False},
                                  "selector": {"app": "my-vllm"}}), vllm_deployed=False, network_policy=False)
    gateway = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gateway"}}}
    prometheus = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
                  "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}
    docs = render({"networkPolicy": {"clientFrom": [gateway], "vllmHttpFrom": [prometheus]}})
    check_deployment_mode(docs, client=PodRef({"app": "gw"}, "gateway"))
    policies = objects(docs, "NetworkPolicy")
    router, vllm = pod_ref(deployment_with(docs, "router"), "router"), pod_ref(deployment_with(docs, "vllm"), "vllm")
    assert not ingress_allowed(policies, PodRef({"app": "client"}), router, 8080)
    assert not ingress_allowed(policies, ANY_CLIENT, router, 8080)
    scraper = PodRef({"app.kubernetes.io/name": "prometheus"}, "monitoring")
    assert ingress_allowed(policies, scraper, vllm, 8000)
    assert not ingress_allowed(policies, scraper, vllm, 5557) and not ingress_allowed(policies, scraper, vllm, 5558)
    assert not ingress_allowed(policies, PodRef({"app": "other"}, "monitoring"), vllm, 8000)


def test_network_policy_checks_catch_leaks():
    """check_network_policies is not vacuous: a policy that lets a stranger in, or keeps the router out, fails."""
    docs = manifest("router-deployment.yaml")
    check_deployment_mode(docs)

    def broken(edit) -> list[dict]:
        copy = json.loads(json.dumps(docs))
        edit(next(d for d in copy if d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "vllm-from-router"))
        return copy

    rule = lambda pol: pol["spec"]["ingress"][0]  # noqa: E731
    edits = [
        lambda pol: rule(pol)["from"][0]["podSelector"]["matchLabels"].update({"app.kubernetes.io/name": "x"}),
        lambda pol: rule(pol)["from"].append({"namespaceSelector": {}}),  # every namespace, any pod
        lambda pol: rule(pol).pop("from"),  # every source
        lambda pol: rule(pol)["from"][0].update({"namespaceSelector": {}}),  # router labels in any namespace
        lambda pol: rule(pol).pop("ports"),  # every port
        lambda pol: rule(pol)["ports"].pop(),  # the replay port closed to the router
        lambda pol: pol["spec"]["ingress"].append({"ports": [{"port": 5557}]}),  # KV events from anywhere
        lambda pol: pol["spec"]["podSelector"]["matchLabels"].update({"app.kubernetes.io/instance": "x"}),
    ]
    for edit in edits:
        with pytest.raises(AssertionError):
            check_deployment_mode(broken(edit))
    with pytest.raises(AssertionError):  # no policy for the vLLM pods at all
        check_deployment_mode([d for d in docs if d.get("metadata", {}).get("name") != "vllm-from-router"])


@pytest.mark.parametrize("values", [{"policy": "fastest"}, {"replicas": -1}, {"vllm": {"port": "http"}},
                                    {"selector": {"app": 3}}])
def test_chart_schema_rejects_bad_values(values):
    with helm.Chart.load(str(CHART)) as chart:
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema(values)


def test_the_checks_catch_broken_objects():
    """The validation above is not vacuous: typos, missing required fields, bad types and duplicate keys fail."""
    good = next(d for d in manifest("router-deployment.yaml") if d["kind"] == "Deployment")
    typo = json.loads(json.dumps(good))
    typo["spec"]["replica"] = typo["spec"].pop("replicas")
    nameless = json.loads(json.dumps(good))
    del nameless["spec"]["template"]["spec"]["containers"][0]["name"]
    bad_type = json.loads(json.dumps(good))
    bad_type["spec"]["replicas"] = "two"
    no_selector = json.loads(json.dumps(good))
    del no_selector["spec"]["selector"]
    for broken in (typo, nameless, bad_type, no_selector):
        with pytest.raises(Exception):  # noqa: B017 - jsonschema's or the client model's error
            validate(broken)
    with pytest.raises(yaml.constructor.ConstructorError):
        load_docs("metadata:\n  labels:\n    a: b\n    a: c\n")
