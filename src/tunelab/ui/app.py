"""`tunelab ui`: the web app over a runs folder (FastAPI; pages rendered by Jinja, a little JavaScript).

Reads the runs folder given by --out-dir (see tunelab.ui.status for the files of a run); writes only
what starting a run writes (tunelab.ui.launch). Pages: `/` runs, `/runs/NAME` one run (live curves,
status, evaluation progress, report, predictions), `/compare`, `/playground`, `/start`.

Security: every response is built from the runs folder or from this package; a run name in a URL
must be a plain folder name whose real path (symlinks resolved) lies directly in the runs folder, and
a file served must resolve inside it. Every request must carry the server's key (header
`Authorization: Bearer KEY`, or the cookie set by /login or by opening a page with `?token=KEY`),
compared in constant time: the --api-key, else a random token made when the server starts and printed
in its address (a process on the same machine is not a user; only the one who reads the terminal
is). Without --api-key (loopback only), requests must also name a loopback host (no DNS rebinding).
Form posts from another site are refused, and the cookie is SameSite=Strict, so no other site's page
can start, stop or load anything. All user text goes through Jinja's autoescape.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import math
import secrets
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse

from tunelab.config import ARMS
from tunelab.errors import TunelabError
from tunelab.report.html import fmt, pct_ci
from tunelab.runs import RunPaths
from tunelab.ui import launch, status
from tunelab.ui.playground import Playground
from tunelab.ui.predictions import OUTCOMES, PredictionFilter, browse_predictions
from tunelab.ui.tradeoff import scale_tradeoff_svg

COOKIE = "tunelab_ui_key"  # + a digest of the key: two UIs on one host (other ports) keep their own cookie
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")
STATIC = {"ui.js": "text/javascript; charset=utf-8", "ui.css": "text/css; charset=utf-8"}
CONSOLE_LINES_SHOWN = 200
MAX_LOG_CHUNK_BYTES = 4 * 2**20  # train/log.jsonl read per poll: a few thousand steps' lines
MAX_FORM_BYTES = 64 * 1024  # the login and start forms are a few hundred bytes; nothing larger is read
PAGE_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
               "frame-ancestors 'self'; form-action 'self'; base-uri 'none'")
REPORT_POLICY = "default-src 'none'; style-src 'unsafe-inline'; img-src data:; frame-ancestors 'self'"
START_KEYS = (("train.budget", "budget, e.g. 90s, 5m, 2h"), ("train.max_steps", "optimizer steps"),
              ("model.name", "base model"), ("method", "lora | dora | qlora | full"),
              ("eval.limit", "test examples evaluated"))


class NotFound(Exception):
    pass


class TooLarge(Exception):
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


# ---------------------------------------------------------------------------------------------- checks


def host_is_loopback(host_header: str) -> bool:
    """Whether a Host header names this machine by a loopback name (port and IPv6 brackets allowed)."""
    name = host_header.rsplit(":", 1)[0] if not host_header.endswith("]") else host_header
    return name.lower() in LOOPBACK_NAMES


def key_matches(given: str, api_key: str | None) -> bool:
    """Constant-time comparison; without a key set nothing matches (there is nothing to log in to)."""
    return api_key is not None and hmac.compare_digest(given.encode(), api_key.encode())


def cookie_name(key: str) -> str:
    return f"{COOKIE}_{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def presented_key(authorization: str, cookie: str) -> str:
    """The key a request carries: `Authorization: Bearer KEY`, else the login cookie."""
    return authorization[7:].strip() if authorization.lower().startswith("bearer ") else cookie


def refusal(method: str, path: str, headers: Mapping[str, str], cookie: str, key: str, any_host: bool) -> str | None:
    """Why the guard refuses a request, or None to let it through:
    'loopback-only' (not `any_host` (no --api-key) and a Host header that is not loopback: DNS rebinding),
    'login' (no or a wrong key from a browser asking for a page), 'api-key' (no or a wrong key otherwise),
    'cross-site' (a POST whose Origin is not this host, or a POST or /api/ request a browser marks as
    coming from another site or port: Sec-Fetch-Site). /login and the stylesheet it uses need no key."""
    if not any_host and not host_is_loopback(headers.get("host", "")):
        return "loopback-only"
    needs_key = path not in ("/login", "/static/ui.css")
    if needs_key and not key_matches(presented_key(headers.get("authorization", ""), cookie), key):
        return "login" if method == "GET" and "text/html" in headers.get("accept", "") else "api-key"
    if method == "POST":
        origin = headers.get("origin")
        if origin and urllib.parse.urlsplit(origin).netloc != headers.get("host"):
            return "cross-site"
    # a page on another port of this host is "same-site" and would carry the SameSite cookie
    if headers.get("sec-fetch-site") in ("cross-site", "same-site") and (method != "GET" or path.startswith("/api/")):
        return "cross-site"
    return None


def run_folder(out: Path, root: Path, name: str) -> Path:
    """The folder of run `name`, or NotFound: a plain name of a run (a recipe.yaml or a process started
    by the UI), resolving directly inside the runs folder `out` (real path `root`), none of whose
    shown files is a link out of it."""
    try:
        launch.check_run_name(name)
    except TunelabError:
        raise NotFound(name) from None
    folder = out / name
    if folder.exists() and folder.resolve().parent != root:
        raise NotFound(name)
    if not RunPaths(folder).recipe.is_file() and not (status.sidecar_dir(out, name) / "process.json").is_file():
        raise NotFound(name)
    # the files pages show or render: a symlink out of the runs folder makes the whole run unavailable
    if status.links_out(out, name) is not None:
        raise NotFound(name)
    return folder


def file_inside(root: Path, path: Path) -> Path:
    """`path` resolved, if it is a file inside `root`; else NotFound."""
    resolved = path.resolve()
    if not resolved.is_relative_to(root) or not resolved.is_file():
        raise NotFound(str(path))
    return resolved


async def read_form(request: Request) -> dict[str, list[str]]:
    """The posted form, read up to MAX_FORM_BYTES (TooLarge past it: refused by Content-Length before
    reading, or as soon as a body without one grows past it)."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_FORM_BYTES):
        raise TooLarge
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise TooLarge
    return parse_form(bytes(body))


def parse_form(body: bytes) -> dict[str, list[str]]:
    return urllib.parse.parse_qs(body.decode("utf-8", errors="replace"), keep_blank_values=True)


def read_log_records(log: Path, offset: int) -> tuple[list[dict[str, Any]], int, bool]:
    """The train/eval records of train/log.jsonl from byte `offset` on, whole lines only: (records, the
    offset to read from next, whether the log was truncated since, so reading started over)."""
    reset = False
    with log.open("rb") as f:
        size = f.seek(0, 2)
        if not 0 <= offset <= size:  # the log was truncated (a resumed run), or a bad offset: start over
            offset, reset = 0, True
        f.seek(offset)
        chunk = f.read(MAX_LOG_CHUNK_BYTES)  # the client asks again from the offset returned: a long log in pieces
    complete = chunk[: chunk.rfind(b"\n") + 1]
    if not complete and len(chunk) == MAX_LOG_CHUNK_BYTES:  # one line longer than a piece: not a log record
        return [], offset + len(chunk), reset
    records = []
    for line in complete.decode("utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):  # a line cut by a skipped piece, or nested too deeply
            continue
        if isinstance(record, dict) and record.get("kind") in ("train", "eval"):
            record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
            try:  # the page gets JSON: a value that has none (NaN, 1e999 deeper in) drops that record
                json.dumps(record, allow_nan=False)
            except (ValueError, RecursionError):
                continue
            records.append(record)
    return records, offset + len(complete), reset


def prediction_filter(arm: str, slice_name: str, outcome: str, disagree: str, offset: int) -> PredictionFilter:
    """The predictions page's query: an unknown outcome shows all, disagree is on only as '1', offset >= 0."""
    return PredictionFilter(arm, slice_name, outcome if outcome in OUTCOMES else "", disagree == "1", max(0, offset))


def playground_options(arms: str, max_new_tokens: int) -> tuple[list[str], int]:
    """The arms asked for (comma-separated, blanks dropped) and the tokens to generate, from 1 to 1024."""
    return [a for a in arms.split(",") if a], min(max(1, max_new_tokens), 1024)


def start_overrides(fields: dict[str, str]) -> list[str]:
    """key=value overrides from the start form: its named fields that are filled, then the free lines."""
    overrides = [f"{key}={fields[key]}" for key, _ in START_KEYS if fields.get(key)]
    return overrides + [line.strip() for line in fields.get("overrides", "").splitlines() if line.strip()]


def recipe_choices(out: Path) -> list[str]:
    return [str(p.relative_to(out)) for p in launch.recipe_files(out)]


def start_from_form(launcher: launch.Launcher, fields: dict[str, str]) -> None:
    """Start the run the form describes; TunelabError (shown on the form) for a recipe not listed or
    anything Launcher.start refuses."""
    out = launcher.out_dir
    recipe = fields.get("recipe", "")
    if recipe not in recipe_choices(out):
        raise TunelabError(f"recipe '{recipe}': choose one of the recipes listed")
    launcher.start(out / recipe, fields.get("name", ""), start_overrides(fields), trusted=fields.get("trust") == "yes")


async def playground_events(playground: Playground, folder: Path, prompt: str, system: str | None,
                            arms: list[str], max_new_tokens: int) -> AsyncIterator[str]:
    """The playground's answers as server-sent events. Generation runs in its own thread; this only
    relays its events. A client that goes away cancels this generator at its await, which tells the
    thread to stop (and free the models)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    cancel = threading.Event()

    def put(event: dict[str, Any] | None) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, event)
        except RuntimeError:  # the event loop is closed (the UI stopping): nobody listens
            cancel.set()

    def work() -> None:
        try:
            for event in playground.stream(folder, prompt, system, arms, max_new_tokens, cancel.is_set):
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


# ---------------------------------------------------------------------------------------------- the app


class UiState:
    """What the handlers share: the runs folder (and its real path), the templates, the playground, the
    key (the --api-key, else a token made for this server's lifetime) and the processes started."""

    def __init__(self, out_dir: str | Path, api_key: str | None) -> None:
        self.out = Path(out_dir)
        self.root = self.out.resolve()
        self.api_key = api_key
        self.key = api_key or secrets.token_urlsafe(32)
        self.cookie = cookie_name(self.key)
        self.templates = _templates()
        self.playground = Playground()
        self.launcher = launch.Launcher(self.out)

    def page(self, template: str, status_code: int = 200, **context: Any) -> HTMLResponse:
        html = self.templates.get_template(template).render(out_dir=str(self.out),
                                                            api_key_required=self.api_key is not None, **context)
        return HTMLResponse(html, status_code=status_code)

    def run_path(self, name: str) -> Path:
        return run_folder(self.out, self.root, name)

    def readable_names(self) -> list[str]:
        """Runs that may be offered for choosing (none that links out of the runs folder)."""
        return [n for n in status.run_names(self.out) if status.links_out(self.out, n) is None]

    def start_form(self, values: dict[str, str] | None = None, problem: str | None = None) -> HTMLResponse:
        return self.page("start.html.jinja", 400 if problem else 200, title="Start a run",
                         recipes=recipe_choices(self.out), keys=START_KEYS, values=values or {}, problem=problem)


def _ui(request: Request) -> UiState:
    return request.app.state.ui


Ui = Annotated[UiState, Depends(_ui)]
router = APIRouter()


def create_app(out_dir: str | Path, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="tunelab ui", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ui = UiState(out_dir, api_key)
    app.add_exception_handler(NotFound, _not_found)
    app.add_exception_handler(TooLarge, _too_large)
    app.add_exception_handler(TunelabError, _user_error)
    app.middleware("http")(_guard)
    app.include_router(router)
    return app


async def _not_found(request: Request, err: Exception) -> HTMLResponse:
    return _ui(request).page("error.html.jinja", 404, title="Not found",
                             message="No such run or file in this runs folder.")


async def _too_large(request: Request, err: Exception) -> Response:
    return Response(f"request body over {MAX_FORM_BYTES} bytes refused\n", status_code=413, media_type="text/plain")


async def _user_error(request: Request, err: Exception) -> HTMLResponse:
    return _ui(request).page("error.html.jinja", 400, title="Cannot do that", message=str(err))


def _log_in(ui: UiState, key: str, to: str) -> Response:
    response = RedirectResponse(to, status_code=303)
    response.set_cookie(ui.cookie, key, httponly=True, samesite="strict")
    return response


async def _guard(request: Request, call_next: Any) -> Any:
    ui = _ui(request)
    token = request.query_params.get("token")
    if request.method == "GET" and token is not None and key_matches(token, ui.key) and (
            ui.api_key is not None or host_is_loopback(request.headers.get("host", ""))):
        # the address `tunelab ui` printed: keep the key in a cookie, show the page without it in the URL
        rest = urllib.parse.urlencode([(k, v) for k, v in request.query_params.multi_items() if k != "token"])
        return _log_in(ui, token, request.url.path + (f"?{rest}" if rest else ""))
    refused = refusal(request.method, request.url.path, request.headers, request.cookies.get(ui.cookie, ""), ui.key,
                      any_host=ui.api_key is not None)
    if refused == "loopback-only":
        return Response("this UI answers on a loopback address only (start it with --api-key to serve others)\n",
                        status_code=421, media_type="text/plain")
    if refused == "login":
        return ui.page("login.html.jinja", 401, title="Key", failed=False)
    if refused == "api-key":
        return JSONResponse({"error": "missing or wrong API key"}, status_code=401)
    if refused == "cross-site":
        return Response("cross-site request refused\n", status_code=403, media_type="text/plain")
    response = await call_next(request)
    response.headers.setdefault("Content-Security-Policy", PAGE_POLICY)
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


# ---------------------------------------------------------------------------------------------- pages


@router.get("/static/{name}")
def static(name: str) -> Response:
    if name not in STATIC:
        raise NotFound(name)
    text = resources.files("tunelab.ui").joinpath("static", name).read_text(encoding="utf-8")
    return Response(text, media_type=STATIC[name])


@router.get("/login")
def login_page(ui: Ui) -> HTMLResponse:
    return ui.page("login.html.jinja", title="Key", failed=False)


@router.post("/login")
async def login(request: Request, ui: Ui) -> Response:
    given = (await read_form(request)).get("key", [""])[0]
    if not key_matches(given, ui.key):
        return ui.page("login.html.jinja", 401, title="Key", failed=True)
    return _log_in(ui, given, "/")


@router.get("/")
def runs_list(ui: Ui) -> HTMLResponse:
    states = [status.read_run_state(ui.out, name) for name in status.run_names(ui.out)]
    states.sort(key=lambda s: s.updated or 0, reverse=True)
    return ui.page("runs.html.jinja", title="Runs", runs=states, missing=not ui.out.is_dir())


@router.get("/runs/{name}")
def run_page(name: str, ui: Ui) -> HTMLResponse:
    folder = ui.run_path(name)
    state = status.read_run_state(ui.out, name)
    console = status.console_text(ui.out, name)
    return ui.page("run.html.jinja", title=name, run=state,
                   report=RunPaths(folder).metrics.is_file(), tradeoff=scale_tradeoff_svg(RunPaths(folder)),
                   console=None if console is None else status.console_lines(console)[-CONSOLE_LINES_SHOWN:],
                   command=" ".join(status.read_process(ui.out, name).command) if state.started_by_ui else None,
                   can_stop=ui.launcher.can_stop(name))


@router.get("/api/runs/{name}/state")
def run_state(name: str, ui: Ui, offset: int = 0) -> JSONResponse:
    """The run's state, and train/log.jsonl records from byte `offset` on (whole lines only)."""
    log = RunPaths(ui.run_path(name)).train_log
    state = status.read_run_state(ui.out, name)
    records, end, reset = read_log_records(file_inside(ui.root, log), offset) if log.is_file() else ([], offset, False)
    console = status.console_text(ui.out, name)
    return JSONResponse({"state": status.as_dict(state), "records": records, "offset": end, "reset": reset,
                         "console": None if console is None else status.console_lines(console)[-40:]})


@router.get("/runs/{name}/report")
def report(name: str, ui: Ui) -> HTMLResponse:
    """The run's report.html; while it is not written (evaluated, not reported), the same renderer."""
    paths = RunPaths(ui.run_path(name))
    if paths.report_html.exists():
        html = file_inside(ui.root, paths.report_html).read_text(encoding="utf-8", errors="replace")
    elif paths.metrics.is_file():
        from tunelab.report.html import build_report_context, render_html

        try:
            html = render_html(build_report_context(paths.root))
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as err:  # a run's files of odd shape
            raise TunelabError(f"{paths.root}: the report cannot be built from this run's files "
                               f"({type(err).__name__}: {str(err)[:200]})") from None
    else:
        raise NotFound(name)
    return HTMLResponse(html, headers={"Content-Security-Policy": REPORT_POLICY})


@router.get("/runs/{name}/predictions")
def predictions(name: str, ui: Ui, arm: str = "", slice: str = "", outcome: str = "", disagree: str = "",
                offset: int = 0) -> HTMLResponse:
    paths = RunPaths(ui.run_path(name))
    wanted = prediction_filter(arm, slice, outcome, disagree, offset)
    return ui.page("predictions.html.jinja", title=f"{name}: predictions", name=name,
                   found=browse_predictions(paths, wanted), wanted=wanted, outcomes=OUTCOMES)


@router.post("/runs/{name}/stop")
def stop(name: str, ui: Ui) -> Response:
    ui.run_path(name)
    ui.launcher.stop(name)
    return RedirectResponse(f"/runs/{urllib.parse.quote(name)}", status_code=303)


@router.get("/compare")
def compare(request: Request, ui: Ui, arm: str = "tuned") -> HTMLResponse:
    from tunelab.report.compare import compare_runs

    names = [n for n in ui.readable_names() if RunPaths(ui.out / n).metrics.is_file()]
    chosen = [n for n in request.query_params.getlist("run") if n in names]
    comparison, problem = None, None
    if len(chosen) >= 2:
        try:
            comparison = compare_runs([ui.run_path(n) for n in chosen], arm=arm)
        except TunelabError as err:
            problem = str(err)
    return ui.page("compare.html.jinja", title="Compare", names=names, chosen=chosen, arm=arm, arms=ARMS,
                   comparison=comparison, problem=problem)


@router.get("/playground")
def playground_page(ui: Ui, run: str = "") -> HTMLResponse:
    out = ui.out
    names = [n for n in ui.readable_names() if RunPaths(out / n).adapter.is_dir() or RunPaths(out / n).model.is_dir()]
    chosen = run if run in names else (names[0] if names else "")
    try:
        system = ui.playground.system_prompt(ui.run_path(chosen)) if chosen else None
    except TunelabError:  # the run's train split is unreadable: the page still works, without its prompt
        system = None
    return ui.page("playground.html.jinja", title="Playground", names=names, chosen=chosen, system=system or "",
                   arms=ARMS)


@router.get("/api/playground/stream")
async def playground_stream(ui: Ui, run: str, prompt: str, system: str = "", arms: str = "base,tuned",
                            max_new_tokens: int = 64) -> StreamingResponse:
    folder = ui.run_path(run)
    chosen, tokens = playground_options(arms, max_new_tokens)
    events = playground_events(ui.playground, folder, prompt, system or None, chosen, tokens)
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.get("/start")
def start_page(ui: Ui) -> HTMLResponse:
    return ui.start_form()


@router.post("/start")
async def start(request: Request, ui: Ui) -> Response:
    fields = {key: values[0].strip() for key, values in (await read_form(request)).items()}
    try:
        start_from_form(ui.launcher, fields)
    except TunelabError as err:
        return ui.start_form(fields, str(err))
    return RedirectResponse(f"/runs/{urllib.parse.quote(fields['name'])}", status_code=303)


def serve_ui(out_dir: str | Path, host: str = "127.0.0.1", port: int = 7860, api_key: str | None = None,
             announce: Any = print) -> None:
    """Serve the UI until interrupted. Any host but loopback needs an API key."""
    import uvicorn

    from tunelab.errors import ConfigError
    from tunelab.use.serve import bind_socket, is_loopback

    if not is_loopback(host) and not api_key:
        raise ConfigError(f"--host {host}: the UI starts runs and reads every run's data; on a non-loopback address "
                          "it needs --api-key (or TUNELAB_UI_API_KEY)")
    app = create_app(out_dir, api_key=api_key)
    sock = bind_socket(host, port)
    shown_host = f"[{host}]" if ":" in host else host
    # without --api-key the address carries this server's token: only who reads this terminal gets in
    token = "" if api_key else f"?token={app.state.ui.key}"
    announce(f"tunelab ui on http://{shown_host}:{sock.getsockname()[1]}/{token} over {out_dir}"
             f"{' (API key required)' if api_key else ''}; Ctrl-C stops the UI, not the runs it started")
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=3)
    uvicorn.Server(config).run(sockets=[sock])
