"""OpenAI request and response shapes for completions and chat completions.

Shared by durable jobs (OpenAI Batch API lines) and the HTTP server (``qllm_jax.server``): a
request body becomes a prompt (token ids), ``SamplingParams`` and a priority, or a
``BadRequest`` naming the field (what OpenAI answers with a 400); a finished ``RequestOutput``
becomes the endpoint's response body, ``usage`` included, and a streamed one its server-sent
chunks. Ids are given by the caller, so a job can make them deterministic.

Supported body fields: ``model``, ``prompt`` (a string or token ids; one prompt per request) or
``messages`` (the tokenizer's chat template), ``max_tokens`` (``max_completion_tokens`` for
chat; OpenAI's defaults when absent: 16 for completions, the room left in the context for
chat), ``temperature``, ``top_p``, ``top_k``, ``seed``, ``stop``, plus vLLM's ``ignore_eos``
and ``stop_token_ids``; ``stream`` and ``stream_options.include_usage`` where the caller
streams (the server; never a batch line); ``service_tier`` (``"auto"``, ``"default"``,
``"priority"``: latency-sensitive; ``"flex"``: best-effort) and vLLM's integer ``priority``
(lower is more urgent; it overrides the tier); ``user`` is accepted and ignored. ``n``,
``logprobs``, ``echo``, penalties, tools and the like are accepted only at their no-op values;
any other field is refused, named. A prompt plus an explicit ``max_tokens`` beyond the model's
context is refused with the limit in the message, as OpenAI does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from qllm_jax.scheduler import SamplingParams
from qllm_jax.scheduler.sampling_params import is_int

if TYPE_CHECKING:
    from qllm_jax.engine import Engine, RequestOutput

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
ENDPOINTS = (COMPLETIONS, CHAT)

_SAMPLING = {"temperature", "top_p", "top_k", "seed", "stop", "ignore_eos", "stop_token_ids"}
_IGNORED = {"user", "metadata", "store"}  # no effect on the output
_PRIORITY_FIELDS = {"service_tier", "priority", "stream", "stream_options"}
# OpenAI's service tiers -> the engine's priority (0: latency-sensitive, 1: best-effort)
SERVICE_TIERS = {"auto": 0, "default": 0, "priority": 0, "flex": 1}
# Fields accepted only at their no-op value (OpenAI's defaults)
_NOOP: dict[str, tuple[Any, ...]] = {
    "n": (1,),
    "best_of": (1,),
    "echo": (False,),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
    "logit_bias": (None, {}),
    "suffix": (None,),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "response_format": (None, {"type": "text"}),
}
_FIELDS = {
    COMPLETIONS: {"model", "prompt", "max_tokens"} | _SAMPLING | _PRIORITY_FIELDS,
    CHAT: {"model", "messages", "max_tokens", "max_completion_tokens"}
    | _SAMPLING
    | _PRIORITY_FIELDS,
}
_COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class BadRequest(ValueError):
    """A request OpenAI would refuse with a 400; ``param`` names the field at fault."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.code = param, code

    def body(self) -> dict[str, Any]:
        return error_body(str(self), "invalid_request_error", self.param, self.code)


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A validated request: its prompt as token ids, how to sample it, how urgent it is and
    whether its answer streams. ``service_tier`` is what the response echoes."""

    endpoint: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    model: str | None
    priority: int = 0
    service_tier: str = "default"
    stream: bool = False
    include_usage: bool = False


def prepare(
    engine: Engine,
    endpoint: str,
    body: Mapping[str, Any],
    default_seed: int | None = None,
    allow_stream: bool = False,
) -> Prepared:
    """Validate ``body`` for ``endpoint`` on ``engine`` (``BadRequest`` if it is bad).
    ``default_seed``: the seed of a sampled request that gives none (a job derives one from
    its ids, so a resumed job samples the same tokens). ``allow_stream``: the caller can
    stream the answer (the server); otherwise ``stream=true`` is refused (a batch line)."""
    if endpoint not in ENDPOINTS:
        raise BadRequest(f"unsupported endpoint {endpoint!r}; supported: {list(ENDPOINTS)}", "url")
    if not isinstance(body, Mapping):
        raise BadRequest("the request body must be a JSON object", "body")
    _check_fields(endpoint, body)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest("model must be a string", "model")
    chat = endpoint == CHAT
    ids = prompt_token_ids(engine, endpoint, body)
    sampling = _sampling(engine, endpoint, body, len(ids), default_seed)
    priority, tier = priority_of(body)
    stream, include_usage = _stream(body, allow_stream)
    try:
        engine.make_request(ids, sampling, priority=priority)  # every limit the engine checks
    except (ValueError, TypeError) as e:
        raise BadRequest(str(e), "messages" if chat else "prompt") from e
    return Prepared(endpoint, ids, sampling, model, priority, tier, stream, include_usage)


def prompt_token_ids(engine: Engine, endpoint: str, body: Mapping[str, Any]) -> list[int]:
    """The prompt of ``body`` as token ids (``BadRequest`` if it is bad). Needs of ``engine``
    only ``encode`` and ``tokenizer``: a router that tokenizes for prefix matching passes an
    object with just those (``qllm_jax.ray_serve``)."""
    if endpoint == CHAT:
        return _chat_prompt(engine, body)
    return _completion_prompt(engine, body)


def response_body(
    prepared: Prepared,
    out: RequestOutput,
    response_id: str,
    created: int,
    model_name: str,
    system_fingerprint: str | None = None,
) -> dict[str, Any]:
    """The endpoint's response to a finished request (finish reason ``stop`` or ``length``)."""
    text = out.text or ""
    reason = out.finish_reason
    if prepared.endpoint == COMPLETIONS:
        obj, prefix = "text_completion", "cmpl-"
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
    else:
        obj, prefix = "chat.completion", "chatcmpl-"
        message = {"role": "assistant", "content": text}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": reason}
    return {
        "id": prefix + response_id,
        "object": obj,
        "created": created,
        "model": prepared.model or model_name,
        "choices": [choice],
        "usage": usage(out),
        "system_fingerprint": system_fingerprint,
        "service_tier": prepared.service_tier,
    }


def usage(out: RequestOutput) -> dict:
    """Token counts, with OpenAI's ``prompt_tokens_details.cached_tokens``: prompt tokens
    whose K/V came from the prefix cache."""
    return {
        "prompt_tokens": len(out.prompt_token_ids),
        "completion_tokens": len(out.token_ids),
        "total_tokens": len(out.prompt_token_ids) + len(out.token_ids),
        "prompt_tokens_details": {"cached_tokens": out.num_cached_tokens},
    }


def stream_chunk(
    prepared: Prepared,
    response_id: str,
    created: int,
    model_name: str,
    text: str | None,
    finish_reason: str | None = None,
    first: bool = False,
    system_fingerprint: str | None = None,
) -> dict[str, Any]:
    """One server-sent chunk as OpenAI streams it: ``text`` new since the last chunk (None: a
    usage-only chunk with no choices); the first chat chunk carries the assistant role, the
    last one ``finish_reason``. With ``include_usage`` every chunk has ``usage: null`` and
    the usage-only chunk at the end has the counts (``usage_chunk``)."""
    if prepared.endpoint == COMPLETIONS:
        obj, prefix = "text_completion", "cmpl-"
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    else:
        obj, prefix = "chat.completion.chunk", "chatcmpl-"
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text or first:
            delta["content"] = text or ""
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    chunk = {
        "id": prefix + response_id,
        "object": obj,
        "created": created,
        "model": prepared.model or model_name,
        "choices": [] if text is None and finish_reason is None and not first else [choice],
        "system_fingerprint": system_fingerprint,
        "service_tier": prepared.service_tier,
    }
    if prepared.include_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(
    prepared: Prepared,
    out: RequestOutput,
    response_id: str,
    created: int,
    model_name: str,
    system_fingerprint: str | None = None,
) -> dict[str, Any]:
    """The last chunk of a stream with ``stream_options.include_usage``: no choices, the usage."""
    chunk = stream_chunk(
        prepared, response_id, created, model_name, None, system_fingerprint=system_fingerprint
    )
    chunk["usage"] = usage(out)
    return chunk


def error_body(
    message: str, type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error JSON."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# ----------------------------------------------------------------------------------------------


def _check_fields(endpoint: str, body: Mapping[str, Any]) -> None:
    for key, value in body.items():
        if key in _FIELDS[endpoint] or key in _IGNORED:
            continue
        if key in _NOOP:
            if not any(
                value == a and isinstance(value, bool) == isinstance(a, bool) for a in _NOOP[key]
            ):
                raise BadRequest(f"{key}={value!r} is not supported", key, "unsupported_value")
            continue
        raise BadRequest(f"unrecognized request argument: {key}", key, "unknown_parameter")


def priority_of(body: Mapping[str, Any]) -> tuple[int, str]:
    """The engine priority of a request and the tier its response echoes: ``service_tier``
    maps to a class, vLLM's integer ``priority`` (lower is more urgent) overrides it."""
    tier = body.get("service_tier")
    if tier is not None and tier not in SERVICE_TIERS:
        raise BadRequest(
            f"service_tier must be one of {sorted(SERVICE_TIERS)}, got {tier!r}", "service_tier"
        )
    priority = SERVICE_TIERS[tier or "auto"]
    given = body.get("priority")
    if given is not None:
        if not is_int(given) or not -(2**31) <= given < 2**31:
            raise BadRequest(f"priority must be a 32-bit int, got {given!r}", "priority")
        priority = int(given)
    if priority > 0:
        return priority, "flex"
    return priority, "priority" if tier == "priority" else "default"


def _stream(body: Mapping[str, Any], allow_stream: bool) -> tuple[bool, bool]:
    stream, options = body.get("stream"), body.get("stream_options")
    if stream not in (None, False, True):
        raise BadRequest(f"stream must be a boolean, got {stream!r}", "stream")
    if stream and not allow_stream:
        raise BadRequest("stream=True is not supported here", "stream", "unsupported_value")
    if options is None:
        return bool(stream), False
    if not stream:
        raise BadRequest("stream_options is only allowed with stream=true", "stream_options")
    if not isinstance(options, Mapping) or set(options) - {"include_usage"}:
        raise BadRequest("stream_options supports only include_usage", "stream_options")
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise BadRequest("stream_options.include_usage must be a boolean", "stream_options")
    return True, include


def _completion_prompt(engine: Engine, body: Mapping[str, Any]) -> list[int]:
    if "prompt" not in body:
        raise BadRequest("prompt is required", "prompt")
    prompt = body["prompt"]
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise BadRequest("one prompt per request is supported", "prompt")
        prompt = prompt[0]
    if not isinstance(prompt, (str, list)) or (
        isinstance(prompt, list) and not all(is_int(t) for t in prompt)
    ):
        raise BadRequest("prompt must be a string or a list of token ids", "prompt")
    if not prompt:
        raise BadRequest("empty prompt", "prompt")
    try:
        return engine.encode(prompt)
    except (ValueError, TypeError) as e:
        raise BadRequest(str(e), "prompt") from e


def _chat_prompt(engine: Engine, body: Mapping[str, Any]) -> list[int]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list", "messages")
    plain = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise BadRequest(f"messages[{i}] must be an object with a role", "messages")
        plain.append({"role": m["role"], "content": _content(m.get("content"), i)})
    tok = engine.tokenizer
    if tok is None or not getattr(tok, "chat_template", None):
        raise BadRequest("this model has no chat template: use /v1/completions", "messages")
    try:
        text = tok.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # jinja raises its own types (raise_exception in a template)
        raise BadRequest(f"the chat template refused the messages: {e}", "messages") from e
    ids = list(tok(text, add_special_tokens=False)["input_ids"])  # the template has the BOS
    if not ids:
        raise BadRequest("empty prompt", "messages")
    return ids


def _content(content: Any, i: int) -> str:
    """A message's text: a string, or a list of ``{"type": "text", "text": ...}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, Mapping) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
    ):
        return "".join(p["text"] for p in content)
    raise BadRequest(f"messages[{i}].content must be a string or text parts", "messages")


def _sampling(
    engine: Engine,
    endpoint: str,
    body: Mapping[str, Any],
    prompt_len: int,
    default_seed: int | None,
) -> SamplingParams:
    if endpoint == CHAT:
        given = body.get("max_completion_tokens", body.get("max_tokens"))
        param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        default = _room(engine, prompt_len)
    else:
        given, param, default = body.get("max_tokens"), "max_tokens", _COMPLETIONS_MAX_TOKENS
    if given is not None:
        _check_context(engine, prompt_len, given, param)
    kw: dict[str, Any] = {"max_tokens": default if given is None else given}
    for key in _SAMPLING:
        if body.get(key) is not None:
            kw[key] = body[key]
    temperature = kw.get("temperature", 1.0)
    if "seed" not in kw and default_seed is not None and temperature != 0:
        kw["seed"] = default_seed
    try:
        return SamplingParams(**kw)
    except (ValueError, TypeError) as e:
        message = str(e)
        names = (param, *sorted(_SAMPLING, key=len, reverse=True))  # stop_token_ids, then stop
        field = next((k for k in names if message.startswith(k)), None)
        raise BadRequest(message, field or param) from e


def _check_context(engine: Engine, prompt_len: int, max_tokens: Any, param: str) -> None:
    """OpenAI's context-length error: the prompt plus ``max_tokens`` must fit the model."""
    limit = engine.config.max_model_len
    if not is_int(max_tokens) or prompt_len + max_tokens <= limit:
        return  # (SamplingParams names a bad max_tokens)
    raise BadRequest(
        f"This model's maximum context length is {limit} tokens. However, you requested "
        f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} in the "
        f"completion). Please reduce the length of the prompt or the completion.",
        param if prompt_len < limit else "prompt",
        "context_length_exceeded",
    )


def _room(engine: Engine, prompt_len: int) -> int:
    """Chat's default max_tokens: what the context and the KV cache leave after the prompt."""
    cfg = engine.config
    limit = min(cfg.max_model_len, (cfg.num_pages - 1) * cfg.page_size)
    return max(1, limit - prompt_len)
