"""Bytes and top-1 agreement of the inference hop's encodings, on real photographs.

    python -m bench.hop_encoding            (make bench-hop)

The photographs scikit-image ships (colour, and grey ones as RGB), each cut
into windows (the whole photo, and seeded random windows of 35-100 % of its
shorter side at any position and aspect 3:4 to 4:3) and each window also
mirrored: hundreds of distinct crops of real scenes. Every window becomes the
model's crop exactly as the downloader makes it (`resize_crop`, which
resamples only the crop's columns; `resample_against_full_resize` holds it to
the textbook full resize then crop), and that raw crop is the reference.
Each candidate encoding is then what the service does: the downloader's
`encode_crop`, the inference tier's decoder (`PillowDecoder`, the CPU
decoder; the GPU one is held to it by tests/unit/test_gpu_decode.py), and
the model's top-1 on the decoded crop against the raw crop's.

Writes bench/results/hop-encoding.json: per encoding the median/p90/max bytes,
the top-1 agreement (and the crops that disagree), the mean absolute pixel
error, and the encode and decode CPU ms per crop on this machine; how near-tied
the set is (the agreement that +-1 grey level of noise alone leaves); and, for
the downloader's settings (raw, jpeg, webp-lossless), the CPU per frame of the
whole hop through a real nats-server: encode, publish, store, fetch, decode, ack.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import platform
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tagpipe_common import eventloop
from tagpipe_common.manifest import centre_crop
from tagpipe_downloader.decode import Geometry, decode_image, resize_crop
from tagpipe_downloader.forward import forward_small
from tagpipe_downloader.hop import CODECS, Codec, HopEncoding, encode_crop, hop_payload
from tagpipe_inference.decoders import PillowDecoder
from tagpipe_inference.model import Model, load_model

ROOT = Path(__file__).resolve().parent.parent
COLOUR = (
    "astronaut",
    "chelsea",
    "coffee",
    "hubble_deep_field",
    "immunohistochemistry",
    "stereo_motorcycle",  # its left and right views
    "retina",
    "rocket",
)
GREY = ("camera", "moon", "coins", "grass", "gravel", "brick")
# The candidates: the codecs the downloader offers, and the settings around them.
CANDIDATES: dict[str, Codec] = {
    "jpeg q95 4:4:4 (hop: jpeg)": CODECS["jpeg"],
    "jpeg q97 4:4:4": Codec("image/jpeg", "JPEG", {"quality": 97, "subsampling": 0}),
    "jpeg q90 4:4:4": Codec("image/jpeg", "JPEG", {"quality": 90, "subsampling": 0}),
    "jpeg q95 4:2:0": Codec("image/jpeg", "JPEG", {"quality": 95, "subsampling": 2}),
    "jpeg q90 4:2:0": Codec("image/jpeg", "JPEG", {"quality": 90, "subsampling": 2}),
    "webp q95": Codec("image/webp", "WEBP", {"quality": 95, "method": 0}),
    "avif q95 4:4:4": Codec(
        "image/avif", "AVIF", {"quality": 95, "subsampling": "4:4:4", "speed": 10}
    ),
    "webp lossless (hop: webp-lossless)": CODECS["webp-lossless"],
    "png (lossless, level 1)": Codec("image/png", "PNG", {"compress_level": 1}),
}


def photos() -> dict[str, np.ndarray]:
    from skimage import data

    out: dict[str, np.ndarray] = {}
    for name in COLOUR:
        got = getattr(data, name)()
        if isinstance(got, tuple):  # stereo_motorcycle: (left, right, disparity)
            out[f"{name}_left"], out[f"{name}_right"] = got[0], got[1]
        else:
            out[name] = got
    for name in GREY:
        grey = np.asarray(getattr(data, name)())
        out[name] = np.repeat(grey[:, :, None], 3, axis=2)
    return {k: np.ascontiguousarray(v[:, :, :3].astype(np.uint8)) for k, v in out.items()}


def windows(img: np.ndarray, n: int, rng: random.Random) -> list[np.ndarray]:
    """The whole photo and `n - 1` random windows, each also mirrored."""
    h, w = img.shape[:2]
    out = [img]
    for _ in range(n - 1):
        side = rng.uniform(0.35, 1.0) * min(h, w)
        aspect = rng.uniform(0.75, 4 / 3)
        ww, wh = min(w, int(side * aspect)), min(h, int(side))
        x, y = rng.randint(0, w - ww), rng.randint(0, h - wh)
        out.append(img[y : y + wh, x : x + ww])
    return [np.ascontiguousarray(v) for a in out for v in (a, a[:, ::-1])]


def top1(model: Model, crops: np.ndarray) -> np.ndarray:
    return np.concatenate(
        [model.predict(crops[i : i + 16]).argmax(axis=1) for i in range(0, len(crops), 16)]
    )


def sensitivity(model: Model, raw: np.ndarray) -> dict[str, Any]:
    """How near-tied the set is: the raw crops' top-1 probability and margin, and
    the agreement left after adding uniform noise of +-1 grey level (no codec)."""
    probs = np.concatenate([model.predict(raw[i : i + 16]) for i in range(0, len(raw), 16)])
    ranked = np.sort(probs, axis=1)
    noise = np.random.default_rng(13).integers(-1, 2, raw.shape)
    noisy = np.clip(raw.astype(int) + noise, 0, 255).astype(np.uint8)
    return {
        "top1_probability_median": round(float(np.median(ranked[:, -1])), 3),
        "top1_margin_median": round(float(np.median(ranked[:, -1] - ranked[:, -2])), 3),
        "share_with_margin_below_0.02": round(
            float(np.mean(ranked[:, -1] - ranked[:, -2] < 0.02)), 3
        ),
        "top1_agreement_with_noise_pm1": round(
            float(np.mean(top1(model, noisy) == probs.argmax(1))), 4
        ),
    }


def against_full_resize(
    model: Model, names: list[str], wins: list[np.ndarray], raw: np.ndarray, geom: Geometry
) -> dict[str, Any]:
    """The crops as resampled (only the crop's columns, `resample_plan`) against the
    textbook full resize then centre crop: differing values, top-1, CPU each."""
    imgs = [Image.fromarray(w) for w in wins]

    def textbook(img: Image.Image) -> np.ndarray:
        size, box = centre_crop(img.width, img.height, geom.resize, geom.crop)
        return np.asarray(img.resize(size, Image.Resampling.BICUBIC).crop(box))

    t0 = time.process_time()
    full = np.stack([textbook(i) for i in imgs])
    full_ms = (time.process_time() - t0) * 1000 / len(imgs)
    t0 = time.process_time()
    for i in imgs:
        resize_crop(i, geom)
    box_ms = (time.process_time() - t0) * 1000 / len(imgs)
    diff = np.abs(full.astype(int) - raw.astype(int))
    same = top1(model, full) == top1(model, raw)
    return {
        "crops": len(raw),
        "values_differing": round(float(np.mean(diff > 0)), 6),
        "max_abs_difference": int(diff.max()),
        "top1_agreement": round(float(np.mean(same)), 4),
        "disagree": [n for n, ok in zip(names, same, strict=True) if not ok],
        "cpu_ms": {"full_resize_then_crop": round(full_ms, 3), "crop_box_only": round(box_ms, 3)},
    }


def measure(model: Model, names: list[str], raw: np.ndarray, codec: Codec) -> dict[str, Any]:
    decoder = PillowDecoder(256, raw.shape[1])
    t0 = time.process_time()
    payloads = [encode_crop(c, codec) for c in raw]
    t1 = time.process_time()
    decoded = np.stack([decoder.one(p, True) for p in payloads])
    t2 = time.process_time()
    agree = top1(model, decoded) == top1(model, raw)
    sizes = np.array([len(p) for p in payloads])
    whole = np.array([n.split("#")[1].split("-")[0] == "0" for n in names])  # uncut
    return {
        "media_type": codec.media_type,
        "options": codec.options,
        "bytes_median": int(np.median(sizes)),
        "bytes_p90": int(np.percentile(sizes, 90)),
        "bytes_max": int(sizes.max()),
        "top1_agreement": round(float(agree.mean()), 4),
        "top1_agreement_whole_photos": round(float(agree[whole].mean()), 4),
        "disagree": [n for n, a in zip(names, agree, strict=True) if not a],
        "mean_abs_pixel_error": round(float(np.abs(decoded.astype(int) - raw).mean()), 3),
        "encode_cpu_ms": round((t1 - t0) * 1000 / len(raw), 3),
        "decode_cpu_ms": round((t2 - t1) * 1000 / len(raw), 3),
    }


def measure_original(
    model: Model, names: list[str], wins: list[np.ndarray], geom: Geometry
) -> dict[str, Any]:
    """`hop_encoding: original`. Each window saved as the JPEG a camera or web page
    would serve (quality 90, Pillow's default 4:2:0): that file is the input, and
    its reference is the raw crop the downloader makes of it (`decode_image`).
    The hop carries the file where it is small and the raw crop otherwise
    (`forward_small`); inference decodes a forwarded file (`PillowDecoder`)."""
    decoder = PillowDecoder(geom.resize, geom.crop)
    files = []
    for win in wins:
        buf = io.BytesIO()
        Image.fromarray(win).save(buf, format="JPEG", quality=90)
        files.append(buf.getvalue())
    t0 = time.process_time()
    frames = [forward_small(f, geom, 50_000_000) for f in files]
    t1 = time.process_time()
    got = np.stack([decoder.one(d.original, False) if d.original else d.pixels for d in frames])
    t2 = time.process_time()
    ref = np.stack([decode_image(f, geom, 50_000_000).pixels for f in files])
    agree = top1(model, got) == top1(model, ref)
    sizes = np.array([len(d.frame()["pixels"]) for d in frames])
    forwarded = np.array([d.original is not None for d in frames])
    whole = np.array([n.split("#")[1].split("-")[0] == "0" for n in names])  # uncut
    return {
        "input": "each window as a quality-90 JPEG file",
        "input_bytes_median": int(np.median([len(f) for f in files])),
        "forwarded_share": round(float(forwarded.mean()), 4),
        "bytes_median": int(np.median(sizes)),
        "bytes_p90": int(np.percentile(sizes, 90)),
        "bytes_max": int(sizes.max()),
        "top1_agreement": round(float(agree.mean()), 4),
        "top1_agreement_whole_photos": round(float(agree[whole].mean()), 4),
        "pixel_exact_share": round(
            float(np.mean([np.array_equal(a, b) for a, b in zip(got, ref, strict=True)])), 4
        ),
        "disagree": [n for n, a in zip(names, agree, strict=True) if not a],
        "downloader_cpu_ms": round((t1 - t0) * 1000 / len(files), 3),
        "inference_decode_cpu_ms": round((t2 - t1) * 1000 / len(files), 3),
    }


async def _through_jetstream(crops: np.ndarray, encoding: HopEncoding, n: int) -> dict[str, Any]:
    """CPU per frame to cross a real JetStream hop (tagpipe's file-stored INFER
    stream, one nats-server): encode and publish, fetch in batches of 8, decode
    and ack, in this process and in nats-server."""
    import tempfile

    import nats
    import psutil  # type: ignore[import-untyped]
    from tagpipe_cli.stack import nats_server
    from tagpipe_common.messages import InferenceTask
    from tagpipe_common.streams import StreamPolicy, ensure_streams
    from tagpipe_common.subjects import Lane, Stage, stage_names

    with tempfile.TemporaryDirectory() as tmp:
        srv = nats_server(Path(tmp) / "nats")
        srv.start()
        try:
            assert srv.proc is not None
            server, me = psutil.Process(srv.proc.pid), psutil.Process()
            nc = await nats.connect(srv.url)
            js = nc.jetstream()
            await ensure_streams(js, StreamPolicy())
            names = stage_names(Stage.INFER, "tagpipe")
            sub = await js.pull_subscribe_bind(
                durable=names.consumer(Lane.BULK), stream=names.stream
            )
            decoder = PillowDecoder(256, crops.shape[1])
            cpu0 = (sum(me.cpu_times()[:2]), sum(server.cpu_times()[:2]))
            inflight = asyncio.Semaphore(64)

            async def publish(i: int) -> None:
                payload, media_type = hop_payload(crops[i % len(crops)], encoding)
                task = InferenceTask(
                    item_id=f"i{i}",
                    job_id="j",
                    shape=crops.shape[1:],
                    encoding="raw" if media_type is None else "encoded_crop",
                    media_type=media_type,
                    pixels=payload,
                )
                async with inflight:
                    await js.publish(names.subject(Lane.BULK), task.to_wire(), timeout=30)

            async def consume() -> None:
                done = 0
                while done < n:
                    with contextlib.suppress(nats.errors.TimeoutError):
                        for m in await sub.fetch(8, timeout=1):
                            task = InferenceTask.from_wire(m.data)
                            if task.encoding != "raw":
                                decoder.one(task.pixels, True)
                            await m.ack()
                            done += 1

            consumer = asyncio.create_task(consume())
            await asyncio.gather(*(publish(i) for i in range(n)))
            await consumer
            clients = sum(me.cpu_times()[:2]) - cpu0[0]
            nats_cpu = sum(server.cpu_times()[:2]) - cpu0[1]
            await nc.close()
        finally:
            srv.stop()
    return {
        "frames": n,
        "clients_cpu_ms": round(clients * 1000 / n, 3),
        "nats_server_cpu_ms": round(nats_cpu * 1000 / n, 3),
        "total_cpu_ms": round((clients + nats_cpu) * 1000 / n, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--windows", type=int, default=16, help="per photo, before mirroring")
    ap.add_argument("--frames", type=int, default=2000, help="frames through JetStream per hop")
    ap.add_argument("--model-dir", type=Path, default=ROOT / "models" / "efficientnet-lite0")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "hop-encoding.json")
    args = ap.parse_args()
    geom = Geometry.from_manifest(args.model_dir)
    model = load_model(args.model_dir, intra_op_threads=1)
    rng = random.Random(13)
    names, crops, wins = [], [], []
    for name, img in photos().items():
        for i, win in enumerate(windows(img, args.windows, rng)):
            names.append(f"{name}#{i // 2}{'-mirrored' if i % 2 else ''}")
            crops.append(resize_crop(Image.fromarray(win), geom))
            wins.append(win)
    raw = np.stack(crops)
    results = {label: measure(model, names, raw, codec) for label, codec in CANDIDATES.items()}
    results["small JPEGs as downloaded (hop: original)"] = measure_original(
        model, names, wins, geom
    )
    hops: tuple[HopEncoding, ...] = ("raw", "jpeg", "webp-lossless")
    through = {enc: asyncio.run(_through_jetstream(raw, enc, args.frames)) for enc in hops}
    # The same raw hop on the services' event loop (tagpipe_common.eventloop): uvloop.
    through["raw, uvloop"] = eventloop.run(_through_jetstream(raw, "raw", args.frames))
    doc = {
        "benchmark": "hop-encoding",
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version(),
        },
        "photos": {"colour": list(COLOUR), "grey_as_rgb": list(GREY)},
        "crops": len(raw),
        "raw_bytes": int(raw[0].nbytes),
        "reference": sensitivity(model, raw),
        # The reference crops resample only the crop's box; against the full resize:
        "resample_against_full_resize": against_full_resize(model, names, wins, raw, geom),
        "encodings": results,
        # CPU per frame for the whole hop, codec included (the settings' encodings),
        # on asyncio's event loop, and the raw hop on uvloop too.
        "through_jetstream": through,
        "finished_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"{len(raw)} crops; raw crops: {doc['reference']}")
    for enc, r in through.items():
        print(f"through JetStream, {enc}: {r}")
    for label, r in results.items():
        if "input" in r:
            print(f"{label}: {r}")
            continue
        print(
            f"{label:26s} median {r['bytes_median']:7,d} B  p90 {r['bytes_p90']:7,d}  "
            f"top-1 {r['top1_agreement']:.4f} ({len(r['disagree'])} differ)  "
            f"err {r['mean_abs_pixel_error']:.2f}  enc {r['encode_cpu_ms']:.2f} ms  "
            f"dec {r['decode_cpu_ms']:.2f} ms"
        )


if __name__ == "__main__":
    main()
