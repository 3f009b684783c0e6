"""One engine rank of the reference model, as ``torchrun`` starts it.

    python -m torch.distributed.run --standalone --nproc-per-node 4 -m eplbd.refengine --steps 600

Each process is one EP rank: it joins the gloo group torchrun describes (``RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ``MASTER_PORT``; ``init_process_group("gloo")`` reads them), builds the reference
MoE model with a ``LoadReporter`` and ``PlacementAgent`` (``eplbd.refengine.demo.run_rank``, the demo's own
rank loop), and serves ``--steps`` steps routed by the GPT-OSS trace.

The daemon is found the way the daemon itself is configured: ``EPLBD_RPC`` and ``EPLBD_INGEST``
(flags ``--rpc`` / ``--ingest`` win; unset, the daemon's defaults). The commit cadence must be the
same on every rank and should match the daemon's: ``--commit-interval-steps``, else
``EPLBD_COMMIT_INTERVAL_STEPS``, else the daemon's default. ``eplbd launch`` sets all three.

With ``--result-dir DIR`` each rank writes ``rank-<r>.json`` (counts, final placement, agent and
reporter statistics) and ``rank-<r>.npz`` (per-step ``loads [steps, layers, num_physical]`` and
``step_s [steps]``), which ``eplbd launch`` turns into the same summary as ``eplbd demo``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
from typing import Any, Mapping

import numpy as np

from eplbd.refengine.demo import DemoConfig
from eplbd.errors import EplbdError, InvalidArgumentError

# DemoConfig fields a rank takes as flags: (field, type, help). Everything else in DemoConfig is
# either the daemon's (window, interval, policy) or the test harness's (fault injection).
RANK_OPTIONS: tuple[tuple[str, type, str], ...] = (
    ("steps", int, "engine steps to run"),
    ("layers", int, "MoE layers (the trace's first ones; GPT-OSS-20B has 24)"),
    ("num_logical", int, "experts per layer"),
    ("top_k", int, "experts per token"),
    ("num_redundant", int, "redundant slots per layer"),
    ("hidden", int, "hidden size"),
    ("ffn", int, "expert FFN size"),
    ("tokens_per_rank", int, "tokens per rank per step"),
    ("routing", str, "'trace' (GPT-OSS routing file) or 'router' (the model's own router)"),
    ("trace", str, "GPT-OSS token-routing .npz"),
    ("communicator", str, "weight transfer backend: auto, torch_gloo, nixl"),
    ("seed", int, "weights and input seed (the same on every rank)"),
)
_ENDPOINT_FIELDS = ("rpc", "ingest")


def flag(field: str) -> str:
    """Returns: the command-line flag of a DemoConfig field (``--tokens-per-rank``)."""
    return "--" + field.replace("_", "-")


def add_rank_arguments(parser: Any) -> None:
    """The reference rank's model, routing and agent flags (shared by ``eplbd launch``).

    Args:
        parser: an ``argparse`` parser or argument group.
    """
    defaults = DemoConfig()
    for field, typ, desc in RANK_OPTIONS:
        kwargs: dict[str, Any] = {"choices": ["trace", "router"]} if field == "routing" else {}
        if field == "communicator":
            kwargs["choices"] = ["auto", "torch_gloo", "nixl"]
        parser.add_argument(flag(field), dest=field, type=typ, default=getattr(defaults, field),
                            help=f"{desc} [default {getattr(defaults, field)}]", **kwargs)
    parser.add_argument("--blocking", action="store_true", help="blocking rearrangement (vLLM's sync EPLB)")
    parser.add_argument("--check-weights", action="store_true",
                        help="after every commit also compare every slot with the original weights")


def rank_config(args: argparse.Namespace, *, ranks: int, commit_interval_steps: int) -> DemoConfig:
    """Returns: the DemoConfig of a rank from ``add_rank_arguments``' flags."""
    return DemoConfig(ranks=ranks, commit_interval_steps=commit_interval_steps, use_async=not args.blocking,
                      check_weights=args.check_weights, **{f: getattr(args, f) for f, _, _ in RANK_OPTIONS})


def rank_argv(cfg: DemoConfig) -> list[str]:
    """Returns: the flags that make ``eplbd.refengine`` run ``cfg`` (the inverse of ``rank_config``)."""
    argv = [x for f, _, _ in RANK_OPTIONS for x in (flag(f), str(getattr(cfg, f)))]
    return argv + (["--blocking"] if not cfg.use_async else []) + (["--check-weights"] if cfg.check_weights else [])


# -- results --------------------------------------------------------------------------------------
def save_result(result_dir: str | pathlib.Path, rank: int, result: Mapping[str, Any]) -> None:
    """Write a ``run_rank`` result: arrays to ``rank-<r>.npz``, the rest to ``rank-<r>.json``."""
    d = pathlib.Path(result_dir)
    d.mkdir(parents=True, exist_ok=True)
    arrays = {k: v for k, v in result.items() if isinstance(v, np.ndarray)}
    np.savez(d / f"rank-{rank}.npz", **arrays)
    rest = {k: v for k, v in result.items() if k not in arrays}
    tmp = d / f"rank-{rank}.json.tmp"
    tmp.write_text(json.dumps(rest, indent=1, default=float))
    tmp.replace(d / f"rank-{rank}.json")  # a reader never sees half a file


def load_results(result_dir: str | pathlib.Path, ranks: int) -> dict[int, dict]:
    """Read back every rank's ``save_result`` files.

    Raises:
        InvalidArgumentError: a rank's result is missing (the rank did not finish).
    """
    d = pathlib.Path(result_dir)
    out: dict[int, dict] = {}
    for r in range(ranks):
        if not (d / f"rank-{r}.json").is_file():
            raise InvalidArgumentError(f"no result from rank {r} in {str(d)!r} (did it finish?)")
        doc = json.loads((d / f"rank-{r}.json").read_text())
        with np.load(d / f"rank-{r}.npz") as z:
            doc.update({k: z[k] for k in z.files})
        out[r] = doc
    return out


# -- entry point -------------------------------------------------------------------------------------
def _env_int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name, "")
    if value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise InvalidArgumentError(f"{name}={value!r} is not an integer") from None


def _torchrun_rank(env: Mapping[str, str]) -> tuple[int, int]:
    rank, world = _env_int(env, "RANK"), _env_int(env, "WORLD_SIZE")
    if rank is None or world is None:
        raise InvalidArgumentError("RANK and WORLD_SIZE are not set: start eplbd.refengine with torchrun "
                                   "(python -m torch.distributed.run --nproc-per-node N -m eplbd.refengine)")
    return rank, world


def daemon_wiring(args: argparse.Namespace, env: Mapping[str, str]) -> tuple[str, str, int]:
    """Returns: ``(rpc, ingest, commit_interval_steps)`` from flags, else ``EPLBD_*``, else the daemon's
    defaults."""
    from eplbd.settings import DaemonSettings, env_name

    fields = DaemonSettings.model_fields
    rpc, ingest = (getattr(args, f) or env.get(env_name(f)) or fields[f].default for f in _ENDPOINT_FIELDS)
    interval = args.commit_interval_steps or _env_int(env, env_name("commit_interval_steps")) \
        or fields["commit_interval_steps"].default
    return rpc, ingest, interval


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eplbd.refengine", allow_abbrev=False,
                                description="One EP rank of the reference MoE model under torchrun, "
                                            "balanced by eplbd.")
    add_rank_arguments(p)
    p.add_argument("--rpc", default=None, help="daemon ROUTER endpoint [env EPLBD_RPC]")
    p.add_argument("--ingest", default=None, help="daemon PULL endpoint [env EPLBD_INGEST]")
    p.add_argument("--commit-interval-steps", type=int, default=None,
                   help="in-band commit cadence, the same on every rank [env EPLBD_COMMIT_INTERVAL_STEPS]")
    p.add_argument("--result-dir", default=None, help="write rank-<r>.json / .npz here")
    return p


def main(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Run one rank; returns the exit code (1 when this rank's probe outputs changed)."""
    import torch.distributed as dist

    from eplbd.refengine.demo import run_rank
    from eplbd.refengine.procs import die_with_parent

    env = os.environ if env is None else env
    args = build_parser().parse_args(argv)
    rank, world = _torchrun_rank(env)
    rpc, ingest, interval = daemon_wiring(args, env)
    cfg = rank_config(args, ranks=world, commit_interval_steps=interval)
    if cfg.routing == "trace" and not pathlib.Path(cfg.trace).is_file():
        raise InvalidArgumentError(f"routing trace {cfg.trace!r} not found (pass --trace or --routing router)")
    die_with_parent()  # torchrun stops its ranks on the way out; if it is killed, the kernel does
    dist.init_process_group("gloo")
    try:
        result = run_rank(rank, cfg, rpc, ingest)
    finally:
        dist.destroy_process_group()
    if args.result_dir:
        save_result(args.result_dir, rank, result)
    same = result["mismatches"] == 0
    print(f"rank {rank}/{world}: {cfg.steps} steps, epoch {result['epoch']}, "
          f"{result['stats']['plans_committed']} plans committed, {result['probes']} probes, "
          f"outputs {'identical' if same else 'CHANGED'}", flush=True)
    return 0 if same else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except EplbdError as exc:
        print(f"eplbd.refengine: error: {exc}", file=sys.stderr)
        sys.exit(1)
