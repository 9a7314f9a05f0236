"""The stages as Ray-free batch functions: generate, truncate, align, evaluate.

Each module applies the core to one batch with an engine and ends with its ``Stage`` definition
(``definition``: config section, model, whether it needs an engine or a grader, its metrics and
summary), listed by name in ``registry``. They import the core and the engine interface
(``palign.engines.base``) only: no Ray (the Ray layer, ``palign.runtime``, runs them), no
training."""
