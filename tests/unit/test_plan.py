"""The capacity planner's arithmetic on inputs whose answers are known by hand."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
from tagpipe_cli import gpurates, plan, rates
from tagpipe_cli.plan import PlanInputs, mixed_rate, plan_capacity, replicas_for
from tagpipe_cli.rates import Rate, StageRates


def _rates(
    thumb: float = 100.0, phone: float = 25.0, cpu: float = 100.0, t4: float = 1000.0
) -> StageRates:
    return StageRates(
        download={"thumb": Rate(thumb, "test"), "phone": Rate(phone, "test")},
        cpu_inference=Rate(cpu, "test"),
        gpu_inference=Rate(t4, "test"),
    )


def test_mixed_rate_is_time_weighted() -> None:
    # 80% at 10 ms + 20% at 40 ms = 16 ms per image -> 62.5 img/s, not the 85 of an average.
    assert mixed_rate(
        {"thumb": 100.0, "phone": 25.0}, {"thumb": 0.8, "phone": 0.2}
    ) == pytest.approx(62.5)


def test_replicas_round_up_but_not_on_float_noise() -> None:
    assert replicas_for(100.0, 50.0) == 2
    assert replicas_for(100.1, 50.0) == 3
    assert replicas_for(0.0, 50.0) == 1


def test_plan_known_inputs() -> None:
    inp = PlanInputs(
        rate=5000.0,
        mix={"thumb": 0.8, "phone": 0.2},
        rates=_rates(),
        target_util=0.5,  # provision 10,000 img/s
        gpu_node_cores=16,
        cpu_node_cores=16,
        reserved_cores=1.0,
    )
    p = plan_capacity(inp)
    assert p.provisioned_rate == pytest.approx(10_000.0)
    gpu, cpu = p.scenarios
    dl = gpu.stages[0]
    assert dl.replicas == 160  # 10,000 / 62.5
    # GPU: 10 T4 replicas on 10 nodes; each node has 16 - 1 - 2 = 13 spare cores.
    assert gpu.stages[1].replicas == 10
    assert gpu.gpu_nodes == 10
    # 130 downloaders on GPU nodes, 30 left over -> 15 per CPU node -> 2 nodes.
    assert gpu.cpu_nodes == 2
    # CPU: 100 inference replicas x 2 cores at 7 per node = 15 nodes; downloaders 160/15 = 11.
    assert cpu.stages[1].replicas == 100
    assert cpu.cpu_nodes == 15 + 11
    assert cpu.gpu_nodes == 0


def test_plan_rejects_bad_mix() -> None:
    with pytest.raises(ValueError, match="sum"):
        plan_capacity(PlanInputs(rate=1.0, mix={"thumb": 0.5}, rates=_rates()))
    with pytest.raises(ValueError, match="no rate"):
        plan_capacity(PlanInputs(rate=1.0, mix={"tiff": 1.0}, rates=_rates()))


def _args(tmp_path: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    plan.add_parser(parser.add_subparsers())
    return parser.parse_args(["plan", "--results-dir", str(tmp_path), *extra])


def test_rates_precedence_flag_then_measured_then_default(tmp_path: Path) -> None:
    (tmp_path / "inference-cpu.json").write_text(
        '{"machine": {"cores": 2}, "runs": [{"batch": 1, "images_per_s": 90.5},'
        ' {"batch": 32, "images_per_s": 120.25}]}'
    )
    resolved = rates.resolve(_args(tmp_path, "--download-rate", "thumb=200"))
    assert resolved.download["thumb"] == Rate(200.0, "flag")
    assert resolved.download["phone"].value == rates.DEFAULT_DOWNLOAD["phone"]
    assert resolved.download["phone"].source.startswith("assumed")
    assert resolved.cpu_inference.value == 120.25  # the best measured setting
    assert "measured" in resolved.cpu_inference.source


def test_cli_json_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = _args(tmp_path, "--rate", "6250", "--json", "--cpu-infer-rate", "125")
    assert args.func(args) == 0
    import json

    out = json.loads(capsys.readouterr().out)
    cpu = out["scenarios"][1]
    assert cpu["stages"][1]["replicas"] == 72  # 6250 / 0.7 / 125 = 71.4
    assert out["rate"] == 6250


def test_cli_bad_mix_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = _args(tmp_path, "--mix", "thumb")
    assert args.func(args) == 2
    assert "not class=share" in capsys.readouterr().out


def test_downloader_bench_is_read_per_core_by_size_alias(tmp_path: Path) -> None:
    (tmp_path / "downloader.json").write_text(
        '{"machine": {"cpu_cores": 2}, "throughput": {'
        '"640x480@0ms": {"images_per_s_median": 90.0, "rounds": [{"images_per_s": 150.0}]},'
        '"640x480@100ms": {"images_per_s_median": 80.0},'
        '"4032x3024@0ms": {"images_per_s_median": 20.0}}}'
    )
    resolved = rates.resolve(_args(tmp_path))
    # The median of the best setting, not the luckiest round; divided by the bench's cores.
    assert resolved.download["thumb"].value == 45.0
    assert resolved.download["phone"].value == 10.0


def _gpu_file(tmp_path: Path, name: str, **doc: object) -> None:
    (tmp_path / name).write_text(json.dumps({"machine": {"cores": 16}, **doc}))


def test_a_gpu_measurement_is_scaled_to_a_t4_with_the_factor_stated(tmp_path: Path) -> None:
    _gpu_file(tmp_path, "inference-gpu.json", device="NVIDIA H200", service_images_per_s=20000.0)
    t4 = rates.resolve(_args(tmp_path)).gpu_inference
    factor = min(65 / 989, 320 / 4800)  # the T4 held back by what it lacks most
    assert t4.value == pytest.approx(20000 * factor)
    assert t4.source.startswith("scaled from NVIDIA H200 20000 img/s")
    assert f"x {factor:.3f}" in t4.source


def test_the_runtime_that_measured_it_is_named(tmp_path: Path) -> None:
    doc = {"device": "NVIDIA H100 80GB HBM3", "runtime": "torch", "service_images_per_s": 9e3}
    _gpu_file(tmp_path, "decode-gpu.json", gpu_decode_and_inference_images_per_s=5e3, **doc)
    _gpu_file(tmp_path, "inference-gpu.json", **doc)
    resolved = rates.resolve(_args(tmp_path))
    assert "torch runtime" in resolved.gpu_inference.source
    assert resolved.gpu_inference.source.startswith("scaled from NVIDIA H100 80GB HBM3 9000 img/s")
    assert resolved.gpu_decode is not None and "torch runtime" in resolved.gpu_decode.source


def test_a_t4_measurement_is_used_as_it_is(tmp_path: Path) -> None:
    _gpu_file(tmp_path, "inference-gpu.json", device="Tesla T4", service_images_per_s=2100.0)
    t4 = rates.resolve(_args(tmp_path)).gpu_inference
    assert t4.value == 2100.0 and t4.source.startswith("measured")


@pytest.mark.parametrize(
    "doc",
    [
        {"device": "cpu (dry run)", "dry_run": True, "service_images_per_s": 45.0},
        {"device": "Mystery Accelerator X9", "service_images_per_s": 9000.0},  # no known factor
        {"device": "NVIDIA H200"},  # no rate in it
    ],
    ids=["dry-run", "unknown-gpu", "no-rate"],
)
def test_no_usable_gpu_measurement_means_assumed(tmp_path: Path, doc: dict[str, Any]) -> None:
    _gpu_file(tmp_path, "inference-gpu.json", **doc)
    t4 = rates.resolve(_args(tmp_path)).gpu_inference
    assert t4 == Rate(rates.DEFAULT_T4_INFER, "assumed, public figures")
    assert rates.resolve(_args(tmp_path, "--t4-infer-rate", "1500")).gpu_inference == Rate(
        1500.0, "flag"
    )


@pytest.mark.parametrize(
    ("device", "model"),
    [
        ("Tesla T4", "T4"),
        ("NVIDIA L4", "L4"),
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("NVIDIA A10", "A10"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA GeForce RTX 4090", None),
    ],
)
def test_gpu_names_are_matched_by_whole_word(device: str, model: str | None) -> None:
    assert gpurates.gpu_model(device) == model


def test_the_table_says_which_rates_are_assumed_and_notes_gpu_decode(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _gpu_file(
        tmp_path,
        "decode-gpu.json",
        device="Tesla T4",
        gpu_decode_and_inference_images_per_s=1800.0,
    )
    args = _args(tmp_path, "--rate", "1000")
    assert args.func(args) == 0
    out = capsys.readouterr().out
    t4_row = next(line for line in out.splitlines() if line.startswith("inference (T4 GPU)"))
    assert t4_row.endswith("assumed")  # no inference-gpu.json in tmp_path
    assert "decode: gpu measured at 1,800 img/s per T4" in out
    assert "decode+inference/t4 (decode: gpu): 1800 img/s (measured" in out
