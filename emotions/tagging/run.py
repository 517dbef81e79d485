"""``tag_corpus``: one tagging run, from the inputs to the committed output folder.

settings checked -> inputs inspected -> bundle and precision checked
-> already committed with these settings and inputs? nothing to do (reuse.py)
-> Ray joined, actors planned (actor_plan.py)
-> under the output's lease (output_lease.py):
     staging opened (staging.py) -> pending files tagged (pipeline.py)
     -> every file's rows checked -> manifest built -> commit (commit.py)
-> the output's report (report.py) -> TagSummary (summary.py)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import pyarrow as pa

from emotions import cluster, environment, storage
from emotions.precision import RUNTIMES
from emotions.storage import Folder
from emotions.tagging.actor_plan import ActorPlan, plan_actors
from emotions.tagging.commit import FORMAT, MANIFEST, check_output
from emotions.tagging.inputs import InputFile, inspect_inputs, output_schema, resolve_inputs
from emotions.tagging.output_lease import check_lease, remove_leftover_staging, writing
from emotions.tagging.pipeline import write_outputs
from emotions.tagging.predictor import check_summary, resolve_runtime, runtime_bytes, runtime_record
from emotions.tagging.report_reference import validation_reference
from emotions.tagging.reuse import check_committed, reusable
from emotions.tagging.settings import TaggingError, TaggingSettings, check_settings
from emotions.tagging.staging import Staging
from emotions.tagging.summary import TagSummary

log = logging.getLogger("emotions.tagging")


def tag_corpus(
    model: str | Path,
    inputs: str | Path | list,
    output: str | Path,
    *,
    text_column: str = "body",
    id_column: str = "id",
    keep_columns=(),
    probabilities: bool = False,
    overwrite: bool = False,
    num_actors: int | None = None,
    min_actors: int | None = None,
    batch_size: int = 1024,
    cpus_per_actor: int = 1,
    gpus_per_actor: float = 0,
    precision: str | None = None,
    tokenize_stage: bool | None = None,
    on_bad_file: str = "fail",
    report: bool = True,
    baselines=(),
    before_commit: Callable[[], None] | None = None,
    keep_unchanged: bool = False,
    ray_address: str | None = None,
) -> TagSummary:
    """Tag every row of the Parquet ``inputs`` (file, folder, glob, or a list; local or a pyarrow
    URI) with the bundle at ``model``; write the committed output folder ``output``.
    ``precision`` is auto (default: int8 on CPU when the bundle's recorded check allows it, else
    fp32), fp32, bf16 or int8.

    ``model`` is read by every actor: on a multi-node cluster, a URI (s3://...) or a shared
    folder. ``ray_address``: the Ray cluster to join (None: ``RAY_ADDRESS``, else a local Ray), once
    the inputs are checked. Raises TaggingError (or BundleError) before any work for anything a user can fix.

    Re-running is safe: a run that died is finished by the next one with the same settings; an
    output already committed with the same settings and inputs is left as it is (nothing to do)
    unless ``overwrite``; a committed output with other settings or inputs is replaced only with
    ``overwrite`` (every file tagged again), or with ``keep_unchanged`` (the nightly re-open:
    same settings, the output files of unchanged inputs kept, the others tagged). One run writes
    an output at a time (a lease in ``OUTPUT/_lease``); another is refused with the holder's name,
    and a run that loses its lease stops. ``before_commit`` is called once every file is tagged
    and checked, before the commit's first write: if it raises, nothing is committed and the
    error propagates.

    ``report``: once committed, the output gets its report (``emotions.tagging.report.write_tagging_report``:
    ``_report.md``, ``_report/*.png``, ``_report.json``), with drift against the committed
    ``baselines`` (earlier outputs). A report that fails is logged; the output stays committed."""
    start = time.perf_counter()
    if isinstance(keep_columns, str):
        keep_columns = keep_columns.split(",")
    settings = check_settings(
        model=storage.expand(str(model)),
        output=str(output),
        text_column=text_column,
        id_column=id_column,
        keep_columns=tuple(dict.fromkeys(c for c in keep_columns if c != id_column)),
        probabilities=probabilities,
        overwrite=overwrite,
        num_actors=num_actors,
        min_actors=min_actors,
        batch_size=batch_size,
        cpus_per_actor=cpus_per_actor,
        gpus_per_actor=float(gpus_per_actor),
        precision=precision or "auto",
        tokenize_stage=tokenize_stage,
        on_bad_file=on_bad_file,
    )
    target = Folder.from_uri(settings.output)
    previous = check_output(target)
    input_fs, paths = resolve_inputs(inputs, exclude=target)
    files, bad = inspect_inputs(input_fs, paths, settings)
    check_output_names(files)
    where = {uri: path for path, uri in paths}
    skipped_bytes = {uri: info.size for (uri, _), info in zip(bad, input_fs.get_file_info([where[u] for u, _ in bad]))}
    from emotions.bundle import load_bundle  # torch: imported here, not by Ray Data's read tasks

    bundle = load_bundle(settings.model)
    model_hash, max_length = bundle.hash, bundle.max_length
    requested = settings.precision
    resolved = resolve_runtime(bundle, requested, gpu=settings.gpus_per_actor > 0, ray_address=ray_address)
    precision, precision_check, checks = resolved.precision, resolved.check, resolved.checks
    settings = replace(settings, precision=precision)  # the output's key names the runtime used
    reference = validation_reference(bundle.metrics)  # what the report sets each label's share beside
    key = settings.output_key(model_hash)
    schema, column_types = output_schema(files, settings)
    unchanged = check_committed(target, previous, key, files, bad, overwrite or keep_unchanged, force=overwrite)
    if unchanged:
        remove_leftover_staging(target)
        return unchanged
    exported = runtime_bytes(bundle, precision)  # an ONNX runtime's graph (cached), sent to the actors
    del bundle  # the actors load their own copy; the driver only needed to check it
    inspected = time.perf_counter()

    cluster.connect(ray_address)
    record = environment.log_environment(asdict(settings), "tag")
    plan = plan_actors(settings, *cluster.nodes())
    log.info(
        "%d input files, %d rows; %d..%d actors x %d threads (%.2f CPU, %.2f GPU reserved each), %s, "
        "up to %d tokenizer actors; %s",
        len(files),
        sum(f.rows for f in files),
        plan.min_actors,
        plan.max_actors,
        plan.threads,
        plan.cpus_reserved,
        plan.gpus,
        settings.precision,
        plan.tokenizers,
        plan.why,
    )
    with writing(target) as lease:
        previous = check_output(target)  # again, now that no other run writes here
        kept = reusable(target, previous, key, files) if keep_unchanged else {}
        staging = Staging.open(target, key)
        pending = [f for f in files if f.output_name not in kept and staging.finished(f) is None]
        resumed = {f.output_name for f in files} - {f.output_name for f in pending} - set(kept)
        if resumed:
            log.info("resuming: %d of %d files were finished by an earlier run", len(resumed), len(files))
        if kept:
            log.info(
                "keeping %d of %d files of the committed output: their inputs did not change", len(kept), len(files)
            )
        startup_s = write_outputs(
            input_fs,
            pending,
            staging,
            schema,
            column_types,
            settings,
            plan,
            model_hash,
            max_length,
            exported=exported,
            stop=lease.lost,
        )
        tagged = time.perf_counter()

        markers = staging.check_finished(files, kept)  # each file's footer holds its rows, or no commit
        manifest = build_manifest(
            files,
            markers,
            bad,
            resumed,
            settings,
            plan,
            staging.run_id,
            model_hash,
            max_length,
            schema,
            record,
            inspect_s=inspected - start,
            tag_s=tagged - inspected,
            startup_s=startup_s,
            skipped_bytes=skipped_bytes,
        )
        manifest["key"] = key
        manifest["precision"] = settings.precision  # the thresholds were checked for this runtime
        manifest["backend"], manifest["numeric_precision"] = RUNTIMES[settings.precision]
        # how it ran: "fp32 (tf32 matmuls)" on a TF32 GPU, and on which GPU (not in the key: no re-tagging)
        manifest.update(runtime_record(settings.precision, settings.gpus_per_actor > 0, resolved.device))
        manifest["precision_requested"] = requested
        manifest["precision_check"] = precision_check  # None for fp32: the thresholds' own
        manifest["precision_checks"] = {n: check_summary(c) for n, c in checks.items()}  # what auto chose from
        manifest["reference"] = reference  # the bundle's validation shares (report_reference.py)
        if before_commit is not None:
            before_commit()
        check_lease(lease, target)
        staging.commit(markers, manifest, previous)
    seconds = time.perf_counter() - start
    summary = TagSummary(
        rows_in=manifest["rows_in"],
        rows_out=manifest["rows_out"],
        rows_flagged=manifest["rows_flagged"],
        seconds=seconds,
        rows_per_s=sum(f.rows for f in pending) / max(seconds, 1e-9),
        output=target.uri,
        manifest=target.uri_of(MANIFEST),
        files=len(files),
        files_resumed=len(resumed),
        files_skipped=tuple(uri for uri, _ in bad),
        files_reused=len(kept),
    )
    log.info("%s", summary.line())
    if report:
        summary = replace(summary, report=write_report_safely(target.uri, baselines))
    return summary


def check_output_names(files: list[InputFile]) -> None:
    """Two inputs whose output names collide (same file name, hashes of their URIs equal in 8
    hex digits) would share one output file: refused by name before any work."""
    seen: dict[str, str] = {}
    for f in files:
        if f.output_name in seen:
            raise TaggingError(
                f"inputs {seen[f.output_name]} and {f.uri} map to the same output file "
                f"{f.output_name}; rename one of them, or tag them in two runs"
            )
        seen[f.output_name] = f.uri


def write_report_safely(output: str, baselines) -> str | None:
    """The report of a committed output -> where it went; None (logged) if it could not be made."""
    from emotions.tagging.report import write_tagging_report

    try:
        written = write_tagging_report(output, list(baselines))
    except Exception:  # the tags are committed and correct; the report is a view of them
        log.exception("the report of %s could not be written; `emotions report %s` retries", output, output)
        return None
    return written.report


def build_manifest(
    files: list[InputFile],
    markers: list[dict],
    bad: list[tuple[str, str]],
    resumed: set[str],
    settings: TaggingSettings,
    plan: ActorPlan,
    run_id: str,
    model_hash: str,
    max_length: int,
    schema: pa.Schema,
    environment_record: dict,
    inspect_s: float,
    tag_s: float,
    startup_s: float | None,
    skipped_bytes: dict[str, int] | None = None,
) -> dict:
    skipped_bytes = skipped_bytes or {}
    tagged_rows = sum(f.rows for f, m in zip(files, markers) if f.output_name not in resumed and not m.get("reused"))
    return {
        "format": FORMAT,
        "version": 1,
        "run_id": run_id,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {"path": settings.model, "hash": model_hash, "max_length": max_length},
        "settings": asdict(settings),
        "actors": asdict(plan),
        "inputs": [
            {
                "path": f.uri,
                "rows": f.rows,
                "bytes": f.bytes,
                "fingerprint": f.fingerprint,
                "mtime_ns": f.mtime_ns,
                "output": f.output_name,
                "rows_out": m["rows_out"],
                "flagged": m["flagged"],
                "reasons": m["reasons"],
                "resumed": f.output_name in resumed,
                "reused": bool(m.get("reused")),
                "written_by": m.get("written_by"),
            }
            for f, m in zip(files, markers)
        ],
        "skipped_files": [{"path": uri, "reason": reason, "bytes": skipped_bytes.get(uri)} for uri, reason in bad],
        "rows_in": sum(f.rows for f in files),
        "rows_out": sum(m["rows_out"] for m in markers),
        "rows_flagged": sum(m["flagged"] for m in markers),
        "flag_reasons": _add_counts(m["reasons"] for m in markers),
        "output_schema": schema.to_string(show_schema_metadata=False).splitlines(),
        "timings": {"inspect_s": inspect_s, "tag_s": tag_s, "startup_s": startup_s},  # to the first rows
        "rows_per_s": tagged_rows / max(tag_s, 1e-9),  # this run's rows over its tagging time
        "environment": environment_record,
    }


def _add_counts(dicts) -> dict[str, int]:
    total: dict[str, int] = {}
    for d in dicts:
        for key, n in d.items():
            total[key] = total.get(key, 0) + n
    return dict(sorted(total.items()))
