"""`make bench-gpu --dry-run`: the GPU benchmark's every step, on the CPU, in seconds.

It keeps the script that GPU time is spent on from rotting between GPU loans: a
broken import, a renamed field or a step that cannot finish fails here first.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


# A hang guard, not a speed check: a few seconds of CPU each, but imports, conversions
# and two servers stretch far past that on a loaded shared machine.
@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    ("runtime", "decoder", "variant"),
    [("torch", "nvjpeg", "torch-cpu-fp32"), ("onnxruntime", "dali", "cpu-fp32")],
    ids=["torch-nvjpeg", "onnxruntime-dali"],
)
def test_the_dry_run_writes_both_files_naming_the_device(
    model_dir: Path, tmp_path: Path, runtime: str, decoder: str, variant: str
) -> None:
    args = ["--dry-run", "--out-dir", str(tmp_path), "--model-dir", str(model_dir)]
    args += ["--runtime", runtime, "--decoder", decoder]
    proc = subprocess.run(
        [sys.executable, "-m", "bench.bench_gpu", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    inference = json.loads((tmp_path / "inference-gpu.json").read_text())
    decode = json.loads((tmp_path / "decode-gpu.json").read_text())
    for doc in (inference, decode):
        assert doc["device"] == "cpu (dry run)" and doc["dry_run"] is True
        assert doc["runtime"] == runtime and doc["complete"] is True
        assert "met" in doc["goal"]
    assert inference["variants"][variant]["raw_images_per_s_by_batch"].keys() == {"1", "8"}
    assert inference["service_images_per_s"] > 0 and inference["best"]["batch"] in (1, 8)
    # The runtime on trial against onnxruntime on the CPU: the same model, the same top-1.
    assert inference["top1_agreement_with_cpu_onnxruntime"] == {variant: 1.0}
    assert decode["decoder"].startswith("nvjpeg" if decoder == "nvjpeg" else "cpu")
    assert decode["cpu_decode_images_per_s_per_core"] > 0
    assert decode["gpu_decode_images_per_s"] > 0
    assert decode["gpu_decode_and_inference_images_per_s"] > 0
    # The stand-in decodes as the CPU path (for nvjpeg: Pillow's pixels, torch's crop):
    # the contract check itself must pass.
    assert decode["top1_agreement_with_cpu_path"] >= 0.995
