"""Every name the labeling app takes from Gradio (and FastAPI) that is not their public API, in one place.

Read against Gradio 6.31.0 (gradio/blocks.py, queueing.py, utils.py) and FastAPI 0.165.0 (fastapi/routing.py).
`check(demo)` runs when the server is built: if an upgrade moved one of these, the server stops at start with one
line naming it, instead of failing requests later. Everything else in `labeling_app` uses the public API (and
Gradio's documented `GRADIO_TEMP_DIR` setting for its file cache).
"""

from __future__ import annotations

GRADIO_VERSION = "6.31.0"
FASTAPI_VERSION = "0.165.0"


class GradioMoved(RuntimeError):
    pass


def _moved(what: str) -> GradioMoved:
    import fastapi
    import gradio

    return GradioMoved(f"labeling_app/gradio_internals.py was read against Gradio {GRADIO_VERSION} and FastAPI "
                       f"{FASTAPI_VERSION}; Gradio {gradio.__version__} / FastAPI {fastapi.__version__} no longer "
                       f"have {what}")


def check(demo) -> None:
    """Every private name below is still there (called once, when the server is built)."""
    try:
        from fastapi.routing import iter_route_contexts  # noqa: F401
        from gradio.utils import get_upload_folder  # noqa: F401
    except ImportError as e:
        raise _moved(str(e)) from None
    if not isinstance(getattr(demo, "fns", None), dict):
        raise _moved("Blocks.fns (a dict of BlockFunction by fn_index)")
    if not all(hasattr(fn, "api_name") and hasattr(fn, "fn") for fn in demo.fns.values()):
        raise _moved("BlockFunction.api_name and BlockFunction.fn")
    if not hasattr(demo, "_queue"):
        raise _moved("Blocks._queue")


def upload_folder() -> str:
    """Gradio's file cache for this process (`GRADIO_TEMP_DIR`, else <tmp>/gradio): where it copies the files
    handlers return before serving them."""
    from gradio.utils import get_upload_folder

    return get_upload_folder()


def quiet_queue(demo, seconds: float) -> None:
    """How long Gradio's queue sleeps between polls when idle (1 ms by default: ~7% of a core)."""
    queue = demo._queue
    if hasattr(queue, "sleep_when_free"):
        queue.sleep_when_free = queue.progress_update_sleep_when_free = seconds


def api_name_of(demo, fn_index: int) -> str | None:
    """The api name of the event a request names by index (how the page and gradio_client call events), or None
    for an index Gradio does not have. Gradio runs `fns[fn_index]` whatever api name the URL gives."""
    fn = demo.fns.get(fn_index)
    name = getattr(fn, "api_name", None)
    return name if isinstance(name, str) else None


def endpoint_names(demo) -> set[str]:
    """The api names of the events that run Python on the server (js-only events run none)."""
    return {fn.api_name for fn in demo.fns.values() if fn.fn is not None and isinstance(fn.api_name, str)}


def routes(app) -> list[tuple[str, str]]:
    """(method, path template) of every route the app serves, through its mounts (Gradio's app at /) and FastAPI's
    included routers (which 0.165 keeps as lazy `_IncludedRouter` entries in `app.routes`); a websocket route as
    ("WEBSOCKET", path)."""
    from fastapi.routing import iter_route_contexts
    from starlette.routing import Mount, WebSocketRoute

    out = []

    def walk(entries, prefix: str) -> None:
        for context in iter_route_contexts(entries):
            route = context.original_route
            if isinstance(route, Mount):
                walk(route.routes, prefix + context.path)
            elif isinstance(route, WebSocketRoute) or context.methods is None:
                out.append(("WEBSOCKET", prefix + context.path))
            else:
                out.extend((method, prefix + context.path) for method in sorted(context.methods))

    walk(app.routes, "")
    return out
