"""`run_experiment NAME [--set key=value ...] [--workdir DIR] [--smoke] [--print] [--list]`."""

from __future__ import annotations

import argparse
import sys

from shortcut.spec import SpecError, list_specs, load_spec, to_yaml


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run_experiment",
        description="Train one experiment spec from experiments/, sample at its step counts, write a run record.")
    p.add_argument("name", nargs="?", help="spec name (experiments/NAME.yaml) or a path to a spec file")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec key, type-checked (repeatable), e.g. --set model.depth=4")
    p.add_argument("--workdir", help="where run directories go (default: the spec's output.workdir, runs/)")
    p.add_argument("--smoke", action="store_true",
                   help="tiny model on mock data for a few steps: checks any spec end to end on a CPU")
    p.add_argument("--print", dest="print_spec", action="store_true", help="print the resolved spec and its hash")
    p.add_argument("--list", action="store_true", help="list the available specs")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.list:
        print("\n".join(list_specs()))
        return 0
    if not args.name:
        parser().error("a spec name is required (see --list)")
    try:
        spec = load_spec(args.name, args.overrides)
        if args.print_spec:
            print(f"# {spec.name}  hash {spec.hash()}")
            print(to_yaml(spec), end="")
            return 0
        from shortcut.data import DatasetNotReadyError
        from shortcut.run import UnsupportedError, run
        from shortcut.train import NonFiniteLossError

        try:
            record = run(spec, workdir=args.workdir, smoke=args.smoke)
        except (DatasetNotReadyError, UnsupportedError, NonFiniteLossError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    except SpecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is kept and a rerun resumes from it", file=sys.stderr)
        return 130
    print(summary(record))
    return 0


def summary(record: dict) -> str:
    lines = [f"{record['name']} finished: {record['run_dir']}"]
    final = record["train"]["final"] or {}
    if final:
        lines.append(f"  train: {record['train']['steps']} steps in {record['timings']['train_s']:.0f}s, "
                     f"final loss {final['loss']:.4f}")
    for n, s in record["samples"].items():
        lines.append(f"  {n:>4} step(s): {s['num_samples']} samples, {s['network_evaluations']} NFE, "
                     f"{s['seconds']:.1f}s, grid {s['grid']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
