"""Measure the speed that matters on this device, at the reference configuration.

    python bench.py                        # a table
    python bench.py --json                 # the table, then one JSON object with every figure
    python bench.py --samples 2048 --amp off --no-demo   # (b) at the reference's fp32

(a) trunk feature extraction, images/s; (b) one Model B training epoch on cached
features and one through the frozen trunk, same data, and their ratio cache_speedup;
the cached epoch again with random batches instead of batches grouped by text length
(data.BatchOrder), with the real and padded tokens of each and grouping_speedup; the
share of a cached step spent in the text encoder (its forward and backward alone);
then evaluation throughput on the cache; on CUDA also the cached step split into
gathering the batch and computing, and the minutes 100 epochs of 30k pairs would take;
(c) demo: one prediction after the checkpoint is loaded, and the whole demo process;
(d) the recognizer (recognizer.py) on N photos, in pairs per second: one `demo.py --pairs`
process over all of them (its start-up included, and after it: the rate its last line
gives), separate `demo.py --image --text` processes (K of them timed: their mean is a
process's time), and a Python loop of single `predict` calls on a recognizer loaded once;
then --pairs's speed-up over the processes (whole processes both) and over the loop (after
start-up both);
(e) the recognizer on a video (`predict_video`, with the checkpoint of (d) and a subtitle line
every 2 seconds): sampled frames per second on a 1280x720, 25 fps video of --video-seconds
with one synthetic face and with four, each face moving a few pixels per frame; it samples 5
frames per second, as demo.py --video does, and still decodes the 4 frames between two samples.
Then the mean number of faces found per frame (1 and 4 when the detector finds them all), and
where a sampled frame of the one-face video spends its time: decoding, face detection, and the
model (the crops and the subtitles' tokens included).
Inputs are random tensors of the real shapes (75x75 faces, and sentences as long as the
Emotions corpus's tweets: median 19 tokens, 90th percentile 39, at most 64): speed does not
depend on what the pixels or tokens are, and the bench needs no data set. (d) reads
synthetic faces (prep/synthetic.py), since face detection's time does depend on the photo:
75 px crops as the data sets hold them, or with --photo-side S each face, enlarged to
twice its size, in an S px frame; --api-model reads them at --api-input-size. (e) draws the
same faces into its videos, at 180 px.
The trunk is random (no download): the same FLOPs as the pretrained one.

    python bench.py --photos 200 --processes 3 --api-model b --api-input-size 64 --json
    python bench.py --video-seconds 10 --json   # (e) on 10 s videos (250 frames, 50 sampled)
"""
import itertools
import json
import math
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from models import ModelConfig, build_model, load_checkpoint, save_checkpoint
from data import Batches, cached_features, encode_texts
from metrics import evaluate
from images import detect_faces, open_video, to_gray, video_frames
from recognizer import EmotionRecognizer, predict
from runtime import DataError, autocast, pick_device, positive_int, script_parser
from prep.synthetic import face_image
from train import Run, make_optimizer, train_epoch

ROOT = Path(__file__).parent


def fake_split(n, image_size, max_len, vocab_size, classes, seed):
    """n random pairs with the shapes of the real data. Text lengths are log-normal with the
    Emotions corpus's median (19 tokens) and 90th percentile (39), cut to 3..max_len."""
    g = torch.Generator().manual_seed(seed)
    normal = torch.randn(n, generator=g)
    lengths = (19 * torch.exp(normal * math.log(39 / 19) / 1.2816)).round().long().clamp(3, max_len)
    input_ids = torch.randint(2, vocab_size, (n, max_len), generator=g)
    input_ids[torch.arange(max_len)[None] >= lengths[:, None]] = 0  # right padding
    return {"images": torch.randint(0, 256, (n, image_size, image_size), dtype=torch.uint8, generator=g),
            "labels": torch.randint(0, classes, (n,), generator=g),
            "input_ids": input_ids.int(), "lengths": lengths.short()}


def tiny_tokenizer(vocab_size):
    """A real WordPiece tokenizer, so the demo's text path is the one it runs in use."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words = [f"word{i}" for i in range(vocab_size)]
    tokenizer.train_from_iterator([" ".join(words[i:i + 10]) for i in range(0, len(words), 10)],
                                  trainers.WordPieceTrainer(vocab_size=vocab_size, show_progress=False,
                                                            special_tokens=["[PAD]", "[UNK]"]))
    return tokenizer


def timed(device, work):
    """Seconds `work()` takes, the GPU's queue included."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def time_epoch(model, batches, device, mixed_precision, amp_dtype):
    """One training epoch as train.py runs it: its optimizer, its GradScaler, its step."""
    # train.py's defaults: lr 1e-4, weight decay 0.01
    optimizer = make_optimizer(model, lr=1e-4, device=device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    run = Run(model, model, optimizer, scaler, mixed_precision, batches, None)
    return timed(device, lambda: train_epoch(run, show_progress=False))


def bench(args):
    device = pick_device(args.device)
    mixed_precision, amp_dtype = autocast(device, args.amp)
    torch.manual_seed(0)
    # the reference's Model B: input 224, 3 layers, 4 heads
    cfg = ModelConfig(arch="b", vocab_size=5000, pretrained=False)
    model = build_model(cfg).to(device)
    split = fake_split(args.samples, 75, cfg.max_len, cfg.vocab_size, cfg.num_classes, seed=0)
    dtype = str(amp_dtype or torch.float32).replace("torch.", "")
    figures = {"device": str(device), "dtype": dtype,
               "batch_size": args.batch_size, "samples": args.samples,
               "torch": torch.__version__, "threads": torch.get_num_threads()}

    with tempfile.TemporaryDirectory() as tmp:
        # (a) + cache: every image and its mirror through the trunk, as train.py does
        t0 = time.perf_counter()
        features, _ = cached_features(model, split["images"], tmp, device, flips=True, amp=args.amp,
                                      batch_size=args.batch_size, show_progress=False)
        seconds = time.perf_counter() - t0
        figures["feature_images_per_s"] = 2 * args.samples / seconds
        figures["cache_build_s"] = seconds

        # (b) the same epoch (same data, flips, batch size) from the cache and from images
        cached = Batches(split, args.batch_size, device, features=features, shuffle=True, flip=True)
        uncached = Batches(split, args.batch_size, device, shuffle=True, flip=True)
        # warm-up: one batch through the same step
        first_batch = {k: v[:args.batch_size] for k, v in split.items()}
        time_epoch(model, Batches(first_batch, args.batch_size, device), device, mixed_precision, amp_dtype)
        figures["epoch_cached_s"] = time_epoch(model, cached, device, mixed_precision, amp_dtype)
        figures["epoch_uncached_s"] = time_epoch(model, uncached, device, mixed_precision, amp_dtype)
        figures["cache_speedup"] = figures["epoch_uncached_s"] / figures["epoch_cached_s"]
        figures["train_samples_per_s_cached"] = args.samples / figures["epoch_cached_s"]
        figures.update(bench_grouping(model, split, features, args.batch_size, device, mixed_precision,
                                      amp_dtype, figures["epoch_cached_s"]))
        if device.type == "cuda":
            # where a cached step's time goes, and what the real run costs
            gather_s = timed(device, lambda: sum(1 for _ in cached))  # the batches alone, no step
            figures["features_on_device"] = cached.on_device
            figures["step_ms"] = 1000 * figures["epoch_cached_s"] / len(cached)
            figures["step_gather_ms"] = 1000 * gather_s / len(cached)
            figures["step_compute_ms"] = figures["step_ms"] - figures["step_gather_ms"]
            # 100 epochs of 30k pairs at this batch size from the measured step (the cache build aside)
            steps_100_epochs = 100 * math.ceil(30000 / args.batch_size)
            figures["estimate_100_epochs_30k_min"] = steps_100_epochs * figures["step_ms"] / 60000
        # evaluation as evaluate.py runs it: cached, no flips, batch 256
        t0 = time.perf_counter()
        evaluate(model, Batches(split, 256, device, features=features), mixed_precision)
        figures["eval_pairs_per_s_cached"] = args.samples / (time.perf_counter() - t0)
        if args.no_demo:
            return figures

        # (c) the demo: a saved checkpoint, loaded back, one image + one sentence
        tokenizer = tiny_tokenizer(cfg.vocab_size)
        path = Path(tmp) / "bench.pt"
        save_checkpoint(path, model, tokenizer_json=tokenizer.to_str(),
                        classes=[f"class{i}" for i in range(cfg.num_classes)], image_size=75,
                        metrics={})
        loaded, tokenizer, info = load_checkpoint(path, device)
        image = split["images"][:1]
        text = ["word1 word2 word3 word4 word5 word6 word7"]
        latencies = []
        for _ in range(args.repeats + 3):
            t0 = time.perf_counter()
            predict(loaded, image, *encode_texts(tokenizer, text, cfg.max_len), device,
                    temperature=info["temperature"])
            latencies.append(time.perf_counter() - t0)
        figures["demo_latency_ms"] = 1000 * statistics.median(latencies[3:])  # after warm-up
        from PIL import Image
        Image.fromarray(split["images"][0].numpy()).save(Path(tmp) / "face.png")
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "demo.py", "--image", str(Path(tmp) / "face.png"),
                        "--text", text[0], "--checkpoint", str(path), "--device", str(device)],
                       check=True, capture_output=True, cwd=ROOT)
        figures["demo_process_s"] = time.perf_counter() - t0
        checkpoint = save_api_checkpoint(args, Path(tmp), tokenizer)
        figures.update(bench_api(args, device, Path(tmp), checkpoint))
        figures.update(bench_video(args.video_seconds, device, Path(tmp), checkpoint))
    return figures


def padded_tokens(batches):
    """(real, padded) text tokens of one pass over `batches`."""
    real = padded = 0
    for batch in batches:
        real += int(batch["lengths"].sum())
        padded += batch["input_ids"].numel()
    return real, padded


def bench_grouping(model, split, features, batch_size, device, mixed_precision, amp_dtype, grouped_s):
    """(b): the cached epoch with random batches against grouped ones (`grouped_s`, timed already),
    their tokens, and the share of a grouped cached epoch spent in the text encoder."""
    grouped = Batches(split, batch_size, device, features=features, shuffle=True, flip=True)
    random = Batches(split, batch_size, device, features=features, shuffle=True, flip=True, group_by_length=False)
    figures = {}
    figures["tokens_real_per_epoch"], figures["tokens_padded_grouped"] = padded_tokens(grouped)
    _, figures["tokens_padded_random"] = padded_tokens(random)
    figures["epoch_cached_random_s"] = time_epoch(model, random, device, mixed_precision, amp_dtype)
    figures["grouping_speedup"] = figures["epoch_cached_random_s"] / grouped_s
    # the text encoder's forward and backward, on the same grouped batches as a training step
    model.train()

    def encoder_passes():
        for batch in grouped:
            ids = batch["input_ids"]
            pad = torch.arange(ids.shape[1], device=ids.device) >= batch["lengths"].clamp(min=1).unsqueeze(1)
            with mixed_precision:
                out = model.text_encoder(ids, pad)
            out.float().sum().backward()
    figures["text_encoder_share"] = timed(device, encoder_passes) / grouped_s
    model.zero_grad(set_to_none=True)
    return figures


def enlarged_face(seed, class_index, side):
    """A synthetic face (75 px) enlarged to side x side, as a face in a photo or a video is larger."""
    from PIL import Image
    return np.array(Image.fromarray(face_image(seed, class_index)).resize((side, side), Image.Resampling.BILINEAR))


def sentence(rng):
    """8 to 32 words of the tiny tokenizer's vocabulary."""
    return " ".join(f"word{w}" for w in rng.integers(0, 1000, rng.integers(8, 33)))


def write_photos(folder, count, side, seed=0):
    """`count` synthetic faces as PNGs, each with a sentence of 8 to 32 words -> [(path, text)].
    side 0: the 75 px crop; else the face at 150 px in a side x side frame of its edge pixels."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    folder.mkdir()
    pairs = []
    for i in range(count):
        if side:
            face = enlarged_face(seed + i, i % 7, 150)
            top, left = rng.integers(0, side - 150, 2)
            face = np.pad(face, ((top, side - 150 - top), (left, side - 150 - left)), mode="edge")
        else:
            face = face_image(seed + i, i % 7)
        Image.fromarray(face).save(folder / f"{i:04d}.png")
        pairs.append((folder / f"{i:04d}.png", sentence(rng)))
    return pairs


def save_api_checkpoint(args, tmp, tokenizer):
    """The random-weight checkpoint that (d) and (e) load: --api-model at --api-input-size -> its path."""
    torch.manual_seed(0)
    cfg = ModelConfig(arch=args.api_model, vocab_size=tokenizer.get_vocab_size(), pretrained=False,
                      input_size=args.api_input_size)
    path = tmp / "api.pt"
    save_checkpoint(path, build_model(cfg), tokenizer_json=tokenizer.to_str(),
                    classes=[f"class{i}" for i in range(cfg.num_classes)], image_size=75, metrics={})
    return path


def bench_api(args, device, tmp, path):
    """(d): pairs/s of demo.py --pairs, of one demo.py process per pair, and of single predict calls,
    with the checkpoint at `path`."""
    pairs = write_photos(tmp / "photos", args.photos, args.photo_side)
    listing = tmp / "pairs.csv"
    listing.write_text("image,text\n" + "".join(f"photos/{image.name},{text}\n" for image, text in pairs))
    demo = [sys.executable, "demo.py", "--checkpoint", str(path), "--device", str(device)]
    figures = {"api_model": args.api_model, "api_photos": args.photos, "api_photo_side": args.photo_side or 75,
               "api_input_size": args.api_input_size}

    # one process over every photo, as a user runs it: start-up included, and after it (the
    # rate its closing line gives, from its first pair read to its last row written)
    t0 = time.perf_counter()
    done = subprocess.run([*demo, "--pairs", str(listing), "--out", str(tmp / "predictions.csv")],
                          check=True, capture_output=True, cwd=ROOT, text=True)
    figures["pairs_per_s_batch_process"] = args.photos / (time.perf_counter() - t0)
    figures["pairs_per_s_batch"] = float(re.search(r"([0-9.]+) pairs/s$", done.stdout.strip()).group(1))
    # one process per photo: K of them, each a whole demo.py run
    seconds = []
    for image, text in pairs[:args.processes]:
        t0 = time.perf_counter()
        subprocess.run([*demo, "--image", str(image), "--text", text], check=True, capture_output=True, cwd=ROOT)
        seconds.append(time.perf_counter() - t0)
    figures["process_s"] = statistics.mean(seconds)
    figures["pairs_per_s_processes"] = 1 / figures["process_s"]
    # a Python loop of single calls, the recognizer loaded once (and warmed up on one pair)
    recognizer = EmotionRecognizer.load(path, device)
    recognizer.predict(*pairs[0])
    t0 = time.perf_counter()
    for image, text in pairs:
        recognizer.predict(image, text)
    figures["pairs_per_s_predict_loop"] = args.photos / (time.perf_counter() - t0)
    # the same batches in process, without the start-up
    t0 = time.perf_counter()
    recognizer.predict_many(pairs)
    figures["pairs_per_s_predict_many"] = args.photos / (time.perf_counter() - t0)
    figures["batch_speedup_over_processes"] = figures["pairs_per_s_batch_process"] / figures["pairs_per_s_processes"]
    figures["batch_speedup_over_predict_loop"] = figures["pairs_per_s_batch"] / figures["pairs_per_s_predict_loop"]
    return figures


# (e)'s videos: 1280x720 at 25 frames per second, sampled at predict_video's default of 5
VIDEO_SIZE = (1280, 720)
VIDEO_RATE = 25
VIDEO_FPS = 5
VIDEO_FACE = 180
# the centres of one face, and of four in a 2 x 2 grid
FACE_PLACES = {1: [(640, 360)], 4: [(320, 180), (960, 180), (320, 540), (960, 540)]}


def write_video(path, seconds, faces, seed=0):
    """An mp4v video of `seconds` with 1 or 4 synthetic faces of VIDEO_FACE px on a smooth random
    backdrop, each swaying around its place by up to 40 px across and 20 down (at most 2 px per
    frame, a full sway in 5 seconds)."""
    import cv2  # deferred: start-up time of the parts that never write a video
    rng = np.random.default_rng(seed)
    width, height = VIDEO_SIZE
    # a textured backdrop: the cascade rejects a flat one faster than it would a real scene
    backdrop = cv2.resize(rng.integers(40, 200, (9, 16), dtype=np.uint8), VIDEO_SIZE, interpolation=cv2.INTER_CUBIC)
    sprites = [enlarged_face(seed + i, i % 7, VIDEO_FACE) for i in range(faces)]
    # mp4v, not MJPG: it codes most frames as changes to the one before, as real videos do
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), VIDEO_RATE, VIDEO_SIZE)
    if not writer.isOpened():
        raise DataError(f"OpenCV {cv2.__version__} cannot write an mp4v video here: run with --no-demo")
    for index in range(seconds * VIDEO_RATE):
        frame = backdrop.copy()
        phase = 2 * math.pi * index / (5 * VIDEO_RATE)
        for sprite, (x, y) in zip(sprites, FACE_PLACES[faces]):
            left = round(x - VIDEO_FACE / 2 + 40 * math.sin(phase))
            top = round(y - VIDEO_FACE / 2 + 20 * math.cos(phase))
            frame[top:top + VIDEO_FACE, left:left + VIDEO_FACE] = sprite
        writer.write(cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR))
    writer.release()
    return path


def write_subtitles(path, seconds, seed=0):
    """An SRT file of `seconds` with a line of 8 to 32 words every 2 seconds."""
    rng = np.random.default_rng(seed)
    cues = []
    for number, start in enumerate(range(0, seconds, 2), start=1):
        times = [f"{t // 3600:02d}:{t // 60 % 60:02d}:{t % 60:02d},000" for t in (start, start + 2)]
        cues.append(f"{number}\n{times[0]} --> {times[1]}\n{sentence(rng)}\n")
    path.write_text("\n".join(cues))
    return path


def bench_video(seconds, device, tmp, checkpoint):
    """(e): sampled frames/s of predict_video on a video with one face and on one with four, the
    faces found per frame, and where the time of a one-face frame goes."""
    recognizer = EmotionRecognizer.load(checkpoint, device)
    subtitles = write_subtitles(tmp / "video.srt", seconds)
    figures = {"video_seconds": seconds}
    for faces, name in ((1, "1face"), (4, "4faces")):
        video = write_video(tmp / f"{name}.mp4", seconds, faces)
        # warm-up: the model's first calls on a batch shape are slow, so the first batch of frames runs once before
        list(itertools.islice(recognizer.predict_video(video, subtitles, VIDEO_FPS), 8))
        t0 = time.perf_counter()
        frames = list(recognizer.predict_video(video, subtitles, VIDEO_FPS))
        whole_s = time.perf_counter() - t0
        figures[f"video_frames_per_s_{name}"] = len(frames) / whole_s
        figures[f"faces_per_frame_{faces}"] = statistics.mean(len(frame.faces) for frame in frames)
        if faces == 1:
            figures.update(video_split(video, len(frames), whole_s))
    return figures


def video_split(video, sampled, whole_s):
    """Milliseconds per sampled frame spent decoding, detecting faces and in the model, of a
    predict_video run over `video` that took `whole_s` for its `sampled` frames.
    The library is not touched: the same frames are read and searched for faces again, with
    predict_video's own calls, and the model's share (the crops, the tokens and the forward) is
    what the whole run took beyond that. Decoding is the time spent waiting on video_frames (its
    grabs, retrieves and colour conversions, opening the file included); detection includes to_gray."""
    decode_s = detect_s = 0.0
    t0 = time.perf_counter()
    for _, _, frame in video_frames(open_video(video, VIDEO_FPS)):
        t1 = time.perf_counter()
        decode_s += t1 - t0
        detect_faces(to_gray(frame))
        t0 = time.perf_counter()
        detect_s += t0 - t1
    # the grabs after the last sampled frame, up to the end of the file
    decode_s += time.perf_counter() - t0
    return {"video_decode_ms": 1000 * decode_s / sampled, "video_detect_ms": 1000 * detect_s / sampled,
            "video_model_ms": 1000 * (whole_s - decode_s - detect_s) / sampled}

def parse_args(argv=None):
    p = script_parser(__doc__)
    p.add_argument("--samples", type=positive_int, default=512, help="training pairs in the timed epochs")
    p.add_argument("--batch-size", type=positive_int, default=64,
                   help="pairs per training step and per cache-building batch")
    p.add_argument("--repeats", type=positive_int, default=30, help="demo predictions to take the median of")
    p.add_argument("--photos", type=positive_int, default=200,
                   help="(d): photos that demo.py --pairs and the predict loop go through")
    p.add_argument("--processes", type=positive_int, default=3,
                   help="(d): separate demo.py processes timed, one photo each")
    p.add_argument("--photo-side", type=int, default=0, choices=[0, 320, 640],
                   help="(d): 0 for 75 px face crops, else each face in a frame of this side")
    p.add_argument("--api-model", choices=["a", "b"], default="b",
                   help="(d): the model the recognizer loads, at the reference's sizes")
    p.add_argument("--api-input-size", type=positive_int, default=64,
                   help="(d): the trunk input of the recognizer's Model B (the README recipes train at 48 "
                        "and 64; the reference's 224 is compute-bound on a CPU at any batch size)")
    p.add_argument("--video-seconds", type=positive_int, default=10,
                   help="(e): the length of each test video (25 frames per second, 5 of them sampled)")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto",
                   help="mixed precision, as train.py: auto is bf16 where the GPU or CPU has it natively, "
                        "fp16 on older GPUs, off on other CPUs; bf16 or fp16 forces that type; off is fp32")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--no-demo", action="store_true",
                   help="(a) and (b) only: skip (c), (d) and (e), which read no --amp (gpu_check.py's fp32 pass)")
    p.add_argument("--json", action="store_true",
                   help="end with one JSON object of every figure (cache_speedup among them)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        figures = bench(args)
    except DataError as err:
        # a device torch does not know, or CUDA asked for where there is none
        print(f"error: {err}", file=sys.stderr)
        return 2
    for key, value in figures.items():
        print(f"{key:28s} {value:.3f}" if isinstance(value, float) else f"{key:28s} {value}")
    if args.json:
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
