"""The summary of all runs, the targets, and the tables in ``bench/RESULTS.md``."""

from __future__ import annotations

import json
import statistics
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.measure import KINDS, Run, pcts, percentile

# --- the summary -----------------------------------------------------------------------------


def summarize(runs: list[Run]) -> dict[str, Any]:
    by = {kind: [r for r in runs if r.kind == kind] for kind in KINDS}
    a, a2, b, c = by["chain"], by["chain_nobackend"], by["saga"], by["saga_fail"]
    a3 = by["chain_acks_late"]
    ratios, ratios_nb, ratios_late = (_ratios(base, b, "wall_s") for base in (a, a2, a3))
    cpu, cpu_nb, cpu_late = (_ratios(base, b, "cpu_total_s") for base in (a, a2, a3))
    raw: dict[str, list[float]] = {"path": [], "sent": [], "event_to_sent": [], "whole": []}
    for run in c:
        for key, values in run.extra.pop("_raw").items():
            raw[key].extend(values)
    steps = sum(r.m * r.k for r in b)
    by_command: Counter[str] = Counter()
    for run in b:
        by_command.update(run.commands)
    return {
        "ratio_saga_vs_chain": round(statistics.median(ratios), 3),
        "ratio_saga_vs_chain_no_backend": round(statistics.median(ratios_nb), 3),
        "ratio_per_pair": [round(x, 3) for x in ratios],
        "ratio_no_backend_per_pair": [round(x, 3) for x in ratios_nb],
        "ratio_saga_vs_chain_acks_late": round(statistics.median(ratios_late), 3),
        "ratio_acks_late_per_pair": [round(x, 3) for x in ratios_late],
        "cpu_ratio_saga_vs_chain_acks_late": round(statistics.median(cpu_late), 3),
        "cpu_ratio_saga_vs_chain": round(statistics.median(cpu), 3),
        "cpu_ratio_saga_vs_chain_no_backend": round(statistics.median(cpu_nb), 3),
        "cpu_ratio_per_pair": [round(x, 3) for x in cpu],
        "cpu_ms_per_item": {kind: _cpu_per_item(rs) for kind, rs in by.items()},
        "sagas_per_s": _median(r.per_s for r in b),
        "chains_per_s": _median(r.per_s for r in a),
        "chains_no_backend_per_s": _median(r.per_s for r in a2),
        "chains_acks_late_per_s": _median(r.per_s for r in a3),
        "failing_sagas_per_s": _median(r.per_s for r in c),
        "p50_ms": round(percentile(_pool(b), 50), 1),
        "p99_ms": round(percentile(_pool(b), 99), 1),
        "chain_p50_ms": round(percentile(_pool(a), 50), 1),
        "chain_p99_ms": round(percentile(_pool(a), 99), 1),
        "chain_no_backend_p50_ms": round(percentile(_pool(a2), 50), 1),
        "chain_no_backend_p99_ms": round(percentile(_pool(a2), 99), 1),
        "redis_cmds_per_step": _median(r.per_step for r in b),
        "redis_cmds_per_step_worker": _median(
            r.summary()["redis_cmds_per_step_worker"] for r in b),
        "redis_cmds_per_chain_task": _median(r.per_step for r in a),
        "redis_cmds_per_chain_task_no_backend": _median(r.per_step for r in a2),
        "redis_cmds_per_step_by_command": {name: round(n / steps, 2)
                                           for name, n in by_command.most_common()},
        "bytes_per_saga": round(statistics.median(r.memory_delta / r.m for r in b)),
        "key_bytes_per_saga": round(statistics.median(r.extra["key_bytes_per_saga"] for r in b)),
        "bytes_per_chain": round(statistics.median(r.memory_delta / r.m for r in a)),
        "rollback_path_s": round(percentile(raw["path"], 50) / 1000, 4),
        "rollback_path_ms": pcts(raw["path"]),
        "failure_to_compensation_sent_ms": {
            **pcts(raw["sent"]),
            "method": "time.time() in the worker process: the failing step body's raise, to "
                      "Celery's after_task_publish of the first rollback message"},
        "failure_event_to_compensation_sent_ms": pcts(raw["event_to_sent"]),
        "rollback_whole_ms": pcts(raw["whole"]),
        "runs": [r.summary() for r in runs],
    }


def _ratios(base: list[Run], runs: list[Run], figure: str) -> list[float]:
    """``figure`` of each run over that of the base run of the same round."""
    return [getattr(rb, figure) / getattr(ra, figure) for ra, rb in zip(base, runs, strict=True)]


def _cpu_per_item(runs: list[Run]) -> dict[str, float]:
    """Median over runs of CPU ms per item, by process and in total."""
    parts = {part: [1000 * r.cpu_s[part] / r.m for r in runs] for part in runs[0].cpu_s}
    parts["total"] = [1000 * r.cpu_total_s / r.m for r in runs]
    return {part: round(statistics.median(values), 2) for part, values in parts.items()}


def _median(values: Iterator[float] | list[float]) -> float:
    return round(statistics.median(list(values)), 2)


def _pool(runs: list[Run]) -> list[float]:
    return [ms for r in runs for ms in r.latencies_ms]


def targets(report: dict[str, Any]) -> dict[str, Any]:
    sent = report["failure_to_compensation_sent_ms"]["p50"]
    return {
        "ratio_saga_vs_chain_le_1_05": report["ratio_saga_vs_chain"] <= 1.05,
        "ratio_saga_vs_chain_lt_1_0": report["ratio_saga_vs_chain"] < 1.0,
        "store_rtt_per_transition_le_2": report["store_rtt_per_transition"] <= 2,
        "failure_to_compensation_sent_p50_lt_10ms": sent < 10,
        **history_targets(report),
    }


def history_targets(report: dict[str, Any]) -> dict[str, bool | None]:
    """SPEC section 11's targets; None where the history phase did not run."""
    def at_most(figure: str, limit: float) -> bool | None:
        value = report.get(figure)
        return None if value is None else value <= limit

    return {"bytes_per_saga_retained_le_2048": at_most("bytes_per_saga_retained", 2048),
            "bytes_per_saga_retained_archive_le_512": at_most(
                "bytes_per_saga_retained_archive", 512),
            "ratio_saga_vs_chain_archive_le_1_05": at_most("ratio_saga_vs_chain_archive", 1.05)}


# --- writing the results ---------------------------------------------------------------------

MD_SKELETON = """# Benchmark: saga overhead against plain Celery

`make bench` (`python -m bench.run`) writes the tables between the markers below and
`bench/results/latest.json`; everything outside the markers is written by hand.

## Latest run

<!-- bench:results:begin -->
<!-- bench:results:end -->

## Scale

<!-- bench:scale:begin -->
<!-- bench:scale:end -->

## Profile

<!-- bench:profile:begin -->
<!-- bench:profile:end -->
"""


def _yes(ok: bool | None) -> str:
    if ok is None:
        return "not measured"
    return "met" if ok else "**not met**"


def render_results(r: dict[str, Any]) -> str:
    cfg, mach, rt, t = r["config"], r["machine"], r["round_trips"], r["targets"]
    cpu, tc = r["cpu_ms_per_item"], r["task_cpu_us"]
    ret = r["retention_check"]
    lines = [
        f"{r['created_at']}: `python -m bench.run --m {cfg['m']} --k {cfg['k']} "
        f"--pairs {cfg['pairs']}`, one prefork worker `-c 2`, {mach['cpu_count']} x "
        f"{mach['cpu_model']}, Python {mach['python']}, Celery {mach['celery']}, "
        f"redis-server {mach['redis_server']}, structlog `{cfg['log']}`, library at "
        f"{cfg['library']['commit']}"
        + (" with uncommitted changes" if cfg["library"]["saga_celery_dirty"] else "")
        + (f", experiments `{cfg['experiments']}`" if cfg["experiments"] else "")
        + f". Load average {mach['loadavg_start'][0]:.2f} at the start, "
        f"{mach['loadavg_end'][0]:.2f} at the end; the whole bench took {r['bench_s']} s.",
        "",
        "| figure | value | target |",
        "| --- | --- | --- |",
        f"| ratio B/A: saga vs chain with result backend (median wall-time ratio of "
        f"{cfg['pairs']} pairs) | **{r['ratio_saga_vs_chain']}** "
        f"({', '.join(map(str, r['ratio_per_pair']))}) | <= 1.05 "
        f"({_yes(t['ratio_saga_vs_chain_le_1_05'])}), stretch < 1.0 |",
        f"| ratio B/A on the public paths: every fast path into a dependency's internals off "
        f"(`SAGA_CELERY_FAST_PATHS=off`) | **{r.get('ratio_saga_vs_chain_public_path', '-')}** "
        f"({', '.join(map(str, r.get('ratio_public_path_per_pair', [])))}) | reported |",
        f"| ratio B/A': saga vs chain without result backend | "
        f"**{r['ratio_saga_vs_chain_no_backend']}** "
        f"({', '.join(map(str, r['ratio_no_backend_per_pair']))}) | |",
        f"| ratio B/A'': saga vs chain with result backend whose links are `acks_late`, as "
        f"saga tasks are | **{r['ratio_saga_vs_chain_acks_late']}** "
        f"({', '.join(map(str, r['ratio_acks_late_per_pair']))}) | |",
        f"| sagas/s (B) | {r['sagas_per_s']} | |",
        f"| chains/s (A, result backend) | {r['chains_per_s']} | |",
        f"| chains/s (A', no result backend) | {r['chains_no_backend_per_s']} | |",
        f"| chains/s (A'', result backend, `acks_late`) | {r['chains_acks_late_per_s']} | |",
        f"| failing sagas/s (C, {cfg['k'] - 1} rollbacks each) | {r['failing_sagas_per_s']} | |",
        f"| per-saga latency p50 / p99, M sent at once | {r['p50_ms']} / {r['p99_ms']} ms | |",
        f"| per-chain latency p50 / p99 (A), M sent at once | {r['chain_p50_ms']} / "
        f"{r['chain_p99_ms']} ms | |",
        f"| latency p50 one at a time: saga / chain / chain no backend | "
        f"{r['serial']['saga']['p50']} / {r['serial']['chain']['p50']} / "
        f"{r['serial']['chain_nobackend']['p50']} ms | |",
        f"| Redis commands per step, B (server-side, incl. inside scripts) | "
        f"{r['redis_cmds_per_step']} (worker {r['redis_cmds_per_step_worker']}) | |",
        f"| Redis commands per chain task, A / A' | {r['redis_cmds_per_chain_task']} / "
        f"{r['redis_cmds_per_chain_task_no_backend']} | |",
        f"| saga-store round trips per step transition (worker) | "
        f"{r['store_rtt_per_transition']} ({rt['saga']['worker_store_rtt_per_step']} per step; "
        f"broker {rt['saga']['worker_broker_rtt_per_step']} per step) | <= 2 "
        f"({_yes(t['store_rtt_per_transition_le_2'])}) |",
        f"| broker round trips per chain task (worker), A / A' | "
        f"{rt['chain']['worker_broker_rtt_per_step']} / "
        f"{rt['chain_nobackend']['worker_broker_rtt_per_step']} | |",
        f"| rollback path p50 / p99 (C: failing attempt_errored to first "
        f"rollback_attempt_started) | {r['rollback_path_ms']['p50']} / "
        f"{r['rollback_path_ms']['p99']} ms (one at a time: "
        f"{r['serial']['rollback']['rollback_path_ms']['p50']} / "
        f"{r['serial']['rollback']['rollback_path_ms']['p99']} ms) | |",
        f"| failure to first compensation sent p50 / p99 (body raise to after_task_publish) | "
        f"{r['failure_to_compensation_sent_ms']['p50']} / "
        f"{r['failure_to_compensation_sent_ms']['p99']} ms (one at a time: "
        f"{r['serial']['rollback']['failure_to_compensation_sent_ms']['p50']} / "
        f"{r['serial']['rollback']['failure_to_compensation_sent_ms']['p99']} ms) | "
        f"< 10 ms p50 ({_yes(t['failure_to_compensation_sent_p50_lt_10ms'])}) |",
        f"| whole rollback p50 / p99 (failure to saga_errored) | "
        f"{r['rollback_whole_ms']['p50']} / {r['rollback_whole_ms']['p99']} ms | |",
        f"| Redis memory per finished saga (used_memory delta / M; MEMORY USAGE of its keys) | "
        f"{r['bytes_per_saga']} B; {r['key_bytes_per_saga']} B | |",
        f"| Redis memory per finished chain with results (A) | {r['bytes_per_chain']} B | |",
        *history_rows(r),
        f"| retention: a finished saga's keys expire (instrumented worker, retention "
        f"{ret['retention_s']} s) | TTL <= {ret['max_pttl_ms']} ms on {ret['with_ttl']} keys, "
        f"{ret['already_expired']} already gone, {ret['without_ttl']} without TTL; "
        f"{ret['keys_left_after']} of {ret['keys']} left after it | 0 left |",
        f"| CPU inside one task (instrumented worker, thread CPU from task_prerun to "
        f"task_postrun; includes publishing the next message): saga step / chain link / "
        f"chain link without backend / rollback | {tc['saga_step']} / {tc['chain_link']} / "
        f"{tc['chain_link_no_backend']} / {tc['rollback']} us; ratio step/link "
        f"**{tc['ratio_step_vs_link']}** (no backend {tc['ratio_step_vs_link_no_backend']}) | |",
        f"| CPU ratio B/A (worker + Redis + caller CPU time, median of pairs) | "
        f"{r['cpu_ratio_saga_vs_chain']} ({', '.join(map(str, r['cpu_ratio_per_pair']))}); "
        f"B/A' {r['cpu_ratio_saga_vs_chain_no_backend']}; "
        f"B/A'' {r['cpu_ratio_saga_vs_chain_acks_late']} | |",
    ]
    lines += [f"| CPU ms per item, {KINDS[kind]} | {_fmt_cpu(cpu[kind])} | |" for kind in KINDS]
    lines += [
        "",
        "| run | M | K | wall s | items/s | p50 ms | p99 ms | CPU ms/item | Redis cmds/step "
        "| mem B/item |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {x['label']} | {x['m']} | {x['k']} | {x['wall_s']} | {x['per_s']} | "
              f"{x['p50_ms']} | {x['p99_ms']} | {x['cpu_ms_per_item']['total']} | "
              f"{x['redis_cmds_per_step']} | {x['memory_bytes_per_item']} |" for x in r["runs"]]
    lines += ["", "Redis commands per saga step (B, server-side, all runs): " + ", ".join(
        f"{name} {n}" for name, n in list(r["redis_cmds_per_step_by_command"].items())[:14])]
    lines += ["", "Round trips per step in the instrumented worker (`db0` broker, `db1` saga "
              "store, `db2` results, `db3` completion lists; pool processes / main process):",
              ""]
    for kind, label in KINDS.items():
        lines.append(f"- {label}: pool {_fmt_counts(rt[kind]['worker_child'])}; main "
                     f"{_fmt_counts(rt[kind]['worker_main'])}; client per item "
                     f"{_fmt_counts(rt[kind]['client'])}")
    return "\n".join(lines)


def history_rows(r: dict[str, Any]) -> list[str]:
    """The rows of SPEC section 11's figures (``bench/history.py``)."""
    t = r["targets"]
    if r.get("history_error"):
        return [f"| history (compaction, archive) | not measured: {r['history_error']} | |"]
    arch = r.get("archive_ms") or {}
    return [
        f"| Redis bytes per finished saga once compacted (MEMORY USAGE of all its keys) | "
        f"**{r.get('bytes_per_saga_retained')}** B | <= 2,048 "
        f"({_yes(t.get('bytes_per_saga_retained_le_2048'))}) |",
        f"| the same with the PostgreSQL archive on (a tombstone) | "
        f"**{r.get('bytes_per_saga_retained_archive')}** B | <= 512 "
        f"({_yes(t.get('bytes_per_saga_retained_archive_le_512'))}) |",
        f"| finish to archived p50 / p99 | {r.get('archive_ms_p50')} / {arch.get('p99')} ms "
        f"| |",
        f"| ratio B/A with the archive on (median of pairs) | "
        f"**{r.get('ratio_saga_vs_chain_archive')}** "
        f"({', '.join(map(str, r.get('ratio_archive_per_pair', [])))}) | <= 1.05 "
        f"({_yes(t.get('ratio_saga_vs_chain_archive_le_1_05'))}) |",
    ]


def render_history_scale(x: dict[str, Any], created: str) -> str:
    if "error" in x:
        return f"{created}: the history scale run failed: {x['error']}"
    ms = x["list_ms"]
    return "\n".join([
        f"{created}: `python -m bench.run --scale`: {x['sagas']} sagas run to their end "
        f"({x['sagas_per_s']} sagas/s) with the PostgreSQL archive on.", "",
        "| figure | value |", "| --- | --- |",
        f"| Redis used_memory before / after | {x['used_memory_before']} / "
        f"{x['used_memory_after']} B ({x['used_memory_bytes_per_saga']} B per saga) |",
        f"| Redis keys after | {x['redis_keys']} |",
        f"| archive rows | {x['archive_rows']} |",
        f"| `list` on the archive p50 (20 rows): newest / by status / by name / deep | "
        f"{ms['newest']} / {ms['by_status']} / {ms['by_name']} / {ms['deep']} ms |",
    ])


def _fmt_cpu(cpu: dict[str, float]) -> str:
    return (f"**{cpu['total']}** (worker main {cpu['worker_main']}, pool {cpu['worker_pool']}, "
            f"redis {cpu['redis']}, caller {cpu['client']})")


def _fmt_counts(counts: dict[str, float]) -> str:
    rtt = {k: v for k, v in counts.items() if k.endswith(":rtt")}
    rest = {k: v for k, v in counts.items() if not k.endswith(":rtt")}
    parts = [f"{k} {v}" for k, v in rtt.items()] + [f"{k.split(':')[1]} {v}"
                                                    for k, v in rest.items()]
    return ", ".join(parts) or "none"


def render_scale(rows: list[dict[str, Any]], created: str) -> str:
    lines = [f"{created}: `python -m bench.run --scale`, sagas of K no-op steps sent at once, "
             "then waited on in send order; every one completed.", "",
             "| sagas at once | wall s | sagas/s | CPU ms/saga | p50 ms | p99 ms | "
             "Redis cmds/step | used_memory B/saga | MEMORY USAGE B/saga |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {x['m']} | {x['wall_s']} | {x['per_s']} | {x['cpu_ms_per_item']['total']} | "
              f"{x['p50_ms']} | {x['p99_ms']} | {x['redis_cmds_per_step']} | "
              f"{x['memory_bytes_per_item']} | {x['key_bytes_per_saga']} |" for x in rows]
    return "\n".join(lines)


def render_profile(p: dict[str, Any], created: str) -> str:
    if "error" in p:
        return f"{created}: the profile run failed: {p['error']}"
    cpu, wall = p.get("cpu", {}), p.get("wall", {})
    lines = [f"{created}: (B) with M sagas at once, profiled twice on fresh workers."]
    if "error" in cpu:
        lines += ["", f"py-spy: {cpu['error']}"]
    else:
        lines += ["", f"**CPU (py-spy, idle excluded, {cpu['sagas_per_s']} sagas/s while "
                  f"sampled)**: {cpu['samples'].get('pool', 0)} samples in the pool processes "
                  f"({cpu['pool_in_tasks_pct']}% of them inside tasks), "
                  f"{cpu['samples'].get('main', 0)} in the main process. Percentages are of "
                  "the pool's samples inside tasks (Celery's `trace_task`).", ""]
        lines += _two_tables(cpu["top_inclusive"][:30], cpu["top_self"][:15])
        lines += ["", "Main process (consumer, acks, pool dispatch), % of its samples, "
                  "below the event loop:", ""]
        below = [x for x in cpu["main_top_inclusive"] if x["pct"] < 90][:20]
        lines += _two_tables(below, cpu["main_top_self"][:10])
    if "error" in wall:
        lines += ["", f"pyinstrument: {wall['error']}"]
    elif wall:
        lines += ["", f"**Wall time (pyinstrument in both pool processes, "
                  f"{wall['sagas_per_s']} sagas/s under it)**: {wall['tasks_profiled']} "
                  f"task frames, {wall['task_time_s']} s of task time; waiting on sockets counts "
                  "here.", ""]
        lines += _two_tables(wall["top_inclusive"][:30], wall["top_self"][:15])
    return "\n".join(lines)


def _two_tables(inclusive: list[dict[str, Any]], own: list[dict[str, Any]]) -> list[str]:
    lines = ["| inclusive % | function |", "| --- | --- |"]
    lines += [f"| {x['pct']} | `{x['function']}` |" for x in inclusive]
    lines += ["", "| self % | function |", "| --- | --- |"]
    lines += [f"| {x['pct']} | `{x['function']}` |" for x in own]
    return lines


def update_md(path: Path, section: str, body: str) -> None:
    text = path.read_text() if path.exists() else MD_SKELETON
    begin, end = f"<!-- bench:{section}:begin -->", f"<!-- bench:{section}:end -->"
    if begin not in text:
        text = text.rstrip() + f"\n\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n{body}\n{end}{tail}")


def write_outputs(report: dict[str, Any], out: Path, md: Path | None) -> None:
    """The JSON report, and the sections of the markdown this run has figures for."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    sys.stderr.write(f"bench: wrote {out}\n")
    if md is None:
        return
    update_md(md, "results", render_results(report))
    if isinstance(report.get("scale"), list):
        update_md(md, "scale", render_scale(report["scale"], report["created_at"]))
    if isinstance(report.get("history_scale"), dict):
        update_md(md, "history-scale", render_history_scale(report["history_scale"],
                                                            report["created_at"]))
    if "profile" in report:
        update_md(md, "profile", render_profile(report["profile"], report["created_at"]))
    sys.stderr.write(f"bench: updated {md}\n")


def print_summary(r: dict[str, Any]) -> None:
    sys.stdout.write(
        f"ratio B/A {r['ratio_saga_vs_chain']} (per pair {r['ratio_per_pair']}), "
        f"B/A' {r['ratio_saga_vs_chain_no_backend']}, "
        f"B/A'' (acks_late chain) {r['ratio_saga_vs_chain_acks_late']}\n"
        f"sagas/s {r['sagas_per_s']}, chains/s {r['chains_per_s']}, chains/s no backend "
        f"{r['chains_no_backend_per_s']}, failing sagas/s {r['failing_sagas_per_s']}\n"
        f"saga latency p50 {r['p50_ms']} ms p99 {r['p99_ms']} ms; Redis cmds/step "
        f"{r['redis_cmds_per_step']}; store round trips/transition "
        f"{r['store_rtt_per_transition']}\n"
        f"rollback path p50 {r['rollback_path_ms']['p50']} ms p99 "
        f"{r['rollback_path_ms']['p99']} ms; failure->compensation sent p50 "
        f"{r['failure_to_compensation_sent_ms']['p50']} ms; bytes/saga {r['bytes_per_saga']}\n"
        f"bytes/saga retained {r.get('bytes_per_saga_retained')} (archive "
        f"{r.get('bytes_per_saga_retained_archive')}); finish->archived p50 "
        f"{r.get('archive_ms_p50')} ms; ratio B/A with archive "
        f"{r.get('ratio_saga_vs_chain_archive')}\n"
        f"targets: {r['targets']}\n")
    for row in r.get("scale", []) if isinstance(r.get("scale"), list) else []:
        sys.stdout.write(f"scale {row['m']}: {row['per_s']} sagas/s, "
                         f"{row['memory_bytes_per_item']} B/saga\n")


