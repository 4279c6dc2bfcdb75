"""The OpenAI API's request and response shapes, as pure functions (``edgelora serve``).

A request body (the JSON of ``POST /v1/chat/completions`` or ``/v1/completions``) becomes a
:class:`Job`: the prompt's token ids, the adapter selection, the sampling options and the limits
checked. Generated :class:`~edgelora.runtime.model.GenerationChunk` items become the response
objects the ``openai`` client reads: ``chat.completion`` / ``text_completion`` and their streamed
chunks, ``usage``, ``finish_reason`` and ``logprobs`` in each API's own shape. Every refused
request is an :class:`APIError` with the HTTP status and OpenAI's error body
``{"error": {"message", "type", "param", "code"}}``.

Nothing here imports the web server: :mod:`edgelora.server` routes requests through these.
"""

from __future__ import annotations

import math
import numbers
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from edgelora.errors import EdgeLoraError, UsageError

#: edgelora's finish reasons -> OpenAI's (the cache filling up is a length limit too)
FINISH_REASONS = {"stop": "stop", "eos": "stop", "length": "length", "context": "length"}
#: names a request may use for the plain base model, besides the served base model's own name
BASE_ALIASES = ("base",)
MAX_TOP_LOGPROBS = 20  # as OpenAI (chat) and vLLM (both APIs)
MAX_STOPS = 16


class APIError(UsageError):
    """A request the server refuses: its HTTP ``status`` and OpenAI's error fields."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _param_of(message: str, fields) -> str | None:
    """The request field an edgelora message names first (``"top_p must be ..."`` -> ``top_p``)."""
    head = message.split(" ", 1)[0].strip("'\":")
    return head if head in fields else None


@dataclass
class Job:
    """One parsed completion request, ready for ``Engine.submit``."""

    kind: str  # "chat" or "completion"
    model: str  # the ``model`` the response names
    prompt_ids: list  # [P] token ids
    adapter: Any  # None (base), a resident adapter's name, or {name: weight}
    max_tokens: int
    stop: list
    sampling: dict  # temperature, top_p, top_k, min_p, repetition_penalty, seed
    logprobs: int | None  # top alternatives per token (0: only the chosen token's), None: no logprobs
    stream: bool = False
    include_usage: bool = False
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    def submit_kwargs(self) -> dict:
        """Keyword arguments of ``Engine.submit`` (after the prompt ids)."""
        return {"adapter": self.adapter, "max_new_tokens": self.max_tokens, "stop": self.stop or None,
                "logprobs": self.logprobs, **self.sampling}

    @property
    def response_id(self) -> str:
        return ("chatcmpl-" if self.kind == "chat" else "cmpl-") + self.id


# --- request parsing -------------------------------------------------------------------------------------

def _get(body: dict, name: str, kinds, default=None):
    """``body[name]`` when present and not null, of one of ``kinds`` (bool is never a number)."""
    value = body.get(name)
    if value is None:
        return default
    numeric = any(k in (int, float) for k in (kinds if isinstance(kinds, tuple) else (kinds,)))
    if isinstance(value, bool) and numeric and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise APIError(400, f"{name} must be a number, got {value!r}", param=name)
    if not isinstance(value, kinds):
        names = "/".join(k.__name__ for k in (kinds if isinstance(kinds, tuple) else (kinds,)))
        raise APIError(400, f"{name} must be of type {names}, got {type(value).__name__}", param=name)
    return value


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = float(_get(body, name, (int, float), default))
    if not math.isfinite(value) or not low <= value <= high:
        raise APIError(400, f"{name} must be between {low:g} and {high:g}, got {body.get(name)!r}", param=name)
    return value


def _unsupported(body: dict) -> None:
    """Options edgelora does not implement are refused (never silently ignored)."""
    n = _get(body, "n", int, 1)
    if n != 1:
        raise APIError(400, f"n must be 1: edgelora returns one choice per request (got {n})", param="n")
    best_of = _get(body, "best_of", int, 1)
    if best_of != 1:
        raise APIError(400, "best_of is not supported (only 1)", param="best_of")
    for name in ("presence_penalty", "frequency_penalty"):
        if _get(body, name, (int, float), 0) != 0:
            raise APIError(400, f"{name} is not supported; use repetition_penalty", param=name)
    for name in ("tools", "functions", "logit_bias", "suffix", "audio", "prediction"):
        if body.get(name) not in (None, [], {}, ""):
            raise APIError(400, f"{name} is not supported by edgelora serve", param=name)
    if body.get("echo"):
        raise APIError(400, "echo is not supported by edgelora serve", param="echo")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type", "text") != "text"):
        raise APIError(400, "response_format: only {\"type\": \"text\"} is supported", param="response_format")


def _adapter_mix(value, names: list, param: str) -> dict:
    """``{"a": 0.5, "b": 0.5}`` or llama-server's list ``[{"id": 0 | "a", "scale": 0.5}, ...]`` (``id``
    an index into the resident adapters, or a name; ``name`` also accepted) -> ``{name: weight}``."""
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list):
        items = []
        for entry in value:
            if not isinstance(entry, dict):
                raise APIError(400, f"{param}: each entry must be an object {{\"id\"|\"name\", \"scale\"}}",
                               param=param)
            key = entry.get("name", entry.get("id"))
            if isinstance(key, int) and not isinstance(key, bool):
                if not 0 <= key < len(names):
                    raise APIError(404, f"{param}: no adapter with id {key} ({len(names)} resident)", param=param,
                                   code="adapter_not_found")
                key = names[key]
            items.append((key, entry.get("scale", 1.0)))
    else:
        raise APIError(400, f"{param} must be an object {{name: weight}} or a list of {{\"id\", \"scale\"}}",
                       param=param)
    mix = {}
    for name, weight in items:
        if not isinstance(name, str):
            raise APIError(400, f"{param}: adapter names must be strings, got {name!r}", param=param)
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
            raise APIError(400, f"{param}: the weight of {name!r} must be a finite number, got {weight!r}",
                           param=param)
        if name not in names:
            raise APIError(404, f"adapter {name!r} is not loaded (loaded: {', '.join(names) or 'none'})",
                           param=param, code="adapter_not_found")
        mix[name] = mix.get(name, 0.0) + float(weight)
    return mix


def resolve_adapter(body: dict, base_name: str, names: list):
    """The adapter selection of a request: ``model`` names the base or a resident adapter; an
    ``adapters`` (or llama-server's ``lora``) field mixes resident adapters over the base."""
    model = _get(body, "model", str, base_name)
    mix_field = next((f for f in ("adapters", "lora") if body.get(f) is not None), None)
    if model in (base_name, *BASE_ALIASES):
        adapter = None
    elif model in names:
        adapter = model
    else:
        raise APIError(404, f"the model {model!r} does not exist: serving {base_name!r} with adapters "
                            f"{', '.join(names) or '(none)'}", param="model", code="model_not_found")
    if mix_field is None:
        return model, adapter
    if adapter is not None:
        raise APIError(400, f"{mix_field} mixes adapters over the base: set model to {base_name!r}, not an adapter",
                       param=mix_field)
    mix = _adapter_mix(body[mix_field], names, mix_field)
    return model, (mix or None)


def _stops(body: dict) -> list:
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or any(not isinstance(s, str) or not s for s in stops):
        raise APIError(400, "stop must be a non-empty string or a list of them", param="stop")
    if len(stops) > MAX_STOPS:
        raise APIError(400, f"at most {MAX_STOPS} stop strings, got {len(stops)}", param="stop")
    return stops


def _sampling(body: dict) -> dict:
    """Sampling options: OpenAI's (``temperature`` default 1 as OpenAI's, ``top_p``, ``seed``) and
    vLLM's extras (``top_k``, ``min_p``, ``repetition_penalty``); values checked by the model's own
    :class:`~edgelora.runtime.sampling.SamplingParams`."""
    from edgelora.runtime.sampling import SamplingParams
    top_k = _get(body, "top_k", int, 0)
    options = {"temperature": _number(body, "temperature", 1.0, 0.0, 2.0),
               "top_p": _number(body, "top_p", 1.0, 0.0, 1.0),
               "top_k": 0 if top_k == -1 else top_k,  # vLLM's "off"
               "min_p": _number(body, "min_p", 0.0, 0.0, 1.0),
               "repetition_penalty": _number(body, "repetition_penalty", 1.0, 0.0, 10.0),
               "seed": _get(body, "seed", int, None)}
    try:
        SamplingParams(**options)
    except UsageError as e:
        raise APIError(400, str(e), param=_param_of(str(e), options)) from None
    return options


def _max_tokens(body: dict, prompt_tokens: int, max_context: int) -> int:
    """``max_completion_tokens`` (or the older ``max_tokens``): within what the context leaves after
    the prompt (as vLLM: prompt + max_tokens <= the context); by default all of it."""
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    room = max_context - prompt_tokens
    if room < 1:
        raise APIError(400, f"the prompt is {prompt_tokens} tokens, but this server's context holds {max_context} "
                            f"(with room for at least one generated token): shorten the prompt or the conversation",
                       param="messages" if "messages" in body else "prompt", code="context_length_exceeded")
    value = _get(body, name, int, None)
    if value is None:
        return room
    if value < 1:
        raise APIError(400, f"{name} must be at least 1, got {value}", param=name)
    if value > room:
        raise APIError(400, f"this server's context holds {max_context} tokens; you asked for {prompt_tokens + value} "
                            f"({prompt_tokens} in the prompt, {value} in the completion): lower {name} to at most "
                            f"{room}", param=name, code="context_length_exceeded")
    return value


def _message_text(content, i: int):
    """A message's content as text: a string, or a list of ``{"type": "text", "text": ...}`` parts."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"messages[{i}].content: only text parts are supported", param="messages")
            parts.append(part["text"])
        return "\n".join(parts)
    raise APIError(400, f"messages[{i}].content must be a string or a list of text parts", param="messages")


def chat_messages(body: dict) -> list:
    """``messages`` as the chat template reads them: ``[{"role", "content"}, ...]`` with text content."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list of {\"role\", \"content\"} objects", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise APIError(400, f"messages[{i}] must be an object with a string role", param="messages")
        out.append({"role": "system" if m["role"] == "developer" else m["role"],
                    "content": _message_text(m.get("content"), i)})
    return out


def _completion_prompt(body: dict, tokenizer, vocab_size: int) -> list:
    """``prompt``: a string (encoded as ``model.generate`` does), a list of token ids, or a
    one-element list of either (one prompt per request)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise APIError(400, "prompt must not be empty", param="prompt")
        return tokenizer.encode(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        bad = next((t for t in prompt if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside the vocabulary (0..{vocab_size - 1})", param="prompt")
        return list(prompt)
    raise APIError(400, "prompt must be a non-empty string or list of token ids (one prompt per request)",
                   param="prompt")


def parse_request(kind: str, body: Any, model, base_name: str) -> Job:
    """A request body of ``/v1/chat/completions`` (``kind="chat"``) or ``/v1/completions``
    (``"completion"``) as a :class:`Job` for ``model`` (its tokenizer, chat template, context and
    resident adapters); refused with an :class:`APIError`."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    _unsupported(body)
    name, adapter = resolve_adapter(body, base_name, list(model.adapters.names))
    try:
        if kind == "chat":
            ids = model.chat_ids(chat_messages(body))
        else:
            ids = _completion_prompt(body, model.tokenizer, model.args.vocab_size)
    except APIError:
        raise
    except EdgeLoraError as e:  # the chat template refused the messages, or has none
        raise APIError(400, str(e), param="messages" if kind == "chat" else "prompt") from None
    stream = bool(_get(body, "stream", bool, False))
    options = _get(body, "stream_options", dict, {})
    if options and not stream:
        raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options")
    if kind == "chat":
        top = _get(body, "top_logprobs", int, None)
        if top is not None and not _get(body, "logprobs", bool, False):
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        logprobs = (top or 0) if _get(body, "logprobs", bool, False) else None
        param = "top_logprobs"
    else:
        logprobs, param = _get(body, "logprobs", int, None), "logprobs"
    if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
        raise APIError(400, f"{param} must be between 0 and {MAX_TOP_LOGPROBS}, got {logprobs}", param=param)
    return Job(kind=kind, model=name, prompt_ids=list(ids), adapter=adapter,
               max_tokens=_max_tokens(body, len(ids), model.max_context), stop=_stops(body),
               sampling=_sampling(body), logprobs=logprobs, stream=stream,
               include_usage=bool(options.get("include_usage", False)))


# --- responses -------------------------------------------------------------------------------------------

def finish_reason(reason: str | None) -> str | None:
    return None if reason is None else FINISH_REASONS.get(reason, "stop")


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _token_text(tokenizer, token: int) -> str:
    return tokenizer.decode([token])


def chat_logprobs(items: list, tokenizer) -> dict:
    """``TokenLogprobs`` items in the chat API's shape: ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""
    def entry(token: int, lp: float) -> dict:
        text = _token_text(tokenizer, token)
        return {"token": text, "logprob": max(lp, -9999.0), "bytes": list(text.encode("utf-8"))}
    return {"content": [{**entry(t.token, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top_logprobs]}
                        for t in items]}


def completion_logprobs(items: list, tokenizer, offset: int = 0) -> dict:
    """``TokenLogprobs`` items in the completions API's shape: parallel lists ``tokens``,
    ``token_logprobs``, ``top_logprobs`` (``{token: logprob}`` each) and ``text_offset`` (each token's
    start in the completion text, counted from ``offset``)."""
    tokens = [_token_text(tokenizer, t.token) for t in items]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": [max(t.logprob, -9999.0) for t in items],
            "top_logprobs": [{_token_text(tokenizer, i): max(lp, -9999.0) for i, lp in t.top_logprobs} for t in items],
            "text_offset": offsets}


def _logprobs(job: Job, items: list, tokenizer, offset: int = 0):
    if job.logprobs is None:
        return None
    return chat_logprobs(items, tokenizer) if job.kind == "chat" else completion_logprobs(items, tokenizer, offset)


def response(job: Job, text: str, reason: str, prompt_tokens: int, completion_tokens: int, items: list,
             tokenizer) -> dict:
    """The whole (not streamed) response: a ``chat.completion`` or a ``text_completion``."""
    if job.kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "logprobs": _logprobs(job, items, tokenizer), "finish_reason": finish_reason(reason)}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "logprobs": _logprobs(job, items, tokenizer),
                  "finish_reason": finish_reason(reason)}
        obj = "text_completion"
    return {"id": job.response_id, "object": obj, "created": job.created, "model": job.model,
            "choices": [choice], "usage": usage(prompt_tokens, completion_tokens)}


def stream_chunk(job: Job, text: str | None, reason: str | None, items: list, tokenizer, *, first: bool = False,
                 offset: int = 0) -> dict:
    """One streamed chunk: a ``chat.completion.chunk`` (the first one carries the role) or a
    ``text_completion``; ``usage`` is null in each when the final usage chunk will follow."""
    if job.kind == "chat":
        delta = {"role": "assistant", "content": text or ""} if first else ({} if text is None else {"content": text})
        choice = {"index": 0, "delta": delta, "logprobs": _logprobs(job, items, tokenizer) if items else None,
                  "finish_reason": finish_reason(reason)}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "",
                  "logprobs": _logprobs(job, items, tokenizer, offset) if items else None,
                  "finish_reason": finish_reason(reason)}
        obj = "text_completion"
    out = {"id": job.response_id, "object": obj, "created": job.created, "model": job.model, "choices": [choice]}
    if job.include_usage:
        out["usage"] = None
    return out


def usage_chunk(job: Job, prompt_tokens: int, completion_tokens: int) -> dict:
    """The last chunk with ``stream_options.include_usage``: no choices, the request's usage."""
    return {"id": job.response_id, "object": "chat.completion.chunk" if job.kind == "chat" else "text_completion",
            "created": job.created, "model": job.model, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}


def model_list(base_name: str, adapters: list, created: int) -> dict:
    """``GET /v1/models``: the base, then each resident adapter (``parent``: the base, ``root``: its folder)."""
    data = [{"id": base_name, "object": "model", "created": created, "owned_by": "edgelora", "root": base_name,
             "parent": None}]
    for name, path in adapters:
        data.append({"id": name, "object": "model", "created": created, "owned_by": "edgelora",
                     "root": str(path), "parent": base_name})
    return {"object": "list", "data": data}
