"""The stages: generate, truncate, align, train, evaluate; one class per module.

Each is a ``palign.stages.base.Stage``: its config section, the model it serves, what it needs
(an engine, a grader), how it processes a batch of rows, its metrics, the columns its index
keeps and its summary. The list of stages, in order, is ``palign.core.config.stages``;
``registry.get(name)`` builds one. They import the core and the engine interface
(``palign.engines.base``) only: no Ray (the Ray layer, ``palign.runtime``, runs them, and
``palign.train`` runs train), no training."""
