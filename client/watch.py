"""``eplbctl balancedness --watch [SECONDS]``: a live view of balancedness, refreshed until Ctrl-C.

Each refresh asks the daemon for its status and its balancedness (per layer and per rank) and
draws one frame: the epoch, step and plan state, observed and predicted balancedness with one row
per layer, and each rank's load relative to the mean. On a terminal the frame replaces the
previous one; piped, frames follow each other. With ``--json`` each refresh is one JSON line:
``{"ts", "reachable", "epoch", "step", "plan", "balancedness"}``, or ``{"ts", "reachable": false,
"error"}`` while the daemon does not answer: the view keeps trying and comes back by itself when
the daemon does. Ctrl-C ends it with exit code 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, TextIO

import msgspec

from eplbd.errors import EplbdError, UnavailableError

CLEAR = "\x1b[H\x1b[J"  # cursor home, erase to the end of the screen


def seconds(text: str) -> float:
    """``--watch`` value: a refresh period > 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a refresh period in seconds > 0, got {text!r}")
    return value


def rank_shares(per_rank_load: Any) -> list[float]:
    """Each rank's load summed over layers, divided by the mean rank's (1.0 = an even share).

    Args:
        per_rank_load: ``[layers, ranks]`` mean load per step.
    """
    totals = per_rank_load.sum(0).tolist()
    mean = sum(totals) / len(totals) if totals else 0.0
    return [t / mean if mean > 0 else 0.0 for t in totals]


def _plan_line(status: Any) -> str:
    p = status.current_plan
    plan = f"plan {p.plan_id} {p.state} (epoch {p.base_epoch} -> {p.epoch})" if p else "no plan yet"
    return (f"epoch {status.epoch}  step {status.step}  {plan}  paused {'yes' if status.paused else 'no'}  "
            f"workers {sum(w.alive for w in status.workers)}/{status.ep_size}")


def frame_lines(status: Any, bal: Any, args: argparse.Namespace) -> list[str]:
    """One human frame from a ``StatusReply`` and a ``BalancednessReply`` (may be an error text)."""
    from eplbd.client.render import render_balancedness, table

    out = [_plan_line(status)]
    if isinstance(bal, str):
        return out + [f"balancedness: {bal}"]
    out += render_balancedness(msgspec.structs.replace(bal, per_rank_load=None), args)
    if bal.per_rank_load is not None:
        shares = rank_shares(bal.per_rank_load)
        out += ["per rank (load over all layers / mean rank load; 1.0 = even):",
                *table([f"r{r}" for r in range(len(shares))], [shares])]
    return out


def _poll(client: Any) -> tuple[Any, Any]:
    """(status, balancedness or the daemon's error text). Raises UnavailableError when it does not answer."""
    status = client.status()
    try:
        bal = client.balancedness(per_layer=True, per_rank=True)
    except UnavailableError:
        raise
    except EplbdError as exc:  # e.g. not_ready: no workers or an empty window yet
        bal = f"{exc.name}: {exc}"
    return status, bal


def _json_line(status: Any, bal: Any, error: str = "") -> str:
    from eplbd.client.render import to_jsonable

    doc: dict[str, Any] = {"ts": round(time.time(), 3), "reachable": status is not None}
    if status is None:
        doc["error"] = error
    else:
        p = status.current_plan
        doc.update(epoch=status.epoch, step=status.step,
                   plan=None if p is None else {"plan_id": p.plan_id, "epoch": p.epoch, "state": p.state},
                   balancedness=bal if isinstance(bal, str) else to_jsonable(bal))
    return json.dumps(doc)


def watch(client: Any, args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """Refresh every ``args.watch`` seconds until Ctrl-C (or ``args.count`` refreshes); returns 0."""
    as_json, tty = getattr(args, "json", False), out.isatty()
    done = 0
    try:
        while args.count is None or done < args.count:
            try:
                status, bal = _poll(client)
                error = ""
            except UnavailableError as exc:
                status, bal, error = None, None, str(exc)
            if as_json:
                text = _json_line(status, bal, error)
            else:
                head = (f"eplbd at {args.endpoint}  {time.strftime('%H:%M:%S')}  every {args.watch:g}s "
                        "(Ctrl-C to quit)")
                body = frame_lines(status, bal, args) if status is not None else \
                    [f"daemon unreachable: {error}; still trying"]
                text = (CLEAR if tty else ("\n" if done else "")) + "\n".join([head, *body])
            print(text, file=out, flush=True)
            done += 1
            if args.count is None or done < args.count:
                time.sleep(args.watch)
    except KeyboardInterrupt:
        pass
    return 0


class Watched:
    """What the ``balancedness`` request returns under ``--watch``: the frames are printed already."""

    def __init__(self, code: int) -> None:
        self.code = code
