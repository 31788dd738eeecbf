"""The GPU-decode switch, on CPU: the downloader forwards compressed photos
(`decode: gpu`), and the inference side decodes them with the CPU stand-in
(`PillowDecoder`) for the GPU decoder. The contract: the model's answers agree
with the CPU path (downloader crops) on real photos, top-1 >= 99.5 %.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tagpipe_common.errors import ErrorCode
from tagpipe_common.messages import InferenceTask
from tagpipe_downloader.decode import Geometry, decode_image
from tagpipe_downloader.forward import decode_for_gpu
from tagpipe_inference.decoders import (
    BatchDecoder,
    DecodeFailed,
    PillowDecoder,
    decode_each,
    make_decoder,
)
from tagpipe_inference.items import Decoded, Rejected, decode
from tagpipe_inference.model import Model, load_model
from tagpipe_inference.providers import GpuUnavailable

GEOM = Geometry(256, 224, "bicubic")
MAX_PIXELS = 50_000_000
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina")


def jpeg(arr: np.ndarray, quality: int = 92, exif: Image.Exif | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=quality, exif=exif or Image.Exif())
    return buf.getvalue()


def photo(name: str) -> np.ndarray:
    from skimage import data

    loader: Callable[[], np.ndarray] = getattr(data, name)
    return loader()


def real_photos() -> list[tuple[str, bytes]]:
    """Each photo at its own size (forwarded untouched) and 4x larger, as a camera
    JPEG would be (forwarded after the DCT-draft shrink), and mirrored."""
    out = []
    for name in PHOTOS:
        arr = photo(name)
        big = np.asarray(Image.fromarray(arr).resize((arr.shape[1] * 4, arr.shape[0] * 4)))
        for tag, a in (("", arr), ("-4x", big)):
            out.append((name + tag, jpeg(a)))
            out.append((name + tag + "-mirrored", jpeg(np.ascontiguousarray(a[:, ::-1]))))
    return out


@pytest.fixture(scope="module")
def model(model_dir: Path) -> Model:
    return load_model(model_dir, intra_op_threads=1)


def test_a_small_camera_jpeg_is_forwarded_untouched() -> None:
    data = jpeg(photo("coffee"))  # 600 x 400: shorter side under 2 x 256
    d = decode_for_gpu(data, GEOM, MAX_PIXELS)
    assert d.original == data
    assert d.original_shape == (400, 600, 3)
    assert d.pixels.size == 0


def test_a_large_jpeg_is_shrunk_by_the_draft_and_made_upright() -> None:
    arr = np.asarray(Image.fromarray(photo("rocket")).resize((2560, 1708)))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    d = decode_for_gpu(jpeg(arr, exif=exif), GEOM, MAX_PIXELS)
    assert d.original is not None and d.original_shape is not None
    h, w, _ = d.original_shape
    assert h > w  # upright: the landscape file displays as portrait
    assert GEOM.resize <= min(h, w) <= 2 * GEOM.resize
    with Image.open(io.BytesIO(d.original)) as img:
        assert img.format == "JPEG" and img.size == (w, h)


def test_other_formats_take_the_cpu_path() -> None:
    buf = io.BytesIO()
    Image.fromarray(photo("chelsea")).save(buf, format="PNG")
    d = decode_for_gpu(buf.getvalue(), GEOM, MAX_PIXELS)
    assert d.original is None
    assert d.pixels.shape == (224, 224, 3)


def test_gpu_decode_agrees_with_the_cpu_path_on_real_photos(model: Model) -> None:
    photos = real_photos()
    cpu = np.stack([decode_image(b, GEOM, MAX_PIXELS).pixels for _, b in photos])
    forwarded = [decode_for_gpu(b, GEOM, MAX_PIXELS) for _, b in photos]
    assert all(f.original is not None for f in forwarded)
    shrunk = {n for (n, _), f in zip(photos, forwarded, strict=True) if f.original != _}
    assert {n for n, _ in photos if "-4x" in n} <= shrunk  # the large ones took the draft
    payloads = [f.original or b"" for f in forwarded]
    gpu = PillowDecoder(GEOM.resize, GEOM.crop).decode(payloads, [False] * len(payloads))
    top_cpu = model.predict(cpu).argmax(axis=1)
    top_gpu = model.predict(gpu).argmax(axis=1)
    agreement = float(np.mean(top_cpu == top_gpu))
    disagree = [name for (name, _), a, b in zip(photos, top_cpu, top_gpu, strict=True) if a != b]
    assert agreement >= 0.995, f"top-1 agreement {agreement:.3f}; differ: {disagree}"


def test_an_encoded_crop_is_decoded_without_resizing() -> None:
    crop = np.asarray(Image.fromarray(photo("astronaut")).resize((224, 224)))
    out = PillowDecoder(256, 224).decode([jpeg(crop, quality=100)], [True])
    assert out.shape == (1, 224, 224, 3)
    assert np.abs(out[0].astype(int) - crop.astype(int)).mean() < 3  # JPEG noise only


def test_a_corrupt_payload_fails_alone() -> None:
    good = jpeg(photo("coffee"))
    dec = PillowDecoder(256, 224)
    out = decode_each(dec, dec, [good, b"\xff\xd8\xff\xe0 not a jpeg", good], [False] * 3)
    assert isinstance(out[1], DecodeFailed)
    assert all(isinstance(o, np.ndarray) and o.shape == (224, 224, 3) for o in (out[0], out[2]))


def test_a_payload_over_the_pixel_cap_is_refused_before_decoding() -> None:
    # A 5000 x 4000 grey JPEG is a few kB: its header is read, its pixels never.
    data = jpeg(np.full((4000, 5000, 3), 128, dtype=np.uint8), quality=10)
    with pytest.raises(DecodeFailed, match="over"):
        PillowDecoder(256, 224).one(data, is_crop=False)


class Broken:
    name = "gpu"

    def __init__(self, *_: int) -> None:
        raise ImportError("No module named 'nvidia.dali'")


def test_gpu_decode_missing_falls_back_to_cpu_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING):
        dec = make_decoder("gpu", 256, 224, gpu_factory=Broken)
    assert isinstance(dec, PillowDecoder)
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "nvidia.dali" in caplog.records[0].getMessage()


def test_gpu_decode_required_and_missing_refuses() -> None:
    with pytest.raises(GpuUnavailable, match="GPU decode required"):
        make_decoder("gpu", 256, 224, require_gpu=True, gpu_factory=Broken)


def test_the_gpu_factory_is_used_when_it_starts() -> None:
    def stand_in(resize: int, crop: int, device_id: int, max_batch: int) -> BatchDecoder:
        return PillowDecoder(resize, crop)

    assert isinstance(make_decoder("gpu", 256, 224, gpu_factory=stand_in), PillowDecoder)
    assert make_decoder("cpu", 256, 224).name == "cpu"


def frame(**fields: object) -> bytes:
    base: dict[str, object] = {"item_id": "i1", "request_id": "r1", "shape": (400, 600, 3)}
    return InferenceTask(**(base | fields)).to_wire()  # type: ignore[arg-type]


def test_inference_accepts_compressed_frames_and_checks_their_shape() -> None:
    ok = decode(frame(encoding="original", media_type="image/jpeg", pixels=b"jpeg"), 224)
    assert isinstance(ok, Decoded) and ok.needs_decode
    crop = decode(frame(encoding="encoded_crop", media_type="image/jpeg", pixels=b"j"), 224)
    assert isinstance(crop, Rejected) and "crop shape" in crop.reason
    empty = decode(frame(encoding="original", media_type="image/jpeg"), 224)
    assert isinstance(empty, Rejected) and empty.code == ErrorCode.BAD_TENSOR
    raw = decode(frame(shape=(224, 224, 3), pixels=bytes(224 * 224 * 3)), 224)
    assert isinstance(raw, Decoded) and not raw.needs_decode


# --- gpu_decoder: nvjpeg (torchvision's nvJPEG, the crop in torch) ---------------------
# Here there is neither CUDA nor torchvision: nvJPEG itself is replaced by a full
# Pillow decode to the same CHW tensors (`pillow_jpeg`), and everything after it (the
# header checks, the resize and centre crop in torch, batching, the copy back) runs
# as on the GPU. `make bench-gpu` measures nvJPEG itself against Pillow.


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


SHAPES = {  # (height, width): landscape, portrait, square, smaller than 256, a strip
    "landscape": (400, 600),
    "portrait": (600, 400),
    "square": (512, 512),
    "small": (150, 200),
    "strip": (300, 1200),
}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=list(SHAPES))
def test_the_torch_crop_is_the_cpu_paths_crop(shape: tuple[int, int]) -> None:
    torch = pytest.importorskip("torch")
    from tagpipe_inference.nvjpeg import resize_crop

    arr = np.asarray(Image.fromarray(photo("astronaut")).resize(shape[::-1]))
    cpu = PillowDecoder(256, 224).one(png(arr), is_crop=False).astype(int)
    chw = torch.from_numpy(arr.copy()).permute(2, 0, 1)
    ours = resize_crop(chw, 256, 224).permute(1, 2, 0).numpy().astype(int)
    assert ours.shape == (224, 224, 3)
    diff = np.abs(cpu - ours)
    # Same box, same bicubic weights: rounding only (~0.2 levels on average). A box off
    # by one pixel either way is 2.5-10 levels on these photos.
    assert diff.mean() < 0.5 and np.percentile(diff, 99) <= 1
    assert np.abs(cpu[:, 1:] - ours[:, :-1]).mean() > 3 * diff.mean()


def nvjpeg_stand_in() -> BatchDecoder:
    pytest.importorskip("torch")
    from tagpipe_inference.nvjpeg import NvjpegDecoder, pillow_jpeg

    return NvjpegDecoder(GEOM.resize, GEOM.crop, device="cpu", jpeg=pillow_jpeg)


def test_nvjpeg_path_agrees_with_the_cpu_path_on_real_photos(model: Model) -> None:
    photos = real_photos()
    cpu = np.stack([decode_image(b, GEOM, MAX_PIXELS).pixels for _, b in photos])
    payloads = [decode_for_gpu(b, GEOM, MAX_PIXELS).original or b"" for _, b in photos]
    dec = nvjpeg_stand_in()
    gpu = dec.decode(payloads, [False] * len(payloads))
    assert dec.name == "nvjpeg" and gpu.shape == (len(photos), 224, 224, 3)
    agreement = float(np.mean(model.predict(cpu).argmax(1) == model.predict(gpu).argmax(1)))
    assert agreement >= 0.995


def test_nvjpeg_path_takes_crops_as_they_are_and_refuses_what_is_not_jpeg() -> None:
    dec = nvjpeg_stand_in()
    crop = np.asarray(Image.fromarray(photo("astronaut")).resize((224, 224)))
    out = dec.decode([jpeg(crop, quality=100), jpeg(photo("coffee"))], [True, False])
    assert out.shape == (2, 224, 224, 3)
    assert np.abs(out[0].astype(int) - crop.astype(int)).mean() < 3  # JPEG noise only
    with pytest.raises(DecodeFailed, match="JPEG only"):
        dec.decode([png(crop)], [True])
    with pytest.raises(DecodeFailed, match="expected"):
        dec.decode([jpeg(photo("coffee"))], [True])  # an "encoded crop" of the wrong size
    # A batch with a PNG and a corrupt payload: decode_each decodes each on the CPU.
    fallback = PillowDecoder(256, 224)
    each = decode_each(dec, fallback, [png(photo("coffee")), b"\xff\xd8 junk"], [False, False])
    assert isinstance(each[0], np.ndarray) and isinstance(each[1], DecodeFailed)


def test_nvjpeg_without_cuda_or_torchvision_falls_back_or_refuses(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the fallback cannot happen here")
    with caplog.at_level(logging.WARNING):
        dec = make_decoder("gpu", 256, 224, gpu_decoder="nvjpeg")
    assert isinstance(dec, PillowDecoder)
    assert "no CUDA device" in caplog.records[0].getMessage()
    with pytest.raises(GpuUnavailable, match="GPU decode required"):
        make_decoder("gpu", 256, 224, gpu_decoder="nvjpeg", require_gpu=True)


def test_the_settings_choose_the_gpu_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    from tagpipe_inference.settings import InferenceSettings

    assert InferenceSettings().gpu_decoder == "dali"
    monkeypatch.setenv("TAGPIPE_GPU_DECODER", "nvjpeg")
    assert InferenceSettings().gpu_decoder == "nvjpeg"
