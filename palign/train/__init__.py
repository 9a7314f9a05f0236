"""Student SFT on Ray Train and DeepSpeed ZeRO: data preparation, the step loop and export.

The loop's modules (``loop``, ``model``, ``engine``, ``checkpoints``, ``backend``,
``attention``, ``data``, ``units``, ``steps``, ``paths``, ``export``, ``progress``,
``callbacks``: what ``train.callbacks`` names, called after each step; ``trackers``: the
dashboards of ``train.report_to``; ``identity``: the train fingerprint that a rerun is checked
against) may import the config, the data plane, the method, ``palign.common``, the engines'
model helpers (``palign.engines.models``, ``palign.engines.dtypes``), torch, transformers,
DeepSpeed and the trackers' packages (tensorboardX, mlflow, wandb); never Ray or ``palign.runtime``,
so the loop runs under ``torchrun`` as well. Ray lives in ``ray_backend`` (the
``TorchTrainer`` and Ray Train's context), ``prepare`` (Ray Data tasks that pack the data once)
and ``trainer`` (the stage's driver). Nothing outside the entrypoints imports training."""
