"""eplbctl: the operator CLI for a running eplbd.

Usage: ``eplbctl [--endpoint ENDPOINT] [--timeout SECONDS] [--curve-client-key FILE --curve-server-key FILE]
[--json] COMMAND [ARGS]``

``--endpoint`` defaults to ``$EPLBD_RPC``, else ``tcp://127.0.0.1:7450``; ``--timeout`` (default 5)
bounds each request. ``--json`` (also accepted after the command) prints exactly one JSON object
on stdout: the daemon's reply as plain JSON (tensors as nested lists, ``req_id`` left out).
For a daemon with CURVE on, ``--curve-client-key`` names an operator's ``NAME.key_secret`` and
``--curve-server-key`` the daemon's public ``NAME.key`` (``eplbd keygen``); defaults
``$EPLBD_CURVE_CLIENT_KEY`` and ``$EPLBD_CURVE_SERVER_KEY``.

Commands:

``status``
    Epoch, step, paused, window fill/size, EP size, policy, next scheduled re-plan; a table of
    workers (rank, worker id, alive, seconds since last seen, epoch, host); the current plan
    (id, epoch, state, reason, moved slots/bytes, phase timings); the last decision reason;
    load reports received and dropped, with the drop reasons.
``balancedness [--per-layer] [--per-rank]``
    Observed and predicted (if re-planned now) balancedness, min/p50/p90/mean/aggregate, over the
    window. ``--per-layer`` adds one row per layer; ``--per-rank`` the mean load per rank
    (a layers x ranks matrix).
    ``--watch [SECONDS]`` (default 2) redraws a live view every SECONDS until Ctrl-C (exit 0): epoch,
    step and plan state, per-layer balancedness and each rank's share of the load; it keeps trying
    while the daemon is unreachable. With ``--json``: one JSON line per refresh (``eplbd.client.watch``).
``rebalance [--dry-run] [--layers 0,3,5] [--policy NAME] [--force]``
    Plan now: prints whether the plan was pushed, computed only (dry run) or skipped and why,
    the predicted balancedness before -> after, and the slots/bytes it moves. ``--force`` pushes
    even below the daemon's ``min_gain``.
``pause [--reason TEXT]`` / ``resume``
    Stop / restart scheduled re-planning (manual ``rebalance`` still works while paused).
``plan [--epoch N | --id N]``
    The plan that produced epoch N, or plan N (default: the latest).
``placement [--epoch N]``
    The phy2log placement in force (at epoch N), one row per layer, slots grouped by rank.
    JSON: ``{"epoch": N, "phy2log": [[...]], "ep_size": G}``.
``dump PATH``
    The daemon writes its load window as a trace (``eplbd.offline.trace``) to PATH on *its* filesystem;
    PATH is made absolute here first.
``load-placement PATH [--dry-run] [--moe-layers IDS [--num-hidden-layers N] | --model-config CONFIG_JSON]``
    Push the placement in PATH (daemon's filesystem, made absolute here); prints as ``rebalance``.
    For an SGLang file of a model with dense layers (one row per decoder layer: DeepSeek-V3/R1 has 61,
    the daemon 58) name the MoE layers (``--moe-layers 3-60``) or the model's ``config.json`` (read
    here): the daemon keeps the MoE layers' rows of PATH and refuses a file with neither row count.
``config get [KEY]`` / ``config set KEY VALUE``
    Show the daemon's live config (or one key), or change one key. VALUE is parsed as JSON when it
    parses (``50``, ``true``, ``0.02``), else sent as a string; the daemon coerces and validates.
    JSON output: ``{"config": {...}}`` (only KEY for ``get KEY``).
``resize --mapping 0,1,2,-1 [--ep-size N] [--dry-run]``
    Elastic EP: ranks leave or join. ``--mapping`` gives each current rank's new number, -1 when it
    leaves (write ``--mapping=-1,0,1`` when it starts with -1); ``--ep-size`` the new group size
    (default: the surviving ranks; larger adds joining ranks). The daemon drains the plan in flight,
    plans the new group (every expert keeps a replica) and prints the orphans: experts whose only
    copies were on removed ranks, which the engine must reload. ``status`` shows the latest resize.

Exit codes: 0 ok; 1 the daemon answered with an error (``eplbctl: error: NAME: MESSAGE`` on stderr,
NAME as in ``eplbd.errors``; also ``config get`` of an unknown key); 2 usage error; 3 the daemon
did not answer within ``--timeout``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable

import msgspec

from eplbd.client import watch
from eplbd.client.render import (render_balancedness, render_config, render_placement, render_plan, render_rebalance, render_resize, render_status, to_jsonable)
from eplbd.errors import ConfigError, EplbdError, NotFoundError, UnavailableError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_UNAVAILABLE = 0, 1, 2, 3


# --- requests: (client, args) -> reply ------------------------------------------------------------
def do_config(c: Any, args: argparse.Namespace) -> Any:
    if args.action == "set":
        reply = c.set_config(args.key, args.value)
        key = args.key
    else:
        reply, key = c.get_config(), args.key
    if key is not None:
        if key not in reply.config:
            raise NotFoundError(f"no config key {key!r} (keys: {', '.join(sorted(reply.config))})")
        reply.config = {key: reply.config[key]}
    return reply


def do_load_placement(c: Any, args: argparse.Namespace) -> Any:
    from eplbd.integrations.sglang import LayerAxis  # imports torch: not for --help

    layers = LayerAxis.from_flags(args.moe_layers, args.model_config, args.num_hidden_layers)
    if layers is None:
        return c.load_placement(args.path, dry_run=args.dry_run)
    return c.load_placement(args.path, dry_run=args.dry_run, moe_layers=list(layers.moe_layers),
                            num_hidden_layers=layers.num_hidden_layers)


def _json_or_str(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer numbers, got {text!r}") from None


def _mapping(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected one new rank (or -1) per current rank, comma-separated, "
                                         f"got {text!r}") from None


def _abspath(text: str) -> str:
    return os.path.abspath(os.path.expanduser(text))


def _say(msg: str) -> Callable[[Any, argparse.Namespace], list[str]]:
    """A one-line renderer: ``msg`` formatted with ``reply`` and ``args``."""
    return lambda reply, args: [msg.format(reply=reply, args=args)]


# --- the one dispatch table: name -> (help, arguments, request, renderer) -------------------------
def A(*flags: str, **kw: Any) -> tuple:
    """One ``add_argument`` call, as data."""
    return flags, kw


COMMANDS: dict[str, tuple[str, list, Callable, Callable]] = {
    "status": ("epoch, workers, current plan, report counters", [],
               lambda c, a: c.status(), render_status),
    "balancedness": ("observed and predicted balancedness",
                     [A("--per-layer", action="store_true"), A("--per-rank", action="store_true"),
                      A("--watch", nargs="?", const=2.0, type=watch.seconds, metavar="SECONDS",
                        help="redraw a live view every SECONDS (default 2) until Ctrl-C"),
                      A("--count", type=int, help=argparse.SUPPRESS)],  # stop after N refreshes (tests)
                     lambda c, a: c.balancedness(per_layer=a.per_layer, per_rank=a.per_rank) if a.watch is None
                     else watch.Watched(watch.watch(c, a)), render_balancedness),
    "rebalance": ("plan (and push) a new placement now",
                  [A("--dry-run", action="store_true"), A("--layers", type=_int_list, metavar="0,3,5"),
                   A("--policy", metavar="NAME"), A("--force", action="store_true")],
                  lambda c, a: c.rebalance(dry_run=a.dry_run, layers=a.layers, policy=a.policy, force=a.force),
                  render_rebalance),
    "pause": ("stop scheduled re-planning", [A("--reason", default="", metavar="TEXT")],
              lambda c, a: c.pause(a.reason), lambda r, a: ["paused" + (f": {a.reason}" if a.reason else "")]),
    "resume": ("restart scheduled re-planning", [], lambda c, a: c.resume(), _say("resumed")),
    "plan": ("show a plan (default: the latest)",
             [A("--epoch", type=int, metavar="N"), A("--id", type=int, metavar="N", dest="plan_id")],
             lambda c, a: c.get_plan(epoch=a.epoch, plan_id=a.plan_id), lambda r, a: render_plan(r)),
    "placement": ("show the phy2log placement", [A("--epoch", type=int, metavar="N")],
                  lambda c, a: c.get_placement(a.epoch), render_placement),
    "dump": ("daemon writes its load window to PATH (its filesystem)", [A("path", type=_abspath)],
             lambda c, a: c.dump_window(a.path), _say("daemon wrote {reply.steps} steps to {reply.path}")),
    "load-placement": ("push the placement in PATH (daemon's filesystem)",
                       [A("path", type=_abspath), A("--dry-run", action="store_true"),
                        A("--moe-layers", metavar="IDS",
                          help="the model's MoE layers by decoder layer number (e.g. 3-60 for DeepSeek-V3/R1): "
                               "PATH has a row per decoder layer and is cut to them here"),
                        A("--num-hidden-layers", type=int, metavar="N",
                          help="decoder layers, with --moe-layers (default: the last MoE layer + 1)"),
                        A("--model-config", metavar="CONFIG_JSON",
                          help="read the MoE layers from the model's Hugging Face config.json")],
                       do_load_placement, render_rebalance),
    "config": ("get or set the daemon's live config", [], do_config, render_config),
    "resize": ("elastic EP: ranks leave or join the group",
               [A("--mapping", type=_mapping, required=True, metavar="0,1,2,-1"),
                A("--ep-size", type=int, default=0, metavar="N"), A("--dry-run", action="store_true")],
               lambda c, a: c.resize(a.mapping, ep_size=a.ep_size, dry_run=a.dry_run), lambda r, a: render_resize(r)),
}


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print one JSON object on stdout")
    parser = argparse.ArgumentParser(prog="eplbctl", allow_abbrev=False, parents=[common],
                                     description="Operator CLI for eplbd.", epilog="exit codes: 0 ok, 1 daemon "
                                     "error, 2 usage error, 3 daemon unreachable")
    parser.add_argument("--endpoint", default=os.environ.get("EPLBD_RPC", "tcp://127.0.0.1:7450"),
                        help="the daemon's RPC endpoint (default: $EPLBD_RPC or tcp://127.0.0.1:7450)")
    parser.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS", help="per-request timeout")
    parser.add_argument("--curve-client-key", metavar="FILE",
                        help="operator key (NAME.key_secret) for a daemon with CURVE on "
                             "(default: $EPLBD_CURVE_CLIENT_KEY)")
    parser.add_argument("--curve-server-key", metavar="FILE",
                        help="the daemon's public key (NAME.key) (default: $EPLBD_CURVE_SERVER_KEY)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_, arguments, _, _) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_, allow_abbrev=False, parents=[common])
        for flags, kw in arguments:
            p.add_argument(*flags, **kw)
    config = sub.choices["config"].add_subparsers(dest="action", required=True, metavar="ACTION")
    config.add_parser("get", parents=[common], allow_abbrev=False).add_argument("key", nargs="?")
    cset = config.add_parser("set", parents=[common], allow_abbrev=False)
    cset.add_argument("key")
    cset.add_argument("value", type=_json_or_str, help="parsed as JSON if it parses, else a string")
    return parser


def _curve_keys(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Any:
    """The ``CurveKeys`` given by ``--curve-client-key``/``--curve-server-key`` or their
    environment variables (both or neither); None for a daemon without CURVE."""
    from eplbd.proto.sockets import CLIENT_KEY_ENV, SERVER_KEY_ENV, CurveKeys  # imports torch: not for --help

    client = args.curve_client_key or os.environ.get(CLIENT_KEY_ENV) or None
    server = args.curve_server_key or os.environ.get(SERVER_KEY_ENV) or None
    if client is None and server is None:
        return None
    if client is None or server is None:
        parser.error("CURVE needs both --curve-client-key and --curve-server-key "
                     f"(or ${CLIENT_KEY_ENV} and ${SERVER_KEY_ENV})")
    try:
        return CurveKeys.from_files(client, server)
    except ConfigError as exc:
        parser.error(str(exc))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.timeout > 0:
        parser.error(f"--timeout must be > 0, got {args.timeout:g}")
    _, _, request, render = COMMANDS[args.command]
    import zmq

    from eplbd.client.rpc import EplbClient

    curve = _curve_keys(parser, args)
    ctx = zmq.Context()
    try:
        with EplbClient(args.endpoint, timeout=args.timeout, ctx=ctx, curve=curve) as client:
            reply = request(client, args)
    except zmq.ZMQError as exc:  # only connect() can fail here: a malformed endpoint
        print(f"eplbctl: error: bad --endpoint {args.endpoint!r}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except UnavailableError as exc:
        print(f"eplbctl: error: {exc.name}: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except EplbdError as exc:
        print(f"eplbctl: error: {exc.name}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        ctx.destroy(linger=0)
    if isinstance(reply, watch.Watched):  # balancedness --watch printed its frames itself
        return reply.code
    if getattr(args, "json", False):
        sys.stdout.write(msgspec.json.encode(to_jsonable(reply)).decode() + "\n")
    else:
        print("\n".join(render(reply, args)))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
