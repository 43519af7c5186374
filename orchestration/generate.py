"""`generate RUN --steps N [N ...] [--num K] [--classes all|C,C,..] [--cfg W] [--seed S] [--params ema|online]
[--out FILE.png|FILE.npz]`: samples of a trained model.

RUN is a run directory (any run made by run_experiment or import_checkpoint), or a spec name: its run
in the work directory (`--workdir`, `--set` as for run_experiment; without an exact match, the latest
finished run of that name, with a note saying how its spec differs). Samples are drawn in jit-compiled
batches with the method's own sampler, from the latest checkpoint's EMA (or online) parameters, and
latent specs are decoded. Sample i starts from the noise of (seed, i), and labels cycle through the
classes, so with the defaults (`--seed` = the spec's seed + 1, all classes, the spec's guidance) the
samples are exactly those of the run's own evaluation.

`--out x.png` writes a grid (small images upscaled, nearest, so 8x8 digits are readable); `--out x.npz`
a sample file in the ADM evaluation suite's layout (arr_0 uint8 [N, H, W, 3], arr_1 labels; see
shortcut/sample_files.py), which `evaluate_samples` scores. With several --steps, one file per step
count: x_<N>steps.png.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from shortcut.errors import ShortcutError

GRID_MIN_SIZE = 512  # pixels: a 10x10 grid of 8x8 digits is upscaled 6x


class GenerateError(ShortcutError, RuntimeError):
    """A user mistake or a run that cannot be sampled; the message says which."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a run directory, or a spec name (its run in --workdir)")
    p.add_argument("--steps", type=int, nargs="+", required=True, metavar="N", help="sampling step count(s)")
    p.add_argument("--num", type=int, default=64, help="number of samples (default 64)")
    p.add_argument("--classes", default="all", help="'all' (default: labels cycle 0..C-1) or a list, e.g. 3,5")
    p.add_argument("--cfg", type=float, help="classifier-free guidance w (default: the spec's eval.cfg_scale)")
    p.add_argument("--seed", type=int, help="noise seed (default: the spec's seed + 1, as its evaluation)")
    p.add_argument("--params", choices=["ema", "online"], help="parameters (default: the spec's eval.params)")
    p.add_argument("--out", help="FILE.png (a grid) or FILE.npz (a sample file); default <run dir>/generated/"
                                 "steps_<N>.png")
    p.add_argument("--batch-size", type=int, help="samples per compiled batch (default: the spec's eval.batch_size)")
    p.add_argument("--workdir", default=None, help="work directory for a spec name (default: the spec's)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="overrides that select the spec name's run, as given to run_experiment")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)

    try:
        for path in generate(args):
            print(f"wrote {path}")
    except ShortcutError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


# ------------------------------------------------------------------------------------ finding the run


def find_run(name_or_dir: str, workdir: str | None = None, overrides: list[str] | tuple = (),
             log=print) -> Path:
    """The run directory named by a path or a spec name (see the module docstring)."""
    from shortcut.record import RunDir
    from shortcut.spec import flatten
    from shortcut.spec_files import load_spec, spec_path

    path = Path(name_or_dir)
    if (path / "run.json").is_file():
        return path
    if path.is_dir():
        raise GenerateError(f"{path} is not a run directory (it has no run.json)")
    try:
        spec_path(name_or_dir)
    except Exception:  # noqa: BLE001 - neither a run directory nor a spec
        raise GenerateError(f"no run directory or spec named {name_or_dir!r}") from None
    spec = load_spec(name_or_dir, overrides)
    exact = RunDir.of(spec, workdir)
    if exact.finished():
        return exact.path
    finished = [(r.get("finished") or "", d, r) for d in sorted(exact.path.parent.glob("*")) if d != exact.path
                for r in [RunDir(d).finished()] if r]
    if not finished:
        state = f"its run {exact.path} is {exact.status()}" if exact.read() else f"no run in {exact.path}"
        raise GenerateError(f"{spec.name} has no finished run ({state}); train it with run_experiment "
                            f"{spec.name}, or give a run directory")
    _, chosen, rec = max(finished, key=lambda t: t[0])
    theirs, ours = flatten(rec.get("spec") or {}), flatten(spec.model_dump(mode="json"))
    differ = [f"{k}={theirs.get(k)}" for k in sorted(set(theirs) | set(ours))
              if k.split(".")[0] in ("seed", "data", "model", "method", "optimizer", "train")
              and theirs.get(k) != ours.get(k)]
    log(f"note: no finished run of {spec.name} with this spec ({exact.path.name}); using the latest finished one, "
        f"{chosen}" + (f" (it differs in {', '.join(differ)})" if differ else ""))
    return chosen


# ------------------------------------------------------------------------------------------ sampling


def _parse_classes(text: str, num_classes: int) -> list[int] | None:
    if text == "all":
        return None
    if num_classes == 0:
        raise GenerateError("--classes: this model is unconditional")
    try:
        classes = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise GenerateError(f"--classes: expected 'all' or a list of class numbers like 3,5, got {text!r}") from None
    bad = [c for c in classes if not 0 <= c < num_classes]
    if not classes or bad:
        raise GenerateError(f"--classes: classes are 0..{num_classes - 1}, got {text!r}")
    return classes


def load_run(rundir: Path, steps, cfg: float | None, params: str | None):
    """(spec with the requested eval.steps / cfg_scale / params, its record): the run's own spec, so
    the step counts are checked exactly as a run's evaluation checks them."""
    from shortcut.record import read
    from shortcut.spec_files import validate

    record = read(rundir)
    if record is None or "spec" not in record:
        raise GenerateError(f"{rundir}/run.json is missing or unreadable")
    tree = json.loads(json.dumps(record["spec"]))
    tree.setdefault("smoke", bool(record.get("smoke")))  # records made before `smoke` was a spec field
    ev = tree.setdefault("eval", {})
    old = validate(json.loads(json.dumps(tree)), {}, default_source=str(rundir / "run.json")).eval

    def scale(n: int) -> float:
        if cfg is not None:
            return cfg
        if n in old.steps:
            return old.scales(n)[0]
        return 1.0 if isinstance(old.cfg_scale, dict) else float(old.cfg_scale)

    ev["steps"] = list(steps)
    ev["cfg_scale"] = {n: scale(n) for n in steps}
    if params:
        ev["params"] = params
    origin = {"eval.steps": "--steps", "eval.cfg_scale": "--cfg", "eval.params": "--params"}
    return validate(tree, origin, default_source=str(rundir / "run.json")), record


def generate(args) -> list[Path]:
    import numpy as np

    from shortcut.images import save_grid
    from shortcut.sample_files import SampleFileWriter
    from shortcut.sampling import sample_range

    if args.num < 1:
        raise GenerateError(f"--num must be positive, got {args.num}")
    out = Path(args.out) if args.out else None
    if out is not None and out.suffix not in (".png", ".npz"):
        raise GenerateError(f"--out: expected a .png (grid) or .npz (sample file) name, got {out}")
    rundir = find_run(args.run, args.workdir, args.overrides, log=lambda m: print(m, file=sys.stderr))
    spec, record = load_run(rundir, args.steps, args.cfg, args.params)
    classes = _parse_classes(args.classes, spec.data.num_classes)
    params, step, sampler, decode = _model(spec, record, rundir)
    seed = spec.seed + 1 if args.seed is None else args.seed
    batch = args.batch_size or spec.eval.batch_size
    print(f"{spec.name} [{rundir.name}] step {step}, {spec.eval.params} parameters, seed {seed}: "
          f"{args.num} samples at {', '.join(map(str, spec.eval.steps))} step(s)", file=sys.stderr)
    written = []
    for n in spec.eval.steps:
        w = spec.eval.scales(n)[0]
        target = out or rundir / "generated" / f"steps_{n}.png"
        if out is not None and len(spec.eval.steps) > 1:
            target = out.with_name(f"{out.stem}_{n}steps{out.suffix}")
        target.parent.mkdir(parents=True, exist_ok=True)
        size = spec.data.image_size
        writer = SampleFileWriter(target, args.num, (size, size), with_labels=spec.data.num_classes > 0) \
            if target.suffix == ".npz" else None
        images = []
        for start, count in _progress(_ranges(args.num, batch, writer), f"{n} step(s), w={w:g}"):
            x, labels = sample_range(sampler, params, start, batch, shape=spec.input_shape,
                                     num_classes=spec.data.num_classes, num_steps=n, cfg_scale=w, seed=seed,
                                     classes=classes)
            x, labels = x[:count], labels[:count]
            x = decode(x) if decode else x
            if writer is not None:
                writer.write(start, x, labels)
            else:
                images.append(x)
        written.append(writer.finish() if writer is not None else
                       save_grid(np.concatenate(images), target, min_size=GRID_MIN_SIZE))
    return written


def _ranges(num: int, batch: int, writer) -> list[tuple[int, int]]:
    if writer is not None:  # a sample file resumes where a killed generate stopped
        return writer.missing(batch)
    return [(s, min(batch, num - s)) for s in range(0, num, batch)]


def _progress(items, desc: str):
    from tqdm.auto import tqdm

    from shortcut.evaluation.streaming import progress_enabled

    return tqdm(items, desc=desc, unit="batch", disable=not progress_enabled(None) or len(items) < 2)


def _model(spec, record: dict, rundir: Path):
    """(parameters, checkpoint step, jit-compiled sampler, latent decoder or None) of a run."""
    from shortcut import assembly
    from shortcut.record import RunDir
    from shortcut.teacher import TeacherError, load_params

    try:
        params, step = load_params(RunDir(rundir), ema=spec.eval.params == "ema")
    except TeacherError as e:
        raise GenerateError(f"{e}; nothing to sample from in {rundir}") from None
    if record.get("status") != "finished":
        print(f"note: {rundir} is {record.get('status')}; sampling its latest checkpoint (step {step})",
              file=sys.stderr)
    parts = assembly.build(spec)
    return params, step, parts.sampler, parts.codec.decode if parts.codec else None


if __name__ == "__main__":
    sys.exit(main())
