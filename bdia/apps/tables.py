"""Results tables and plots built from run folders' ``metrics.json`` — never from hand-written numbers.

A *table spec* (``configs/tables/<name>.yaml``, read by :func:`bdia.apps.reproduce.load_spec`) says which run
folders belong to a table and what to show:

* ``sweeps``: lists of Hydra overrides (one multirun each); every ``experiment=<name>`` in them names a run
  root ``<runs_root>/<name>/`` (``results/sample/<name>/`` for the sampling app) whose sub-folders are read;
* ``section``: the ``metrics.json`` key that splits the table (e.g. ``model.config``: one block per network);
* ``lines``: the keys that identify one line of the plot / row of the table (e.g. ``[solver, gamma]``);
* ``column``: the key along the x axis (e.g. ``nfe``, measured by the run, not assumed);
* ``metrics``: ``[{key, label, format}]``, the first is the plotted one; lower is better unless ``higher_is_better``;
  ``noise``: the relative difference within which two values count as equal (timings on a shared machine,
  FD of a few hundred images), so no "best" is marked and no "win" counted inside it; ``equal_below``: values
  this small count as equal (round-off of exact round trips); ``bold: false``: mark no best value (numbers
  that mean nothing, e.g. a random CLIP's); ``timing: true``: the
  value is shown only where it covers every image of the run (``timed_images``; a run resumed before per-image
  times were recorded shows "—"); ``ratio``: print the ratio to the base solver (default: for lower-is-better
  metrics on a ratio scale, errors, distances and times; never for PSNR / SSIM / scores);
* ``section_label``: what the section key names (e.g. ``model``: panel titles read "model: <value>");
* ``floors``: ``[{key, label}]``: reference values printed beside the rows (e.g. the real-data FD floor);
* ``explode``: a key holding one dict per method (``scripts/edit.py``'s ``methods``): one record per method, with
  the method's keys at the top (where the run's own keys do not take them) and all of them under ``<explode>.``;
* ``figure``: a file in each run folder (e.g. ``edit_grid.png``) copied beside the table, one per section;
* ``published``: ``registry`` shows the FID that EDM's repository states for the section's checkpoint (its own
  column, with its NFE and source); anything else is left out.

Output: ``<output>.md`` (one block per section and metric, the best value per column in bold when it beats every
other by more than the metric's ``noise`` and its printed digits, a generated summary of where each BDIA line
beats its base solver), ``<output>.csv`` (long format, one row per run and metric, with the run folder) and
``<output>.png`` (first metric vs the column key, one line per solver line, one panel per section).

:func:`summarize` / :func:`write_summary` (``scripts/summarize.py``) tabulate any results folder without a spec:
one row per run (or per method of an edit run), the overrides that vary between the runs as columns, the
headline numbers of their ``metrics.json``, and a plot of one metric against one key.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import textwrap
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..networks.registry import CHECKPOINTS
from ..runfolder import atomic_write

__all__ = ["dig", "collect_runs", "table_rows", "render_markdown", "write_table", "line_label", "BASE_SOLVER",
           "split_values", "folder_overrides", "find_metrics", "summarize", "summary_markdown", "summary_csv",
           "plot_axes", "summary_plot", "write_summary", "written_by_summarize"]

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
            if (metric.get("timing") or metric.get("fresh_only")) and not _timed_whole_run(record):
                value = None  # the time covers only some of the run's images
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


def _timed_whole_run(record: Mapping[str, Any]) -> bool:
    """Whether a run's times cover all its images: ``timed_images`` (every image's recorded seconds, kept across
    resumes), or, in ``metrics.json`` files written before it existed, a run that resumed nothing."""
    timed = dig(record, "timed_images")
    if timed is not None:
        return timed == dig(record, "num_images")
    return (dig(record, "num_resumed") or 0) == 0


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


def _same(a: float, b: float, noise: float, equal_below: float = 0.0) -> bool:
    """Equal within the relative ``noise`` (exactly equal when there is none), or both at most ``equal_below`` in
    size (round-off: 2e-14 and 3e-14 are the same exact result)."""
    return (a == b or (noise > 0 and abs(a - b) <= noise * max(abs(a), abs(b)))
            or max(abs(a), abs(b)) <= equal_below)


def _shows_ratio(metric: Mapping[str, Any], values: Sequence[float]) -> bool:
    if "ratio" in metric:
        return bool(metric["ratio"])
    return not metric.get("higher_is_better", False) and all(v > 0 for v in values)


def _best_line(cells, lines, column, metric, fmt: str) -> str | None:
    """The line whose value at ``column`` beats every other line's by more than the metric's noise and by more
    than the printed digits; ``None`` when there is no such winner (ties, noise, a single line)."""
    higher = bool(metric.get("higher_is_better", False))
    noise = float(metric.get("noise", 0.0))
    present = [(l, cells[(l, column)]) for l in lines if cells.get((l, column)) is not None]
    if len(present) < 2 or metric.get("bold") is False:
        return None
    present.sort(key=lambda lv: lv[1], reverse=higher)
    (best, v1), (_, v2) = present[0], present[1]
    if _same(v1, v2, noise, float(metric.get("equal_below", 0.0))) or _format(v1, fmt) == _format(v2, fmt):
        return None
    return best


def _summary(cells: Mapping[tuple[str, Any], float], lines: Sequence[str], columns: Sequence, metric) -> list[str]:
    """Where each BDIA line beats the base solver at the same column value beyond the metric's noise (generated,
    not written by hand)."""
    higher = bool(metric.get("higher_is_better", False))
    noise = float(metric.get("noise", 0.0))
    out = []
    for line in lines:
        solver = line.split(" ")[0]
        base = BASE_SOLVER.get(solver)
        if base not in lines:
            continue
        shared = [c for c in columns if cells.get((line, c)) is not None and cells.get((base, c)) is not None]
        if not shared:
            continue
        ties = [c for c in shared if _same(cells[(line, c)], cells[(base, c)], noise, float(metric.get("equal_below", 0.0)))]
        wins = [c for c in shared if c not in ties and (cells[(line, c)] > cells[(base, c)]) == higher]
        text = f"- {line}: better than {base} at {len(wins)} of {len(shared)} ({', '.join(str(c) for c in wins) or 'none'})"
        if ties:
            text += f", equal{f' within {noise:.0%}' if noise else ''} at {', '.join(str(c) for c in ties)}"
        values = [cells[(line, c)] for c in shared] + [cells[(base, c)] for c in shared]
        if _shows_ratio(metric, values):
            ratios = [cells[(line, c)] / cells[(base, c)] for c in shared]
            text += f"; ratio to {base} {min(ratios):.3g}–{max(ratios):.3g}"
        out.append(text)
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
            cells = {(r["line"], r["column"]): r["value"] for r in section_rows
                     if r["metric"] == label and r["column"] is not None}
            if not cells:
                continue
            columns = sorted({c for _, c in cells})
            lines = sorted({l for l, _ in cells}, key=lambda l: (l.split(" ")[0].replace("bdia_", "") , l))
            best = {c: _best_line(cells, lines, c, metric, fmt) for c in columns}
            out += [f"### {label} ({'higher' if higher else 'lower'} is better)", ""]
            out += ["| solver | " + " | ".join(f"{column_name} {c}" for c in columns) + " |",
                    "|---|" + "---|" * len(columns)]
            for line in lines:
                values = []
                for c in columns:
                    text = _format(cells.get((line, c)), fmt)
                    values.append(f"**{text}**" if best[c] == line else text)
                out.append(f"| {line} | " + " | ".join(values) + " |")
            out.append("")
            notes = []
            if metric.get("noise"):
                notes.append(f"Values within {float(metric['noise']):.0%} of each other count as equal (noise).")
            if metric.get("equal_below"):
                notes.append(f"Values below {float(metric['equal_below']):g} count as equal (round-off).")
            if metric.get("bold") is False:
                notes.append("No best value is marked: these numbers carry no meaning here.")
            if any(v is None for v in cells.values()):
                notes.append("— = not measured for every image of the run (resumed before per-image times were "
                             "recorded: rerun it with resume=false to time it)." if metric.get("timing") or
                             metric.get("fresh_only") else "— = not measured.")
            if notes:
                out += [" ".join(notes), ""]
            summary = _summary(cells, lines, columns, metric) if metric.get("bold") is not False else []
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
        ax.set_title(textwrap.fill(f"{spec.get('section_label', spec['section'])}: {section}", 50), fontsize=9)
        ax.set_xlabel(spec.get("column_label", spec["column"]))
        ax.set_ylabel(textwrap.fill(metric, 40), fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(textwrap.fill(spec.get("title", spec.get("name", "")), 60 * max(len(sections), 1)), fontsize=10)
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


# --------------------------------------------------------------------------------------------------
# Any results folder as a table, without a spec (scripts/summarize.py): one row per run, the overrides that vary
# between the runs as columns, the headline numbers of each run's metrics.json, a plot of one metric vs one key.

#: Headline numbers looked for in every run's ``metrics.json`` (dotted keys), in column order; those present
#: in at least one run are shown unless ``metrics=`` names others.
HEADLINE_METRICS = (
    "nfe",
    "evaluation.digits.fd", "evaluation.digits.kid",
    "evaluation.fid.fid", "evaluation.fid.kid",
    "evaluation.clip.clip_score",
    "mixture.nearest_mean_rms", "mixture.log_prob_per_dim",
    "latent.relative_error", "methods.image.psnr", "methods.image.ssim", "clip.clip_score_edit",
    "nfe_inversion_and_reconstruction", "seconds_inversion_and_reconstruction",
    "images_per_second", "sampling_seconds",
)
#: Quality numbers: the first present is the default plotted metric (else the first headline number).
QUALITY_METRICS = ("evaluation.fid.fid", "evaluation.digits.fd", "evaluation.clip.clip_score", "latent.relative_error",
                   "mixture.nearest_mean_rms")
#: Real-data floors reported under the table (distinct values).
FLOOR_METRICS = {"evaluation.digits.floor_matched_fd": "FD of as many real training digits as a run has images",
                 "evaluation.digits.floor_halves_fd": "FD between two disjoint halves of the real digits"}
#: Config keys that never tell runs apart (where a folder's name is not its overrides).
_NOT_SETTINGS = ("out_dir", "choices", "hydra", "progress", "resume", "device", "distributed", "logger", "launcher")
#: Marks the files written by :func:`write_summary` (so it never overwrites a file it did not write).
SUMMARY_MARK = "written by scripts/summarize.py"
_MAX_JSON_BYTES = 64 * 2**20


def split_values(value: str) -> list[str]:
    """Split a Hydra sweep value ``a,b,[1,2],'x,y'`` (or a run folder's name ``k=v,k2=[1,2]``) at its top-level
    commas."""
    parts, depth, quote, current = [], 0, None, ""
    for char in value:
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[({":
            depth += 1
        elif char in "])}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(current)
            current = ""
            continue
        current += char
    parts.append(current)
    return parts


def folder_overrides(name: str) -> dict[str, str] | None:
    """A run folder's name as the overrides it was named after (Hydra's ``override_dirname``:
    ``dataset=digits,solver=bdia_edm`` -> ``{"dataset": "digits", "solver": "bdia_edm"}``); ``None`` when the
    name is not such a list."""
    out = {}
    for part in split_values(name):
        key, sep, value = part.partition("=")
        if not sep or not key or any(c in key for c in " /=,"):
            return None
        out[key.lstrip("+~")] = value
    return out or None


def _read_json(path: Path) -> Any:
    if path.stat().st_size > _MAX_JSON_BYTES:
        raise ValueError(f"{path}: larger than {_MAX_JSON_BYTES // 2**20} MiB; not a metrics.json this project writes")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _flat(record: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flat(value, name + "."))
        else:
            out[name] = value
    return out


def _setting_text(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return f"{value:.1f}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_setting_text(v) for v in value) + "]"
    return "null" if value is None else str(value)


def _config_settings(run_dir: Path) -> dict[str, str]:
    path = run_dir / "config.yaml"
    if not path.is_file() or path.stat().st_size > _MAX_JSON_BYTES:
        return {}
    from omegaconf import OmegaConf

    try:
        config = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception:  # noqa: BLE001 - a config we cannot read just gives no columns
        return {}
    flat = _flat(config) if isinstance(config, dict) else {}
    return {k: _setting_text(v) for k, v in flat.items() if k.split(".")[0] not in _NOT_SETTINGS}


def find_metrics(folder) -> list[Path]:
    """Every ``metrics.json`` at or below ``folder`` (hidden folders and W&B's ``wandb/`` skipped), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such folder")
    found = []
    for path in sorted(folder.rglob("metrics.json")):
        parts = path.relative_to(folder).parts[:-1]
        if any(p.startswith(".") or p == "wandb" for p in parts):
            continue
        found.append(path)
    if not found:
        raise ValueError(f"{folder}: no run folders (no metrics.json at or below it)")
    return found


def _sort_key(value):
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(value))


def summarize(folder, metrics: Sequence[str] | None = None) -> dict:
    """The runs at or below ``folder`` as one table: ``{"keys": varying settings, "common": settings shared by
    every run, "metrics": metric keys, "rows": [{"run_dir", "settings": {key: text}, "values": {metric: value}}],
    "floors": {label: [values]}}``.

    Settings are the overrides a run folder is named after (Hydra's sweep folders, ``key=value,...``); where a
    name is not such a list, the run's ``config.yaml`` (flattened). An edit run (``scripts/edit.py``) gives one
    row per method (``method`` is then a setting). ``metrics``: dotted ``metrics.json`` keys; default the
    :data:`HEADLINE_METRICS` present."""
    folder = Path(folder)
    records = []
    for path in find_metrics(folder):
        record = _read_json(path)
        if not isinstance(record, dict):
            raise ValueError(f"{path}: expected a JSON object")
        run_dir = path.parent
        name = run_dir.relative_to(folder).as_posix() if run_dir != folder else run_dir.name
        settings = folder_overrides(run_dir.name) if run_dir != folder else None
        settings = dict(settings) if settings is not None else None
        if settings is not None and run_dir.parent != folder:  # runs of several sweeps: which one
            settings["sweep"] = run_dir.parent.relative_to(folder).as_posix()
        methods = record.get("methods")
        if isinstance(methods, Mapping) and methods and all(isinstance(v, Mapping) for v in methods.values()):
            parent = {k: v for k, v in record.items() if k != "methods"}
            for method, values in methods.items():
                records.append((run_dir, name, settings, {**values, **parent, "methods": values}, method))
        else:
            records.append((run_dir, name, settings, record, None))
    by_name = all(s is not None for _, _, s, _, _ in records) and len({n for _, n, _, _, _ in records}) > 1
    rows = []
    for run_dir, name, settings, record, method in records:
        if not by_name:
            settings = _config_settings(run_dir)
        settings = dict(settings or {})
        if method is not None:
            settings["method"] = method
        rows.append({"run_dir": str(run_dir), "settings": settings, "record": record})
    keys = sorted({k for r in rows for k in r["settings"]}, key=lambda k: (k != "sweep", k != "method", k))
    varying = [k for k in keys if len({r["settings"].get(k) for r in rows}) > 1]
    if not by_name:
        varying = _distinct_partitions(varying, rows)
    common = {k: rows[0]["settings"][k] for k in keys if k not in varying and k in rows[0]["settings"]}
    if metrics:
        available = sorted({k for r in rows for k, v in _flat(r["record"]).items() if _is_number(v)})
        unknown = [m for m in metrics if not any(dig(r["record"], m) is not None for r in rows)]
        if unknown:
            raise ValueError(f"metric(s) {', '.join(unknown)} in no run's metrics.json; numbers there: "
                             f"{', '.join(available[:40])}{' ...' if len(available) > 40 else ''}")
        chosen = list(metrics)
    else:
        chosen = [m for m in HEADLINE_METRICS if any(_is_number(dig(r["record"], m)) for r in rows)]
    floors: dict[str, list] = defaultdict(list)
    for r in rows:
        r["values"] = {m: (dig(r["record"], m) if _is_number(dig(r["record"], m)) else None) for m in chosen}
        for key, label in FLOOR_METRICS.items():
            value = dig(r["record"], key)
            if _is_number(value) and value not in floors[label]:
                floors[label].append(value)
    rows.sort(key=lambda r: [_sort_key(r["settings"].get(k)) for k in varying] + [r["run_dir"]])
    for r in rows:
        del r["record"]
    return {"folder": str(folder), "keys": varying, "common": common, "metrics": chosen, "rows": rows,
            "floors": dict(floors)}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _distinct_partitions(keys: Sequence[str], rows) -> list[str]:
    """Of keys that split the runs the same way (``solver.name`` and ``solver.gamma`` of a solver sweep), keep
    the shortest name."""
    kept, seen = [], set()
    for key in sorted(keys, key=lambda k: (k.count("."), len(k), k)):
        groups = {}
        partition = tuple(groups.setdefault(r["settings"].get(key), len(groups)) for r in rows)
        if partition not in seen:
            seen.add(partition)
            kept.append(key)
    return [k for k in keys if k in kept]


def _cell(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def summary_markdown(summary: Mapping[str, Any], command: str | None = None) -> str:
    """The summary as Markdown: what was read, the settings shared by every run, one row per run."""
    keys, metrics = summary["keys"], summary["metrics"]
    out = [f"# Runs in `{summary['folder']}`", ""]
    if command:
        out += [f"<!-- {SUMMARY_MARK} -->", f"Generated by `{command}` from each run's `metrics.json` "
                f"(and `config.yaml`); {len(summary['rows'])} rows.", ""]
    if summary["common"]:
        shown = ", ".join(f"{k}={v}" for k, v in list(summary["common"].items())[:12])
        more = len(summary["common"]) - 12
        out += [f"Every run: {shown}{f' (+{more} more)' if more > 0 else ''}.", ""]
    header = keys + metrics if keys else ["run"] + metrics
    out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in summary["rows"]:
        left = [r["settings"].get(k, "—") for k in keys] if keys else [Path(r["run_dir"]).name]
        out.append("| " + " | ".join([*left, *(_cell(r["values"][m]) for m in metrics)]) + " |")
    out.append("")
    for label, values in summary["floors"].items():
        out.append(f"Real-data floor, {label}: {', '.join(f'{v:.4g}' for v in values)}")
    if summary["floors"]:
        out.append("")
    return "\n".join(out)


def summary_csv(summary: Mapping[str, Any]) -> str:
    """One row per run: ``run_dir``, the varying settings, the metrics."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["run_dir", *summary["keys"], *summary["metrics"]])
    for r in summary["rows"]:
        writer.writerow([r["run_dir"], *(r["settings"].get(k, "") for k in summary["keys"]),
                         *("" if r["values"][m] is None else r["values"][m] for m in summary["metrics"])])
    return buffer.getvalue()


def plot_axes(summary: Mapping[str, Any], y: str | None = None, x: str | None = None) -> tuple[str | None, str | None, list]:
    """The plot's metric ``y``, its x key ``x`` (a varying setting or a metric) and the settings that name its
    lines; defaults: the first quality metric, and ``nfe`` when it varies, else the first numeric varying setting.
    ``(None, None, [])`` when there is nothing to plot against."""
    rows, metrics, keys = summary["rows"], summary["metrics"], summary["keys"]
    if y is not None and y not in metrics:
        raise ValueError(f"plot metric {y!r} is not a column; columns: {', '.join(metrics)}")
    y = y or next((m for m in QUALITY_METRICS if m in metrics), next((m for m in metrics if m != "nfe"), None))

    def numeric(key):
        values = [_x_value(r, key) for r in rows]
        return all(v is not None for v in values) and len(set(values)) > 1

    if x is not None and x not in keys and x not in metrics:
        raise ValueError(f"plot key {x!r} is neither a varying setting nor a metric; settings: {', '.join(keys) or 'none'}"
                         f"; metrics: {', '.join(metrics)}")
    if x is None:
        x = "nfe" if "nfe" in metrics and numeric("nfe") else next((k for k in keys if numeric(k)), None)
    if y is None or x is None or x == y:
        return None, None, []
    group = [k for k in keys if k != x]
    # A number that follows from x and the other settings (solver.num_steps beside nfe) would split every line.
    for key in list(group):
        if not all(_sort_key(r["settings"].get(key))[0] == 0 for r in rows):
            continue
        others = [k for k in group if k != key]
        mapping: dict = {}
        if all(mapping.setdefault((tuple(r["settings"].get(k) for k in others), _x_value(r, x)),
                                  r["settings"].get(key)) == r["settings"].get(key) for r in rows):
            group.remove(key)
    return y, x, group


def _x_value(row, key):
    value = row["values"].get(key) if key in row["values"] else row["settings"].get(key)
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def summary_plot(summary: Mapping[str, Any], path: Path, y: str, x: str, group: Sequence[str]) -> None:
    """``y`` against ``x``, one line per combination of the ``group`` settings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[str, list] = defaultdict(list)
    for r in summary["rows"]:
        xv, yv = _x_value(r, x), r["values"].get(y)
        if xv is None or yv is None:
            continue
        label = ", ".join(f"{k}={r['settings'].get(k, '—')}" for k in group) or y
        lines[label].append((xv, yv))
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for label in sorted(lines):
        xs, ys = zip(*sorted(lines[label]))
        ax.plot(xs, ys, marker="o", markersize=3, label=textwrap.shorten(label, 60))
    values = [v for points in lines.values() for _, v in points]
    if values and min(values) > 0 and max(values) / min(values) > 20:
        ax.set_yscale("log")
    for (label, floor), style in zip(summary["floors"].items(), (":", "--", "-.")):
        if y.startswith("evaluation.digits.fd") and floor:
            ax.axhline(min(floor), color="grey", linewidth=0.8, linestyle=style,
                       label=textwrap.shorten(f"real-data floor: {label}", 60))
    ax.set_xlabel(x)
    ax.set_ylabel(textwrap.fill(y, 40))
    ax.set_title(textwrap.fill(f"{y} vs {x} — {summary['folder']}", 70), fontsize=9)
    ax.grid(alpha=0.3)
    if len(lines) > 1 or summary["floors"]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120, metadata={"Software": f"bdia: {SUMMARY_MARK}"})
    plt.close(fig)


def _ours(path: Path) -> bool:
    """Whether ``path`` is absent or a file :func:`write_summary` wrote (never overwrite anything else)."""
    if not path.exists() and not path.is_symlink():
        return True
    if path.is_symlink() or not path.is_file():
        return False
    if path.suffix == ".png":
        try:
            from PIL import Image

            with Image.open(path) as image:
                return SUMMARY_MARK in str(image.info.get("Software", ""))
        except OSError:
            return False
    with path.open("rb") as f:
        head = f.read(4096).decode("utf-8", "replace")
    if path.suffix == ".csv":  # a CSV has no room for a mark: ours when the Markdown beside it is
        markdown = path.with_suffix(".md")
        return head.startswith("run_dir,") and markdown.is_file() and _ours(markdown)
    return SUMMARY_MARK in head


def written_by_summarize(path) -> bool:
    """Whether ``path`` is a file :func:`write_summary` wrote (``make clean`` removes those, nothing else)."""
    path = Path(path)
    return path.is_file() and not path.is_symlink() and _ours(path)


def write_summary(summary: Mapping[str, Any], output, command: str, y: str | None = None,
                  x: str | None = None, plot: bool = True) -> dict[str, Path]:
    """Write ``<output>.md``, ``.csv`` and (when there is something to plot) ``.png``; refuse (``ValueError``) to
    replace a file this function did not write."""
    output = Path(output)
    paths = {"md": output.with_name(output.name + ".md"), "csv": output.with_name(output.name + ".csv")}
    y, x, group = plot_axes(summary, y, x) if plot else (None, None, [])
    if y is not None:
        paths["png"] = output.with_name(output.name + ".png")
    for path in paths.values():
        if not _ours(path):
            raise ValueError(f"{path} exists and was not written by scripts/summarize.py; left untouched "
                             f"(choose another --output)")
    output.parent.mkdir(parents=True, exist_ok=True)
    text = summary_markdown(summary, command)
    if y is not None:
        text += f"\n![{y} vs {x}]({paths['png'].name})\n"
    with atomic_write(paths["md"], "w") as f:
        f.write(text)
    with atomic_write(paths["csv"], "w") as f:
        f.write(summary_csv(summary))
    if y is not None:
        tmp = paths["png"].with_name(f".{paths['png'].name}.tmp.png")
        summary_plot(summary, tmp, y, x, group)
        tmp.replace(paths["png"])
    return paths
