# mypy: disallow-untyped-calls=False
# (torch's autograd calls, backward() and cuda.Event(), are untyped.)
"""Step-time overhead of logging every step, on a GPU (issue 5, target 3).

Reproduces the anchor table of issue 5 with trainwire as a column:

    loop | none | loss.item() | TensorBoard | pinned+event | device ring | trainwire

Two loops: a launch-bound MLP (~1.4 ms/step on an H200) and a compute-bound
4-layer transformer (~25 ms/step). Each method runs in interleaved repetitions
(A B C ... A B C ...), steps timed after warm-up, and the medians are compared
with the no-logging median of the same run. Needs only torch and trainwire
(TensorBoard's column is skipped when tensorboard is not installed).

    python bench/gpu_overhead.py              # on a CUDA machine, about 4 minutes
    python bench/gpu_overhead.py --device cpu --quick   # smoke test of the script
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

RESULTS = Path(__file__).parent / "results"


def mlp(device: str) -> tuple[nn.Module, Callable[[], torch.Tensor]]:
    model = nn.Sequential(*[m for _ in range(6) for m in (nn.Linear(512, 512), nn.ReLU())])
    model.append(nn.Linear(512, 10))
    model.to(device)
    x = torch.randn(64, 512, device=device)
    y = torch.randint(0, 10, (64,), device=device)
    return model, lambda: nn.functional.cross_entropy(model(x), y)


def transformer(device: str, quick: bool) -> tuple[nn.Module, Callable[[], torch.Tensor]]:
    width, seq, batch = (64, 32, 4) if quick or device == "cpu" else (1024, 1024, 16)
    layer = nn.TransformerEncoderLayer(width, 16, 4 * width, batch_first=True)
    model = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False).to(device)
    x = torch.randn(batch, seq, width, device=device)
    return model, lambda: model(x).square().mean()


class Method:
    """How a step logs its loss. ``after_step`` runs on the training thread."""

    name = ""

    def start(self) -> None: ...

    def after_step(self, step: int, loss: torch.Tensor, lr: float) -> None: ...

    def stop(self) -> None: ...


class NoLogging(Method):
    name = "no logging"


class Item(Method):
    name = "loss.item()"

    def after_step(self, step: int, loss: torch.Tensor, lr: float) -> None:
        self.last = loss.item()


class TensorBoard(Method):
    name = "TensorBoard add_scalar(loss.item())"

    def start(self) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.dir = tempfile.TemporaryDirectory()
        self.writer = SummaryWriter(self.dir.name)

    def after_step(self, step: int, loss: torch.Tensor, lr: float) -> None:
        self.writer.add_scalar("loss", loss.item(), step)

    def stop(self) -> None:
        self.writer.close()
        self.dir.cleanup()


def _split_done(
    copies: list[tuple[torch.Tensor, Any]],
) -> tuple[list[torch.Tensor], list[tuple[torch.Tensor, Any]]]:
    """(hosts whose copy is done, copies still pending): each event queried once, so
    an event that completes meanwhile is in one list, never in both or neither."""
    done: list[torch.Tensor] = []
    pending: list[tuple[torch.Tensor, Any]] = []
    for host, event in copies:
        if event is None or event.query():
            done.append(host)
        else:
            pending.append((host, event))
    return done, pending


class PinnedEvent(Method):
    name = "fresh pinned + async copy + event, reader thread"

    def start(self) -> None:
        self.queue: list[tuple[torch.Tensor, Any]] = []
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.reader = threading.Thread(target=self.read, daemon=True)
        self.reader.start()

    def after_step(self, step: int, loss: torch.Tensor, lr: float) -> None:
        host = torch.empty((), pin_memory=loss.is_cuda)
        host.copy_(loss.detach(), non_blocking=True)
        event = torch.cuda.Event() if loss.is_cuda else None
        if event is not None:
            event.record()
        with self.lock:
            self.queue.append((host, event))

    def read(self) -> None:
        while not self.done.is_set():
            with self.lock:
                ready, self.queue = _split_done(self.queue)
            self.values = [h.item() for h in ready]
            self.done.wait(0.001)

    def stop(self) -> None:
        self.done.set()
        self.reader.join()


class DeviceRing(Method):
    name = "device ring, one copy + event per 64 steps, reader thread"

    def start(self) -> None:
        self.ring: torch.Tensor | None = None
        self.copies: list[tuple[torch.Tensor, Any]] = []
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.reader = threading.Thread(target=self.read, daemon=True)
        self.reader.start()

    def after_step(self, step: int, loss: torch.Tensor, lr: float) -> None:
        if self.ring is None:
            self.ring = torch.empty(64, device=loss.device)
        self.ring[step % 64].copy_(loss.detach())
        if step % 64 == 63:
            host = torch.empty(64, pin_memory=loss.is_cuda)
            host.copy_(self.ring, non_blocking=True)
            event = torch.cuda.Event() if loss.is_cuda else None
            if event is not None:
                event.record()
            with self.lock:
                self.copies.append((host, event))

    def read(self) -> None:
        while not self.done.is_set():
            with self.lock:
                ready, self.copies = _split_done(self.copies)
            self.values = [h.tolist() for h in ready]
            self.done.wait(0.05)

    def stop(self) -> None:
        self.done.set()
        self.reader.join()


class Trainwire(Method):
    name = "trainwire run.log({loss, lr}) (zero sync)"

    def __init__(self, url: str | None, token: str | None) -> None:
        self.url = url
        self.token = token

    def start(self) -> None:
        import trainwire

        self.run = trainwire.init(
            project="bench-gpu",
            url=self.url,
            token=self.token,
            mode="online" if self.url else "offline",
        )

    def after_step(self, step: int, loss: torch.Tensor, lr: float) -> None:
        self.run.log({"train/loss": loss, "lr": lr}, step=step)

    def stop(self) -> None:
        self.run.finish(timeout=60)


def time_steps(
    step_fn: Callable[[], torch.Tensor],
    opt: torch.optim.Optimizer,
    method: Method,
    steps: int,
    warmup: int,
    device: str,
) -> float:
    """Mean step time in microseconds over a window of ``steps``, logging included.

    The window is timed from a synchronised start to a synchronised end: a
    launch-bound loop runs ahead of the GPU and a compute-bound one waits on it, so
    only the whole window's wall time is honest, stalls (a sync, a flush holding the
    GIL) included, which a median of per-step launch times would hide.
    """
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    method.start()
    for step in range(warmup + steps):
        if step == warmup:
            sync()
            started = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = step_fn()
        loss.backward()
        opt.step()
        method.after_step(step, loss, 1e-3)
    sync()
    elapsed = time.perf_counter() - started
    method.stop()
    return elapsed / steps * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--url", default=None, help="trainwire server (default: a local one)")
    parser.add_argument("--offline", action="store_true", help="trainwire writes a file only")
    parser.add_argument("--only", choices=["mlp", "transformer"], help="one loop only")
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu_overhead.json")
    args = parser.parse_args()
    # TF32 matmuls, as most GPU training runs them: the transformer is then ~25 ms/step.
    torch.set_float32_matmul_precision("high")
    began = time.perf_counter()
    reps = args.reps or (2 if args.quick else 7)
    if args.device == "cpu":
        torch.set_num_threads(1)  # a smoke test: keep it off the other core
    url, token = None, None
    if not args.offline:
        from trainwire.client.run import resolve_server
        from trainwire.settings import default_data_dir

        url, token = resolve_server(args.url, None, default_data_dir())
    methods: list[Method] = [
        NoLogging(),
        Item(),
        PinnedEvent(),
        DeviceRing(),
        Trainwire(url, token),
    ]
    try:
        import tensorboard  # noqa: F401

        methods.insert(2, TensorBoard())
    except ImportError:
        print("tensorboard not installed: its column is skipped")
    loops = {}
    if args.only in (None, "mlp"):
        loops["launch-bound MLP"] = mlp(args.device)
    if args.only in (None, "transformer"):
        loops["compute-bound transformer"] = transformer(args.device, args.quick)
    # Each timed window lasts about this long, whatever the machine: the whole bench
    # then takes 2 loops x 6 methods x reps windows, under 5 minutes at 7 reps.
    window_s = 0.3 if args.quick else 2.0
    results: dict[str, Any] = {"device": args.device, "reps": reps, "loops": {}}
    if args.device.startswith("cuda"):
        results["gpu"] = torch.cuda.get_device_name()
    for loop_name, (model, step_fn) in loops.items():
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        calibration = time_steps(step_fn, opt, NoLogging(), 20, 5, args.device)
        steps = max(20, round(window_s / (calibration * 1e-6)))
        print(f"\n{loop_name}: ~{calibration:.0f} us/step, {steps} steps per window", flush=True)
        runs: dict[str, list[float]] = {m.name: [] for m in methods}
        for rep in range(reps):  # interleaved: drift hits every method alike
            for method in methods:
                runs[method.name].append(
                    time_steps(step_fn, opt, method, steps, max(10, steps // 10), args.device)
                )
            print(
                f"  {loop_name}: repetition {rep + 1}/{reps} done"
                f" ({time.perf_counter() - began:.0f} s)",
                flush=True,
            )
        base = statistics.median(runs[NoLogging.name])
        print(f"\n{loop_name} ({args.device}, {reps} interleaved reps, mean step time per window)")
        print(f"  {'':58} {'median':>9}     {'vs none':>7}  {'paired':>7}  (min, max vs none)")
        table = {}
        for name, values in runs.items():
            median = statistics.median(values)
            spread = (min(values) / base - 1, max(values) / base - 1)
            # Each window against the no-logging window of its own repetition: drift
            # between repetitions cancels out.
            paired = statistics.median(
                v / b - 1 for v, b in zip(values, runs[NoLogging.name], strict=True)
            )
            table[name] = {
                "median_us": median,
                "overhead": median / base - 1,
                "paired_overhead": paired,
                "min_max": spread,
                "all_us": values,
            }
            print(
                f"  {name:58} {median:9.0f} us  {median / base - 1:+7.1%}  {paired:+7.1%}"
                f"  ({spread[0]:+.1%}, {spread[1]:+.1%})"
            )
        results["loops"][loop_name] = table
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))  # what is done, if cut short
    results["seconds"] = time.perf_counter() - began
    print(f"\ndone in {results['seconds']:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
