"""Offline tools: load traces and their conversions (``trace``), replaying a trace through the
policies without an engine (``replay``, ``eplbd replay``), and the generated example settings file
(``example_config``)."""
