"""The project's own reference engine, for tests, the demo and benchmarks: a small expert-parallel
MoE model in torch (``model``), one engine rank under torchrun (``rank``, ``python -m
eplbd.refengine``), the embedded demo (``demo``) and its fault scenarios (``faults``), and the
launcher of a daemon plus ranks (``launch``). Nothing in the daemon imports it."""
