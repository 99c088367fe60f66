"""Local HTTP endpoints for tests: a recording stand-in for the Hugging Face Hub API, and a fault-injecting proxy.

No local Hugging Face Hub server exists, so `RecordingHub` answers the few endpoints
`huggingface_hub` calls to create a repo and push one commit, and records every request.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict
    body: bytes


@dataclass
class _State:
    requests: list[Recorded] = field(default_factory=list)
    commits: list[list[dict]] = field(default_factory=list)
    """The NDJSON lines of each accepted commit."""
    revisions: list[str] = field(default_factory=list)
    """The branch each accepted commit went to."""
    repos: dict[str, bool] = field(default_factory=dict)
    """repo id -> private, as created (an existing repo keeps its visibility, as on the Hub)."""
    branches: set[str] = field(default_factory=set)
    valid_token: str = "hf_test_token"
    fail_next: int = 0
    """Answer this many upcoming requests (the proxy: PUTs) with fail_status before behaving."""
    fail_status: int = 503
    fail_path_contains: str = ""
    """Only requests whose path contains this are answered with fail_status."""
    stall_next: int = 0
    """Hold this many upcoming requests (the hub: POSTs) for stall_s, then drop the connection, as a stuck server."""
    stall_s: float = 0.0


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, handler):
        super().__init__(("127.0.0.1", 0), handler)
        self.state = _State()
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
        self.server_close()


class _HubHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def _reply(self, status: int, payload: dict, headers: dict | None = None) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        state = self.server.state
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        state.requests.append(Recorded("POST", self.path, dict(self.headers), body))
        if state.stall_next:
            state.stall_next -= 1
            time.sleep(state.stall_s)
            self.close_connection = True
            return
        if state.fail_next:
            state.fail_next -= 1
            return self._reply(503, {"error": "try again"})
        if self.headers.get("Authorization") != f"Bearer {state.valid_token}":
            return self._reply(401, {"error": "Invalid credentials in Authorization header"})
        parts = self.path.split("?")[0].strip("/").split("/")
        if parts[:3] == ["api", "repos", "create"]:
            name = json.loads(body)
            private = name.get("visibility", "private" if name.get("private") else "public") == "private"
            state.repos.setdefault(f"{name.get('organization')}/{name['name']}", private)
            return self._reply(
                200, {"url": f"{self.server.url}/{name.get('organization')}/{name['name']}", "name": name["name"]}
            )
        if parts[:2] == ["api", "validate-yaml"]:
            return self._reply(200, {})
        if len(parts) >= 6 and parts[:2] == ["api", "models"] and parts[4] == "preupload":
            files = json.loads(body)["files"]
            return self._reply(
                200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
            )
        if len(parts) >= 6 and parts[:2] == ["api", "models"] and parts[4] == "branch":
            state.branches.add(parts[5])
            return self._reply(200, {})
        if len(parts) >= 6 and parts[:2] == ["api", "models"] and parts[4] == "commit":
            repo = f"{parts[2]}/{parts[3]}"
            state.revisions.append(parts[5])
            state.commits.append([json.loads(line) for line in body.splitlines() if line.strip()])
            return self._reply(
                200,
                {
                    "commitUrl": f"{self.server.url}/{repo}/commit/0123456789abcdef",
                    "commitOid": "0123456789abcdef" * 2 + "01234567",
                },
            )
        return self._reply(404, {"error": f"not implemented in the test hub: {self.path}"})

    def do_GET(self):  # reads only: not recorded among the requests a push sends
        state = self.server.state
        parts = self.path.split("?")[0].strip("/").split("/")
        if parts == ["api", "whoami-v2"]:
            if self.headers.get("Authorization") != f"Bearer {state.valid_token}":
                return self._reply(401, {"error": "Invalid credentials in Authorization header"})
            return self._reply(200, {"name": "tester", "auth": {"accessToken": {"role": "write"}}})
        repo = "/".join(parts[2:4])
        if parts[:2] == ["api", "models"] and len(parts) == 4 and repo in state.repos:
            return self._reply(200, {"id": repo, "private": state.repos[repo], "sha": "0" * 40})
        # As the Hub answers for a repo that does not exist (huggingface_hub reads the error code).
        return self._reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})


class RecordingHub(_Server):
    def __init__(self):
        super().__init__(_HubHandler)


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # answers `Expect: 100-continue` at once

    def log_message(self, *args):
        pass

    def _forward(self):
        state = self.server.state
        body = self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
        state.requests.append(Recorded(self.command, self.path, dict(self.headers), b""))
        if state.fail_next and self.command == "PUT" and state.fail_path_contains in self.path:
            state.fail_next -= 1
            self.send_response(state.fail_status)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        request = urllib.request.Request(
            self.server.target + self.path, data=body if body else None, method=self.command
        )
        for key, value in self.headers.items():
            if key.lower() not in ("host", "content-length", "expect"):
                request.add_header(key, value)
        request.add_header("Host", self.server.target.split("//", 1)[1])
        if "Content-Type" not in self.headers:  # else urllib says form-encoded, and the server parses the body away
            request.add_header("Content-Type", "application/octet-stream")
        try:
            with urllib.request.urlopen(request) as response:
                status, headers, payload = response.status, response.headers, response.read()
        except urllib.error.HTTPError as err:
            status, headers, payload = err.code, err.headers, err.read()
        self.send_response(status)
        for key, value in headers.items():
            if key.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                self.send_header(key, value)
        # A HEAD answer has no body but must keep the object's length.
        length = headers.get("Content-Length", "0") if self.command == "HEAD" else str(len(payload))
        self.send_header("Content-Length", length)
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward


class FlakyProxy(_Server):
    """Forwards to `target`, answering the next `state.fail_next` PUT requests with `state.fail_status` first."""

    def __init__(self, target: str):
        self.target = target
        super().__init__(_ProxyHandler)
