"""The pipeline's stages: Ray-free batch functions (generate, truncate, align, evaluate) with
their definitions and shard I/O, and the Ray layer that runs them (``dataplane``, ``worker``,
``runner``). The batch functions import the core and the engine interface only; Ray is imported
by ``dataplane``, ``worker``, ``runner`` and ``source`` alone. Nothing here imports training."""
