"""eplbd: a standalone expert-parallel load balancing daemon for MoE inference.

This package's ``__init__`` stays import-light on purpose: ``eplbd.client`` and
``eplbd.proto`` run inside engine worker processes and must not pull in the
daemon's dependencies (uvloop, pydantic settings, the policy code).
"""

__version__ = "0.1.0"
