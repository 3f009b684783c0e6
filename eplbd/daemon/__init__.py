"""The coordinator daemon (``eplbd serve``).

Its pure core is plain functions and state over tensors, tested without sockets: ``state`` (the
daemon's state machine: registrations, ingest, plans, commits), ``window`` (the sliding load
window), ``scheduler`` (``decide``: when to re-plan, wait or abort), ``plans`` (plan records and
persistence), ``resize`` (elastic EP transitions). Its I/O shell: ``server`` (ZeroMQ sockets, the
uvloop event loop, the executor for heavy work), ``auth`` (CURVE and ZAP), ``metrics`` and
``observe`` (Prometheus ``/metrics``, ``/healthz``, ``/readyz``).

It imports the policies, the wire protocol and the shared foundations; never the reference engine.
"""
