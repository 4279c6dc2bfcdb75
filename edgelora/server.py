"""``edgelora serve``: an OpenAI-compatible HTTP server over the batching engine.

Routes (every ``/v1`` route needs ``Authorization: Bearer KEY`` when the server has an API key;
``/`` and ``/health`` hold no data and stay open, so a browser can load the chat page and a
supervisor can probe the process):

* ``POST /v1/chat/completions``, ``POST /v1/completions``: OpenAI's API, streamed as server-sent
  events ending in ``data: [DONE]`` with ``"stream": true`` (:mod:`edgelora.openai_api`).
  ``model`` names the base or a resident adapter; ``adapters`` (or llama-server's ``lora`` list)
  mixes adapters per request. Requests join the engine's running batch, each with its own adapter.
* ``GET /v1/models``: the base and every resident adapter.
* ``GET /v1/adapters``, ``POST /v1/adapters {"name", "path"}`` (load a PEFT adapter folder by path,
  checked against the base and the memory plan exactly as ``--adapter``), ``DELETE
  /v1/adapters/NAME``. A request in flight keeps the adapter it started with.
* ``GET /health``; ``GET /``: the chat page (one static file, ``edgelora/static/chat.html``).

Limits: the body size (413), the prompt and ``max_tokens`` within the context (400), the engine's
queue (429 with ``Retry-After``). A client that disconnects cancels its request. SIGINT/SIGTERM
stop accepting, let running requests finish, then close the engine.

starlette and uvicorn are the optional extra ``edgelora[serve]``, imported only here.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import os
import socket
import threading
import time
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

from edgelora.errors import EdgeLoraError, UsageError
from edgelora.openai_api import (APIError, Job, error_body, model_list, parse_request, response, stream_chunk,
                                 usage_chunk)

DEFAULT_MAX_BODY_BYTES = 2 * 1024 * 1024


def _require_serve_extra():
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise UsageError(f"edgelora serve needs the web server packages ({e.name} is missing): "
                         f"pip install 'edgelora[serve]'") from None


def _chat_page() -> bytes:
    return (resources.files("edgelora") / "static" / "chat.html").read_bytes()


# --- the engine's requests, read from the event loop ----------------------------------------------------

async def _chunks(req):
    """The :class:`GenerationChunk` items of an engine request as they come (``async for`` over the
    request, which never blocks the event loop); leaving early (a disconnected client) cancels it."""
    try:
        async for chunk in req:
            yield chunk
    finally:
        req.cancel()


def default_prompt_cache_bytes(model, max_batch: int) -> int:
    """The server's prompt cache by default: one context's keys and values, within a deploy folder's
    plan beside ``max_batch`` sequences (0, none, where the plan has no room)."""
    from edgelora.runtime.prompt_cache import planned_room
    room = planned_room(model, max_batch)
    return model.kv_cache_bytes if room is None else min(room, model.kv_cache_bytes)


async def _watch_disconnect(receive, req) -> None:
    """Cancel ``req`` when the client goes away (the body is read already: the next message is
    ``http.disconnect``)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            req.cancel()
            return


class _Adapters:
    """The resident adapters and where each came from (``GET /v1/models`` shows the folder)."""

    def __init__(self, model):
        self.model = model
        self.paths: dict[str, str] = {}
        self.lock = threading.Lock()  # one load or unload at a time

    def listing(self) -> list:
        return [(n, self.paths.get(n, "")) for n in self.model.adapters.names]

    def load(self, name: str, path: str) -> dict:
        with self.lock:
            res = self.model.adapters.load(name, path)
            self.paths[name] = str(path)
        return {"id": name, "object": "adapter", "path": str(path), "bytes": res.nbytes,
                "load_ms": round(res.load_seconds * 1000, 3)}

    def unload(self, name: str) -> None:
        with self.lock:
            self.model.adapters.unload(name)
            self.paths.pop(name, None)


def _status_of(e: EdgeLoraError) -> int:
    """The HTTP status of an edgelora error: an API error's own; any other is the request's fault
    (a bad option, an adapter folder that is missing, corrupt, made for another base or over the plan)."""
    return e.status if isinstance(e, APIError) else 400


def create_app(model, *, engine=None, model_name: str | None = None, api_key: str | None = None,
               max_batch: int = 8, max_queue: int = 64, prompt_cache_bytes: int | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, adapter_paths: Mapping[str, str] | None = None,
               allow_adapter_loading: bool = True):
    """The server as a Starlette app for a loaded ``model`` (run it with uvicorn, or
    :func:`serve`). ``engine``: an :class:`edgelora.runtime.engine.Engine` to use (default: one
    made here with ``max_batch``, ``max_queue`` and ``prompt_cache_bytes``, closed when the app
    shuts down; the prompt cache reuses only what keeps every answer exactly ``model.generate``'s,
    by default one context's keys and values: :func:`default_prompt_cache_bytes`). ``model_name``:
    the id of the base model in the API (default: the bundle's folder name). ``api_key``: the
    bearer token every ``/v1`` route needs (None: none).
    ``adapter_paths``: ``{name: folder}`` of adapters already resident, shown by ``/v1/models``."""
    _require_serve_extra()
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    from edgelora.errors import EngineClosed, QueueFull
    from edgelora.runtime.engine import Engine

    if not isinstance(max_body_bytes, int) or max_body_bytes < 1:
        raise UsageError(f"max_body_bytes must be a positive integer, got {max_body_bytes!r}")
    owned = engine is None
    if owned:
        if prompt_cache_bytes is None:
            prompt_cache_bytes = default_prompt_cache_bytes(model, max_batch)
        engine = Engine(model, max_batch=max_batch, max_queue=max_queue, prompt_cache_bytes=prompt_cache_bytes)
    base_name = model_name or Path(str(model.path)).name
    adapters = _Adapters(model)
    adapters.paths.update({k: str(v) for k, v in (adapter_paths or {}).items()})
    created = int(time.time())

    def error(e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    async def read_json(request: Request) -> Any:
        """The body as JSON, refused past ``max_body_bytes`` (413) whether or not Content-Length says so."""
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > max_body_bytes:
            raise APIError(413, f"the request body is {int(length)} bytes; this server takes at most {max_body_bytes}",
                           code="request_too_large")
        data = bytearray()
        async for part in request.stream():
            data += part
            if len(data) > max_body_bytes:
                raise APIError(413, f"the request body is over this server's limit of {max_body_bytes} bytes",
                               code="request_too_large")
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None

    def submit(job: Job):
        try:
            return engine.submit(job.prompt_ids, **job.submit_kwargs())
        except QueueFull as e:
            wait = max(1, math.ceil(getattr(e, "retry_after", 1) or 1))
            raise APIError(429, f"the server is busy ({e}); retry after {wait} s", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": str(wait)}) from None
        except EngineClosed as e:
            raise APIError(503, f"the server is shutting down ({e})", type="server_error",
                           code="shutting_down") from None
        except EdgeLoraError as e:
            gone = _unloaded(job)
            if gone:  # unloaded between the request's check and its submission
                raise APIError(404, f"the adapter {gone!r} was unloaded", param="model",
                               code="model_not_found") from None
            raise APIError(_status_of(e), str(e)) from None

    def _unloaded(job: Job) -> str | None:
        wanted = [job.adapter] if isinstance(job.adapter, str) else list(job.adapter or {})
        return next((n for n in wanted if n not in model.adapters), None)

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async def streamed(job: Job, req):
        """The SSE events of a streamed request; the request is cancelled if the client leaves."""
        tok = model.tokenizer
        first, offset, prompt_tokens, generated = True, 0, len(job.prompt_ids), 0
        if job.kind == "chat":
            yield sse(stream_chunk(job, "", None, [], tok, first=True))
            first = False
        try:
            async for chunk in _chunks(req):
                generated = chunk.stats.generated_tokens
                items = [chunk.logprobs] if chunk.logprobs is not None and job.logprobs is not None else []
                if chunk.text or items or chunk.finish_reason is not None:
                    text = chunk.text if chunk.text or items else None  # a last chunk without text: empty delta
                    yield sse(stream_chunk(job, text, chunk.finish_reason, items, tok, first=first, offset=offset))
                    offset += len(chunk.text)
        except EdgeLoraError as e:
            yield sse(error_body(str(e), "invalid_request_error" if _status_of(e) < 500 else "server_error"))
        except Exception as e:  # noqa: BLE001 (the stream has begun: the error goes in it)
            yield sse(error_body(f"generation failed: {type(e).__name__}: {e}", "server_error"))
        else:
            if job.include_usage:
                yield sse(usage_chunk(job, prompt_tokens, generated))
        yield "data: [DONE]\n\n"

    async def collected(job: Job, req, receive) -> dict:
        watcher = asyncio.ensure_future(_watch_disconnect(receive, req))
        pieces, items, reason, generated = [], [], None, 0
        try:
            async for chunk in _chunks(req):
                pieces.append(chunk.text)
                if chunk.logprobs is not None:
                    items.append(chunk.logprobs)
                reason, generated = chunk.finish_reason or reason, chunk.stats.generated_tokens
        finally:
            watcher.cancel()
        return response(job, "".join(pieces), reason, len(job.prompt_ids), generated, items, model.tokenizer)

    async def complete(request: Request, kind: str):
        body = await read_json(request)
        job = parse_request(kind, body, model, base_name)
        req = submit(job)
        if job.stream:
            return StreamingResponse(streamed(job, req), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            return JSONResponse(await collected(job, req, request.receive))
        except EdgeLoraError as e:
            raise APIError(_status_of(e), str(e)) from None

    async def chat_completions(request):
        return await complete(request, "chat")

    async def completions(request):
        return await complete(request, "completion")

    async def models(request):
        return JSONResponse(model_list(base_name, adapters.listing(), created))

    async def one_model(request):
        wanted = request.path_params["name"]
        for entry in model_list(base_name, adapters.listing(), created)["data"]:
            if entry["id"] == wanted:
                return JSONResponse(entry)
        raise APIError(404, f"the model {wanted!r} does not exist", param="model", code="model_not_found")

    async def list_adapters(request):
        data = [{"id": n, "object": "adapter", "path": p, "bytes": model.adapters[n].nbytes}
                for n, p in adapters.listing() if n in model.adapters]
        return JSONResponse({"object": "list", "data": data})

    async def load_adapter(request):
        if not allow_adapter_loading:
            raise APIError(403, "this server does not load adapters at run time (started with "
                                "--no-adapter-loading)", code="forbidden")
        body = await read_json(request)
        if not isinstance(body, dict) or not isinstance(body.get("name"), str) or not isinstance(body.get("path"), str):
            raise APIError(400, 'the body must be {"name": NAME, "path": ADAPTER_FOLDER}')
        name, path = body["name"], body["path"]
        if name in model.adapters:
            raise APIError(409, f"an adapter named {name!r} is loaded already; DELETE /v1/adapters/{name} first",
                           param="name", code="adapter_exists")
        if name in (base_name, *("base",)):
            raise APIError(400, f"{name!r} names the base model; choose another adapter name", param="name")
        try:
            info = await asyncio.to_thread(adapters.load, name, path)
        except EdgeLoraError as e:
            raise APIError(_status_of(e), f"adapter {name!r} not loaded: {e}", param="path",
                           code="adapter_refused") from None
        return JSONResponse(info)

    async def unload_adapter(request):
        if not allow_adapter_loading:
            raise APIError(403, "this server does not unload adapters at run time (started with "
                                "--no-adapter-loading)", code="forbidden")
        name = request.path_params["name"]
        if name not in model.adapters:
            raise APIError(404, f"adapter {name!r} is not loaded (loaded: {', '.join(model.adapters.names) or 'none'})",
                           code="adapter_not_found")
        await asyncio.to_thread(adapters.unload, name)
        return JSONResponse({"id": name, "object": "adapter", "deleted": True})

    async def health(request):
        stats = {}
        try:
            stats = engine.stats()
            stats = stats if isinstance(stats, dict) else getattr(stats, "to_dict", lambda: {})()
        except Exception:  # noqa: BLE001 (health must answer)
            pass
        return JSONResponse({"status": "ok", "model": base_name, "adapters": model.adapters.names,
                             "engine": json.loads(json.dumps(stats, default=str))})

    async def page(request):
        return Response(_chat_page(), media_type="text/html; charset=utf-8",
                        headers={"Cache-Control": "no-cache", "Content-Security-Policy":
                                 "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'"})

    async def on_api_error(request, exc: APIError):
        return error(exc)

    async def on_http_error(request, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(error_body(f"{request.method} {request.url.path}: {exc.detail}", "invalid_request_error",
                                       None, code), status_code=exc.status_code)

    async def on_disconnect(request, exc):
        return Response(status_code=499)

    async def on_other(request, exc: Exception):
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"),
                            status_code=500)

    @asynccontextmanager
    async def lifespan(app):
        yield
        if owned:  # drain: requests still queued or running finish first
            await asyncio.to_thread(engine.close, True)

    routes = [
        Route("/", page, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{name:path}", one_model, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/adapters", list_adapters, methods=["GET"]),
        Route("/v1/adapters", load_adapter, methods=["POST"]),
        Route("/v1/adapters/{name}", unload_adapter, methods=["DELETE"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={APIError: on_api_error, HTTPException: on_http_error,
                                        ClientDisconnect: on_disconnect, Exception: on_other})
    app.state.engine, app.state.model, app.state.model_name = engine, model, base_name
    return _BearerAuth(app, api_key) if api_key else app


class _BearerAuth:
    """ASGI middleware: every ``/v1`` request needs ``Authorization: Bearer KEY`` (401 otherwise,
    OpenAI-shaped); ``/`` and ``/health`` stay open. Compared in constant time."""

    OPEN = ("/", "/health")

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()
        self.state = app.state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in self.OPEN:
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            return await self.app(scope, receive, send)
        body = json.dumps(error_body("a valid API key is needed: send Authorization: Bearer KEY",
                                     "invalid_request_error", None, "invalid_api_key")).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})


# --- running it ----------------------------------------------------------------------------------------

class Server:
    """A running server (``serve(..., background=True)``): its ``url``, and ``close()`` to stop it
    (running requests finish first). Also a context manager."""

    def __init__(self, uvicorn_server: Any, sock: socket.socket, thread: threading.Thread | None):
        self._server, self._sock, self._thread = uvicorn_server, sock, thread
        host, port = sock.getsockname()[:2]
        self.host, self.port = host, port
        self.url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"

    @property
    def app(self):
        return self._server.config.app

    def close(self, timeout: float | None = 60.0) -> None:
        """Stop accepting, let running requests finish, close the engine."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Server(url={self.url!r})"


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket (``port=0``: a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, reuse_port=False, backlog=2048)
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def _serve_until_stopped(server, sock) -> None:
    """Run uvicorn in this thread until SIGINT or SIGTERM; running requests finish first (uvicorn's
    graceful shutdown, then the engine drains), and the signal ends the call, not the program."""
    import signal

    def stop(signum, frame):
        raise KeyboardInterrupt
    main = threading.current_thread() is threading.main_thread()
    before = signal.signal(signal.SIGTERM, stop) if main else None  # uvicorn raises it again once stopped
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        if main:
            signal.signal(signal.SIGTERM, before)


def serve(model: Any, *, adapters: Mapping[str, str | os.PathLike] | None = None, host: str = "127.0.0.1",
          port: int = 8080, threads: int | None = None, max_context: int | None = None, max_batch: int = 8,
          max_queue: int = 64, api_key: str | None = None, model_name: str | None = None,
          max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, prompt_cache_bytes: int | None = None,
          allow_adapter_loading: bool = True, log_level: str | None = None, background: bool = False,
          engine: Any = None, **load_options: Any) -> Server:
    """Serve a model over the OpenAI API (module docstring; README, *Serve*).

    ``model``: a loaded :class:`~edgelora.runtime.model.Model`, or a bundle / deploy folder to load
    (with ``threads``, ``max_context`` and ``load_options`` as :func:`edgelora.load`).
    ``adapters``: ``{name: folder}`` of PEFT adapters to make resident first. ``host``/``port``:
    where to listen (127.0.0.1 by default; ``port=0`` picks a free port). ``api_key``: the bearer
    token every ``/v1`` route needs (default: the ``EDGELORA_API_KEY`` environment variable; none
    when unset). ``max_batch``: sequences decoded together; ``max_queue``: requests waiting beyond
    those (more are refused with 429). ``max_body_bytes``: the largest request body (413 beyond).
    ``engine``: an :class:`~edgelora.runtime.engine.Engine` of ``model`` to share (default: one made
    for the server, closed with it). ``log_level``: uvicorn's (default: ``info``, a line per request,
    in the foreground; ``warning`` in the background).

    ``background=False`` (the command line) serves until SIGINT/SIGTERM, then lets running requests
    finish and returns the stopped :class:`Server`; ``background=True`` serves from a thread and
    returns the running :class:`Server` at once (``server.url``, ``server.close()``).
    """
    _require_serve_extra()
    import uvicorn

    if isinstance(model, (str, os.PathLike)):
        import edgelora
        model = edgelora.load(model, threads=threads, max_context=max_context, **load_options)
    elif threads is not None or max_context is not None or load_options:
        raise UsageError("threads, max_context and load options apply when serve() loads the model; "
                         "pass them to edgelora.load instead")
    paths = {}
    for name, path in (adapters or {}).items():
        if name not in model.adapters.names:
            model.adapters.load(name, path)
        paths[name] = str(path)
    if model.deployment is not None:
        paths.update({k: str(v) for k, v in model.deployment.adapters.items() if k not in paths})
    api_key = api_key if api_key is not None else (os.environ.get("EDGELORA_API_KEY") or None)
    app = create_app(model, engine=engine, model_name=model_name, api_key=api_key, max_batch=max_batch,
                     max_queue=max_queue,
                     prompt_cache_bytes=prompt_cache_bytes, max_body_bytes=max_body_bytes, adapter_paths=paths,
                     allow_adapter_loading=allow_adapter_loading)
    sock = _listen(host, port)
    log_level = log_level or ("warning" if background else "info")
    config = uvicorn.Config(app, log_level=log_level, lifespan="on", timeout_keep_alive=5)
    server = uvicorn.Server(config)
    if not background:
        handle = Server(server, sock, None)
        if log_level in ("info", "debug", "trace"):
            print(f"edgelora: serving {app.state.model_name} on {handle.url} (chat page: {handle.url}/ ; "
                  f"OpenAI API: {handle.url}/v1{'; API key required' if api_key else ''})", flush=True)
        _serve_until_stopped(server, sock)
        return handle
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="edgelora-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise EdgeLoraError(f"the server on {host}:{port} did not start")
        time.sleep(0.01)
    return Server(server, sock, thread)
