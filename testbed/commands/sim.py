"""`testbed sim run|study|validate`: the simulator (its outputs always say SIMULATED).

run SPEC        an experiment spec with technique `sim`, through the same campaign runner as
                `testbed run` (resumable; results/<name>-sim by default); the same as
                `testbed run SPEC --technique sim`
study FILE      the scale study (experiments/studies/scale.yml): policies x modes at 10..1,000 PMs
validate REAL SIM   per-variant mean execution time, lab vs simulator, side by side (10 % bound)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from testbed.commands.run import checked_variants, overridden, time_scale_arg


def register(subparsers: argparse._SubParsersAction) -> None:
    sim = subparsers.add_parser(
        "sim",
        help="simulated runs and scale studies (outputs marked SIMULATED)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    kinds = sim.add_subparsers(dest="sim", required=True, metavar="KIND")
    run = kinds.add_parser("run", help="simulate an experiment spec")
    run.add_argument("spec", metavar="SPEC")
    run.add_argument(
        "--calibration", metavar="FILE", default=None, help="from `testbed calibrate` (default: built-in)"
    )
    run.add_argument("--results", metavar="DIR", type=Path, default=None)
    run.add_argument("--reps", type=int, default=None)
    run.add_argument("--scale", type=float, default=None)
    run.add_argument("--time-scale", type=time_scale_arg, default=None, metavar="auto|F")
    run.set_defaults(func=_run)
    study = kinds.add_parser("study", help="run a scale study file")
    study.add_argument("file", metavar="FILE")
    study.add_argument("--calibration", metavar="FILE", default=None)
    study.add_argument("--results", metavar="DIR", type=Path, default=None)
    study.add_argument("--sizes", type=int, nargs="+", default=None, help="only these PM counts")
    study.add_argument("--reps", type=int, default=None)
    study.set_defaults(func=_study)
    validate = kinds.add_parser("validate", help="lab vs simulator, per variant")
    validate.add_argument("real", metavar="REAL", type=Path)
    validate.add_argument("sim", metavar="SIM", type=Path)
    validate.add_argument("--bound", type=float, default=10.0, help="allowed difference, percent")
    validate.set_defaults(func=_validate)


def _run(args: argparse.Namespace) -> int:
    return run_simulated(args)


def wants_simulation(spec_path: str, techniques: list[str] | None) -> bool:
    """Whether `testbed run` should simulate: `--technique sim`, or a spec whose techniques are
    [sim]. The simulator runs alone (its runs mimic the calibration's technique, so a lab
    technique beside it in one campaign would be compared with its own imitation)."""
    from testbed.errors import InputError
    from testbed.spec import load_spec
    from testbed.techniques import SIMULATOR

    chosen = techniques or list(load_spec(spec_path).techniques)
    if SIMULATOR not in chosen:
        return False
    if len(set(chosen)) > 1:
        raise InputError(
            f"--technique: {SIMULATOR} runs alone, not with {', '.join(t for t in chosen if t != SIMULATOR)}"
        )
    return True


def run_simulated(args: argparse.Namespace) -> int:
    """The spec's balancing variants with technique `sim`, through the campaign runner and the
    results store (resumable, same run ids and tables as a lab campaign), marked SIMULATED."""
    from testbed.errors import InputError
    from testbed.results import ResultsStore, write_atomic
    from testbed.runner.campaign import run_campaign
    from testbed.sim.calibration import load_calibration
    from testbed.sim.executor import SIMULATED_NOTE, SimExecutor
    from testbed.spec import load_spec, spec_with
    from testbed.techniques import SIMULATOR

    spec = overridden(load_spec(args.spec), args)
    if spec.kind != "balancing":
        raise InputError(f"{args.spec}: kind: the simulator runs balancing experiments, not {spec.kind!r}")
    spec = spec_with(spec, techniques=[SIMULATOR])
    variants = checked_variants(spec, [SIMULATOR], getattr(args, "variant", None), args.spec)
    cal, name = load_calibration(args.calibration)
    executor = SimExecutor(cal, name)
    results = args.results or Path("results") / f"{spec.name}-sim"
    with ResultsStore(results) as store:
        write_atomic(store.dir / "SIMULATED", SIMULATED_NOTE + "\n")
        executed = run_campaign(
            spec,
            store,
            executor,
            variants=variants,
            ci_width=getattr(args, "ci_width", None),
            max_reps=getattr(args, "max_reps", None),
            provenance=executor.manifest_fields() | {"manager_times": executor.manager_times(spec).as_dict()},
        )
    print(f"SIMULATED {spec.name}: {executed} runs with calibration {name}; results in {results}")
    print(
        f"figures and report (with the lab side by side): testbed plot {results} && testbed report {results}"
    )
    return 0


def _study(args: argparse.Namespace) -> int:
    from testbed.sim.calibration import load_calibration
    from testbed.sim.study import load_study, run_study, study_with

    study = study_with(load_study(args.file), args.file, sizes=args.sizes, reps=args.reps)
    cal, name = load_calibration(args.calibration)
    out = args.results or Path("results") / study.name
    run_study(study, out, cal, name)
    print(f"SIMULATED study {study.name}: {out}/summary.csv, {out}/figures/scale_study.png")
    return 0


def _validate(args: argparse.Namespace) -> int:
    import math

    from testbed.errors import InputError
    from testbed.sim.validate import compare, render

    if not (math.isfinite(args.bound) and args.bound >= 0):
        raise InputError(f"--bound: a difference in percent, finite and >= 0, not {args.bound:g}")
    table = compare(args.real, args.sim, args.bound)
    print(render(table, args.bound))
    return 0 if bool(table["within"].all()) else 1
