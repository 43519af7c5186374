"""The planner's parts (orchestration/plan.py composes them): devices and topologies, compiling, the report."""
