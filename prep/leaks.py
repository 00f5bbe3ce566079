"""Do two splits share faces? The audit finds near-copies across train, val and test by a
perceptual hash of every image and of its mirror.

    from prep import leaks
    # images {split: uint8 [N,S,S]}, files {split: [file names]}
    report, near = leaks.audit(images, files)
    copied = leaks.copied_from_earlier(near)    # what --dedupe drops
    left = leaks.remaining(near, kept_rows)     # the audit over the images kept

Augmented data sets leak when the augmenting came before the splitting: a test face is
then a flipped, brightened or re-encoded copy of a training face, and the test score
measures memory as much as recognition. prepare_data.py runs this audit on every data set
(about 10 s for the real 42k images) and `--dedupe` drops what it finds: the val images
with a near-copy in train, and the test images with one in train or in val.

The hash (pHash, at 256 bits) has one bit for each of the 16x16 lowest frequencies of the
image's 2-D DCT, set when the coefficient is above the image's median. Scaling the
brightness scales every coefficient and moves no bit; JPEG noise lives in the high
frequencies, which are left out. The hash uses 16x16 frequencies, not the usual 8x8, because
face crops are aligned to one shape (the synthetic faces share one template), and at 64
bits distinct synthetic faces collide (21,106 of 8 million pairs of 4,000 faces were within
4 bits, some at 0; at 256 bits the closest of those pairs was 20 bits apart).

The threshold was measured at the real size (30,002 train faces; 10,535 distinct val and
test faces and 1,169 planted copies: `prepare_data.py --source synthetic --synthetic-images
4286,1072,600 --synthetic-copies 0.1`). The table gives the recall (%) of each kind of copy
and the number of distinct faces paired with a train face:

    threshold        6     8    10    12    14    16
    brightness    96.9  99.0  99.5  99.5   100   100     (exact, mirrored: 100 at every one)
    JPEG          97.4  99.5   100   100   100   100
    shift 1-3 px     0     0   0.5   0.5   1.5   2.0
    rotation 2-5   1.6   2.6   5.8   7.9  12.7  20.1
    false pairs      0     0     0     0     1     4

12 is the largest threshold that paired no distinct faces. Shifted and rotated copies
mostly escape any threshold that does not also pair distinct faces (a face moved by
2 px is what the synthetic pose jitter does to distinct faces), so a count here is a
lower bound on the leak, not its size.
"""
import numpy as np

# 16x16 DCT frequencies -> 256 bits, four uint64 words per image
HASH_SIZE = 16
# The Hamming distance at or below which two images are near-copies, as measured in the table
# above (tests/test_leaks.py holds it to a recall of at least 95 % and no distinct pair).
THRESHOLD = 12
# (earlier, later): each later split is searched for copies of the earlier one
PAIRS = (("train", "val"), ("train", "test"), ("val", "test"))
EXAMPLES = 20


def dct_basis(count, size):
    """float32 [count, size]: the `count` lowest DCT-II cosines over `size` pixels."""
    frequency = np.arange(count)[:, None]
    pixel = np.arange(size)[None, :]
    return np.cos(np.pi * (2 * pixel + 1) * frequency / (2 * size)).astype(np.float32)


def perceptual_hashes(images, block=4096):
    """uint8 [N,S,S] -> uint64 [N, 4]. The low frequencies come straight from the full image
    by two small matrix products (no resize first): basis [16,S] @ image [S,S] @ basis.T."""
    basis = dct_basis(HASH_SIZE, images.shape[-1])
    hashes = []
    for start in range(0, len(images), block):  # blocks keep the float copy small
        coefficients = basis @ images[start:start + block].astype(np.float32) @ basis.T  # (B,16,16)
        flat = coefficients.reshape(len(coefficients), -1)  # (B, 256)
        bits = flat > np.median(flat, axis=1, keepdims=True)
        hashes.append(np.packbits(bits, axis=1).view(np.uint64))  # (B, 4)
    return np.concatenate(hashes) if hashes else np.zeros((0, HASH_SIZE ** 2 // 64), np.uint64)


def nearest(later, earlier, earlier_mirrored, block=64):
    """For each hash of `later` [N,4]: the smallest Hamming distance to any image of the
    earlier split or its mirror, that image's index, and whether it was the mirror.
    Mirroring one side of a pair is enough: mirror(a) ~ b is a ~ mirror(b)."""
    # (4, 2M): word w of every candidate side by side, so each XOR runs over contiguous memory
    candidates = np.concatenate([earlier, earlier_mirrored]).T.copy()
    distance = np.empty(len(later), dtype=np.int64)
    index = np.empty(len(later), dtype=np.int64)
    # (block, 2M) distances at a time, 30 MB at the real size
    for start in range(0, len(later), block):
        part = later[start:start + block]
        hamming = np.zeros((len(part), candidates.shape[1]), dtype=np.uint16)
        for word in range(len(candidates)):
            hamming += np.bitwise_count(part[:, word, None] ^ candidates[word])
        best = hamming.argmin(axis=1)
        index[start:start + len(part)] = best
        distance[start:start + len(part)] = hamming[np.arange(len(part)), best]
    return distance, index % max(len(earlier), 1), index >= len(earlier)


def pick_examples(found, count=EXAMPLES):
    """Up to `count` pairs spread evenly from the closest to the most distant, so that a look
    at them shows whether the threshold is right (borderline pairs included)."""
    found = sorted(found, key=lambda pair: pair["distance"])  # a stable sort: ties keep the split order
    if len(found) <= count:
        return found
    return [found[i] for i in np.linspace(0, len(found) - 1, count).round().astype(int)]


def audit(images, files, threshold=THRESHOLD):
    """images {split: uint8 [N,S,S]}, files {split: [name]} -> (report for meta.json,
    {"train-val", "train-test", "val-test": bool [N] over the later split, True where the
    image has a near-copy in the earlier split})."""
    hashes = {split: perceptual_hashes(images[split]) for split in images}
    mirrored = {split: perceptual_hashes(images[split][:, :, ::-1]) for split in ("train", "val")}
    counts = {}
    found = []
    near = {}
    for earlier, later in PAIRS:
        pair = f"{earlier}-{later}"
        distance, index, flipped = nearest(hashes[later], hashes[earlier], mirrored[earlier])
        near[pair] = distance <= threshold
        counts[pair] = int(near[pair].sum())
        found += [{"files": [files[earlier][index[i]], files[later][i]],
                   "distance": int(distance[i]), "mirrored": bool(flipped[i])}
                  for i in np.flatnonzero(near[pair])]
    report = {"threshold": threshold, "bits": HASH_SIZE ** 2, "counts": counts,
              "test_fraction": leak_fraction(copied_from_earlier(near)["test"]),
              "examples": pick_examples(found)}
    return report, near


def leak_fraction(leaked):
    """The share of test images (bool [N], True where leaked) with a near-copy, rounded to 4 decimals."""
    return round(float(leaked.mean()) if len(leaked) else 0.0, 4)


def copied_from_earlier(near):
    """{val, test: bool [N]}: the images with a near-copy in an earlier split, which --dedupe
    drops: val images with one in train, test images with one in train or in val."""
    return {"val": near["train-val"], "test": near["train-test"] | near["val-test"]}


def remaining(near, kept):
    """The audit over the images kept ({split: row indices}): {counts, test_fraction}. A kept
    image counts when it has a near-copy anywhere in the earlier split as read."""
    counts = {pair: int(flags[kept[pair.split("-")[1]]].sum()) for pair, flags in near.items()}
    leaked = copied_from_earlier(near)["test"][kept["test"]]
    return {"counts": counts, "test_fraction": leak_fraction(leaked)}


def evaluated_fraction(report, split, count):
    """The share of `split`'s `count` images (as prepared) with a near-copy in an earlier split,
    from meta.json's 'leaks' (`report`): what evaluate.py warns of. None for data prepared
    before the audit recorded what it left."""
    left = (report or {}).get("remaining")
    if left is None:
        return None
    if split == "test":
        return left["test_fraction"]
    return round(left["counts"]["train-val"] / count, 4) if count else 0.0


def summary(found):
    """One line on near-copies (`found`: the audit's report or `remaining`'s) and what they
    mean for the test score."""
    counts = found["counts"]
    if not any(counts.values()):
        return "0 near-copies across splits"
    return (f"{found['test_fraction']:.1%} of test images have a near-copy in train or val "
            f"(train-val {counts['train-val']}, train-test {counts['train-test']}, val-test "
            f"{counts['val-test']}): test scores are inflated")
