"""The Ray Data pipeline and its actors: planned reads -> [Tokenizer actors] -> Tagger actors,
which write part files; merge tasks per finished input file. How many actors, and what each
reserves so that read and merge tasks still find room: ``emotions.tagging.actor_plan``.

Tokenizing. On GPU runs a pool of Tokenizer actors (one per GPU actor, up to ``actor_plan.TOKENIZER_CPUS``
each) turns text into token ids ahead of the encoder, so GPU actors only run the encoder. On CPU the
actors tokenize their own batches: on 2 CPUs a separate stage takes the tokenizer's CPU from the
encoder's and sends token ids through the object store, and was slower (100k rows, smoke bundle,
fresh drivers: 3,108-3,812 vs 4,642-5,098 rows/s, in the previous version of
benchmarks/tag_throughput.py); ``tokenize_stage=True`` forces it.

A file whose text column holds no text at all (no rows, or a type that is neither string nor
bytes) is not sent through Ray Data: a Ray task (``flag_file``) writes its rows, every one flagged.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from emotions import environment
from emotions.labels import EKMAN, EMOTIONS, SENTIMENT
from emotions.progress import Progress
from emotions.storage import Folder, filesystem
from emotions.tagging.actor_plan import MERGE_CPUS, READ_CPUS, ActorPlan
from emotions.tagging.commit import STAGING
from emotions.tagging.crashpoints import crash_point
from emotions.tagging.inputs import (
    ERROR_COLUMN,
    FILE_COLUMN,
    TEXT_COLUMN,
    InputFile,
    is_text,
    normalize_block,
    plan_reads,
    read_units,
)
from emotions.tagging.predictor import (
    ENCODER_BATCH,
    load_bundle_tokenizer,
    predict_tokens,
    tokenize_texts,
)
from emotions.tagging.settings import TaggingError, TaggingSettings
from emotions.tagging.staging import PartLedger, Staging, check_owner, merge_parts, write_marker, write_parts

log = logging.getLogger("emotions.tagging")


IDS_COLUMN = "__ids"  # internal: token ids (list<int32>, empty where flagged), from the Tokenizer stage
_EKMAN_MATRIX = np.array([[name in members for members in EKMAN.values()] for name in EMOTIONS])
_SENTIMENT_MATRIX = np.array([[name in members for members in SENTIMENT.values()] for name in EMOTIONS])


def write_outputs(
    input_fs: pafs.FileSystem,
    files: list[InputFile],
    staging: Staging,
    schema: pa.Schema,
    column_types: dict[str, pa.DataType],
    s: TaggingSettings,
    plan: ActorPlan,
    model_hash: str,
    max_length: int,
    exported: bytes | None = None,
    stop=None,
) -> float | None:
    """Tag ``files`` into the staging folder, on Ray workers only: files of text through the Ray
    Data pipeline, whose actors write part files and report them here, then one ``merge_parts``
    task per file once its parts hold all its rows; files without rows, or whose text column holds
    no text (every row flagged), by one ``flag_file`` task each. The driver counts rows and
    records the markers the tasks return; ``exported``: the ONNX graph of an ONNX runtime, sent to
    the actors; ``stop`` (an Event) set stops it. Returns the seconds
    until the first parts were reported (actor start-up, mostly), if the pipeline ran."""
    import ray

    target = staging.target.uri
    direct = {f.output_name for f in files if f.rows == 0 or not is_text(f.schema.field(s.text_column).type)}
    flag = ray.remote(flag_file).options(num_cpus=MERGE_CPUS)
    tasks = [
        flag.remote(target, f, column_types, schema, s, model_hash, staging.run)
        for f in files
        if f.output_name in direct
    ]
    readable = [f for f in files if f.output_name not in direct]
    startup_s = None
    if readable:
        start = time.perf_counter()
        pipeline = tag_pipeline(
            input_fs, readable, staging, schema, column_types, s, plan, model_hash, max_length, exported
        )
        ledger = PartLedger(readable)
        merge = ray.remote(merge_parts).options(num_cpus=MERGE_CPUS)
        progress = Progress("tagging", sum(f.rows for f in readable), unit="rows")
        for block in pipeline.iter_batches(batch_size=None, batch_format="pyarrow"):  # PART_SCHEMA rows
            if stop is not None and stop.is_set():  # the output's lease was lost: another run writes it
                raise TaggingError(
                    f"stopped tagging {target}: this run lost its lease on the output to "
                    "another run (it stalled past the lease's expiry)"
                )
            startup_s = startup_s or time.perf_counter() - start
            for k, parts, reasons in ledger.add(block):  # files whose last rows just arrived
                crash_point("part-reported")
                tasks.append(merge.remote(target, readable[k], parts, reasons, schema, staging.run))
            progress.step(int(pc.sum(block.column("rows")).as_py() or 0))
        ledger.check_complete()
    for marker in ray.get(tasks):
        staging.record(marker)
    return startup_s


def tag_pipeline(
    input_fs: pafs.FileSystem,
    files: list[InputFile],
    staging: Staging,
    schema: pa.Schema,
    column_types: dict[str, pa.DataType],
    s: TaggingSettings,
    plan: ActorPlan,
    model_hash: str,
    max_length: int,
    exported: bytes | None = None,
):
    """The Ray Data pipeline over ``files``: a Dataset of PART_SCHEMA rows, one per part file the
    Tagger actors wrote into the staging folder (__file: the part's input file, an index in
    ``files``). Tagged rows stay on the workers."""
    import ray

    paths = [f.path for f in files]
    needed = list(dict.fromkeys([s.id_column, s.text_column, *s.keep_columns]))
    units = plan_reads(files, s.batch_size, plan.max_actors)
    ds = ray.data.from_items(units, override_num_blocks=max(1, len(units)))
    ds = ds.map_batches(
        read_units,
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=READ_CPUS,
        fn_kwargs={
            "fs": input_fs,
            "paths": paths,
            "needed": needed,
            "text_column": s.text_column,
            "column_types": column_types,
        },
    )
    # No repartition: its tasks ask for a whole CPU, which the actors may not leave.
    if plan.tokenizers:
        ds = ds.map_batches(
            Tokenizer,
            batch_size=s.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(
                min_size=min(plan.min_actors, plan.tokenizers),
                max_size=plan.tokenizers,
                initial_size=min(plan.initial_actors, plan.tokenizers),
            ),
            num_cpus=plan.tokenizer_cpus,
            fn_constructor_kwargs={
                "model": s.model,
                "max_length": max_length,
                "keep_text": s.text_column in s.keep_columns,
            },
        )
    return ds.map_batches(
        Tagger,
        batch_size=s.batch_size,
        batch_format="pyarrow",
        compute=tagger_pool(plan),
        num_cpus=plan.cpus_reserved,
        num_gpus=plan.gpus or None,
        fn_constructor_kwargs={
            "model": s.model,
            "model_hash": model_hash,
            "threads": plan.threads,
            "use_gpu": plan.gpus > 0,
            "precision": s.precision,
            "exported": exported,
            "schema": schema,
            "text_column": s.text_column,
            "staging": staging.target.uri_of(STAGING),
            "names": [f.output_name for f in files],
        },
    )


def tagger_pool(plan: ActorPlan):
    """The Tagger actors' pool: Ray Data's autoscaling actor pool, plan.min_actors to
    plan.max_actors, starting with plan.initial_actors; two calls at once per actor, so that one
    batch's part write overlaps the next batch's encoder pass (``Tagger.__call__``).

    What Ray Data 2.60 does with it (read in its source, ``ray/data/_internal``):
    - it starts ``initial_size`` actors (the whole pool, ``actor_plan``) and does not wait for them
      (``DataContext.wait_for_min_actors_s`` is -1): tasks go to the actors that are up, the others
      stay pending until their node joins (``execution/operators/actor_pool_map_operator.py:
      ActorPoolMapOperator.start``), each a demand the cluster's autoscaler answers at once;
    - it adds actors while the pool's utilization (tasks in flight / (actors x calls per actor)) is
      at least 1.75, never past ``max_size`` nor past what the cluster's resources up now leave the
      operator (``actor_autoscaler/default_actor_autoscaler.py:
      DefaultActorAutoscaler._derive_target_scaling_config``, ``_get_max_scale_up``); with 2 calls
      and 4 tasks in flight per actor the utilization reaches 2.0, so a busy pool grows;
    - it removes an idle actor while the utilization is at most 0.5, but never while an actor is
      pending, not within 10 s of growing and never below ``min_size`` (same function;
      ``_ActorPool._can_apply_request``): reads that cannot keep the pool busy shrink it, and
      ``--min-actors`` keeps a floor; its other shrink, for a pool over its resource allocation,
      compares with a budget that is never below zero (``resource_manager.py:
      ReservationOpResourceAllocator``), so pending actors are not taken back for the GPUs they
      wait for;
    - it asks the cluster's autoscaler for nodes for up to ``max_size`` actors as throughput calls
      for them (``cluster_autoscaler/rate_based_cluster_autoscaler.py``, the default), and the
      pending actors are a demand the autoscaler sees too;
    - once every input is consumed it scales the pool down, pending actors included.
    So a night with fewer GPUs than ``max_size`` runs on the actors it gets, and one that gets
    more nodes later grows into them."""
    import ray

    return ray.data.ActorPoolStrategy(
        min_size=plan.min_actors,
        max_size=plan.max_actors,
        initial_size=plan.initial_actors,
        max_concurrent_calls_per_actor=2,  # one call on the model, one writing its parts
        enable_true_multi_threading=True,  # else Ray Data runs an actor's calls one at a time
    )


def flag_file(
    target_uri: str,
    f: InputFile,
    column_types: dict[str, pa.DataType],
    schema: pa.Schema,
    s: TaggingSettings,
    model_hash: str,
    run: dict,
) -> dict:
    """A Ray task: the output file of an input with nothing to tag (no rows, or a text column that
    is neither string nor bytes), streamed by row group with every row flagged; its marker.
    -> the marker."""
    input_fs, path, _ = filesystem(f.uri)
    target = Folder.from_uri(target_uri)
    needed = list(dict.fromkeys([s.id_column, s.text_column, *s.keep_columns]))
    reasons: dict[str, int] = {}
    check_owner(target, run)
    staged = f"{f.output_name}.{uuid.uuid4().hex[:12]}"  # a file of its own, as merge_parts writes
    with (
        pq.ParquetWriter(target.path(STAGING, staged), schema, filesystem=target.fs) as writer,
        input_fs.open_input_file(path) as handle,
    ):
        for batch in pq.ParquetFile(handle).iter_batches(columns=needed):
            block = pa.Table.from_batches([batch])
            block = block.append_column("path", pa.array([path] * block.num_rows, pa.string()))
            rows = normalize_block(block, [path], s.text_column, column_types)
            # Every row flagged, by construction: an unflagged row would come out as a tag of nothing.
            error = pc.fill_null(rows.column(ERROR_COLUMN), "not a string")
            rows = rows.set_column(rows.schema.get_field_index(ERROR_COLUMN), ERROR_COLUMN, error)
            no_probs = np.zeros((rows.num_rows, len(EMOTIONS)), dtype=np.float32)
            tagged = label_batch(rows, no_probs, np.ones(len(EMOTIONS)), model_hash, schema, s.text_column)
            writer.write_table(tagged.drop_columns([FILE_COLUMN]).cast(schema))
            for item in pc.value_counts(tagged.column("error").drop_null()).to_pylist():
                reasons[item["values"]] = reasons.get(item["values"], 0) + item["counts"]
    return write_marker(target, f, reasons, staged, run)


class Tokenizer:
    """A Ray Data actor on CPU, ahead of the encoder actors (GPU runs): adds __ids, the token ids
    of every taggable row (empty where flagged), so the GPU actors only run the encoder."""

    def __init__(self, model: str, max_length: int, keep_text: bool):
        environment.setup_logging()
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per actor, as reserved
        self.tokenizer, self.max_length, self.keep_text = load_bundle_tokenizer(model), max_length, keep_text

    def __call__(self, batch: pa.Table) -> pa.Table:
        flagged = _flagged(batch)
        data = tokenize_texts(_texts(batch, flagged), self.tokenizer, self.max_length)
        lengths = np.zeros(batch.num_rows, dtype=np.int32)
        lengths[~flagged] = data.lengths
        offsets = np.zeros(batch.num_rows + 1, dtype=np.int32)
        np.cumsum(lengths, out=offsets[1:])
        batch = batch.append_column(IDS_COLUMN, pa.ListArray.from_arrays(pa.array(offsets), pa.array(data.ids)))
        return batch if self.keep_text else batch.drop_columns([TEXT_COLUMN])


def _flagged(batch: pa.Table) -> np.ndarray:
    return batch.column(ERROR_COLUMN).is_valid().to_numpy(zero_copy_only=False)  # [batch] bool


def _texts(batch: pa.Table, flagged: np.ndarray) -> list[str]:
    return batch.column(TEXT_COLUMN).filter(pa.array(~flagged)).to_pylist()


def _token_ids(batch: pa.Table, flagged: np.ndarray):
    """The Tokenizer stage's __ids of the taggable rows -> TokenizedSet."""
    from emotions.batching import TokenizedSet

    ids = batch.column(IDS_COLUMN).combine_chunks().filter(pa.array(~flagged))
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(pc.list_value_length(ids).to_numpy(zero_copy_only=False), out=offsets[1:])
    return TokenizedSet(
        ids.flatten().to_numpy(zero_copy_only=False),
        offsets,
        np.zeros((len(ids), 0), dtype=np.float32),
        np.arange(len(ids)),
    )


class Tagger:
    """A Ray Data actor: loads the bundle once (and its runtime: ``precision.runtime_model``; an
    ONNX runtime from the ``exported`` bytes the driver sent), then tags a batch of rows and writes them as part
    files into the staging folder (``write_parts``).

    Batch in: __file, __text (or __ids from the Tokenizer stage), __error, carried columns.
    Batch out: PART_SCHEMA rows, one per part file written."""

    write = staticmethod(write_parts)  # the part writer; tests put a slow or a failing one in its place

    def __init__(
        self,
        model: str,
        model_hash: str,
        threads: int,
        use_gpu: bool,
        precision: str,
        schema: pa.Schema,
        text_column: str,
        staging: str,
        names: list[str],
        exported: bytes | None = None,
    ):
        start = time.perf_counter()
        import torch

        from emotions.bundle import BundleError, load_bundle
        from emotions.precision import runtime_model

        environment.setup_logging()  # a fresh worker process: its lines reach the driver's log
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the actor's threads are torch's alone
        torch.set_num_threads(threads)
        self.device = "cuda" if use_gpu else "cpu"
        self.bundle = load_bundle(model, device=self.device)
        if self.bundle.hash != model_hash:
            raise BundleError(
                f"model bundle {model} changed while tagging (hash {self.bundle.hash}, "
                f"expected {model_hash}); re-run against an unchanging bundle"
            )
        self.model, self.precision = runtime_model(self.bundle, precision, threads, exported), precision
        self.schema, self.text_column = schema, text_column
        self.staging, self.names = Folder.from_uri(staging), names
        self.model_lock = threading.Lock()  # one batch on the model at a time (see __call__)
        log.info(
            "tagging actor ready in %.1fs (%s, %d threads, %s)",
            time.perf_counter() - start,
            self.device,
            threads,
            precision,
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Tag ``batch`` holding the model, then write its parts having let go of it: Ray Data runs
        two calls at once on each actor (``tagger_pool``), so one batch's part write (to S3: seconds)
        overlaps the next batch's encoder pass instead of leaving the GPU idle. A call returns its
        parts' rows only once every part is written, so the driver never counts (nor merges) a part
        that is not in storage; a write that fails raises from this call, and its parts, reported
        by no one, are never merged (Ray retries the batch, or the run stops: nothing committed)."""
        with self.model_lock:
            tagged = self.tag(batch)
        return self.write(tagged, self.staging, self.names, self.schema)

    def tag(self, batch: pa.Table) -> pa.Table:
        """A normalized batch -> __file + the output columns."""
        flagged = _flagged(batch)
        probs = np.zeros((batch.num_rows, len(EMOTIONS)), dtype=np.float32)  # [batch, 28]
        if not flagged.all():
            tokenizer = self.bundle.tokenizer
            data = (
                _token_ids(batch, flagged)
                if IDS_COLUMN in batch.column_names
                else tokenize_texts(_texts(batch, flagged), tokenizer, self.bundle.max_length)
            )
            probs[~flagged] = predict_tokens(
                self.model, data, tokenizer.pad_token_id or 0, ENCODER_BATCH[self.device], self.precision, self.device
            )
        return label_batch(batch, probs, self.bundle.thresholds, self.bundle.hash, self.schema, self.text_column)


def label_batch(
    batch: pa.Table, probs: np.ndarray, thresholds: np.ndarray, model_hash: str, schema: pa.Schema, text_column: str
) -> pa.Table:
    """A normalized batch and its [n, 28] probabilities -> __file + the output columns. Rows
    with a flag reason get null predictions."""
    flagged = batch.column(ERROR_COLUMN).is_valid().to_numpy(zero_copy_only=False)  # [n] bool
    chosen = (probs >= thresholds) & ~flagged[:, None]  # [n, 28]
    top = probs.argmax(axis=1)
    columns = {
        "emotions": _label_lists(chosen, EMOTIONS, flagged),
        "top_emotion": pa.array(EMOTIONS).take(pa.array(top, mask=flagged)),
        "top_score": pa.array(probs.max(axis=1), pa.float32(), mask=flagged),
        "ekman": _label_lists(chosen.astype(np.int32) @ _EKMAN_MATRIX > 0, tuple(EKMAN), flagged),
        "sentiment": _label_lists(chosen.astype(np.int32) @ _SENTIMENT_MATRIX > 0, tuple(SENTIMENT), flagged),
        "model_hash": pa.array([model_hash] * batch.num_rows, pa.string()),
        "error": batch.column(ERROR_COLUMN),
        **{
            f"p_{name}": pa.array(probs[:, j], pa.float32(), mask=flagged)
            for j, name in enumerate(EMOTIONS)
            if f"p_{name}" in schema.names
        },
    }
    for name in schema.names:
        if name not in columns:  # the id and keep columns
            columns[name] = batch.column(TEXT_COLUMN if name == text_column else name)
    return pa.table({FILE_COLUMN: batch.column(FILE_COLUMN), **{name: columns[name] for name in schema.names}})


def _label_lists(chosen: np.ndarray, names: tuple[str, ...], null: np.ndarray) -> pa.ListArray:
    """[n, k] bool -> n lists of the chosen names, in ``names`` order; null where ``null``."""
    offsets = np.zeros(len(chosen) + 1, dtype=np.int32)
    np.cumsum(chosen.sum(axis=1), out=offsets[1:])
    values = pa.array(names, pa.string()).take(pa.array(np.nonzero(chosen)[1]))
    return pa.ListArray.from_arrays(pa.array(offsets), values, mask=pa.array(null))
