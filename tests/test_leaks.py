"""prep/leaks.py: planted copies are found, distinct faces are not paired, the report is right."""
import numpy as np
import pytest

from prep import leaks, synthetic


@pytest.fixture(scope="module")
def faces():
    """1,200 distinct synthetic faces (one template, every class): 600 'train', 600 others."""
    return np.stack([synthetic.face_image([11, 0, i % 7, i], i % 7) for i in range(1200)])


@pytest.mark.parametrize("kind", ["exact", "mirrored", "brightness", "jpeg"])
def test_planted_copies_are_found(faces, kind):
    train = faces[:600]
    rng = np.random.default_rng(0)
    copies = np.stack([synthetic.near_copy(face, kind, rng) for face in train[:300]])
    distance, index, _ = leaks.nearest(leaks.perceptual_hashes(copies), leaks.perceptual_hashes(train),
                                       leaks.perceptual_hashes(train[:, :, ::-1]))
    found = (distance <= leaks.THRESHOLD) & (index == np.arange(300))  # and to its own original
    assert found.mean() >= 0.95, f"{kind}: recall {found.mean():.3f}"


def test_no_false_pairs_among_distinct_faces(faces):
    """The faces share one template, pose and lighting ranges: the hard case for a hash.
    600 x 600 pairs, each also mirrored: none may fall within the threshold."""
    train = faces[:600]
    others = faces[600:]
    distance, _, _ = leaks.nearest(leaks.perceptual_hashes(others), leaks.perceptual_hashes(train),
                                   leaks.perceptual_hashes(train[:, :, ::-1]))
    assert distance.min() > leaks.THRESHOLD


@pytest.fixture
def three_splits(faces):
    train = faces[:5]
    fresh = faces[5:7]
    # val: a mirrored train face, a new one; test: val's new face, a train face, a new one
    images = {"train": train,
              "val": np.stack([train[2, :, ::-1], fresh[0]]),
              "test": np.stack([fresh[0], train[0], fresh[1]])}
    files = {split: [f"{split}/{i}.png" for i in range(len(images[split]))] for split in images}
    return images, files


def test_audit_counts_each_later_split_against_the_earlier(three_splits):
    report, near = leaks.audit(*three_splits)
    assert report["counts"] == {"train-val": 1, "train-test": 1, "val-test": 1}
    assert near["train-val"].tolist() == [True, False]
    assert near["train-test"].tolist() == [False, True, False]
    assert near["val-test"].tolist() == [True, False, False]
    assert report["test_fraction"] == round(2 / 3, 4)
    pairs = {tuple(example["files"]): example["mirrored"] for example in report["examples"]}
    assert pairs == {("train/2.png", "val/0.png"): True, ("train/0.png", "test/1.png"): False,
                     ("val/1.png", "test/0.png"): False}
    assert all(example["distance"] == 0 for example in report["examples"])
    assert leaks.summary(report).startswith("66.7% of test images have a near-copy")


def test_dedupe_set_and_what_remains(three_splits):
    """--dedupe drops val faces copied from train and test faces copied from train or val;
    the audit over what is kept then finds nothing, and says so in one line."""
    _, near = leaks.audit(*three_splits)
    copied = leaks.copied_from_earlier(near)
    assert copied["val"].tolist() == [True, False]
    assert copied["test"].tolist() == [True, True, False]
    kept = {split: np.flatnonzero(~copied[split]) for split in ("val", "test")}
    kept["train"] = np.arange(5)
    left = leaks.remaining(near, kept)
    assert left["counts"] == {"train-val": 0, "train-test": 0, "val-test": 0}
    assert left["test_fraction"] == 0.0
    assert leaks.summary(left) == "0 near-copies across splits"
    everything = leaks.remaining(near, {"train": np.arange(5), "val": np.arange(2),
                                        "test": np.arange(3)})
    assert everything["counts"] == {"train-val": 1, "train-test": 1, "val-test": 1}


def test_examples_span_the_distances():
    found = [{"files": [str(i), str(i)], "distance": d, "mirrored": False}
             for i, d in enumerate([5, 0, 12, 3] * 10)]
    examples = leaks.pick_examples(found, count=20)
    distances = [example["distance"] for example in examples]
    assert len(examples) == 20 and distances == sorted(distances)
    assert distances[0] == 0 and distances[-1] == 12  # the closest and the borderline pair
