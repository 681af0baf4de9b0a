"""start_replicas starts a replica again, on new ports, when it dies during startup (a lost port race).

The "interpreter" here is a fake: a script that ignores vLLM's arguments except --port and --served-model-name,
fails its first start like an engine whose port was taken, and afterwards serves /health and /v1/models.
"""

from __future__ import annotations

import sys
import textwrap

import pytest

from benchmarks.vllm_replicas import ReplicaDied, start_replicas

_FAKE_VLLM = textwrap.dedent(
    """
    import http.server, json, os, sys
    args = sys.argv[1:]
    port = int(args[args.index("--port") + 1])
    name = args[args.index("--served-model-name") + 1]
    marker = os.environ["FAKE_MARKER"]
    starts = int(open(marker).read()) if os.path.exists(marker) else 0
    open(marker, "w").write(str(starts + 1))
    if starts < int(os.environ["FAKE_FAILURES"]):
        print("zmq.error.ZMQError: Address already in use (addr='tcp://*:5555')", flush=True)
        sys.exit(1)

    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"{}" if self.path == "/health" else json.dumps({"data": [{"id": name}]}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
    """
)


def _fake_python(tmp_path, failures: int) -> str:
    script = tmp_path / "fake_vllm.py"
    script.write_text(_FAKE_VLLM)
    launcher = tmp_path / "fake-python"
    # Called as `fake-python -m vllm.entrypoints... ARGS`: drop "-m MODULE" and run the fake.
    launcher.write_text(f'#!/bin/sh\nshift 2\nexec {sys.executable} {script} "$@"\n')
    launcher.chmod(0o755)
    return str(launcher)


def test_a_replica_that_dies_at_startup_is_started_again_on_new_ports(tmp_path, capfd):
    env = {"FAKE_MARKER": str(tmp_path / "starts"), "FAKE_FAILURES": "1"}
    with start_replicas(tmp_path, 1, python=_fake_python(tmp_path, 1), env=env, ready_timeout=20) as reps:
        assert reps[0].check_ready()
        assert (tmp_path / "starts").read_text() == "2"
    err = capfd.readouterr().err
    assert "Address already in use" in err  # the first death is reported, with its root cause
    assert "starting replica 0 again on new ports" in err


def test_a_replica_that_keeps_dying_fails_with_its_error_lines(tmp_path):
    env = {"FAKE_MARKER": str(tmp_path / "starts"), "FAKE_FAILURES": "99"}
    with pytest.raises(ReplicaDied, match="Address already in use"):
        with start_replicas(tmp_path, 1, python=_fake_python(tmp_path, 99), env=env, ready_timeout=20):
            pass
    assert (tmp_path / "starts").read_text() == "3"
