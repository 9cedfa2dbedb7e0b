"""Where a figure was measured: tools.machine and a comparison run's machine.json."""

from __future__ import annotations

import json

from tools.machine import cpu_model, describe, machine, record_machine

CPUINFO = """\
processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu avx2 avx512f

processor\t: 1
model name\t: Intel(R) Xeon(R) Platinum 8480+
"""


def test_cpu_model_reads_the_model_name(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO)
    assert cpu_model(path) == "Intel(R) Xeon(R) Platinum 8480+"


def test_cpu_model_falls_back_without_a_model_name(tmp_path, monkeypatch):
    monkeypatch.setattr("platform.processor", lambda: "")
    monkeypatch.setattr("platform.machine", lambda: "aarch64")
    path = tmp_path / "cpuinfo"
    path.write_text("processor\t: 0\nmodel name\t:\n")
    assert cpu_model(path) == "aarch64"
    assert cpu_model(tmp_path / "missing") == "aarch64"


def test_machine_facts_and_their_one_line_description():
    facts = machine()
    assert facts["cpus"] >= 1 and facts["threads"] >= 1
    assert isinstance(facts["cpu_capability"], str) and facts["cpu_capability"]
    assert facts["torch"] and facts["flwr"]
    assert describe(facts).startswith(f"{facts['cpus']} CPUs, {facts['cpu']}")
    line = describe({"cpus": 16, "cpu": "AMD EPYC", "cpu_capability": "AVX2",
                     "cuda": "NVIDIA H200"})  # fmt: skip
    assert line == "16 CPUs, AMD EPYC (AVX2), NVIDIA H200"
    assert describe({}) == "? CPUs, ?"


def test_record_machine_writes_one_start_of_this_host(tmp_path):
    record_machine(tmp_path)
    (entry,) = json.loads((tmp_path / "machine.json").read_text())
    assert entry == {"from_round": 0, **machine()}
    # A rerun replaces the record instead of appending to it.
    record_machine(tmp_path)
    assert len(json.loads((tmp_path / "machine.json").read_text())) == 1
