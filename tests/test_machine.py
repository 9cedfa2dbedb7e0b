"""Where a figure was measured: common.machine and the run's machine.json."""

from __future__ import annotations

import json

from common.machine import cpu_model, describe, machine
from server_app.results import RunResults

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


def starts(path) -> list[int]:
    return [s["from_round"] for s in json.loads((path / "machine.json").read_text())]


def test_machine_json_has_one_entry_per_start(tmp_path):
    results = RunResults(tmp_path)
    results.record_machine(from_round=0)
    results.record_machine(from_round=10)
    assert starts(tmp_path) == [0, 10]
    entry = json.loads((tmp_path / "machine.json").read_text())[1]
    assert entry == {"from_round": 10, **machine()}
    # Resuming from an earlier checkpoint recomputes rounds 6-10: that start goes.
    results.record_machine(from_round=5)
    assert starts(tmp_path) == [0, 5]


def test_an_unreadable_machine_json_is_replaced(tmp_path):
    results = RunResults(tmp_path)
    for junk in ("{not json", '{"from_round": 0}', '[1, "x"]'):
        (tmp_path / "machine.json").write_text(junk)
        results.record_machine(from_round=3)
        assert starts(tmp_path) == [3], junk
    # Entries that are not objects are dropped, the others kept.
    (tmp_path / "machine.json").write_text('[1, {"from_round": 0}]')
    results.record_machine(from_round=3)
    assert starts(tmp_path) == [0, 3]
