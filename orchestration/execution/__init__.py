"""Running specs on Ray: the cluster connection and launches (cluster), CPU pinning of workers (cpu_slots),
the worker that runs one experiment (worker), a table's stage graph (graph), Ray job submission (jobs), and
what the driver says when a worker dies (killed)."""
