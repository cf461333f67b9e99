"""The real-lab drivers' readers, on outputs recorded from the tools' documentation and source
(tests/data/real_outputs/README.md says where each comes from), and their command building."""

from __future__ import annotations

import shlex
import threading
import time
from pathlib import Path

import pytest

from testbed.drivers.base import Host, MigrationMode, VMSpec
from testbed.drivers.libvirt import (
    console_port_of,
    cpu_from_reads,
    domain_type_for,
    domain_xml,
    free_console_port,
    migration_flags,
    nfs_disk,
    parse_job_stats,
    record_from_job_stats,
)
from testbed.drivers.openvz import (
    DOWNTIME_PHASES,
    GUEST_PROGRAMS,
    OpenVZDriver,
    cpu_between,
    parse_cpu_sample,
    parse_vestat,
    parse_vzlist,
    parse_vzmigrate,
)
from testbed.drivers.remote_base import LAUNCHER, parse_proc_net_dev, parse_run_files, ssh_guest_argv
from testbed.drivers.xen import (
    XenDriver,
    cpu_from_xentop,
    domain_config,
    match_xentop_names,
    parse_xentop,
    parse_xl_list,
)

DATA = Path(__file__).parent / "data" / "real_outputs"
PM = Host("pm1", "192.168.10.11", capacity=4.0, cores=4)


def read(name: str) -> str:
    return (DATA / name).read_text()


# --- Xen ---------------------------------------------------------------------------------------


def test_xl_list_rows() -> None:
    domains = parse_xl_list(read("xl_list.txt"))
    assert [(d.name, d.domid, d.memory_mb, d.vcpus) for d in domains] == [
        ("Domain-0", 0, 750, 4),
        ("win", 1, 1019, 1),
        ("linux", 2, 2048, 2),
    ]
    assert domains[2].cpu_time_s == pytest.approx(5624.2)
    assert all(d.running for d in domains)


def test_xm_list_rows_of_xen_3() -> None:
    domains = parse_xl_list(read("xm_list.txt"))
    assert [d.name for d in domains] == [
        "Domain-0",
        "Fedora3",
        "Fedora4",
        "Mandrake2006",
        "Mandrake10.2",
        "Suse9.2",
    ]
    assert domains[3].state == "-b----" and domains[5].memory_mb == 100


def test_xentop_batch_keeps_every_iteration() -> None:
    frames = parse_xentop(read("xentop_batch.txt"))
    assert len(frames) == 2
    assert [r.name for r in frames[1]] == ["Domain-0", "vm1", "synthetic-"]
    # The first iteration has no previous sample: xentop prints 0.0 for every domain.
    assert all(r.cpu_pct == 0.0 for r in frames[0])
    assert [r.cpu_pct for r in frames[1]] == [12.4, 97.9, 48.6]
    assert frames[1][0].memory_kb == 524288 and frames[1][2].vcpus == 1


def test_xentop_names_match_full_domain_names() -> None:
    rows = parse_xentop(read("xentop_batch.txt"))[1]
    matched = match_xentop_names(rows, ["vm1", "synthetic-random-7"])
    assert matched["synthetic-random-7"].cpu_pct == 48.6
    with pytest.raises(ValueError, match="look alike"):
        match_xentop_names(rows, ["synthetic-random-7", "synthetic-random-8"])


def test_xentop_loads_are_shares_of_the_pm_capacity() -> None:
    frame = parse_xentop(read("xentop_batch.txt"))[1]
    host_load, vm_loads = cpu_from_xentop(frame, ["vm1", "synthetic-random-7"], PM)
    # dom0 counts towards the PM (it does the I/O and the migrations), not as a VM.
    assert host_load == pytest.approx((12.4 + 97.9 + 48.6) / 4)
    assert vm_loads == pytest.approx({"vm1": 97.9 / 4, "synthetic-random-7": 48.6 / 4})


def test_xen_migration_commands_per_toolstack_and_mode() -> None:
    dest = Host("pm2", "192.168.10.12", 4.0, 4)
    xl = XenDriver([PM, dest], Path("/k"), toolstack="xl", kernel="/boot/vmlinuz")
    xm = XenDriver([PM, dest], Path("/k"), toolstack="xm", kernel="/boot/vmlinuz")
    assert xl.migrate_argv("vm1", dest, MigrationMode.PRECOPY) == ["xl", "migrate", "vm1", "192.168.10.12"]
    assert xm.migrate_argv("vm1", dest, MigrationMode.PRECOPY) == [
        "xm",
        "migrate",
        "--live",
        "vm1",
        "192.168.10.12",
    ]
    assert xm.migrate_argv("vm1", dest, MigrationMode.STOPCOPY) == ["xm", "migrate", "vm1", "192.168.10.12"]
    for driver, mode in (
        (xl, MigrationMode.STOPCOPY),
        (xl, MigrationMode.POSTCOPY),
        (xm, MigrationMode.POSTCOPY),
    ):
        with pytest.raises(ValueError, match="cannot migrate"):
            driver.migrate_argv("vm1", dest, mode)


def test_domain_config_quotes_values() -> None:
    text = domain_config(
        VMSpec("vm1", 100, 1),
        '/boot/vmlinuz "x"',
        None,
        "/var/lib/testbed/shared/pm2/disks/vm1.img",
        "xenbr0",
    )
    assert 'name = "vm1"\n' in text and "memory = 100\n" in text
    assert 'kernel = "/boot/vmlinuz \\"x\\""' in text  # a quote stays inside the string
    assert 'disk = ["file:/var/lib/testbed/shared/pm2/disks/vm1.img,xvda,w"]' in text
    assert "ramdisk" not in text


# --- OpenVZ ------------------------------------------------------------------------------------


def test_vzlist_of_the_thesis_era() -> None:
    containers = parse_vzlist(read("vzlist_veid.txt"))
    assert [(c.ctid, c.status, c.nproc) for c in containers] == [
        (777, "running", 27),
        (778, "running", 22),
        (779, "stopped", None),
        (780, "running", 28),
    ]
    assert containers[3].name == "mysql.subdom.domain.com"


def test_vzlist_with_ctid_header() -> None:
    containers = parse_vzlist(read("vzlist_ctid.txt"))
    assert [(c.ctid, c.name) for c in containers] == [
        (1, "ServiceCT"),
        (101, "VZTest01.softlayer.local"),
        (201, "vz201.domain.com"),
    ]


def test_vestat_busy_ticks() -> None:
    assert parse_vestat(read("vestat.txt")) == {302: 142926 + 0 + 10252, 301: 27188 + 0 + 7896}


def test_openvz_cpu_between_two_reads() -> None:
    vestat = read("vestat.txt")
    before = parse_cpu_sample("1000.00 3000.00\ncpu  5000 0 1000 90000 200 0 0 0 0 0\n" + vestat)
    later = vestat.replace("142926", "143326").replace("27188", "27388")  # +400 and +200 ticks
    after = parse_cpu_sample("1002.00 3004.00\ncpu  5500 0 1100 97000 200 0 0 0 0 0\n" + later)
    host_load, loads = cpu_between(before, after, ticks_per_s=100, host=PM)
    # 2 s at 100 ticks/s on a 4-CPU PM: 600 busy ticks = 3 CPUs = 75 %.
    assert host_load == pytest.approx(75.0)
    assert loads == pytest.approx({302: 50.0, 301: 25.0})


class VzPm:
    """A PM's vzctl and vzlist as the driver calls them: a creation is recorded only once
    `vzctl create` has run a while (a template to unpack), and every command is kept."""

    def __init__(self, name: str, creating_s: float = 0.2) -> None:
        self.name, self.creating_s = name, creating_s
        self.containers: dict[int, str] = {}
        self.commands: list[list[str]] = []

    def run(self, argv: list[str], timeout_s: float = 60.0, check: bool = True, stdin: bytes | None = None) -> str:
        self.commands.append(list(argv))
        if argv[:1] == ["vzlist"]:
            rows = [f"{ctid} 1 running - {name}" for ctid, name in self.containers.items()]
            return "\n".join(["CTID NPROC STATUS IP_ADDR NAME", *rows]) + "\n"
        if argv[:2] == ["vzctl", "create"]:
            time.sleep(self.creating_s)
            self.containers[int(argv[2])] = "-"
        if argv[:2] == ["vzctl", "set"]:
            self.containers[int(argv[2])] = argv[argv.index("--name") + 1]
        return ""


def test_openvz_containers_created_at_once_on_two_pms_get_distinct_ctids_and_the_guest_programs() -> None:
    """The runner creates on every PM in parallel; CTIDs are the lowest free lab-wide, so a second
    creation must see the first (else both take 101, and a migration between them fails on the
    destination, which has 101 already). Each container gets the PM's guest programs before it starts."""
    driver = OpenVZDriver([PM, Host("pm2", "192.168.10.12", 4.0, 4)], Path("/k"))
    pms = {name: VzPm(name) for name in ("pm1", "pm2")}
    driver._remotes = pms  # type: ignore[assignment]
    threads = [threading.Thread(target=driver.create_vm, args=(VMSpec(f"vm{i}"), pm))
               for i, pm in enumerate(pms, start=1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert sorted((*pms["pm1"].containers, *pms["pm2"].containers)) == [101, 102]
    for pm in pms.values():
        (ctid,) = pm.containers
        private = f"/var/lib/testbed/shared/{pm.name}/roots/{ctid}"
        vz = [c[:2] for c in pm.commands if c[0] != "vzlist"]
        assert vz == [["vzctl", "create"], ["mkdir", "-p"], ["cp", "-pR"], ["vzctl", "set"], ["vzctl", "start"]]
        assert ["cp", "-pR", f"{GUEST_PROGRAMS}/.", f"{private}/usr/bin/"] in pm.commands


def test_vzmigrate_phases_and_downtime() -> None:
    lines = read("vzmigrate_online_v.txt").splitlines()
    # Stamp each line as the driver would (seconds since the migration began).
    stamps = {
        "Syncing private": 1.0,
        "Live migrating container...": 3.0,
        "   Suspending container": 3.1,
        "   Dumping container": 3.2,
        "   Copying dumpfile": 4.5,
        "   Syncing private (2nd pass)": 15.5,
        "   Undumping container": 15.6,
        "   Resuming container": 18.0,
        "Cleaning up": 18.4,
    }
    log, now = [], 0.0
    for line in lines:
        now = stamps.get(line, now)
        log.append((now, line))
    phases, table = parse_vzmigrate(log)
    assert phases == pytest.approx(
        {
            "first_rsync": 2.1,
            "suspend": 0.1,
            "dump": 1.3,
            "copy_dump": 11.0,
            "second_rsync": 0.1,
            "undump": 2.4,
            "resume": 0.4,
        }
    )
    assert sum(phases[p] for p in DOWNTIME_PHASES if p in phases) == pytest.approx(15.3)
    assert table == {
        "Suspend + Dump": 1.31,
        "Copy dump file": 11.02,
        "Second rsync": 0.05,
        "2nd level quota": 0.0,
        "Undump + Resume": 2.86,
        "Total suspended time": 15.24,
    }


# --- libvirt -----------------------------------------------------------------------------------


def test_libvirt_flags_per_mode() -> None:
    assert migration_flags(MigrationMode.PRECOPY) == ["--p2p", "--live"]
    assert migration_flags(MigrationMode.STOPCOPY) == ["--p2p"]  # paused for the whole copy
    assert migration_flags(MigrationMode.POSTCOPY) == ["--p2p", "--live", "--postcopy", "--postcopy-after-precopy"]


def test_libvirt_completed_job_stats_to_record() -> None:
    # Field names and units of libvirt's typed job parameters (VIR_DOMAIN_JOB_* in libvirt-domain.h).
    stats = {
        "type": 3,
        "operation": 3,
        "time_elapsed": 6120,
        "downtime": 43,
        "setup_time": 12,
        "data_processed": 75_497_472,
        "memory_iteration": 4,
        "memory_dirty_rate": 120,
    }
    record = record_from_job_stats(
        stats, vm="vm1", source="pm1", destination="pm2", mode=MigrationMode.PRECOPY, start=100.0, wall_s=6.5
    )
    assert (record.total_time_s, record.downtime_s, record.bytes, record.rounds) == (
        6.12,
        0.043,
        75_497_472,
        4,
    )
    assert record.phases == {"setup": 0.012} and record.details["memory_dirty_rate"] == 120
    stop = record_from_job_stats(
        {"time_elapsed": 2000},
        vm="vm1",
        source="pm1",
        destination="pm2",
        mode=MigrationMode.STOPCOPY,
        start=0.0,
        wall_s=2.1,
    )
    assert stop.downtime_s == 2.0  # paused for the whole migration


def test_libvirt_domain_xml_keeps_names_as_text() -> None:
    xml = domain_xml(VMSpec("vm<1>", 128, 2), "/var/lib/testbed/shared/pm1/disks/vm1.qcow2", "br0")
    assert "<name>vm&lt;1&gt;</name>" in xml and '<memory unit="MiB">128</memory>' in xml
    assert '<source file="/var/lib/testbed/shared/pm1/disks/vm1.qcow2" />' in xml



def test_libvirt_tcg_domain_with_an_nfs_disk_and_a_tcp_console() -> None:
    """Where KVM does not work (the test hosts) the domain is type qemu (TCG); its disk is opened
    by QEMU over nfs://, its serial console is a TCP server on the PM running it."""
    import xml.etree.ElementTree as ET

    xml = domain_xml(
        VMSpec("vm1", 128, 1),
        "nfs://198.18.0.241/var/lib/testbed/storage/tr-pm1/disks/vm1.qcow2",
        None,
        "/var/lib/testbed/images/qemu/vmlinux",
        domain_type=domain_type_for("tcg\n"),
        initrd="/var/lib/testbed/images/qemu/initramfs.cpio",
        cmdline="console=ttyS0 quiet panic=-1",
        console_port=4600,
    )
    root = ET.fromstring(xml)
    assert root.get("type") == "qemu" and root.find("devices/interface") is None
    source = root.find("devices/disk/source")
    assert root.find("devices/disk").get("type") == "network" and source is not None
    assert source.get("protocol") == "nfs" and source.get("name") == "/var/lib/testbed/storage/tr-pm1/disks/vm1.qcow2"
    assert source.find("host").get("name") == "198.18.0.241"
    assert root.find("os/initrd").text.endswith("initramfs.cpio") and root.find("os/cmdline").text.startswith("console")
    assert root.find("devices/serial/source").get("service") == "4600"
    assert domain_type_for("kvm") == "kvm"
    with pytest.raises(ValueError, match="kvm or tcg"):
        domain_type_for("")
    with pytest.raises(ValueError, match="kvm or qemu"):
        domain_xml(VMSpec("vm1", 128, 1), "/d.qcow2", domain_type="xen")
    with pytest.raises(ValueError, match="nfs://HOST/PATH"):
        nfs_disk("nfs://hostonly")


def test_libvirt_peer_to_peer_migration_names_the_destination_without_this_machines_key(tmp_path: Path) -> None:
    """The source PM's libvirtd opens the destination URI itself: it must not carry the key path
    of the machine running the driver (the PMs use root's own key, roles/libvirt/tasks/peers.yml)."""
    from testbed.drivers.libvirt import LibvirtDriver

    hosts = [Host("pm1", "198.18.0.241", 1.0, 4), Host("pm2", "198.18.0.242", 1.0, 4)]
    driver = LibvirtDriver(hosts, tmp_path / "key", known_hosts=tmp_path / "known_hosts")
    assert driver.migrate_argv("vm1", "pm2", MigrationMode.PRECOPY) == [
        "virsh", "migrate", "--p2p", "--live", "vm1", "qemu+ssh://root@198.18.0.242/system"
    ]


def test_libvirt_completed_migration_from_virsh_rawstats() -> None:
    """`virsh domjobinfo --completed --rawstats` on the destination after a stop-and-copy move
    of a 128 MiB TCG domain between the test hosts: libvirt's own units, unrounded."""
    stats = parse_job_stats(read("libvirt_domjobinfo_rawstats.txt"))
    assert stats["time_elapsed"] == 1805 and stats["downtime"] == 507 and stats["memory_iteration"] == 3
    assert "Job type" not in stats and stats["data_processed"] == 79_824_809
    record = record_from_job_stats(
        stats, vm="vm1", source="pm1", destination="pm2", mode=MigrationMode.STOPCOPY, start=0.0, wall_s=2.4
    )
    assert (record.total_time_s, record.downtime_s, record.bytes, record.rounds) == (1.805, 0.507, 79_824_809, 3)


def test_libvirt_cpu_between_two_reads_of_a_test_host() -> None:
    """/proc/stat and `virsh domstats` read together on tr-pm1, 2.13 s apart, with a TCG domain
    whose libvirt has no cgroups (no cpu.time: its vCPU's time counts)."""
    pm = Host("tr-pm1", "198.18.0.241", capacity=0.5, cores=2)
    before = (14056.621121936, read("libvirt_cpu_read_1.txt"))
    after = (14058.74756965, read("libvirt_cpu_read_2.txt"))
    host, vms = cpu_from_reads(before, after, pm)
    # busy ticks 299 of 438 on 2 CPUs = 1.37 CPUs; vcpu.0.time +50 ms in 2.126 s = 0.0235 CPUs
    assert host == pytest.approx(299 / 438 * 2 * 100 / 0.5)
    assert vms == {"tbvm3": pytest.approx(0.05 / 2.126447714 * 100 / 0.5)}


def test_libvirt_console_ports_are_read_back_from_the_xml_and_the_lowest_free_is_taken() -> None:
    xml = domain_xml(VMSpec("vm1", 128, 1), "/d.qcow2", console_port=4602)
    assert console_port_of(xml) == 4602
    assert console_port_of(read("libvirt_dumpxml.xml")) == 4600  # as libvirt 9 gives it back
    assert console_port_of(domain_xml(VMSpec("vm1", 128, 1), "/d.qcow2")) is None  # a pty console
    assert free_console_port(set()) == 4600
    assert free_console_port({4600, 4602}) == 4601
    assert free_console_port({4600, 4601}, base=4600) == 4602


# --- shared pieces -----------------------------------------------------------------------------


def test_guest_commands_are_quoted_words() -> None:
    argv = ssh_guest_argv(
        "10.0.0.5", "/key", ["sh", "-c", LAUNCHER, "launcher", "/tmp/r 1", "echo", "a; rm -rf /"]
    )
    assert argv[:2] == ["ssh", "-i"] and argv[-2] == "--"
    assert shlex.split(argv[-1]) == ["sh", "-c", LAUNCHER, "launcher", "/tmp/r 1", "echo", "a; rm -rf /"]


def test_run_files_from_tail() -> None:
    text = "==> /d/start <==\n1700000000.25\n\n==> /d/status <==\n0\n\n==> /d/output <==\nline 1\nline 2\n"
    assert parse_run_files(text) == {"start": "1700000000.25", "status": "0", "output": "line 1\nline 2"}


def test_proc_net_dev_sums_transmitted_bytes_but_loopback() -> None:
    text = (
        "Inter-|   Receive                                                |  Transmit\n"
        " face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop\n"
        "    lo: 9000 10 0 0 0 0 0 0 9000 10 0 0 0 0 0 0\n"
        "  eth0: 1000 20 0 0 0 0 0 0 5000 30 0 0 0 0 0 0\n"
        " peth0: 1 1 0 0 0 0 0 0 70 1 0 0 0 0 0 0\n"
    )
    assert parse_proc_net_dev(text) == 5070


@pytest.mark.parametrize("technique", ["xen", "openvz", "kvm"])
def test_a_real_labs_driver_takes_a_local_controllers_compression_by_the_catalogues_rule(technique: str) -> None:
    """Every driver takes the LC's `compression=` (the LC passes the CC's order on to any driver);
    the real-lab ones offer none, so zstd is refused with the catalogue's reason before a PM is
    reached (these PMs' addresses answer nothing)."""
    from testbed.techniques import technique as catalogue_entry

    extra = {"kernel": "/boot/vmlinuz"} if technique == "xen" else {}  # a Xen domain's kernel
    driver = catalogue_entry(technique).driver_class()([PM, Host("pm2", "192.168.10.12", 4.0, 4)], Path("/k"), **extra)
    mode = MigrationMode.STOPCOPY if technique == "openvz" else MigrationMode.PRECOPY
    with pytest.raises(ValueError, match=f"technique {technique} does not compress migrations"):
        driver.migrate("vm1", "pm2", mode, compression="zstd")
