"""Training runs: distributed start-up (``launch``), building model and engine once (``build``), the loop
(``trainer``), evaluation (``evaluate``), DeepSpeed glue (``engine``), checkpoints (``checkpoint``), what
people see (``monitor``), and the run configuration (``config``, ``run_config``)."""
