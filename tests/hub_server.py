"""A loopback stand-in for the Hugging Face Hub: the HTTP subset that huggingface_hub uses to download files.

``HEAD``/``GET /{owner}/{name}/resolve/{revision}/{filename}`` answer as the Hub does: ``X-Repo-Commit`` and
``ETag`` on every file; small files inline; large (LFS) files as a 302 to a second server on another port (the
"CDN", whose origin huggingface_hub treats as foreign, as it does the real one) with ``X-Linked-Etag`` and
``X-Linked-Size``; a 404 with ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) otherwise.

``GET /api/models`` lists the repos as ``HfApi.list_models`` reads them: filtered by ``author`` and every ``filter``
value (a tag; the library and pipeline tag are tags, as on the Hub), sorted by ``sort`` (descending), ``expand``
restricting the properties, and paginated ``limit`` (at most ``page_size``) entries at a time through a
``Link: <...>; rel="next"`` header, as the Hub and GitHub do.
Every request is recorded in ``requests``, so a test can assert that the Hub was (not) contacted.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

import pytest
from huggingface_hub import constants

# Files the Hub stores in LFS (served through the CDN redirect); the rest it serves inline from git.
_LFS_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


@dataclass
class Repo:
    commit: str
    files: dict[str, bytes]
    listing: dict[str, Any] = field(default_factory=dict)  # what /api/models says of it, besides its id


# The properties a listing entry has when the request names none in ``expand``.
_DEFAULT_PROPERTIES = ("downloads", "likes", "library_name", "pipeline_tag", "tags", "private", "createdAt")


@dataclass
class HubServer:
    """Serves ``repos`` on 127.0.0.1 while entered as a context manager; ``endpoint`` is its HF_ENDPOINT."""

    repos: dict[str, Repo] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path), Hub and CDN alike
    page_size: int = 1000  # the most entries per /api/models page (the Hub's default and largest page)

    def add_repo(
        self,
        repo_id: str,
        files: dict[str, bytes] | Path,
        *,
        downloads: int = 0,
        library_name: str | None = "timm",
        pipeline_tag: str | None = "image-classification",
        tags: tuple[str, ...] = (),
    ) -> str:
        """Publish ``files`` (or every file of a directory) as ``repo_id``; returns the commit sha.

        The keywords are what the model listing says of the repo.
        """
        if isinstance(files, Path):
            files = {p.name: p.read_bytes() for p in sorted(files.iterdir()) if p.is_file()}
        digest = hashlib.sha1(repo_id.encode())
        for name, content in sorted(files.items()):
            digest.update(name.encode() + hashlib.sha1(content).digest())
        commit = digest.hexdigest()
        listing = {
            "_id": commit[:24],
            "modelId": repo_id,
            "author": repo_id.partition("/")[0],
            "sha": commit,
            "downloads": downloads,
            "likes": 0,
            "library_name": library_name,
            "pipeline_tag": pipeline_tag,
            # As on the Hub: the library and the pipeline tag are among the tags (what `filter` matches).
            "tags": list(dict.fromkeys(t for t in (library_name, pipeline_tag, *tags) if t)),
            "private": False,
            "createdAt": "2024-01-01T00:00:00.000Z",
        }
        self.repos[repo_id] = Repo(commit, dict(files), listing)
        return commit

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._hub.server_address[1]}"

    @property
    def cdn_endpoint(self) -> str:
        return f"http://127.0.0.1:{self._cdn.server_address[1]}"

    def env(self, hf_home: Path) -> dict[str, str]:
        """Environment variables that point a fresh process's huggingface_hub at this server and ``hf_home``."""
        return {"HF_ENDPOINT": self.endpoint, "HF_HOME": str(hf_home), "HF_HUB_DISABLE_TELEMETRY": "1"}

    def patch(self, monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
        """Point this process's huggingface_hub at this server and the cache ``cache``, online.

        huggingface_hub reads HF_ENDPOINT, HF_HUB_CACHE and HF_HUB_OFFLINE at import; it reads these module
        constants at each call.
        """
        monkeypatch.setattr(constants, "ENDPOINT", self.endpoint)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", self.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def __enter__(self) -> HubServer:
        self._hub = _serve(self, _HubHandler)
        self._cdn = _serve(self, _CdnHandler)
        return self

    def __exit__(self, *exc: object) -> None:
        for server in (self._hub, self._cdn):
            server.shutdown()
            server.server_close()

    def blob(self, sha256: str) -> bytes | None:
        for repo in self.repos.values():
            for content in repo.files.values():
                if hashlib.sha256(content).hexdigest() == sha256:
                    return content
        return None


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    hub: HubServer


def _serve(hub: HubServer, handler: type[BaseHTTPRequestHandler]) -> _Server:
    server = _Server(("127.0.0.1", 0), handler)
    server.hub = hub
    # A short poll interval makes shutdown() quick.
    threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True).start()
    return server


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects of the Hub
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep pytest's output clean

    def do_HEAD(self) -> None:
        self.server.hub.requests.append(("HEAD", self.path))
        self.answer(body=False)

    def do_GET(self) -> None:
        self.server.hub.requests.append(("GET", self.path))
        self.answer(body=True)

    def answer(self, body: bool) -> None:
        raise NotImplementedError

    def reply(self, status: int, headers: dict[str, str], content: bytes = b"", body: bool = True) -> None:
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(content))}.items():
            self.send_header(key, value)
        self.end_headers()
        if body:
            self.wfile.write(content)


class _HubHandler(_Handler):
    def answer(self, body: bool) -> None:
        url = urlsplit(self.path)
        if url.path == "/api/models":
            self.list_models(parse_qs(url.query), body)
            return
        parts = unquote(url.path).lstrip("/").split("/", 4)
        if len(parts) < 5 or parts[2] != "resolve":
            self.reply(404, {"X-Error-Code": "EntryNotFound"}, body=body)
            return
        repo = self.server.hub.repos.get(f"{parts[0]}/{parts[1]}")
        revision, filename = parts[3], parts[4]
        if repo is None:
            self.reply(404, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"}, body=body)
            return
        if revision not in ("main", repo.commit):
            self.reply(404, {"X-Error-Code": "RevisionNotFound"}, body=body)
            return
        commit = {"X-Repo-Commit": repo.commit}
        content = repo.files.get(filename)
        if content is None:
            self.reply(404, {**commit, "X-Error-Code": "EntryNotFound"}, body=body)
        elif filename.endswith(_LFS_SUFFIXES):
            sha256 = hashlib.sha256(content).hexdigest()
            self.reply(
                302,
                {
                    **commit,
                    "ETag": f'"{_git_sha1(content)}"',
                    "X-Linked-Etag": f'"{sha256}"',
                    "X-Linked-Size": str(len(content)),
                    "Location": f"{self.server.hub.cdn_endpoint}/{sha256}",
                },
                body=body,
            )
        else:
            self.reply(200, {**commit, "ETag": f'"{_git_sha1(content)}"'}, content, body)

    def list_models(self, query: dict[str, list[str]], body: bool) -> None:
        """One page of the model listing; ``cursor`` (an offset here, opaque on the Hub) comes from the Link header."""
        hub = self.server.hub
        author = query.get("author", [None])[0]
        wanted = query.get("filter", [])
        entries = [
            {"id": repo_id, **repo.listing}
            for repo_id, repo in hub.repos.items()
            if (author is None or repo.listing["author"] == author) and all(t in repo.listing["tags"] for t in wanted)
        ]
        if "sort" in query:
            entries.sort(key=lambda entry: entry[query["sort"][0]], reverse=True)
        expand = query.get("expand")
        keep = {"_id", "id", *(expand or ("modelId", *_DEFAULT_PROPERTIES))}
        entries = [{key: value for key, value in entry.items() if key in keep} for entry in entries]
        start = int(query.get("cursor", ["0"])[0])
        size = min(int(query.get("limit", [str(hub.page_size)])[0]), hub.page_size)
        headers = {"Content-Type": "application/json"}
        if start + size < len(entries):
            following = urlencode({**query, "cursor": [str(start + size)]}, doseq=True)
            headers["Link"] = f'<{hub.endpoint}/api/models?{following}>; rel="next"'
        self.reply(200, headers, json.dumps(entries[start : start + size]).encode(), body)


class _CdnHandler(_Handler):
    def answer(self, body: bool) -> None:
        content = self.server.hub.blob(urlsplit(self.path).path.strip("/"))
        if content is None:
            self.reply(404, {}, body=body)
        else:
            self.reply(200, {"ETag": f'"{hashlib.sha256(content).hexdigest()}"'}, content, body)


def _git_sha1(content: bytes) -> str:
    """The id git gives a blob, which the Hub sends as the ETag of a file it stores in git."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()
