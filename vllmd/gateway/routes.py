"""Which request paths the gateway forwards to an engine, and as which route.

Engines serve vLLM's dev-mode routes (`/sleep`, `/wake_up`, `/collective_rpc`, ...) on the
same socket as the OpenAI routes, and only the daemon may reach those. So a path is forwarded
only when its percent-decoded form is exactly one of the eight model routes, bare (the model
is in the body) or under `/models/{name}` (the model is in the path); the engine is then sent
the route's template, never the client's path. Anything else (`..`, `.`, empty segments, a
trailing slash, an encoded `/`, any other route) matches nothing.

Matching is a couple of dict lookups on the path uvicorn has already decoded; the raw path is
read only when it holds a `%`.
"""

from __future__ import annotations

from typing import Final

# docs/design.md "Gateway": the routes that carry a model and go to its engine.
MODEL_ROUTES: Final = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/rerank",
    "/v1/score",
    "/tokenize",
    "/detokenize",
)
# The metrics label of a request that matches no route: one series however many junk paths.
OTHER: Final = "other"
MODELS_PREFIX: Final = "/models/"

# Built once: a hit returns these very tuples and strings, nothing is allocated per request.
_BARE: Final = {route: (route, None) for route in MODEL_ROUTES}
_UNDER_MODEL: Final = {route[1:]: route for route in MODEL_ROUTES}  # "tokenize" -> "/tokenize"
_NOT_NAMES: Final = frozenset({"", ".", ".."})


def match(path: str, raw_path: bytes | None) -> tuple[str, str | None] | None:
    """The route template a POST to `path` is forwarded as, and the model named in the path
    (None when the body names it); None when the path is no model route.

    `path` is the decoded path (ASGI's `path`), `raw_path` the path as sent (`raw_path`). A
    model named in the path is not checked here: an unknown one is the caller's
    `model_not_found`, answered without reaching any engine either.
    """
    hit: tuple[str, str | None] | None = _BARE.get(path)
    if hit is None:
        if not path.startswith(MODELS_PREFIX):
            return None
        name, _, rest = path[len(MODELS_PREFIX) :].partition("/")
        route = _UNDER_MODEL.get(rest)
        if route is None or name in _NOT_NAMES:
            return None
        hit = (route, name)
    # A `%2F` decodes to a separator: the segments the client sent are not the ones matched.
    if raw_path is not None and b"%" in raw_path and b"%2f" in raw_path.lower():
        return None
    return hit
