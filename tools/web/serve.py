"""Serve tools/web/ and eqc artifact folders from one origin, cross-origin isolated, and drive the page.

    python tools/web/serve.py ART [ART ...] [--port 8000]       # serve; prints a page URL per artifact
    python tools/web/serve.py ART --run --threads 1 2 --prompt "..." --max-new-tokens 32
        # runs the page in headless Chromium (run_chromium.mjs) and prints one JSON line per run

Artifact k is mounted at /models/k/. onnxruntime-web only uses threads when the page is cross-origin
isolated (SharedArrayBuffer), hence the COOP/COEP headers on every response.
Stdlib only, so tests/test_web_runtime.py can import it.
"""
from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import pathlib
import shutil
import subprocess
import threading
import urllib.parse

WEB = pathlib.Path(__file__).resolve().parent
CHROMIUM_PATHS = ("/usr/lib/chromium/chromium", "/usr/bin/chromium", "/usr/bin/chromium-browser")


class Handler(http.server.SimpleHTTPRequestHandler):
    """Static files from tools/web/, plus /models/NAME/... from the mounted artifact folders."""

    models: dict[str, pathlib.Path] = {}

    def translate_path(self, path: str) -> str:
        parts = urllib.parse.unquote(urllib.parse.urlsplit(path).path).split("/")
        if len(parts) > 3 and parts[1] == "models" and parts[2] in self.models:
            rest = [p for p in parts[3:] if p not in ("", ".", "..")]
            return str(self.models[parts[2]].joinpath(*rest))
        return super().translate_path(path)

    def end_headers(self) -> None:
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cross-Origin-Resource-Policy", "same-origin")
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, *args) -> None:  # quiet: the test and the bench print what matters
        pass


# .mjs must be served as JavaScript or Chromium refuses the module (Python's mimetypes may not know it).
Handler.extensions_map = {**Handler.extensions_map, ".mjs": "text/javascript", ".js": "text/javascript",
                          ".wasm": "application/wasm"}


def serve(models: dict[str, pathlib.Path], port: int = 0) -> tuple[http.server.ThreadingHTTPServer, str]:
    """Start the server on 127.0.0.1 (a free port when 0) in a daemon thread; returns (server, base URL).
    server.models (name -> folder) is live: adding an entry mounts another artifact at /models/NAME/."""
    handler = type("EqcWebHandler", (Handler,), {"models": {k: pathlib.Path(v).resolve() for k, v in models.items()}})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), functools.partial(handler, directory=str(WEB)))
    server.models = handler.models
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def page_url(base: str, model: str, prompt: str, max_new_tokens: int, threads: int) -> str:
    query = urllib.parse.urlencode({"model": f"models/{model}/", "prompt": prompt,
                                    "max_new_tokens": max_new_tokens, "threads": threads})
    return f"{base}index.html?{query}"


def find_chromium() -> str | None:
    for path in (os.environ.get("CHROMIUM_PATH"), *CHROMIUM_PATHS):
        if path and os.access(path, os.X_OK):
            return path
    return None


def npm_ready() -> str | None:
    """None when node_modules is installed (running `npm ci` once if needed), else the reason it is not."""
    if (WEB / "node_modules" / "onnxruntime-web").is_dir() and (WEB / "node_modules" / "puppeteer-core").is_dir():
        return None
    if not shutil.which("npm") or not shutil.which("node"):
        return "node/npm not installed"
    env = {**os.environ, "PUPPETEER_SKIP_DOWNLOAD": "1"}  # puppeteer-core never downloads, but be explicit
    proc = subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=WEB, env=env, capture_output=True, text=True)
    return None if proc.returncode == 0 else f"npm ci failed in tools/web: {proc.stderr[-1500:]}"


def run_page(url: str, timeout_s: float = 300) -> dict:
    """Open the page in headless Chromium through run_chromium.mjs; returns window.eqcResult or raises."""
    env = {**os.environ, "CHROMIUM_PATH": find_chromium() or "", "EQC_WEB_TIMEOUT_MS": str(int(timeout_s * 1000))}
    proc = subprocess.run(["node", str(WEB / "run_chromium.mjs"), url], env=env, capture_output=True, text=True,
                          timeout=timeout_s + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"run_chromium.mjs failed ({proc.returncode}): {proc.stderr[-3000:]}{proc.stdout[-2000:]}")
    return json.loads(proc.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifacts", nargs="+", type=pathlib.Path)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    ap.add_argument("--run", action="store_true", help="run each artifact x threads in headless Chromium, print JSON")
    args = ap.parse_args()
    server, base = serve({str(k): a for k, a in enumerate(args.artifacts)}, args.port)
    urls = [(a, t, page_url(base, str(k), args.prompt, args.max_new_tokens, t))
            for k, a in enumerate(args.artifacts) for t in args.threads]
    if not args.run:
        for artifact, _, url in urls:
            print(f"{artifact}: {url}")
        print("serving; Ctrl-C to stop")
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            return
    if reason := npm_ready():
        raise SystemExit(reason)
    for artifact, threads, url in urls:
        print(json.dumps({"artifact": str(artifact), **run_page(url)}), flush=True)
    server.shutdown()


if __name__ == "__main__":
    main()
