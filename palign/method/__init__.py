"""What P-ALIGN means: the package a reader of the paper opens first.

``segment`` (a teacher's chain of thought cut into sentences, and its prefixes), ``search``
(the search for the shortest sufficient prefix, as a state machine the truncate stage drives),
``verdict`` (the student's ENOUGH / NOT_ENOUGH answer read as label probabilities), ``prompts``
(every prompt palign sends), ``targets`` (what the student learns: the prefix between draft
markers, then its own ending), ``grading`` (answers checked with math-verify in a worker
process) and ``metrics`` (pass@k and the tallies the reports share). It may import the
standard library, math-verify and ``palign.common``; never the config, the data plane, pyarrow,
pydantic, matplotlib, yaml, an engine, Ray or a training library (checked by ``lint-imports``,
contracts in ``pyproject.toml``): the method reads as plain Python over strings and numbers."""
