"""``trainwire demo``: train a small CNN on handwritten digits and watch it live.

The first thing a new user runs, so it has to work offline, on a laptop CPU, in
about a minute, and still look like real training: scikit-learn's bundled 8x8
digits (no download), a small convolutional network with BatchNorm, AdamW with a
one-cycle learning-rate schedule, a stratified validation split, and every
metric streamed to the dashboard as it happens.

PyTorch, scikit-learn and tqdm are imported inside :func:`run_demo` only: they
are the ``demo`` extra, and the core package must stay importable without them.
"""

from __future__ import annotations

import importlib
import os
import sys
import time
from typing import Any, Final

__all__ = ["run_demo"]

PROJECT: Final = "digits-demo"
# Measured on a 2-core CPU: about 0.8 s an epoch with logging, plus some 6 s to
# import torch and scikit-learn and to finish, so `trainwire demo` takes about a
# minute end to end: long enough to open the dashboard and watch it train.
DEFAULT_EPOCHS: Final = 65
BATCH_SIZE: Final = 32
LR: Final = 3e-3
WEIGHT_DECAY: Final = 1e-2
WIDTH: Final = 32
DROPOUT: Final = 0.25
# One pixel of random shift: the images are only 8x8, so a larger shift would
# push strokes off the canvas; one is enough to stop the net memorising pixels.
MAX_SHIFT: Final = 1
VAL_FRACTION: Final = 0.2
SEED: Final = 0

INSTALL_HINT: Final = "install them with: pip install 'trainwire[demo]'"


def run_demo(epochs: int | None = None, url: str | None = None) -> int:
    """Train a CNN on scikit-learn's digits, streaming its metrics to trainwire.

    Prints the run's dashboard address before training starts, shows a progress
    bar while it trains, and a summary at the end.

    Args:
        epochs: passes over the training set; by default enough for about a minute
            on a laptop CPU.
        url: the trainwire server; else ``TRAINWIRE_URL``; else the local server,
            started in the background if none runs.

    Returns:
        the exit status: 0 when done, 1 when the demo's dependencies are missing,
        2 for a bad ``epochs``, 130 when interrupted with Ctrl-C.
    """
    try:
        # Only checked here; the helpers import what they use. torch first: it is
        # the one most likely missing, and the one the message should name.
        for module in ("torch", "sklearn", "tqdm"):
            importlib.import_module(module)
    except ImportError as exc:
        missing = exc.name or "a dependency"
        print(
            f"trainwire demo needs PyTorch, scikit-learn and tqdm ({missing} is missing);\n"
            f"{INSTALL_HINT}",
            file=sys.stderr,
        )
        return 1
    if epochs is None:
        epochs = DEFAULT_EPOCHS
    if epochs < 1:
        print(f"trainwire demo: --epochs must be at least 1, not {epochs}", file=sys.stderr)
        return 2

    import trainwire
    from trainwire.protocol.messages import RunStatus

    run: trainwire.Run | None = None
    try:
        data = _load_digits()
        config = {
            "dataset": "sklearn digits 8x8",
            "model": f"cnn {WIDTH}-{2 * WIDTH}-{2 * WIDTH}",
            "epochs": epochs,
            "batch_size": BATCH_SIZE,
            "optimizer": "AdamW",
            "lr": LR,
            "weight_decay": WEIGHT_DECAY,
            "schedule": "OneCycleLR",
            "dropout": DROPOUT,
            "max_shift": MAX_SHIFT,
            "train_size": len(data["y_train"]),
            "val_size": len(data["y_val"]),
            "seed": SEED,
        }
        run = trainwire.init(project=PROJECT, name=f"cnn-lr{LR:g}", config=config, url=url)
        # Before training, and flushed: the user opens this while the curves grow.
        print(f"Dashboard: {run.url}", flush=True)
        started = time.perf_counter()
        val_loss, val_acc = _train(run, data, epochs)
        elapsed = time.perf_counter() - started
    except KeyboardInterrupt:
        if run is not None:
            # Deliver what was logged so far. "crashed" is how trainwire marks any
            # run ended by an exception (see Run.__exit__): it did not run to the end.
            run.finish(timeout=10.0, status=RunStatus.CRASHED)
            print(f"\nInterrupted. The partial run is at: {run.url}", file=sys.stderr)
        return 130

    run.finish()
    print(
        f"\nDone: {epochs} epoch{'s' if epochs > 1 else ''} in {elapsed:.0f} s, "
        f"validation accuracy {val_acc:.1%} (loss {val_loss:.3f})."
    )
    print(f"Dashboard: {run.url}")
    if not run.delivered:
        print("Some metrics did not reach the server; see the warnings above.")
    elif url is None and not os.environ.get("TRAINWIRE_URL"):
        print(
            "The run stays viewable there: the local trainwire server keeps running "
            "in the background (`trainwire stop` ends it)."
        )
    else:
        print("The run stays viewable there.")
    return 0


def _load_digits() -> dict[str, Any]:
    """Digits as float tensors in [0, 1], split stratified with a fixed seed.

    Standardisation happens per batch in the training loop, after the random
    shift: shifting raw images pads with 0, which is exactly the blank background.
    """
    import torch
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype("float32") / 16.0  # pixels are 0..16 ink levels
    x_train, x_val, y_train, y_val = train_test_split(
        images,
        digits.target,
        test_size=VAL_FRACTION,
        stratify=digits.target,
        random_state=SEED,
    )
    x_train_t = torch.from_numpy(x_train).unsqueeze(1)  # (N, 1, 8, 8): one channel
    # Statistics of the training split only, so validation stays unseen.
    mean, std = x_train_t.mean().item(), x_train_t.std().item()
    return {
        "x_train": x_train_t,
        "y_train": torch.from_numpy(y_train).long(),
        "x_val": torch.from_numpy(x_val).unsqueeze(1),
        "y_val": torch.from_numpy(y_val).long(),
        "mean": mean,
        "std": std,
    }


def _build_model() -> Any:
    from torch import nn

    wide = 2 * WIDTH
    return nn.Sequential(
        # bias=False: the BatchNorm right after adds its own shift.
        nn.Conv2d(1, WIDTH, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(WIDTH),
        nn.ReLU(),
        nn.Conv2d(WIDTH, wide, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(wide),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 8x8 -> 4x4
        nn.Conv2d(wide, wide, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(wide),
        nn.ReLU(),
        nn.MaxPool2d(2),  # 4x4 -> 2x2
        nn.Flatten(),
        nn.Dropout(DROPOUT),
        nn.Linear(wide * 2 * 2, 10),
    )


def _random_shift(images: Any, generator: Any) -> Any:
    """Each image moved by up to ``MAX_SHIFT`` pixels in x and y, independently.

    Done as one gather over a zero-padded batch rather than a Python loop over
    images, which would cost more than the network itself at this size.
    """
    import torch
    import torch.nn.functional as F

    n, _, height, width = images.shape
    padded = F.pad(images, (MAX_SHIFT,) * 4)
    span = 2 * MAX_SHIFT + 1
    dy = torch.randint(0, span, (n, 1, 1), generator=generator)
    dx = torch.randint(0, span, (n, 1, 1), generator=generator)
    rows = dy + torch.arange(height).view(1, height, 1)
    cols = dx + torch.arange(width).view(1, 1, width)
    index = torch.arange(n).view(n, 1, 1)
    return padded[index, 0, rows, cols].unsqueeze(1)


def _train(run: Any, data: dict[str, Any], epochs: int) -> tuple[float, float]:
    """The training loop; returns the last validation loss and accuracy."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    torch.manual_seed(SEED)
    # A generator of its own for shuffling and shifts, so that they do not depend
    # on how many random numbers model initialisation or dropout drew.
    generator = torch.Generator().manual_seed(SEED)
    model = _build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    x_train, y_train = data["x_train"], data["y_train"]
    mean, std = data["mean"], data["std"]
    x_val = (data["x_val"] - mean) / std
    y_val = data["y_val"]
    # Dropping the ragged last batch keeps BatchNorm statistics sound and every
    # step the same size; reshuffling each epoch still uses every image.
    steps_per_epoch = len(y_train) // BATCH_SIZE
    total_steps = epochs * steps_per_epoch
    # One-cycle: warm up, then anneal far below the start, so the lr curve on the
    # dashboard visibly moves and the loss settles at the end.
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LR, total_steps=total_steps)

    step = 0
    val_loss = val_acc = float("nan")
    with tqdm(total=total_steps, desc=f"epoch 1/{epochs}", unit="step", dynamic_ncols=True) as bar:
        for epoch in range(1, epochs + 1):
            bar.set_description(f"epoch {epoch}/{epochs}")
            model.train()
            order = torch.randperm(len(y_train), generator=generator)
            for first in range(0, steps_per_epoch * BATCH_SIZE, BATCH_SIZE):
                batch = order[first : first + BATCH_SIZE]
                inputs = (_random_shift(x_train[batch], generator) - mean) / std
                targets = y_train[batch]
                logits = model(inputs)
                # Any: torch leaves Tensor.backward unannotated, which --strict rejects.
                loss: Any = F.cross_entropy(logits, targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                # The lr this step used: read it before the scheduler moves it on.
                lr = scheduler.get_last_lr()[0]
                optimizer.step()
                scheduler.step()
                step += 1
                acc = (logits.argmax(dim=1) == targets).float().mean()
                # Tensors go in as they are: trainwire turns them into floats on
                # its own thread, so logging never waits for the device.
                run.log({"train/loss": loss.detach(), "train/acc": acc, "lr": lr}, step=step)
                postfix = {"loss": f"{loss.item():.3f}", "acc": f"{acc.item():.2f}"}
                if epoch > 1:
                    postfix["val_acc"] = f"{val_acc:.3f}"
                bar.set_postfix(postfix, refresh=False)
                bar.update()

            model.eval()
            with torch.no_grad():
                # 360 images of 8x8: one batch is cheaper than a loader.
                logits = model(x_val)
                val_loss = F.cross_entropy(logits, y_val).item()
                val_acc = (logits.argmax(dim=1) == y_val).float().mean().item()
            run.log({"val/loss": val_loss, "val/acc": val_acc}, step=step)
    return val_loss, val_acc
