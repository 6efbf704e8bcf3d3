"""The inbound core: every decision about an inbound request, made once for every adapter.

Adapters (ASGI, WSGI, Django, Flask) only translate: their request into (method, path,
``X-Request-ID``, ``traceparent``, ``Accept``), their response into (status, a header
the function that reads one field of them), and what the core answers back into their
own types. One request::

    ctx = start(guard, method, path, request_id, traceparent)   # exempt, route, id, deadline
    refusal = admit(ctx)        # or: try_admit(ctx) or await admit_async(ctx)
    if refusal is not None:     # a dependency is down, or shedding: answer it ourselves
        send(respond(ctx, refusal, accept, method))
    set the request context; run the app:
        at its response start:  on_response_start(ctx, status, headers, read)
            -> AppError: send respond(ctx, it, accept, method) instead, drop the app's body
            -> (name, value): add that field;  None: send the response as it is
        on an exception:        as_upstream_error(exc) -> None: not ours, let it go;
                                else respond(...) before the response started, or
                                log_gateway_error(ctx, error, started=True) and abort after
    finally: reset the request context; release(ctx)   # gives back the slot, once

A framework with error handlers of its own (Flask) answers a gateway error through them:
:func:`respond` renders our page, :func:`handler_headers` says which of its fields a
handler's response gets.

==========================  ===================================================
decision                    where
==========================  ===================================================
exempt, route, request id,  :func:`start` (``_start.py``)
trace, deadline
dependency down (503)       :func:`start` and :func:`view_policy` (``_admission.py``)
shedding: admit, queue,     :func:`admit`, :func:`try_admit`, :func:`admit_async`,
priorities, release         :func:`release` (``_admission.py``)
re-branding the app's 5xx,  :func:`on_response_start` (``_response.py``)
the request id it gets
a handler response's        :func:`handler_headers` (``_response.py``)
fields
ours or not, log, page      :func:`as_upstream_error`, :func:`log_gateway_error`,
                            :func:`respond` (``_errors.py``)
our own endpoints           ``guard.endpoints``, :class:`Served` (``_endpoints.py``)
==========================  ===================================================
"""

# The adapters' interface. Re-exported explicitly (``X as X``) rather than through
# ``__all__``: none of it is public API (docs/api.md), so ``__all__`` stays empty.
# What a page is negotiated by; the adapters gather it only when they render one.
from gateway_guard._negotiate import Wants as Wants

from ._admission import admit as admit
from ._admission import admit_async as admit_async
from ._admission import inbound_shed as inbound_shed
from ._admission import release as release
from ._admission import try_admit as try_admit
from ._endpoints import Served as Served
from ._errors import GATEWAY_EXCEPTIONS as GATEWAY_EXCEPTIONS
from ._errors import as_upstream_error as as_upstream_error
from ._errors import log_gateway_error as log_gateway_error
from ._errors import render_error as render_error
from ._errors import respond as respond
from ._response import BRANDABLE as BRANDABLE
from ._response import REQUEST_ID as REQUEST_ID
from ._response import AppError as AppError
from ._response import FieldReader as FieldReader
from ._response import handler_headers as handler_headers
from ._response import on_response_start as on_response_start
from ._start import start as start
from ._start import view_policy as view_policy

__all__: list[str] = []
