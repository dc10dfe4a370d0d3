"""The book's *Benchmarks* page, written from the benchmarks' result files.

The benchmarks (``benchmarks/bench_*.py``, ``benchmarks/prada_scan.py``) save what they measured
as JSON under ``benchmarks/results/``. :func:`render_page` turns every such file into a section
of Markdown -- a table for the kinds of file it knows (:data:`RENDERERS`), the file's top-level
values for the others -- so the page's numbers are computed from those files when the book is
built, never copied by hand. A missing folder, a file that is not JSON and a file without the
expected fields each give a note on the page, not a failed build.

As a Sphinx extension (``_config.yml``: ``sphinx: extra_extensions``) it writes
``book/benchmarks.md`` (git-ignored) from ``<project>/benchmarks/results/`` when the builder
starts, before Sphinx reads the sources.
"""
from __future__ import annotations

import fnmatch
import json
import statistics
from pathlib import Path
from typing import Callable

PAGE = Path("book") / "benchmarks.md"
RESULTS = Path("benchmarks") / "results"

_INTRO = """\
# Benchmarks

What the benchmarks under `benchmarks/` measured, read from their result files in
`benchmarks/results/` when this book was built (`stealnb.report.benchpage`). Rerun one with
`python benchmarks/<name>.py` (`make bench` runs them all); the next build shows its new file.
"""


def _num(x, digits: int = 3) -> str:
    if x is None:
        return "—"
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    return f"{x:,}" if isinstance(x, int) else f"{x:,.{digits}f}"


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return out


def _mean_ci(values: list[float]) -> str:
    """Mean ± the half-width of its 95% confidence interval (Student's t, seeds as repetitions)."""
    from ..core.metrics import mean_ci95

    if not values:
        return "—"
    if len(values) == 1:
        return _num(values[0])
    mean, half = mean_ci95(values)
    return f"{_num(mean)} ± {_num(half)}"


def quality(data: dict) -> list[str]:
    """``bench_quality.py``: agreement per strategy and budget, mean ± 95% confidence interval
    over seeds, for each secret."""
    budgets = [str(b) for b in data["setup"]["budgets"]]
    out = [f"Agreement with the secret on its test set, mean ± 95% confidence interval (Student's t) over seeds "
           f"{', '.join(map(str, data['setup'].get('seeds', [])))} (pool: {data['setup'].get('pool', '?')}, "
           f"substitute: {data['setup'].get('substitute', '?')}; budgets include the validation queries)."]
    for name, secret in data["secrets"].items():
        out += ["", f"**{name}** (secret test accuracy {_num(secret.get('secret_test_accuracy'))}):", ""]
        rows = []
        for strategy, runs in secret["runs"].items():
            rows.append([strategy] + [_mean_ci([r["budgets"][b] for r in runs if b in r["budgets"]])
                                      for b in budgets])
        out += _table(["strategy", *budgets], rows)
        best = []
        for b in budgets:
            means = {st: statistics.mean(v) for st, runs in secret["runs"].items()
                     if (v := [r["budgets"][b] for r in runs if b in r["budgets"]])}
            if means:
                top = max(means, key=means.get)
                best.append(f"{b}: {top} ({_num(means[top])})")
        if best:
            out += ["", "Highest mean agreement per budget: " + "; ".join(best) + "."]
    return out


def recipe(data: dict) -> list[str]:
    """``bench_recipe.py``: agreement of each training-recipe variant on random labelled sets,
    mean ± the 95% confidence half-width over paired seeds."""
    sizes = [str(s) for s in data["setup"]["sizes"]]
    out = [f"Agreement of a substitute trained on a random labelled set of each size, per training "
           f"recipe (mean ± 95% CI over seeds {', '.join(map(str, data['setup']['seeds']))}; "
           f"secret {data['setup'].get('secret', '?')}).", ""]
    rows = [[variant] + [f"{_num(cells[s]['mean'])} ± {_num(cells[s]['ci95'])}" if s in cells else "—"
                         for s in sizes]
            for variant, cells in data["table"].items()]
    return out + _table(["recipe", *(f"{s} labelled" for s in sizes)], rows)


def prada(data: dict) -> list[str]:
    """``prada_scan.py``: when PRADA flags each attack's query stream."""
    b = data["benign"]
    out = [f"PRADA at δ = {data['delta']} on the {data.get('dataset', '?')} secret "
           f"({data.get('arch', '?')}), budget {_num(data.get('budget'))}. Benign traffic: "
           f"{b['clients']} clients of {b['client_size']} test images each, false-positive rate "
           f"{_num(b['fpr'], 2)}, lowest W {_num(b['min_w'])}.", ""]
    rows = [[r["strategy"], r["seed"], _num(r.get("queries")),
             "never" if r.get("flagged_at") is None else _num(r["flagged_at"]),
             _num(r.get("min_w")), _num(r.get("median_distance"), 2), _num(r.get("distance_skew"), 2),
             _num(r.get("top_class_share"), 2), _num(r.get("agreement"))] for r in data["runs"]]
    flagged: dict[str, list[str]] = {}
    for r in data["runs"]:
        if r.get("flagged_at") is not None:
            flagged.setdefault(r["strategy"], []).append(f"seed {r['seed']} at query {_num(r['flagged_at'])}")
    never = sorted({r["strategy"] for r in data["runs"]} - set(flagged))
    summary = ("Flagged: " + "; ".join(f"{k} ({', '.join(v)})" for k, v in flagged.items()) + "."
               if flagged else "No attack was flagged.")
    if never:
        summary += " Never flagged: " + ", ".join(never) + "."
    return out + _table(["attack", "seed", "queries", "flagged at query", "lowest W", "median distance",
                         "distance skew", "top-class share", "agreement"], rows) + ["", summary]


def server(data: dict) -> list[str]:
    """``bench_server.py``: throughput and latency of the prediction server per phase."""
    s = data.get("setup", {})
    out = [f"The prediction server (`stealnb serve`) under load: {s.get('model', '?')}, "
           f"{s.get('client_threads', '?')} client threads, {s.get('phase_seconds', '?')} s per phase.", ""]
    rows = [[p["batch"], p.get("mode", ""), p.get("encoding", ""), p.get("concurrency", ""),
             _num(p.get("requests_per_s"), 1), _num(p.get("samples_per_s"), 1),
             _num((p.get("latency_ms") or {}).get("p50"), 1), _num((p.get("latency_ms") or {}).get("p99"), 1),
             sum((p.get("errors") or {}).values())] for p in data["phases"]]
    return out + _table(["batch", "mode", "encoding", "clients", "requests/s", "images/s", "p50 ms", "p99 ms",
                         "errors"], rows)


def pools(data: dict) -> list[str]:
    """``bench_pools.py``: agreement per thief pool and strategy and budget (mean ± 95% CI over
    seeds, ratio to the uniform-noise pool), the paired gain over noise at the largest budget, the
    entropy of the labels each pool draws from the secret, and the study's targets."""
    s = data["setup"]
    budgets = [str(b) for b in s["budgets"]]
    top = budgets[-1]
    build = data.get("pool_build") or {}
    out = [f"Which thief pool: agreement with the secret, mean ± 95% confidence interval (Student's t) over "
           f"seeds {', '.join(map(str, s.get('seeds', [])))} (× the uniform-noise pool's mean; profile "
           f"{s.get('profile', '?')}, substitute {s.get('substitute', '?')}). The gain over noise is paired "
           f"by seed (mean [95% CI], * where the CI excludes 0)."
           + ("" if data.get("finished") else " *The benchmark had not finished when this file was written.*")]
    if build:
        out += ["", f"Natural-patch pool build: {_num(build.get('patches'))} patches from {build.get('photos', '?')} "
                    f"photos in {_num(build.get('seconds'), 1)} s ({_num(build.get('duplicates_dropped'))} "
                    f"near-duplicates dropped)."]
    if not data["secrets"]:
        out += ["", "No extraction was run (" + ("`--build-only`" if s.get("build_only") else "no secret") + ")."]
    for name, secret in data["secrets"].items():
        strategies = ", ".join(dict.fromkeys(r["strategy"] for r in secret.get("strategies", [])))
        out += ["", f"**{name}**" + (f" (strategies: {strategies})" if strategies else "") + ":", ""]
        rows = []
        for pool, by_strategy in secret.get("table", {}).items():
            entropy = (secret.get("entropy", {}).get(pool) or {}).get("entropy_bits")
            for strategy, cells in by_strategy.items():
                row = [pool, strategy]
                for b in budgets:
                    c = cells.get(b)
                    row.append("—" if not c else f"{_num(c['mean'])}" + (f" ± {_num(c['ci95'])}" if c.get("ci95") is not None else "")
                               + (f" (×{_num(c['noise_ratio'], 2)})" if c.get("noise_ratio") is not None else ""))
                c = cells.get(top) or {}
                gain = "—" if c.get("gain_over_noise") is None else (
                    f"{c['gain_over_noise']:+.3f} [{c['gain_low']:+.3f}, {c['gain_high']:+.3f}]"
                    + ("*" if c.get("gain_significant") else ""))
                rows.append(row + [gain, _num(entropy, 2)])
        out += _table(["pool", "strategy", *budgets, f"gain over noise at {top}", "label entropy (bits)"], rows)
        for t in secret.get("targets", {}).values():
            if "target" in t:
                met = "met" if t.get("met") else ("missed" if t.get("met") is False else "no target")
                out += ["", f"Best pool and strategy at {_num(t['budget'])} queries: {t['pool']} / {t['strategy']}, "
                            f"{_num(t['measured'])} (target {_num(t.get('target'))}: {met})."]
            elif "ratio" in t:
                out += ["", f"{t['strategy']}: best pool {t['best_pool']} {_num(t['agreement'])} against uniform "
                            f"noise {_num(t['noise_agreement'])}, ratio {_num(t['ratio'], 2)}."]
    return out


# The provenance every benchmark stores (benchmarks/_provenance.py: write_result); shown in one
# line above each file's table, so no renderer repeats it.
PROVENANCE = ("code", "machine", "date")


def provenance(data) -> str | None:
    """``Measured at commit abc1234 on 2 cores (idle), 2026-12-07 20:15:00 UTC.`` from a result's
    ``code``, ``machine`` and ``date``; None when it records none of them (older files)."""
    if not isinstance(data, dict) or not any(isinstance(data.get(k), (dict, str)) for k in PROVENANCE):
        return None
    code, machine = data.get("code") or {}, data.get("machine") or {}
    where = (f"at commit `{code['commit']}`" if code.get("commit") else "at a commit not recorded") + (
        " with uncommitted changes" if code.get("dirty") else "")
    on = f" on {machine['cpus']} cores" if machine.get("cpus") else ""
    load = f" ({machine['note']})" if machine.get("note") else " (machine load not recorded)"
    when = f", {data['date']} UTC" if data.get("date") else ""
    return f"*Measured {where}{on}{load}{when}.*"


def _task_kind(task_id: str) -> str:
    """``runs/extraction-digits-…-seed0`` -> ``runs/extraction``; ``secret/digits-cnn-small`` -> ``secret``."""
    kind, _, rest = task_id.partition("/")
    return f"runs/{rest.split('-', 1)[0]}" if kind == "runs" else kind


def engine(data: dict) -> list[str]:
    """``bench_engine.py``: wall time of the same grid with the Dask engine and the scheduler it
    replaced, the sum of the task times, and that sum over ``jobs`` (the wall time of perfectly
    packed tasks, ignoring dependencies: what no scheduler beats), then the task time per kind."""
    jobs, runs = data["jobs"], data["runs"]
    out = [f"Profile {data['profile']}, {jobs} jobs, " + ("with" if data.get("book") else "without")
           + " the book, every run from an empty results root"
           + (f", tasks matching {data['only']!r}" if data.get("only") else "") + "."
           + ("" if data.get("complete", True) else " *The benchmark had not finished when this file was written.*"),
           ""]
    rows = [[r["engine"], r.get("repeat", 0), _num(r["wall_s"], 0), _num(r["engine_s"], 0), _num(r.get("book_s"), 0),
             _num(r["task_seconds_sum"], 0), _num(r["task_seconds_sum"] / jobs, 0), r["ran"],
             len(r["failed"]) + len(r["blocked"])] for r in runs]
    out += _table(["engine", "repeat", "wall s", "tasks s (wall)", "book s", "task s (sum)",
                   f"sum / {jobs} jobs", "ran", "failed or blocked"], rows)
    kinds: dict[str, dict[int, float]] = {}
    for i, r in enumerate(runs):
        for task, secs in r["task_seconds"].items():
            kinds.setdefault(_task_kind(task), {}).setdefault(i, 0.0)
            kinds[_task_kind(task)][i] += secs
    out += ["", "Task seconds per kind of task (summed over the tasks of that kind):", ""]
    out += _table(["kind", *(f"{r['engine']} {r.get('repeat', 0)}" for r in runs)],
                  [[k, *(_num(v.get(i), 0) for i in range(len(runs)))] for k, v in sorted(kinds.items())])
    return out


def threads(data: dict) -> list[str]:
    """``bench_threads.py``: the same extraction seeds, ``jobs`` processes at a time, with
    TensorFlow's default thread pools and with a fixed number of threads per process."""
    out = [f"{data['strategy']} extraction seeds {', '.join(map(str, data['seeds']))} of the demo profile, "
           f"{data['jobs']} processes at a time. Same results with both settings: {'yes' if data['same_results'] else 'no'}.", ""]
    rows = [[r["variant"], r.get("repeat", 0), _num(r["wall_s"], 1),
             ", ".join(f"{_num(v, 0)}" for v in r["seed_seconds"].values())] for r in data["runs"]]
    return out + _table(["threads", "repeat", "wall s", "seconds per seed"], rows)


def generic(data) -> list[str]:
    """Any other file: its top-level numbers, strings and flags (its provenance is the line above)."""
    if not isinstance(data, dict):
        return [f"A JSON {type(data).__name__}; no table for this kind of file."]
    data = {k: v for k, v in data.items() if k not in PROVENANCE}
    rows = [[k, _num(v)] for k, v in data.items() if isinstance(v, (int, float, str, bool)) or v is None]
    nested = [k for k, v in data.items() if isinstance(v, (dict, list))]
    out = _table(["field", "value"], rows) if rows else []
    if nested:
        out += ["", "Nested fields (not shown): " + ", ".join(f"`{k}`" for k in nested) + "."]
    return out


# File-name pattern -> renderer; the first match is used, :func:`generic` when none matches.
RENDERERS: dict[str, Callable[[dict], list[str]]] = {
    "quality*.json": quality,
    "recipe.json": recipe,
    "prada_demo*.json": prada,
    "server.json": server,
    "pools*.json": pools,
    "engine_*.json": engine,
    "threads_*.json": threads,
}


def render_file(path) -> str:
    """One section of the page for the result file ``path``: a heading, then its table, or a note
    saying why there is none (unreadable JSON, fields missing)."""
    path = Path(path)
    head = f"## `{path.name}`"
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"{head}\n\n*Not shown: `{path.name}` could not be read as JSON ({e}).*\n"
    render = next((f for pat, f in RENDERERS.items() if fnmatch.fnmatch(path.name, pat)), generic)
    try:
        body = render(data)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, statistics.StatisticsError) as e:
        return (f"{head}\n\n*Not shown: `{path.name}` does not have the fields of a {render.__name__} result "
                f"({type(e).__name__}: {e}).*\n")
    note = data.get("note") if isinstance(data, dict) and render is not generic else None
    source = provenance(data)
    return "\n".join([head, "", *([source, ""] if source else []), *body,
                      *(["", f"*Note:* {note}"] if note else [])]) + "\n"


def render_page(results_dir, shown_as=None) -> str:
    """The whole page (Markdown) for the result files in ``results_dir`` (named ``shown_as`` on
    the page when given: a path relative to the project, not the machine's folders)."""
    results_dir = Path(results_dir)
    shown = results_dir if shown_as is None else shown_as
    files = sorted(results_dir.glob("*.json")) if results_dir.is_dir() else []
    if not files:
        where = "does not exist" if not results_dir.is_dir() else "holds no result files (*.json)"
        return f"{_INTRO}\n*No benchmark results: `{shown}` {where}.*\n"
    return _INTRO + "".join("\n" + render_file(f) for f in files)


def write_page(results_dir, out, shown_as=None) -> Path:
    """Write :func:`render_page` to ``out`` (only when it changed, so Sphinx rebuilds nothing else)."""
    out = Path(out)
    text = render_page(results_dir, shown_as)
    if not (out.is_file() and out.read_text() == text):
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    return out


def _write_for_build(app) -> None:
    src = Path(app.srcdir)
    write_page(src / RESULTS, src / PAGE, shown_as=RESULTS)


def setup(app):
    app.connect("builder-inited", _write_for_build)
    return {"parallel_read_safe": True, "parallel_write_safe": True, "version": "1"}
