"""What a run records about itself: JSONL logs, throughput and where the time went, peak memory, and the
training-loss window that the progress bar and ``train_log.jsonl`` show."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import psutil
import torch
from accelerate import Accelerator
from tqdm.auto import tqdm


class JsonlWriter:
    """Appends JSON lines to a file on the main process."""

    def __init__(self, path: Path, accelerator: Accelerator) -> None:
        self.path, self.accelerator = path, accelerator

    def write(self, record: dict[str, Any], echo: bool = False) -> None:
        if not self.accelerator.is_main_process:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if echo:
            shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}
            tqdm.write(f"eval {shown}")


class PeakMemory:
    """Peak memory of one run: ``max_memory_allocated`` on a GPU (reset at the start), or on the CPU the
    highest resident set size sampled every 50 ms by a thread (the process-lifetime peak, ru_maxrss, would
    carry over from an earlier run in the same process, as in recipes/compare.py)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak = device, 0
        self._stop = threading.Event()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            return
        self._process = psutil.Process()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, self._process.memory_info().rss)
            if self._stop.wait(0.05):
                break

    @property
    def kind(self) -> str:
        return "cuda_max_allocated" if self.device.type == "cuda" else "cpu_rss_peak"

    def stop_mb(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        self._stop.set()
        self._thread.join()
        return self.peak / 2**20


class Throughput:
    """Samples trained on and where the time went: ``data`` (waiting for batches), ``step`` (forward,
    backward, optimizer) and ``eval`` seconds.

    The steady-state rate starts at the end of the first logging window (after start-up and warm-up) and
    leaves evaluation out; each logging window also has its own rate for the progress bar.
    """

    def __init__(self) -> None:
        self.data = self.step = self.eval = 0.0
        self.samples = 0
        self._window_start, self._window_samples = time.perf_counter(), 0
        self._steady: tuple[float, int, float] | None = None  # (time, samples, eval) when it started

    def batches(self, loader: Iterable) -> Iterator:
        """``loader``'s batches, adding the time spent waiting for each to ``data``."""
        start = time.perf_counter()
        for batch in loader:
            self.data += time.perf_counter() - start
            yield batch
            start = time.perf_counter()

    def add_samples(self, n: int) -> None:
        self.samples += n
        self._window_samples += n

    def window_rate(self) -> float:
        """Samples/s since the last call (the first call also starts the steady-state window)."""
        now = time.perf_counter()
        rate = self._window_samples / max(now - self._window_start, 1e-9)
        if self._steady is None:
            self._steady = (now, self.samples, self.eval)
        self._window_start, self._window_samples = now, 0
        return rate

    def steady_rate(self, loop_end: float, eval_in_loop: float) -> float:
        """Samples/s from the end of the first window to ``loop_end``, evaluation excluded; a run too short
        for a steady window gets samples over data + step time."""
        if self._steady is not None and self.samples > self._steady[1]:
            start, samples, eval_start = self._steady
            return (self.samples - samples) / max(loop_end - start - (eval_in_loop - eval_start), 1e-9)
        return self.samples / max(self.data + self.step, 1e-9)


class LossWindow:
    """Sums since the last log line (loss over finite micro-steps, finite micro-steps, examples seen, bad
    rows, and a mixed run's bad rows per source), kept on the device and reduced across processes in one
    collective when logged."""

    NAMES = ("loss_sum", "finite_steps", "examples", "bad_rows")

    def __init__(self, device: torch.device, sources: int = 0) -> None:
        self._sums = torch.zeros(len(self.NAMES) + sources, device=device)
        self.sources = sources

    def add(
        self,
        loss: torch.Tensor,
        loss_ok: torch.Tensor,
        examples: int,
        bad_rows: torch.Tensor,
        by_source: torch.Tensor | None = None,
    ) -> None:
        sums = [
            torch.where(loss_ok, loss.float(), 0.0),
            loss_ok.float(),
            bad_rows + examples,
            bad_rows.float(),
        ]
        if self.sources:
            sums.extend(by_source.to(self._sums.device).float().unbind())
        self._sums += torch.stack(sums)

    def reduce(self, accelerator: Accelerator) -> dict[str, Any]:
        """The sums over all processes since the last call (``bad_rows_by_source``: a list); the window
        starts again."""
        totals = accelerator.reduce(self._sums, "sum").tolist()
        self._sums.zero_()
        n = len(self.NAMES)
        return {**dict(zip(self.NAMES, totals[:n], strict=True)), "bad_rows_by_source": totals[n:]}


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """The training loop's progress: a tqdm bar on a terminal; where stderr is not one (``nohup``, a
    scheduler, CI), plain lines instead, one per ``train.log_every`` steps, as the HF Trainer logs: a bar's
    carriage-return frames would pile up into one line of megabytes.

    Args:
        total: optimizer steps of the run; ``initial``: the step it starts at (a resumed run).
        enabled: whether this process shows progress (the local main process).
        interactive: bar or lines; default: whether stderr is a terminal.
    """

    def __init__(self, total: int, initial: int, enabled: bool, interactive: bool | None = None) -> None:
        self.total, self.initial, self.enabled = total, initial, enabled
        self.interactive = _stderr_is_a_terminal() if interactive is None else interactive
        self.bar = tqdm(total=total, initial=initial, desc="train") if enabled and self.interactive else None
        self.start = time.perf_counter()

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def report(self, step: int, loss: float, lr: float, rate: float) -> None:
        """The loss, learning rate and samples/s at ``step`` (with elapsed time and ETA in plain lines)."""
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.0f}")
        elif self.enabled:
            elapsed = time.perf_counter() - self.start
            done = max(step - self.initial, 1)
            eta = elapsed / done * (self.total - step)
            print(
                f"train step {step}/{self.total} ({step / max(self.total, 1):.0%}): loss {loss:.4f}, "
                f"lr {lr:.2e}, {rate:.1f} samples/s, elapsed {_clock(elapsed)}, ETA {_clock(eta)}",
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _stderr_is_a_terminal() -> bool:
    return sys.stderr.isatty()
