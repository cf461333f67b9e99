"""`testbed manager lc|cc|token|status|drain|undrain|pause|resume`: run and steer the VM manager.

`lc` and `cc` are the daemons (the balancer role starts them on the lab's hosts); the other
verbs talk to the running CC over its API with the lab's token and print its JSON answer."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from testbed.errors import InputError
from testbed.lab import PM_CPU_SOURCES
from testbed.lab_drivers import PM_ROOT_KEY
from testbed.manager import CC_PORT, DEFAULT_EVENT_LOG, DEFAULT_TOKEN_FILE, LC_PORT
from testbed.techniques import CATALOGUE, EMBEDDED, REAL_LAB, REAL_RUNNABLE

if TYPE_CHECKING:
    from testbed.drivers.base import Host
    from testbed.lab import Lab
    from testbed.manager.sampler import Sampler, Tool


def register(subparsers: argparse._SubParsersAction) -> None:
    manager = subparsers.add_parser("manager", help="the VM manager: Local and Central Controllers")
    verbs = manager.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name: str, help_text: str, func) -> argparse.ArgumentParser:
        parser = verbs.add_parser(name, help=help_text)
        parser.add_argument("-i", "--inventory", default=None, help="lab inventory (default: inventory/local)")
        parser.add_argument("--token-file", type=Path, default=None,
                            help=f"the lab's API token (daemons and `token`: default {DEFAULT_TOKEN_FILE}; the "
                                 "other verbs: the embedded lab's file, or a real lab's controller's, read over SSH)")
        parser.set_defaults(func=func)
        return parser

    verb("token", "create the lab's API token file (0600) unless it exists", _token)

    lc = verb("lc", "run the Local Controller of one PM (in that PM's namespace)", _lc)
    lc.add_argument("--host", required=True, help="the PM's inventory name, e.g. tb-pm1")
    lc.add_argument("--technique", action="append", default=None, metavar="T",
                    help="a technique whose VMs this LC migrates (repeatable; default: on the embedded lab every "
                         f"technique with a driver, {' and '.join(EMBEDDED)}: each order goes to the driver that "
                         f"lists the VM; on a real lab its testbed_technique if `testbed run` drives it there "
                         f"({', '.join(REAL_RUNNABLE)}))")
    lc.add_argument("--ssh-key", type=Path, default=None, metavar="FILE",
                    help="on a real PM, the key its driver reaches the PMs with as root (default: "
                         f"{PM_ROOT_KEY}, the PM's root key that the libvirt role authorizes on every PM)")
    lc.add_argument("--known-hosts", type=Path, default=None, metavar="FILE",
                    help="on a real PM, the PMs' host keys (default: root's ~/.ssh/known_hosts, which the libvirt "
                         "role fills)")
    lc.add_argument("--over-ssh", action="store_true",
                    help="run on another host than the PM (one whose Python cannot run the LC: the 2010 "
                         "profile's CentOS 5) and read the PM, and run its migrations, over SSH with the "
                         "inventory's key and known hosts (--ssh-key, --known-hosts to override); bind with --listen")
    lc.add_argument("--listen", default=None, help="address to bind (default: the PM's lab address)")
    lc.add_argument("--port", type=int, default=LC_PORT)
    lc.add_argument("--period", type=float, default=1.0, help="sampling period, seconds")
    lc.add_argument("--vm-cpu", default="none", metavar="TECHNIQUE",
                    help=f"on a real PM, the technique whose tools report each VM's CPU: {', '.join(REAL_LAB)} "
                         "or none (the inventory's testbed_technique; the embedded lab's LC reads its cgroups)")
    lc.add_argument("--pm-cpu", default=None, choices=PM_CPU_SOURCES,
                    help="on a real PM, where its own CPU use comes from: the machine's /proc/stat, or the sum "
                         "of its VMs' for PMs that share one kernel (default: the inventory's testbed_pm_cpu, "
                         "else machine)")

    cc = verb("cc", "run the Central Controller (on the controller host)", _cc)
    cc.add_argument("--policy", default="assign-u")
    cc.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                    help="policy parameter, e.g. base=1.07 (repeatable)")
    cc.add_argument("--interval", type=float, default=10.0, help="seconds between rounds (>= 1)")
    cc.add_argument("--signal", choices=["use", "demand"], default="use",
                    help="balance on CPU use (the thesis) or demand (use + runnable wait)")
    cc.add_argument("--cooldown", type=float, default=60.0, help="seconds before a VM may move again")
    cc.add_argument("--mode", choices=["precopy", "stopcopy", "postcopy"], default="precopy",
                    help="migration mode")
    cc.add_argument("--compression", choices=["zstd", "zlib", "bzip2"], default=None,
                    help="compress migrations (QEMU: zstd, zlib; containers: bzip2, zstd); default none")
    cc.add_argument("--dry-run", action="store_true", help="decide and log, never migrate")
    cc.add_argument("--paused", action="store_true", help="start paused (resume with `testbed manager resume`)")
    cc.add_argument("--event-log", type=Path, default=DEFAULT_EVENT_LOG)
    cc.add_argument("--listen", default=None, help="address to bind (default: the controller's)")
    cc.add_argument("--port", type=int, default=CC_PORT)

    verb("status", "JSON: every LC (reachable, VMs, last sample) and the CC", _status)
    for name, help_text in (("drain", "move every VM off PM and keep it out of decisions"),
                            ("undrain", "let PM take part in decisions again")):
        verb(name, help_text, _drain).add_argument("pm")
    verb("pause", "stop deciding (rounds are still collected and logged)", _control)
    verb("resume", "decide again", _control)


def _lab(args: argparse.Namespace):
    from testbed.lab import DEFAULT_INVENTORY, load_lab

    return load_lab(args.inventory or DEFAULT_INVENTORY)


def _token(args: argparse.Namespace) -> int:
    from testbed.manager.api import ensure_token

    path = args.token_file or DEFAULT_TOKEN_FILE
    created = ensure_token(path)
    print(f"{'created' if created else 'unchanged'} {path}")
    return 0


def _serve(app, address: str, port: int) -> None:
    import uvicorn

    uvicorn.Server(uvicorn.Config(app, host=address, port=port, log_level="warning")).run()


def _lc(args: argparse.Namespace) -> int:
    from testbed.lab_drivers import lab_drivers
    from testbed.manager.api import load_token
    from testbed.manager.local import DriverDispatch, LocalController, create_app, lab_driver_hosts

    lab = _lab(args)  # reading the inventory starts no thread: ensure_cgroupfs may still unshare
    techniques = lc_techniques(lab, args.technique)
    try:
        host = lab.host(args.host)
    except KeyError:
        raise InputError(f"--host: {args.host} is not a host of {lab.inventory}") from None
    hosts = lab_driver_hosts(lab)
    if args.over_ssh and lab.embedded:
        raise InputError("--over-ssh: the embedded lab's LC runs in its PM's namespace; it is for a real PM")
    # an LC on another host than its PM (--over-ssh) logs in as the runner does, with the inventory's key
    key = None if lab.embedded else args.ssh_key or (lab.ssh_key if args.over_ssh else PM_ROOT_KEY)
    known = args.known_hosts or (lab.known_hosts if args.over_ssh else None)
    tool = _pm_tool(host.address, key, known) if args.over_ssh else None
    sampler = _sampler(lab.embedded, hosts[host.name], args.vm_cpu, args.pm_cpu or lab.pm_cpu, tool)
    token = load_token(args.token_file or DEFAULT_TOKEN_FILE)
    drivers = lab_drivers(lab, techniques, key_file=key, known_hosts=known)
    lc = LocalController(sampler, DriverDispatch(drivers, host.name), args.period)
    address, port = args.listen or host.address, args.port
    if host.lc_endpoint and args.listen is None:  # where the inventory tells the CC to find it
        address, _, text = host.lc_endpoint.rpartition(":")
        port = int(text)
    _serve(create_app(lc, token), address, port)
    return 0


def lc_techniques(lab: Lab, asked: list[str] | None) -> list[str]:
    """The techniques an LC holds a driver of: those asked (--technique), else the lab's
    (testbed.lab_drivers.lab_techniques) or, on a real lab whose technique `testbed run` does not
    drive yet, the embedded drivers as before (they migrate nothing there)."""
    from testbed.lab_drivers import lab_techniques

    available = lab_techniques(lab) if lab.embedded else (*lab_techniques(lab), *EMBEDDED)
    if not asked:
        return list(lab_techniques(lab) or EMBEDDED)
    techniques = list(dict.fromkeys(asked))
    for technique in techniques:
        if technique not in available:
            raise InputError(f"--technique: {technique!r} has no driver (available: {', '.join(available)})")
    return techniques


def _pm_tool(address: str, key: Path, known_hosts: Path | None) -> Tool:
    """Commands on the PM over SSH, for an LC that does not run on its PM."""
    from testbed.drivers.ssh import Remote, SshTarget
    from testbed.manager.sampler import ssh_tool

    return ssh_tool(Remote(SshTarget(address, key, known_hosts)))


def _sampler(embedded: bool, host: Host, vm_cpu: str, pm_cpu: str = "machine", tool: Tool | None = None) -> Sampler:
    """The embedded lab's PM is its cgroup (made visible first: that needs a process without
    threads); a real PM is the whole machine (or, pm_cpu "vms", its VMs' sum), its VMs those its
    technique's tools list; a technique with its own PM sampler (xen) is sampled by that."""
    from testbed.manager.sampler import CgroupSampler, ProcStatSampler, ensure_cgroupfs, local_tool, vm_reader

    if embedded:
        ensure_cgroupfs()
        return CgroupSampler(host)
    try:
        entry = CATALOGUE.get(vm_cpu)
        if entry is not None and entry.pm_sampler is not None:  # Xen: the hypervisor's figures
            return entry.real_pm_sampler(host.name, pm_cpu, tool)
        return ProcStatSampler(host.name, vm_reader(vm_cpu, host, tool or local_tool), pm_cpu=pm_cpu, tool=tool)
    except ValueError as err:
        raise InputError(f"--vm-cpu: {err}") from None


def _parse_params(pairs: list[str]) -> dict[str, Any]:
    params = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise InputError(f"--param: {pair!r} is not NAME=VALUE")
        params[name] = yaml.safe_load(value)
    return params


def _cc(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from testbed.errors import describe_validation_error
    from testbed.manager.api import CcConfig, ManagerClient, lc_url, load_token
    from testbed.manager.central import CentralController, create_app

    lab = _lab(args)
    token = load_token(args.token_file or DEFAULT_TOKEN_FILE)
    try:
        config = CcConfig(policy=args.policy, params=_parse_params(args.param), interval=args.interval,
                          signal=args.signal, cooldown=args.cooldown, dry_run=args.dry_run, mode=args.mode,
                          compression=args.compression)
    except ValidationError as err:
        raise InputError(describe_validation_error(err, "testbed manager cc")) from None
    lcs = {pm.name: ManagerClient(lc_url(pm, LC_PORT), token) for pm in lab.pms}
    cc = CentralController(lcs, config, args.event_log)
    if args.paused:
        cc.set_paused(True)
    _serve(create_app(cc, token), args.listen or lab.controller.address, args.port)
    return 0


def _cc_client(args: argparse.Namespace):
    """(lab, token, client of the lab's CC), with the lab's own token (testbed.manager.tokens)."""
    from testbed.manager.api import ManagerClient, url_for
    from testbed.manager.tokens import lab_token

    lab = _lab(args)
    token = lab_token(lab, args.token_file)
    return lab, token, ManagerClient(url_for(lab.controller.address, CC_PORT), token)


def _print(answer: Any) -> None:
    json.dump(answer, sys.stdout, indent=2, sort_keys=True)
    print()


def _status(args: argparse.Namespace) -> int:
    """The CC's view; if the CC does not answer, each LC asked directly (exit status 1)."""
    import httpx

    from testbed.manager.api import ManagerClient, lc_url

    lab, token, cc = _cc_client(args)
    try:
        _print({"cc": {"reachable": True, **cc.get("/v1/status")}})
        return 0
    except httpx.HTTPError as err:
        cc_error = f"{type(err).__name__}: {err}"
    lcs = {}
    for pm in lab.pms:
        lc = ManagerClient(lc_url(pm, LC_PORT), token)
        try:
            lcs[pm.name] = {"reachable": True, "sample": lc.get("/v1/sample")}
        except httpx.HTTPError as err:
            lcs[pm.name] = {"reachable": False, "error": f"{type(err).__name__}: {err}"}
    _print({"cc": {"reachable": False, "error": cc_error}, "lcs": lcs})
    return 1


def _send(args: argparse.Namespace, path: str, body=None) -> int:
    import httpx

    _, _, cc = _cc_client(args)
    try:
        _print(cc.post(path, body))
    except httpx.HTTPStatusError as err:
        raise InputError(f"{args.verb}: {err.response.json().get('detail')}") from None
    except httpx.HTTPError as err:
        print(f"testbed: the CC at {cc.url} does not answer: {err}", file=sys.stderr)
        return 1
    return 0


def _drain(args: argparse.Namespace) -> int:
    from testbed.manager.api import HostRequest

    try:
        body = HostRequest(host=args.pm)
    except ValueError:
        raise InputError(f"pm: {args.pm!r} is not a host name") from None
    return _send(args, f"/v1/{args.verb}", body)


def _control(args: argparse.Namespace) -> int:
    return _send(args, f"/v1/{args.verb}")
