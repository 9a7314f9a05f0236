"""What every layer shares and that says nothing of P-ALIGN itself.

Whose fault a failure is (``failures``: row or machinery faults, ``StageFailed``,
``ConfigError``, the reject-share rule), logging for the driver, actors and ranks (``logs``),
objects named by import path in the config (``plugins``: ``"package.module:Name"``), model
names as text (``modelref``: a hub id's pinned ``@revision``) and
locations as text (``uri``: local paths, ``s3://`` and ``gs://`` joined and made absolute,
without touching a file system). It may import the standard library only: nothing else of
palign, no third-party package (checked by ``lint-imports``, contracts in ``pyproject.toml``)."""
