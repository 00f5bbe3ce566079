"""What a prediction rests on: token effects, the attention or occlusion heatmap, and the
figure that shows them (demo.py --explain).

    effects, heat = explain_text(model, crop, input_ids, length, target, device, temperature=t)
    save_explanation("explain.png", model, tokenizer, info, checkpoint, inputs, probs, device, name)

Each token's effect is the drop in P(target) when the sentence is read without it, all tokens
in one batch. The heatmap is Model B's cross-attention over its region grid, or for a model
without one (Model A) the drop in P(target) when each cell of a 7 x 7 grid is grayed. The
figure puts the photo with its face boxes, the crop under its heatmap, the probabilities and
the shaded sentence on one PNG, written atomically.

Each explanation is a batch of predictions on changed inputs, made with the recognizer's
`predict` (calibrated probabilities); demo.py imports `pyplot` from here for --examples.
"""
import itertools
import textwrap

import numpy as np
import torch

from data import BLANK_PIXEL
from recognizer import MODALITY_NAMES, predict
from runtime import DataError, atomic_write

# Model A's map: 7 x 7 patches, Model B's region grid at 224 px
OCCLUSION_GRID = 7
# the sentence in the explain figure: characters per line, and inches per line
WRAP = 80
LINE_INCHES = 0.27


def pyplot():
    """matplotlib.pyplot, drawing to files: imported only for a figure (start-up time)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


@torch.inference_mode()
def explain_text(model, crop, input_ids, length, target, device, *, temperature):
    """Leave-one-token-out in one batch: row 0 is the sentence, row 1 + i drops token i.
    -> the effect of each token on P(target) [n] (positive: it pushes towards target), and Model B's
    cross-attention on row 0 as a (g, g) map over the region grid (None without one)."""
    if length == 0 or not model.uses_text:
        return torch.zeros(0), None
    ids = input_ids[0, :length].long()  # (n,)
    keep = ~torch.eye(length, dtype=torch.bool)  # (n, n): all but token i
    batch = torch.zeros(length + 1, length, dtype=torch.long)  # (n + 1, n)
    batch[0] = ids
    batch[1:, :length - 1] = ids.expand(length, length)[keep].view(length, length - 1)
    lengths = torch.tensor([length] + [length - 1] * length)
    features = None
    if model.uses_image:
        # the trunk runs once, not n + 1 times
        features = model.image_features(crop[None].to(device))
        features = {name: value.expand(length + 1, *value.shape[1:]) for name, value in features.items()}
    logits, attention = model(batch.to(device), lengths, image_features=features, return_attention=True)
    probs = (logits.float() / temperature).softmax(1).cpu()  # (n + 1, C)
    effects = probs[0, target] - probs[1:, target]  # (n,)
    if attention is None:
        return effects, None
    regions = attention[0, :length].float().mean(0).cpu()  # (R,): mean over tokens
    grid = int(round(regions.numel() ** 0.5))
    return effects, regions.view(grid, grid)


def occlusion_map(model, crop, input_ids, lengths, target, device, *, temperature):
    """Hide each cell of a grid with a gray patch, all cells in one batch, and map the drop
    in P(target) -> (grid, grid). For models without attention over the regions."""
    size = crop.shape[-1]
    grid = OCCLUSION_GRID
    edges = torch.linspace(0, size, grid + 1).round().long().tolist()
    images = crop.repeat(grid * grid + 1, 1, 1)  # (1 + grid^2, S, S); row 0 whole
    for cell in range(grid * grid):
        row, col = divmod(cell, grid)
        images[1 + cell, edges[row]:edges[row + 1], edges[col]:edges[col + 1]] = BLANK_PIXEL
    count = len(images)
    probs = predict(model, images, input_ids.expand(count, -1), lengths.expand(count), device,
                    temperature=temperature)
    return (probs[0, target] - probs[1:, target]).view(grid, grid)


def sentence_lines(text, offsets, effects, cut):
    """The sentence wrapped at WRAP characters (inside a word only when it is longer than a
    line) -> lines of (string, style) runs; style: a token's effect, None for the gaps between
    tokens, "cut" for the bar where the model stopped reading, "past" for the text after it."""
    pieces = []
    end = 0
    for (start, stop), effect in zip(offsets, effects.tolist()):
        pieces += [(text[end:start], None), (text[start:stop], effect)]
        end = stop
    pieces += [(" |", "cut"), (text[end:], "past")] if cut else [(text[end:], None)]
    # the default font has no emoji: one "?" keeps the character count
    shown = "".join(ch if ord(ch) <= 0xFFFF else "?" for piece, _ in pieces for ch in piece)
    owners = [index for index, (piece, _) in enumerate(pieces) for _ in piece]
    lines = []
    start = 0
    # without dropping whitespace, the lines put together are `shown` again
    for line in textwrap.wrap(shown, WRAP, expand_tabs=False, drop_whitespace=False):
        stop = start + len(line)
        lines.append([("".join(shown[i] for i in run), pieces[owner][1])
                      for owner, run in itertools.groupby(range(start, stop), key=owners.__getitem__)])
        start = stop
    return lines


def draw_sentence(fig, ax, lines, effects, label, max_len, cut):
    """The wrapped sentence, each token shaded by its leave-one-out effect, with the shading's scale."""
    plt = pyplot()
    from matplotlib.colors import ListedColormap, Normalize
    from matplotlib.transforms import ScaledTranslation
    ax.axis("off")
    title = f"each token shaded by how much P({label}) drops without it (red: towards it, blue: away)"
    cut_note = f"\ngray, after the red bar: past the model's {max_len} tokens, never read"
    ax.set_title(title + (cut_note if cut else ""), fontsize=10, loc="left")
    # The largest effect gets the strongest shade (never for less than 0.05: small effects stay
    # pale); the shades stop short of the colormap's dark ends, where black text is unreadable.
    limit = max(float(effects.abs().max()), 0.05)
    cmap = ListedColormap(plt.get_cmap("RdBu_r")(np.linspace(0.15, 0.85, 256)))
    norm = Normalize(-limit, limit)
    for row, line in enumerate(lines):
        previous = None
        for piece, style in line:
            # a line starts at its first word
            piece = piece if previous is not None else piece.lstrip()
            if not piece:
                continue
            color = "0.55" if style == "past" else "black"
            font = dict(fontsize=13, family="monospace", va="top", color=color)
            if style == "cut":
                font.update(color="red", weight="bold")
            elif isinstance(style, float):
                # pad 0: a padded box would paint over the neighbouring letters
                font["bbox"] = dict(facecolor=cmap(norm(style)), edgecolor="none", pad=0)
            if previous is None:
                shift = ScaledTranslation(0, -row * LINE_INCHES, fig.dpi_scale_trans)
                previous = ax.text(0.0, 1.0, piece, transform=ax.transAxes + shift, **font)
            else:
                # the next piece starts where the last one ended (matplotlib's "rainbow text")
                previous = ax.annotate(piece, xy=(1, 1), xycoords=previous, **font)
    bar = fig.colorbar(plt.cm.ScalarMappable(norm, cmap), cax=ax.inset_axes([0.76, 1.04, 0.22, 0.06]),
                       orientation="horizontal")
    bar.set_label(f"P({label}) with - without the token", fontsize=8)
    bar.ax.tick_params(labelsize=7)


def draw_heat(fig, ax, crop, heat, kind, label):
    """The crop under its heatmap, the grid it was measured on, and a labelled colour bar."""
    size = crop.shape[-1]
    ax.axis("off")
    if heat is None:
        ax.text(0.5, 0.5, "no heatmap: a text-only model\nhas no image branch", ha="center",
                transform=ax.transAxes)
        return
    ax.imshow(crop.numpy(), cmap="gray", vmin=0, vmax=255)
    grid = heat.shape[0]
    shown = heat.clamp(min=0)
    top = float(shown.max())
    if kind == "attention":
        title = f"cross-attention over the trunk's {grid}x{grid} regions"
        legend = f"share of the words' attention (even: 1/{grid * grid} = {1 / grid ** 2:.3f}, the bar)"
        # even attention sits mid-scale, not at the top as if it were sharp
        top = max(top, 2 / grid ** 2)
    else:
        title = f"occlusion: each of {grid}x{grid} patches grayed"
        legend = f"drop in P({label}); below 0 clipped to 0 (lowest {float(heat.min()):+.2g})"
    # From 0, with a scale: a nearly even map must not look like a sharp one.
    image = ax.imshow(shown.numpy(), cmap="jet", alpha=0.45, interpolation="bilinear", vmin=0,
                      vmax=top or 1e-6, extent=(-0.5, size - 0.5, size - 0.5, -0.5))
    for edge in torch.linspace(0, size, grid + 1)[1:-1].tolist():
        ax.axhline(edge - 0.5, color="white", lw=0.6, alpha=0.7)
        ax.axvline(edge - 0.5, color="white", lw=0.6, alpha=0.7)
    bar = fig.colorbar(image, ax=ax, orientation="horizontal", fraction=0.05, pad=0.03)
    bar.set_label(legend, fontsize=8)
    bar.ax.tick_params(labelsize=7)
    if kind == "attention":
        bar.ax.axvline(1 / grid ** 2, color="black", lw=1.5)
    ax.set_title(f"what the model saw ({size} px)\n{title}", fontsize=10)


def draw_photo(ax, inputs, name, reads_image):
    """The photo with its face boxes and the crop square, or why there is none."""
    plt = pyplot()
    ax.axis("off")
    if inputs.photo is None:
        why = "no --image: a blank gray face" if reads_image else "a text-only model reads no image"
        ax.text(0.5, 0.5, why, ha="center", va="center", fontsize=11, transform=ax.transAxes)
        return
    # draw at most ~800 px: a 12 MP photo is slow to render
    step = -(-max(inputs.photo.shape[:2]) // 800)
    height, width = inputs.photo.shape[:2]
    ax.imshow(inputs.photo[::step, ::step], cmap="gray", vmin=0, vmax=255, extent=(0, width, height, 0))
    for index, (x, y, w, h) in enumerate(inputs.boxes):
        ax.add_patch(plt.Rectangle((x, y), w, h, fill=False, lw=2, color="yellow" if index else "lime"))
    x, y, side = inputs.squares[0]
    ax.add_patch(plt.Rectangle((x, y), side, side, fill=False, lw=1.5, ls="--", color="white"))
    found = f"{len(inputs.boxes)} face(s), green: explained" if inputs.boxes else "no face found"
    ax.set_title(f"{name}\n{found}; dashed: the crop", fontsize=10)


def save_explanation(path, model, tokenizer, info, checkpoint, inputs, probs, device, name):
    """One PNG: the photo with its face boxes, the crop with a heatmap, the shaded sentence, the bars."""
    plt = pyplot()
    classes = info["classes"]
    target = int(probs.argmax())
    temperature = info["temperature"]
    cfg = model.cfg
    length = int(inputs.lengths[0])
    effects, heat = explain_text(model, inputs.crops[0], inputs.input_ids, length, target, device,
                                 temperature=temperature)
    kind = "attention" if heat is not None else "occlusion"
    if heat is None and model.uses_image:
        heat = occlusion_map(model, inputs.crops[0], inputs.input_ids, inputs.lengths, target, device,
                             temperature=temperature)
    lines = sentence_lines(inputs.text, tokenizer.encode(inputs.text).offsets[:length], effects,
                           inputs.truncated)
    sentence_inches = 0.8 + LINE_INCHES * len(lines)
    fig = plt.figure(figsize=(13, 5.2 + sentence_inches))
    grid = fig.add_gridspec(2, 3, height_ratios=[5.2, sentence_inches], width_ratios=[1.2, 1, 1.1])
    # a trunk taken from another run (train.py --trunk-from) has learned the faces there
    learned = cfg.pretrained or cfg.finetune or (info.get("args") or {}).get("trunk_from")
    random_trunk = model.uses_image and not learned
    mark = " [random trunk: not pretrained, not fine-tuned]" if random_trunk else ""
    fig.suptitle(f"Model {cfg.arch.upper()}, {MODALITY_NAMES[cfg.modality]}{mark}: {checkpoint}", fontsize=11)
    draw_photo(fig.add_subplot(grid[0, 0]), inputs, name, model.uses_image)
    draw_heat(fig, fig.add_subplot(grid[0, 1]), inputs.crops[0], heat, kind, classes[target])
    ax = fig.add_subplot(grid[0, 2])
    colors = ["tab:red" if index == target else "tab:gray" for index in range(len(classes))]
    ax.barh(classes[::-1], probs.tolist()[::-1], color=colors[::-1])
    ax.set_xlim(0, 1)
    ax.set_title(f"{classes[target]} ({float(probs[target]):.0%}; temperature {temperature:.2f})")
    ax = fig.add_subplot(grid[1, :])
    if length:
        draw_sentence(fig, ax, lines, effects, classes[target], cfg.max_len, inputs.truncated)
    else:
        ax.axis("off")
        why = "no --text: an empty sentence" if model.uses_text else "an image-only model reads no text"
        ax.set_title(why, fontsize=10, loc="left")
    fig.tight_layout()
    try:
        with atomic_write(path) as tmp:
            fig.savefig(tmp, format="png", dpi=80)
    except OSError as err:
        raise DataError(f"cannot write {path}: {err.strerror or err}") from None
    finally:
        plt.close(fig)


def save_timeline(path, faces, lines, classes, max_panels=4):
    """One PNG: for each face id (the `max_panels` seen in the most frames), its calibrated
    probabilities over time, one curve per class, with the subtitle lines shaded and labelled.
    `faces`: [(time, face id, frame, box, label, probabilities [C])] (demo.read_timeline)."""
    plt = pyplot()
    seen = {}
    for at, face, _, _, _, probs in faces:
        seen.setdefault(face, []).append((at, probs))
    shown = sorted(seen, key=lambda face: -len(seen[face]))[:max_panels] or [None]
    fig, axes = plt.subplots(len(shown), 1, figsize=(10, 2.6 * len(shown)), sharex=True, squeeze=False)
    for ax, face in zip(axes[:, 0], shown):
        for line in lines:
            ax.axvspan(line.start, line.end, color="0.9")
            ax.text(line.start, 0.98, textwrap.shorten(line.text, 40), fontsize=7, va="top",
                    transform=ax.get_xaxis_transform())
        if face is None:
            ax.set_title("no face found")
            continue
        times = [at for at, _ in seen[face]]
        probs = np.stack([p for _, p in seen[face]])  # (T, C)
        for c, name in enumerate(classes):
            ax.plot(times, probs[:, c], label=name, lw=1.2)
        ax.set_ylim(0, 1)
        ax.set_ylabel(f"face {face}")
    axes[0, 0].legend(loc="lower left", bbox_to_anchor=(0, 1.02), fontsize=7, ncol=len(classes), frameon=False)
    axes[-1, 0].set_xlabel("seconds")
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
