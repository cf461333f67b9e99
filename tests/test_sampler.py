"""The real-PM sampler (testbed.manager.sampler): /proc/stat's busy over total jiffies, from two
reads of this machine's /proc/stat; each technique's VM counters from its tools' recorded
outputs; and tools that are missing mean no VMs, not an error."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest

from testbed.cli import main
from testbed.drivers.base import Host
from testbed.manager.local import LocalController, summarize
from testbed.manager.sampler import (
    NS_PER_S,
    ProcStatSampler,
    VmCounters,
    XenSampler,
    libvirt_vms,
    openvz_vms,
    parse_proc_stat,
    vm_reader,
    xen_vms,
)
from testbed.techniques import REAL_LAB

REPO = Path(__file__).resolve().parent.parent
REAL_OUTPUTS = REPO / "tests" / "data" / "real_outputs"

#: `cat /proc/stat` on this project's build machine (2 CPUs, Linux 6.18, USER_HZ 100), twice,
#: 2 s apart (2026-11-29 17:13:53 UTC), verbatim.
PROC_STAT_BEFORE = """\
cpu  1724567 20047 504649 2152464 14653 0 7990 2065 0 0
cpu0 818416 8654 242511 1134967 3732 0 2691 1003 0 0
cpu1 906151 11393 262138 1017497 10921 0 5299 1062 0 0
intr 45240123 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 1 1 15 0 0 0 0 4465 3513 0 376 1 3167906 0 37428 31246 0 10652 46747 1 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0
ctxt 111719747
btime 1795950104
processes 1970680
procs_running 3
procs_blocked 0
softirq 18358428 0 1736567 1480932 2739035 3167863 0 199459 2849655 529637 5655280
"""
PROC_STAT_AFTER = """\
cpu  1724773 20047 504689 2152615 14654 0 7992 2065 0 0
cpu0 818507 8654 242537 1135048 3732 0 2692 1003 0 0
cpu1 906266 11393 262152 1017567 10921 0 5299 1062 0 0
intr 45242242 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 1 1 15 0 0 0 0 4465 3514 0 376 1 3167929 0 37428 31246 0 10654 46752 1 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0
ctxt 111722773
btime 1795950104
processes 1970754
procs_running 2
procs_blocked 0
softirq 18360097 0 1736717 1481206 2739390 3167886 0 199482 2849872 529909 5655635
"""

#: `virsh domstats` of a running and a shut-off domain, in virsh's format (`Domain: 'NAME'`, then
#: one `key=value` per line; only a running domain has cpu.time), as quoted in the virsh tests
#: of kerubistan/kerub; trimmed to the groups `--cpu-total --vcpu` ask for.
DOMSTATS = """\
Domain: 'kerub.hosts.opensuse13'
  state.state=1
  state.reason=1
  cpu.time=18957473241
  cpu.user=930000000
  cpu.system=3840000000
  vcpu.current=2
  vcpu.maximum=2
  vcpu.0.state=1
  vcpu.0.time=13470000000
  vcpu.1.state=1
  vcpu.1.time=2940000000

Domain: 'kerub.hosts.fedora20'
  state.state=5
  state.reason=2
  vcpu.current=1
  vcpu.maximum=1

"""


def test_proc_stat_busy_and_total_ticks_of_a_recorded_read() -> None:
    stat = parse_proc_stat(PROC_STAT_BEFORE)
    # user nice system irq softirq steal; then + idle iowait
    assert stat.busy_ticks == 1724567 + 20047 + 504649 + 0 + 7990 + 2065
    assert stat.total_ticks == stat.busy_ticks + 2152464 + 14653
    assert stat.cpus == 2


def test_two_recorded_reads_give_busy_over_total(tmp_path: Path) -> None:
    """2 s on 2 CPUs at 100 ticks/s is 400 ticks, 248 of them busy: 62 %, whatever the LC's own
    clock says about the time between the reads (here, none)."""
    proc_stat = tmp_path / "stat"
    proc_stat.write_text(PROC_STAT_BEFORE)
    sampler = ProcStatSampler("pm1", vm_reader("none", Host("pm1", "198.18.0.11", 1.0, 4)), proc_stat)
    before = sampler.read()
    proc_stat.write_text(PROC_STAT_AFTER)
    after = sampler.read()
    assert after.host_total_ns - before.host_total_ns == 400 * NS_PER_S // 100
    sample = summarize("pm1", sampler.capacity, [before, after], window=10.0)
    assert sample.capacity == 2.0 and sample.vms == []
    assert sample.use == pytest.approx(62.0) and sample.demand == pytest.approx(62.0)


def test_a_vm_without_a_cap_of_its_own_is_limited_by_its_pm(tmp_path: Path) -> None:
    proc_stat = tmp_path / "stat"
    proc_stat.write_text(PROC_STAT_BEFORE)
    vms = {"vm1": VmCounters(usage_ns=0)}
    sampler = ProcStatSampler("pm1", lambda: dict(vms), proc_stat)
    before = sampler.read()
    time.sleep(0.2)
    vms["vm1"] = VmCounters(usage_ns=NS_PER_S // 10)
    proc_stat.write_text(PROC_STAT_AFTER)
    sample = summarize("pm1", sampler.capacity, [before, sampler.read()], window=10.0)
    (vm,) = sample.vms
    assert vm.limit == 100.0 and vm.use == vm.demand and 0 < vm.use <= 25.0  # 0.1 s of 2 CPUs in >= 0.2 s


def test_a_pm_sharing_its_kernel_is_as_busy_as_its_vms(tmp_path: Path) -> None:
    """testbed_pm_cpu: vms (the test hosts share this machine's /proc/stat): the machine was 62 %
    busy between the reads, but the PM's use is only its VMs' (the CC would see every PM equally
    loaded otherwise); an unknown source is refused."""
    proc_stat = tmp_path / "stat"
    proc_stat.write_text(PROC_STAT_BEFORE)
    vms = {"vm1": VmCounters(usage_ns=0), "vm2": VmCounters(usage_ns=0)}
    sampler = ProcStatSampler("pm1", lambda: dict(vms), proc_stat, pm_cpu="vms")
    before = sampler.read()
    time.sleep(0.2)
    vms |= {"vm1": VmCounters(usage_ns=NS_PER_S // 20), "vm2": VmCounters(usage_ns=NS_PER_S // 40)}
    proc_stat.write_text(PROC_STAT_AFTER)
    after = sampler.read()
    assert after.pm_is_its_vms
    sample = summarize("pm1", sampler.capacity, [before, after], window=10.0)
    # 75 ms of CPU time in >= 0.2 s on 2 CPUs: at most 18.75 %, far from the machine's 62 %
    assert sample.use == pytest.approx(sum(vm.use for vm in sample.vms)) and 0 < sample.use <= 18.75
    with pytest.raises(ValueError, match=r"no PM CPU source 'cgroup' \(known: machine, vms\)"):
        ProcStatSampler("pm1", dict, proc_stat, pm_cpu="cgroup")


def test_xen_domains_from_a_recorded_xl_list() -> None:
    vms = xen_vms((REAL_OUTPUTS / "xl_list.txt").read_text())
    assert vms == {
        "win": VmCounters(usage_ns=300_000_000, limit_cpus=1.0),
        "linux": VmCounters(usage_ns=5_624_200_000_000, limit_cpus=2.0),
    }


def test_openvz_containers_from_a_recorded_vestat() -> None:
    """The recorded vestat's containers 301 and 302 as `vzlist -a -n` would name them (CT 303 is
    stopped and has no vestat row)."""
    vzlist = (
        "      CTID      NPROC STATUS    IP_ADDR         NAME\n"
        "       301         12 running   198.18.0.101    web\n"
        "       302         30 running   198.18.0.102    db\n"
        "       303          - stopped   198.18.0.103    spare\n"
    )
    vms = openvz_vms((REAL_OUTPUTS / "vestat.txt").read_text(), vzlist, ticks_per_s=100)
    assert vms == {
        "web": VmCounters(usage_ns=(27188 + 0 + 7896) * NS_PER_S // 100),
        "db": VmCounters(usage_ns=(142926 + 0 + 10252) * NS_PER_S // 100),
    }


def test_kvm_domains_from_virsh_domstats() -> None:
    assert libvirt_vms(DOMSTATS) == {"kerub.hosts.opensuse13": VmCounters(usage_ns=18957473241, limit_cpus=2.0)}


def test_kvm_domains_without_cgroups_count_their_vcpus_time() -> None:
    """libvirt on the test hosts has no cgroup controllers, so domstats has no cpu.time (recorded
    there: /proc/stat then domstats, as the libvirt driver reads them)."""
    recorded = (Path(__file__).parent / "data/real_outputs/libvirt_cpu_read_1.txt").read_text()
    assert libvirt_vms(recorded) == {"tbvm3": VmCounters(usage_ns=4_490_000_000, limit_cpus=1.0)}


@pytest.mark.parametrize("technique", [name for name in REAL_LAB if name != "xen"])
def test_a_technique_whose_tools_do_not_answer_has_no_vms(technique: str) -> None:
    """This machine has no virsh, xl, xm or /proc/vz, and no cgroup of a PM named like this."""
    assert vm_reader(technique, Host("tr-nosuchpm", "198.18.0.11", 1.0, 4))() == {}


def test_an_unknown_vm_cpu_source_is_refused_before_the_lc_starts() -> None:
    with pytest.raises(ValueError, match="no VM CPU source for 'bogus'"):
        vm_reader("bogus", Host("pm1", "198.18.0.11", 1.0, 4))
    argv = ["manager", "lc", "-i", str(REPO / "inventory/example-modern"), "--host", "pm1", "--vm-cpu", "bogus"]
    assert main(argv) == 2


def test_the_embedded_labs_lc_refuses_to_run_over_ssh(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["manager", "lc", "--host", "tb-pm1", "--over-ssh"]) == 2
    assert "--over-ssh: the embedded lab's LC runs in its PM's namespace" in capsys.readouterr().err


def _stat(busy: int, idle: int) -> str:
    """A /proc/stat of 2 CPUs with these totals (user and idle ticks), as the kernel writes it."""
    return (f"cpu  {busy} 0 0 {idle} 0 0 0 0 0 0\ncpu0 {busy // 2} 0 0 {idle // 2} 0 0 0 0 0 0\n"
            f"cpu1 {busy - busy // 2} 0 0 {idle - idle // 2} 0 0 0 0 0 0\nintr 0\n")


def test_a_local_controller_samples_what_proc_stat_says(tmp_path: Path) -> None:
    """The LC's own sampling thread over a /proc/stat that advances 3 busy ticks for each idle one
    while it runs: whatever the thread's timing, the machine is 75 % busy, and the sample says so."""
    proc_stat = tmp_path / "stat"
    proc_stat.write_text(_stat(1000, 1000))
    lc = LocalController(ProcStatSampler("pm1", vm_reader("none", Host("pm1", "198.18.0.11", 1.0, 4)), proc_stat),
                         migrate=None, period=0.1)
    lc.start()
    try:
        for k in range(1, 25):
            time.sleep(0.05)
            fresh = tmp_path / "stat.new"
            fresh.write_text(_stat(1000 + 30 * k, 1000 + 10 * k))
            fresh.replace(proc_stat)  # whole, as the kernel's file reads
        sample = lc.sample(0.8)
    finally:
        lc.stop()
    assert sample.capacity == 2.0 and sample.window >= 0.5
    assert sample.use == pytest.approx(75.0) and sample.demand == pytest.approx(75.0)


def test_a_local_controller_reads_this_machine() -> None:
    """The real /proc/stat: the LC reads it and counts this machine's CPUs (the value is checked
    above, on a /proc/stat whose busy share is known)."""
    lc = LocalController(ProcStatSampler("pm1", vm_reader("none", Host("pm1", "198.18.0.11", 1.0, 4))),
                         migrate=None, period=0.2)
    lc.start()
    try:
        time.sleep(1.0)
        sample = lc.sample(0.8)
    finally:
        lc.stop()
    assert sample.capacity == float(parse_proc_stat(Path("/proc/stat").read_text()).cpus)
    assert 0.0 <= sample.use <= 100.0 and sample.window >= 0.6 and sample.vms == []


# --- a Xen PM: the hypervisor's account, not dom0's /proc/stat -----------------------------------

XL_INFO = (REAL_OUTPUTS / "xl_info.txt").read_text()
XL_LIST = (REAL_OUTPUTS / "xl_list.txt").read_text()


def _later_xl_list(seconds: dict[str, float]) -> str:
    """The recorded `xl list` with each named domain's Time(s) advanced, in xl's own columns."""
    from testbed.drivers.xen import parse_xl_list

    lines = [XL_LIST.splitlines()[0]]
    for d in parse_xl_list(XL_LIST):
        lines.append(f"{d.name:<40}{d.domid:>5}{d.memory_mb:>6}{d.vcpus:>6}     {d.state:>6}"
                     f"{d.cpu_time_s + seconds.get(d.name, 0.0):>10.1f}")
    return "\n".join(lines) + "\n"


def test_xl_info_gives_the_physical_cpus_and_refuses_an_output_without_them() -> None:
    from testbed.drivers.xen import physical_cpus

    assert physical_cpus(XL_INFO) == 4
    with pytest.raises(ValueError, match="no nr_cpus"):
        physical_cpus(XL_INFO.replace("nr_cpus ", "nr_nodes_"))


@pytest.mark.parametrize(("pm_cpu", "pm_use"), [("machine", 50.0), ("vms", 45.0)])
def test_a_xen_pm_is_the_hypervisors_account_of_every_domain(pm_cpu: str, pm_use: float) -> None:
    """Over 2 s of a 4-CPU Xen PM, Domain-0 ran 0.4 CPU-s and the guest `linux` 3.6 (`win` none):
    the PM was half busy (4.0 of 8 CPU-s, whatever dom0's /proc/stat says: its kernel never sees
    the guests), `linux` used 45 % of it; with pm_cpu "vms" the PM's use is its guests' alone."""
    lists = iter([XL_LIST, _later_xl_list({"Domain-0": 0.4, "linux": 3.6})])
    calls: list[list[str]] = []

    def tool(argv: list[str]) -> str:
        calls.append(argv)
        return XL_INFO if argv[1] == "info" else next(lists)

    sampler = XenSampler("pm1", pm_cpu=pm_cpu, toolstack="xl", tool=tool)
    assert sampler.capacity == 4.0
    readings = [replace(sampler.read(), t=t) for t in (100.0, 102.0)]
    sample = summarize("pm1", sampler.capacity, readings, window=2.0)
    assert sample.use == pytest.approx(pm_use)
    assert {vm.name: round(vm.use, 3) for vm in sample.vms} == {"win": 0.0, "linux": 45.0}
    assert calls == [["xl", "info"], ["xl", "list"], ["xl", "list"]]  # one list per reading


def test_a_xen_pm_whose_toolstack_fails_stops_its_samples_and_one_without_xen_is_refused() -> None:
    import subprocess

    def failing(argv: list[str]) -> str:
        if argv[1] == "info":
            return XL_INFO
        raise subprocess.CalledProcessError(1, argv, stderr="libxl: error")

    with pytest.raises(OSError, match="xl list"):  # the LC answers 503, not stale figures
        XenSampler("pm1", toolstack="xl", tool=failing).read()
    with pytest.raises(ValueError, match=r"xm info: .*is this PM running Xen\?"):
        XenSampler("pm1", toolstack="xm")  # this machine has no xm
    argv = ["manager", "lc", "-i", str(REPO / "inventory/example-modern"), "--host", "pm1", "--vm-cpu", "xen"]
    assert main(argv) == 2  # one line, before the LC serves anything


def test_a_xen_pms_toolstack_is_the_one_that_answers_on_the_pm() -> None:
    """Without a toolstack named, the PM is asked (through the tool: an LC over SSH must not look
    at its own PATH): xl, else xm (Xen 3.2)."""
    import subprocess

    calls: list[list[str]] = []

    def xen_32(argv: list[str]) -> str:
        calls.append(argv)
        if argv[0] == "xl":
            raise subprocess.CalledProcessError(127, argv, stderr="xl: not found")
        return XL_INFO if argv[1] == "info" else XL_LIST

    sampler = XenSampler("pm1", tool=xen_32)
    assert sampler.capacity == 4.0 and sampler.vm_names() == ["linux", "win"]
    assert calls == [["xl", "info"], ["xm", "info"], ["xm", "list"]]
