"""The Ray layer: everything that talks to a Ray cluster for the engine stages.

``ray.init`` and the stage driver (``runner``), the plan from indexes and the Ray Data reads
(``dataplane``), ingest as Ray Data tasks (``source``), the actor-pool callable that owns an
engine (``worker``; what it is told, ``spec``; its writes, ``commit``; its faults,
``isolation``; the ledger of rows in flight, ``attempts``), config to resource requests
(``resources``), and the Prometheus metrics (``telemetry``). It may import Ray, the stages, the
engines, the reports, the data plane, the config, the method and ``palign.common``; nothing
below it (stages, engines, report, data, config, method, common) imports it, and training takes
only ``resources``, ``telemetry`` and ``init_ray`` from it, in ``palign.train.ray_backend`` and
the train driver."""
