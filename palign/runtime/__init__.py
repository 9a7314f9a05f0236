"""The Ray layer: everything that talks to a Ray cluster for the engine stages.

``ray.init`` and the stage driver (``runner``), the plan from indexes and the Ray Data reads
(``dataplane``), ingest as Ray Data tasks (``source``), the actor-pool callable that owns an
engine (``worker``; what it is told, ``spec``; its writes, ``commit``; its faults,
``isolation``), config to resource requests (``resources``), and the Prometheus metrics
(``telemetry``). It may import the core, the engines and the Ray-free stages; nothing below it
(core, engines, stages) imports it, and training takes only ``resources``, ``telemetry`` and
``init_ray`` from it, in ``palign.train.ray_backend`` and the train driver."""
