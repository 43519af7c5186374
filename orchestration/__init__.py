"""Entry points and orchestration: run_experiment, sweep, make_tables, tracking, and Ray execution."""

import os as _os

# Ray reads this when it is imported: parallel runs print similar lines; show each one, not "[repeated 2x]".
_os.environ.setdefault("RAY_DEDUP_LOGS", "0")
