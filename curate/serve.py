"""`curate serve OUTPUT`: a small search page over a run's curated images, on localhost.

GET /                              the page: a query box and a result grid
GET /api/search?q=TEXT&k=16        {"query", "k", "results": [{uid, score, caption, url, clip_score, image}]}
GET /api/similar?uid=UID&k=16      the same, for the images nearest to a curated image
GET /image/UID                     the image's bytes
"""

from __future__ import annotations

import json
import logging
import time
import urllib.parse
from html import escape
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from curate.report.html import CSS
from curate.search import RunSearch, SearchHit

log = logging.getLogger(__name__)

MAX_K = 200
DEFAULT_K = 16

PAGE_CSS = """
form.q { display: flex; gap: 10px; margin: 0; }
form.q input[type=search] { flex: 1; font: inherit; font-size: 17px; padding: 10px 14px; border-radius: 10px;
                            border: 1px solid #ced4da; }
form.q select, form.q button { font: inherit; padding: 8px 14px; border-radius: 10px; border: 1px solid #ced4da;
                               background: #fff; }
form.q button { background: var(--accent); color: #fff; border-color: var(--accent); cursor: pointer; }
#status { color: var(--muted); margin: 12px 0 16px; min-height: 1.5em; }
figure.cell img { cursor: pointer; }
"""

PAGE_JS = """
const form = document.getElementById('q'), box = document.getElementById('query'), kBox = document.getElementById('k');
const grid = document.getElementById('results'), status = document.getElementById('status');
function cell(hit) {
  const fig = document.createElement('figure'); fig.className = 'cell'; fig.dataset.uid = hit.uid;
  fig.title = hit.uid + '\\n' + (hit.url || '');
  const frame = document.createElement('div'); frame.className = 'img';
  const img = document.createElement('img'); img.src = hit.image; img.alt = hit.caption;
  img.addEventListener('click', () => run('/api/similar?uid=' + encodeURIComponent(hit.uid), 'images like this one'));
  frame.appendChild(img);
  const cap = document.createElement('figcaption');
  const text = document.createElement('span'); text.className = 'cap'; text.textContent = hit.caption || '(empty)';
  const meta = document.createElement('span'); meta.className = 'meta';
  const score = hit.clip_score == null ? '' : ' · score ' + hit.clip_score.toFixed(3);
  meta.textContent = 'match ' + hit.score.toFixed(3) + score;
  cap.append(text, meta); fig.append(frame, cap); return fig;
}
async function run(url, label) {
  status.textContent = 'searching…';
  const started = performance.now();
  const response = await fetch(url + '&k=' + kBox.value);
  const body = await response.json();
  if (!response.ok) { status.textContent = body.error; grid.replaceChildren(); return; }
  grid.replaceChildren(...body.results.map(cell));
  const ms = Math.round(performance.now() - started);
  status.textContent = body.results.length + ' results for ' + label + ' (' + ms + ' ms)';
  document.body.dataset.done = String(Number(document.body.dataset.done || 0) + 1);
}
form.addEventListener('submit', event => {
  event.preventDefault();
  const q = box.value.trim(); if (!q) return;
  history.replaceState(null, '', '?q=' + encodeURIComponent(q));
  run('/api/search?q=' + encodeURIComponent(q), '“' + q + '”');
});
const initial = new URLSearchParams(location.search).get('q');
if (initial) { box.value = initial; form.requestSubmit(); }
"""


def page(run_name: str, count: int) -> str:
    run_name = escape(run_name)
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<title>curate search — {run_name}</title><link rel="icon" href="data:,"><style>{CSS}{PAGE_CSS}</style>'
        '</head><body><header class="top"><div class="wrap">'
        f'<h1>curate search <span>{run_name}</span></h1><p class="path">{count:,} curated images · '
        "click an image for similar ones</p>"
        '<form class="q" id="q"><input type="search" id="query" placeholder="a red circle on a blue background" '
        'autofocus><select id="k">'
        + "".join(f"<option{' selected' if k == DEFAULT_K else ''}>{k}</option>" for k in (8, 16, 32, 64))
        + '</select><button type="submit">Search</button></form></div></header>'
        '<main class="wrap"><section><div id="status"></div><div class="grid" id="results"></div></section></main>'
        f"<script>{PAGE_JS}</script></body></html>\n"
    )


class SearchHandler(BaseHTTPRequestHandler):
    server: SearchServer

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        params = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
        try:
            if url.path == "/":
                self._send(HTTPStatus.OK, self.server.page.encode(), "text/html; charset=utf-8")
            elif url.path == "/api/search":
                self._search(params)
            elif url.path == "/api/similar":
                self._similar(params)
            elif url.path.startswith("/image/"):
                self._image(urllib.parse.unquote(url.path.removeprefix("/image/")))
            else:
                self._json(HTTPStatus.NOT_FOUND, {"error": f"no such page: {url.path}"})
        except BadRequest as err:
            self._json(HTTPStatus.BAD_REQUEST, {"error": str(err)})

    def _search(self, params: dict[str, str]) -> None:
        query = params.get("q", "").strip()
        if not query:
            raise BadRequest("give a query: /api/search?q=a+red+circle")
        started = time.perf_counter()
        hits = self.server.search.text(query, _k(params))
        self._results(query, hits, started)

    def _similar(self, params: dict[str, str]) -> None:
        uid = params.get("uid", "")
        try:
            started = time.perf_counter()
            hits = self.server.search.similar(uid, _k(params))
        except KeyError:
            raise BadRequest(f"no curated image with uid {uid!r}") from None
        self._results(uid, hits, started)

    def _image(self, uid: str) -> None:
        data = self.server.search.index.image(uid)
        if data is None:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no curated image with uid {uid!r}"})
            return
        self._send(HTTPStatus.OK, data, "image/jpeg", cache=True)

    def _results(self, query: str, hits: list[SearchHit], started: float) -> None:
        results = [{**hit.to_json(), "image": f"/image/{urllib.parse.quote(hit.uid)}"} for hit in hits]
        seconds = round(time.perf_counter() - started, 4)
        self._json(HTTPStatus.OK, {"query": query, "k": len(results), "seconds": seconds, "results": results})

    def _json(self, status: HTTPStatus, payload: dict[str, Any]) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def _send(self, status: HTTPStatus, body: bytes, content_type: str, cache: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "max-age=3600" if cache else "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)


class BadRequest(ValueError):
    pass


def _k(params: dict[str, str]) -> int:
    try:
        k = int(params.get("k", DEFAULT_K))
    except ValueError:
        raise BadRequest(f"k must be an integer, got {params['k']!r}") from None
    if not 1 <= k <= MAX_K:
        raise BadRequest(f"k must be in [1, {MAX_K}], got {k}")
    return k


class SearchServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, search: RunSearch, host: str = "127.0.0.1", port: int = 8000) -> None:
        super().__init__((host, port), SearchHandler)
        self.search = search
        self.page = page(search.layout.root.resolve().name, len(search.index))

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/"


def make_server(run_dir: str | Path, host: str = "127.0.0.1", port: int = 8000) -> SearchServer:
    """Build (or reuse) the run's index and bind the server; `port=0` picks a free port."""
    search = RunSearch(Path(run_dir))
    _ = search.model  # load now: a bad checkpoint fails here, and the first query is not slow
    return SearchServer(search, host, port)
