"""The stages: generate, truncate, align, train, evaluate; one class per module.

Each is a ``palign.stages.base.Stage``: its config section, the model it serves, what it needs
(an engine, a grader), how it processes a batch of rows, its metrics, the columns its index
keeps and its summary. The list of stages, in order, is ``palign.config.stages``;
``registry.get(name)`` builds one. They may import only the config, the method, ``palign.common``
and the engine interface (``palign.engines.base``): no data plane (the runner reads and commits
their rows), no report, no engine implementation, no Ray (the Ray layer, ``palign.runtime``,
runs them, and ``palign.train`` runs train), no training (checked by ``lint-imports``)."""
