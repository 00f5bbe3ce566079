"""Tests for models.py: shapes, a frozen trunk that stays frozen, cached == uncached,
padding invariance, region attention, single-modality models, parameter groups. Saving and
loading them: test_checkpoints.py; the image branch's preprocessing (images.py): test_images.py.

    python -m pytest tests/test_models.py -q
"""
import sys
from pathlib import Path

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import models  # noqa: E402
from models import ModelConfig, build_model  # noqa: E402
import train  # noqa: E402

VOCAB = 50


def small_config(arch, **overrides):
    """Real ResNet-18 trunk, small text side and input size so the tests stay fast."""
    settings = dict(arch=arch, vocab_size=VOCAB, max_len=16, input_size=64, pretrained=False, embed_dim=32,
                    gru_hidden=64, d_model=64, n_layers=2, n_heads=4, d_ff=128)
    return ModelConfig(**(settings | overrides))


def small_model(arch, seed=0, **overrides):
    torch.manual_seed(seed)
    return build_model(small_config(arch, **overrides))


def batch(size=4, length=10, image_size=75, seed=1):
    """Right-padded ids with lengths [length, ..., 1], and random uint8 faces."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([max(1, length - 3 * i) for i in range(size)], dtype=torch.int16)
    ids = torch.randint(1, VOCAB, (size, length), generator=generator, dtype=torch.int32)
    ids[torch.arange(length) >= lengths.unsqueeze(1)] = 0
    images = torch.randint(0, 256, (size, image_size, image_size), generator=generator, dtype=torch.uint8)
    return ids, lengths, images


def trunk_parameters(model):
    return list(model.image_encoder.trunk.parameters())


@pytest.mark.parametrize("arch", ["a", "b"])
def test_logits_shape_and_parameter_counts(arch):
    model = small_model(arch)
    ids, lengths, images = batch()
    assert model(ids, lengths, images=images).shape == (4, 7)
    trainable, frozen = models.parameter_counts(model)
    trunk = sum(p.numel() for p in trunk_parameters(model))
    assert frozen == trunk == 11_176_512  # torchvision's ResNet-18 minus its fc
    assert trainable == sum(p.numel() for p in model.parameters()) - trunk > 0
    line = models.describe(model)
    assert line.startswith(f"{trainable:,} trainable") and f"{frozen:,} frozen" in line and "\n" not in line
    finetuned = small_model(arch, finetune=True)
    assert models.parameter_counts(finetuned) == (trainable + frozen, 0)
    assert "text only" in models.describe(small_model(arch, modality="text"))


@pytest.mark.parametrize("arch", ["a", "b"])
def test_frozen_trunk_stays_put_and_a_fine_tuned_one_moves(arch):
    model = small_model(arch).train()
    trunk = model.image_encoder.trunk
    batch_norms = [m for m in trunk.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(batch_norms) == 20 and not any(m.training for m in batch_norms)
    assert model.head.training  # the rest does train
    statistics = batch_norms[0].running_mean.clone()
    ids, lengths, images = batch()
    model(ids, lengths, images=images).sum().backward()
    assert all(p.grad is None for p in trunk_parameters(model))
    assert torch.equal(batch_norms[0].running_mean, statistics)
    assert model.head[-1].weight.grad is not None and model.head[-1].weight.grad.abs().sum() > 0

    # One optimizer step with the fine-tuning groups: trunk weights and BatchNorm statistics move.
    finetuned = small_model(arch, finetune=True).train()
    assert all(m.training for m in finetuned.image_encoder.trunk.modules())
    batch_norms = [m for m in finetuned.image_encoder.trunk.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [(m.running_mean.clone(), m.running_var.clone()) for m in batch_norms]
    kernel = finetuned.image_encoder.trunk[0].weight.detach().clone()
    optimizer = torch.optim.AdamW(train.parameter_groups(finetuned, 1e-3, 0.01, backbone_lr_scale=0.1))
    finetuned(ids, lengths, images=images).sum().backward()
    assert all(p.grad is not None for p in trunk_parameters(finetuned))
    optimizer.step()
    assert all(not torch.equal(m.running_mean, mean) and not torch.equal(m.running_var, var)
               for m, (mean, var) in zip(batch_norms, before))
    assert not torch.equal(finetuned.image_encoder.trunk[0].weight, kernel)


@pytest.mark.parametrize("arch", ["a", "b"])
def test_images_and_cached_features_agree(arch):
    model = small_model(arch).eval()
    ids, lengths, images = batch()
    with torch.no_grad():
        from_images = model(ids, lengths, images=images)
        features = model.image_features(images)
        from_features = model(ids, lengths, image_features=features)
        from_half = model(ids, lengths, image_features={k: v.half() for k, v in features.items()})
    assert torch.allclose(from_images, from_features, atol=1e-5)
    assert from_half.dtype == torch.float32 and torch.allclose(from_half, from_features, atol=1e-2)
    assert set(features) == ({"pooled"} if arch == "a" else {"pooled", "regions"})
    with pytest.raises(ValueError, match="exactly one"):
        model(ids, lengths)
    with pytest.raises(ValueError, match="exactly one"):
        model(ids, lengths, images=images, image_features=features)


@pytest.mark.parametrize("arch", ["a", "b"])
def test_padding_never_changes_logits_and_the_text_is_read(arch):
    model = small_model(arch).eval()
    ids, lengths, images = batch()
    padded = torch.cat([ids, torch.zeros(4, 6, dtype=ids.dtype)], dim=1)
    with torch.no_grad():
        features = model.image_features(images)
        logits = model(ids, lengths, image_features=features)
        assert torch.allclose(model(padded, lengths, image_features=features), logits, atol=1e-5)
        # Texts moved to other images: the prediction depends on the text.
        moved = model(ids.roll(1, 0), lengths.roll(1, 0), image_features=features)
        assert (moved - logits).abs().max() > 1e-3
        # The same tokens in reverse order: word order is read too.
        reversed_ids = ids.clone()
        reversed_ids[0] = ids[0].flip(0)  # row 0 is full length
        assert (model(reversed_ids, lengths, image_features=features)[0] - logits[0]).abs().max() > 1e-4


def packed_gru_state(encoder, ids, lengths):
    """The reference Model A's GRU branch is checked against: the packed run (the GRU stops at
    each real length), an empty text's state zeroed."""
    x = encoder.embed(ids)
    packed = pack_padded_sequence(x, lengths.clamp(min=1), batch_first=True, enforce_sorted=False)
    _, state = encoder.gru(packed)
    return state[0] * (lengths > 0).unsqueeze(1)


def test_gru_gathered_at_the_last_real_token_equals_the_packed_run():
    # The padded run's output at lengths - 1 is the packed result, forward and backward, with
    # any padding after it; an empty text stays a zero vector.
    encoder = small_model("a").text_encoder.train()
    ids, lengths, _ = batch(size=6, length=12)
    lengths[4] = 0
    ids[4] = 0
    padded = torch.cat([ids, torch.zeros(6, 7, dtype=ids.dtype)], dim=1)
    results = []
    for run in (lambda: packed_gru_state(encoder, ids, lengths), lambda: encoder(ids, lengths),
                lambda: encoder(padded, lengths)):
        encoder.zero_grad()
        state = run()
        (state * torch.linspace(-1, 1, state.shape[1])).sum().backward()
        results.append((state.detach(), [p.grad.clone() for p in encoder.parameters()]))
    (reference, reference_grads), *gathered = results
    assert torch.equal(reference[4], torch.zeros(64)) and reference.abs().sum() > 0
    for state, grads in gathered:
        torch.testing.assert_close(state, reference, rtol=0, atol=1e-6)
        for grad, reference_grad in zip(grads, reference_grads):
            torch.testing.assert_close(grad, reference_grad, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["a", "b"])
def test_embedding_dropout_drops_what_the_encoder_reads_in_training_only(arch):
    plain = small_model(arch).text_encoder
    dropped = small_model(arch, embed_dropout=0.5).text_encoder
    ids, lengths, _ = batch(size=6, length=12)
    # A's GRU reads the lengths, B's encoder the pad mask
    second = lengths if arch == "a" else ids == 0
    assert torch.equal(dropped.eval()(ids, second), plain.eval()(ids, second))
    read = []
    reader = dropped.gru if arch == "a" else dropped.encoder
    reader.register_forward_pre_hook(lambda module, inputs: read.append(inputs[0]))
    dropped.train()(ids, second)
    real = ids != 0
    embedded, seen = plain.embed(ids)[real], read[0][real]  # (tokens, D) each
    kept = seen != 0
    # about half of the entries of the 32 real tokens are zeroed (sd under 0.016), the rest scaled by 2
    assert abs(kept.float().mean().item() - 0.5) < 0.1
    torch.testing.assert_close(seen[kept], 2 * embedded[kept])


@pytest.mark.parametrize("arch", ["a", "b"])
def test_empty_text_gives_a_zero_text_vector(arch):
    model = small_model(arch).eval()
    ids, lengths, images = batch()
    empty = torch.zeros(4, dtype=torch.int16)
    with torch.no_grad():
        features = model.image_features(images)
        text, _ = model.text_vector(torch.zeros_like(ids), empty, features)
        assert torch.equal(text, torch.zeros_like(text))
        all_pad = model(torch.zeros_like(ids), empty, image_features=features)
        no_tokens = model(ids[:, :0], empty, image_features=features)  # a batch trimmed to length 0
    assert torch.isfinite(all_pad).all() and torch.allclose(all_pad, no_tokens, atol=1e-5)
    # One empty row inside a normal batch: its neighbours are unchanged...
    mixed_ids, mixed_lengths = ids.clone(), lengths.clone()
    mixed_ids[1], mixed_lengths[1] = 0, 0
    with torch.no_grad():
        mixed = model(mixed_ids, mixed_lengths, image_features=features)
        normal = model(ids, lengths, image_features=features)
    assert torch.allclose(mixed[[0, 2, 3]], normal[[0, 2, 3]], atol=1e-5)
    # ...and training on it (no inference fast paths, dropout on) gives finite gradients.
    model.train()
    model(mixed_ids, mixed_lengths, image_features=features).sum().backward()
    gradients = [p.grad for p in model.parameters() if p.grad is not None]
    assert gradients and all(torch.isfinite(g).all() for g in gradients)


def test_model_b_sees_49_regions_at_224():
    model = small_model("b", input_size=224).eval()
    _, _, images = batch(size=2)
    with torch.no_grad():
        features = model.image_features(images)
    assert features["regions"].shape == (2, 49, 512) and features["pooled"].shape == (2, 512)
    assert torch.allclose(features["regions"].mean(1), features["pooled"], atol=1e-5)
    assert model.region_position.weight.shape == (49, 64)
    assert "regions" not in small_model("b", cross_attention=False).image_features(images)


def test_cross_attention_weights_vary_over_regions():
    model = small_model("b").eval()
    # Crafted input: identical region tokens except one. Over a single key (the reference's
    # pooled vector) softmax is 1 whatever the input; over a grid the odd region stands out.
    regions = torch.zeros(2, 49, 64)
    regions[:, 10] = 3 * torch.randn(64, generator=torch.Generator().manual_seed(0))
    text = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out, weights = model.cross_attention(text, regions, need_weights=True)
    assert out.shape == (2, 5, 64) and weights.shape == (2, 5, 49)
    assert torch.allclose(weights.sum(-1), torch.ones(2, 5), atol=1e-5)
    assert (weights[..., 10] - weights[..., 0]).abs().min() > 1e-3  # the odd region is weighted differently
    assert torch.allclose(weights[..., 0], weights[..., 48], atol=1e-6)  # identical regions alike


def test_model_b_returns_its_attention_over_regions_for_every_real_token():
    model = small_model("b").eval()
    ids, lengths, images = batch()
    with torch.no_grad():
        logits, attention = model(ids, lengths, images=images, return_attention=True)
        plain = model(ids, lengths, images=images)
    assert torch.allclose(logits, plain, atol=1e-5)  # need_weights takes the unfused kernel
    assert attention.shape == (4, ids.shape[1], 4)  # 64 px input: a 2x2 region grid
    for row, length in enumerate(lengths.tolist()):
        assert torch.allclose(attention[row, :length].sum(-1), torch.ones(length), atol=1e-5)
    with torch.no_grad():
        assert small_model("a").eval()(ids, lengths, images=images, return_attention=True)[1] is None


@pytest.mark.parametrize("arch", ["a", "b"])
def test_model_on_another_device_with_lengths_on_the_cpu(arch):
    # Batches serves `lengths` on the device, but the demo and other callers may pass them on
    # the CPU: the model moves them. With no GPU here, the "meta" device stands in: it raises
    # the same "not on the expected device" error a CUDA run would.
    model = build_model(ModelConfig(arch=arch, pretrained=False, vocab_size=100, input_size=64)).to("meta")
    input_ids = torch.randint(1, 100, (4, 7)).to("meta")
    lengths = torch.tensor([7, 3, 0, 5])
    images = torch.empty(4, 75, 75, dtype=torch.uint8, device="meta")
    features = model.image_features(images)
    assert model(input_ids, lengths, image_features=features).shape == (4, 7)
    assert model(input_ids, lengths, images=images).device.type == "meta"


@pytest.mark.parametrize("arch", ["a", "b"])
def test_image_only_model_ignores_the_text(arch):
    model = small_model(arch, modality="image").eval()
    assert not any(name.startswith(("text_encoder", "cross_attention", "region_")) for name, _ in
                   model.named_parameters())
    assert model.head[0 if arch == "a" else 1].in_features == 512  # the pooled image vector alone
    ids, lengths, images = batch()
    with torch.no_grad():
        features = model.image_features(images)
        logits = model(ids, lengths, images=images)
        other_text = model(torch.randint(1, VOCAB, (4, 3)), torch.tensor([3, 0, 2, 1]), image_features=features)
        other_image, attention = model(ids, lengths, images=images.roll(1, 0), return_attention=True)
    assert set(features) == {"pooled"}  # Model B caches no region tokens for an image-only run
    assert torch.allclose(logits, other_text, atol=1e-5) and attention is None
    assert (other_image - logits).abs().max() > 1e-3  # the image is read


@pytest.mark.parametrize("arch", ["a", "b"])
def test_text_only_model_ignores_the_image_and_has_no_trunk(arch):
    model = small_model(arch, modality="text").eval()
    assert model.image_encoder is None and models.parameter_counts(model)[1] == 0
    assert not any(name.startswith(("image_encoder", "cross_attention", "region_")) for name, _ in
                   model.named_parameters())
    assert model.head[0 if arch == "a" else 1].in_features == 64  # the text vector alone
    ids, lengths, images = batch()
    with torch.no_grad():
        logits = model(ids, lengths)
        assert torch.equal(model(ids, lengths, images=images), logits)
        assert torch.equal(model(ids, lengths, images=images.roll(1, 0), image_features={}), logits)
        assert (model(ids.roll(1, 0), lengths.roll(1, 0)) - logits).abs().max() > 1e-3  # the text is read
    with pytest.raises(ValueError, match="text-only model"):
        model.image_features(images)
    with pytest.raises(ValueError, match="unknown modality 'audio'"):
        build_model(small_config(arch, modality="audio"))


@pytest.mark.parametrize("arch", ["a", "b"])
def test_parameter_groups_decay_only_matrices_and_slow_the_trunk(arch):
    model = small_model(arch, finetune=True)
    groups = train.parameter_groups(model, lr=1e-3, weight_decay=0.05, backbone_lr_scale=0.1)
    assert [g["name"] for g in groups] == ["head", "head no decay", "trunk", "trunk no decay"]
    where = {id(p): g for g in groups for p in g["params"]}
    assert len(where) == sum(len(g["params"]) for g in groups)  # no parameter twice
    assert len(where) == len([p for p in model.parameters() if p.requires_grad])  # none left out
    undecayed = (torch.nn.BatchNorm2d, torch.nn.LayerNorm, torch.nn.Embedding)
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            group = where[id(parameter)]
            assert group["weight_decay"] == (0.0 if isinstance(module, undecayed) or "bias" in name else 0.05), name
    for group in groups:
        trunk = group["name"].startswith("trunk")
        assert group["lr"] == group["base_lr"] == pytest.approx(1e-4 if trunk else 1e-3)
        assert all((id(p) in {id(q) for q in trunk_parameters(model)}) == trunk for p in group["params"])
    frozen = train.parameter_groups(small_model(arch), lr=1e-3, weight_decay=0.05, backbone_lr_scale=0.1)
    assert [g["name"] for g in frozen] == ["head", "head no decay"]
    assert train.default_backbone_lr_scale(small_config(arch)) == 1.0  # a random trunk
    assert train.default_backbone_lr_scale(small_config(arch, pretrained=True)) == 0.1
