"""The data plane: where a run's data lives and how each row is committed exactly once.

``storage`` (local paths, ``s3://`` and ``gs://`` on ``pyarrow.fs``, whole-object writes) with
``retrying`` (the store's passing faults tried again), ``lines`` (line streaming and the one
JSONL reader) and ``transfer`` (whole folders); ``layout`` (a stage folder's file names),
``fence`` (which run writes a folder), ``digest`` (indexes gathered), ``shards`` (shards
committed by their index, done ids, rejects); ``ingest`` (the input rows validated and cut
into pieces), ``fingerprint`` (a stage's inputs recorded, a changed config refused),
``runlock`` with ``conditional`` (one run per output folder, on a disk or a bucket),
``fetch_data`` (the paper's data sets) and ``procmem`` (this process's memory). It may import
the standard library, pyarrow, boto3 and datasets, ``palign.config`` (the data section) and
``palign.common``; never the method, the reports, an engine, a stage, Ray or a training
library (checked by ``lint-imports``, contracts in ``pyproject.toml``)."""
