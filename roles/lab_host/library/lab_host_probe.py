#!/usr/bin/python
"""Read-only probe of the embedded lab's state on this machine, for the lab_host role.

Every change the role makes is conditional on what this probe saw, so a second run changes
nothing and reports changed=0. One probe reads everything (links, addresses, routes, qdiscs,
cgroups, sshd and the processes in the lab) because each `ip`/`tc` call is cheap but each Ansible
task is not.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: lab_host_probe
short_description: Read the state of the embedded lab (never changes anything)
options:
  hosts:
    description: Lab hosts, each a dict with C(name) and C(veth).
    type: list
    elements: dict
    required: true
  bridge:
    description: Name of the lab bridge.
    type: str
    required: true
  state_dir:
    description: The lab's state directory.
    type: path
    required: true
  cgroup_parent:
    description: The lab's parent cgroup under each controller.
    type: str
    required: true
  controllers:
    description: cgroup v1 controllers the lab uses.
    type: list
    elements: str
    required: true
  netns_prefixes:
    description: Namespaces with one of these prefixes belong to the lab even when not in C(hosts)
      (the lab's hosts and the containers the container driver plugs into the lab).
    type: list
    elements: str
    required: true
  driver_state_dirs:
    description: Directories whose entries the techniques' drivers left (a VM or container each).
    type: list
    elements: path
    default: []
"""

CGROUP_ROOT = Path("/sys/fs/cgroup")
BIN = {"ip": "ip", "tc": "tc"}
NETNS_DIR = Path("/run/netns")


def _json(argv):
    """JSON from `ip -j`/`tc -j`; empty when the device or namespace does not exist."""
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not proc.stdout.strip():
        return []
    return json.loads(proc.stdout)


def _links(netns=None):
    prefix = [BIN["ip"], "-n", netns] if netns else [BIN["ip"]]
    return {
        link["ifname"]: {
            "up": "UP" in link.get("flags", []),
            "master": link.get("master"),
            "addrs": [f"{a['local']}/{a['prefixlen']}" for a in link.get("addr_info", [])
                      if a.get("family") == "inet"],
        }
        for link in _json(prefix + ["-j", "addr", "show"])
    }


def _qdisc(dev, netns=None):
    prefix = [BIN["tc"], "-n", netns] if netns else [BIN["tc"]]
    for qdisc in _json(prefix + ["-j", "qdisc", "show", "dev", dev]):
        if qdisc.get("root"):
            rate = qdisc.get("options", {}).get("rate")
            return {"kind": qdisc["kind"], "rate_bps": rate * 8 if rate is not None else None}
    return {"kind": None, "rate_bps": None}


def _read(path):
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _netns_inodes(names):
    inodes = {}
    for name in names:
        try:
            st = (NETNS_DIR / name).stat()
        except OSError:
            continue
        inodes[(st.st_dev, st.st_ino)] = name
    return inodes


def _pids_in(netns_inodes):
    """Processes whose network namespace is one of the lab's (what `ip netns pids` does)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            st = (entry / "ns" / "net").stat()
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in netns_inodes:
            pids.append(int(entry.name))
    return pids


def _sshd(name, host_dir):
    """Is the host's sshd running in its namespace, and was it started after its config changed?"""
    pid_file = host_dir / "sshd.pid"
    config = host_dir / "sshd_config"
    pid = _read(pid_file)
    running = False
    if pid and pid.isdigit():
        try:
            ns = (Path("/proc") / pid / "ns" / "net").stat()
            mine = (NETNS_DIR / name).stat()
            # sshd rewrites its command line ("sshd: /usr/sbin/sshd -f CONFIG ... [listener]").
            cmdline = (Path("/proc") / pid / "cmdline").read_bytes()
            running = (ns.st_dev, ns.st_ino) == (mine.st_dev, mine.st_ino) and str(config).encode() in cmdline
        except OSError:
            running = False
    stale = running and config.exists() and config.stat().st_mtime > pid_file.stat().st_mtime
    return {"pid": int(pid) if running else None, "running": running, "stale": stale}


def _cgroup_tree(parent, controllers):
    """Every lab cgroup directory, deepest first (the order they can be removed in)."""
    dirs = []
    for controller in controllers:
        top = CGROUP_ROOT / controller / parent
        if top.is_dir():
            dirs.extend(str(p) for p, _, _ in os.walk(top))
    return sorted(dirs, key=lambda d: (-d.count("/"), d))


def probe(params):
    hosts = params["hosts"]
    netns = sorted(p.name for p in NETNS_DIR.iterdir()) if NETNS_DIR.is_dir() else []
    names = {h["name"] for h in hosts}
    lab_netns = sorted(n for n in netns if n in names or n.startswith(tuple(params["netns_prefixes"])))
    links = _links()
    routes = {r["dst"]: r.get("dev") for r in _json([BIN["ip"], "-j", "route", "show"])}
    state_dir = Path(params["state_dir"])
    per_host = {}
    for host in hosts:
        name = host["name"]
        inside = _links(name) if name in netns else {}
        cgroups = {c: (CGROUP_ROOT / c / params["cgroup_parent"] / name).is_dir() for c in params["controllers"]}
        cpu = CGROUP_ROOT / "cpu" / params["cgroup_parent"] / name
        quota = _read(cpu / "cpu.cfs_quota_us")
        period = _read(cpu / "cpu.cfs_period_us")
        per_host[name] = {
            "netns": name in netns,
            "veth": links.get(host["veth"]),
            "eth0": inside.get("eth0"),
            "lo_up": inside.get("lo", {}).get("up", False),
            "route": routes.get(host.get("address", "") + "/32") or routes.get(host.get("address", "")),
            "qdisc_veth": _qdisc(host["veth"]) if host["veth"] in links else _qdisc("none-such"),
            "qdisc_eth0": _qdisc("eth0", name) if "eth0" in inside else {"kind": None, "rate_bps": None},
            "cgroups": cgroups,
            "cfs_quota_us": int(quota) if quota else None,
            "cfs_period_us": int(period) if period else None,
            "sshd": _sshd(name, state_dir / "hosts" / name) if name in netns else {
                "pid": None, "running": False, "stale": False},
        }
    cgroup_dirs = _cgroup_tree(params["cgroup_parent"], params["controllers"])
    pids = set(_pids_in(_netns_inodes(lab_netns)))
    for d in cgroup_dirs:
        procs = _read(Path(d) / "cgroup.procs") or ""
        pids.update(int(p) for p in procs.split())
    return {
        "bridge": links.get(params["bridge"]),
        "netns": lab_netns,
        "lab_links": sorted(n for n, link in links.items()
                            if n == params["bridge"] or link["master"] == params["bridge"]
                            or n in {h["veth"] for h in hosts}),
        "hosts": per_host,
        "cgroups": cgroup_dirs,
        "frozen": [d for d in cgroup_dirs if d.startswith(str(CGROUP_ROOT / "freezer"))
                   and _read(Path(d) / "freezer.state") not in (None, "THAWED")],
        "pids": sorted(pids - {os.getpid()}),
        "state_dir_exists": state_dir.exists(),
        "driver_state": sorted(str(entry) for d in params["driver_state_dirs"] if Path(d).is_dir()
                               for entry in Path(d).iterdir()),
    }


def main():
    module = AnsibleModule(
        argument_spec={
            "hosts": {"type": "list", "elements": "dict", "required": True},
            "bridge": {"type": "str", "required": True},
            "state_dir": {"type": "path", "required": True},
            "cgroup_parent": {"type": "str", "required": True},
            "controllers": {"type": "list", "elements": "str", "required": True},
            "netns_prefixes": {"type": "list", "elements": "str", "required": True},
            "driver_state_dirs": {"type": "list", "elements": "path", "default": []},
        },
        supports_check_mode=True,
    )
    for tool in BIN:
        BIN[tool] = module.get_bin_path(tool, required=True)
    module.exit_json(changed=False, lab=probe(module.params))


if __name__ == "__main__":
    main()
