"""A student's teacher: the finished run of the spec it names, found in the same work directory and loaded.

A spec may name a teacher (`teacher: digits_flow`, plus optional `teacher_overrides: [KEY=VALUE, ..]`);
its resolved Spec is inside the student's (shortcut/spec). Running the student (shortcut.run.run) loads it:

  * the teacher's run directory is <workdir>/<teacher name>/<teacher hash[:12]>/ (its --smoke version
    when the student runs with --smoke, so the two always have the same tiny architecture);
  * run.json says "finished" and a checkpoint of its last step exists: its EMA parameters are loaded;
  * run.json says "failed": TeacherError, naming the directory and the teacher's error (a failed
    teacher is never retrained silently, with these or any other settings);
  * no run yet, or one that was interrupted or killed: TeacherError. The library never trains a teacher:
    the driver's graph runs it first (orchestration/execution/graph.py: a table's, or a single run's).

The student's hash includes the teacher's hash (Spec.hash), so a different teacher means a different
student run. How a student uses its teacher is the objective's business (shortcut/objective.py):
`init_state(..., teacher_params=)` hands the EMA parameters to `objective.init_aux`,
`objective.init_from_teacher` starts the student from the teacher's weights, and
`objective.training_data` may train on what the teacher makes (reflow's pairs, baselines/reflow_pairs.py).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp

from shortcut.errors import ShortcutError
from shortcut.model import is_added_input
from shortcut.record import RunDir, Status
from shortcut.spec import Spec
from shortcut.train import fresh_emas


class TeacherError(ShortcutError, RuntimeError):
    """The teacher of a student spec cannot be used (failed, incompatible, or missing where it must exist)."""


@dataclasses.dataclass(frozen=True)
class Teacher:
    spec: Spec  # the teacher's effective spec (its --smoke version for a --smoke student)
    run_dir: Path
    step: int
    params: Any  # EMA parameters of the teacher's last checkpoint
    parts: Any  # the teacher's assembly.Parts (its network and sampler), built once with the student's

    def summary(self) -> dict:
        return {"name": self.spec.name, "spec_hash": self.spec.hash(), "run_dir": str(self.run_dir),
                "step": self.step, "params": "ema"}


def resolve(parts, workdir: str | Path, *, log: Callable[[str], None] = print) -> Teacher | None:
    """The finished teacher of the run whose parts are `parts` (assembly.Parts; None when its spec has no
    teacher). The library never trains a teacher: the driver's graph runs it first."""
    spec = parts.spec
    if spec.teacher is None:
        return None
    tspec = spec.teacher_spec()  # its --smoke version for a --smoke student
    smoke = " --smoke" if spec.smoke else ""
    tdir = RunDir.of(tspec, workdir)
    label = f"teacher {tspec.name} [{tspec.hash()[:12]}]"
    record = tdir.read()
    status = tdir.status()
    if status == Status.FAILED:
        raise TeacherError(
            f"{spec.name}: {label} failed in {tdir.path}: {record.get('error', 'no error recorded')}. Fix the cause "
            f"and rerun the teacher (run_experiment {tspec.name}{smoke} with the same "
            f"overrides; it resumes from its last checkpoint), or delete {tdir.path} to train it afresh.")
    if not tdir.finished(tspec.hash()):
        raise TeacherError(f"{spec.name}: {label} has no finished run in {tdir.path} (status: {status or 'no run'}); "
                           f"run it first: run_experiment {tspec.name}{smoke} with the same "
                           f"overrides (`run_experiment {spec.name}` runs a missing teacher first by itself)")
    params, step = load_params(tdir)
    if step != tspec.train.steps:
        raise TeacherError(f"{spec.name}: {label} in {tdir.path} is marked finished but its latest checkpoint is step "
                           f"{step}, not its train.steps {tspec.train.steps}")
    log(f"{spec.name}: using the finished {label} from {tdir.path} (step {step}, EMA parameters)")
    return Teacher(tspec, tdir.path, step, params, parts.teacher)


def load_params(rundir: RunDir, *, ema: bool = True) -> tuple[Any, int]:
    """The EMA parameters (with `ema=False` the online ones) of a run's latest checkpoint, and its step, read
    without knowing the rest of that run's state."""
    from shortcut.checkpoint import describe_error, quiet_orbax_echoes

    if not rundir.checkpoints.is_dir():
        raise TeacherError(f"no checkpoints in {rundir.checkpoints}")
    checkpointer = rundir.checkpointer()
    try:
        step = checkpointer.latest_step()
        if step is None:
            raise TeacherError(f"no checkpoints in {rundir.checkpoints}")
        quiet_orbax_echoes()
        try:
            state = checkpointer.restore_state(step)
        except Exception as e:  # noqa: BLE001 - a damaged file: say which checkpoint, not a traceback
            raise TeacherError(f"the teacher's latest checkpoint {rundir.checkpoints / str(step)} cannot be read "
                               f"({describe_error(e)}); remove that directory and rerun to train that step "
                               "again") from None
    finally:
        checkpointer.close()
    return jax.tree.map(jnp.asarray, state["ema_params" if ema else "params"]), int(step)


def _without_added_inputs(student_params, teacher_params):
    """The student's parameters less the subtrees its method adds that the teacher lacks (model.is_added_input)."""
    return {k: v for k, v in student_params.items() if k in teacher_params or not is_added_input(k)}


def check_architecture(spec: Spec, teacher: Teacher, student_params) -> None:
    shapes = lambda tree: jax.tree.map(lambda a: tuple(a.shape), tree)
    student_params = _without_added_inputs(student_params, teacher.params)
    if jax.tree.structure(teacher.params) != jax.tree.structure(student_params) or \
            shapes(teacher.params) != shapes(student_params):
        raise TeacherError(
            f"{spec.name}: the teacher {teacher.spec.name}'s network differs from the student's (teacher model "
            f"{teacher.spec.model.model_dump()}, data {teacher.spec.input_shape} with {teacher.spec.data.num_classes} "
            f"classes; student model {spec.model.model_dump()}, data {spec.input_shape} with "
            f"{spec.data.num_classes} classes); {spec.method.name} runs the teacher's parameters through the "
            "student's network, so give both the same model (teacher_overrides can set the teacher's)")


def start_from_teacher(spec: Spec, state, objective, teacher: Teacher | None):
    """Check the teacher fits the student's network and, with `init_from_teacher`, start from its weights."""
    if teacher is None:
        return state
    if objective.teacher_in_student_network:
        check_architecture(spec, teacher, state.params)
    if not objective.init_from_teacher:
        return state
    # inputs the student's method adds (zero-initialised) keep their initial values: the start is the teacher's function
    params = {**state.params, **jax.tree.map(lambda a: jnp.array(a, copy=True), teacher.params)}
    ema, more_ema = fresh_emas(params, spec.optimizer.ema_decays)
    return state.replace(params=params, ema_params=ema, more_ema=more_ema)
