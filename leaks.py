"""Are two splits sharing faces? Near-copies across train, val and test, found by a
perceptual hash of every image and of its mirror.

    from leaks import audit
    report, near_train = audit(images, files)  # {split: uint8 [N,S,S]}, {split: [file names]}

Augmented data sets leak when the augmenting came before the splitting: a test face is
then a flipped, brightened or re-encoded copy of a training face, and the test score
measures memory as much as recognition. prepare_data.py runs this audit on every data set
(it adds a few seconds at the real size) and `--dedupe` drops what it finds.

The hash (pHash, at 256 bits): the 16x16 lowest frequencies of the image's 2-D DCT, one
bit each, set when the coefficient is above the image's median. Scaling the brightness
scales every coefficient and moves no bit; JPEG noise lives in the high frequencies that
are left out. Why 16x16 and not the usual 8x8: face crops are aligned to one shape (the
synthetic faces share one template), and at 64 bits distinct synthetic faces collide:
21,106 of 8 million distinct pairs within 4 bits, some at 0. At 256 bits the closest
distinct pair was 20 bits apart, while 99.8 % of brightness and 100 % of JPEG copies were
within 12 (measured on 4,000 synthetic faces and 500 copies of each kind). The price:
copies shifted by 1-3 px or rotated by 2-5 degrees mostly escape (the numbers below), so a
count here is a lower bound on the leak, not its size.
"""
import numpy as np

HASH_SIZE = 16  # 16x16 DCT frequencies -> 256 bits, four uint64 words per image
# Hamming distance at or below which two images are near-copies; chosen by measurement on
# planted copies and distinct synthetic faces (tests/test_leaks.py proves it holds).
THRESHOLD = 12
PAIRS = (("train", "val"), ("train", "test"), ("val", "test"))  # (earlier, later)
EXAMPLES = 20


def dct_basis(count, size):
    """float32 [count, size]: the `count` lowest DCT-II cosines over `size` pixels."""
    frequency, pixel = np.arange(count)[:, None], np.arange(size)[None, :]
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


def nearest(later, earlier, earlier_mirrored, block=32):
    """For each hash of `later` [N,4]: the smallest Hamming distance to any image of the
    earlier split or its mirror, that image's index, and whether it was the mirror.
    Mirroring one side of a pair is enough: mirror(a) ~ b is a ~ mirror(b)."""
    candidates = np.concatenate([earlier, earlier_mirrored])  # (2M, 4)
    distance = np.empty(len(later), dtype=np.int64)
    index = np.empty(len(later), dtype=np.int64)
    for start in range(0, len(later), block):  # (block, 2M, 4) words at a time: ~60 MB at real size
        words = later[start:start + block, None, :] ^ candidates[None, :, :]
        hamming = np.bitwise_count(words).sum(axis=2, dtype=np.uint16)  # (block, 2M)
        best = hamming.argmin(axis=1)
        index[start:start + block] = best
        distance[start:start + block] = hamming[np.arange(len(best)), best]
    return distance, index % max(len(earlier), 1), index >= len(earlier)


def pick_examples(found, count=EXAMPLES):
    """Up to `count` pairs spread evenly from the closest to the most distant, so that a look
    at them shows whether the threshold is right (borderline pairs included)."""
    found = sorted(found, key=lambda pair: pair["distance"])  # stable: ties keep split order
    if len(found) <= count:
        return found
    return [found[i] for i in np.linspace(0, len(found) - 1, count).round().astype(int)]


def audit(images, files, threshold=THRESHOLD):
    """images {split: uint8 [N,S,S]}, files {split: [name]} -> (report for meta.json,
    {val, test: bool [N], True where the image has a near-copy in train})."""
    hashes = {split: perceptual_hashes(images[split]) for split in images}
    mirrored = {split: perceptual_hashes(images[split][:, :, ::-1]) for split in ("train", "val")}
    counts, found, near = {}, [], {}
    for earlier, later in PAIRS:
        distance, index, flipped = nearest(hashes[later], hashes[earlier], mirrored[earlier])
        near[earlier, later] = distance <= threshold
        counts[f"{earlier}-{later}"] = int(near[earlier, later].sum())
        found += [{"files": [files[earlier][index[i]], files[later][i]],
                   "distance": int(distance[i]), "mirrored": bool(flipped[i])}
                  for i in np.flatnonzero(near[earlier, later])]
    test_leaked = near["train", "test"] | near["val", "test"]
    report = {"threshold": threshold, "bits": HASH_SIZE ** 2, "counts": counts,
              "test_fraction": round(float(test_leaked.mean()) if len(test_leaked) else 0.0, 4),
              "examples": pick_examples(found)}
    return report, {"val": near["train", "val"], "test": near["train", "test"]}
