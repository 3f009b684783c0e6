"""How ``eplbctl`` shows the daemon's replies to a person: tables, status, balancedness, plans,
placements, resizes and config (``render_*``), and ``to_jsonable`` for ``--json``. Shared by the
one-shot commands (``eplbd.client.ctl``) and the live view (``eplbd.client.watch``)."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import msgspec

def to_jsonable(obj: Any) -> Any:
    """msgspec Structs -> dicts (without the wire-only ``type`` tag and ``req_id``), tensors -> nested lists."""
    def hook(o: Any) -> Any:
        if hasattr(o, "tolist"):
            return o.tolist()
        raise TypeError(f"cannot convert {type(o).__name__} to JSON")
    out = msgspec.to_builtins(obj, enc_hook=hook)
    if isinstance(out, dict):
        out.pop("req_id", None)
        out.pop("type", None)
    return out


def table(headers: list[str], rows: list[list[Any]], indent: str = "  ") -> list[str]:
    """Aligned columns; text left-aligned, numeric columns right-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    right = [bool(rows) and all(_is_number(r[i]) for r in cells) for i in range(len(headers))]
    fmt = lambda vals: indent + "  ".join(v.rjust(w) if r else v.ljust(w)  # noqa: E731
                                          for v, w, r in zip(vals, widths, right)).rstrip()
    return [fmt(headers), *(fmt(r) for r in cells)]


def _cell(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4f}"
    return "-" if v is None else str(v)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)  # pragma: no cover


def _change(before: float, after: float) -> str:
    return f"predicted balancedness {before:.4f} -> {after:.4f} ({after - before:+.4f})"


# --- renderers: reply -> lines --------------------------------------------------------------------
def render_plan(p: Any) -> list[str]:
    timings = " ".join(f"{k}={v:.3f}s" for k, v in p.timings.items()) or "-"
    return [f"plan {p.plan_id}: epoch {p.base_epoch} -> {p.epoch}, state {p.state}, policy {p.policy or '-'}, "
            f"layers {_layers(p.layers)}",
            f"  reason: {p.reason or '-'}",
            f"  {_change(p.predicted_before, p.predicted_after)}",
            f"  moved {p.moved_slots} slots ({_bytes(p.moved_bytes)}); timings {timings}"]


def _layers(layers: list[int]) -> str:
    return ",".join(map(str, layers)) if layers else "-"


def render_status(s: Any, args: argparse.Namespace) -> list[str]:
    drops = ", ".join(f"{k}={v}" for k, v in sorted(s.drop_reasons.items()))
    out = [f"daemon {s.daemon_id or '-'}  up {s.uptime_s:.0f}s  policy {s.policy or '-'}",
           f"epoch {s.epoch}  step {s.step}  paused {_cell(s.paused)}  window {s.window_fill}/{s.window_size}  "
           f"EP size {s.ep_size}  next re-plan at step {s.next_rebalance_step}",
           f"last decision: {s.last_decision_reason or '-'}",
           *_watchdog_lines(s),
           f"reports: {s.reports_received} received, {s.reports_dropped} dropped" + (f" ({drops})" if drops else ""),
           f"workers ({len(s.workers)}):"]
    out += table(["rank", "worker", "alive", "last seen", "epoch", "host"],
                 [[w.rank, w.worker_id, w.alive, f"{w.last_seen_s:.1f}s ago", w.epoch, w.hostname or "-"]
                  for w in sorted(s.workers, key=lambda w: w.rank)])
    out += _resize_lines(s.resize) if s.resize else []
    return out + (render_plan(s.current_plan) if s.current_plan else ["plan: none yet"])


def _watchdog_lines(s: Any) -> list[str]:
    """Whether rebalancing is stuck, when the last plan committed, and the last abort."""
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.last_commit_at)) if s.last_commit_at else "never"
    out = [f"rebalancing: {'STUCK: ' + s.stuck_reason if s.rebalancing_stuck else 'ok'}  last commit {when}  "
           f"aborts in a row {s.aborts_in_a_row}"]
    if s.last_abort is not None:
        a = s.last_abort
        who = f"rank {a.rank}" if a.rank >= 0 else "no rank in particular"
        out.append(f"last abort: plan {a.plan_id} ({a.cause}, {who}): {a.reason}")
    if s.load_silent:
        out.append(f"LOAD SILENT: no rank has counted a token for {s.silent_load_steps} steps while the engine steps "
                   "(its layers record no load; see the engine adapter's log)")
    return out


def render_balancedness(b: Any, args: argparse.Namespace) -> list[str]:
    keys = ["min", "p50", "p90", "mean", "aggregate"]
    out = [f"balancedness at epoch {b.epoch} over {b.window_fill} window steps (1.0 = perfect)"]
    out += table(["", *keys], [[name, *(getattr(st, k) for k in keys)]
                               for name, st in (("observed", b.observed), ("predicted", b.predicted))])
    if b.per_layer_observed is not None:
        pred = b.per_layer_predicted or [None] * len(b.per_layer_observed)
        out += ["per layer:", *table(["layer", "observed", "predicted"],
                                     [[i, o, p] for i, (o, p) in enumerate(zip(b.per_layer_observed, pred))])]
    if b.per_rank_load is not None:
        loads = b.per_rank_load.tolist()
        out += ["mean load per rank (layers x ranks):",
                *table(["layer", *(f"r{r}" for r in range(len(loads[0]) if loads else 0))],
                       [[i, *(f"{v:.1f}" for v in row)] for i, row in enumerate(loads)])]
    return out


def render_rebalance(r: Any, args: argparse.Namespace) -> list[str]:
    head = (f"pushed plan {r.plan_id} -> epoch {r.epoch}" if r.pushed else
            f"skipped: {r.reason or 'no reason given'}" if r.skipped else
            "dry run: computed, nothing pushed")
    out = [head + f" (layers {_layers(r.layers)}, policy {r.policy or '-'})"]
    if r.reason and not r.skipped:
        out.append(f"  reason: {r.reason}")
    return out + [f"  {_change(r.predicted_before, r.predicted_after)}",
                  f"  moves {r.moved_slots} slots ({_bytes(r.moved_bytes)})"]


def render_placement(p: Any, args: argparse.Namespace) -> list[str]:
    rows = p.phy2log.tolist()
    per = len(rows[0]) // p.ep_size if rows and p.ep_size and len(rows[0]) % p.ep_size == 0 else 0
    fmt = (lambda row: " | ".join(" ".join(map(str, row[i:i + per])) for i in range(0, len(row), per))) if per \
        else (lambda row: " ".join(map(str, row)))
    return [f"placement at epoch {p.epoch} (phy2log, {len(rows)} layers, EP size {p.ep_size}, "
            "slots grouped by rank):", *(f"  layer {i:>3}: {fmt(row)}" for i, row in enumerate(rows))]


def _resize_lines(r: Any) -> list[str]:
    """The lines for a ``ResizeInfo`` (reply or status)."""
    orphans = "; ".join(f"layer {i}: {','.join(map(str, o))}" for i, o in enumerate(r.orphans) if o) or "none"
    return [f"resize at epoch {r.epoch}: {r.old_ep_size} -> {r.ep_size} ranks, mapping {','.join(map(str, r.mapping))}"
            f" (old rank -> new rank, -1 removed)",
            f"  orphans (their only copies were on removed ranks; reloaded by the engine): {orphans}",
            f"  moves {r.moved_slots} slots between ranks, {r.reload_slots} reloads; plan in flight: "
            f"{f'plan {r.drained_plan} {r.drain}' if r.drained_plan else 'none'}",
            f"  new group registered: {len(r.registered)}/{r.ep_size}" + (" (complete)" if r.complete else "")]


def render_resize(r: Any) -> list[str]:
    head = "dry run: computed, nothing changed" if r.dry_run else f"resized: the new group runs epoch {r.info.epoch}"
    return [head, *_resize_lines(r.info)]


def render_config(c: Any, args: argparse.Namespace) -> list[str]:
    width = max(map(len, c.config), default=0)
    return [f"{k.ljust(width)} = {json.dumps(v)}" for k, v in c.config.items()]
