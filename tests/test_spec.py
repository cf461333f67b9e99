"""Experiment specs: the shipped experiments validate, layouts place VMs as the thesis does, and
every bad field fails with one line naming it (exit 2 from the CLI path, InputError in Python)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from testbed.errors import InputError
from testbed.runner.layouts import counts_for, label, placement
from testbed.spec import load_spec, parse_spec, spec_with

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
BASE = {"name": "t", "techniques": ["qemu"]}


@pytest.mark.parametrize("path", sorted(EXPERIMENTS.glob("*.yml")), ids=lambda p: p.name)
def test_shipped_experiments_validate(path):
    spec = load_spec(path)
    assert spec.variants()
    spec.check_against_lab(pm_count=3, pm_cores=4)


def test_exp1_has_the_thesis_variants():
    spec = load_spec(EXPERIMENTS / "exp1.yml")
    cells = {(v.layout, v.migration) for v in spec.variants()}
    assert cells == {("balanced", False), ("unbalanced", False), ("unbalanced", True)}
    assert spec.repetitions == 7 and spec.vcpus == 2 and spec.instances == 2 and spec.vms == 9


def test_named_layouts_follow_the_thesis():
    assert counts_for("balanced", 9, 3) == (3, 3, 3)
    assert counts_for("unbalanced", 9, 3) == (7, 1, 1)
    assert counts_for("balanced", 10, 3) == (4, 3, 3)
    assert placement("unbalanced", 9, 3) == (1, 1, 1, 1, 1, 1, 1, 2, 3)
    assert placement([2, 0, 1], 3, 3) == (1, 1, 3)
    assert placement({"vm1": 2, "vm2": 1}, 2, 2) == (2, 1)
    assert label([7, 1, 1]) == "7-1-1" and label({"vm1": 2, "vm2": 1}) == "at-2-1"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"name": "Exp 1"}, "name: String should match pattern"),
        ({"techniques": []}, "techniques: List should have at least 1 item"),
        ({"techniques": ["vmware"]}, "techniques.0: Input should be"),
        ({"techniques": ["qemu", "qemu"]}, "techniques.1: qemu is listed twice"),
        ({"app": "games"}, "app: Input should be"),
        ({"vcpus": 0}, "vcpus: Input should be greater than or equal to 1"),
        ({"memory_mb": 8}, "memory_mb: Input should be greater than or equal to 32"),
        ({"repetitions": 0}, "repetitions: Input should be greater than or equal to 1"),
        ({"scale": 0}, "scale: Input should be greater than 0"),
        ({"seed": "x"}, "seed: Input should be a valid integer"),
        ({"colour": "red"}, "colour: Extra inputs are not permitted"),
        ({"matrix": {"layout": ["lopsided"]}}, "matrix.layout.0: unknown layout 'lopsided'"),
        ({"matrix": {"layout": [[7, 1]]}}, "matrix.layout.0: [7, 1] gives counts for 2 PMs, the experiment has 3"),
        ({"matrix": {"layout": [[7, 1, 2]]}}, "matrix.layout.0: [7, 1, 2] places 10 VMs, the experiment has 9"),
        ({"vms": 2, "matrix": {"layout": [{"vm1": 1, "vm2": 4}]}}, "matrix.layout.0: vm2: PM 4 is not between 1 and 3"),
        ({"vms": 2, "matrix": {"layout": ["unbalanced"]}}, "matrix.layout.0: unbalanced needs at least one VM per PM"),
        ({"matrix": {"link_rate": ["fast"]}}, "matrix.link_rate.0: 'fast' is not a rate"),
        ({"matrix": {"compression": ["gzip"]}}, "matrix.compression.0: Input should be"),
        ({"matrix": {"migration": []}}, "matrix.migration: List should have at least 1 item"),
        ({"exclude": [{"speed": 1}]}, "exclude.0.speed: not a matrix axis"),
        ({"exclude": [{"layout": 5}]}, "exclude.0.layout: not a valid layout"),
        ({"exclude": [{"layout": {"x": 1}}]}, "exclude.0.layout: x is not one of the experiment's VMs"),
        ({"exclude": [{"migration": "yes"}]}, "exclude.0.migration: not a valid migration"),
        ({"exclude": [{"link_rate": "fast"}]}, "exclude.0.link_rate: not a valid link_rate: 'fast' is not a rate"),
        ({"exclude": [{"technique": "xen"}]}, "exclude.0.technique: not one of the spec's techniques"),
        ({"memory_mb": 10**9}, "memory_mb: Input should be less than or equal to 1048576"),
        ({"start_delay_s": {"vm1": float("inf")}}, "start_delay_s.vm1: Input should be a finite number"),
        ({"warmup_s": float("nan")}, "warmup_s: Input should be a finite number"),
        ({"balancer": {"cooldown_s": float("inf")}}, "balancer.cooldown_s: Input should be a finite number"),
        ({"balancer": {"interval_s": float("inf")}}, "balancer.interval_s: Input should be a finite number"),
        ({"exclude": [{"layout": "balanced"}]}, "exclude: excludes every variant"),
        ({"start_delay_s": {"vm12": 5}}, "start_delay_s.vm12: not one of the VMs vm1..vm9"),
        ({"start_delay_s": {"vm1": -5}}, "start_delay_s.vm1: Input should be greater than or equal to 0"),
        ({"per_vm": {"vm12": {"work": 2}}}, "per_vm.vm12: not one of the VMs vm1..vm9"),
        ({"per_vm": {"web": {"instances": 2}}}, "per_vm.web: not one of the VMs vm1..vm9"),
        ({"per_vm": {"vm1": {"instances": 0}}}, "per_vm.vm1.instances: Input should be greater than or equal to 1"),
        ({"per_vm": {"vm1": {"instances": 65}}}, "per_vm.vm1.instances: Input should be less than or equal to 64"),
        ({"per_vm": {"vm1": {"instances": 1.5}}}, "per_vm.vm1.instances: Input should be a valid integer"),
        ({"per_vm": {"vm1": {"work": 0}}}, "per_vm.vm1.work: Input should be greater than 0"),
        ({"per_vm": {"vm1": {"work": float("inf")}}}, "per_vm.vm1.work: Input should be a finite number"),
        ({"per_vm": {"vm1": {"work": "x"}}}, "per_vm.vm1.work: Input should be a valid number"),
        ({"per_vm": {"vm1": {"vcpus": 0}}}, "per_vm.vm1.vcpus: Input should be greater than or equal to 1"),
        ({"per_vm": {"vm1": {"memory_mb": 5}}}, "per_vm.vm1.memory_mb: Extra inputs are not permitted"),
        ({"per_vm": {"vm1": 2}}, "per_vm.vm1: Input should be a valid dictionary"),
        ({"balancer": {"signal": "load"}}, "balancer.signal: Input should be 'use' or 'demand'"),
        ({"balancer": {"policy": "random"}}, "balancer.policy: unknown policy 'random'"),
        ({"balancer": {"params": {"base": 0.5}}}, "balancer.params: base must be a finite number greater than 1"),
        ({"balancer": {"params": {"threshold": 3}}}, "balancer.params: threshold: not a parameter of policy"),
        ({"balancer": {"interval_s": 0.5}}, "balancer.interval_s: Input should be greater than or equal to 1"),
        ({"balancer": {"mode": "teleport"}}, "balancer.mode: Input should be"),
        ({"kind": "migration", "matrix": {"migration": [False]}}, "matrix.migration: a migration experiment always"),
    ],
)
def test_bad_field_is_named_in_one_line(change, message):
    with pytest.raises(InputError) as err:
        parse_spec(BASE | change, "x.yml")
    text = str(err.value)
    assert text.startswith("x.yml: ") and message in text, text
    assert "\n" not in text


def test_an_exclude_with_the_default_mode_or_rate_is_accepted():
    spec = parse_spec(BASE | {"matrix": {"layout": ["balanced", "unbalanced"]},
                              "exclude": [{"layout": "balanced", "mode": None, "link_rate": None}]})
    assert [v.layout for v in spec.variants()] == ["unbalanced", "unbalanced"]


@pytest.mark.parametrize("command", [["run"], ["sim", "run"]])
@pytest.mark.parametrize("text", ["exclude: [{layout: 5}]", "exclude: [{layout: {x: 1}}]", "memory_mb: 1000000000",
                                  "start_delay_s: {vm1: .inf}", "balancer: {cooldown_s: .inf}",
                                  "per_vm: {vm10: {work: 2}}", "per_vm: {vm1: {instances: 0}}",
                                  "balancer: {signal: wait}"])
def test_the_cli_refuses_a_bad_spec_in_one_line_before_creating_anything(tmp_path, capsys, command, text):
    from testbed.cli import main

    spec = tmp_path / "bad.yml"
    technique = "sim" if command == ["sim", "run"] else "qemu"
    spec.write_text(f"name: bad\ntechniques: [{technique}]\nmatrix: {{layout: [balanced, unbalanced]}}\n{text}\n")
    assert main([*command, str(spec), "--results", str(tmp_path / "results")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("testbed: error: ") and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yml"]


def test_per_vm_work_gives_each_vm_its_instances_scale_vcpus_and_delay():
    spec = parse_spec(BASE | {"vms": 4, "pms": 3, "instances": 2, "vcpus": 1, "scale": 0.5,
                              "start_delay_s": {"vm3": 20},
                              "per_vm": {"vm1": {"work": 3}, "vm3": {"instances": 1, "work": 0.5},
                                         "vm4": {"vcpus": 2}}})
    assert [spec.vm_instances(vm) for vm in ("vm1", "vm2", "vm3", "vm4")] == [2, 2, 1, 2]
    assert [spec.vm_scale(vm) for vm in ("vm1", "vm2", "vm3", "vm4")] == [1.5, 0.5, 0.25, 0.5]
    assert [spec.vm_vcpus(vm) for vm in ("vm1", "vm2", "vm3", "vm4")] == [1, 1, 1, 2]
    assert (spec.vm_delay_s("vm3"), spec.vm_delay_s("vm1")) == (10.0, 0.0)  # the spec's scale, not the VM's work
    assert spec.max_vm_scale() == 1.5
    plain = parse_spec(BASE)
    assert (plain.vm_instances("vm9"), plain.vm_scale("vm9"), plain.vm_vcpus("vm9")) == (1, 1.0, 2)


def test_per_vm_vcpus_are_checked_against_the_lab():
    spec = parse_spec(BASE | {"per_vm": {"vm2": {"vcpus": 8}}})
    with pytest.raises(InputError) as err:
        spec.check_against_lab(pm_count=3, pm_cores=4, source="x.yml")
    assert str(err.value) == "x.yml: per_vm.vm2.vcpus: 8 vCPUs, the lab's PMs stand for 4 cores"
    spec.check_against_lab(pm_count=3, pm_cores=8)


def test_load_spec_reports_yaml_and_file_problems(tmp_path):
    broken = tmp_path / "broken.yml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(InputError, match=r"broken.yml: line \d+: not valid YAML"):
        load_spec(broken)
    listing = tmp_path / "list.yml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(InputError, match=r"list.yml: \(top level\): must be a mapping"):
        load_spec(listing)
    with pytest.raises(InputError, match="missing.yml: No such file"):
        load_spec(tmp_path / "missing.yml")


def test_lab_cross_check_names_the_field():
    spec = parse_spec(BASE | {"vcpus": 8})
    with pytest.raises(InputError, match="pms: the spec places VMs on 3 PMs, the lab has 2"):
        spec.check_against_lab(pm_count=2)
    with pytest.raises(InputError, match="vcpus: 8 vCPUs per VM, the lab's PMs stand for 4 cores"):
        spec.check_against_lab(pm_count=3, pm_cores=4)


def test_overrides_are_validated_again():
    spec = parse_spec(BASE)
    assert spec_with(spec, repetitions=2, scale=0.1).repetitions == 2
    with pytest.raises(InputError, match="scale: Input should be greater than 0"):
        spec_with(spec, scale=-1)


def test_cli_reports_input_errors_in_one_line_with_exit_2(tmp_path, capsys):
    from testbed.cli import main

    assert main(["plot", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err == f"testbed: error: {tmp_path / 'nowhere'}: not a results directory (no runs.csv)\n"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"balancer": {"compression": "bzip2"}},
         "balancer.compression: bzip2: technique qemu compresses migrations with zstd or zlib only"),
        ({"techniques": ["container"], "balancer": {"compression": "zlib"}},
         "balancer.compression: zlib: technique container compresses migrations with bzip2 or zstd only"),
        ({"balancer": {"compression": "zstd", "mode": "postcopy"}},
         "balancer.compression: zstd: QEMU cannot compress a post-copy migration"),
        ({"balancer": {"compression": "lz4"}},
         "balancer.compression: Input should be 'none', 'bzip2', 'zstd' or 'zlib'"),
    ],
)
def test_balancer_compression_a_technique_lacks_is_refused_in_one_line(change, message):
    with pytest.raises(InputError) as err:
        parse_spec(BASE | change, "x.yml")
    assert str(err.value) == f"x.yml: {message}"


def test_balancer_compression_goes_into_every_variant_and_the_ccs_config():
    """As the balancer's mode: the default of the matrix' axis, named in the variant ids, and
    what the lab executor gives the CC for the run (None: uncompressed)."""
    from testbed.manager.api import CcConfig
    from testbed.runner.campaign import Run
    from testbed.runner.executor import LabExecutor

    plain = parse_spec(BASE | {"techniques": ["qemu", "container"]})
    assert {v.compression for v in plain.variants()} == {"none"}
    assert plain.variants()[0].order_compression is None
    spec = parse_spec(BASE | {"techniques": ["qemu", "container"], "balancer": {"compression": "zstd"}})
    variant = spec.variants()[-1]
    assert variant.id == "synthetic1.balanced.mig.zstd" and variant.order_compression == "zstd"

    class CcStub:
        def put(self, path, config):
            self.put_config = config

    executor = LabExecutor.__new__(LabExecutor)
    executor.cc = CcStub()
    executor.lab = SimpleNamespace(pms=[SimpleNamespace(link_rate_bps=100_000_000)])
    for technique, mode in (("qemu", "precopy"), ("container", "stopcopy")):
        config = executor._configure_cc(Run(spec, technique, variant, 1), quiet=False)
        assert config == executor.cc.put_config
        assert (config.mode, config.compression, config.dry_run) == (mode, "zstd", False)
        assert CcConfig.model_validate(config.model_dump(mode="json")) == config  # what PUT /v1/config takes


@pytest.mark.parametrize("signal", ["use", "demand"])
def test_balancer_signal_goes_into_the_ccs_config(signal):
    """The spec's `balancer.signal` is what the runner's CC config balances on (use by default)."""
    from testbed.manager.api import CcConfig
    from testbed.runner.campaign import Run
    from testbed.runner.executor import LabExecutor

    spec = parse_spec(BASE | ({"balancer": {"signal": signal}} if signal == "demand" else {}))
    assert spec.balancer.signal == signal

    class CcStub:
        def put(self, path, config):
            self.put_config = config

        def get(self, path, **query):
            return {"in_flight": None}

    executor = LabExecutor.__new__(LabExecutor)
    executor.cc = CcStub()
    executor.lab = SimpleNamespace(pms=[SimpleNamespace(link_rate_bps=100_000_000)])
    variant = next(v for v in spec.variants() if v.migration)
    config = executor._configure_cc(Run(spec, "qemu", variant, 1), quiet=False)
    assert config.signal == signal and executor.cc.put_config == config
    assert CcConfig.model_validate(config.model_dump(mode="json")).signal == signal
    assert executor._configure_cc(Run(spec, "qemu", variant, 1), quiet=True).signal == signal


def test_campaigns_recorded_before_balancer_compression_and_time_scale_existed_still_resume():
    import hashlib
    import json

    from testbed.runner.campaign import spec_fingerprint

    spec = parse_spec(BASE)
    before = json.loads(spec.model_dump_json(exclude={"repetitions", "description"}))
    del before["balancer"]["compression"]  # a spec as dumped before the fields were added
    del before["balancer"]["time_scale"]
    del before["balancer"]["signal"]
    del before["per_vm"]
    text = json.dumps(before, separators=(",", ":"))
    assert spec_fingerprint(spec) == hashlib.sha256(text.encode()).hexdigest()[:16]
    for change in ({"balancer": {"compression": "zstd"}}, {"balancer": {"time_scale": "auto"}},
                   {"balancer": {"signal": "demand"}}, {"per_vm": {"vm1": {"work": 2}}}):
        assert spec_fingerprint(parse_spec(BASE | change)) != spec_fingerprint(spec), change
