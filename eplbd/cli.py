"""The ``eplbd`` command line: ``eplbd <subcommand> ...``.

Exit codes: 0 ok, 1 an error eplbd raised on purpose (message on stderr),
2 usage error.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

from eplbd.errors import EplbdError, InvalidArgumentError


def _add_replay(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("replay", allow_abbrev=False, help="evaluate policies offline on a load trace",
                       description="Run the daemon's window and schedule over a trace and report "
                                   "balancedness with and without rebalancing.")
    p.add_argument("trace", help="trace .npz (key 'load' [steps, layers, experts]) or a token-routing "
                                 ".npz (converted on the fly)")
    p.add_argument("--num-gpus", type=int, required=True, help="ranks in the EP group")
    p.add_argument("--num-redundant", type=int, default=0, help="redundant slots per layer")
    p.add_argument("--num-nodes", type=int, default=1)
    p.add_argument("--num-groups", type=int, default=1)
    p.add_argument("--window-size", type=int, default=1000)
    p.add_argument("--step-interval", type=int, default=3000)
    p.add_argument("--min-gain", type=float, default=0.0,
                   help="skip plans whose predicted gain is below this (default 0: never skip)")
    p.add_argument("--policy", default="default",
                   help="policy name, or several separated by commas to compare them (default,incremental)")
    p.add_argument("--expert-bytes", type=int, default=0,
                   help="bytes of one expert's tensors: report moved bytes and apply the transfer-cost gate")
    p.add_argument("--move-budget", type=int, default=None,
                   help="most slots one plan may fill from another rank (movement-aware policies)")
    p.add_argument("--replan-below", type=float, default=1.0,
                   help="re-plan only layers whose predicted balancedness is below this (default 1: all)")
    p.add_argument("--min-gain-per-transfer-s", type=float, default=0.0,
                   help="skip plans buying less balancedness per transfer second (needs --expert-bytes; "
                        "default 0: off)")
    p.add_argument("--transfer-gb-per-s", type=float, default=25.0, help="per-rank transfer bandwidth, GB/s")
    p.add_argument("--plot", metavar="PNG", default=None,
                   help="write balancedness over steps, one line per policy (needs matplotlib: eplbd[plot])")
    p.add_argument("--placement", default="linear", choices=["linear", "round_robin"],
                   help="initial placement strategy")
    p.add_argument("--batch", type=int, default=64, help="token-routing input: requests in flight")
    p.add_argument("--order", default="shuffle", choices=["shuffle", "file"],
                   help="token-routing input: request admission order")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_layer_arguments(p)
    p.set_defaults(func=_cmd_replay)


def _add_layer_arguments(p: argparse.ArgumentParser) -> None:
    """``--moe-layers`` / ``--model-config`` / ``--num-hidden-layers``: read by ``_layer_axis``."""
    g = p.add_argument_group(
        "layer axis", "SGLang's files have one row per decoder layer, dense layers included; eplbd's one per MoE "
                      "layer. Name the MoE layers for a model with dense layers (DeepSeek-V3/R1: --moe-layers 3-60); "
                      "without either flag every row is taken as a MoE layer.")
    x = g.add_mutually_exclusive_group()
    x.add_argument("--moe-layers", metavar="IDS", help="the MoE layers by decoder layer number, e.g. 3-60 or 0,2,4-7")
    x.add_argument("--model-config", metavar="CONFIG_JSON",
                   help="read the MoE layers from the model's Hugging Face config.json")
    g.add_argument("--num-hidden-layers", type=int, metavar="N",
                   help="decoder layers, with --moe-layers (default: the last MoE layer + 1)")


def _layer_axis(args: argparse.Namespace):
    """The ``LayerAxis`` the layer flags name, or None (rows are MoE layers)."""
    from eplbd.integrations.sglang import LayerAxis

    return LayerAxis.from_flags(args.moe_layers, args.model_config, args.num_hidden_layers)


def _load_any_trace(path: str, batch: int, order: str, quiet: bool, layers=None):
    """The trace in ``path`` (converted from token routing if it is that), its rows cut to the MoE layers of
    ``layers`` (a ``LayerAxis``) when given."""
    trace = _read_any_trace(path, batch, order, quiet)
    if layers is not None:
        trace.load = layers.moe_load(trace.load, where=path)
    elif trace.meta.get("format") == "sglang":
        empty = [i for i in range(trace.num_layers) if not trace.load[:, i].any()]
        if empty:
            print(f"note: {path}: layer rows {empty[:8]}{'...' if len(empty) > 8 else ''} hold no tokens; SGLang "
                  "writes a row per decoder layer, so if these are dense layers pass --moe-layers or "
                  "--model-config (DeepSeek-V3/R1: --moe-layers 3-60), or they count as idle MoE layers",
                  file=sys.stderr)
    return trace


def _read_any_trace(path: str, batch: int, order: str, quiet: bool):
    from eplbd.offline.trace import convert_routing_file, is_token_routing, load_trace

    if is_token_routing(path):
        t0 = time.perf_counter()
        trace = convert_routing_file(path, batch=batch, order=order)
        if not quiet:
            m = trace.meta
            print(f"converted token routing {pathlib.Path(path).name}: {m['requests']} requests "
                  f"({m['dropped_repetitive']} repetitive dropped), batch {batch}, order {order} -> "
                  f"{trace.load.shape[0]} steps x {trace.num_layers} layers x {trace.num_logical} experts "
                  f"in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        return trace
    return load_trace(path)


def _cmd_replay(args: argparse.Namespace) -> int:
    from eplbd.config import make_eplb_config
    from eplbd.offline.replay import replay, stderr_progress
    from eplbd.daemon.scheduler import Topology

    trace = _load_any_trace(args.trace, args.batch, args.order, args.json, _layer_axis(args))
    policies = [p.strip() for p in args.policy.split(",") if p.strip()]
    config = make_eplb_config(window_size=args.window_size, step_interval=args.step_interval,
                              num_redundant_experts=args.num_redundant, min_gain=args.min_gain,
                              policy=policies[0] if policies else "", move_budget=args.move_budget,
                              replan_below=args.replan_below, transfer_gb_per_s=args.transfer_gb_per_s,
                              min_gain_per_transfer_s=args.min_gain_per_transfer_s)
    if args.expert_bytes < 0:
        raise EplbdError(f"--expert-bytes must be >= 0, got {args.expert_bytes}")
    for name in policies[1:]:
        make_eplb_config(policy=name)  # validates the name with a clear error
    topo = Topology(num_layers=trace.num_layers, num_logical=trace.num_logical,
                    num_physical=trace.num_logical + args.num_redundant, num_gpus=args.num_gpus,
                    num_nodes=args.num_nodes, num_groups=args.num_groups)
    if topo.num_physical % topo.num_gpus:
        raise EplbdError(f"--num-gpus {args.num_gpus} does not divide {topo.num_physical} physical slots "
                         f"({trace.num_logical} experts + {args.num_redundant} redundant)")
    progress = stderr_progress() if trace.load.shape[0] >= 2000 else None
    results = [replay(trace, topo, config, policy=name, placement=args.placement,
                      expert_bytes=args.expert_bytes, progress=progress) for name in policies]
    if args.plot:
        from eplbd.offline.replay import plot_balancedness

        plot_balancedness(results, args.plot)
    if args.json:
        docs = [r.as_dict(with_decisions=True) for r in results]
        out = docs[0] if len(docs) == 1 else {"results": docs}
        print(json.dumps(out))
        return 0
    print(f"trace: {trace.load.shape[0]} steps, {trace.num_layers} layers x {trace.num_logical} experts; "
          f"EP {topo.num_gpus} GPUs, {topo.num_physical} slots/layer ({args.num_redundant} redundant); "
          f"window {config.window_size}, re-plan every {config.step_interval} steps")
    print(f"{'policy':<12} {'static':>7} {'balanced':>8} {'rebal':>5} {'skipped':>7} {'moved slots':>15} "
          f"{'moved GB':>9} {'ms/call':>8} {'total s':>8}")
    for r in results:
        moved = f"{r.moved_slots}/{r.total_slots * max(r.rebalances, 1)}"
        gb = f"{r.moved_bytes / 1e9:.3f}" if r.expert_bytes else "-"
        print(f"{r.policy:<12} {r.mean_balancedness_static:>7.4f} {r.mean_balancedness:>8.4f} {r.rebalances:>5} "
              f"{r.skipped:>7} {moved:>15} {gb:>9} {r.policy_ms_mean:>8.2f} {r.policy_s_total:>8.2f}")
    print("balancedness = mean rank load / max rank load per step and layer, averaged (1.0 = perfect); "
          "static = initial placement kept throughout.")
    for r in results:
        if r.mean_balancedness_static > 0:
            gain = r.mean_balancedness / r.mean_balancedness_static - 1
            print(f"{r.policy}: rebalancing every {config.step_interval} steps takes balancedness from "
                  f"{r.mean_balancedness_static:.3f} to {r.mean_balancedness:.3f} ({gain:+.0%}): the slowest GPU "
                  f"waits {1 / r.mean_balancedness_static - 1 / r.mean_balancedness:.2f}x the mean load less "
                  f"per step; each re-plan moved {r.moved_slots / max(r.rebalances, 1) / r.total_slots:.0%} of slots.")
    base = results[0]
    for r in results[1:]:
        gain0 = base.mean_balancedness - base.mean_balancedness_static
        if gain0 > 0 and base.moved_slots:
            print(f"{r.policy} vs {base.policy}: "
                  f"{(r.mean_balancedness - r.mean_balancedness_static) / gain0:.1%} of the balancedness gain "
                  f"with {r.moved_slots / base.moved_slots:.1%} of the moved slots")
    if args.plot:
        print(f"plot written to {args.plot}")
    return 0


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert-trace", allow_abbrev=False, help="build a load trace from token-level routing",
                       description="Simulate continuous batching over per-token routing "
                                   "(experts [tokens, layers, top_k] + request_offsets) and write a trace.")
    p.add_argument("routing", help="token-routing .npz")
    p.add_argument("-o", "--output", required=True, help="trace .npz to write")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--order", default="shuffle", choices=["shuffle", "file"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep-repetitive", action="store_true", help="keep requests that loop on repeated text")
    p.set_defaults(func=_cmd_convert)


def _cmd_convert(args: argparse.Namespace) -> int:
    from eplbd.offline.trace import convert_routing_file, save_trace

    trace = convert_routing_file(args.routing, batch=args.batch, order=args.order, seed=args.seed,
                                 drop_repetitive=not args.keep_repetitive)
    save_trace(args.output, trace.load, steps=trace.steps, meta=trace.meta)
    print(f"wrote {args.output}: load {list(trace.load.shape)} ({trace.meta['requests']} requests)")
    return 0


def _add_convert_files(sub: argparse._SubParsersAction) -> None:
    for kind, what in (("placement", "a placement (ours: JSON {\"phy2log\": ...}; SGLang: .json/.pt with "
                                     "physical_to_logical_map)"),
                       ("load", "a load trace (ours: .npz; SGLang: .json/.pt with logical_count)")):
        p = sub.add_parser(f"convert-{kind}", allow_abbrev=False, help=f"convert {what}",
                           description=f"Read {what} in either format and write it in the one --format names "
                                       "(auto: .pt -> sglang, .npz -> eplbd, .json -> "
                                       f"{'eplbd' if kind == 'placement' else 'sglang'}).")
        p.add_argument("input", help="file to read (format told by its keys)")
        p.add_argument("-o", "--output", required=True, help="file to write")
        p.add_argument("--format", default="auto", choices=["auto", "eplbd", "sglang"])
        _add_layer_arguments(p)
        p.set_defaults(func=_cmd_convert_placement if kind == "placement" else _cmd_convert_load)


def _out_format(fmt: str, output: str, ours: str, json_default: str) -> str:
    """The format to write: ``fmt``, or from the suffix; refuses a suffix the format cannot have."""
    suffix = pathlib.Path(output).suffix
    if fmt == "auto":
        fmt = {".pt": "sglang", ".npz": "eplbd", ".json": json_default}.get(suffix, "")
        if not fmt:
            raise InvalidArgumentError(f"cannot tell the format of {output!r} from its suffix; pass --format")
    allowed = (".pt", ".json") if fmt == "sglang" else (ours,)
    if suffix not in allowed:
        raise InvalidArgumentError(f"--format {fmt} writes {' or '.join(allowed)} files, not {output!r}")
    return fmt


def _cmd_convert_placement(args: argparse.Namespace) -> int:
    from eplbd.integrations.sglang import write_placement
    from eplbd.daemon.plans import read_placement_file, write_placement_file

    layers = _layer_axis(args)
    phy2log = read_placement_file(args.input)
    if layers is not None:
        phy2log = layers.moe_placement(phy2log, where=f"placement file {args.input!r}")
    fmt = _out_format(args.format, args.output, ".json", "eplbd")
    if fmt == "sglang":
        write_placement(args.output, phy2log, layers)
    else:
        write_placement_file(args.output, phy2log)
    rows = layers.num_hidden_layers if layers is not None and fmt == "sglang" else phy2log.shape[0]
    print(f"wrote {args.output}: {fmt} placement, {rows} layers x {phy2log.shape[1]} slots{_layers_note(layers)}")
    return 0


def _layers_note(layers) -> str:
    return "" if layers is None else f" ({layers.describe()})"


def _cmd_convert_load(args: argparse.Namespace) -> int:
    from eplbd.integrations.sglang import write_load
    from eplbd.offline.trace import save_trace

    layers = _layer_axis(args)
    trace = _load_any_trace(args.input, 64, "shuffle", True, layers)
    fmt = _out_format(args.format, args.output, ".npz", "sglang")
    if fmt == "sglang":
        write_load(args.output, trace.load, layers)
    else:
        save_trace(args.output, trace.load, steps=trace.steps, meta=trace.meta)
    rows = layers.num_hidden_layers if layers is not None and fmt == "sglang" else trace.num_layers
    print(f"wrote {args.output}: {fmt} load, {trace.load.shape[0]} steps x {rows} layers x "
          f"{trace.num_logical} experts{_layers_note(layers)}")
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    from eplbd.refengine.demo import DEFAULT_TRACE

    p = sub.add_parser("demo", allow_abbrev=False, help="embedded daemon + N worker processes of the reference model",
                       description="Start an embedded daemon and N CPU worker processes of the reference EP MoE "
                                   "model driven by the GPT-OSS-20B routing trace; rebalance live and check that "
                                   "the model's output never changes.")
    p.add_argument("--ranks", type=int, default=4, help="EP ranks (worker processes)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--layers", type=int, default=8, help="MoE layers (the trace's first ones; GPT-OSS-20B has 24)")
    p.add_argument("--communicator", default="auto", choices=["auto", "torch_gloo", "nixl"])
    p.add_argument("--blocking", action="store_true", help="blocking rearrangement (vLLM's sync EPLB) as a baseline")
    p.add_argument("--routing", default="trace", choices=["trace", "router"],
                   help="route tokens by the recorded trace (default) or by the model's own router")
    p.add_argument("--trace", default=str(DEFAULT_TRACE), help="GPT-OSS token-routing .npz")
    p.add_argument("--check-weights", action="store_true", help="also compare every slot with the original weights")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from eplbd.refengine.demo import main_from_args

    setup_logging("WARNING", False)
    return main_from_args(args)


def _add_launch(sub: argparse._SubParsersAction) -> None:
    from eplbd.refengine.launch import add_arguments

    p = sub.add_parser("launch", allow_abbrev=False, help="eplbd serve + N engine ranks under torchrun",
                       description="Start eplbd serve, then N ranks of the reference model (or your engine, "
                                   "after --) with torchrun, wired by EPLBD_RPC / EPLBD_INGEST; stop the daemon "
                                   "when the ranks exit, everything on Ctrl-C.")
    add_arguments(p)
    p.set_defaults(func=_cmd_launch)


def _cmd_launch(args: argparse.Namespace) -> int:
    from eplbd.refengine.launch import main_from_args

    setup_logging("WARNING", False)
    return main_from_args(args)


def _add_serve(sub: argparse._SubParsersAction) -> None:
    from eplbd.settings import add_settings_arguments

    p = sub.add_parser("serve", allow_abbrev=False, help="run the daemon",
                       description="Run the coordinator: bind the ingest (PULL) and RPC (ROUTER) sockets and "
                                   "the metrics port, then balance. Precedence: flags > EPLBD_* env > TOML > "
                                   "defaults. Prints 'READY rpc=... ingest=... metrics_port=...' once bound.")
    add_settings_arguments(p)
    p.set_defaults(func=_cmd_serve)


def setup_logging(level: str = "INFO", as_json: bool = False) -> None:
    """Structured logs on stderr: key=value text, or one JSON object a line."""
    import logging

    class _Json(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            doc = {"ts": round(record.created, 3), "level": record.levelname, "logger": record.name,
                   "msg": record.getMessage()}
            if record.exc_info:
                doc["exc"] = self.formatException(record.exc_info)
            return json.dumps(doc)

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Json() if as_json else logging.Formatter(
        "ts=%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvloop

    from eplbd.daemon.server import serve
    from eplbd.settings import settings_from_args

    settings = settings_from_args(args)
    setup_logging(settings.log_level, settings.log_json)
    uvloop.run(serve(settings))
    return 0


def _add_keygen(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("keygen", allow_abbrev=False, help="write a CURVE key pair",
                       description="Write DIR/NAME.key (public) and DIR/NAME.key_secret (secret, mode 600) for "
                                   "CURVE: one pair for the daemon (curve_secret_key_file), one per worker or "
                                   "operator (public .key into curve_worker_keys_dir / curve_operator_keys_dir). "
                                   "Existing files are never overwritten.")
    p.add_argument("dir", help="directory to write to (created, mode 700, if missing)")
    p.add_argument("--name", default="eplbd", help="key name: file stem and the name in logs (default: eplbd)")
    p.set_defaults(func=_cmd_keygen)


def _cmd_keygen(args: argparse.Namespace) -> int:
    from eplbd.daemon.auth import keygen

    public, secret = keygen(args.dir, args.name)
    print(f"wrote {public} (public: give it to the other side) and {secret} (secret: keep it here)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eplbd", allow_abbrev=False, description="Expert-parallel load balancing daemon.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve(sub)
    _add_replay(sub)
    _add_convert(sub)
    _add_convert_files(sub)
    _add_demo(sub)
    _add_launch(sub)
    _add_keygen(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except EplbdError as exc:
        print(f"eplbd {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
