"""``sd-app serve --max-waiting-per-client`` for UI jobs: one address may have only so many generations waiting.

A client is its network address, as the HTTP API counts one (``JobTracker.job(client=)``): a Gradio session
hash is chosen by the caller (a script can send a fresh one with every call), so a cap per session would
bound nothing, and a browser tab queues at most one job per view anyway. Behind a proxy every client has the
proxy's address, for the UI as for the API. The UI's jobs wait in Gradio's queue (the model group runs one
event at a time; the tracker sees a UI job only once it runs), so they are counted there: this address's
waiting Generate and Image to image events, as ``--max-queue`` bounds that queue. (The API's jobs wait in the
tracker and are capped there, separately.)

The cap is checked where Gradio queues an event: ``Queue.push``, called by ``POST /gradio_api/queue/join``
(gradio 6.31, ``routes.queue_join_helper``). Gradio's public hook there, an event's ``validator``, runs in a
worker thread while other joins go on, so a burst of joins would all pass before any is queued; here the count
(queued events plus joins still under way) and the refusal run on the event loop with nothing awaited between.
A refusal is answered as a failed validation (422): the page shows the message under the prompt, and
``gradio_client`` raises it as ``ValidationError``. These are Gradio's internals: where a Gradio release lacks
them, the UI is served without the cap and says so once (a warning), rather than not at all.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sd_app.ui_jobs import client_busy_message

if TYPE_CHECKING:
    import gradio as gr


def client_address(request: Any) -> str:
    """The address a request came from ('' when unknown: such a request is not capped, as in the API)."""
    client = getattr(request, "client", None)
    return client.host if client is not None and client.host else ""


def refusal(message: str, shown_at: int) -> list[dict[str, Any]]:
    """Gradio's validation answer (``gr.validate`` per input, in input order) with ``message`` on input ``shown_at``."""
    return [{"__type__": "validate", "is_valid": index != shown_at, "message": message if index == shown_at else "",
             "parameter_name": "prompt" if index == shown_at else f"parameter_{index}"}
            for index in range(shown_at + 1)]


def limit_waiting_per_client(demo: gr.Blocks, max_per_client: int, prompt_inputs: Mapping[str, int]) -> None:
    """Refuse to queue an event of ``prompt_inputs``' functions (API name -> index of the prompt among its inputs,
    where the refusal shows) from an address that has ``max_per_client`` of them waiting already.

    Call after ``demo.queue()`` (which builds the queue this wraps)."""
    if isinstance(max_per_client, bool) or not isinstance(max_per_client, int) or max_per_client < 1:
        raise ValueError(f"max waiting per client must be a positive integer, got {max_per_client!r}")
    queue = getattr(demo, "_queue", None)
    push = getattr(queue, "push", None)
    if push is None or not isinstance(getattr(queue, "event_queue_per_concurrency_id", None), dict):
        import gradio

        warnings.warn(f"max waiting per client: gradio {gradio.__version__}'s queue is not the one sd-app knows "
                      "(gradio 6.31); browser jobs are not capped per client (the HTTP API's still are)", stacklevel=2)
        return
    joining: Counter[str] = Counter()  # joins under way (between the check and the event in the queue)

    def capped(fn: Any) -> bool:
        return fn is not None and fn.api_name in prompt_inputs

    def waiting(client: str) -> int:
        queued = sum(1 for events in queue.event_queue_per_concurrency_id.values() for event in events.queue
                     if capped(event.fn) and client_address(event.request) == client)
        return queued + joining[client]

    async def admitting_push(body: Any, request: Any, username: str | None) -> tuple[bool, Any, str]:
        fn = demo.fns.get(body.fn_index) if body.fn_index is not None else None
        client = client_address(request)
        if not capped(fn) or not client:
            return await push(body=body, request=request, username=username)
        mine = waiting(client)
        if mine >= max_per_client:
            return False, refusal(client_busy_message(mine), prompt_inputs[fn.api_name]), "validator_error"
        joining[client] += 1
        try:
            return await push(body=body, request=request, username=username)
        finally:
            joining[client] -= 1
            if not joining[client]:
                del joining[client]

    queue.push = admitting_push


def queued_events(demo: gr.Blocks, session_hash: str, api_name: str) -> int:
    """How many events of the function ``api_name`` the page ``session_hash`` has waiting in Gradio's queue (not
    started); 0 where the queue is not the one sd-app knows (gradio 6.31's, as ``limit_waiting_per_client``)."""
    queue = getattr(demo, "_queue", None)
    per_concurrency_id = getattr(queue, "event_queue_per_concurrency_id", None)
    if not isinstance(per_concurrency_id, dict):
        return 0
    return sum(1 for events in per_concurrency_id.values() for event in getattr(events, "queue", [])
               if getattr(event, "session_hash", None) == session_hash
               and getattr(getattr(event, "fn", None), "api_name", None) == api_name)
