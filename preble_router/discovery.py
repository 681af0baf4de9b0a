"""Backend discovery: which vLLM replicas the router sends to, and how that set changes while it runs.

- `static`: the --backends list (cli.build_proxy adds it); nothing changes at run time.
- `k8s`: the pods matching a label selector in one namespace. A pod is a backend while it is Running and
  Ready, has a pod IP and is not terminating; its URL is `http://{podIP}:{port}` with the port from
  --k8s-port (a number, or the name of a container port such as `http`). Its KV-event endpoints come from
  the pod's annotations `preble.io/kv-events` / `preble.io/kv-replay` (`{podIP}` is substituted), else
  from --k8s-kv-port / --k8s-replay-port (`tcp://{podIP}:PORT`), else it has none (estimated index).

How the Kubernetes side works: the official `kubernetes` client's list + watch, the informer pattern.
List the pods (paged) and remember the list's resourceVersion, then watch from it; resume each watch from
the last resourceVersion seen (bookmarks included); on 410 Gone (the version was compacted away: an ERROR
event in the stream, or an HTTP 410) list again; on any other failure retry with capped exponential
backoff and jitter, keeping the backends as they are (an unreachable API server says nothing about the
replicas; the router's own health probes do).

The blocking client runs in one daemon thread, not on the router's event loop: the synchronous client is
the mature, widely used path (ApiClient + Watch over urllib3), and its blocking parts (kubeconfig exec
credential plugins, token refresh, the long-poll read) then never stall request handling. The thread
only keeps a pod -> backend table and hands the whole desired set to the loop (call_soon_threadsafe),
where one task applies the difference with Router.add_backend / await Router.remove_backend, one change
at a time. Backends discovery did not add (static ones with the same URL) are never removed by it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import os
import random
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from preble_router.router import Router

log = logging.getLogger(__name__)

KV_EVENTS_ANNOTATION = "preble.io/kv-events"
KV_REPLAY_ANNOTATION = "preble.io/kv-replay"
POD_IP_PLACEHOLDER = "{podIP}"
_SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


# ---- CLI ------------------------------------------------------------------------------------------------

def add_discovery_args(parser: argparse.ArgumentParser) -> None:
    """The discovery flags (cli.build_parser calls this; --backends becomes optional: nargs="*", default [])."""
    g = parser.add_argument_group("backend discovery")
    g.add_argument("--discovery", choices=["static", "k8s"], default="static",
                   help="static: the --backends list. k8s: the Ready pods matching --k8s-selector, added and "
                        "removed live (static --backends, if any, stay as well).")
    g.add_argument("--k8s-namespace", default=None,
                   help="Namespace of the vLLM pods (default: the router pod's own namespace in a cluster, "
                        "else the kubeconfig context's, else 'default').")
    g.add_argument("--k8s-selector", default=None, metavar="LABELS",
                   help="Label selector of the vLLM pods, e.g. 'app.kubernetes.io/name=vllm' (required with "
                        "--discovery k8s).")
    g.add_argument("--k8s-port", default="http", metavar="PORT_OR_NAME",
                   help="vLLM's HTTP port on each pod: a number, or the name of a container port.")
    g.add_argument("--k8s-kv-port", type=int, default=None, metavar="PORT",
                   help=f"KV-event publisher port on each pod (tcp://POD_IP:PORT) when the pod has no "
                        f"'{KV_EVENTS_ANNOTATION}' annotation. Without either the pod gets an estimated index.")
    g.add_argument("--k8s-replay-port", type=int, default=None, metavar="PORT",
                   help=f"KV-event replay port on each pod when it has no '{KV_REPLAY_ANNOTATION}' annotation.")
    g.add_argument("--k8s-kubeconfig", default=None, metavar="PATH",
                   help="kubeconfig file (default: the in-cluster service account, else $KUBECONFIG or "
                        "~/.kube/config).")
    g.add_argument("--k8s-sync-timeout", type=float, default=10.0,
                   help="Seconds startup waits for the first pod list before serving (discovery goes on in "
                        "the background either way).")


def check_discovery_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Cross-flag checks; call right after parse_args (exits through parser.error like argparse does)."""
    if args.discovery == "static" and not getattr(args, "backends", None):
        parser.error("--backends is required with --discovery static")
    if args.discovery == "k8s" and not args.k8s_selector:
        parser.error("--k8s-selector is required with --discovery k8s")
    for flag in ("k8s_kv_port", "k8s_replay_port"):
        value = getattr(args, flag)
        if value is not None and not 0 < value < 65536:
            parser.error(f"--{flag.replace('_', '-')} must be a TCP port, got {value}")
    if args.k8s_port.isdigit() and not 0 < int(args.k8s_port) < 65536:
        parser.error(f"--k8s-port must be a TCP port or a port name, got {args.k8s_port}")


class Discovery:
    """What the proxy holds: `await stop()` at shutdown."""

    async def stop(self) -> None:
        return None


class StaticDiscovery(Discovery):
    """The --backends list, added by cli.build_proxy before startup; nothing to watch."""


async def start_discovery(args: argparse.Namespace, router: Router) -> Discovery:
    """Start the discovery that args select; call on the router's event loop (Proxy.startup), before the
    first health probe, so the backends found by the first list are probed with the static ones."""
    if args.discovery != "k8s":
        return StaticDiscovery()
    discovery = KubernetesDiscovery(
        router, namespace=args.k8s_namespace, selector=args.k8s_selector, port=args.k8s_port,
        kv_port=args.k8s_kv_port, replay_port=args.k8s_replay_port, kubeconfig=args.k8s_kubeconfig)
    await discovery.start()
    if not await discovery.wait_synced(args.k8s_sync_timeout):
        log.warning("no pod list from the Kubernetes API within %.0f s; serving with what is known and "
                    "retrying in the background (last error: %s)", args.k8s_sync_timeout,
                    discovery.stats.last_error)
    return discovery


# ---- pods -> backends -----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class BackendSpec:
    """A backend discovery wants the router to have. A change of any field (a new pod behind the same IP,
    new endpoints) means remove + add: the old engine's blocks are not the new one's."""

    url: str
    kv_endpoint: str | None
    replay_endpoint: str | None
    pod: str = ""  # namespace/name, for logs
    uid: str = ""


def _host(ip: str) -> str:
    """A pod IP as it goes in a URL or a ZMQ tcp endpoint ([v6])."""
    try:
        return f"[{ip}]" if ipaddress.ip_address(ip).version == 6 else ip
    except ValueError:
        return ip


def _container_port(pod: Any, name: str) -> int | None:
    for container in (pod.spec.containers or []) if pod.spec else []:
        for port in container.ports or []:
            if port.name == name:
                return port.container_port
    return None


def pod_is_ready(pod: Any) -> bool:
    """Running, Ready=True, has a pod IP and is not being deleted (a terminating pod takes no new work)."""
    status = pod.status
    if status is None or status.phase != "Running" or not status.pod_ip:
        return False
    if pod.metadata is not None and pod.metadata.deletion_timestamp is not None:
        return False
    return any(c.type == "Ready" and c.status == "True" for c in status.conditions or [])


def pod_backend(pod: Any, *, port: str | int = "http", kv_port: int | None = None,
                replay_port: int | None = None) -> BackendSpec | None:
    """The backend a pod (a kubernetes.client.V1Pod) stands for, or None while it is not one."""
    if not pod_is_ready(pod):
        return None
    meta = pod.metadata
    pod_name = f"{meta.namespace}/{meta.name}"
    port_s = str(port)
    http_port = int(port_s) if port_s.isdigit() else _container_port(pod, port_s)
    if http_port is None:  # KubernetesDiscovery warns, once per pod
        return None
    host = _host(pod.status.pod_ip)
    annotations = meta.annotations or {}

    def endpoint(annotation: str, port_flag: int | None) -> str | None:
        value = (annotations.get(annotation) or "").strip()
        if value:
            return value.replace(POD_IP_PLACEHOLDER, host)
        return f"tcp://{host}:{port_flag}" if port_flag else None

    kv = endpoint(KV_EVENTS_ANNOTATION, kv_port)
    replay = endpoint(KV_REPLAY_ANNOTATION, replay_port) if kv else None
    return BackendSpec(f"http://{host}:{http_port}", kv, replay, pod=pod_name, uid=meta.uid or "")


def _desired(pods: dict[str, BackendSpec | None]) -> dict[str, BackendSpec]:
    out: dict[str, BackendSpec] = {}
    for name in sorted(pods):  # two pods claiming one URL (hostNetwork clash): the first name wins
        spec = pods[name]
        if spec is not None:
            out.setdefault(spec.url, spec)
    return out


# ---- Kubernetes -----------------------------------------------------------------------------------------

@dataclass
class DiscoveryStats:
    lists: int = 0  # full (paged) lists: the first, and one after each 410 Gone or failed list
    relists_gone: int = 0  # lists forced by 410 Gone
    watches: int = 0  # watch requests opened
    events: int = 0  # watch events applied (ADDED / MODIFIED / DELETED)
    bookmarks: int = 0
    short_watches: int = 0  # watches that ended within a second with no event (retried after a backoff)
    errors: int = 0  # failed list or watch requests (each followed by a backoff)
    last_error: str | None = None
    added: int = 0  # router.add_backend calls
    removed: int = 0  # router.remove_backend calls
    pods: int = 0  # pods matching the selector, ready or not
    resource_version: str | None = None
    synced_at: float | None = field(default=None, repr=False)


def _namespace_default(kubeconfig: str | None) -> str:
    if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
        with contextlib.suppress(OSError):
            with open(_SA_NAMESPACE_FILE) as f:
                if ns := f.read().strip():
                    return ns
    from kubernetes import config

    with contextlib.suppress(Exception):
        _, active = config.list_kube_config_contexts(config_file=kubeconfig)
        if ns := (active or {}).get("context", {}).get("namespace"):
            return ns
    return "default"


def load_api_client(kubeconfig: str | None = None) -> Any:
    """A kubernetes.client.ApiClient: the given kubeconfig; else in-cluster; else $KUBECONFIG/~/.kube/config.
    Blocking (reads files, may run a credential plugin): call it off the event loop."""
    from kubernetes import client, config

    cfg = client.Configuration()
    if kubeconfig:
        config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    else:
        try:
            config.load_incluster_config(client_configuration=cfg)
        except config.ConfigException:
            config.load_kube_config(client_configuration=cfg)
    return client.ApiClient(cfg)


class KubernetesDiscovery(Discovery):
    def __init__(self, router: Router, *, selector: str, namespace: str | None = None, port: str | int = "http",
                 kv_port: int | None = None, replay_port: int | None = None, kubeconfig: str | None = None,
                 api_client: Any = None, watch_timeout: int = 300, connect_timeout: float = 10.0,
                 page_size: int = 500, backoff_initial: float = 0.5, backoff_max: float = 30.0) -> None:
        self.router = router
        self.selector = selector
        self.namespace = namespace
        self.port = port
        self.kv_port = kv_port
        self.replay_port = replay_port
        self.kubeconfig = kubeconfig
        self.watch_timeout = watch_timeout  # server-side end of each watch; it is then resumed
        self.connect_timeout = connect_timeout
        self.page_size = page_size
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.stats = DiscoveryStats()
        self._api_client = api_client
        self._own_client = api_client is None
        self._core: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._watch: Any = None  # the kubernetes.watch.Watch streaming now, so stop() can cut it
        self._pods: dict[str, BackendSpec | None] = {}  # watch thread only
        self._published: dict[str, BackendSpec] | None = None  # watch thread only
        self._warned: set[str] = set()  # uids of ready pods without the named port (watch thread only)
        # loop side
        self._desired: dict[str, BackendSpec] = {}
        self._desired_listed = False
        self._changed = asyncio.Event()
        self._synced = asyncio.Event()
        self._managed: dict[str, BackendSpec] = {}  # what this discovery added to the router, by URL
        self._conflicts: set[str] = set()
        self._task: asyncio.Task | None = None

    @property
    def backends(self) -> dict[str, BackendSpec]:
        """The backends this discovery has added to the router and not removed, by URL."""
        return dict(self._managed)

    # ---- lifecycle (event loop) ---------------------------------------------------------------------------
    async def start(self) -> None:
        from kubernetes import client

        self._loop = asyncio.get_running_loop()
        if self._api_client is None:
            self._api_client = await asyncio.to_thread(load_api_client, self.kubeconfig)
        if self.namespace is None:
            self.namespace = await asyncio.to_thread(_namespace_default, self.kubeconfig)
        self._core = client.CoreV1Api(self._api_client)
        log.info("discovering backends: pods %r in namespace %s, port %s", self.selector, self.namespace, self.port)
        self._task = asyncio.create_task(self._reconcile_loop(), name="k8s-discovery-reconcile")
        self._thread = threading.Thread(target=self._run, name="k8s-discovery-watch", daemon=True)
        self._thread.start()

    async def wait_synced(self, timeout: float | None = None) -> bool:
        """True once the first list's backends are in the router; False on timeout."""
        try:
            await asyncio.wait_for(self._synced.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        """Stop watching (the backends found stay in the router; Router.stop() stops their consumers)."""
        self._stopping.set()
        if self._thread is not None:
            await asyncio.to_thread(self._join_thread, 5.0)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._own_client and self._api_client is not None:
            with contextlib.suppress(Exception):
                self._api_client.close()

    def _join_thread(self, timeout: float) -> None:
        assert self._thread is not None
        deadline = time.monotonic() + timeout
        while self._thread.is_alive() and time.monotonic() < deadline:
            w = self._watch
            if w is not None:
                w.stop()  # shuts the streaming socket down; the blocked read returns
            self._thread.join(0.05)
        if self._thread.is_alive():  # stuck in a list call: it is a daemon and exits at its timeout
            log.warning("discovery watch thread still busy at stop; leaving it")

    # ---- applying the desired set (event loop) -----------------------------------------------------------
    def _offer(self, desired: dict[str, BackendSpec], listed: bool) -> None:
        self._desired = desired
        self._desired_listed |= listed
        self._changed.set()

    async def _reconcile_loop(self) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            desired, listed = self._desired, self._desired_listed
            self._desired_listed = False
            await self._reconcile(desired)
            if listed and not self._synced.is_set():
                self.stats.synced_at = time.monotonic()
                self._synced.set()

    async def _reconcile(self, desired: dict[str, BackendSpec]) -> None:
        for url, spec in list(self._managed.items()):
            if desired.get(url) != spec:
                log.info("backend %s leaves (pod %s)", url, spec.pod)
                del self._managed[url]
                try:
                    await self.router.remove_backend(url)
                    self.stats.removed += 1
                except Exception:
                    log.exception("removing backend %s failed", url)
        for url, spec in desired.items():
            if url in self._managed:
                continue
            if self.router.backend_by_url(url) is not None:
                if url not in self._conflicts:  # a static backend of the same URL: leave it alone
                    log.warning("pod %s is backend %s, already configured statically; not managing it",
                                spec.pod, url)
                    self._conflicts.add(url)
                continue
            log.info("backend %s joins (pod %s, kv events %s)", url, spec.pod, spec.kv_endpoint or "none")
            try:
                self.router.add_backend(url, spec.kv_endpoint, spec.replay_endpoint)
            except Exception:
                log.exception("adding backend %s failed", url)
                continue
            self._managed[url] = spec
            self.stats.added += 1
        self._conflicts &= set(desired)

    # ---- the watch thread ------------------------------------------------------------------------------------
    def _publish(self, *, listed: bool = False) -> None:
        self.stats.pods = len(self._pods)
        desired = _desired(self._pods)
        if desired == self._published and not listed:
            return
        self._published = desired
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop closed under us at shutdown
            self._loop.call_soon_threadsafe(self._offer, desired, listed)

    def _spec(self, pod: Any) -> BackendSpec | None:
        spec = pod_backend(pod, port=self.port, kv_port=self.kv_port, replay_port=self.replay_port)
        if spec is None and pod_is_ready(pod) and pod.metadata.uid not in self._warned:
            self._warned.add(pod.metadata.uid)
            log.warning("pod %s/%s is ready but has no container port named %r: not a backend (see --k8s-port)",
                        pod.metadata.namespace, pod.metadata.name, self.port)
        return spec

    def _list(self) -> str:
        """List the selected pods (paged); replaces the table; returns the list's resourceVersion."""
        pods: dict[str, BackendSpec | None] = {}
        token = None
        while True:
            kwargs: dict[str, Any] = {"label_selector": self.selector, "limit": self.page_size,
                                      "_request_timeout": (self.connect_timeout, 60)}
            if token:
                kwargs["_continue"] = token
            page = self._core.list_namespaced_pod(self.namespace, **kwargs)
            for pod in page.items or []:
                pods[pod.metadata.name] = self._spec(pod)
            token = page.metadata._continue if page.metadata else None
            if not token:
                break
        self.stats.lists += 1
        self._pods = pods
        self._publish(listed=True)
        return page.metadata.resource_version

    def _watch_from(self, resource_version: str) -> str:
        """One watch request from resource_version until the server ends it; returns the last version seen."""
        from kubernetes import watch

        w = watch.Watch()
        self._watch = w
        if self._stopping.is_set():
            return resource_version
        self.stats.watches += 1
        try:
            for event in w.stream(self._core.list_namespaced_pod, self.namespace, label_selector=self.selector,
                                  resource_version=resource_version, allow_watch_bookmarks=True,
                                  timeout_seconds=self.watch_timeout,
                                  _request_timeout=(self.connect_timeout, self.watch_timeout + 30)):
                kind, pod = event["type"], event["object"]
                if kind == "BOOKMARK":
                    self.stats.bookmarks += 1
                elif kind in ("ADDED", "MODIFIED"):
                    self._pods[pod.metadata.name] = self._spec(pod)
                    self.stats.events += 1
                elif kind == "DELETED":
                    self._pods.pop(pod.metadata.name, None)
                    self.stats.events += 1
                resource_version = w.resource_version or resource_version
                self.stats.resource_version = resource_version
                self._publish()
                if self._stopping.is_set():
                    break
        finally:
            self._watch = None
        return resource_version

    def _run(self) -> None:
        from kubernetes.client.exceptions import ApiException

        backoff = self.backoff_initial
        resource_version: str | None = None
        while not self._stopping.is_set():
            try:
                if resource_version is None:
                    resource_version = self._list()
                    self.stats.resource_version = resource_version
                    backoff = self.backoff_initial
                started, events = time.monotonic(), self.stats.events + self.stats.bookmarks
                resource_version = self._watch_from(resource_version)
                if self.stats.events + self.stats.bookmarks > events or time.monotonic() - started > 1.0:
                    backoff = self.backoff_initial
                    continue
                # Ended at once with nothing in it: a server or proxy cutting watches. Pace the retries.
                self.stats.short_watches += 1
                if self._stopping.wait(backoff * random.uniform(0.8, 1.2)):
                    break
                backoff = min(backoff * 2, self.backoff_max)
                continue
            except ApiException as exc:
                if exc.status == 410:  # our version was compacted away: start over from a fresh list
                    log.info("pod watch expired (410 Gone); listing again")
                    self.stats.relists_gone += 1
                    resource_version = None
                    continue
                error = f"HTTP {exc.status}: {exc.reason}"
            except Exception as exc:  # connection refused / reset, timeouts, bad payloads: retry
                error = f"{type(exc).__name__}: {exc}"
            if self._stopping.is_set():
                break
            self.stats.errors += 1
            self.stats.last_error = error
            log.warning("pod %s failed (%s); retrying in %.1f s",
                        "list" if resource_version is None else "watch", error, backoff)
            if self._stopping.wait(backoff * random.uniform(0.8, 1.2)):
                break
            backoff = min(backoff * 2, self.backoff_max)
