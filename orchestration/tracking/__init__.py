"""MLflow tracking: one MLflow run per experiment run, through one tracking server.

Naming
    experiment  ``shortcut-<dataset>`` (``data.dataset`` of the resolved spec, e.g. ``shortcut-digits``,
                ``shortcut-celebahq256``); ``--smoke`` runs (mock data) go to ``shortcut-<dataset>-smoke``.
    run         ``<spec name>-<spec hash[:8]>``; one MLflow run per run directory. Its id is kept in
                ``<run dir>/mlflow_run.json``, so a resumed run continues the same MLflow run.
    params      the flattened resolved spec (``model.depth``, ``optimizer.lr``, ...).
    metrics     ``loss``, ``loss_<group>`` (``loss_flow``, ``loss_bootstrap``), ``grad_norm``, ``lr``,
                ``steps_per_sec`` at their training step; every evaluation as ``<metric>/<N>_steps``
                (e.g. ``fd_digits/1_steps``, ``fid/128_steps``; ``fid/128_steps_w1.5`` where N is evaluated at
                several guidance scales) and ``class_accuracy/<N>_steps`` at the
                training step it was evaluated at; ``num_params``.
    tags        ``spec_name``, ``spec_hash``, ``method``, ``dataset``, ``seed``, ``arch``, ``smoke``,
                ``git_commit`` (also ``mlflow.source.git.commit``), ``run_dir``, ``record_status``.
    artifacts   ``spec.yaml`` (resolved spec), ``run.json`` (the run record), ``evaluation.json`` (every
                metric value with its provenance), ``samples/steps_<N>.png`` (grids) and ``export/``
                (the small results record that ``make_tables --tracking-uri`` reads).

The run record (``run.json``) stays the source of truth. Tracking never stops training: a server
that cannot be reached is reported in one warning line, the run goes on, and at the end the whole
record is synced (idempotently: points already logged are skipped), or the tracker says it could not
and how to sync later (``shortcut_tracking sync RUN_DIR``).

The local server (used unless ``--tracking-uri`` / ``MLFLOW_TRACKING_URI`` names one)
    ``<workdir>/mlflow/`` holds ``mlflow.db`` (SQLite), ``artifacts/``, ``server.json`` (URI, port, pid),
    ``server.log``, ``leases/``, ``stops.jsonl`` (each stop: why, when the last lease ended, when the
    server exited) and a lock file. The first run that needs it starts ``mlflow server`` on
    127.0.0.1 on a free port, under a small supervisor process; later and parallel runs reuse it (the
    lock makes start-or-reuse atomic, so parallel runs never start two). Each process using the
    server holds a lease: a file in ``leases/`` it keeps flock-ed, so the kernel ends the lease when the
    process ends, however it ends (a lease is never judged by a process id, which the kernel hands out
    again). The supervisor stops the server once no lease has been held for ``idle_timeout`` seconds
    (60 by default), or at once when the store's directory is deleted, so a killed run cannot leave it
    running forever; it decides under the store's lock and withdraws server.json first, so a run
    starting meanwhile never gets a server that is about to stop. Stopping is bounded: SIGTERM to the
    supervisor's whole process group, a few seconds' grace, then SIGKILL to the group (nothing the
    server forked late escapes). The supervisor is detached (nobody's child, its own session: Ray kills
    a worker's children when the worker exits), does not keep the scheduling of the process that
    started it (a Ray worker's nice 15, OOM-killer priority and single pinned core), and the server
    dies with it (PR_SET_PDEATHSIG); a server of the store found without a live supervisor is stopped
    before a new one starts, so a store has at most one server. A
    server started with ``keep`` (``run_experiment --keep-tracking-server`` or
    ``shortcut_tracking server start``) stays up until ``run_experiment --stop-tracking-server`` or
    ``shortcut_tracking server stop``. Every writer goes through the server; nothing but the server
    opens the SQLite file.
"""
