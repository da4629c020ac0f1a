"""Chat requests to one or more OpenAI-compatible endpoints, with retries.

The official ``openai`` async client does the HTTP (its own retries are switched off so
that this module owns the policy): requests go round-robin over the endpoints (a retry
moves to the next one), 429 / 5xx / timeouts / dropped connections / malformed or
truncated bodies are retried with exponential backoff and full jitter, honouring a
``Retry-After`` header; after ``max_tries`` the request is given up and reported as
failed (a rerun retries it). A wrong API key or an unknown model is fatal: one line,
the whole job stops.
"""

from __future__ import annotations

import asyncio
import email.utils
import os
import random
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

from megatron_sfm.errors import SfmError

API_KEY_ENV = "SFM_SYNTH_API_KEY"
FALLBACK_KEY_ENV = "OPENAI_API_KEY"


def api_key_from_env() -> str:
    """``SFM_SYNTH_API_KEY``, else ``OPENAI_API_KEY``, else ``EMPTY`` (what vLLM expects with no key)."""
    return os.environ.get(API_KEY_ENV) or os.environ.get(FALLBACK_KEY_ENV) or "EMPTY"


@dataclass
class ClientConfig:
    base_urls: Sequence[str]
    model: str
    api_key: str = "EMPTY"
    timeout_s: float = 300.0
    max_tries: int = 6
    backoff_s: float = 1.0  # first backoff ceiling; doubles each try
    max_backoff_s: float = 60.0
    max_tokens: int = 1024
    temperature: float = 0.9
    top_p: float = 0.95


@dataclass
class Reply:
    """What one request ended with: text (None when failed), usage, tries, error."""

    text: Optional[str]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tries: int = 0
    error: Optional[str] = None
    endpoint: str = ""
    finish_reason: Optional[str] = None


class FatalEndpointError(SfmError):
    """A failure no retry can fix (wrong key, unknown model): stop the job."""


@dataclass
class _Stats:
    retries: int = 0
    by_kind: dict = field(default_factory=dict)

    def count(self, kind: str) -> None:
        self.retries += 1
        self.by_kind[kind] = self.by_kind.get(kind, 0) + 1


def _retry_after(exc) -> Optional[float]:
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    value = headers.get("retry-after") if headers is not None else None
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value) if value else None
        return max(0.0, parsed.timestamp() - time.time()) if parsed is not None else None


class ChatClient:
    """Round-robin async chat completions over ``cfg.base_urls``."""

    def __init__(self, cfg: ClientConfig, *, max_connections: int = 256):
        import openai

        if not cfg.base_urls:
            raise SfmError("--base-url: at least one endpoint is needed")
        self.cfg = cfg
        self._openai = openai
        self.clients = [openai.AsyncOpenAI(base_url=url, api_key=cfg.api_key, max_retries=0, timeout=cfg.timeout_s,
                                           http_client=_http_client(max_connections, cfg.timeout_s))
                        for url in cfg.base_urls]
        self.stats = _Stats()
        self._next = 0

    async def close(self) -> None:
        for client in self.clients:
            await client.close()

    async def preflight(self) -> None:
        """Every endpoint answers and serves ``cfg.model`` (when it lists models)."""
        openai = self._openai
        for url, client in zip(self.cfg.base_urls, self.clients):
            last = None
            for attempt in range(3):
                try:
                    listed = await client.models.list()
                    ids = [m.id for m in listed.data]
                    if ids and self.cfg.model not in ids:
                        raise SfmError(f"--model {self.cfg.model!r}: not served by {url} (it serves: {', '.join(ids[:5])})")
                    last = None
                    break
                except openai.AuthenticationError:
                    raise SfmError(f"--base-url {url}: the API key was refused (401); set {API_KEY_ENV}") from None
                except openai.PermissionDeniedError:
                    raise SfmError(f"--base-url {url}: access denied (403); check {API_KEY_ENV}") from None
                except openai.NotFoundError:
                    last = None  # no /models route: checked at the first request instead
                    break
                except (openai.APIConnectionError, openai.APITimeoutError, openai.InternalServerError) as exc:
                    last = exc
                    await asyncio.sleep(0.2 * (attempt + 1))
                except openai.APIError:  # e.g. malformed JSON from /models: not fatal here
                    last = None
                    break
            if last is not None:
                cause = getattr(last, "__cause__", None) or last
                raise SfmError(f"--base-url {url}: unreachable ({type(cause).__name__}: "
                               f"{str(cause).splitlines()[0] if str(cause) else 'no answer'})")

    def _pick(self, offset: int) -> int:
        return (self._next + offset) % len(self.clients)

    async def chat(self, messages, *, seed: Optional[int] = None) -> Reply:
        """One request, retried; never raises except :class:`FatalEndpointError`."""
        openai = self._openai
        cfg = self.cfg
        start = self._next
        self._next = (self._next + 1) % len(self.clients)
        error = None
        for attempt in range(cfg.max_tries):
            index = (start + attempt) % len(self.clients)
            client, url = self.clients[index], cfg.base_urls[index]
            wait = None
            try:
                body = {"model": cfg.model, "messages": list(messages), "max_tokens": cfg.max_tokens,
                        "temperature": cfg.temperature, "top_p": cfg.top_p}
                if seed is not None:
                    body["seed"] = seed
                # The official client's generic POST: same transport, auth, status errors and
                # timeouts as chat.completions.create, without its per-request TypedDict
                # transform and model construction (a quarter of the client's CPU at hundreds of
                # requests per second). The reply is parsed here, defensively.
                data = await client.post("/chat/completions", cast_to=dict, body=body)
                choice = data["choices"][0]
                text = choice["message"]["content"]
                if not isinstance(text, str):
                    raise ValueError("reply without message content")
                usage = data.get("usage") or {}
                return Reply(text, int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0),
                             attempt + 1, None, url, choice.get("finish_reason"))
            except openai.AuthenticationError:
                raise FatalEndpointError(f"--base-url {url}: the API key was refused (401); set {API_KEY_ENV}") from None
            except openai.PermissionDeniedError:
                raise FatalEndpointError(f"--base-url {url}: access denied (403); check {API_KEY_ENV}") from None
            except openai.NotFoundError as exc:
                raise FatalEndpointError(f"--model {cfg.model!r}: {url} answered 404 "
                                         f"({_first_line(exc)}); is the model name right?") from None
            except openai.BadRequestError as exc:
                # the request itself is wrong for this server (e.g. too long): retrying cannot help
                return Reply(None, tries=attempt + 1, error=f"400: {_first_line(exc)}", endpoint=url)
            except openai.RateLimitError as exc:
                kind, wait = "429", _retry_after(exc)
            except openai.APIStatusError as exc:
                kind, wait = str(getattr(exc, "status_code", "status")), _retry_after(exc)
            except openai.APITimeoutError:
                kind = "timeout"
            except openai.APIConnectionError:
                kind = "connection"
            except (openai.APIResponseValidationError, ValueError, KeyError, IndexError, TypeError, AttributeError):
                kind = "malformed"  # malformed JSON, truncated body, missing fields
            except openai.APIError:
                kind = "api_error"
            error = kind
            self.stats.count(kind)
            if attempt + 1 < cfg.max_tries:
                ceiling = min(cfg.max_backoff_s, cfg.backoff_s * (2 ** attempt))
                delay = random.uniform(0, ceiling)  # full jitter
                if wait is not None:
                    delay = max(delay, min(wait, cfg.max_backoff_s * 4))
                await asyncio.sleep(delay)
        return Reply(None, tries=cfg.max_tries, error=f"gave up after {cfg.max_tries} tries (last: {error})")


def _http_client(max_connections: int, timeout_s: float):
    """The openai client's aiohttp transport when installed (faster at hundreds in flight), else httpx."""
    import httpx2
    import openai

    limits = httpx2.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
    try:
        return openai.DefaultAioHttpClient(limits=limits, timeout=timeout_s)
    except RuntimeError:  # openai without its aiohttp extra
        return openai.DefaultAsyncHttpxClient(limits=limits, timeout=timeout_s)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
