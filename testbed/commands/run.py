"""`testbed run SPEC`: run an experiment matrix on the lab and record it in a results directory.

Everything that can be checked without the lab is checked first (the spec, the command line,
the inventory, the spec against the lab's PMs, what the lab executor can run, whether DIR holds
another experiment), so a mistake fails with one line before any host is touched. Then the CC
must answer, the hosts' facts are gathered for the manifest, and the campaign runs with a live
display: runs done of planned, the run in progress and its phase, elapsed time and ETA.
Rerunning the same command resumes: recorded runs are skipped.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Self

from testbed.errors import InputError
from testbed.lab import DEFAULT_INVENTORY
from testbed.runner.campaign import DEFAULT_MAX_CONSECUTIVE_FAILURES

if TYPE_CHECKING:
    from testbed.spec import Spec


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("run", help="run an experiment matrix on the lab",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("spec", metavar="SPEC", help="an experiment spec, e.g. experiments/exp1.yml")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per variant (default: the spec's)")
    parser.add_argument("--scale", type=float, default=None,
                        help="multiplies every app's work (default: the spec's; 0.25 = a quarter)")
    parser.add_argument("--time-scale", type=time_scale_arg, default=None, metavar="auto|F",
                        help="scale the manager's interval and cool-down: with --scale (auto) or by F "
                        "(default: the spec's balancer.time_scale; floors: docs/manager.md)")
    parser.add_argument("--results", metavar="DIR", type=Path, default=None,
                        help="results directory (default: results/<spec name>)")
    parser.add_argument("--technique", action="append", default=None, metavar="T",
                        help="run only this technique of the spec (repeatable)")
    parser.add_argument("--variant", action="append", default=None, metavar="ID",
                        help="run only this variant, named as in run ids, e.g. kernel.unbalanced.mig "
                        "(repeatable; the rest can run later into the same results directory)")
    parser.add_argument("--ci-width", type=float, default=None, metavar="P",
                        help="add repetitions until every VM's 95%% CI is within ±P %% of its mean")
    parser.add_argument("--max-reps", type=int, default=None, help="cap on repetitions per variant")
    parser.add_argument("--max-failures", type=int, default=DEFAULT_MAX_CONSECUTIVE_FAILURES, metavar="N",
                        help="stop the campaign after N runs in a row that were not ok (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=None, metavar="S",
                        help="seconds a run's workloads may take (default: from the spec's scale); "
                        "kind migration: seconds the migration may take (default: from memory and link rate)")
    parser.add_argument("-i", "--inventory", type=Path, default=DEFAULT_INVENTORY,
                        help="lab inventory (default: inventory/local, the embedded lab)")
    parser.add_argument("--token-file", metavar="FILE", type=Path, default=None,
                        help="the VM manager's token (default: the embedded lab's own file; a real lab's "
                        "is read from its controller over SSH, never another lab's)")
    parser.add_argument("--calibration", metavar="FILE", default=None,
                        help="with --technique sim: the simulator's parameters (from `testbed calibrate`)")
    parser.set_defaults(func=run)


def time_scale_arg(value: str) -> str | float:
    """--time-scale: `auto` or a number (the spec checks its range)."""
    if value == "auto":
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is neither auto nor a number") from None


def overridden(spec: Spec, args: argparse.Namespace) -> Spec:
    """The spec with the command line's --reps, --scale and --time-scale, validated again."""
    from testbed.spec import spec_with

    changes: dict[str, object] = {k: v for k, v in (("repetitions", args.reps), ("scale", args.scale))
                                  if v is not None}
    if args.time_scale is not None:
        changes["balancer"] = spec.balancer.model_dump() | {"time_scale": args.time_scale}
    return spec_with(spec, **changes) if changes else spec


def _checked(args: argparse.Namespace):
    """(spec, lab, techniques, results dir), all validated without touching a host."""
    from testbed.lab import load_lab
    from testbed.results import read_manifest
    from testbed.runner import executor, migration_study
    from testbed.runner.campaign import spec_fingerprint
    from testbed.spec import load_spec

    spec = overridden(load_spec(args.spec), args)
    for flag, value in (("--ci-width", args.ci_width), ("--timeout", args.timeout)):
        if value is not None and not value > 0:
            raise InputError(f"{flag}: must be > 0, not {value:g}")
    if args.ci_width is not None and spec.kind == "migration":
        raise InputError("--ci-width: it widens on execution times, which a migration study does not measure")
    if args.max_failures < 1:
        raise InputError(f"--max-failures: must be >= 1, not {args.max_failures}")
    if args.max_reps is not None and args.max_reps < spec.repetitions:
        raise InputError(f"--max-reps: {args.max_reps} is below the {spec.repetitions} repetitions asked")
    lab = load_lab(args.inventory)
    spec.check_against_lab(len(lab.pms), min(pm.cores for pm in lab.pms), args.spec)
    techniques = args.technique or list(spec.techniques)
    for technique in techniques:
        if technique not in spec.techniques:
            raise InputError(f"--technique: {technique!r} is not one of {args.spec}'s techniques "
                             f"({', '.join(spec.techniques)})")
    (migration_study if spec.kind == "migration" else executor).supported(spec, techniques)
    executor.on_lab(spec, lab, techniques)
    checked_variants(spec, techniques, args.variant, args.spec)
    results = args.results or Path("results") / spec.name
    manifest = read_manifest(results)
    if manifest and manifest.get("spec_fingerprint") != spec_fingerprint(spec):
        raise InputError(f"--results: {results} holds results of another spec or scale "
                         f"({manifest.get('experiment')}); choose another directory")
    return spec, lab, techniques, results


def checked_variants(spec: Spec, techniques: Sequence[str], wanted: Sequence[str] | None,
                     path: str) -> Sequence[str] | None:
    """--variant's ids, each checked to name a variant of the chosen techniques (None: all)."""
    ids = sorted({v.id for t in techniques for v in spec.variants(t)})
    for variant in wanted or ():
        if variant not in ids:
            raise InputError(f"--variant: {variant!r} is not a variant of {path} ({', '.join(ids)})")
    return wanted


def _interruptible() -> None:
    """SIGTERM (a `kill`, a service stop) and SIGINT end a campaign as Ctrl-C does: the run in
    flight is cleaned up and what was recorded is kept. A shell starts background jobs with SIGINT
    ignored, and Python keeps that: such a campaign could otherwise only be killed outright."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def run(args: argparse.Namespace) -> int:
    from testbed.commands.sim import run_simulated, wants_simulation

    if wants_simulation(args.spec, args.technique):  # no lab: the simulator (testbed/sim)
        return run_simulated(args)
    spec, lab, techniques, results = _checked(args)
    import httpx

    from testbed import provisioning
    from testbed.results import ResultsStore
    from testbed.runner.campaign import CampaignFailed, cells, controller_provenance, run_campaign, shortfall
    from testbed.runner.executor import LabExecutor, cc_client, lab_facts, make_drivers
    from testbed.runner.lock import campaign_lock
    from testbed.runner.migration_study import MigrationStudyExecutor

    _interruptible()
    cc = cc_client(lab, args.token_file)
    try:
        cc.get("/v1/status")
    except httpx.HTTPError as err:
        raise InputError(f"the Central Controller at {cc.url} does not answer ({type(err).__name__}); "
                         "is the lab up (testbed lab up)?") from None
    display = _Display()
    with campaign_lock(lab.inventory, f"{spec.name} -> {results}", embedded=lab.embedded), ResultsStore(results) as store, display:
        display.phase("gathering the hosts' facts")
        provenance = controller_provenance() | {
            "lab": lab_facts(lab),
            "provisioning": provisioning.archive_latest(lab.inventory, results / "provenance"),
        }
        kind = MigrationStudyExecutor if spec.kind == "migration" else LabExecutor  # App. A: one move per run
        executor = kind(lab, make_drivers(lab), cc, timeout_s=args.timeout, log=display.phase)
        if spec.kind == "balancing":  # the manager's times at this scale, floors included (issue #16)
            provenance["manager_times"] = executor.manager_times(spec).as_dict()
        began = time.monotonic()
        failure: CampaignFailed | None = None
        try:
            executed = run_campaign(spec, store, executor, techniques=techniques, variants=args.variant,
                                    ci_width=args.ci_width,
                                    max_reps=args.max_reps, provenance=provenance, on_progress=display.update,
                                    max_failures=args.max_failures)
        except CampaignFailed as err:
            failure = err
        finally:
            display.phase("cleaning up")
            executor.close()
        statuses = store.statuses
    if failure is not None:
        print(f"testbed run: {failure}", file=sys.stderr)
        return 1
    minutes = (time.monotonic() - began) / 60
    summary = ", ".join(f"{n} {s}" for s, n in sorted(Counter(statuses.values()).items()))
    print(f"{spec.name}: {executed} runs executed in {minutes:.1f} min; recorded: {summary}; results in {results}")
    if short := shortfall(spec, cells(spec, techniques, args.variant), statuses):
        cells_short = ", ".join(f"{key} ({ok} of {spec.repetitions})" for key, ok in sorted(short.items()))
        print(f"testbed run: {spec.name}: fewer ok runs than planned in {cells_short}; the failed runs' "
              f"details are in {results / 'runs'}", file=sys.stderr)
        return 1
    print(f"figures and report: testbed plot {results} && testbed report {results}")
    return 0


class _Display:
    """The campaign's live progress (rich) on a terminal; one line per run and phase elsewhere."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = Console(stderr=True)
        self.live = self.console.is_terminal
        self.progress = Progress(
            TextColumn("[bold]{task.fields[run]}"), TextColumn("[dim]{task.fields[phase]}"), BarColumn(),
            MofNCompleteColumn(), TextColumn("runs"), TimeElapsedColumn(), TextColumn("ETA {task.fields[eta]}"),
            console=self.console, disable=not self.live,
        )
        self.task = self.progress.add_task("campaign", total=None, run="starting", phase="", eta="?")

    def __enter__(self) -> Self:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def update(self, p) -> None:
        eta = "?" if p.eta_s is None else _duration(p.eta_s)
        self.progress.update(self.task, total=p.total, completed=p.done, run=p.current.run_id, eta=eta)
        if not self.live:
            self.console.print(f"[{p.done + 1}/{p.total}] {p.current.run_id} (ETA {eta})", highlight=False)

    def phase(self, text: str) -> None:
        self.progress.update(self.task, phase=text)
        if not self.live:
            self.console.print(f"    {text}", highlight=False)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
