"""A seeded synthetic stand-in for the real data: cartoon faces and template sentences.

    python prepare_data.py --source synthetic                    # ~2.8k images, 6k texts
    python prepare_data.py --source synthetic --synthetic-images 4286,1072,600 \
        --synthetic-texts 417000                                  # the real data set's size

`generate(dest, ...)` writes the raw layout of the real sources, so everything after
it is the same code for every source:
    dest/images/{train,val,test}/{angry,...,surprise}/NNNNN.png   75x75 grayscale faces
    dest/texts.csv                                                text,label (ids 0..5)

Each class moves the brows, eyes and mouth in its own way (the action units of the
expression), scaled by a random intensity so that weak expressions of neighbouring classes
overlap; pose, scale, lighting and noise vary from image to image; about 10 % of the
sentences carry a wrong label. A small model learns it on a CPU in a minute but is not at
100 % after one epoch. Every image has its own seed, so images can be drawn in any order
(or in any process) and the output stays the same.

`copies` plants near-copies of train faces in val and test, as a data set that was
augmented before it was split has them (exact, mirrored, brightness +-10 %, JPEG
re-encoded, shifted 1-3 px, rotated 2-5 degrees, in turn), and lists them in
dest/planted.csv; the tests of the leak audit check that it finds them.
"""
import csv
import io
import os
from multiprocessing import Pool

import numpy as np
from PIL import Image, ImageDraw

CLASS_FOLDERS = ["angry", "disgust", "fear", "happy", "neutral", "sad", "surprise"]
SPLITS = ("train", "val", "test")
# faces are drawn at twice the output size and halved: cheap anti-aliasing
CANVAS = 150

# Each expression at full intensity, as offsets from a neutral face (in canvas pixels; y
# grows downwards, so a negative brow offset raises the brow). The keys are the heights of
# the inner and outer brow ends, the eye opening (times the neutral one), the lift of the
# mouth corners, the mouth opening, the mouth width (times the neutral one), the raise of
# the upper lip on one side, and the strength of the nose wrinkles.
NEUTRAL = dict(brow_in=0.0, brow_out=0.0, eye=1.0, smile=0.0, mouth_open=0.0,
               mouth_width=1.0, lip_raise=0.0, wrinkle=0.0)
EXPRESSIONS = {
    "angry": dict(brow_in=9, brow_out=-2, eye=0.65, smile=-3, mouth_width=0.75),
    "disgust": dict(brow_in=4, eye=0.6, smile=-4, mouth_width=0.9, lip_raise=7, wrinkle=1),
    "fear": dict(brow_in=-9, brow_out=-3, eye=1.6, smile=-3, mouth_open=8, mouth_width=1.2),
    "happy": dict(eye=0.8, smile=10, mouth_open=3, mouth_width=1.25),
    "neutral": dict(),
    "sad": dict(brow_in=-8, brow_out=4, eye=0.85, smile=-8, mouth_width=0.9),
    "surprise": dict(brow_in=-13, brow_out=-12, eye=1.7, mouth_open=17, mouth_width=0.6),
}

# Text labels as in bhavikjikadara/emotions-dataset, with that data set's class shares.
TEXT_LABELS = ["sadness", "joy", "love", "anger", "fear", "surprise"]
TEXT_SHARES = np.array([121187, 141067, 34554, 57317, 47712, 14972]) / 416809
EMOTION_WORDS = {
    "sadness": "sad down miserable heartbroken lonely gloomy hopeless hurt empty crushed unhappy low",
    "joy": "happy glad cheerful delighted thrilled joyful great content pleased excited grateful proud",
    "love": "loved caring affectionate tender romantic adored cherished fond devoted warm sweet passionate",
    "anger": "angry furious irritated mad annoyed enraged resentful bitter outraged hostile cranky fed-up",
    "fear": "scared afraid anxious terrified nervous frightened worried panicky uneasy shaken tense alarmed",
    "surprise": "surprised amazed shocked astonished stunned startled speechless curious dazed floored",
}
TEMPLATES = [
    "i feel {w} {about}", "i am feeling so {w} {about}", "honestly i feel {w} {about}",
    "feeling {w} {about} tonight", "i have been {w} since {event}", "{event} left me {w}",
    "why do i always feel {w} {about}", "i feel kind of {w} {about}, not sure why",
    "still {w} after {event}", "i cant help feeling {w} {about}", "so {w} right now {about}",
    "i was {w} when {event} happened", "pretty {w} {about} if im honest",
    "today i feel really {w} {about}", "my friends say i look {w} {about}",
]
# Long slot lists keep the real-size set (417k rows) nearly free of duplicates (3 %),
# as the real one is; short sentences keep a tiny data set learnable.
ABOUT = ["about work", "about my exams", "about the weekend", "about my family", "about it",
         "about this city", "about the news", "about my job", "about school", "about us",
         "about the trip", "about tomorrow", "about my sister", "about the game", "",
         "about my brother", "about the rent", "about my boss", "about the new house",
         "about my best friend", "about the wedding", "about my grades", "about the dog",
         "about this year", "about the team", "about my health", "about the future", "",
         "about my dad", "about the kids", "about my car", "about the neighbours", "about him",
         "about her", "about them", "about the class", "about my flat", "about the budget",
         "about my cousin", "about the holidays", "about this song", "about the weather",
         "about my roommate", "about the show", "about my plans", "about the office", ""]
EVENTS = ["the meeting", "the phone call", "last night", "the concert", "the interview",
          "the holidays", "the move", "the results came out", "the long drive", "the party",
          "the email", "the match", "the doctor visit", "our talk", "the storm",
          "the exam", "the breakup", "the game ended", "the flight", "the first day",
          "my birthday", "the dinner", "the test results", "the trip home", "the argument",
          "the news broke", "the funeral", "the promotion", "the surprise visit", "the vote",
          "the lecture", "the date", "the workout", "the final", "the wedding", "the reunion",
          "the show", "the weekend", "the audition", "the shopping trip", "the accident",
          "the speech", "the sleepover", "the job offer", "the quiz"]
OPENERS = ["", "", "", "ok so ", "well ", "lol ", "ugh ", "hmm ", "omg ", "you know what ",
           "honestly ", "so ", "idk ", "ngl ", "man ", "yeah ", "guys ", "wow ", "tbh "]
ENDINGS = ["", "", "", " today", " again", " lately", " tbh", " haha", " 🙃", " 😊", " 😢", " !!",
           " lol", " rn", " tonight", " ...", " ok", " for real"]
LABEL_NOISE = 0.1
COPY_KINDS = ("exact", "mirrored", "brightness", "jpeg", "shift", "rotation")


def face_image(seed, class_index):
    """One 75x75 uint8 face of the class; `seed` fixes every random choice."""
    rng = np.random.default_rng(seed)
    target = {**NEUTRAL, **EXPRESSIONS[CLASS_FOLDERS[class_index]]}
    # weak expressions make neighbouring classes overlap
    intensity = rng.uniform(0.35, 1.0)
    p = {k: NEUTRAL[k] + intensity * (target[k] - NEUTRAL[k]) for k in NEUTRAL}
    for key, spread in (("brow_in", 2), ("brow_out", 2), ("smile", 2), ("mouth_open", 1.5)):
        p[key] += rng.normal(0, spread)  # individual faces differ even at rest
    p["eye"] *= rng.uniform(0.85, 1.15)
    p["mouth_width"] *= rng.uniform(0.9, 1.1)

    background = rng.uniform(20, 120)
    skin = rng.uniform(140, 215)
    image = Image.new("L", (CANVAS, CANVAS), int(background))
    draw = ImageDraw.Draw(image)
    cx = 75 + rng.normal(0, 3)
    cy = 78 + rng.normal(0, 3)
    rx = rng.uniform(40, 50)
    ry = rng.uniform(50, 60)
    draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=int(skin))
    dark = int(skin * rng.uniform(0.15, 0.35))
    if rng.random() < 0.6:  # hair
        draw.chord([cx - rx - 2, cy - ry - 6, cx + rx + 2, cy - ry * 0.1], 180, 360, fill=dark)
    eye_dx = rng.uniform(17, 22)
    eye_y = cy - rng.uniform(8, 14)
    for side in (-1, 1):  # brows and eyes, mirrored
        ex = cx + side * eye_dx
        inner = (cx + side * 6, eye_y - 13 + p["brow_in"])
        outer = (cx + side * (eye_dx + 12), eye_y - 12 + p["brow_out"])
        middle = ((inner[0] + outer[0]) / 2, min(inner[1], outer[1]) - 2 - max(0, -p["brow_out"]) / 3)
        draw.line([inner, middle, outer], fill=dark, width=4, joint="curve")
        eye_h = max(1.0, 4.5 * p["eye"])
        draw.ellipse([ex - 8, eye_y - eye_h, ex + 8, eye_y + eye_h], fill=235)
        pupil = min(4.0, eye_h)
        draw.ellipse([ex - pupil, eye_y - pupil, ex + pupil, eye_y + pupil], fill=dark)
    nose_y = cy + rng.uniform(10, 14)
    draw.line([(cx, eye_y + 4), (cx + 3, nose_y), (cx - 3, nose_y)], fill=int(skin * 0.6), width=2)
    for row in range(int(round(3 * p["wrinkle"]))):  # nose wrinkles of disgust
        y = eye_y + 3 + 3 * row
        draw.line([(cx - 6, y), (cx + 6, y + 1)], fill=int(skin * 0.55), width=2)

    # Mouth: corners lift by `smile`, lips part by `mouth_open`, one side of the
    # upper lip rises by `lip_raise` (a sneer).
    my = cy + rng.uniform(26, 32)
    half = 16 * p["mouth_width"]
    xs = np.linspace(-1, 1, 17)
    centre = my - p["smile"] * xs ** 2
    gap = max(0.0, p["mouth_open"]) / 2 * (1 - xs ** 2)
    upper = centre - gap - p["lip_raise"] * np.clip(xs, 0, 1)
    lower = centre + gap
    upper_pts = [(cx + half * x, y) for x, y in zip(xs, upper)]
    lower_pts = [(cx + half * x, y) for x, y in zip(xs[::-1], lower[::-1])]
    if (lower - upper).max() > 2:
        draw.polygon(upper_pts + lower_pts, fill=dark)
    else:
        draw.line(upper_pts, fill=dark, width=3, joint="curve")

    # Pose: one affine map (rotation, scale, shift), then halve the canvas. PIL wants
    # the inverse map, output pixel -> input pixel.
    angle = np.deg2rad(rng.normal(0, 7))
    scale = rng.uniform(0.85, 1.1)
    shift_x, shift_y = rng.normal(0, 4, 2)
    cos = np.cos(angle) / scale
    sin = np.sin(angle) / scale
    centre = CANVAS / 2
    inverse = (cos, sin, centre - cos * (centre + shift_x) - sin * (centre + shift_y),
               -sin, cos, centre + sin * (centre + shift_x) - cos * (centre + shift_y))
    image = image.transform(image.size, Image.AFFINE, inverse, resample=Image.BILINEAR,
                            fillcolor=int(background)).reduce(2)
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)

    # Lighting: a gradient from a random side, then sensor noise.
    pixels = np.asarray(image, dtype=np.float32)
    ramp = np.linspace(-1, 1, pixels.shape[0], dtype=np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    light = 1 + rng.uniform(0, 0.35) * (np.cos(angle) * ramp[None, :] + np.sin(angle) * ramp[:, None])
    pixels = pixels * light * rng.uniform(0.75, 1.2) + rng.normal(0, rng.uniform(3, 14), pixels.shape)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def near_copy(face, kind, rng):
    """uint8 [S,S] -> the same face after one augmentation of COPY_KINDS, its parameters drawn from `rng`."""
    if kind == "exact":
        return face.copy()
    if kind == "mirrored":
        return face[:, ::-1].copy()
    if kind == "brightness":
        return np.clip(face * rng.choice([0.9, 1.1]), 0, 255).astype(np.uint8)
    if kind == "jpeg":
        encoded = io.BytesIO()
        Image.fromarray(face).save(encoded, format="JPEG", quality=int(rng.integers(70, 96)))
        return np.array(Image.open(encoded))
    # a shift of 1-3 px in x, in y or in both, with the border repeated into the gap
    if kind == "shift":
        dy, dx = rng.choice([d for d in np.ndindex(7, 7) if d != (3, 3)])
        size = face.shape[0]
        return np.pad(face, 3, mode="edge")[dy:dy + size, dx:dx + size].copy()
    if kind == "rotation":
        angle = rng.uniform(2, 5) * rng.choice([-1, 1])
        return np.array(Image.fromarray(face).rotate(angle, resample=Image.BILINEAR,
                                                     fillcolor=int(np.median(face[0]))))
    raise ValueError(f"unknown copy kind {kind!r}")


def _write_face(job):
    path, seed, class_index, copy = job
    face = face_image(seed, class_index)
    # copy: (kind, seed of the copy's own random choices)
    if copy:
        face = near_copy(face, copy[0], np.random.default_rng(copy[1]))
    Image.fromarray(face).save(path, compress_level=1)


def write_texts(path, count, seed):
    """`count` tweet-like sentences as a `text,label` CSV with integer labels 0..5."""
    rng = np.random.default_rng([seed, len(SPLITS)])  # a random stream of its own, apart from the images'
    labels = rng.choice(len(TEXT_LABELS), size=count, p=TEXT_SHARES)
    # Every choice is drawn up front, one array per slot: 10x faster than one draw per slot and row.
    slots = [TEMPLATES, ABOUT, EVENTS, OPENERS, ENDINGS]
    template, about, event, opener, ending = (
        rng.integers(len(options), size=count) for options in slots)
    word = rng.integers(1 << 30, size=count)  # modulo the class's word count, below
    # people mislabel tweets; so do annotators
    noisy = rng.random(count) < LABEL_NOISE
    noisy_label = rng.integers(len(TEXT_LABELS), size=count)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for i, label in enumerate(labels):
            words = EMOTION_WORDS[TEXT_LABELS[label]].split()
            sentence = (OPENERS[opener[i]]
                        + TEMPLATES[template[i]].format(w=words[word[i] % len(words)],
                                                        about=ABOUT[about[i]], event=EVENTS[event[i]])
                        + ENDINGS[ending[i]])
            writer.writerow([" ".join(sentence.split()), int(noisy_label[i] if noisy[i] else label)])


def plan_faces(dest, seed, images_per_class, copies):
    """One job per face: (path, seed, class, copy). The first `copies` fraction of each val
    and test class folder are near-copies of train faces of the same class, the kinds in turn."""
    jobs = []
    planted = []
    for split_index, (split, count) in enumerate(zip(SPLITS, images_per_class)):
        for class_index, folder in enumerate(CLASS_FOLDERS):
            os.makedirs(os.path.join(dest, "images", split, folder))
            rng = np.random.default_rng([seed, split_index, class_index, 1 << 20])
            planted_here = round(copies * count) if split != "train" else 0
            originals = rng.choice(images_per_class[0], size=planted_here,
                                   replace=planted_here > images_per_class[0])
            for i in range(count):
                name = f"{split}/{folder}/{i:05d}.png"
                copy = None
                image_seed = [seed, split_index, class_index, i]
                if i < planted_here:
                    kind = COPY_KINDS[i % len(COPY_KINDS)]
                    # the copy's own choices keep this face's seed; its pixels are the original's
                    copy = (kind, image_seed)
                    image_seed = [seed, 0, class_index, int(originals[i])]
                    planted.append((name, f"train/{folder}/{originals[i]:05d}.png", kind))
                jobs.append((os.path.join(dest, "images", name), image_seed, class_index, copy))
    return jobs, planted


def generate(dest, seed=0, images_per_class=(300, 50, 50), texts=6000, copies=0.0, workers=2):
    """Write the synthetic raw layout into `dest` (a new folder); returns (image_root, text_csv)."""
    jobs, planted = plan_faces(dest, seed, images_per_class, copies)
    if planted:
        with open(os.path.join(dest, "planted.csv"), "w", newline="") as handle:
            csv.writer(handle).writerows([("copy", "original", "kind"), *planted])
    # a pool pays for its start-up only on big trees
    if workers > 1 and len(jobs) > 2000:
        with Pool(workers) as pool:
            for _ in pool.imap_unordered(_write_face, jobs, chunksize=256):
                pass
    else:
        for job in jobs:
            _write_face(job)
    text_csv = os.path.join(dest, "texts.csv")
    write_texts(text_csv, texts, seed)
    return os.path.join(dest, "images"), text_csv
