"""data.py: batches (the order, grouped by text length, dealing rows to ranks, gathering on the device
or through a pinned buffer) and the feature cache (its key, a broken file, concurrent builds)."""
import threading

import pytest
import torch
import torch.nn.functional as F

import evaluate
import metrics
from data import Batches, cached_features, load_split, load_text_pool
from runtime import DataError
from test_train import small_model


def pool_of_lengths(n, seed=0):
    """n pairs whose texts run from 3 to 64 tokens, and a text pool of the same lengths to draw from."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 65, (n,), generator=generator).to(torch.int16)
    input_ids = torch.arange(n, dtype=torch.int32)[:, None].expand(n, 64).clone()  # row i says i
    input_ids[torch.arange(64) >= lengths.long()[:, None]] = 0
    labels = torch.randint(0, 7, (n,), generator=generator)
    split = {"images": torch.zeros(n, 8, 8, dtype=torch.uint8), "labels": labels,
             "input_ids": input_ids, "lengths": lengths}
    return split, {"input_ids": input_ids, "lengths": lengths, "labels": labels}


def epoch_rows(batches):
    """One pass: each batch's split positions, and its padded width."""
    return [(batch["index"], batch["input_ids"].shape[1]) for batch in batches]


def test_an_epoch_uses_every_row_once_in_batches_of_similar_length():
    split, pool = pool_of_lengths(64 * 40 + 17)
    every_row = torch.arange(len(split["labels"]))
    widths = {}
    for group in (True, False):
        batches = Batches(split, 64, "cpu", shuffle=True, flip=True, text_pool=pool, seed=1, group_by_length=group)
        for _ in range(2):  # a second epoch draws its texts and batches anew
            rows = epoch_rows(batches)
            assert torch.equal(torch.cat([index for index, _ in rows]).sort().values, every_row)
        widths[group] = sum(width * len(index) for index, width in rows) / len(split["labels"])
    # lengths uniform over 3..64: a random batch of 64 pads to about 63, a grouped one to about 34
    assert widths[True] < 0.7 * widths[False]


def test_the_order_follows_the_seed_and_resumes_from_the_generator():
    split, pool = pool_of_lengths(1000)

    def batches(seed):
        return Batches(split, 32, "cpu", shuffle=True, text_pool=pool, seed=seed)

    def same(a, b):
        return len(a) == len(b) and all(torch.equal(x, y) and u == v for (x, u), (y, v) in zip(a, b))

    straight = batches(3)
    first, second = epoch_rows(straight), epoch_rows(straight)
    assert same(first, epoch_rows(batches(3))) and not same(first, epoch_rows(batches(4)))
    assert not same(first, second)
    # what train.py saves after an epoch, and restores on --resume
    resumed = batches(3)
    epoch_rows(resumed)
    state = resumed.generator.get_state()
    again = batches(3)
    again.generator.set_state(state)
    assert same(epoch_rows(again), second)


def test_sorted_evaluation_equals_evaluation_in_the_rows_order(processed):
    model = small_model("b", processed)
    split = load_split(processed, "test")
    out = metrics.evaluate(model, Batches(split, 64, "cpu"))
    assert not torch.equal(next(iter(Batches(split, 64, "cpu")))["index"], torch.arange(64))  # it was sorted
    model.eval()
    plain = []
    with torch.no_grad():
        for rows in torch.arange(len(split["labels"])).split(64):
            width = max(int(split["lengths"][rows].max()), 1)
            logits = model(split["input_ids"][rows, :width].long(), split["lengths"][rows].long(),
                           images=split["images"][rows])
            plain.append(F.log_softmax(logits, dim=1))
    plain = torch.cat(plain)
    torch.testing.assert_close(out["log_probs"], plain, rtol=1e-4, atol=1e-5)
    assert torch.equal(torch.as_tensor(out["labels"]), split["labels"])


def test_cached_and_uncached_first_step_agree(processed, tmp_path):
    model = small_model("b", processed)
    split, pool = load_split(processed, "train"), load_text_pool(processed)
    features, _ = cached_features(model, split["images"], tmp_path, "cpu", flips=True, show_progress=False)
    losses = []
    for feats in (features, None):
        batch = next(iter(Batches(split, 32, "cpu", features=feats, shuffle=True, flip=True,
                                  text_pool=pool, seed=3)))
        torch.manual_seed(0)  # the same dropout masks
        model.train()
        logits = model(batch["input_ids"], batch["lengths"], images=batch.get("images"),
                       image_features=batch.get("image_features"))
        losses.append(F.cross_entropy(logits, batch["labels"]).item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-3)  # the cache stores float16


def test_cache_key_follows_the_trunk_input_and_the_dtype(processed, tmp_path):
    images = load_split(processed, "val")["images"][:16]  # the key, not the features, is tested
    paths = [cached_features(small_model("a", processed, size), images, tmp_path, "cpu", flips=False,
                             amp=amp, show_progress=False)[1]
             for size, amp in ((64, "off"), (96, "off"), (64, "bf16"), (64, "off"))]
    assert len(set(paths[:3])) == 3 and paths[3] == paths[0]


def test_device_gather_and_buffered_gather_serve_the_same_batches(processed):
    # On the CPU nothing is pinned and no copy is asynchronous: this checks the gathering alone
    # (the pinned buffer's synchronize is tested on CUDA below).
    split = load_split(processed, "train")
    features = {"pooled": torch.randn(2, len(split["labels"]), 8).half()}
    served = [Batches(split, 50, "cpu", features=features, shuffle=True, flip=True, on_device=where)
              for where in (True, False)]
    # the buffer is reused: compare each batch as it comes
    for a, b in zip(*served):
        assert torch.equal(a["image_features"]["pooled"], b["image_features"]["pooled"])
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])


@pytest.mark.cuda
def test_the_pinned_buffer_is_not_refilled_before_its_copy_has_left(processed):
    split = load_split(processed, "train")
    features = {"pooled": torch.randn(2, len(split["labels"]), 8).half()}
    expected = [b["image_features"]["pooled"].clone()
                for b in Batches(split, 50, "cuda", features=features, on_device=True)]
    kept = []
    for batch in Batches(split, 50, "cuda", features=features, on_device=False):
        # the next batch's copy queues behind this sleep while the batch after it fills the buffer:
        # without the event synchronize, a kept batch would hold a later batch's rows
        torch.cuda._sleep(50_000_000)
        kept.append(batch["image_features"]["pooled"])
    torch.cuda.synchronize()
    assert len(kept) == len(expected)
    for got, want in zip(kept, expected):
        assert torch.equal(got, want)


def test_ranks_are_dealt_rows_of_the_same_global_batches(processed):
    # 420 pairs: batches of 25 dealt 13 + 12, the last 10 + 10; rank r takes rows r, r + 2, ...
    split = load_split(processed, "train")
    whole = list(Batches(split, 25, "cpu", shuffle=True, flip=True, seed=4))
    parts = [list(Batches(split, 25, "cpu", shuffle=True, flip=True, seed=4, rank=r, world_size=2))
             for r in range(2)]
    assert len(whole) == len(parts[0]) == len(parts[1]) == 17
    for batch, first, second in zip(whole, *parts):
        assert batch["global_size"] == first["global_size"] == len(batch["labels"])
        assert torch.equal(batch["labels"][0::2], first["labels"])
        assert torch.equal(batch["labels"][1::2], second["labels"])
        assert torch.equal(batch["images"][0::2], first["images"])
        assert torch.equal(batch["images"][1::2], second["images"])


def test_batches_on_the_meta_device_put_lengths_there_too(processed):
    split = load_split(processed, "val")
    n = len(split["labels"])
    features = {"pooled": torch.zeros(1, n, 8), "regions": torch.zeros(1, n, 4, 8)}
    batch = next(iter(Batches(split, 16, "meta", features=features)))
    assert batch["image_features"]["regions"].device.type == "meta"
    assert batch["image_features"]["regions"].shape == (16, 4, 8)
    assert batch["input_ids"].device.type == "meta" and batch["lengths"].device.type == "meta"


def test_a_cache_that_does_not_load_is_rebuilt(processed, tmp_path, capsys):
    model, images = small_model("a", processed), load_split(processed, "val")["images"]
    first, path = cached_features(model, images, tmp_path, "cpu", flips=False, show_progress=False)
    first = {k: v.clone() for k, v in first.items()}
    path.write_bytes(path.read_bytes()[:1000])  # a disk that filled up, a copy cut short
    again, same = cached_features(model, images, tmp_path, "cpu", flips=False, show_progress=False)
    err = capsys.readouterr().err
    assert same == path and err.count("\n") == 1 and "building it again" in err
    assert torch.equal(again["pooled"], first["pooled"])


def test_concurrent_cache_builds_both_finish(processed, tmp_path, monkeypatch):
    # Two runs sharing data/cache: both write their file before either renames it into place
    # (the interleaving that lost one run's file when they shared one temporary name).
    images = load_split(processed, "val")["images"][:16]  # the key, not the features, is tested
    both_written, save = threading.Barrier(2, timeout=60), torch.save

    def save_then_wait(obj, f):
        save(obj, f)
        both_written.wait()

    monkeypatch.setattr(torch, "save", save_then_wait)
    results, errors = [], []

    def build(model):
        try:
            results.append(cached_features(model, images, tmp_path, "cpu", flips=False, show_progress=False))
        except Exception as err:
            errors.append(err)

    threads = [threading.Thread(target=build, args=(small_model("a", processed),)) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(results) == 2 and results[0][1] == results[1][1]
    assert torch.equal(results[0][0]["pooled"], results[1][0]["pooled"])
    assert [p.name for p in tmp_path.iterdir()] == [results[0][1].name]  # no temporary left


def test_a_cache_folder_under_a_file_fails_in_one_line_before_any_feature(processed, tmp_path):
    model, images = small_model("a", processed), load_split(processed, "val")["images"][:16]
    computed = []
    image_features = model.image_features
    model.image_features = lambda batch: computed.append(len(batch)) or image_features(batch)
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(DataError, match=r"^making the cache folder failed on rank 0: NotADirectoryError") as caught:
        cached_features(model, images, tmp_path / "a_file" / "cache", "cpu", flips=False, show_progress=False)
    assert "\n" not in str(caught.value) and computed == []


def test_a_full_disk_while_writing_the_cache_is_one_line(processed, tmp_path, monkeypatch):
    def full(obj, f):
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", full)
    images = load_split(processed, "val")["images"][:16]
    with pytest.raises(DataError, match=r"^writing the feature cache failed on rank 0: RuntimeError: .*file write"):
        cached_features(small_model("a", processed), images, tmp_path, "cpu", flips=False, show_progress=False)
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind


def test_evaluate_with_a_cache_folder_under_a_file_is_one_line(runs, processed, tmp_path, capsys):
    (tmp_path / "a_file").write_text("not a folder")
    assert evaluate.main(["--checkpoint", str(runs / "model_a" / "best.pt"), "--data", str(processed), "--results",
                          str(tmp_path / "results.csv"), "--cache-dir", str(tmp_path / "a_file" / "cache")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: making the cache folder failed"), err
