"""A loopback Hugging Face Hub speaking the small part of the protocol that push and download use.

create_repo -> POST /api/repos/create; upload_folder -> POST .../preupload/{rev} then
POST .../commit/{rev} (NDJSON, base64 file contents); downloads -> HEAD/GET /{repo}/resolve/{rev}/{file}.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


class LoopbackHub:
    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.private: dict[str, bool] = {}
        self.commits: dict[str, str] = {}
        self.unhandled: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def _send(self, status, body=b"", headers=None, head=False):
                if isinstance(body, (dict, list)):
                    body = json.dumps(body).encode()
                    headers = {"Content-Type": "application/json", **(headers or {})}
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def do_POST(self):
                path = unquote(urlparse(self.path).path)
                if path == "/api/repos/create":
                    data = json.loads(self._body())
                    repo = f"{data['organization']}/{data['name']}" if data.get("organization") else data["name"]
                    hub.repos.setdefault(repo, {})
                    hub.private[repo] = data.get("visibility") == "private" or bool(data.get("private"))
                    hub.commits.setdefault(repo, "0" * 40)
                    return self._send(200, {"url": f"{hub.url}/{repo}", "name": repo, "id": repo})
                if path == "/api/validate-yaml":
                    self._body()
                    return self._send(200, {"errors": [], "warnings": []})
                if path.startswith("/api/models/") and "/preupload/" in path:
                    self._body_json = json.loads(self._body())
                    files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                             for f in self._body_json.get("files", [])]
                    return self._send(200, {"files": files, "commitOid": hub.commits.get(self._repo(path), "0" * 40)})
                if path.startswith("/api/models/") and "/commit/" in path:
                    repo = self._repo(path)
                    if repo not in hub.repos:
                        return self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                    for line in self._body().decode().splitlines():
                        entry = json.loads(line)
                        if entry.get("key") == "file":
                            value = entry["value"]
                            hub.repos[repo][value["path"]] = base64.b64decode(value["content"])
                        elif entry.get("key") == "deletedFile":
                            hub.repos[repo].pop(entry["value"]["path"], None)
                    oid = hashlib.sha1(json.dumps(sorted(hub.repos[repo])).encode() + hub.commits[repo].encode()).hexdigest()
                    hub.commits[repo] = oid
                    return self._send(200, {"commitUrl": f"{hub.url}/{repo}/commit/{oid}", "commitOid": oid,
                                            "pullRequestUrl": None})
                hub.unhandled.append(f"POST {path}")
                return self._send(404, {"error": "not handled"})

            def _repo(self, path: str) -> str:
                rest = path[len("/api/models/"):]
                marker = "/preupload/" if "/preupload/" in rest else "/commit/"
                return rest.split(marker)[0]

            def _model_info(self, path: str, head: bool):
                repo = path[len("api/models/"):].split("/revision/")[0]
                if repo not in hub.repos:
                    return self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}, head)
                siblings = [{"rfilename": name} for name in sorted(hub.repos[repo])]
                return self._send(200, {"id": repo, "modelId": repo, "sha": hub.commits[repo],
                                        "private": hub.private[repo], "siblings": siblings}, head=head)

            def _resolve(self, head: bool):
                path = unquote(urlparse(self.path).path).lstrip("/")
                if path.startswith("api/models/"):
                    return self._model_info(path, head)
                if "/resolve/" not in path:
                    hub.unhandled.append(f"{'HEAD' if head else 'GET'} /{path}")
                    return self._send(404, {"error": "not handled"}, head=head)
                repo, rest = path.split("/resolve/", 1)
                _revision, filename = rest.split("/", 1)
                if repo not in hub.repos:
                    return self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}, head)
                content = hub.repos[repo].get(filename)
                if content is None:
                    return self._send(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound",
                                                                          "X-Repo-Commit": hub.commits[repo]}, head)
                etag = hashlib.sha256(content).hexdigest()
                headers = {"X-Repo-Commit": hub.commits[repo], "ETag": f'"{etag}"',
                           "Content-Type": "application/octet-stream"}
                return self._send(200, content, headers, head)

            def do_HEAD(self):
                self._resolve(head=True)

            def do_GET(self):
                self._resolve(head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "LoopbackHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
