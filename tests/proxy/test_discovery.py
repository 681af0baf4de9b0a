"""Kubernetes backend discovery, through the official `kubernetes` client (kubeconfig loading, ApiClient,
CoreV1Api, watch.Watch), against a FAKE Kubernetes API server written here (FakeKubeApiServer: an HTTP
server on 127.0.0.1 that speaks just the pod list + watch protocol; no real API server can be started
offline). Pod IPs are 127.0.0.x so nothing ever leaves the loopback range.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import re
import select
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import httpx
import pytest
from kubernetes import client as k8s_client

from preble_router.discovery import (
    BackendSpec,
    KubernetesDiscovery,
    StaticDiscovery,
    add_discovery_args,
    check_discovery_args,
    pod_backend,
    start_discovery,
)
from preble_router.policies import make_policy
from preble_router.router import Router
from testkit.fake_kv_publisher import FakeVllmKvPublisher
from testkit.ports import free_port

NS = "llm"
SELECTOR = "app=vllm,tier!=canary"
TOKEN = "fake-token"


# ---- the FAKE API server ------------------------------------------------------------------------------------

def _selector_matches(selector: str, labels: dict[str, str]) -> bool:
    """Equality-based selectors (k=v, k==v, k!=v, k, !k), comma-separated: what the tests use."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            k, v = term.split("!=", 1)
            if labels.get(k.strip()) == v.strip():
                return False
        elif "=" in term:
            k, v = re.split("==?", term, maxsplit=1)
            if labels.get(k.strip()) != v.strip():
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}


class FakeKubeApiServer:
    """A FAKE Kubernetes API server: GET /api/v1/namespaces/NS/pods, list (labelSelector, limit/continue)
    and watch (chunked stream of JSON events from resourceVersion, BOOKMARKs, ERROR 410 once a version is
    compacted away, DELETED/ADDED when an object leaves/enters the selector). Bearer token checked."""

    def __init__(self, port: int = 0) -> None:
        self.cond = threading.Condition()
        self.rv = 100
        self.pods: dict[tuple[str, str], dict] = {}
        self.log: list[tuple[int, str, dict, dict | None]] = []  # (rv, type, object, previous object)
        self.compacted = 0  # watches from a version below this get 410 Gone
        self.cut = 0  # bump to end every open watch (as a server-side timeout does)
        self.bookmarks = 0  # bump to send a BOOKMARK on every open watch that asked for them
        self.fail: list[int] = []  # statuses for the next requests
        self.requests: list[dict[str, Any]] = []
        self.open_watches = 0
        self.closed = False
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                server._handle(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify_all()
        self.httpd.shutdown()
        self.httpd.server_close()

    # ---- state changes (the test's side) ----------------------------------------------------------------
    def _record(self, kind: str, obj: dict, previous: dict | None) -> None:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self.log.append((self.rv, kind, copy.deepcopy(obj), previous))
        self.cond.notify_all()

    def apply(self, pod: dict) -> None:
        """Create or replace a pod."""
        with self.cond:
            key = (pod["metadata"]["namespace"], pod["metadata"]["name"])
            previous = copy.deepcopy(self.pods.get(key))
            self.pods[key] = copy.deepcopy(pod)
            self._record("MODIFIED" if previous else "ADDED", self.pods[key], previous)

    def delete(self, name: str, ns: str = NS, *, then_compact: bool = False) -> None:
        with self.cond:
            pod = self.pods.pop((ns, name))
            self._record("DELETED", pod, None)
            if then_compact:  # under the same lock: open watches never see the delete, only 410
                self.compacted = self.rv
                self.cond.notify_all()

    def compact(self) -> None:
        with self.cond:
            self.compacted = self.rv
            self.cond.notify_all()

    def cut_watches(self) -> None:
        with self.cond:
            self.cut += 1
            self.cond.notify_all()

    def send_bookmarks(self) -> None:
        with self.cond:
            self.bookmarks += 1
            self.cond.notify_all()

    def fail_next(self, *statuses: int) -> None:
        with self.cond:
            self.fail.extend(statuses)

    def lists(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if not r["watch"]]

    def watches(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["watch"]]

    # ---- HTTP --------------------------------------------------------------------------------------------
    def _send_json(self, h: BaseHTTPRequestHandler, status: int, obj: dict) -> None:
        body = json.dumps(obj).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        h.wfile.write(body)

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        url = urlparse(h.path)
        q = {k: v[-1] for k, v in parse_qs(url.query).items()}
        m = re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods", url.path)
        watch = q.get("watch", "").lower() in ("true", "1")
        with self.cond:
            self.requests.append({"path": url.path, "query": q, "watch": watch,
                                  "auth": h.headers.get("Authorization")})
            fail = self.fail.pop(0) if self.fail else None
        if h.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._send_json(h, 401, _status(401, "Unauthorized", "Unauthorized"))
        if m is None:
            return self._send_json(h, 404, _status(404, "NotFound", "the server could not find the resource"))
        if fail is not None:
            reason = {410: "Expired", 500: "InternalError", 503: "ServiceUnavailable"}.get(fail, "Error")
            return self._send_json(h, fail, _status(fail, reason, f"injected {fail}"))
        ns, selector = m.group(1), q.get("labelSelector", "")
        if watch:
            return self._watch(h, ns, selector, q)
        with self.cond:
            items = sorted((copy.deepcopy(p) for (pns, _), p in self.pods.items()
                            if pns == ns and _selector_matches(selector, p["metadata"].get("labels") or {})),
                           key=lambda p: p["metadata"]["name"])
            rv = self.rv
        start = int(q.get("continue") or 0)
        limit = int(q.get("limit") or 0) or len(items) or 1
        page = items[start:start + limit]
        meta: dict[str, Any] = {"resourceVersion": str(rv)}
        if start + limit < len(items):
            meta["continue"] = str(start + limit)
        self._send_json(h, 200, {"kind": "PodList", "apiVersion": "v1", "metadata": meta, "items": page})

    @staticmethod
    def _client_gone(h: BaseHTTPRequestHandler) -> bool:
        readable, _, _ = select.select([h.connection], [], [], 0)
        try:
            return bool(readable) and h.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _watch(self, h: BaseHTTPRequestHandler, ns: str, selector: str, q: dict[str, str]) -> None:
        pos = int(q.get("resourceVersion") or self.rv)
        deadline = time.monotonic() + float(q.get("timeoutSeconds") or 3600)
        bookmarks = q.get("allowWatchBookmarks", "").lower() in ("true", "1")
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        h.close_connection = True

        def chunk(data: bytes) -> None:
            h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            h.wfile.flush()

        def matches(obj: dict | None) -> bool:
            return obj is not None and obj["metadata"]["namespace"] == ns and \
                _selector_matches(selector, obj["metadata"].get("labels") or {})

        with self.cond:
            cut, marks = self.cut, self.bookmarks
            self.open_watches += 1
        try:
            while True:
                out: list[dict] = []
                done = False
                with self.cond:
                    while True:
                        if self.closed or self.cut != cut or time.monotonic() > deadline:
                            done = True
                            break
                        if pos < self.compacted:
                            out.append({"type": "ERROR", "object": _status(
                                410, "Expired", f"too old resource version: {pos} ({self.compacted})")})
                            done = True
                            break
                        for rv, kind, obj, previous in self.log:
                            if rv <= pos:
                                continue
                            pos = rv
                            now, before = matches(obj), matches(previous)
                            if kind == "MODIFIED" and before and not now:
                                kind, now = "DELETED", True  # left the selector
                            elif kind == "MODIFIED" and now and not before:
                                kind = "ADDED"  # entered it
                            if now:
                                out.append({"type": kind, "object": obj})
                        if bookmarks and self.bookmarks != marks:
                            marks = self.bookmarks
                            out.append({"type": "BOOKMARK", "object": {
                                "kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": str(self.rv)}}})
                            pos = self.rv
                        if out:
                            break
                        if self._client_gone(h):
                            return
                        self.cond.wait(0.05)
                for event in out:
                    chunk(json.dumps(event).encode() + b"\n")
                if done:
                    chunk(b"")
                    return
        except (BrokenPipeError, ConnectionResetError):
            return
        finally:
            with self.cond:
                self.open_watches -= 1


def make_pod(name: str, ip: str | None = "127.0.0.11", *, ns: str = NS, labels: dict | None = None,
             ready: bool = True, phase: str = "Running", port: int = 8000, port_name: str = "http",
             annotations: dict | None = None, deleting: bool = False, uid: str | None = None) -> dict:
    status: dict[str, Any] = {"phase": phase, "conditions": [
        {"type": "Initialized", "status": "True"},
        {"type": "Ready", "status": "True" if ready else "False"},
        {"type": "ContainersReady", "status": "True" if ready else "False"}]}
    if ip:
        status["podIP"] = ip
        status["podIPs"] = [{"ip": ip}]
    meta: dict[str, Any] = {"name": name, "namespace": ns, "uid": uid or str(uuid.uuid4()),
                            "labels": {"app": "vllm"} if labels is None else labels,
                            "annotations": annotations or {}}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"kind": "Pod", "apiVersion": "v1", "metadata": meta,
            "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai",
                                     "ports": [{"name": port_name, "containerPort": port, "protocol": "TCP"},
                                               {"name": "kv-events", "containerPort": 5557}]}]},
            "status": status}


def as_v1pod(pod: dict) -> Any:
    return k8s_client.ApiClient().deserialize(json.dumps(pod), "V1Pod", "application/json")


def write_kubeconfig(path: Path, port: int, namespace: str | None = None) -> str:
    context: dict[str, Any] = {"cluster": "fake", "user": "fake"}
    if namespace:
        context["namespace"] = namespace
    path.write_text(json.dumps({  # JSON is YAML
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
        "users": [{"name": "fake", "user": {"token": TOKEN}}],
        "contexts": [{"name": "fake", "context": context}]}))
    return str(path)


async def until(predicate, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def urls(router: Router) -> set[str]:
    return {b.url for b in router.backends.values()}


# ---- fixtures -------------------------------------------------------------------------------------------

@pytest.fixture
def api():
    server = FakeKubeApiServer()
    yield server
    server.close()


@pytest.fixture
def kubeconfig(api, tmp_path) -> str:
    return write_kubeconfig(tmp_path / "kubeconfig", api.port)


@pytest.fixture
async def router():
    r = Router(model="m", tokenizer=None, policy=make_policy("round_robin"))  # discovery never tokenizes
    yield r
    await r.stop()


@pytest.fixture
async def discover(router, kubeconfig):
    made: list[KubernetesDiscovery] = []

    async def make(**kw) -> KubernetesDiscovery:
        kw.setdefault("namespace", NS)
        kw.setdefault("selector", SELECTOR)
        kw.setdefault("kubeconfig", kubeconfig)
        kw.setdefault("backoff_initial", 0.05)
        kw.setdefault("backoff_max", 0.2)
        d = KubernetesDiscovery(kw.pop("router", router), **kw)
        made.append(d)
        await d.start()
        return d

    yield make
    for d in made:
        await asyncio.wait_for(d.stop(), 10)


# ---- pods -> backends (the mapping alone) -------------------------------------------------------------

def test_ready_pod_is_a_backend_at_its_named_port():
    spec = pod_backend(as_v1pod(make_pod("a", "10.1.2.3", port=8001, uid="u1")))
    assert spec == BackendSpec("http://10.1.2.3:8001", None, None, pod=f"{NS}/a", uid="u1")
    assert pod_backend(as_v1pod(make_pod("a", "10.1.2.3", port=8001)), port="8000").url == "http://10.1.2.3:8000"
    assert pod_backend(as_v1pod(make_pod("a", "10.1.2.3", port=8001)), port=9000).url == "http://10.1.2.3:9000"
    assert pod_backend(as_v1pod(make_pod("a", "10.1.2.3")), port="metrics") is None  # no such port name


@pytest.mark.parametrize("pod", [
    make_pod("a", ready=False), make_pod("a", phase="Pending"), make_pod("a", ip=None),
    make_pod("a", deleting=True), make_pod("a", phase="Succeeded")])
def test_unready_pending_ipless_or_terminating_pod_is_no_backend(pod):
    assert pod_backend(as_v1pod(pod)) is None


def test_kv_endpoints_from_annotations_or_port_flags():
    annotated = as_v1pod(make_pod("a", "10.1.2.3", annotations={
        "preble.io/kv-events": "tcp://{podIP}:6000", "preble.io/kv-replay": "tcp://{podIP}:6001"}))
    plain = as_v1pod(make_pod("b", "10.1.2.4"))
    assert pod_backend(annotated).kv_endpoint == "tcp://10.1.2.3:6000"
    assert pod_backend(annotated).replay_endpoint == "tcp://10.1.2.3:6001"
    spec = pod_backend(plain, kv_port=5557, replay_port=5558)
    assert (spec.kv_endpoint, spec.replay_endpoint) == ("tcp://10.1.2.4:5557", "tcp://10.1.2.4:5558")
    assert pod_backend(annotated, kv_port=5557, replay_port=5558).kv_endpoint == "tcp://10.1.2.3:6000"  # wins
    assert (pod_backend(plain).kv_endpoint, pod_backend(plain).replay_endpoint) == (None, None)
    # a replay endpoint without a live one is meaningless
    assert pod_backend(plain, replay_port=5558).replay_endpoint is None
    v6 = pod_backend(as_v1pod(make_pod("c", "fd00::5")), kv_port=5557)
    assert (v6.url, v6.kv_endpoint) == ("http://[fd00::5]:8000", "tcp://[fd00::5]:5557")


# ---- through the client, against the FAKE API server -----------------------------------------------------

async def test_pods_becoming_ready_join_and_unready_or_deleted_pods_leave(api, router, discover):
    api.apply(make_pod("vllm-0", "127.0.0.11", ready=False))
    d = await discover(kv_port=5557, replay_port=5558)
    assert await d.wait_synced(10)
    assert urls(router) == set()

    api.apply(make_pod("vllm-0", "127.0.0.11", ready=True))  # readiness probe passes
    await until(lambda: urls(router) == {"http://127.0.0.11:8000"}, what="vllm-0 added")
    backend = next(iter(router.backends.values()))
    assert (backend.kv_endpoint, backend.replay_endpoint) == ("tcp://127.0.0.11:5557", "tcp://127.0.0.11:5558")
    assert router.subscriber(backend.backend_id) is not None

    api.apply(make_pod("vllm-1", "127.0.0.12", annotations={"preble.io/kv-events": "tcp://{podIP}:7000"}))
    await until(lambda: len(router.backends) == 2, what="vllm-1 added")
    b1 = next(b for b in router.backends.values() if b.url == "http://127.0.0.12:8000")
    assert (b1.kv_endpoint, b1.replay_endpoint) == ("tcp://127.0.0.12:7000", "tcp://127.0.0.12:5558")

    api.apply(make_pod("vllm-0", "127.0.0.11", ready=False))  # readiness fails
    await until(lambda: urls(router) == {"http://127.0.0.12:8000"}, what="vllm-0 removed")
    api.apply(make_pod("vllm-0", "127.0.0.11", ready=True))
    await until(lambda: len(router.backends) == 2, what="vllm-0 back")

    api.apply(make_pod("vllm-1", "127.0.0.12", deleting=True))  # terminating: no new work
    await until(lambda: urls(router) == {"http://127.0.0.11:8000"}, what="vllm-1 removed while terminating")
    api.delete("vllm-1")
    api.delete("vllm-0")
    await until(lambda: urls(router) == set(), what="all removed")
    assert d.stats.lists == 1 and d.stats.errors == 0
    assert d.stats.added == 3 and d.stats.removed == 3


async def test_selector_namespace_and_credentials_are_honored(api, router, discover):
    api.apply(make_pod("mine", "127.0.0.11"))
    api.apply(make_pod("other-ns", "127.0.0.12", ns="elsewhere"))
    api.apply(make_pod("other-app", "127.0.0.13", labels={"app": "db"}))
    api.apply(make_pod("canary", "127.0.0.14", labels={"app": "vllm", "tier": "canary"}))
    d = await discover()
    assert await d.wait_synced(10)
    api.apply(make_pod("late-other-ns", "127.0.0.15", ns="elsewhere"))
    api.apply(make_pod("late-mine", "127.0.0.16"))
    await until(lambda: len(router.backends) == 2, what="late-mine added")
    await asyncio.sleep(0.2)
    assert urls(router) == {"http://127.0.0.11:8000", "http://127.0.0.16:8000"}
    assert api.requests and all(r["path"] == f"/api/v1/namespaces/{NS}/pods" for r in api.requests)
    assert all(r["query"]["labelSelector"] == SELECTOR for r in api.requests)
    assert all(r["auth"] == f"Bearer {TOKEN}" for r in api.requests)
    watch = api.watches()[0]["query"]
    assert watch["resourceVersion"] and watch["allowWatchBookmarks"] == "true" and int(watch["timeoutSeconds"]) > 0

    # a pod relabelled out of the selector leaves (the API server sends DELETED for it)
    api.apply(make_pod("late-mine", "127.0.0.16", labels={"app": "vllm", "tier": "canary"}))
    await until(lambda: urls(router) == {"http://127.0.0.11:8000"}, what="relabelled pod removed")


async def test_namespace_defaults_to_the_kubeconfig_context(api, router, discover, tmp_path):
    api.apply(make_pod("p", "127.0.0.11", ns="ctx-ns"))
    d = await discover(namespace=None, kubeconfig=write_kubeconfig(tmp_path / "kc", api.port, namespace="ctx-ns"))
    assert d.namespace == "ctx-ns"
    await until(lambda: urls(router) == {"http://127.0.0.11:8000"})


async def test_ready_pod_without_the_named_port_is_skipped_with_one_warning(api, router, discover, caplog):
    api.apply(make_pod("odd", "127.0.0.11", port_name="web"))
    d = await discover()
    assert await d.wait_synced(10)
    api.apply(make_pod("good", "127.0.0.12"))
    await until(lambda: len(router.backends) == 1)
    api.apply(make_pod("odd", "127.0.0.11", port_name="web", uid=d_uid(api, "odd")))  # an update, same pod
    await asyncio.sleep(0.2)
    assert urls(router) == {"http://127.0.0.12:8000"}
    assert sum("no container port named 'http'" in r.getMessage() for r in caplog.records) == 1


def d_uid(api: FakeKubeApiServer, name: str) -> str:
    return api.pods[(NS, name)]["metadata"]["uid"]


async def test_in_cluster_config_comes_first_and_a_missing_kubeconfig_fails_fast(api, router, monkeypatch,
                                                                                 tmp_path):
    from kubernetes import config

    def fake_incluster(client_configuration):  # what the service-account loader sets up, pointed at the fake
        client_configuration.host = api.url
        client_configuration.api_key = {"authorization": f"Bearer {TOKEN}"}

    monkeypatch.setattr(config, "load_incluster_config", fake_incluster)
    api.apply(make_pod("a", "127.0.0.11"))
    d = KubernetesDiscovery(router, namespace=NS, selector=SELECTOR)
    await d.start()
    try:
        assert await d.wait_synced(10) and urls(router) == {"http://127.0.0.11:8000"}
    finally:
        await d.stop()
    with pytest.raises(config.ConfigException):
        await KubernetesDiscovery(router, namespace=NS, selector=SELECTOR,
                                  kubeconfig=str(tmp_path / "missing")).start()


@pytest.mark.parametrize("how", ["error_event", "http_410"])
async def test_410_gone_relists_and_drops_pods_deleted_meanwhile(api, router, discover, how):
    api.apply(make_pod("a", "127.0.0.11"))
    api.apply(make_pod("b", "127.0.0.12"))
    d = await discover()
    await until(lambda: len(router.backends) == 2 and api.open_watches == 1, what="both added, watching")
    if how == "error_event":
        # b goes while the watch's version is compacted away: the open watch gets ERROR 410, never DELETED
        api.delete("b", then_compact=True)
    else:
        with api.cond:  # the watch ends before it sees b go, and resuming it is refused with HTTP 410
            api.cut_watches()
            api.delete("b")
            api.fail_next(410)
    api.apply(make_pod("c", "127.0.0.13"))
    await until(lambda: urls(router) == {"http://127.0.0.11:8000", "http://127.0.0.13:8000"}, what="relist")
    assert d.stats.relists_gone == 1
    assert len(api.lists()) == 2
    assert d.stats.errors == 0


async def test_watch_resumes_from_last_version_and_bookmarks_without_relisting(api, router, discover):
    api.apply(make_pod("a", "127.0.0.11"))
    d = await discover()
    await until(lambda: len(router.backends) == 1 and api.open_watches == 1)
    api.cut_watches()  # the server ends the watch (its timeout): resume where we were
    await until(lambda: len(api.watches()) == 2 and api.open_watches == 1, what="watch resumed")
    first_rv = int(api.watches()[1]["query"]["resourceVersion"])
    # events for pods outside the selector advance the server's version; a bookmark carries it over
    for i in range(3):
        api.apply(make_pod(f"db-{i}", "127.0.0.20", labels={"app": "db"}))
    api.send_bookmarks()
    await until(lambda: d.stats.bookmarks == 1, what="bookmark")
    api.compact()  # versions before the bookmark are gone; resuming from the bookmark is still fine
    api.cut_watches()
    await until(lambda: len(api.watches()) == 3 and api.open_watches == 1, what="watch resumed after bookmark")
    assert int(api.watches()[2]["query"]["resourceVersion"]) > first_rv
    api.apply(make_pod("b", "127.0.0.12"))
    await until(lambda: len(router.backends) == 2)
    assert len(api.lists()) == 1 and d.stats.relists_gone == 0


async def test_api_errors_back_off_and_keep_backends(api, router, discover):
    api.apply(make_pod("a", "127.0.0.11"))
    d = await discover()
    await until(lambda: len(router.backends) == 1 and api.open_watches == 1)
    api.fail_next(500, 503, 500)
    api.cut_watches()
    await until(lambda: not api.fail and d.stats.errors >= 3 and api.open_watches == 1,
                what="recovery after 3 failures")
    assert urls(router) == {"http://127.0.0.11:8000"}  # an API outage says nothing about the replicas
    assert "HTTP 500" in d.stats.last_error
    api.delete("a")
    await until(lambda: not router.backends)


async def test_starts_before_the_api_server_is_reachable(router, tmp_path):
    port = free_port()
    d = KubernetesDiscovery(router, namespace=NS, selector=SELECTOR, backoff_initial=0.05, backoff_max=0.1,
                            kubeconfig=write_kubeconfig(tmp_path / "kc", port))
    await d.start()
    api = None
    try:
        assert not await d.wait_synced(0.5)
        await until(lambda: d.stats.errors >= 2, what="connection errors")
        assert d.stats.lists == 0
        api = FakeKubeApiServer(port)
        api.apply(make_pod("a", "127.0.0.11"))
        assert await d.wait_synced(10)
        await until(lambda: urls(router) == {"http://127.0.0.11:8000"})  # from the list, or the watch after it
    finally:
        await d.stop()
        if api:
            api.close()


async def test_list_is_paged(api, router, discover):
    for i in range(5):
        api.apply(make_pod(f"p{i}", f"127.0.0.{11 + i}"))
    d = await discover(page_size=2)
    assert await d.wait_synced(10)
    assert len(router.backends) == 5
    assert [r["query"].get("continue") for r in api.lists()] == [None, "2", "4"]
    assert all(r["query"]["limit"] == "2" for r in api.lists())


async def test_new_pod_behind_a_reused_ip_is_a_new_backend(api, router, discover):
    api.apply(make_pod("a", "127.0.0.11", uid="first"))
    d = await discover()
    await until(lambda: len(router.backends) == 1)
    first = next(iter(router.backends.values()))
    api.delete("a", then_compact=True)  # unseen delete, then a new pod with the same IP: after the relist
    api.apply(make_pod("a2", "127.0.0.11", uid="second"))
    await until(lambda: d.backends.get("http://127.0.0.11:8000", BackendSpec("", None, None)).uid == "second")
    assert d.stats.removed == 1 and d.stats.added == 2
    assert next(iter(router.backends.values())) is not first


async def test_static_backend_with_the_same_url_is_left_alone(api, router, discover):
    router.add_backend("http://127.0.0.11:8000")
    api.apply(make_pod("a", "127.0.0.11"))
    api.apply(make_pod("b", "127.0.0.12"))
    d = await discover()
    await until(lambda: len(router.backends) == 2)
    assert set(d.backends) == {"http://127.0.0.12:8000"}
    api.delete("a")
    api.delete("b")
    await until(lambda: urls(router) == {"http://127.0.0.11:8000"}, what="only the discovered one removed")


async def test_kv_events_flow_from_the_annotated_endpoint_and_removal_drops_blocks(api, router, discover, tmp_path):
    pub = FakeVllmKvPublisher(tmp_path, "engine", transport="tcp")
    try:
        kv_port = int(pub.endpoint.rsplit(":", 1)[1])
        replay_port = int(pub.replay_endpoint.rsplit(":", 1)[1])
        api.apply(make_pod("a", "127.0.0.1", annotations={"preble.io/kv-events": f"tcp://{{podIP}}:{kv_port}",
                                                          "preble.io/kv-replay": f"tcp://{{podIP}}:{replay_port}"}))
        await discover()
        await until(lambda: len(router.backends) == 1)
        backend = next(iter(router.backends.values()))
        assert backend.kv_endpoint == pub.endpoint
        await pub.wait_subscribed()
        pub.publish(pub.stored([1, 2], list(range(8)), block_size=4))
        await until(lambda: router.index.blocks_held(backend.backend_id) == 2, what="blocks indexed")
        api.delete("a")
        await until(lambda: not router.backends)
        assert len(router.index) == 0
        assert router.subscriber(backend.backend_id) is None
    finally:
        pub.destroy()


async def test_stop_is_prompt_while_a_watch_is_open(api, router, kubeconfig):
    d = KubernetesDiscovery(router, namespace=NS, selector=SELECTOR, kubeconfig=kubeconfig)
    await d.start()
    assert await d.wait_synced(10)
    await until(lambda: api.open_watches == 1)
    started = time.monotonic()
    await d.stop()
    assert time.monotonic() - started < 3
    assert not d._thread.is_alive()
    await until(lambda: api.open_watches == 0, what="watch connection closed")


# ---- flags and the proxy ---------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    p.add_argument("--backends", nargs="*", default=[])
    add_discovery_args(p)
    return p


@pytest.mark.parametrize(("argv", "message"), [
    ([], "--backends is required"),
    (["--discovery", "k8s"], "--k8s-selector is required"),
    (["--discovery", "k8s", "--k8s-selector", "a=b", "--k8s-kv-port", "70000"], "must be a TCP port"),
])
def test_flag_checks(argv, message, capsys):
    p = parser()
    with pytest.raises(SystemExit):
        check_discovery_args(p, p.parse_args(argv))
    assert message in capsys.readouterr().err


async def test_static_discovery_is_a_no_op(router):
    p = parser()
    args = p.parse_args(["--backends", "http://127.0.0.1:1"])
    check_discovery_args(p, args)
    d = await start_discovery(args, router)
    assert isinstance(d, StaticDiscovery) and not router.backends  # watches nothing, adds nothing
    await d.stop()
    assert not router.backends


async def test_proxy_routes_to_discovered_pods(api, kubeconfig, tiny_model):
    from preble_router.proxy import Proxy, ProxyConfig
    from preble_router.tokens import PromptTokenizer
    from testkit.fake_backend import run_fake_backend_in_thread

    fakes = [run_fake_backend_in_thread(model="tiny") for _ in range(2)]
    ports = [int(url.rsplit(":", 1)[1]) for url, _ in fakes]
    p = parser()
    args = p.parse_args(["--discovery", "k8s", "--k8s-selector", SELECTOR, "--k8s-namespace", NS,
                         "--k8s-kubeconfig", kubeconfig, "--k8s-sync-timeout", "10"])
    check_discovery_args(p, args)
    router = Router(model="tiny", tokenizer=PromptTokenizer(str(tiny_model)), policy=make_policy("least_load"))
    proxy = Proxy(router, ProxyConfig(health_interval=0.1, startup_wait=5))
    api.apply(make_pod("vllm-0", "127.0.0.1", port=ports[0]))
    discovery = await start_discovery(args, router)  # what Proxy.startup does first
    await proxy.startup()
    try:
        assert discovery.stats.synced_at is not None and urls(router) == {f"http://127.0.0.1:{ports[0]}"}
        transport = httpx.ASGITransport(app=proxy.app())
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as c:
            body = {"model": "tiny", "prompt": "hello there " * 20, "max_tokens": 2}
            r = await c.post("/v1/completions", json=body)
            assert r.status_code == 200 and r.headers["x-preble-backend"] == f"http://127.0.0.1:{ports[0]}"

            api.apply(make_pod("vllm-1", "127.0.0.1", port=ports[1]))
            await until(lambda: sum(b.healthy for b in router.backends.values()) == 2, what="vllm-1 healthy")
            api.delete("vllm-0")
            await until(lambda: urls(router) == {f"http://127.0.0.1:{ports[1]}"}, what="vllm-0 gone")
            r = await c.post("/v1/completions", json=body)
            assert r.status_code == 200 and r.headers["x-preble-backend"] == f"http://127.0.0.1:{ports[1]}"

            api.delete("vllm-1")
            await until(lambda: not router.backends)
            r = await c.post("/v1/completions", json=body)
            assert r.status_code == 503
    finally:
        await discovery.stop()
        await proxy.shutdown()
        for _, stop in fakes:
            stop()


def test_cli_discovers_pods(api, kubeconfig, tiny_model):
    """`preble-router --discovery k8s ...` end to end: cli.build_parser/build_proxy and Proxy's lifespan
    (needs discovery wired into cli.py and proxy.py)."""
    from testkit.fake_backend import run_fake_backend_in_thread
    from testkit.in_thread import serve_router

    url, stop = run_fake_backend_in_thread(model="tiny")
    port = int(url.rsplit(":", 1)[1])
    api.apply(make_pod("vllm-0", "127.0.0.1", port=port))
    try:
        with serve_router(["--discovery", "k8s", "--k8s-selector", SELECTOR, "--k8s-namespace", NS,
                           "--k8s-kubeconfig", kubeconfig, "--model", str(tiny_model), "--served-model-name",
                           "tiny", "--health-interval", "0.2"]) as (router_url, proxy):
            assert proxy.discovery is not None and proxy.discovery.stats.synced_at is not None
            r = httpx.post(router_url + "/v1/completions", json={"model": "tiny", "prompt": "hi " * 30,
                                                                  "max_tokens": 2}, timeout=20)
            assert r.status_code == 200 and r.headers["x-preble-backend"] == url
            api.delete("vllm-0")
            deadline = time.monotonic() + 10
            while httpx.get(router_url + "/health", timeout=5).status_code != 503:
                assert time.monotonic() < deadline, "the deleted pod is still a backend"
                time.sleep(0.05)
        assert not proxy.discovery._thread.is_alive()  # Proxy.shutdown stopped discovery
    finally:
        stop()
