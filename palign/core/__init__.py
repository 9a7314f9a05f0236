"""The pure core: what P-ALIGN means, with no engine, no Ray and no training in it.

Storage URIs and committed shards, the typed config, row validation, sentence segmentation, the
prefix search as a state machine, verdict parsing, every prompt, grading with math-verify,
pass@k, the failure rules, the run lock and the attempt ledger, the report tables, this
process's memory (``procmem``, for benchmarks and tests). Modules here import the standard
library, pydantic, pyarrow, math-verify and matplotlib, and each other; never
``palign.engines``, ``palign.stages``, ``palign.runtime``, ``palign.train``, Ray, vLLM, torch or
DeepSpeed (checked by ``lint-imports``, contracts in ``pyproject.toml``)."""
