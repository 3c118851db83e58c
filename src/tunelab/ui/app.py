"""`tunelab ui`: the web app over a runs folder (FastAPI; pages rendered by Jinja, a little JavaScript).

Reads the runs folder given by --out-dir (see tunelab.ui.status for the files of a run); writes only
what starting a run writes (tunelab.ui.launch). Pages: `/` runs, `/runs/NAME` one run (live curves,
status, evaluation progress, report, predictions), `/compare`, `/playground`, `/start`.

Security: every response is built from the runs folder or from this package; a run name in a URL
must be a plain folder name whose real path (symlinks resolved) lies directly in the runs folder, and
a file served must resolve inside it. With an API key, every request must carry it (header
`Authorization: Bearer KEY`, or the cookie set by /login), compared in constant time. Without one
(loopback only), requests must name a loopback host (no DNS rebinding). Form posts from another site
are refused. All user text goes through Jinja's autoescape.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse

from tunelab.config import ARMS
from tunelab.errors import TunelabError
from tunelab.report.html import fmt, pct_ci
from tunelab.runs import RunPaths
from tunelab.ui import launch, status
from tunelab.ui.playground import Playground
from tunelab.ui.predictions import OUTCOMES, PredictionFilter, browse_predictions

COOKIE = "tunelab_ui_key"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")
STATIC = {"ui.js": "text/javascript; charset=utf-8", "ui.css": "text/css; charset=utf-8"}
CONSOLE_LINES_SHOWN = 200
PAGE_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
               "frame-ancestors 'self'; form-action 'self'; base-uri 'none'")
REPORT_POLICY = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'self'"
START_KEYS = (("train.budget", "budget, e.g. 90s, 5m, 2h"), ("train.max_steps", "optimizer steps"),
              ("model.name", "base model"), ("method", "lora | dora | qlora | full"),
              ("eval.limit", "test examples evaluated"))


class NotFound(Exception):
    pass


def _templates() -> Any:
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("tunelab", "ui/templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = fmt
    env.filters["pct_ci"] = lambda value, ci=None: pct_ci(value, ci)
    env.filters["duration"] = _duration
    env.filters["timestamp"] = lambda epoch_s: time.strftime("%Y-%m-%d %H:%M", time.localtime(epoch_s))
    return env


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _host_is_loopback(host_header: str) -> bool:
    name = host_header.rsplit(":", 1)[0] if not host_header.endswith("]") else host_header
    return name.lower() in LOOPBACK_NAMES


def create_app(out_dir: str | Path, api_key: str | None = None) -> FastAPI:
    out = Path(out_dir)
    root = out.resolve()
    templates = _templates()
    playground = Playground()
    app = FastAPI(title="tunelab ui", docs_url=None, redoc_url=None, openapi_url=None)

    def page(template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        html = templates.get_template(template).render(out_dir=str(out), api_key_required=api_key is not None, **context)
        return HTMLResponse(html, status_code=status_code)

    def run_path(name: str) -> Path:
        """The folder of run `name`, or NotFound: a plain name, resolving directly inside the runs folder."""
        try:
            launch.check_run_name(name)
        except TunelabError:
            raise NotFound(name) from None
        folder = out / name
        if folder.exists() and folder.resolve().parent != root:
            raise NotFound(name)
        if not (folder / "recipe.yaml").is_file() and not (status.sidecar_dir(out, name) / "process.json").is_file():
            raise NotFound(name)
        # the files pages show or render: a symlink out of the runs folder makes the whole run unavailable
        paths, sidecar = RunPaths(folder), status.sidecar_dir(out, name)
        shown = (paths.recipe, paths.manifest, paths.data / "stats.json", paths.data / "issues.jsonl",
                 paths.data / "test.jsonl", paths.data / "train.jsonl", paths.train_log, paths.root / "train" / "summary.json",
                 paths.root / "train" / "plan.json", paths.root / "stages.json", paths.metrics, paths.predictions,
                 paths.report_html, sidecar / "process.json", sidecar / "console.log")
        if any(path.exists() and not path.resolve().is_relative_to(root) for path in shown):
            raise NotFound(name)
        return folder

    def inside(path: Path) -> Path:
        resolved = path.resolve()
        if not resolved.is_relative_to(root) or not resolved.is_file():
            raise NotFound(str(path))
        return resolved

    @app.exception_handler(NotFound)
    async def _not_found(request: Request, err: NotFound) -> HTMLResponse:
        return page("error.html.jinja", 404, title="Not found", message="No such run or file in this runs folder.")

    @app.exception_handler(TunelabError)
    async def _user_error(request: Request, err: TunelabError) -> HTMLResponse:
        return page("error.html.jinja", 400, title="Cannot do that", message=str(err))

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Any:
        if api_key is None and not _host_is_loopback(request.headers.get("host", "")):
            return Response("this UI answers on a loopback address only (start it with --api-key to serve others)\n",
                            status_code=421, media_type="text/plain")
        if api_key is not None and request.url.path not in ("/login", "/static/ui.css"):
            header = request.headers.get("authorization", "")
            given = header[7:].strip() if header.lower().startswith("bearer ") else request.cookies.get(COOKIE, "")
            if not hmac.compare_digest(given.encode(), api_key.encode()):
                if request.method == "GET" and "text/html" in request.headers.get("accept", ""):
                    return page("login.html.jinja", 401, title="API key", failed=False)
                return JSONResponse({"error": "missing or wrong API key"}, status_code=401)
        if request.method == "POST":
            origin = request.headers.get("origin")
            if origin and urllib.parse.urlsplit(origin).netloc != request.headers.get("host"):
                return Response("cross-site form post refused\n", status_code=403, media_type="text/plain")
        response = await call_next(request)
        response.headers.setdefault("Content-Security-Policy", PAGE_POLICY)
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    async def form(request: Request) -> dict[str, list[str]]:
        body = (await request.body()).decode("utf-8", errors="replace")
        return urllib.parse.parse_qs(body, keep_blank_values=True)

    # ------------------------------------------------------------------------------------------ pages

    @app.get("/static/{name}")
    def static(name: str) -> Response:
        if name not in STATIC:
            raise NotFound(name)
        text = resources.files("tunelab.ui").joinpath("static", name).read_text(encoding="utf-8")
        return Response(text, media_type=STATIC[name])

    @app.get("/login")
    def login_page() -> HTMLResponse:
        return page("login.html.jinja", title="API key", failed=False)

    @app.post("/login")
    async def login(request: Request) -> Response:
        given = (await form(request)).get("key", [""])[0]
        if api_key is None or not hmac.compare_digest(given.encode(), api_key.encode()):
            return page("login.html.jinja", 401, title="API key", failed=api_key is not None)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, api_key, httponly=True, samesite="strict")
        return response

    @app.get("/")
    def runs_list() -> HTMLResponse:
        states = [status.read_run_state(out, name) for name in status.run_names(out)]
        states.sort(key=lambda s: s.updated or 0, reverse=True)
        return page("runs.html.jinja", title="Runs", runs=states, missing=not out.is_dir())

    @app.get("/runs/{name}")
    def run_page(name: str) -> HTMLResponse:
        folder = run_path(name)
        state = status.read_run_state(out, name)
        console = status.console_text(out, name)
        return page("run.html.jinja", title=name, run=state,
                    report=(folder / "eval" / "metrics.json").is_file(),
                    console=None if console is None else status.console_lines(console)[-CONSOLE_LINES_SHOWN:],
                    command=" ".join(status.read_process(out, name).command) if state.started_by_ui else None)

    @app.get("/api/runs/{name}/state")
    def run_state(name: str, offset: int = 0) -> JSONResponse:
        """The run's state, and train/log.jsonl records from byte `offset` on (whole lines only)."""
        folder = run_path(name)
        state = status.read_run_state(out, name)
        records, reset, end = [], False, offset
        log = RunPaths(folder).train_log
        if log.is_file():
            resolved = inside(log)
            with resolved.open("rb") as f:
                size = f.seek(0, 2)
                if offset > size:  # the log was truncated (a resumed run): start over
                    offset, reset = 0, True
                f.seek(offset)
                chunk = f.read()
            complete = chunk[: chunk.rfind(b"\n") + 1]
            end = offset + len(complete)
            for line in complete.decode("utf-8", errors="replace").splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and record.get("kind") in ("train", "eval"):
                    records.append(record)
        console = status.console_text(out, name)
        return JSONResponse({"state": status.as_dict(state), "records": records, "offset": end, "reset": reset,
                             "console": None if console is None else status.console_lines(console)[-40:]})

    @app.get("/runs/{name}/report")
    def report(name: str) -> HTMLResponse:
        """The run's report.html; while it is not written (evaluated, not reported), the same renderer."""
        paths = RunPaths(run_path(name))
        if paths.report_html.exists():
            html = inside(paths.report_html).read_text(encoding="utf-8", errors="replace")
        elif paths.metrics.is_file():
            from tunelab.report.html import build_report_context, render_html

            html = render_html(build_report_context(paths.root))
        else:
            raise NotFound(name)
        return HTMLResponse(html, headers={"Content-Security-Policy": REPORT_POLICY})

    @app.get("/runs/{name}/predictions")
    def predictions(name: str, arm: str = "", slice: str = "", outcome: str = "", disagree: str = "",
                          offset: int = 0) -> HTMLResponse:
        paths = RunPaths(run_path(name))
        wanted = PredictionFilter(arm, slice, outcome if outcome in OUTCOMES else "", disagree == "1", max(0, offset))
        found = browse_predictions(paths, wanted)
        return page("predictions.html.jinja", title=f"{name}: predictions", name=name, found=found, wanted=wanted,
                    outcomes=OUTCOMES)

    @app.post("/runs/{name}/stop")
    def stop(name: str) -> Response:
        run_path(name)
        launch.stop_run(out, name)
        return RedirectResponse(f"/runs/{urllib.parse.quote(name)}", status_code=303)

    @app.get("/compare")
    def compare(request: Request, arm: str = "tuned") -> HTMLResponse:
        from tunelab.report.compare import compare_runs

        names = [n for n in status.run_names(out) if (out / n / "eval" / "metrics.json").is_file()]
        chosen = [n for n in request.query_params.getlist("run") if n in names]
        comparison, problem = None, None
        if len(chosen) >= 2:
            try:
                comparison = compare_runs([run_path(n) for n in chosen], arm=arm)
            except TunelabError as err:
                problem = str(err)
        return page("compare.html.jinja", title="Compare", names=names, chosen=chosen, arm=arm, arms=ARMS,
                    comparison=comparison, problem=problem)

    @app.get("/playground")
    def playground_page(run: str = "") -> HTMLResponse:
        names = [n for n in status.run_names(out) if (out / n / "adapter").is_dir() or (out / n / "model").is_dir()]
        chosen = run if run in names else (names[0] if names else "")
        system = playground.system_prompt(run_path(chosen)) if chosen else None
        return page("playground.html.jinja", title="Playground", names=names, chosen=chosen, system=system or "",
                    arms=ARMS)

    @app.get("/api/playground/stream")
    async def playground_stream(run: str, prompt: str, system: str = "", arms: str = "base,tuned",
                                max_new_tokens: int = 64) -> StreamingResponse:
        folder = run_path(run)
        chosen = [a for a in arms.split(",") if a]
        tokens = min(max(1, max_new_tokens), 1024)

        async def events() -> AsyncIterator[str]:
            # Generation runs in its own thread; this generator only relays its events. A client that goes
            # away cancels this generator at its await, which tells the thread to stop (and free the models).
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
            cancel = threading.Event()

            def work() -> None:
                def put(event: dict[str, Any] | None) -> None:
                    try:
                        loop.call_soon_threadsafe(queue.put_nowait, event)
                    except RuntimeError:  # the event loop is closed (the UI stopping): nobody listens
                        cancel.set()

                try:
                    for event in playground.stream(folder, prompt, system or None, chosen, tokens, cancel.is_set):
                        put(event)
                except TunelabError as err:
                    put({"event": "failure", "message": str(err)})
                except Exception as err:  # shown to the user; the UI keeps serving
                    put({"event": "failure", "message": f"generation failed: {type(err).__name__}: {err}"})
                finally:
                    put(None)

            threading.Thread(target=work, name="tunelab-ui-playground", daemon=True).start()
            try:
                while (event := await queue.get()) is not None:
                    name = event.pop("event")
                    yield f"event: {name}\ndata: {json.dumps(event)}\n\n"
            finally:
                cancel.set()

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/start")
    def start_page() -> HTMLResponse:
        return start_form()

    def start_form(values: dict[str, str] | None = None, problem: str | None = None) -> HTMLResponse:
        recipes = [str(p.relative_to(out)) for p in launch.recipe_files(out)]
        return page("start.html.jinja", 400 if problem else 200, title="Start a run", recipes=recipes,
                    keys=START_KEYS, values=values or {}, problem=problem)

    @app.post("/start")
    async def start(request: Request) -> Response:
        fields = {key: values[0].strip() for key, values in (await form(request)).items()}
        overrides = [f"{key}={fields[key]}" for key, _ in START_KEYS if fields.get(key)]
        overrides += [line.strip() for line in fields.get("overrides", "").splitlines() if line.strip()]
        recipe = fields.get("recipe", "")
        try:
            if recipe not in [str(p.relative_to(out)) for p in launch.recipe_files(out)]:
                raise TunelabError(f"recipe '{recipe}': choose one of the recipes listed")
            launch.start_run(out, out / recipe, fields.get("name", ""), overrides)
        except TunelabError as err:
            return start_form(fields, str(err))
        return RedirectResponse(f"/runs/{urllib.parse.quote(fields['name'])}", status_code=303)

    return app


def serve_ui(out_dir: str | Path, host: str = "127.0.0.1", port: int = 7860, api_key: str | None = None,
             announce: Any = print) -> None:
    """Serve the UI until interrupted. Any host but loopback needs an API key."""
    import uvicorn

    from tunelab.errors import ConfigError
    from tunelab.serve import bind_socket, is_loopback

    if not is_loopback(host) and not api_key:
        raise ConfigError(f"--host {host}: the UI starts runs and reads every run's data; on a non-loopback address "
                          "it needs --api-key (or TUNELAB_UI_API_KEY)")
    app = create_app(out_dir, api_key=api_key)
    sock = bind_socket(host, port)
    shown_host = f"[{host}]" if ":" in host else host
    announce(f"tunelab ui on http://{shown_host}:{sock.getsockname()[1]}/ over {out_dir}"
             f"{' (API key required)' if api_key else ''}; Ctrl-C stops the UI, not the runs it started")
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=3)
    uvicorn.Server(config).run(sockets=[sock])
