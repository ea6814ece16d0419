"""Results tables and plots built from run folders' ``metrics.json`` — never from hand-written numbers.

A *table spec* (``configs/tables/<name>.yaml``, read by :func:`bdia.apps.reproduce.load_spec`) says which run
folders belong to a table and what to show:

* ``sweeps``: lists of Hydra overrides (one multirun each); every ``experiment=<name>`` in them names a run
  root ``<runs_root>/<name>/`` (``results/sample/<name>/`` for the sampling app) whose sub-folders are read;
* ``section``: the ``metrics.json`` key that splits the table (e.g. ``model.config``: one block per network);
* ``lines``: the keys that identify one line of the plot / row of the table (e.g. ``[solver, gamma]``);
* ``column``: the key along the x axis (e.g. ``nfe``, measured by the run, not assumed);
* ``metrics``: ``[{key, label, format}]``, the first is the plotted one; lower is better unless ``higher_is_better``;
  ``fresh_only``: shown only for runs that resumed nothing (timings);
* ``floors``: ``[{key, label}]``: reference values printed beside the rows (e.g. the real-data FD floor);
* ``explode``: a key holding one dict per method (``scripts/edit.py``'s ``methods``): one record per method, with
  the method's keys at the top (where the run's own keys do not take them) and all of them under ``<explode>.``;
* ``figure``: a file in each run folder (e.g. ``edit_grid.png``) copied beside the table, one per section;
* ``published``: ``registry`` shows the FID that EDM's repository states for the section's checkpoint (its own
  column, with its NFE and source); anything else is left out.

Output: ``<output>.md`` (one block per section and metric, best value per column in bold, a generated summary of
where each BDIA line beats its base solver), ``<output>.csv`` (long format, one row per run and metric, with the
run folder) and ``<output>.png`` (first metric vs the column key, one line per solver line, one panel per section).
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..networks.registry import CHECKPOINTS

__all__ = ["dig", "collect_runs", "table_rows", "render_markdown", "write_table", "line_label", "BASE_SOLVER"]

#: The base solver a BDIA solver reduces to at gamma = 0 (the comparison the summary makes).
BASE_SOLVER = {"bdia_edm": "edm", "bdia_ddim": "ddim", "bdia": "ddim"}  # "bdia": editing's method name


def dig(record: Mapping[str, Any], dotted: str, default=None):
    """``record["a"]["b"]`` for ``"a.b"``; ``default`` where a level is missing."""
    value: Any = record
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return default
        value = value[part]
    return value


def collect_runs(run_roots: Iterable[str | Path], explode: str | None = None) -> list[dict]:
    """Every ``metrics.json`` below each root (sorted), loaded, with ``run_dir`` added. Missing roots are skipped.

    ``explode="methods"``: a run that compares several methods (``scripts/edit.py``) holds one dict per method
    under that key; each becomes its own record (the run's top-level keys, the method's keys, ``method``)."""
    runs = []
    for root in run_roots:
        root = Path(root)
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("metrics.json")):
            record = json.loads(path.read_text())
            record["run_dir"] = str(path.parent)
            if explode is None:
                runs.append(record)
                continue
            parent = {k: v for k, v in record.items() if k != explode}
            for name, values in (record.get(explode) or {}).items():
                # The run's keys (image, ...) win; the method's own dict stays reachable under the explode key
                # (``methods.image.psnr`` where the run's ``image`` is the photo's name).
                runs.append({**values, **parent, "method": name, explode: values})
    return runs


def _gamma_text(gamma) -> str:
    if gamma is None:
        return ""
    if isinstance(gamma, (list, tuple)):
        return "per-step list"
    if isinstance(gamma, float) and gamma.is_integer():
        return f"{gamma:.1f}"
    return str(gamma)


def line_label(record: Mapping[str, Any], keys: Sequence[str]) -> str:
    """A readable name for one line: ``edm``, ``bdia_edm γ=0.5``, ``bdia_ddim γ=obelm`` …"""
    parts = []
    for key in keys:
        value = dig(record, key)
        if value is None:
            continue
        if key.split(".")[-1] == "gamma":
            parts.append(f"γ={_gamma_text(value)}")
        else:
            parts.append(str(value))
    return " ".join(parts)


def _gamma_of(record, line_keys):
    return next((dig(record, k) for k in line_keys if k.split(".")[-1] == "gamma"), None)


def table_rows(spec: Mapping[str, Any], runs: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Long format: one dict per (run, metric) with section, line, solver, gamma, column value, metric, value.

    Where several runs share (section, line, column) — a smoke run beside the full one — the run with the
    most images is kept.
    """
    line_keys = list(spec["lines"])
    chosen: dict[tuple, Mapping] = {}
    for record in runs:
        if any(dig(record, m["key"]) is None for m in spec["metrics"][:1]):
            continue  # an unfinished run (no evaluation yet)
        key = (str(dig(record, spec["section"])), line_label(record, line_keys), dig(record, spec["column"]))
        size = dig(record, "num_images", 0) or 0
        if key not in chosen or size > (dig(chosen[key], "num_images", 0) or 0):
            chosen[key] = record
    rows = []
    for (section, line, column), record in sorted(chosen.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        for metric in spec["metrics"]:
            value = dig(record, metric["key"])
            if metric.get("fresh_only") and (dig(record, "num_resumed") or 0) > 0:
                value = None  # a timing of a resumed run covers only the images sampled in its last session
            rows.append(dict(
                section=section, line=line, solver=dig(record, line_keys[0]), gamma=_gamma_text(_gamma_of(record, line_keys)),
                num_steps=dig(record, "num_steps"), column=column, metric=metric["label"],
                value=None if value is None else float(value), num_images=dig(record, "num_images"),
                run_dir=record["run_dir"],
            ))
        for floor in spec.get("floors") or []:
            value = dig(record, floor["key"])
            if value is not None:
                rows.append(dict(section=section, line="real-data floor", solver=None, gamma="", num_steps=None,
                                 column=None, metric=floor["label"], value=float(value),
                                 num_images=None, run_dir=record["run_dir"]))
    return rows


def _format(value, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if fmt.endswith("d"):
        value = int(round(value))
    return format(value, fmt)


def _published(spec, section: str) -> str | None:
    if spec.get("published") != "registry":
        return None
    entry = CHECKPOINTS.get(section)
    if entry is None or entry.fid_reported is None:
        return "unknown"
    sampler = "deterministic Heun" if entry.deterministic else f"stochastic Heun, S_churn={entry.s_churn:g}"
    return f"{entry.fid_reported} at NFE {entry.nfe} ({sampler}; EDM's repository, example.py)"


def _summary(cells: Mapping[tuple[str, Any], float], lines: Sequence[str], columns: Sequence, better) -> list[str]:
    """Where each BDIA line beats the base solver at the same column value (generated, not written by hand)."""
    out = []
    for line in lines:
        solver = line.split(" ")[0]
        base = BASE_SOLVER.get(solver)
        if base not in lines:
            continue
        shared = [c for c in columns if (line, c) in cells and (base, c) in cells]
        if not shared:
            continue
        wins = [c for c in shared if better(cells[(line, c)], cells[(base, c)])]
        ratios = [cells[(line, c)] / cells[(base, c)] for c in shared if cells[(base, c)] not in (0.0,)]
        ratio_text = f"; ratio to {base} {min(ratios):.3g}–{max(ratios):.3g}" if ratios else ""
        out.append(f"- {line}: better than {base} at {len(wins)} of {len(shared)} "
                   f"({', '.join(str(c) for c in wins) or 'none'}){ratio_text}")
    return out


def render_markdown(spec: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], command: str, roots: Sequence[str]) -> str:
    """The table as Markdown: header with provenance, then per section and metric a line × column grid."""
    column_name = spec.get("column_label", spec["column"])
    out = [f"# {spec['title']}", ""]
    if spec.get("description"):
        out += [spec["description"].strip(), ""]
    out += [
        f"Generated by `{command}` from the run folders under {', '.join(f'`{r}`' for r in roots)} "
        f"(their `metrics.json`); every number below is read from those files.", "",
    ]
    by_section: dict[str, list] = defaultdict(list)
    for row in rows:
        by_section[row["section"]].append(row)
    if not by_section:
        out += ["No finished runs found.", ""]
    for section, section_rows in by_section.items():
        out += [f"## {section}", ""]
        published = _published(spec, section)
        if published:
            out += [f"Published EDM FID for this checkpoint: {published}.", ""]
        images = sorted({r["num_images"] for r in section_rows if r["num_images"] is not None})
        if images:
            out += [f"Images per run: {', '.join(str(n) for n in images)}.", ""]
        for metric in spec["metrics"]:
            label, fmt = metric["label"], metric.get("format", ".4g")
            higher = bool(metric.get("higher_is_better", False))
            better = (lambda a, b: a > b) if higher else (lambda a, b: a < b)
            cells = {(r["line"], r["column"]): r["value"] for r in section_rows
                     if r["metric"] == label and r["column"] is not None and r["value"] is not None}
            if not cells:
                continue
            columns = sorted({c for _, c in cells})
            lines = sorted({l for l, _ in cells}, key=lambda l: (l.split(" ")[0].replace("bdia_", "") , l))
            best = {c: (max if higher else min)(cells[(l, c)] for l in lines if (l, c) in cells) for c in columns}
            out += [f"### {label} ({'higher' if higher else 'lower'} is better)", ""]
            out += ["| solver | " + " | ".join(f"{column_name} {c}" for c in columns) + " |",
                    "|---|" + "---|" * len(columns)]
            for line in lines:
                values = []
                for c in columns:
                    v = cells.get((line, c))
                    text = _format(v, fmt)
                    values.append(f"**{text}**" if v is not None and v == best[c] else text)
                out.append(f"| {line} | " + " | ".join(values) + " |")
            out.append("")
            summary = _summary(cells, lines, columns, better)
            if summary:
                out += [f"Where BDIA beats its base solver on {label}:", ""] + summary + [""]
        floors = defaultdict(list)
        for r in section_rows:
            if r["line"] == "real-data floor":
                floors[r["metric"]].append(r["value"])
        if floors:
            out += ["Real-data floor (same reference set, same features):", ""]
            for label, values in floors.items():
                lo, hi = min(values), max(values)
                span = f"{lo:.4g}" if math.isclose(lo, hi, rel_tol=1e-9) else f"{lo:.4g}–{hi:.4g} (varies with the run's image count)"
                out.append(f"- {label}: {span}")
            out.append("")
    return "\n".join(out)


def _write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    fields = ["section", "line", "solver", "gamma", "num_steps", "column", "metric", "value", "num_images", "run_dir"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in fields})
    path.write_text(buffer.getvalue())


def _plot(spec: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = spec["metrics"][0]["label"]
    sections = sorted({r["section"] for r in rows})
    fig, axes = plt.subplots(1, max(len(sections), 1), figsize=(5.5 * max(len(sections), 1), 4.2), squeeze=False)
    for ax, section in zip(axes[0], sections):
        points = defaultdict(list)
        for r in rows:
            if r["section"] == section and r["metric"] == metric and r["column"] is not None and r["value"] is not None:
                points[r["line"]].append((r["column"], r["value"]))
        for line in sorted(points):
            xs, ys = zip(*sorted(points[line]))
            style = "--" if not line.startswith("bdia") else "-"
            ax.plot(xs, ys, style, marker="o", markersize=3, label=line)
        floors = [r["value"] for r in rows if r["section"] == section and r["line"] == "real-data floor"
                  and r["metric"] == (spec.get("floors") or [{}])[0].get("label")]
        if floors:
            ax.axhline(min(floors), color="grey", linewidth=0.8, linestyle=":", label="real-data floor")
        values = [v for pts in points.values() for _, v in pts]
        if values and min(values) > 0:
            ax.set_yscale("log")
        ax.set_title(section)
        ax.set_xlabel(spec.get("column_label", spec["column"]))
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _copy_figures(spec, runs, output: Path) -> dict[str, Path]:
    """``figure: <file>``: per section, copy that file of the run with the largest column value next to the table."""
    name = spec.get("figure")
    if not name:
        return {}
    best: dict[str, Mapping] = {}
    for record in runs:
        section = str(dig(record, spec["section"]))
        if (Path(record["run_dir"]) / name).is_file():
            if section not in best or (dig(record, spec["column"]) or 0) > (dig(best[section], spec["column"]) or 0):
                best[section] = record
    copied = {}
    for section, record in sorted(best.items()):
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in section)
        target = output.parent / f"{output.name}_{safe}{Path(name).suffix}"
        shutil.copyfile(Path(record["run_dir"]) / name, target)
        copied[section] = target
    return copied


def write_table(spec: Mapping[str, Any], roots: Sequence[str | Path], output: str | Path | None = None,
                command: str | None = None, plot: bool = True, logger=None) -> dict[str, Path]:
    """Collect the run folders under ``roots`` (:func:`bdia.apps.reproduce.run_roots` of the spec), write
    ``<output>.md``, ``.csv`` and ``.png``; return their paths. ``logger`` (started, e.g. a W&B run): also gets
    the rows as one summary table."""
    roots = [Path(r) for r in roots]
    runs = collect_runs(roots, spec.get("explode"))
    rows = table_rows(spec, runs)
    output = Path(output or spec["output"])
    output.parent.mkdir(parents=True, exist_ok=True)
    command = command or f"python scripts/make_tables.py {spec['name']}"
    paths = {"md": output.with_suffix(".md"), "csv": output.with_suffix(".csv")}
    figures = _copy_figures(spec, runs, output)
    text = render_markdown(spec, rows, command, [str(r) for r in roots])
    if figures:
        text += "\n## Figures\n\n" + "\n".join(f"![{section}]({path.name})" for section, path in figures.items()) + "\n"
        paths.update({f"figure {section}": path for section, path in figures.items()})
    paths["md"].write_text(text)
    _write_csv(rows, paths["csv"])
    if plot and any(r["column"] is not None for r in rows):
        paths["png"] = output.with_suffix(".png")
        _plot(spec, rows, paths["png"])
    if logger is not None:
        log_table_to_logger(logger, spec, rows)
    return paths


def log_table_to_logger(logger, spec: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> None:
    """Log the long-format table as one summary table (W&B: one run in the table's group)."""
    columns = ["section", "line", "column", "metric", "value", "num_images", "run_dir"]
    logger.log_table(f"{spec['name']}/summary", columns, [[r.get(c) for c in columns] for r in rows])
