"""The OpenAI API's request fields and response shapes, as the official client sends and reads them.

Requests are checked here, field by field; whatever is wrong becomes an ApiError (status and an
OpenAI-style error body) before anything reaches the engine. Fields the engine cannot honour (n > 1,
logprobs, penalties, tools) are refused rather than silently ignored.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any

MAX_STOPS = 4  # as OpenAI


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or {401: "authentication_error", 413: "invalid_request_error",
                             429: "rate_limit_error"}.get(status, "invalid_request_error" if status < 500
                                                          else "server_error")

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.kind, self.param, self.code)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass
class Params:
    """What a request asks of the generation (the prompt is built by the endpoint)."""

    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool


def _number(body: dict[str, Any], key: str, low: float, high: float, default: float,
            low_open: bool = False) -> float:
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float) or v < low or v > high or (low_open and v == low):
        bound = f"({low:g}, {high:g}]" if low_open else f"[{low:g}, {high:g}]"
        raise ApiError(400, f"{key} must be a number in {bound}, got {v!r}", key)
    return float(v)


def _int(body: dict[str, Any], key: str) -> int | None:
    v = body.get(key)
    if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
        raise ApiError(400, f"{key} must be an integer, got {v!r}", key)
    return v


def _refuse(body: dict[str, Any], key: str, ok: Any, why: str) -> None:
    v = body.get(key)
    if v is not None and v != ok and not (isinstance(ok, tuple) and v in ok):
        raise ApiError(400, f"{key}={v!r} is not supported: {why}", key)


def parse_params(body: Any, model: str, max_tokens_limit: int, extra_stop: tuple[str, ...] = ()) -> Params:
    """The fields shared by chat and text completions; `body` is the parsed JSON."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    asked = body.get("model")
    if not isinstance(asked, str):
        raise ApiError(400, "model is required: a string, see GET /v1/models", "model")
    if asked != model:
        raise ApiError(400, f"the model {asked!r} does not exist: this server has {model!r}", "model",
                       "model_not_found")
    n = _int(body, "n")
    if n is not None and n != 1:
        raise ApiError(400, f"n={n}: this server generates one choice per request (n=1)", "n")
    _refuse(body, "best_of", 1, "one sequence at a time")
    _refuse(body, "logprobs", (False, 0), "log probabilities are not returned")
    _refuse(body, "top_logprobs", 0, "log probabilities are not returned")
    _refuse(body, "echo", False, "the prompt is not echoed")
    _refuse(body, "presence_penalty", (0, 0.0), "no penalties")
    _refuse(body, "frequency_penalty", (0, 0.0), "no penalties")
    _refuse(body, "logit_bias", ({}, ), "no logit bias")
    _refuse(body, "suffix", "", "no insertion")
    if body.get("tools"):
        raise ApiError(400, "tools are not supported", "tools")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _int(body, key)
    if max_tokens is None:
        max_tokens = max_tokens_limit
    elif not 1 <= max_tokens <= max_tokens_limit:
        raise ApiError(400, f"{key} must be in [1, {max_tokens_limit}] (serve.max_tokens), got {max_tokens}", key)
    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, f"stop must be a non-empty string or a list of at most {MAX_STOPS} of them, got "
                            f"{stop!r}", "stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, f"stream must be true or false, got {stream!r}", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, f"stream_options must be an object, got {options!r}", "stream_options")
    return Params(max_tokens=max_tokens, temperature=_number(body, "temperature", 0, 2, 0.0),
                  top_p=_number(body, "top_p", 0, 1, 1.0, low_open=True), seed=_int(body, "seed"),
                  stop=tuple(stops) + extra_stop, stream=stream, include_usage=bool(options.get("include_usage")))


def chat_messages(body: dict[str, Any]) -> list[dict[str, str]]:
    """messages as the chat template takes them: role and text content (text parts are joined)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise ApiError(400, f"messages[{i}] must be an object with role system, developer, user or assistant",
                           "messages")
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts", "messages")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return out


def completion_prompt(body: dict[str, Any]) -> str | list[int]:
    """prompt: a string, or token ids; a list of one of those (more would be several sequences)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt):
        return prompt
    raise ApiError(400, "prompt must be a string or a non-empty list of token ids (one prompt per request)",
                   "prompt")


def usage(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


class Reply:
    """The response objects of one request: whole (not streamed) or as chunks."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _head(self, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def whole(self, text: str, finish_reason: str, use: dict[str, Any]) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {**self._head(False), "choices": [choice], "usage": use}

    def chunk(self, text: str | None, finish_reason: str | None = None, first: bool = False) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason, "logprobs": None}
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
            if text:
                delta["content"] = text
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        return {**self._head(True), "choices": [choice]}

    def usage_chunk(self, use: dict[str, Any]) -> dict[str, Any]:
        return {**self._head(True), "choices": [], "usage": use}
